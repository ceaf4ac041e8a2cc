"""Servers that hang (a local listener that accepts connections and never answers) or are down (a free port),
and calls bounded in time."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


def free_port() -> int:
    """A local port where nothing listens: a client's connection is refused, a server can listen on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` for the duration of the block: connections are accepted (the port is open, the
    TCP handshake completes) and held, but no byte is ever sent back, as by a server stuck or overloaded."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:  # the 0.1 s timeout: look at stop again
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def finished_within(seconds: float, fn, *args, **kwargs) -> tuple[bool, object]:
    """Run ``fn`` in a daemon thread: ``(True, its result)`` if it returns (or raises) within ``seconds``, else
    ``(False, None)`` and the thread is abandoned (a test that would otherwise hang fails instead)."""
    outcome: list = []

    def call() -> None:
        try:
            outcome.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    return (True, outcome[0]) if outcome else (False, None)

"""The local executor: a training stage's runs in this process one after another, or side by side in CPU
processes. Each run is :func:`hdkd.training.run.train_run`; a run is marked done as soon as its files are in
place, so that a resume after a kill keeps it, and a failed run is never marked done.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context

from hdkd.config import Params
from hdkd.roster import RunKey, primary_run
from hdkd.training.run import PendingRun, StagePaths, train_run


def train_one_after_another(name: str, params: Params, staged: dict[RunKey, StagePaths], todo: list[PendingRun],
                            mark_done: bool = True) -> None:
    """Train ``todo``'s runs here, one at a time (on a GPU, or as one of torchrun's ranks: only rank 0 marks)."""
    primary = primary_run(params)
    for pending in todo:
        train_run(name, params, staged[pending.run], pending.run, pending.run == primary)
        if mark_done:
            pending.mark_done()


def train_side_by_side(name: str, params: Params, staged: dict[RunKey, StagePaths], todo: list[PendingRun],
                       workers: int) -> None:
    """Train ``todo``'s runs on ``workers`` CPU processes, this one included, ``cpu_count // workers`` threads each.

    One loop over completed runs: a process takes the next run only when it is free (a run queued ahead in a busy
    worker would leave a free one idle), and each finished run is marked done here as it finishes. This process
    trains too (in a thread of its own), first: it has imported everything and opened MLflow already, while the
    others spawn and import (about 10 s). After a failed run no other starts; the error is raised once the
    running ones have finished."""
    primary, threads = primary_run(params), max(1, (os.cpu_count() or 1) // workers)
    queue = list(reversed(todo))  # popped from the end: todo's order
    running: dict[Future, tuple[Callable, PendingRun]] = {}
    error: BaseException | None = None
    with ProcessPoolExecutor(workers - 1, mp_context=get_context("spawn")) as pool:
        slots = {_in_a_thread: 1, pool.submit: workers - 1}  # this process first
        while running or (queue and error is None):
            for submit, size in slots.items():
                while queue and error is None and sum(s == submit for s, _ in running.values()) < size:
                    pending = queue.pop()
                    run = pending.run
                    future = submit(train_run, name, params, staged[run], run, run == primary, threads)
                    running[future] = submit, pending
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                _, pending = running.pop(future)
                if future.exception() is None:
                    pending.mark_done()
                elif error is None:
                    error = future.exception()
    if error is not None:
        raise error


def _in_a_thread(fn: Callable, *args) -> Future:
    """``fn(*args)`` in a daemon thread of this process, as a future: Ctrl-C stops the stage without waiting for
    the run to finish (a thread pool's threads would be joined at exit)."""
    future: Future = Future()

    def target() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the loop that waits on the future
            future.set_exception(e)

    threading.Thread(target=target, daemon=True).start()
    return future

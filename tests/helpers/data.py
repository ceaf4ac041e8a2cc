"""Helpers for the data tests: a local HTTP file server with Range support, and small fixtures."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hdkd.config import Params
from tests.helpers.net import free_port
from tests.helpers.params import make_params


@dataclass
class FileServer:
    """What the server serves and what it saw. ``files``: URL path -> bytes."""

    files: dict[str, bytes]
    base_url: str = ""
    honour_range: bool = True
    truncate_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before hanging up
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"


def _handler(server: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output clean
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0].lstrip("/")
            server.requests.append((path, self.headers.get("Range")))
            if path not in server.files:
                self.send_error(404, "no such file")
                return
            data = server.files[path]
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if m and server.honour_range:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = server.truncate_after.get(path)
            self.wfile.write(body if cut is None else body[:cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True

    return Handler


@contextlib.contextmanager
def serve(files: dict[str, bytes], **options) -> Iterator[FileServer]:
    """Serve ``files`` on 127.0.0.1 (a free port) for the duration of the block."""
    state = FileServer(dict(files), **options)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def refused_url() -> str:
    """A URL on a local port where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/file.zip"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def zip_tree(directory: Path, prefix: str = "") -> bytes:
    """The files under ``directory`` as zip bytes, with member names ``prefix + relative path``."""
    out = directory.parent / f"{directory.name}.tmp.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(directory.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(directory).as_posix())
    data = out.read_bytes()
    out.unlink()
    return data


def params(tmp_path: Path, **data) -> Params:
    """Params with ``data.root`` in ``tmp_path`` and small synthetic defaults, overridden by ``data``."""
    raw = {
        "root": str(tmp_path / "raw"),
        "image_size": 32,
        "synthetic": {"num_images": 120, "native_size": 40},
    }
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return make_params({"data": raw})


def dermamnist_npz(labels_shift: int = 0) -> bytes:
    """A small DermaMNIST-format npz (28 px; 21/7/14 images; labels 0-6 shifted by ``labels_shift``)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 21), ("val", 7), ("test", 14)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 7 + labels_shift).reshape(-1, 1)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_image(
    path: Path, colour: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (24, 16)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path

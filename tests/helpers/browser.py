"""For the tests of ``hdkd serve``: a tiny model file, test images, the app served on a free local port, and
Debian's Chromium driven by Selenium (its own chromedriver: Selenium Manager never downloads a browser)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hdkd.models import create_model
from hdkd.models.checkpoint import save_model
from tests.helpers import unavailable

CLASSES = ["benign", "malignant", "other"]
SIZE = 32
CHROMIUM = os.environ.get("HDKD_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HDKD_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--no-default-browser-check", "--disable-extensions")


def save_tiny_model(path: Path, classes=CLASSES, size: int = SIZE) -> Path:
    """A random-init tiny HDKD student (no training needed to test the plumbing), as training saves it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_model(path, create_model("hdkd_tiny", len(classes), size), "hdkd_tiny", list(classes), size, {})
    return path


def lesion_png(side: int = 96, seed: int = 0) -> bytes:
    """A PNG of a dark blob on a skin-coloured, noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    blob = np.exp(-((yy - 0.45) ** 2 + (xx - 0.55) ** 2) / 0.03)[..., None]
    pixels = (1 - blob) * np.array([225, 180, 160]) + blob * np.array([90, 50, 40]) + rng.normal(0, 8, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header announces ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, after the signature and chunk head
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC, over its type and data
    return bytes(data)


def need(what: str, present: bool) -> None:
    """Skip without ``what``, or fail in CI (env ``CI`` set), where every test must run."""
    if not present:
        unavailable(f"{what} not installed (Debian: apt-get install -y chromium chromium-driver; pip: selenium)")


@contextlib.contextmanager
def serving(app, timeout: float = 20.0) -> Iterator[str]:
    """``http://127.0.0.1:<free port>/`` while the block runs: ``app`` on a real uvicorn server, in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))  # the test process keeps its logging
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {timeout:g} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1280, height: int = 1000, timeout: float = 30.0):
    """Debian's headless Chromium under Selenium, with a fresh profile; skipped (failed in CI) without them."""
    need("chromium", Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None)
    need("chromedriver", Path(CHROMEDRIVER).is_file())
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need("selenium", False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # both paths given: no Selenium Manager
    driver.set_page_load_timeout(timeout)
    driver.set_script_timeout(timeout)
    try:
        yield driver
    finally:
        driver.quit()

"""``hdkd serve``: a local web page to try a trained model.

::

    hdkd serve --model models/hdkd/model.pt [--card reports/model_card.md] [--host 127.0.0.1] [--port 8000]

Drop one or more images on the page (or pick them): each gets its class probabilities, most probable first,
and its Grad-CAM overlay (:func:`hdkd.use.explain.grad_cam`) beside the image as the network sees it; the page
also shows the model card's intended use and limits. ``--model`` is anything :func:`hdkd.use.inference.load_classifier`
opens; Grad-CAM needs the network's layers, so an ONNX export (or a ``torch.export`` MLflow model) gets the
probabilities and a note instead of the overlay. The model is loaded once, at start-up: a model that cannot be
loaded stops the command at once.

Routes: ``GET /`` the page; ``POST /predict`` (multipart, one or more ``files``) -> ``{"results": [...]}``, one
entry per file, in order: ``name, predicted, probability, probabilities [{class, probability}], input, overlay,
note`` (images as PNG data URLs) or ``name, error``; ``GET /health``.

Safety: it listens on 127.0.0.1 unless ``--host`` says otherwise. A request body over ``--max-mb`` is refused
(413) whether its Content-Length announces it or its bytes exceed it as they arrive (the page sends one file per
request, so that is a per-file limit there). A file that is not an image, cannot be decoded, or holds more than
``MAX_PIXELS`` pixels (a decompression bomb: decoding would take gigabytes) gets an error message of its own;
no file's error affects another file or the server.
"""
# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, which name create_app's locals.

import argparse
import base64
import html
import io
import ipaddress
import logging
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hdkd.data.errors import UnreadableImage
from hdkd.data.images import load_resized
from hdkd.evidence.plots import figure_png
from hdkd.infra.distributed import device_type
from hdkd.models.networks import StagedNetwork
from hdkd.use.explain import grad_cam, overlay_figure
from hdkd.use.inference import Classifier, load_classifier, to_batch
from hdkd.use.predict import prediction

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

HELP = "a local web page to try a model: drop images, see probabilities, Grad-CAM and the model card"
PAGE = Path(__file__).with_name("serve_page.html")
DEFAULT_CARD = Path("reports/model_card.md")
CARD_SECTIONS = ("Intended use", "Must not be used for", "Weak spots")  # the card's headings on intended use and limits
MAX_MB = 20
MAX_PIXELS = 50_000_000  # ~150 MB as RGB; Pillow only warns up to 2x its own 89 M pixels


class DecompressionBomb(ValueError):
    """An image whose header announces more pixels than the server decodes."""


# ------------------------------------------------------------------------------------- one image
def decode(data: bytes, size: int, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Uploaded bytes -> ``uint8`` S x S x 3, decoded as :func:`hdkd.use.inference.read_image` decodes files.
    Raises :class:`UnreadableImage` with a reason meant for the page."""

    def open_checked() -> Image.Image:
        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.width * img.height > max_pixels:
            img.close()
            raise DecompressionBomb(f"{img.width} x {img.height} pixels")
        return img

    try:
        return load_resized(open_checked, size, name)
    except UnreadableImage as e:
        cause = e.__cause__
        if isinstance(cause, UnidentifiedImageError) or not data:
            reason = "not an image: no image format recognised (PNG, JPEG, TIFF, BMP, GIF and WebP are read)"
        elif isinstance(cause, (DecompressionBomb, Image.DecompressionBombError)):
            reason = (f"refused as a possible decompression bomb: {cause}, over the limit of {max_pixels:,} pixels "
                      "(resize it first)")
        else:
            reason = f"cannot decode this image: {e.reason}"
        raise UnreadableImage(name, reason) from e


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Tryout:
    """The loaded model: an uploaded file -> what the page shows of it (a prediction with its overlay, or an error)."""

    def __init__(self, classifier: Classifier, max_pixels: int = MAX_PIXELS):
        self.classifier, self.max_pixels = classifier, max_pixels
        model = getattr(classifier, "model", None)
        self.cam_model = model if isinstance(model, StagedNetwork) else None
        self.note = None if self.cam_model is not None else (
            f"No Grad-CAM overlay: it reads the network's layers, which {classifier.source} does not expose "
            "(an ONNX export, a torch.export graph or a baseline network); serve the PyTorch model file "
            "(models/<role>/model.pt) to see it.")
        self.lock = threading.Lock()  # one model, requests on a thread pool: Grad-CAM's hooks must not interleave

    def result(self, name: str, data: bytes) -> dict[str, Any]:
        try:
            image = decode(data, self.classifier.image_size, name, self.max_pixels)
            return {"name": name, **self.predict(image)}
        except UnreadableImage as e:
            return {"name": name, "error": e.reason}
        except Exception as e:  # one file's failure is reported with it, never raised past it
            log.exception("serving %s failed", name)
            return {"name": name, "error": f"could not process this image: {type(e).__name__}: {e}"}

    def predict(self, image: np.ndarray) -> dict[str, Any]:
        classes = self.classifier.classes
        batch = to_batch([image])
        with self.lock:
            probs = self.classifier.predict_proba(batch)[0]
            top = int(np.argmax(probs))
            cam = None
            if self.cam_model is not None:
                device = next(self.cam_model.parameters()).device
                cam = grad_cam(self.cam_model, batch.to(device), torch.tensor([top], device=device))[0].cpu().numpy()
        out = prediction("", probs, classes, len(classes))
        overlay = None
        if cam is not None:
            fig = overlay_figure(image, cam, f"Grad-CAM of {classes[top]} ({probs[top]:.0%})")
            overlay = png_data_url(figure_png(fig, dpi=100))
        return {"predicted": out["predicted"], "probability": out["probability"], "probabilities": out["top_k"],
                "input": png_data_url(image_png(image)), "overlay": overlay, "note": None if overlay else self.note}


# ------------------------------------------------------------------------------------ model card
def card_sections(text: str, wanted: tuple[str, ...] = CARD_SECTIONS) -> list[tuple[str, list[str]]]:
    """The ``## `` sections of a markdown card whose heading is in ``wanted``, as (heading, lines), card order."""
    sections, current = [], None
    for line in text.splitlines():
        if line.startswith("## "):
            current = (line[3:].strip(), []) if line[3:].strip() in wanted else None
            if current:
                sections.append(current)
        elif current and line.strip():
            current[1].append(re.sub(r"^[-*] ", "", line.strip()))
    return sections


def inline(text: str) -> str:
    """Markdown ``code``, **bold** and *emphasis* of escaped text as HTML."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def card_html(path: Path | None) -> str:
    """The card's intended use and limits as HTML (every text escaped), or a line saying there is none."""
    if path is None:
        return f"<p>No model card (give <code>--card</code>; the pipeline writes {DEFAULT_CARD}).</p>"
    text = path.read_text(encoding="utf-8")
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), path.name)
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p class=source>{html.escape(str(path))}</p>"]
    for heading, lines in card_sections(text):
        parts.append(f"<h3>{html.escape(heading)}</h3><ul>" + "".join(f"<li>{inline(s)}</li>" for s in lines) + "</ul>")
    if len(parts) == 2:
        parts.append(f"<p>The card has none of the sections {', '.join(CARD_SECTIONS)}.</p>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ the app
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, announced (Content-Length) or counted."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        message = (f"too large: a request may carry {self.limit / 2**20:g} MB at most "
                   "(one file a request on the page); resize the image or raise --max-mb")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:  # raised inside the route's body parsing: FastAPI answers it as it is
                raise HTTPException(413, message)
            return event

        return await self.app(scope, counted, send)


def create_app(model: str | Path | Classifier, card: Path | None = None, max_mb: float = MAX_MB,
               max_pixels: int = MAX_PIXELS, device: str = "cpu") -> "FastAPI":
    """The page's app around a model (a path or URI, loaded now, or a loaded classifier) and a model card."""
    from fastapi import FastAPI, UploadFile  # here, not at the top: every hdkd command imports this module
    from fastapi.responses import HTMLResponse

    classifier = model if isinstance(model, Classifier) else load_classifier(model, device)
    tryout = Tryout(classifier, max_pixels)
    max_bytes = int(max_mb * 2**20)
    page = (PAGE.read_text(encoding="utf-8")
            .replace("{{model}}", html.escape(classifier.source))
            .replace("{{classes}}", html.escape(", ".join(classifier.classes)))
            .replace("{{max_bytes}}", str(max_bytes))
            .replace("{{max_mb}}", f"{max_mb:g}")
            .replace("{{card}}", card_html(card)))

    app = FastAPI(title="hdkd serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_bytes)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": classifier.source, "classes": list(classifier.classes)}

    @app.post("/predict")
    def predict(files: list[UploadFile]) -> dict[str, Any]:  # sync: runs on the thread pool, off the event loop
        return {"results": [tryout.result(f.filename or f"file {i + 1}", f.file.read()) for i, f in enumerate(files)]}

    return app


# ------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/hdkd/model.pt",
                        help="models/<role>/model.pt, an exported model.onnx, or an MLflow model URI (models:/...)")
    parser.add_argument("--card", type=Path,
                        help=f"the model card whose intended use and limits the page shows (default: {DEFAULT_CARD} "
                             "if it exists)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-mb", type=float, default=MAX_MB, help=f"largest upload, MB (default {MAX_MB})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def server(args: argparse.Namespace):
    """The uvicorn server of ``args`` (model loaded, card read): what :func:`run` starts."""
    import uvicorn

    card = args.card if args.card is not None else (DEFAULT_CARD if DEFAULT_CARD.is_file() else None)
    if card is not None and not card.is_file():
        raise FileNotFoundError(f"no model card {card}")
    app = create_app(args.model, card, args.max_mb, device=device_type(args.device))
    if not _loopback(args.host):
        print(f"hdkd serve: warning: listening on {args.host}: anyone who can reach this machine can use the page",
              file=sys.stderr)
    return uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """``hdkd serve``: serves until interrupted (Ctrl-C); exit status 0."""
    server(args).run()
    return 0

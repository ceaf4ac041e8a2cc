"""Torch files: checkpoints written atomically with reproducible bytes, and read safely (``weights_only=True``).

Apart from :mod:`hdkd.infra.io` so that the torch-free wings (evidence, report) that write JSON and CSV never
import torch.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from hdkd.infra.io import atomic_path


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` ``obj`` atomically; the same tensors and metadata give the same bytes.

    torch.save to a path names the zip archive's root folder after the file (here the random
    temporary name), so equal weights gave different bytes and DVC hashes; to a file object the root
    is always ``archive`` (the entries carry no timestamps), and nothing is held in memory.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``).

    A file that is not one raises ``ValueError`` saying what it is instead (a directory, an image, an ONNX
    model, text, a damaged checkpoint) or, for pickled objects beyond tensors, ``unsafe content refused``.
    torch's own message is not passed on: it advises loading again with the unpickler's guard off, which
    for a malicious file is exactly the step that runs its payload.
    """
    path = Path(path)
    if path.is_dir():
        inside = path / "model.pt"
        hint = (f"did you mean {inside}?" if inside.is_file()
                else "give the checkpoint file itself (models/<role>/model.pt)")
        raise ValueError(f"{path} is a directory, not a checkpoint file: {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for corrupt or unsafe files
        raise ValueError(_refusal(path, e)) from None


# What a file that is not a checkpoint may be, by its first bytes.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF document"),
    (b"\x89HDF", "an HDF5 file"), (b"\x93NUMPY", "a NumPy array file"), (b"\x1f\x8b", "a gzip archive"),
)
_ADVICE = ("Checkpoints are written by the training stages (models/<role>/model.pt; a resume state in "
           "<stage>/state/); give one of those, or re-run the stage that writes it")


def _refusal(path: Path, error: Exception) -> str:
    """Why ``path`` did not load, in one line, without torch's advice to switch the unpickler's guard off."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in text:  # the guard met a class or function
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))
        return (f"unsafe content refused: {path} holds pickled objects beyond tensors and plain containers "
                f"({', '.join(names)}), which loading would run as code: it is not a checkpoint of this project. "
                "Delete it unless you know who made it and what it runs. " + _ADVICE)
    kind = _kind(path)
    if kind is None:  # a zip archive or a pickle, as torch writes them: a checkpoint cut short or altered
        reason = _first_sentence(text) if "weights_only" not in text else "its content does not unpickle"
        return (f"{path} is a damaged checkpoint ({reason}): re-run the stage that writes it, or restore it "
                "(`dvc checkout`)")
    return f"{path} is not a checkpoint of this project: it is {kind}. {_ADVICE}"


def _kind(path: Path) -> str | None:
    """What the file is, by its first bytes; ``None`` for what torch writes (a zip archive or a pickle)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return None
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    if path.suffix.lower() == ".onnx" or (head[0] == 0x08 and b"\x12" in head[1:4]):  # ModelProto: ir_version first
        return "an ONNX model"
    if len(head) > 8 and head[8:10] == b'{"':  # an 8-byte header length, then JSON
        return "a safetensors file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not merely a character cut at the end of the sample
            return "an unknown binary file"
    return "a text file" if b"\x00" not in head else "an unknown binary file"


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no detail"
    return line.split(". ")[0].rstrip(".")

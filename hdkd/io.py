"""Atomic file writes and small serialisation helpers.

Every output the pipeline declares goes through these: a temporary file in the target's
directory, flushed and fsynced, then ``os.replace``-d into place. A killed process leaves either
the old file or no file, never a half-written one that looks whole.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

# torch is imported inside the two checkpoint helpers only: the data stages use this module too,
# and loading torch costs ~0.7 GB of resident memory (a third of the SMOTE stage's budget).


log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)

# What the atomic writers below name the temporaries of an output ``name``: ``.<name>.<8 chars>.tmp``
# (mkstemp draws 8 of [a-z0-9_], sibling_temp_dir 8 hex digits), and ``.<name>.<8 chars>.old`` for
# the copy atomic_dir moves aside. A killed process leaves them behind; nothing else is named so.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.(?:tmp|old)")


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries that killed atomic writes left in ``directory`` (those of the output
    ``name``, or of any output); return what was removed.

    Called by a writer of these outputs before it writes: a concurrent writer of the same output
    would lose its temporary (DVC runs one stage at a time per repository).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        m = _TEMPORARY.fullmatch(p.name)
        if m and name in (None, m["name"]):
            log.info("removing %s, left by an interrupted run", p)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    What a killed earlier write of ``path`` left is removed first (as by :func:`atomic_dir`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sibling_temp_dir(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create a new, uniquely named hidden directory next to ``path`` (same file system, so it can
    be renamed onto ``path``), with the default permissions (``mkdtemp`` would make it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; swap it in place of ``path`` on success.

    For outputs made of several files (a prepared dataset): readers see the old directory or the
    complete new one, never a mix; a failure removes the temporary directory, and what a killed
    earlier write of ``path`` left (GBs for a prepared dataset) is removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent, path.name)
    tmp = sibling_temp_dir(path)
    try:
        yield tmp
        if path.exists():
            old = sibling_temp_dir(path, ".old")
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")  # same bytes on every OS


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as stable, human-readable JSON (sorted keys, trailing newline)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """CSV with ``\n`` line endings (the csv module defaults to ``\r\n``), header included in ``rows``."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_csv(path: str | os.PathLike, rows: Iterable[Sequence[Any]]) -> None:
    write_text(path, csv_text(rows))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a damaged one (truncated, not UTF-8) raises ``ValueError`` naming it."""
    return parse_json(Path(path).read_bytes(), str(path))


def parse_json(data: str | bytes, where: str) -> Any:
    """Parse JSON read from ``where`` (a file, ``<commit>:<path>``, an artifact), named in the error."""
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError name neither the file nor the fix
        raise ValueError(f"{where} is not valid JSON ({e}); {_DAMAGED}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; a damaged one raises ``ValueError`` naming it."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as e:
        raise ValueError(f"{path} is not valid YAML ({e}); {_DAMAGED}") from None


_DAMAGED = "was it cut short or edited by hand? Fix it, or delete it and re-run the stage that writes it"


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` ``obj`` atomically; the same tensors and metadata give the same bytes.

    torch.save to a path names the zip archive's root folder after the file (here the random
    temporary name), so equal weights gave different bytes and DVC hashes; to a file object the root
    is always ``archive`` (the entries carry no timestamps), and nothing is held in memory.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely: tensors and plain containers only (``weights_only=True``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"cannot load checkpoint {path}: {e}") from e


def file_md5(path: str | os.PathLike) -> str:
    """A file's md5, remembered for the process while its inode, size and mtime stay the same (as
    DVC's own hash cache): a training stage hashes its input arrays for its resume fingerprint and
    again for its MLflow dependency tags, and these can be gigabytes."""
    st = os.stat(path)
    return _md5(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _md5(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dvc_md5(path: str | os.PathLike, files: Iterable[Path] | None = None) -> str:
    """The hash DVC 3 records in ``dvc.lock``: a file's md5, or a directory's ``<md5>.dir`` tree hash.

    For a directory, ``files`` restricts the tree to those files (e.g. the images a reader uses;
    DVC leaves out what ``.dvcignore`` ignores: see :func:`hdkd.provenance.stage_dep_hashes`).
    It changes when a file is added, removed, renamed or edited, not when only timestamps change.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    files = sorted(files) if files is not None else sorted(f for f in path.rglob("*") if f.is_file())
    entries = sorted(({"md5": file_md5(f), "relpath": Path(f).relative_to(path).as_posix()} for f in files),
                     key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

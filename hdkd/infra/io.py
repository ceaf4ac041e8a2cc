"""Atomic file writes and small serialisation helpers.

Every output the pipeline declares goes through these: a temporary file in the target's
directory, flushed and fsynced, then ``os.replace``-d into place. A killed process leaves either
the old file or no file, never a half-written one that looks whole. Torch-free (torch files:
:mod:`hdkd.infra.torch_io`): the data stages and the report use it, and loading torch costs ~0.7 GB of resident
memory, a third of the SMOTE stage's budget.
"""

from __future__ import annotations

import contextlib
import csv
import errno
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
from typing import Any

import yaml

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


def output_path(path: str | os.PathLike) -> Path:
    """The output a path of the atomic writers stands for: each temporary in it (``.<name>.<8 chars>.tmp``,
    a staged file or directory) replaced by the output it becomes, so that messages name what the user
    knows (``reports/explain/explanations.png``), not a hidden name gone after the write."""
    parts = [m["name"] if (m := _TEMPORARY.fullmatch(part)) else part for part in Path(path).parts]
    return Path(*parts) if parts else Path(path)


class DiskFullError(OSError):
    """No space left for a stage's outputs: the message names them, the free space and what they need."""


def disk_full_message(error: BaseException) -> str | None:
    """One line for a full disk (or quota) anywhere in ``error``'s chain, else ``None``.

    A :class:`DiskFullError` says it precisely; any other ENOSPC (torch wraps it in a RuntimeError,
    SQLite in its own) gets the file it names, if any, and the free space where it was written.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return str(error)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            if error.filename:
                where = output_path(os.fsdecode(error.filename))
                return (f"no space left on device writing {where}: {_human(_free(where))} free there; "
                        "free some space, then re-run the stage")
            return (f"no space left on device: {_human(_free(Path.cwd()))} free in {Path.cwd()}; "
                    "free some space, then re-run the stage")
        error = error.__cause__ or error.__context__
    return None


class OutputSet:
    """A stage's outputs (files and directories), written to temporaries beside them and put in place
    together once every byte is written.

    A failure — a full disk above all — leaves the previous outputs whole and no temporary behind; a
    kill can fall only within the final renames. Use :func:`output_set`.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # output -> its temporary

    def file(self, path: str | os.PathLike) -> Path:
        """A temporary file to write the output file ``path`` to."""
        path = self._claim(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self._staged[path] = Path(tmp)
        return self._staged[path]

    def dir(self, path: str | os.PathLike) -> Path:
        """An empty temporary directory to fill in place of the output directory ``path``."""
        path = self._claim(path)
        self._staged[path] = sibling_temp_dir(path)
        return self._staged[path]

    def _claim(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path in self._staged:
            raise ValueError(f"{path} is already an output of this set")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent, path.name)  # what a killed earlier write left
        return path

    def commit(self) -> None:
        """Sync every byte staged (the files, and the files and entries of staged directories), rename
        the temporaries onto the outputs, then sync the directories whose entries the renames changed:
        after a power cut the outputs are the new ones whole, or the old ones."""
        for tmp in self._staged.values():
            if tmp.is_file():
                _fsync(tmp)
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
            elif tmp.is_dir() and not tmp.is_symlink():
                for root, _dirs, files in os.walk(tmp):  # symlinks are not followed: their targets are not ours
                    for name in files:
                        if not os.path.islink(os.path.join(root, name)):
                            _fsync(Path(root, name))
                    _fsync_dir(Path(root))
        aside = []
        for path, tmp in self._staged.items():
            if tmp.is_dir() and path.is_dir():  # a directory is replaced whole: nothing stale survives
                aside.append(sibling_temp_dir(path, ".old"))
                os.replace(path, aside[-1] / path.name)
            os.replace(tmp, path)
        for parent in dict.fromkeys(path.parent for path in self._staged):
            _fsync_dir(parent)
        for old in aside:
            shutil.rmtree(old)

    def discard(self) -> None:
        for tmp in self._staged.values():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)

    def disk_full_error(self) -> DiskFullError:
        outputs = [output_path(p) for p in self._staged]  # a set nested in another's staged directory
        written = sum(_size(t) for t in self._staged.values())
        previous = sum(_size(p) for p in outputs)
        where = outputs[0].parent if outputs else Path.cwd()
        took = f"; the previous version took {_human(previous)}" if previous else ""
        return DiskFullError(
            f"no space left on device for {', '.join(map(str, outputs))}: {_human(_free(where))} free in "
            f"{where}, and they need more than the {_human(written)} written when it ran out{took}. "
            "Free some space, then re-run the stage (the previous outputs are untouched)")


@contextlib.contextmanager
def output_set() -> Iterator[OutputSet]:
    """Stage outputs with :class:`OutputSet`; put them in place only if the block succeeds.

    ``with output_set() as outputs: write_json(outputs.file(out / "metrics.json"), m)``. Running out of
    disk space raises :class:`DiskFullError` naming the outputs and the space they need.
    """
    outputs = OutputSet()
    try:
        yield outputs
        outputs.commit()
    except BaseException as e:
        if disk_full_message(e) is not None and not isinstance(e, DiskFullError):
            raise outputs.disk_full_error() from e
        raise
    finally:
        outputs.discard()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    What a killed earlier write of ``path`` left is removed first (as by :func:`atomic_dir`).
    """
    with output_set() as outputs:
        yield outputs.file(path)


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
    with output_set() as outputs:
        yield outputs.dir(path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable. Windows cannot open a
    directory (its renames are durable once done), and a few file systems refuse the call (EINVAL)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _free(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")  # same bytes on every OS


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as stable JSON (sorted keys, trailing newline): human-readable, or with ``indent=None`` on one
    line (a large data file: a study's bundle, a number per line, would be twice the size)."""
    separators = (",", ":") if indent is None else None
    text = json.dumps(obj, indent=indent, separators=separators, sort_keys=True, default=_json_default)
    write_text(path, text + "\n")


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
    DVC leaves out what ``.dvcignore`` ignores: see :func:`hdkd.infra.provenance.stage_dep_hashes`).
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

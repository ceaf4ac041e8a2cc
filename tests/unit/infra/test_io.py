import argparse
import errno
import hashlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hdkd.infra.io import (
    DiskFullError,
    atomic_dir,
    atomic_path,
    disk_full_message,
    dvc_md5,
    file_md5,
    output_set,
    read_json,
    read_yaml,
    remove_stale_temporaries,
    write_json,
)
from hdkd.infra.torch_io import load_torch, save_torch
from tests.helpers import ROOT, unavailable


def test_file_md5_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    f = tmp_path / "arrays.npy"
    f.write_bytes(b"a" * 1000)
    first = file_md5(f)
    assert first == hashlib.md5(b"a" * 1000).hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert file_md5(f) == first and opened == []  # the second hash of an unchanged file reads nothing
    f.write_bytes(b"b" * 1000)  # same size, new content (and mtime)
    assert file_md5(f) == hashlib.md5(b"b" * 1000).hexdigest()
    os.replace(tmp_path / "arrays.npy", tmp_path / "renamed.npy")
    (tmp_path / "arrays.npy").write_bytes(b"c" * 1000)
    assert file_md5(f) == hashlib.md5(b"c" * 1000).hexdigest()


def test_atomic_path_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_json_is_written_stable_and_numpy_values_as_plain_ones(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": np.float32(0.5), "a": {"d": np.arange(2), "c": torch.tensor(3)}, "p": Path("x/y")})
    assert path.read_bytes() == b'{\n  "a": {\n    "c": 3,\n    "d": [\n      0,\n      1\n    ]\n  },\n  "b": 0.5,\n  "p": "x/y"\n}\n'
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_outputs_are_fsynced_and_get_the_usual_permissions(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd)))
    umask = os.umask(0o022)
    os.umask(umask)
    with output_set() as outputs:
        outputs.file(tmp_path / "a.txt").write_text("a")
    assert (tmp_path / "a.txt").stat().st_ino in synced  # its temporary was synced before the rename
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # mkstemp's 0600 is not kept


def test_a_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    # weights_only=True: unpickling an arbitrary class could run code from an untrusted checkpoint
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match=f"unsafe content refused: {re.escape(str(tmp_path / 'unsafe.pt'))} .*"
                                         r"argparse\.Namespace"):
        load_torch(tmp_path / "unsafe.pt")


class _Payload:
    """What a malicious checkpoint holds: unpickling it runs ``open(marker, "w")``, creating the marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _not_a_checkpoint(tmp_path: Path, kind: str) -> Path:
    from PIL import Image

    path = tmp_path / {"png": "model.png", "onnx": "model.onnx", "text": "model.pt", "empty": "model.pt",
                       "truncated": "model.pt", "directory": "models"}[kind]
    if kind == "png":
        Image.new("RGB", (8, 8)).save(path)
    elif kind == "onnx":
        path.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.9.0:\x8a\x01\n\x05graph")  # ModelProto's first fields
    elif kind == "text":
        path.write_text("epochs: 3\nlr: 0.001\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_torch(path, {"w": torch.zeros(100)})
        path.write_bytes(path.read_bytes()[:300])
    else:
        (path / "hdkd").mkdir(parents=True)
    return path


@pytest.mark.parametrize("kind, says", [
    ("png", "is not a checkpoint of this project: it is a PNG image"),
    ("onnx", "is not a checkpoint of this project: it is an ONNX model"),
    ("text", "is not a checkpoint of this project: it is a text file"),
    ("empty", "is not a checkpoint of this project: it is empty"),
    ("truncated", "is a damaged checkpoint"),
    ("directory", "is a directory, not a checkpoint file"),
])
def test_a_file_that_is_not_a_checkpoint_is_said_to_be_what_it_is(tmp_path, kind, says):
    path = _not_a_checkpoint(tmp_path, kind)
    with pytest.raises(ValueError) as caught:
        load_torch(path)
    message = str(caught.value)
    assert message.startswith(f"{path} {says}"), message
    assert "\n" not in message and "weights_only" not in message, message
    error = caught.value  # no torch advice in a traceback either
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"format": "hdkd-model/1", "state_dict": {"w": _Payload(marker)}}, path)
    with pytest.raises(ValueError) as caught:
        load_torch(path)
    message = str(caught.value)
    assert message.startswith(f"unsafe content refused: {path} ") and "(io.open)" in message, message
    assert "not a checkpoint of this project" in message and "weights_only" not in message, message
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None
    assert not marker.exists()


@pytest.mark.parametrize("content", [b'{"models": {"teacher": ', b"\xff\xfe not text"])
def test_a_damaged_json_file_is_named(tmp_path, content):
    path = tmp_path / "reports" / "bundle.json"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not valid JSON"):
        read_json(path)


@pytest.mark.parametrize("content", [b"a: [1, 2\n", b"\xff\xfe not text"])
def test_a_damaged_yaml_file_is_named(tmp_path, content):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not valid YAML"):
        read_yaml(path)


def test_checkpoints_are_byte_reproducible(tmp_path):
    # torch.save names the zip's root folder after the file: the random temporary name of an atomic
    # write made every model.pt differ, so DVC re-ran the stages downstream of identical weights.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    state = {"model": model.state_dict(), "epoch": 3, "meta": {"classes": ["a", "b"]}}
    save_torch(tmp_path / "model.pt", state)
    first = (tmp_path / "model.pt").read_bytes()
    save_torch(tmp_path / "model.pt", state)  # same path, new temporary name
    save_torch(tmp_path / "other" / "best.pt", state)
    assert (tmp_path / "model.pt").read_bytes() == first == (tmp_path / "other/best.pt").read_bytes()

    loaded = load_torch(tmp_path / "model.pt")
    clone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    clone.load_state_dict(loaded["model"])
    save_torch(tmp_path / "again.pt", {**loaded, "model": clone.state_dict()})
    assert (tmp_path / "again.pt").read_bytes() == first
    assert dvc_md5(tmp_path / "again.pt") == dvc_md5(tmp_path / "model.pt")


def _leftovers(directory, name):
    """What a killed atomic write of ``directory/name`` leaves: a temporary directory, a moved-aside
    old copy, a temporary file (mkstemp's name)."""
    (directory / f".{name}.1a2b3c4d.tmp" / "train").mkdir(parents=True)
    (directory / f".{name}.1a2b3c4d.tmp" / "train" / "images.npy").write_bytes(b"x" * 100)
    (directory / f".{name}.5e6f7a8b.old" / name).mkdir(parents=True)
    (directory / f".{name}.k3_x9qzz.tmp").write_text("half")
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def test_a_stale_temporary_of_the_same_output_is_removed(tmp_path):
    assert len(_leftovers(tmp_path, "prepared")) == 3
    other = _leftovers(tmp_path, "balanced")
    (tmp_path / "notes.tmp").write_text("not ours")
    with atomic_dir(tmp_path / "prepared") as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*other, "notes.tmp", "prepared"])
    remove_stale_temporaries(tmp_path)  # any output's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "prepared"]


def _write_set(root, text: str, fail_at: str | None = None) -> None:
    """A stage's outputs: two files in different directories and a directory of two files."""
    def write(path, content):
        if fail_at and fail_at in path.name:  # a file's temporary is named after it
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_text(content)

    with output_set() as outputs:
        write(outputs.file(root / "bundle.json"), text)
        write(outputs.file(root / "train" / "metrics.json"), text)
        plots = outputs.dir(root / "plots")
        write(plots / "a.csv", text)
        write(plots / "b.csv", text)


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fail_at", ["bundle.json", "metrics.json", "a.csv", "b.csv"])
def test_an_output_set_appears_whole_or_not_at_all(tmp_path, fail_at):
    _write_set(tmp_path, "old")
    (tmp_path / "plots" / "stale.csv").write_text("from a model no longer run")
    before = _snapshot(tmp_path)
    with pytest.raises(DiskFullError, match=r"no space left on device for .*bundle\.json.*: \S+ \w+ free in "):
        _write_set(tmp_path, "new", fail_at=fail_at)
    assert _snapshot(tmp_path) == before  # nothing new, nothing lost, no temporaries
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []
    _write_set(tmp_path, "new")
    assert _snapshot(tmp_path) == {k: "new" for k in ["bundle.json", "plots/a.csv", "plots/b.csv", "train/metrics.json"]}


def test_an_error_that_is_not_a_full_disk_passes_unchanged(tmp_path):
    with pytest.raises(KeyError, match="boom"), output_set() as outputs:
        outputs.file(tmp_path / "x.json").write_text("half")
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk_under_torch_is_named_in_one_line(tmp_path):
    if not Path("/dev/full").exists():
        unavailable("needs /dev/full (a device that is always full)")
    # /dev/full fails every write with ENOSPC, as a full disk does; torch wraps it in its own errors.
    script = textwrap.dedent("""
        import pipeline
        pipeline.start()  # what every stage does first
        import sys, torch
        from hdkd.infra.io import output_set
        if sys.argv[1] == "output":
            with output_set() as outputs:
                outputs.file("models/hdkd/model.pt")
                with open("/dev/full", "wb") as f:
                    torch.save({"w": torch.zeros(100_000)}, f)
        else:
            with open("/dev/full", "wb") as f:
                f.write(b"x" * 100_000)
                f.flush()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for case, expected in [("output", r"error: no space left on device for models/hdkd/model\.pt: .* free in "
                                      r"models/hdkd, and they need more than .*Free some space, then re-run the stage"),
                           ("elsewhere", r"error: no space left on device: .* free in \S+; free some space")]:
        done = subprocess.run([sys.executable, "-c", script, case], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert re.fullmatch(expected + r".*\n", done.stderr), done.stderr  # one line, no traceback


def test_disk_full_message_looks_through_wrapping_errors():
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/data/x.npy")
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from e
    except RuntimeError as wrapped:
        assert disk_full_message(wrapped).startswith("no space left on device writing /data/x.npy: ")
    assert disk_full_message(RuntimeError("other")) is None and disk_full_message(OSError(errno.EACCES, "no")) is None


def _full_disk_on(monkeypatch, name: str) -> None:
    """Writing a file called ``name`` (its temporary, whatever its directory) fails as on a full disk."""
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(f".{name}.") or self.name == name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_names_the_output_not_its_temporary(tmp_path, monkeypatch):
    from hdkd.infra.io import write_bytes

    _full_disk_on(monkeypatch, "explanations.png")
    with pytest.raises(DiskFullError) as caught:  # a file written into a staged directory (the explain stage)
        with output_set() as outputs:
            write_bytes(outputs.dir(tmp_path / "explain") / "explanations.png", b"png")
    message = str(caught.value)
    assert f"for {tmp_path / 'explain' / 'explanations.png'}: " in message, message
    assert ".tmp" not in message, message
    # an ENOSPC raised elsewhere about a temporary (a library writing into a staged directory)
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".explain.0a1b2c3d.tmp" / "x.json"))
    assert disk_full_message(error).startswith(f"no space left on device writing {tmp_path / 'explain' / 'x.json'}: ")
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".model.pt.ab_cd123.tmp"))
    assert disk_full_message(error).startswith(f"no space left on device writing {tmp_path / 'model.pt'}: ")


def test_commit_fsyncs_the_files_of_staged_directories_and_the_parents_after_renaming(tmp_path, monkeypatch):
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b))), real_replace(a, b))[1])
    with output_set() as outputs:
        outputs.file(tmp_path / "out" / "metrics.json").write_text("{}")
        staged = outputs.dir(tmp_path / "plots")
        (staged / "sub").mkdir()
        (staged / "a.csv").write_text("a")
        (staged / "sub" / "b.csv").write_text("b")
    synced = [(e[1], e[2]) for e in events if e[0] == "fsync"]
    for f in ("out/metrics.json", "plots/a.csv", "plots/sub/b.csv"):  # every output file's bytes
        assert ((tmp_path / f).stat().st_ino, False) in synced, f
    last_rename = max(i for i, e in enumerate(events) if e[0] == "replace")
    after = {e[1] for e in events[last_rename + 1:] if e[0] == "fsync" and e[2]}
    for parent in (tmp_path / "out", tmp_path):  # the directories whose entries the renames changed
        assert parent.stat().st_ino in after, parent

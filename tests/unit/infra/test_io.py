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
from tests.helpers import ROOT


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
    with pytest.raises(ValueError, match=f"cannot load checkpoint {re.escape(str(tmp_path / 'unsafe.pt'))}"):
        load_torch(tmp_path / "unsafe.pt")


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


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_real_full_disk_under_torch_is_named_in_one_line(tmp_path):
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

import hashlib
import os

import pytest

from hdkd.io import atomic_path, file_md5


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

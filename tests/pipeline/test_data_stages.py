"""The download -> prepare -> balance stages through their pipeline scripts, and through `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hdkd.config import ConfigError
from hdkd.data.formats import BRAIN_CLASSES
from hdkd.data.packed import load_split
from hdkd.data.synthetic import generate
from hdkd.infra.io import read_json
from pipeline import balance as balance_stage, download as download_stage, prepare as prepare_stage
from tests.helpers import ROOT
from tests.helpers.params import section


def _params_file(tmp_path: Path, **data) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"root": str(tmp_path / "raw"), "image_size": 32})
    raw["data"]["synthetic"].update({"num_images": 120, "native_size": 40})
    raw["data"].update(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_stages(tmp_path: Path, params: Path) -> None:
    out = tmp_path / "data"
    download_stage.main(["--params", str(params), "--out", str(out / "raw")])
    prepare_stage.main(["--params", str(params), "--raw", str(out / "raw"), "--out", str(out / "prepared")])
    balance_stage.main(
        ["--params", str(params), "--prepared", str(out / "prepared"), "--out", str(out / "balanced")]
    )


def _imagefolder_tree(tmp_path: Path) -> Path:
    """The synthetic MRI set re-laid out as root/{train,test}/<class>/<image>."""
    mri = generate(section("data.synthetic", layout="brain_tumor_mri", num_images=80, native_size=32), tmp_path / "mri")
    tree = tmp_path / "tree"
    shutil.copytree(mri / "Training", tree / "train")
    shutil.copytree(mri / "Testing", tree / "test")
    return tree


def test_stages_on_the_default_dataset(tmp_path):
    _run_stages(tmp_path, _params_file(tmp_path))
    data = tmp_path / "data"
    assert read_json(data / "raw/source.json")["dataset"] == "synthetic"
    manifest = read_json(data / "prepared/manifest.json")
    assert sum(manifest["splits"]["sizes"].values()) == 120
    train = load_split(data / "balanced", "train", image_size=32)
    assert train.class_counts() == manifest["splits"]["counts"]["train"]  # balance.method: none
    assert os.path.samefile(
        data / "balanced/train/images.npy", data / "prepared/train/images.npy"
    )  # linked, not copied


def test_stages_on_an_imagefolder_tree(tmp_path):
    tree = _imagefolder_tree(tmp_path)
    _run_stages(tmp_path, _params_file(tmp_path, dataset="imagefolder", root=str(tree)))
    data = tmp_path / "data"
    record = read_json(data / "raw/source.json")
    assert record["directory"] == str(tree) and record["classes"] == list(BRAIN_CLASSES)
    assert list(data.joinpath("raw").iterdir()) == [data / "raw/source.json"]  # the tree stays where it is
    manifest = read_json(data / "prepared/manifest.json")
    assert manifest["splits"]["sizes"]["test"] == len(list((tree / "test").rglob("*.jpg")))
    assert manifest["duplicates"]["cross_split_groups"] >= 1


def test_invalid_params_fail_before_any_work(tmp_path):
    params = _params_file(tmp_path, image_size=30)
    with pytest.raises(ConfigError, match="data.image_size"):
        download_stage.main(["--params", str(params), "--out", str(tmp_path / "data/raw")])
    assert not (tmp_path / "data").exists() and not (tmp_path / "raw").exists()


def _dvc(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_dvc_repro_defaults_then_an_imagefolder_tree(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("hdkd", "pipeline"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"]["num_images"] = 200
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _dvc(repo, "init", "--no-scm", "-q")

    log = _dvc(repo, "repro", "balance")
    assert all(f"Running stage '{s}'" in log for s in ("download", "prepare", "balance"))
    assert read_json(repo / "data/prepared/manifest.json")["dataset"] == "synthetic"
    log = _dvc(repo, "repro", "balance")
    assert "Stage 'prepare' didn't change" in log

    tree = _imagefolder_tree(tmp_path)
    params["data"].update({"dataset": "imagefolder", "root": str(tree)})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _dvc(repo, "repro", "balance")
    manifest = read_json(repo / "data/prepared/manifest.json")
    assert manifest["dataset"] == "imagefolder" and manifest["classes"] == list(BRAIN_CLASSES)
    assert "Stage 'prepare' didn't change" in _dvc(repo, "repro", "balance")

    victim = sorted((tree / "train/glioma").iterdir())[0]
    shutil.copy(sorted((tree / "train/pituitary").iterdir())[0], victim)  # the external tree changes
    # DVC cannot watch a tree outside the repo: the documented step is to re-run download, whose
    # source record then changes, and prepare follows.
    _dvc(repo, "repro", "-f", "download")
    log = _dvc(repo, "repro", "balance")
    assert "Running stage 'prepare'" in log

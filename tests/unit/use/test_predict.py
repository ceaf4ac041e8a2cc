"""`hdkd predict`: inputs (files, folders, globs), unreadable files, output formats, model loading errors,
the MLflow model URI path, and the console script's registration."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from hdkd.infra.torch_io import save_torch
from hdkd.models import create_model
from hdkd.models.checkpoint import CHECKPOINT_KEYS, save_model
from hdkd.use.cli import main
from tests.helpers import ROOT
from tests.helpers.data import write_image

CLASSES = ["benign", "malignant", "other"]
SIZE = 32


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A random-init tiny HDKD student (no training needed to test the plumbing)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, create_model("hdkd_tiny", len(CLASSES), SIZE), "hdkd_tiny", CLASSES, SIZE, {})
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """Three good images (PNG, JPEG, grayscale; various sizes), a truncated PNG, random bytes named .jpg,
    a text file, and a hidden file (left out)."""
    d = tmp_path / "images"
    write_image(d / "a.png", (200, 40, 40), (40, 30))
    write_image(d / "sub" / "b.jpg", (30, 160, 90), (64, 64))
    write_image(d / "c.png", (90, 90, 90), (20, 50))
    (d / "truncated.png").write_bytes(write_image(tmp_path / "whole.png", size=(50, 50)).read_bytes()[:60])
    (d / "noise.jpg").write_bytes(os.urandom(500))
    (d / "notes.txt").write_text("not an image\n")
    (d / ".hidden.png").write_bytes(b"")
    return d


def predict(capsys, *argv) -> tuple[int, str, str]:
    code = main(["predict", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def expected_probabilities(model_file: Path, image: Path) -> np.ndarray:
    """What evaluate would give the image if prepare had packed it (independent of hdkd.use.inference)."""
    from PIL import Image
    from torch.utils.data import DataLoader, TensorDataset

    from hdkd.data.augment import eval_transform
    from hdkd.data.images import decode_resized
    from hdkd.evaluation.evaluate import predict_proba
    from hdkd.models.checkpoint import load_model

    pixels, _ = decode_resized(lambda: Image.open(image), SIZE, str(image))
    x = eval_transform()(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))
    model, _ = load_model(model_file)
    return predict_proba(model, DataLoader(TensorDataset(x[None], torch.zeros(1, dtype=torch.long))))[1][0]


def test_folder_with_good_and_corrupt_images(capsys, model_file, folder):
    code, out, err = predict(capsys, "--model", model_file, "--top-k", 3, folder)
    assert code == 0
    rows = csv_rows(out)
    assert list(rows[0]) == ["path", "predicted", "probability", "top_k", "error"]
    good = [r for r in rows if not r["error"]]
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert [Path(r["path"]).name for r in good] == ["a.png", "c.png", "b.jpg"]  # sorted paths: sub/ after c.png
    assert set(bad) == {"truncated.png", "noise.jpg", "notes.txt"}
    assert all(r["predicted"] == r["probability"] == r["top_k"] == "" for r in rows if r["error"])
    assert "UnidentifiedImageError" in bad["notes.txt"] and "UnidentifiedImageError" in bad["noise.jpg"]
    assert bad["truncated.png"]  # Pillow's reason (a truncated stream), whatever its wording
    for name, reason in bad.items():
        assert f"skipped {folder / name}: {reason}" in err
    for r in good:
        probs = expected_probabilities(model_file, Path(r["path"]))
        top = json.loads(r["top_k"])
        assert [t["class"] for t in top] == [CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        assert [t["probability"] for t in top] == pytest.approx(sorted(probs, reverse=True), abs=1e-6)  # batch of 3 vs 1
        assert r["predicted"] == top[0]["class"] and float(r["probability"]) == top[0]["probability"]


def test_top_k_lists_the_k_most_probable(capsys, model_file, folder):
    _, out, _ = predict(capsys, "--model", model_file, "--top-k", 2, "--format", "json", folder / "a.png")
    (p,) = json.loads(out)["predictions"]
    probs = expected_probabilities(model_file, folder / "a.png")
    assert [t["probability"] for t in p["top_k"]] == pytest.approx(np.sort(probs)[::-1][:2], abs=1e-12)  # both batches of 1
    _, out, _ = predict(capsys, "--model", model_file, "--top-k", 10, "--format", "json", folder / "a.png")
    assert len(json.loads(out)["predictions"][0]["top_k"]) == len(CLASSES)  # K above the class count: all


def test_json_file_output_and_glob(capsys, model_file, folder, tmp_path):
    out_file = tmp_path / "out" / "predictions.json"
    code, out, _ = predict(capsys, "--model", model_file, "--out", out_file, str(folder / "**" / "*.jpg"),
                           tmp_path / "missing.png")
    assert code == 0 and out == ""
    result = json.loads(out_file.read_text())
    assert result["model"] == str(model_file) and result["classes"] == CLASSES
    assert [Path(p["path"]).name for p in result["predictions"]] == ["b.jpg"]  # the glob reaches sub/
    errors = {Path(e["path"]).name: e["error"] for e in result["errors"]}
    assert set(errors) == {"noise.jpg", "missing.png"} and errors["missing.png"] == "no such file or folder"
    assert set(result["predictions"][0]) == {"path", "predicted", "probability", "top_k"}


def test_batches_give_the_same_predictions(capsys, model_file, folder):
    _, one, _ = predict(capsys, "--model", model_file, "--batch-size", 1, folder)
    _, many, _ = predict(capsys, "--model", model_file, "--batch-size", 64, folder)
    first, second = csv_rows(one), csv_rows(many)
    assert [r["path"] for r in first] == [r["path"] for r in second]
    for a, b in zip(first, second):
        assert a["predicted"] == b["predicted"]
        assert [t["probability"] for t in json.loads(a["top_k"] or "[]")] == pytest.approx(
            [t["probability"] for t in json.loads(b["top_k"] or "[]")], abs=1e-6)


def test_no_readable_image_exits_2(capsys, model_file, folder):
    code, out, err = predict(capsys, "--model", model_file, folder / "notes.txt", folder / "nothing-*.png")
    assert code == 2
    errors = {Path(r["path"]).name: r["error"] for r in csv_rows(out)}
    assert errors["nothing-*.png"] == "no file matches this pattern" and "UnidentifiedImageError" in errors["notes.txt"]
    assert "notes.txt" in err


@pytest.mark.parametrize("kind", ["text", "dict", "onnx"])
def test_a_file_that_is_not_a_model_is_a_clear_error(capsys, kind, tmp_path, folder):
    path = tmp_path / ("model.onnx" if kind == "onnx" else "model.pt")
    if kind == "dict":
        save_torch(path, {"weights": torch.zeros(3)})
    else:
        path.write_text("not a model\n")
    code, out, err = predict(capsys, "--model", path, folder)
    assert code == 1 and out == ""
    expected = {"text": "is not a checkpoint of this project: it is a text file", "dict": "is not an hdkd model file",
                "onnx": "is not a loadable ONNX model"}[kind]
    assert err.startswith("hdkd predict: error: ") and expected in err and str(path) in err


def test_missing_model_is_a_clear_error(capsys, tmp_path, folder):
    code, _, err = predict(capsys, "--model", tmp_path / "absent.pt", folder)
    assert code == 1 and "not found" in err and "absent.pt" in err


def test_label_file_must_match_the_model(capsys, model_file, folder, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    assert predict(capsys, "--model", model_file, "--label-file", labels, folder / "a.png")[0] == 0
    labels.write_text("\n".join(reversed(CLASSES)) + "\n")
    code, out, err = predict(capsys, "--model", model_file, "--label-file", labels, folder / "a.png")
    assert code == 1 and out == ""
    assert f"trained on classes {CLASSES}" in err and str(labels) in err


def test_mlflow_model_uri(capsys, model_file, folder, tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch

    from hdkd.infra.tracking import model_requirements
    from hdkd.models.checkpoint import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.create_experiment("predict", artifact_location=(tmp_path / "artifacts").as_uri())  # not ./mlruns
    mlflow.set_experiment("predict")
    model, meta = load_model(model_file)
    metadata = {k: meta[k] for k in CHECKPOINT_KEYS}
    pins = model_requirements()  # the stages' pins (else MLflow infers them in a subprocess: 5 s a model)
    with mlflow.start_run() as run:
        # MLflow's default "pt2" format (a torch.export graph) and the pickled module
        mlflow.pytorch.log_model(model.eval(), name="model", metadata=metadata, registered_model_name="hdkd-tiny",
                                 input_example=np.zeros((2, 3, SIZE, SIZE), np.float32), pip_requirements=pins)
        mlflow.pytorch.log_model(model, name="pickled", metadata=metadata, serialization_format="pickle",
                                 pip_requirements=pins)
    try:
        _, from_file, _ = predict(capsys, "--model", model_file, "--format", "json", folder / "a.png")
        for uri in (f"runs:/{run.info.run_id}/model", "models:/hdkd-tiny/1", f"runs:/{run.info.run_id}/pickled"):
            code, from_uri, _ = predict(capsys, "--model", uri, "--format", "json", folder / "a.png")
            assert code == 0
            (got,), (want,) = json.loads(from_uri)["predictions"], json.loads(from_file)["predictions"]
            assert got["predicted"] == want["predicted"]
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)  # pt2: other kernels
            assert json.loads(from_uri)["model"] == uri
        code, _, err = predict(capsys, "--model", "models:/no-such-model/1", folder / "a.png")
        assert code == 1 and "cannot open MLflow model models:/no-such-model/1" in err
    finally:
        mlflow.set_tracking_uri(None)


def test_python_m_entry_point(model_file, folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "hdkd.use.cli", "predict", "--model", str(model_file), str(folder)],
                          check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert len([r for r in csv_rows(proc.stdout) if not r["error"]]) == 3


def test_console_script_points_at_the_dispatcher():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["hdkd"].partition(":")
    assert callable(getattr(import_module(module), attr))
    assert getattr(import_module(module), attr) is main


@pytest.mark.parametrize("kind, says", [
    ("unknown network", "names the network 'resnet9000', which this version of hdkd does not build (known: "),
    ("other weights", "holds weights that do not fit its network hdkd_tiny ("),
    ("no network", "lacks 'model_name'"),
])
def test_a_model_file_hdkd_cannot_rebuild_is_one_line_naming_it(capsys, model_file, folder, tmp_path, kind, says):
    blob = torch.load(model_file, weights_only=True)
    if kind == "unknown network":
        blob["model_name"] = "resnet9000"
    elif kind == "other weights":
        blob["state_dict"] = {k: v[..., :1] if v.ndim else v for k, v in blob["state_dict"].items()}
    else:
        del blob["model_name"]
    save_torch(tmp_path / "model.pt", blob)
    code, out, err = predict(capsys, "--model", tmp_path / "model.pt", folder / "a.png")
    assert code == 1 and out == ""
    assert err.startswith(f"hdkd predict: error: {tmp_path / 'model.pt'} {says}"), err
    assert err.count("\n") == 1, err  # one line, no traceback


@pytest.mark.skipif(sys.platform == "win32", reason="directory symlinks need privileges on Windows")
def test_a_glob_does_not_follow_directory_symlinks_and_predicts_each_image_once(capsys, model_file, tmp_path):
    from tests.helpers.net import finished_within

    d = tmp_path / "d"
    write_image(d / "a.png", (200, 40, 40), (40, 30))
    write_image(d / "sub" / "b.png", (30, 160, 90), (64, 64))
    (d / "loop").symlink_to(".", target_is_directory=True)  # a link back up: a cycle for whoever follows it
    code, out, err = predict(capsys, "--model", model_file, f"{d}/**/*.png")
    assert code == 0, err
    assert sorted(Path(r["path"]).relative_to(d).as_posix() for r in csv_rows(out)) == ["a.png", "sub/b.png"]
    (d / "sub" / "up").symlink_to("..", target_is_directory=True)  # two cycles: paths grow without end
    done, result = finished_within(60, predict, capsys, "--model", model_file, f"{d}/**/*.png")
    assert done, "the glob did not finish within 60 s"
    code, out, _ = result
    assert code == 0 and sorted(Path(r["path"]).name for r in csv_rows(out)) == ["a.png", "b.png"]
    code, out, _ = predict(capsys, "--model", model_file, f"{d}/*/*.png", f"{d}/a.png")  # via the link: once
    assert code == 0 and sorted(Path(r["path"]).name for r in csv_rows(out)) == ["a.png", "b.png"]


@pytest.mark.parametrize("server", ["down", "silent"])
def test_a_registry_uri_with_the_tracking_server_down_fails_within_seconds(capsys, folder, monkeypatch, server):
    from tests.helpers.data import refused_url
    from tests.helpers.net import finished_within, silent_server

    with contextlib.ExitStack() as stack:
        uri = refused_url().removesuffix("/file.zip") if server == "down" else stack.enter_context(silent_server())
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where models:/ URIs resolve
        start = time.monotonic()
        done, result = finished_within(60, predict, capsys, "--model", "models:/hdkd-tiny/1", folder / "a.png")
        took = time.monotonic() - start
    assert done, f"hdkd predict with the tracking server {server} did not give up within 60 s"
    code, out, err = result
    assert code == 1 and out == "" and took < 30, (took, err)
    assert err.startswith("hdkd predict: error: cannot open MLflow model models:/hdkd-tiny/1: MLflow tracking server "
                          f"{uri} "), err
    assert ("is unreachable" if server == "down" else "does not answer") in err and err.count("\n") == 1, err

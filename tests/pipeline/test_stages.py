"""The three training stages and the evaluate stage on the embedded dataset, through the stage code."""

import json

import pytest

from hdkd.data.augment import eval_transform
from hdkd.data.balance import balance_training_split
from hdkd.data.loader import PackedDataset
from hdkd.data.packed import load_split
from hdkd.data.prepare import prepare_dataset
from hdkd.data.sources import fetch_dataset
from hdkd.evaluation.evaluate import run_evaluation
from hdkd.models.checkpoint import load_model
from pipeline._train import main as train_main
from tests.helpers.params import make_params, params_dict


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A Brain-MRI-like embedded dataset (4 classes), prepared and balanced, and fast settings."""
    root = tmp_path_factory.mktemp("stages")
    opt = {"epochs": 8, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "schedule": "cosine",
           "warmup_epochs": 1, "warmup_lr": 1e-4, "min_lr": 1e-5}
    raw = {
        "seeds": [0], "fractions": [1.0],  # one run per model (the runs' loop: tests/unit/training/test_stage.py)
        "data": {"root": str(root / "raw"), "image_size": 32,
                 "synthetic": {"layout": "brain_tumor_mri", "num_images": 400, "native_size": 48}},
        "augment": {"enabled": False},  # ~280 training images: learnable in a few epochs without it
        "train": {"batch_size": 32},
        "teacher": {"epochs": 8, "optimizer": "adam", "lr": 3e-3},
        "student": opt,
        "distill": opt,
        "evaluate": {"bootstrap": 50, "latency_iters": 1, "latency_warmup": 0, "latency_batch_sizes": [4]},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    (root / "params.yaml").write_text(json.dumps(params_dict(raw)))  # JSON is YAML
    params = make_params(raw)
    fetch_dataset(params.data, root / "raw")
    prepare_dataset(params.data, params.seed, root / "prepared", root / "raw" / "source.json")
    balance_training_split(params.balance, params.augment, params.seed, root / "prepared", root / "balanced")
    return root, params


def run_stage(root, role):
    argv = ["--params", str(root / "params.yaml"), "--train", str(root / "balanced"), "--val", str(root / "prepared"),
            "--out", str(root / "models" / role), "--metrics", str(root / "metrics" / f"{role}.json"),
            "--resume-dir", str(root / "checkpoints" / role), "--run-record", str(root / "metrics" / f"{role}.run.json")]
    if role == "hdkd":
        argv += ["--teacher", str(root / "models" / "teacher")]
    return train_main(role, argv)


@pytest.mark.slow
def test_each_stage_trains_beats_chance_and_evaluates(workspace):
    root, params = workspace
    val = load_split(root / "prepared", "val")
    majority = max(val.class_counts().values()) / len(val)  # the best a constant guess can do
    for role in ("teacher", "student", "hdkd"):
        result = run_stage(root, role)
        assert result["val_accuracy"] > majority + 0.1, (role, result["val_accuracy"], majority)
        metrics = json.loads((root / "metrics" / f"{role}.json").read_text())
        assert metrics["val_accuracy"] == result["val_accuracy"]
        run = json.loads((root / "metrics" / f"{role}.run.json").read_text())
        assert run["run_id"] and run["stage"] == f"train_{role}"
        model, meta = load_model(root / "models" / role / "model.pt")
        assert meta["classes"] == list(val.classes) and len(meta["history"]) == 8
        assert not (root / "checkpoints" / role).exists()  # finished: no resume state left behind

    test = load_split(root / "prepared", "test")
    bundle = run_evaluation(params, {r: root / "models" / r / "model.pt" for r in ("teacher", "student", "hdkd")},
                            PackedDataset(test, eval_transform()), list(test.classes), root / "reports")
    for role in ("teacher", "student", "hdkd"):
        assert bundle["models"][role]["evaluation"]["accuracy"] > 0.4  # 4 classes
        assert bundle["models"][role]["efficiency"]["macs"] > 0
    assert json.loads((root / "reports" / "bundle.json").read_text())["params_hash"] == params.digest()


def test_distillation_without_a_teacher_fails_before_training(workspace, tmp_path):
    root, _ = workspace
    with pytest.raises(FileNotFoundError, match="run `dvc repro train_teacher`"):
        train_main("hdkd", ["--params", str(root / "params.yaml"), "--train", str(root / "balanced"),
                            "--val", str(root / "prepared"), "--out", str(tmp_path / "out"),
                            "--metrics", str(tmp_path / "m.json"), "--resume-dir", str(tmp_path / "ck"),
                            "--teacher", str(tmp_path / "absent.pt")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()

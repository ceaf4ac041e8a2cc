"""evaluate_model on a model with known outputs; the files write_evaluation writes."""

import csv
import errno
import io
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hdkd.evaluation.evaluate
from hdkd.evaluation.evaluate import evaluate_model, evaluate_stage, run_evaluation, write_evaluation
from hdkd.evidence.bundle import make_bundle, model_names
from hdkd.infra import numerics
from hdkd.infra.io import DiskFullError, read_json
from hdkd.models import create_model
from hdkd.models.checkpoint import save_model
from hdkd.roster import model_files
from tests.helpers.bundles import CLASSES, TEST_LABELS, bundle_with, hand_models
from tests.helpers.params import make_params, section


class ChannelMeans(nn.Module):
    """Logits = per-channel image means; wrong on purpose in train mode, and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.calls += 1
        logits = x.mean(dim=(2, 3)) * self.scale
        return logits if not self.training else -logits


def images_with_logits(logits: torch.Tensor, side: int = 4) -> torch.Tensor:
    return logits[:, :, None, None].expand(-1, -1, side, side).contiguous()


def loader_for(pred: list[int], labels: list[int], batch_size: int = 3) -> DataLoader:
    logits = torch.full((len(pred), 3), -1.0)
    logits[torch.arange(len(pred)), torch.tensor(pred)] = 2.0
    return DataLoader(TensorDataset(images_with_logits(logits), torch.tensor(labels)), batch_size=batch_size)


def test_evaluate_model_runs_once_in_eval_mode():
    labels = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 1, 1, 2, 2, 0]
    model = ChannelMeans()
    cfg = section("evaluate", bootstrap=50)
    result = evaluate_model(model, loader_for(pred, labels), CLASSES, cfg, "cpu", seed=0)
    assert model.calls == 3  # 8 images, batches of 3: one pass
    assert model.training  # mode given back
    assert result["accuracy"] == pytest.approx(6 / 8)  # eval mode; train mode would predict the minimum
    assert result["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert result["predictions"]["true_counts"] == [3, 2, 3]
    assert result["predictions"]["predicted_counts"] == [3, 3, 2]
    p_top = torch.softmax(torch.tensor([2.0, -1.0, -1.0]), 0)[0].item()
    assert result["predictions"]["mean_confidence"] == pytest.approx(p_top)
    assert result["ci"]["resamples"] == 50 and result["ece_bins"] == cfg.ece_bins
    json.dumps(result)  # JSON-able as is


def test_evaluate_model_rejects_non_logits():
    class Pair(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)), x.mean(dim=(2, 3))

    with pytest.raises(ValueError, match="must return logits"):
        evaluate_model(Pair(), loader_for([0, 1], [0, 1]), CLASSES, section("evaluate"))
    with pytest.raises(ValueError, match="class_names has 2"):
        evaluate_model(ChannelMeans(), loader_for([0, 1], [0, 1]), ["a", "b"], section("evaluate"))


def test_write_evaluation_files(tmp_path, bundle):
    paths = write_evaluation(bundle, tmp_path / "reports")
    out = tmp_path / "reports"
    names = sorted(p.relative_to(out).as_posix() for p in paths)
    assert names == sorted(
        ["bundle.json", "metrics.json"]
        + [f"eval/{m}.json" for m in ("teacher", "student", "hdkd")]
        + ["plots/confusion.csv", "plots/training.csv"]
    )
    assert not list(out.rglob(".*"))  # no temporary files left behind
    assert read_json(out / "bundle.json") == bundle

    metrics = read_json(out / "metrics.json")
    assert list(metrics) == ["hdkd", "student", "teacher"]  # sorted keys
    teacher = metrics["teacher"]
    assert teacher["accuracy"] == 0.9 and teacher["accuracy_ci_low"] == 0.85 and teacher["f1_macro_ci_high"] == 0.8
    assert teacher["params"] == 3948677 and teacher["macs"] == 5_812_345_678
    assert teacher["timing"] == {"cpu_bs1_ms_per_image": 40.0, "cpu_bs1_images_per_s": 25.0}

    detail = read_json(out / "eval" / "hdkd.json")
    assert detail["evaluation"]["confusion_matrix"] == [[8, 2, 0], [1, 8, 1], [0, 0, 20]]
    assert detail["efficiency"]["params"]["total"] == 3727288

    # One file per chart, every model in it (long format): every cell of each confusion matrix, zeros included.
    rows = list(csv.reader(io.StringIO((out / "plots" / "confusion.csv").read_text())))
    assert rows[0] == ["model", "actual", "predicted", "count", "share"] and len(rows) == 1 + 3 * 9
    assert [r[0] for r in rows[1::9]] == ["teacher", "student", "hdkd"]  # report order
    student = [r[1:] for r in rows if r[0] == "student"]
    assert student[:3] == [["akiec", "akiec", "8", "0.8"], ["akiec", "bcc", "2", "0.2"], ["akiec", "nv", "0", "0.0"]]
    assert ["bcc", "akiec", "1", "0.1"] in student and ["nv", "nv", "20", "1.0"] in student

    curves = (out / "plots" / "training.csv").read_text()
    assert curves.splitlines()[:2] == ["model,epoch,lr,train_ce,train_accuracy,val_loss,val_accuracy",
                                       "teacher,1,0.001,,,1.25,0.625"]  # the hand history logs no train_ce
    assert [line.split(",")[:2] for line in curves.splitlines()[1:]] == [
        [m, str(e)] for m in ("teacher", "student", "hdkd") for e in (1, 2, 3)]
    assert "\r" not in curves


def test_a_full_disk_leaves_the_previous_evaluation_whole(tmp_path, bundle, monkeypatch):
    # Before: bundle.json and metrics.json were new and complete-looking, eval/ and plots/ missing.
    out = tmp_path / "reports"
    write_evaluation(bundle, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = hdkd.evaluation.evaluate.write_csv

    def full_at_the_training_curves(path, rows):
        if path.name == "training.csv":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, rows)

    monkeypatch.setattr(hdkd.evaluation.evaluate, "write_csv", full_at_the_training_curves)
    with pytest.raises(DiskFullError, match="bundle.json, .*metrics.json, .*eval, .*plots: .* free in "):
        write_evaluation(bundle_with(shift=0.05), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # temporaries gone too


def test_models_without_history_get_no_curves(tmp_path):
    models = hand_models()
    models["hdkd"]["history"] = []
    b = make_bundle(models, make_params(), CLASSES, test_labels=TEST_LABELS)
    paths = write_evaluation(b, tmp_path)
    assert (tmp_path / "plots" / "training.csv") in paths
    assert {line.split(",")[0] for line in (tmp_path / "plots" / "training.csv").read_text().splitlines()[1:]} == {
        "teacher", "student"}
    for m in models.values():
        m["history"] = []
    paths = write_evaluation(make_bundle(models, make_params(), CLASSES, test_labels=TEST_LABELS), tmp_path)
    assert not (tmp_path / "plots" / "training.csv").exists()  # no empty chart
    assert (tmp_path / "plots" / "confusion.csv") in paths


def test_evaluate_stage_fails_on_cuda_without_a_gpu(tmp_path, monkeypatch):
    # As the training stages do: `train.device: cuda` is never run on the CPU in silence.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = make_params({"train": {"device": "cuda"}})
    with pytest.raises(RuntimeError, match="train.device is 'cuda' but no CUDA device is available"):
        evaluate_stage(params, tmp_path / "prepared", tmp_path / "models", tmp_path / "reports")
    assert list(tmp_path.iterdir()) == []  # before any work


def test_missing_models_name_the_stages_to_run(tmp_path):
    save_model(tmp_path / "teacher" / "model.pt", create_model("teacher_tiny", 3, image_size=32), "teacher_tiny",
               list(CLASSES), 32, {})
    with pytest.raises(FileNotFoundError, match="run `dvc repro train_student train_hdkd` first"):
        model_files(tmp_path)


def test_a_missing_baseline_names_its_stage(tmp_path):
    params = make_params()  # the shipped baselines: vit, resnet
    for name in ("teacher", "student", "hdkd", "vit"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pt").touch()
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro train_baseline@resnet` first"):
        model_files(tmp_path, params)
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "model.pt").touch()
    assert list(model_files(tmp_path, params)) == ["teacher", "student", "hdkd", "vit", "resnet"]


def test_a_baseline_is_evaluated_and_reported_like_the_other_models(tmp_path):
    from hdkd.report.tables import main_table, table_csv  # matplotlib: only where the report is built

    vit = {"timm": "deit_tiny_patch16_224", "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
           "optim": {}}
    params = make_params({"data": {"image_size": 32}, "baselines": {"vit": vit}, "tracking": {"enabled": False},
                          "evaluate": {"bootstrap": 5, "latency_batch_sizes": [1], "latency_iters": 1,
                                       "latency_warmup": 0}})
    models = {}
    for name, network, kwargs in [("teacher", "teacher_tiny", {}), ("vit", "timm:" + vit["timm"], vit["kwargs"])]:
        models[name] = tmp_path / name / "model.pt"
        save_model(models[name], create_model(network, 3, 32, **kwargs), network, list(CLASSES), 32, kwargs)
    test_set = TensorDataset(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))
    bundle = run_evaluation(params, {"vit": models["vit"], "teacher": models["teacher"]}, test_set, CLASSES,
                            tmp_path / "reports")
    assert list(bundle["models"]) == ["vit", "teacher"] and model_names(bundle) == ["teacher", "vit"]
    assert bundle["numerics"] == numerics.numerics_versions() and bundle["numerics"]["torch"] == torch.__version__
    metrics = read_json(tmp_path / "reports" / "metrics.json")
    assert list(metrics) == ["teacher", "vit"] and metrics["vit"].keys() == metrics["teacher"].keys()
    assert (tmp_path / "reports" / "eval" / "vit.json").is_file()
    rows = list(csv.reader(io.StringIO(table_csv(main_table(bundle)))))
    assert [row[0] for row in rows[1:]] == ["Teacher", "VIT (timm deit_tiny_patch16_224)"]


def test_a_model_of_another_image_size_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    save_model(path, create_model("teacher_tiny", 3, image_size=32), "teacher_tiny", list(CLASSES), 32, {})
    test_set = TensorDataset(torch.zeros(2, 3, 64, 64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="trained on 32px images, data.image_size is 64"):
        run_evaluation(make_params({"data": {"image_size": 64}}), {"teacher": path}, test_set, CLASSES,
                       tmp_path / "reports")
    assert not (tmp_path / "reports").exists()

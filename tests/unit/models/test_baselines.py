"""Comparison baselines: timm specs validated by key, built from scratch offline, trained, resumed and reloaded."""

import socket

import pytest
import torch
import yaml

from hdkd.config import ConfigError, apply_overlay, parse_params
from hdkd.evaluation.efficiency import count_parameters, measure_efficiency
from hdkd.infra.io import read_json
from hdkd.infra.tracking import Tracker
from hdkd.models import TIMM_PREFIX, create_model
from hdkd.models.baselines import check_baselines
from hdkd.models.checkpoint import load_model, save_model
from hdkd.roster import roster_entry
from hdkd.training.run import StagePaths, build_criterion, input_fingerprint, run_training
from pipeline._train import main as train_baseline_main
from tests.helpers import ROOT
from tests.helpers.fit import CPU, interruptible_fit, toy_split
from tests.helpers.params import section

VIT = {"timm": "vit_tiny_patch16_224", "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}
RESNET = {"timm": "resnet10t", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to open a connection fails the test: baselines never download anything."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def params_with(baselines, **sections):
    """The shipped params.yaml at 32² with these baselines (and sections replaced)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    merged = {name: {**raw[name], **values} for name, values in sections.items()}
    report = {**raw["report"], "comparisons": [["hdkd", "student"]]}  # not the shipped baselines' pairs
    params = parse_params({**raw, "data": {**raw["data"], "image_size": 32}, **merged, "baselines": baselines,
                           "report": report})
    check_baselines(params)
    return params


@pytest.mark.parametrize("spec, key, message", [
    ({**VIT, "timm": "vit_tiny_patch16"}, "vit.timm", "unknown timm architecture .* close matches: vit_tiny_patch16_"),
    ({**VIT, "timm": "resnet18.a1_in1k"}, "vit.timm", "no pretrained tag"),
    ({**VIT, "kwargs": {"depthh": 2}}, "vit.kwargs.depthh", "takes no argument 'depthh'"),
    ({**RESNET, "kwargs": {"depthh": 2}}, "vit.kwargs.depthh", "takes no argument 'depthh'"),  # no img_size either
    ({**VIT, "kwargs": {"embed_dim": 30, "num_heads": 4}}, "vit.kwargs", "at image size 32: AssertionError"),
    ({**VIT, "kwargs": {"pretrained": True}}, "vit.kwargs.pretrained", "never downloaded"),
    ({**VIT, "kwargs": {"img_size": 224}}, "vit.kwargs.img_size", "set by the pipeline"),
    ({**VIT, "optim": {"lr": -1}}, "vit.optim.lr", "greater than 0"),
    ({"timm": "resnet18"}, "vit.kwargs", "missing"),
])
def test_bad_baselines_fail_validation_naming_the_key(spec, key, message):
    with pytest.raises(ConfigError, match=rf"(?m)^  baselines[.]{key.replace('.', '[.]')}: .*{message}"):
        params_with({"vit": spec})


@pytest.mark.parametrize("name, message", [("teacher", "the paper's models' names"),
                                           ("ViT", "not a valid baseline name"), ("a/b", "not a valid baseline name")])
def test_baseline_names_are_safe_and_distinct_from_the_papers_models(name, message):
    with pytest.raises(ConfigError, match=rf"(?m)^  baselines: .*{message}"):
        params_with({name: VIT})


def test_the_shipped_params_validate_their_baselines():
    shipped = [yaml.safe_load((ROOT / "params.yaml").read_text())]
    shipped += [yaml.safe_load(apply_overlay(ROOT / "params.yaml", p)) for p in sorted((ROOT / "params").glob("paper-*.yaml"))]
    for raw in shipped:
        params = parse_params(raw)
        check_baselines(params)
        assert len(params.baselines) >= 2


def test_a_baseline_trains_like_the_student_unless_its_optim_says_otherwise():
    student = {**yaml.safe_load((ROOT / "params.yaml").read_text())["student"], "epochs": 7, "optimizer": "adamw",
               "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup_epochs": 1}
    params = params_with({"vit": VIT, "cnn": {**RESNET, "optim": {"lr": 5e-4, "optimizer": "sgd"}}}, student=student)
    assert params.baselines["vit"].optim == params.student
    assert params.baselines["cnn"].optim == params.student.model_copy(update={"lr": 5e-4, "optimizer": "sgd"})
    assert parse_params(params.to_dict()) == params  # the resolved view reads back unchanged


def test_img_size_reaches_transformers_only():
    vit = create_model(TIMM_PREFIX + VIT["timm"], 3, 32, **VIT["kwargs"])
    assert vit.net.patch_embed.img_size == (32, 32) and vit.net.pos_embed.shape[1] == 1 + (32 // 8) ** 2
    resnet = create_model(TIMM_PREFIX + RESNET["timm"], 3, 32, **RESNET["kwargs"])  # ResNet takes no img_size
    for model in (vit, resnet):
        logits, feats = model(torch.zeros(2, 3, 32, 32), return_features=True)
        assert logits.shape == (2, 3) and feats == []
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_creating_a_baseline_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="kwargs.pretrained"):
        create_model(TIMM_PREFIX + "resnet18", 3, 32, pretrained=True)
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_model(TIMM_PREFIX + "hf-hub:timm/resnet18.a1_in1k", 3, 32)


@pytest.mark.parametrize("spec", [VIT, RESNET], ids=["vit", "resnet"])
def test_a_baseline_trains_resumes_and_reloads_identically(spec, tmp_path):
    train, val = toy_split(64), toy_split(32, seed=1)
    cfg = section("student", epochs=3, optimizer="adamw", lr=3e-3, weight_decay=0.05, schedule="cosine",
                  warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5)
    name = TIMM_PREFIX + spec["timm"]

    def run(resume_dir, stop_after=None):
        return interruptible_fit(lambda: create_model(name, 3, 32, **spec["kwargs"]), "student", cfg, train, val,
                                 seed=1, resume_dir=resume_dir, stop_after=stop_after)

    straight, model = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resume", stop_after=1)
    resumed, _ = run(tmp_path / "resume")
    assert resumed.resumed_from == 1
    timing = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight.history]
    assert straight.history[-1]["train_loss"] < straight.history[0]["train_loss"]

    path = tmp_path / "model.pt"
    save_model(path, model, name, ["a", "b", "c"], 32, spec["kwargs"])
    loaded, meta = load_model(path)  # weights_only=True
    assert meta["model_name"] == name and meta["overrides"] == spec["kwargs"]
    images = val.tensors[0][:8]
    model.eval(), loaded.eval()
    with torch.inference_mode():
        assert torch.equal(loaded(images), model(images))


def test_efficiency_measures_a_baseline():
    model = create_model(TIMM_PREFIX + VIT["timm"], 3, 32, **VIT["kwargs"])
    eff = measure_efficiency(model, 32, section("evaluate", latency_batch_sizes=[1], latency_iters=2, latency_warmup=0))
    # Patch embedding (16 patches of 8x8x3 -> 32) and the block: qkv, attention (2 heads of width 16
    # over 17 tokens, q·kᵀ and ·v), projection, MLP (32 -> 128 -> 32); the head reads the class token.
    tokens, d = 17, 32
    block = tokens * d * 3 * d + 2 * (2 * tokens * tokens * 16) + tokens * d * d + 2 * tokens * d * 4 * d
    assert eff["macs"] == 16 * 192 * d + block + d * 3
    assert eff["params"] == count_parameters(model) and eff["timing"][0]["ms_per_image"] > 0


# ------------------------------------------------------------------------------- the stage
def stage_params(tmp_path, tracked=False):
    """The shipped params at 32² with one shallow two-epoch baseline ``vit`` (and ``resnet`` beside it)."""
    tracking = {"enabled": tracked, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": None}
    return params_with({"vit": {**VIT, "optim": {"epochs": 2, "lr": 3e-3}}, "resnet": RESNET}, tracking=tracking)


def stage_paths(tmp_path, run):
    for split in ("train", "val"):  # the fingerprinted inputs
        (tmp_path / split).mkdir(exist_ok=True)
    return StagePaths(tmp_path / "train", tmp_path / "val", tmp_path / run / "models" / "vit",
                      tmp_path / run / "reports" / "vit.json", tmp_path / run / "checkpoints" / "vit")


def test_a_baseline_stage_trains_its_own_recipe_resumes_to_the_same_bytes_and_is_tagged(tmp_path, monkeypatch):
    import mlflow
    monkeypatch.chdir(tmp_path)  # the run's repository root: no dvc.yaml, no git
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    datasets = (toy_split(48), toy_split(16, seed=1), ["a", "b", "c"])
    straight = stage_paths(tmp_path, "straight")
    run_training("vit", stage_params(tmp_path, tracked=True), straight, datasets, CPU)

    resumed = stage_paths(tmp_path, "resumed")
    log_metrics = Tracker.log_metrics

    def killed_after_epoch_1(tracker, metrics, step=None):
        log_metrics(tracker, metrics, step)
        if step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "log_metrics", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_training("vit", stage_params(tmp_path), resumed, datasets, CPU)
    monkeypatch.setattr(Tracker, "log_metrics", log_metrics)
    assert run_training("vit", stage_params(tmp_path), resumed, datasets, CPU)["resumed_from"] == 1
    assert (resumed.out_dir / "model.pt").read_bytes() == (straight.out_dir / "model.pt").read_bytes()

    model, meta = load_model(straight.out_dir / "model.pt")
    assert (meta["model_name"], meta["overrides"]) == (TIMM_PREFIX + VIT["timm"], VIT["kwargs"])
    assert [row["epoch"] for row in meta["history"]] == [1, 2]  # its optim's epochs, not the student's
    assert read_json(straight.metrics)["epochs"] == 2 and not straight.resume_dir.exists()
    run = read_json(straight.run_record)
    assert run["model"] == TIMM_PREFIX + VIT["timm"]
    tags = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run["run_id"]).data.tags
    assert (tags["hdkd.model"], tags["hdkd.stage"]) == (TIMM_PREFIX + VIT["timm"], "train_baseline@vit")


def test_a_baseline_trains_on_cross_entropy_alone():
    criterion = build_criterion(roster_entry("vit", {"baselines": {"vit": VIT}}), section("student"))
    assert criterion.feature is None and criterion.logit.kind == "none"


def test_a_baseline_resume_state_depends_on_its_own_entry_only(tmp_path):
    paths = stage_paths(tmp_path, "run")
    params = stage_params(tmp_path)

    def fingerprint(name, baselines):
        return input_fingerprint(name, params.model_copy(update={"baselines": baselines}), paths)

    vit, other = params.baselines["vit"], params.baselines["resnet"]
    wider = other.model_copy(update={"kwargs": {**other.kwargs, "stem_width": 16}})
    assert fingerprint("vit", {"vit": vit, "resnet": wider}) == fingerprint("vit", {"vit": vit, "resnet": other})
    assert fingerprint("vit", {"vit": vit.model_copy(update={"optim": params.student})}) != \
        fingerprint("vit", {"vit": vit})
    for model in ("teacher", "student", "hdkd"):  # the paper's models do not depend on the baselines at all
        assert fingerprint(model, {}) == fingerprint(model, {"vit": vit, "resnet": wider})


def test_the_command_line_names_an_unknown_baseline(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(stage_params(tmp_path).to_dict()))
    with pytest.raises(SystemExit):
        train_baseline_main(None, ["cnn", "--params", str(tmp_path / "params.yaml")])
    assert "no baseline 'cnn'" in capsys.readouterr().err


def test_the_download_stage_refuses_a_bad_baseline_before_any_work(tmp_path, monkeypatch):
    from pipeline.download import main as download

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["baselines"]["vit"]["kwargs"]["depthh"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"baselines\.vit\.kwargs\.depthh"):
        download(["--params", "params.yaml"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]

"""What a (shrunk) `dvc repro` leaves in MLflow, and that the pipeline's outputs never depend on it.

One parent run per pipeline execution, one nested run per tracked stage carrying the resolved
params, per-epoch metrics, artifacts and provenance tags whose dependency hashes are the ones
dvc.lock records. With tracking switched off, or its server down, every output is still written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from hdkd.config import parse_params
from hdkd.infra.io import file_md5
from hdkd.roster import ROSTER, roster
from hdkd.training.run import recipe
from hdkd.use.cli import main as predict_cli
from hdkd.use.inference import read_image, to_batch
from tests.helpers.net import free_port
from tests.helpers.params import PARAMS
from tests.helpers.pipeline import (
    PIPELINE_OUTPUTS,
    ScratchRepo,
    command_env,
    metric_history,
    mlflow_client,
    runs_by_stage,
)

pytestmark = pytest.mark.slow

TRAINING_STAGES = {m.stage: m for m in ROSTER}  # the paper's models
RUN = roster(PARAMS)  # and the baselines (the shrunk params keep their keys)
TRACKED_STAGES = [*(m.stage for m in RUN), "evaluate"]
EPOCH_METRICS = ("train_loss", "train_ce", "train_logit_kd", "train_feature_kd", "train_accuracy", "val_loss",
                 "val_accuracy", "lr", "epoch_time_s", "images_per_s")


@pytest.fixture(scope="module")
def stage_runs(tracked_pipeline) -> dict:
    """The one run of each stage (and the parent, under "pipeline") of the tracked pipeline."""
    runs = runs_by_stage(tracked_pipeline)
    assert sorted(runs) == sorted(["pipeline", *TRACKED_STAGES])
    assert all(len(r) == 1 for r in runs.values()), {stage: len(r) for stage, r in runs.items()}
    return {stage: r[0] for stage, r in runs.items()}


def test_one_parent_run_holds_one_finished_run_per_stage(stage_runs):
    parent = stage_runs["pipeline"]
    for stage in TRACKED_STAGES:
        run = stage_runs[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert run.info.status == "FINISHED", stage
        assert run.info.run_name == (stage if stage == "evaluate" else f"{stage} seed0-frac1")


def test_every_seed_has_its_own_run_under_the_parent_tagged_with_seed_and_fraction(stage_runs, tracked_pipeline):
    parent = stage_runs["pipeline"].info.run_id
    every = runs_by_stage(tracked_pipeline, every_run=True)
    for stage in TRACKED_STAGES[:-1]:  # the training stages
        runs = sorted(every[stage], key=lambda r: r.data.tags["hdkd.seed"])
        assert [(r.data.tags["hdkd.seed"], r.data.tags["hdkd.fraction"]) for r in runs] == [("0", "1"), ("1", "1")]
        assert all(r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED" for r in runs)
        assert runs[1].info.run_name == f"{stage} seed1-frac1"


@pytest.mark.parametrize("stage", TRACKED_STAGES)
def test_stage_runs_carry_the_resolved_params(stage, stage_runs, tracked_pipeline):
    params = parse_params(tracked_pipeline.params)
    logged = stage_runs[stage].data.params
    assert sorted(logged) == sorted(params.flat())
    assert logged["teacher.epochs"] == "3" and logged["distill.lambda"] == "10.0"
    assert logged["distill.stages"] == "[1, 2, 3]"


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_training_runs_log_every_epoch(stage, stage_runs, tracked_pipeline):
    run_id = stage_runs[stage].info.run_id
    epochs = recipe(parse_params(tracked_pipeline.params), TRAINING_STAGES[stage]).epochs
    history = {key: metric_history(tracked_pipeline, run_id, key) for key in EPOCH_METRICS}
    for key, values in history.items():
        assert [step for step, _ in values] == list(range(1, epochs + 1)), key
    distilled = [value for key in ("train_logit_kd", "train_feature_kd") for _, value in history[key]]
    if TRAINING_STAGES[stage].distills:
        assert all(v > 0 for v in distilled)
    else:  # plain cross-entropy: no distillation terms
        assert all(v == 0 for v in distilled)


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_training_runs_keep_the_checkpoint_history_and_params(stage, stage_runs, tracked_pipeline, tmp_path):
    client, run_id = mlflow_client(tracked_pipeline), stage_runs[stage].info.run_id
    assert {"checkpoint", "history.json", "params.json"} <= {a.path for a in client.list_artifacts(run_id)}
    checkpoint = Path(client.download_artifacts(run_id, "checkpoint/model.pt", str(tmp_path)))
    model = TRAINING_STAGES[stage].name
    assert file_md5(checkpoint) == file_md5(tracked_pipeline.root / f"models/{model}/model.pt")


def test_evaluate_run_keeps_the_results_bundle(stage_runs, tracked_pipeline, tmp_path):
    client, run_id = mlflow_client(tracked_pipeline), stage_runs["evaluate"].info.run_id
    assert {"results_bundle.json", "params.json"} <= {a.path for a in client.list_artifacts(run_id)}
    bundle = Path(client.download_artifacts(run_id, "results_bundle.json", str(tmp_path)))
    assert json.loads(bundle.read_text()) == tracked_pipeline.json("reports/bundle.json")


@pytest.mark.parametrize("stage", TRACKED_STAGES)
def test_provenance_tags_match_git_and_dvc_lock(stage, stage_runs, tracked_pipeline):
    tags = stage_runs[stage].data.tags
    assert tags["hdkd.git_commit"] == tracked_pipeline.head()
    assert tags["hdkd.git_dirty"] == "false"
    assert tags["hdkd.params_hash"] == parse_params(tracked_pipeline.params).digest()
    locked = yaml.safe_load((tracked_pipeline.root / "dvc.lock").read_text())["stages"][stage]["deps"]
    dep_tags = {k.removeprefix("hdkd.dep."): v for k, v in tags.items() if k.startswith("hdkd.dep.")}
    assert dep_tags == {d["path"]: d["md5"] for d in locked}


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_model_directory_names_its_run(stage, stage_runs, tracked_pipeline):
    run_json = tracked_pipeline.json(f"reports/train/{TRAINING_STAGES[stage].name}.run.json")
    assert run_json["run_id"] == stage_runs[stage].info.run_id
    assert run_json["parent_run_id"] == stage_runs["pipeline"].info.run_id


def assert_every_output_written(repo: ScratchRepo) -> None:
    missing = [str(p) for p in PIPELINE_OUTPUTS if not (repo.root / p).exists()]
    assert not missing, f"outputs not written: {missing}"
    for model in ROSTER:
        assert repo.json(f"reports/train/{model.name}.run.json")["run_id"] is None


def test_without_tracking_every_output_is_written_and_mlflow_untouched(untracked_pipeline):
    assert_every_output_written(untracked_pipeline)
    assert not (untracked_pipeline.root / "mlflow.db").exists()
    assert not (untracked_pipeline.root / "mlartifacts").exists()


def test_with_the_tracking_server_down_every_output_is_written(unreachable_tracking_pipeline):
    repo, log = unreachable_tracking_pipeline
    assert_every_output_written(repo)
    assert log.count("continuing without tracking") == len(TRACKED_STAGES), log


def test_every_trained_model_is_registered_with_its_run(stage_runs, tracked_pipeline):
    client = mlflow_client(tracked_pipeline)
    for model in RUN:
        (version,) = client.search_model_versions(f"name='hdkd-synthetic-{model.name}'")
        assert version.run_id == stage_runs[model.stage].info.run_id, model.name
        assert version.tags["hdkd.params_hash"] == stage_runs[model.stage].data.tags["hdkd.params_hash"]


def test_mlflow_serves_the_registered_hdkd_model_as_hdkd_predict_predicts(tracked_pipeline, tmp_path):
    repo = tracked_pipeline.root
    image = next((repo / "data" / "raw").rglob("*.jpg"))
    assert predict_cli(["predict", "--model", str(repo / "models/hdkd/model.pt"), "--top-k", "7", "--format",
                        "json", "--out", str(tmp_path / "p.json"), str(image)]) == 0
    output = json.loads((tmp_path / "p.json").read_text())
    (predicted,), classes = output["predictions"], output["classes"]
    port = free_port()
    env = {**command_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/hdkd-synthetic-hdkd/latest",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the scoring server did not start"
                time.sleep(1)
        size = tracked_pipeline.params["data"]["image_size"]
        body = json.dumps({"inputs": to_batch([read_image(image, size)]).numpy().tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            logits = torch.tensor(json.loads(response.read())["predictions"], dtype=torch.float64)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    served = torch.softmax(logits, dim=1)[0]
    assert predicted["predicted"] == classes[int(served.argmax())]
    for entry in predicted["top_k"]:
        assert abs(entry["probability"] - float(served[classes.index(entry["class"])])) < 1e-5, entry

"""`kill -9` of `dvc repro` in the middle of training, then `dvc repro` again: the stage resumes
from its last finished epoch and ends exactly where an uninterrupted run ends (on the CPU).

DVC itself copes with the kill: its repo lock (.dvc/tmp/lock) is an OS file lock that dies with
the process, and the stale entries of its stage lock (.dvc/tmp/rwlock), which name the killed
PID, are dropped by the next run ("had been killed. Auto removed it from the lock file").
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from hdkd.infra.torch_io import load_torch
from tests.helpers.pipeline import (
    ScratchRepo,
    kill_group,
    make_scratch_repo,
    metric_history,
    runs_by_stage,
    stage_outputs,
)

pytestmark = pytest.mark.slow

STAGE, MODEL = "train_teacher", "teacher"
RESUME_STATE = Path("checkpoints") / MODEL / "seed0-frac1" / "state" / "last.pt"  # the primary run's


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    """Poll until ``path`` exists; fail if the process ends first or it takes too long."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"dvc repro ended (exit {proc.returncode}) before {path} was written"
        assert time.monotonic() < deadline, f"{path} not written within {timeout_s} s"
        time.sleep(0.05)


def dvc_lock_pids(repo: ScratchRepo) -> set[int]:
    """The processes DVC's stage lock file names as reading or writing."""
    lock = json.loads((repo.root / ".dvc/tmp/rwlock").read_text())
    infos = [i for mode in lock.values() for entry in mode.values() for i in (entry if isinstance(entry, list)
                                                                                else [entry])]
    return {i["pid"] for i in infos}


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory) -> dict:
    """A scratch repo whose train_teacher is killed after its first epoch's resume state, then
    reproduced; what was seen after the kill and the output of the second `dvc repro`."""
    tmp = tmp_path_factory.mktemp("resume")
    repo = make_scratch_repo(tmp / "repo")
    proc = repo.start_dvc("repro", STAGE, log=tmp / "killed.log")
    wait_for(repo.root / RESUME_STATE, proc)
    kill_group(proc)  # epoch 1 is saved, epoch 2 has begun
    lock_file = repo.root / "dvc.lock"
    after_kill = {
        "stage_outputs": [p for p in stage_outputs(STAGE) if (repo.root / p).exists()],
        "locked": lock_file.is_file() and STAGE in yaml.safe_load(lock_file.read_text())["stages"],
        "lock_pids": dvc_lock_pids(repo),
        "pid": proc.pid,
    }
    return {"repo": repo, "after_kill": after_kill, "log": repo.dvc("repro", STAGE)}


def test_the_kill_leaves_no_output_that_looks_whole(killed_then_resumed):
    after = killed_then_resumed["after_kill"]
    assert after["stage_outputs"] == []  # no model.pt, run record or metrics of an unfinished stage
    assert not after["locked"]  # dvc.lock does not record the stage
    assert after["pid"] in after["lock_pids"]  # DVC's stage lock still names the killed run


def test_dvc_runs_again_and_the_stage_resumes(killed_then_resumed):
    log = killed_then_resumed["log"]  # repo.dvc checked the exit status: DVC got past its stale lock
    assert "resuming from epoch 1 of 3" in log, log
    assert not (killed_then_resumed["repo"].root / RESUME_STATE).exists()  # done: nothing left to resume


def test_resumed_training_ends_exactly_like_an_uninterrupted_one(killed_then_resumed, tracked_pipeline):
    resumed, straight = killed_then_resumed["repo"], tracked_pipeline
    metrics = f"reports/train/{MODEL}.json"
    assert resumed.json(metrics) == straight.json(metrics)
    a, b = (load_torch(r.root / f"models/{MODEL}/model.pt") for r in (resumed, straight))
    assert a["history"] == b["history"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_mlflow_continues_the_killed_run_with_every_epoch_once(killed_then_resumed, tracked_pipeline):
    resumed_repo = killed_then_resumed["repo"]
    (resumed,), (straight,) = runs_by_stage(resumed_repo)[STAGE], runs_by_stage(tracked_pipeline)[STAGE]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["hdkd.resumed"] == "true"
    assert resumed_repo.json(f"reports/train/{MODEL}.run.json")["run_id"] == resumed.info.run_id
    for key in ("val_accuracy", "train_loss"):
        assert (metric_history(resumed_repo, resumed.info.run_id, key)
                == metric_history(tracked_pipeline, straight.info.run_id, key)), key

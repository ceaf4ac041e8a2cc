"""Scratch copies of the project for end-to-end tests: `dvc repro` exactly as in a checkout, shrunk.

A scratch repo is a fresh git repository holding the working tree's code, dvc.yaml and .dvc/
(tracked and untracked files that git does not ignore, less the pipeline's outputs and dvc.lock),
with params.yaml shrunk to seconds per stage and an MLflow store of its own (``tracking.uri``'s
relative sqlite path resolves inside the repo). Commands run with this interpreter's virtualenv
first on PATH, as ``make run`` does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hdkd.infra.io import read_json, write_json
from hdkd.infra.provenance import git, stage_definition
from tests.helpers import ROOT
from tests.helpers.data import refused_url
from tests.helpers.params import merged


def expand_foreach(dvc_yaml: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``dvc.yaml`` with each ``foreach: ${<section>}`` stage replaced by its stages ``<stage>@<key>``,
    as DVC generates them from ``params``: one per key of the section, ``${key}`` substituted."""
    stages = {}
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        section = re.fullmatch(r"\$\{(\w+)\}", stage["foreach"])[1]
        stages |= {f"{name}@{key}": stage_definition(dvc_yaml["stages"], f"{name}@{key}") for key in params[section]}
    return {**dvc_yaml, "stages": stages}


# dvc.yaml as DVC runs it with the shipped params.yaml (foreach stages expanded).
DVC_YAML = expand_foreach(yaml.safe_load((ROOT / "dvc.yaml").read_text()),
                          yaml.safe_load((ROOT / "params.yaml").read_text()))

# The default pipeline at a size where each training epoch takes about a second on a CPU.
SHRUNK = {
    # Two seeds (paired statistics, one run resumed beside a finished one) on the whole training split:
    # the fractions' subsets are covered by tests/unit/training/test_stage.py, at a fraction of the time.
    "seeds": [0, 1],
    "fractions": [1.0],
    "data": {"image_size": 32, "synthetic": {"num_images": 200, "native_size": 40}},
    "teacher": {"epochs": 3},
    "student": {"epochs": 2},
    "distill": {"epochs": 2},
    "baselines": {  # shallow (the student's 2 epochs): the end-to-end tests cover their stages, not what they learn
        "vit": {"timm": "deit_tiny_patch16_224", "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1,
                                                           "num_heads": 2},
                "optim": {"warmup_epochs": 1}},  # its warmup fits the shrunk epochs
        "resnet": {"timm": "resnet10t", "kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}},
    },
    "evaluate": {"bootstrap": 20, "latency_batch_sizes": [1], "latency_iters": 1, "latency_warmup": 0},
}


def declared_paths(stage: str, *sections: str) -> list[str]:
    """The paths of a stage's ``dvc.yaml`` sections (an entry is a path or ``{path: options}``)."""
    entries = [e for section in sections for e in DVC_YAML["stages"][stage].get(section, [])]
    return [p for e in entries for p in ([e] if isinstance(e, str) else e)]


def stage_outputs(stage: str) -> list[str]:
    """The paths ``dvc.yaml`` declares as written by ``stage``."""
    return declared_paths(stage, "outs", "metrics", "plots")


PIPELINE_OUTPUTS = [Path(p) for stage in DVC_YAML["stages"] for p in stage_outputs(stage)]


def is_pipeline_output(relpath: Path) -> bool:
    return relpath == Path("dvc.lock") or any(relpath == o or o in relpath.parents for o in PIPELINE_OUTPUTS)


def source_files() -> list[Path]:
    """The working tree's files as git sees them (committed or not, ignored ones left out), less outputs."""
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", repo_root=ROOT).decode().splitlines()
    return [Path(p) for p in listed if (ROOT / p).is_file() and not is_pipeline_output(Path(p))]


def command_env() -> dict[str, str]:
    """The environment of commands in a scratch repo (DVC, hence the stages too)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # it would win over the scratch repo's own store
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # Python leaves __pycache__ beside the code, as for users
    return env


@dataclass(frozen=True)
class ScratchRepo:
    root: Path

    @property
    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def run(self, *command: str) -> str:
        """Run ``command`` to completion; its output (stdout and stderr), or a failure showing it."""
        proc = subprocess.run(command, cwd=self.root, env=command_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        assert proc.returncode == 0, f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}"
        return proc.stdout

    def dvc(self, *args: str) -> str:
        return self.run("dvc", *args)

    def start_dvc(self, *args: str, log: Path) -> subprocess.Popen:
        """Start ``dvc <args>`` in a process group of its own (so a kill reaches the stage too)."""
        with open(log, "w") as out:
            return subprocess.Popen(["dvc", *args], cwd=self.root, env=command_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def json(self, relpath: str) -> Any:
        return read_json(self.root / relpath)

    def head(self) -> str:
        return git("rev-parse", "HEAD", repo_root=self.root).decode().strip()


def mlflow_client(repo: ScratchRepo):
    from mlflow.tracking import MlflowClient  # imported here: collecting the fast tests need not load MLflow

    return MlflowClient(f"sqlite:///{repo.root / 'mlflow.db'}")


def runs_by_stage(repo: ScratchRepo, every_run: bool = False) -> dict[str, list]:
    """The MLflow runs of a scratch repo's experiment, by their ``hdkd.stage`` tag; of a training stage's
    (seed, fraction) runs only the primary one (the first seed, all the data) unless ``every_run``."""
    client = mlflow_client(repo)
    experiment = client.get_experiment_by_name(f"hdkd-{repo.params['data']['dataset']}")
    primary = (str(repo.params["seeds"][0]), "1")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        tags = run.data.tags
        if every_run or "hdkd.seed" not in tags or (tags["hdkd.seed"], tags["hdkd.fraction"]) == primary:
            runs.setdefault(tags["hdkd.stage"], []).append(run)
    return runs


def metric_history(repo: ScratchRepo, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every value a run logged for ``key``, by step."""
    return sorted((m.step, m.value) for m in mlflow_client(repo).get_metric_history(run_id, key))


def kill_group(proc: subprocess.Popen) -> None:
    """``kill -9`` a process started by :meth:`ScratchRepo.start_dvc` and everything it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def make_scratch_repo(directory: Path, params: dict | None = None) -> ScratchRepo:
    """A committed scratch copy of the project in ``directory``, params.yaml = shrunk defaults + ``params``."""
    directory.mkdir(parents=True)
    for rel in source_files():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, directory / rel)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    (directory / "params.yaml").write_text(yaml.safe_dump(merged(merged(base, SHRUNK), params or {})))
    git("init", "-q", repo_root=directory)
    git("add", "-A", repo_root=directory)
    git("-c", "user.name=hdkd tests", "-c", "user.email=tests@localhost", "commit", "-q", "-m", "scratch copy",
        repo_root=directory)
    return ScratchRepo(directory)


def reproduced(directory: Path, params: dict | None = None) -> ScratchRepo:
    """A scratch repo after a complete ``dvc repro``."""
    repo = make_scratch_repo(directory, params)
    repo.dvc("repro")
    return repo


def built_once(tmp_path_factory, name: str, build) -> Any:
    """``build(directory)``'s JSON result, built once per test session in ``<session tmp>/<name>``: under
    pytest-xdist by whichever worker asks first, while the others wait for it and then reuse it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    directory = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    record = directory / "built.json"
    with FileLock(f"{directory}.lock"):
        if not record.is_file():
            shutil.rmtree(directory, ignore_errors=True)  # what a worker that crashed mid-build left
            result = build(directory)
            write_json(record, result)
    return read_json(record)


# Whole shrunk pipelines, run once per test session and shared by the end-to-end test modules (and their workers).
@pytest.fixture(scope="session")
def tracked_pipeline(tmp_path_factory) -> ScratchRepo:
    """Default tracking: every stage logs to the repo's own sqlite store."""
    return ScratchRepo(Path(built_once(tmp_path_factory, "tracked", lambda d: str(reproduced(d / "repo").root))))


@pytest.fixture(scope="session")
def untracked_pipeline(tmp_path_factory) -> ScratchRepo:
    """``tracking.enabled: false``."""
    return ScratchRepo(Path(built_once(tmp_path_factory, "untracked", lambda d: str(
        reproduced(d / "repo", {"tracking": {"enabled": False}}).root))))


@pytest.fixture(scope="session")
def unreachable_tracking_pipeline(tmp_path_factory) -> tuple[ScratchRepo, str]:
    """``tracking.uri`` names a server that is down (nothing listens on its port); also the output
    of ``dvc repro``."""
    def build(directory: Path) -> dict[str, str]:
        repo = make_scratch_repo(directory / "repo", {"tracking": {"uri": refused_url()}})
        return {"root": str(repo.root), "output": repo.dvc("repro")}

    built = built_once(tmp_path_factory, "unreachable", build)
    return ScratchRepo(Path(built["root"])), built["output"]

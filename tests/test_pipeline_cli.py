"""Every stage validates params.yaml before any work: a bad value fails at once, naming the key,
and nothing is written (no outputs, no resume states, no MLflow store)."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hdkd.config import ConfigError
from tests.pipeline_fixtures import DVC_YAML, ROOT, merged

STAGES = list(DVC_YAML["stages"])
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())

# (the key the error must name, the change to params.yaml that makes it wrong)
BAD_PARAMS = {
    "unknown key": ("data.imagesize", {"data": {"imagesize": 64}}),
    "alpha above 1": ("distill.alpha", {"distill": {"alpha": 1.5}}),
    "alpha below 0": ("distill.alpha", {"distill": {"alpha": -0.1}}),
    "tau zero": ("distill.tau", {"distill": {"tau": 0.0}}),
    "unknown dataset": ("data.dataset", {"data": {"dataset": "cifar10"}}),
    "unknown model size": ("model.size", {"model": {"size": "huge"}}),
    "image size the models cannot take": ("data.image_size", {"data": {"image_size": 72}}),
}


def write_bad_params(directory: Path, change: dict) -> Path:
    """params.yaml with ``change``, tracking into ``directory`` (so a created store would show)."""
    path = directory / "bad.yaml"
    path.write_text(yaml.safe_dump(merged(PARAMS, change | {"tracking": {"uri": "sqlite:///mlflow.db"}})))
    return path


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


@pytest.mark.parametrize("case", BAD_PARAMS)
@pytest.mark.parametrize("stage", STAGES)
def test_bad_params_fail_before_any_work(stage, case, tmp_path, monkeypatch):
    key, change = BAD_PARAMS[case]
    bad = write_bad_params(tmp_path, change)
    monkeypatch.chdir(tmp_path)  # every default path (outputs, checkpoints, mlflow.db) resolves here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", [f"pipeline/{stage}.py", "--params", str(bad)])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        runpy.run_module(f"pipeline.{stage}", run_name="__main__")
    assert files_under(tmp_path) == ["bad.yaml"]


def test_the_command_line_names_the_key_and_exits_nonzero(tmp_path):
    bad = write_bad_params(tmp_path, BAD_PARAMS["alpha above 1"][1])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.train_hdkd", "--params", str(bad)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "distill.alpha: Input should be less than or equal to 1" in proc.stderr
    assert files_under(tmp_path) == ["bad.yaml"]

"""Every stage validates params.yaml before any work: a bad value fails at once, naming the key,
and nothing is written (no outputs, no resume states, no MLflow store)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hdkd.config import ConfigError
from tests.helpers.params import PARAMS, PARAMS_YAML, merged, params_without
from tests.helpers.pipeline import DVC_YAML, ROOT

STAGES = list(DVC_YAML["stages"])

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
    module, *foreach_key = stage.split("@")  # a foreach stage (train_baseline@<key>) passes its key first
    monkeypatch.setattr(sys, "argv", [f"pipeline/{module}.py", *foreach_key, "--params", str(bad)])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        runpy.run_module(f"pipeline.{module}", run_name="__main__")
    assert files_under(tmp_path) == ["bad.yaml"]


def duplicated_epochs() -> str:
    """params.yaml with distill.epochs set twice: YAML alone would keep the last, 200, silently."""
    text = PARAMS_YAML.read_text()
    twice, n = re.subn(r"(distill:\n  epochs: \d+\n)", r"\1  epochs: 200\n", text)
    assert n == 1
    return twice


# (what the error must say after the file name, the params file's text). Each of these ran, before,
# with the code's defaults (the paper's 200 epochs) or the last duplicate.
INCOMPLETE_PARAMS = {
    "empty file": (" is empty", lambda: "\n"),
    "deleted section": (r":\n  teacher: missing", lambda: yaml.safe_dump(params_without("teacher"))),
    "deleted key": (r":\n  distill\.epochs: missing", lambda: yaml.safe_dump(params_without("distill.epochs"))),
    "duplicated key": (r":\d+: duplicate key distill\.epochs", duplicated_epochs),
}


@pytest.mark.parametrize("case", INCOMPLETE_PARAMS)
@pytest.mark.parametrize("stage", [*STAGES, "params"])
def test_incomplete_params_fail_naming_the_file_and_key(stage, case, tmp_path, monkeypatch):
    message, text = INCOMPLETE_PARAMS[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overlay = ["--apply", str(ROOT / "params" / "paper-ham10000.yaml")] if stage == "params" else []
    argv = ["--params", str(bad), *overlay]
    module, *foreach_key = stage.split("@")  # a foreach stage (train_baseline@<key>) passes its key first
    monkeypatch.setattr(sys, "argv", [f"pipeline/{module}.py", *foreach_key, *argv])
    with pytest.raises(ConfigError, match=rf"(in )?{bad}{message}"):
        runpy.run_module(f"pipeline.{module}", run_name="__main__")
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

"""Shared fixtures (their helpers: tests/helpers): the official reference outputs, a hand-made results bundle,
a throwaway git repo, the scratch pipelines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hdkd.infra import numerics

# In-process stage runs (train.reproducible is on by default) need the mode's environment before
# torch loads, as `python -m pipeline.<stage>` has it.
numerics.apply_env()

import torch

# Under pytest-xdist the workers share the cores: torch's default (every core in each worker) oversubscribes
# the machine, and OpenMP's spinning threads then slow every worker (the fast suite varied by 15 % run to run).
torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

from tests.helpers import ROOT, unavailable
from tests.helpers.bundles import bundle_with
from tests.helpers.git import run_git

# Whole scratch pipelines, run once per session for the end-to-end modules that share them.
from tests.helpers.pipeline import tracked_pipeline, unreachable_tracking_pipeline, untracked_pipeline  # noqa: F401

REFERENCE = ROOT.parent / "shared" / "reference" / "official-small"


@pytest.fixture(scope="session")
def reference():
    """The official implementation's weights, inputs/outputs and loss values (../shared/reference)."""
    if not (REFERENCE / "meta.json").is_file():
        unavailable(f"official reference outputs not found at {REFERENCE} (expected ../shared/reference beside the repo)")
    return {
        "meta": json.loads((REFERENCE / "meta.json").read_text()),
        "weights": torch.load(REFERENCE / "weights.pt", weights_only=True),
        "io": torch.load(REFERENCE / "io.pt", weights_only=True),
        "dir": REFERENCE,
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def bundle() -> dict:
    return bundle_with()


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "main")
    return repo

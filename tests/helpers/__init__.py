"""Helpers shared by the tests: data, params, fits, scratch pipelines, Ray faults, a torchrun step."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository


def unavailable(reason: str) -> None:
    """What a test does when something it needs is missing: skip with ``reason`` on a developer's machine, fail
    in CI (``CI`` set), where everything a test needs is installed, so that no test skips there unseen."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)

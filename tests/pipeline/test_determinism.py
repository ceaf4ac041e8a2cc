"""Two (shrunk) `dvc repro` runs from scratch give the same numbers, byte for byte in the tables.

The runs compared differ in tracking only (logging to MLflow, tracking switched off, the tracking
server down): tracking must not change a result either. Only timing may differ — measured
latencies in metrics.json and in the tables' timing columns (the columns the report check
ignores too) — and the model files' bytes (torch names the zip archive inside after the temporary
file it writes and adds a random serialization id), so weights are compared as tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdkd.infra.torch_io import load_torch
from hdkd.report.check import Line, Tolerance, parse_lines
from hdkd.roster import MODEL_NAMES
from tests.helpers.pipeline import ScratchRepo

pytestmark = pytest.mark.slow

UNCOMPARED = Tolerance()  # what the report check skips: timing, and provenance (each scratch repo has its commit)
MASK = "<not compared>"


def without_timing(metrics: dict) -> dict:
    return {model: {k: v for k, v in values.items() if k != "timing"} for model, values in metrics.items()}


def masked(line: Line, file: str) -> tuple[str, ...]:
    if line.kind != "row":
        return line.cells
    return tuple(MASK if UNCOMPARED.ignores(f"{file}:{header}") else cell
                 for cell, header in zip(line.cells, line.headers))


def comparable(table: Path) -> bytes | list[tuple[str, ...]]:
    """A table file's bytes or, if it has timing (or provenance) columns, its cells with those masked."""
    cells = [masked(line, table.name) for line in parse_lines(table.name, table.read_text())]
    return cells if any(MASK in line for line in cells) else table.read_bytes()


def table_files(repo: ScratchRepo) -> list[str]:
    return sorted(p.name for p in (repo.root / "reports/tables").iterdir())


@pytest.fixture(scope="module")
def runs(tracked_pipeline, untracked_pipeline, unreachable_tracking_pipeline) -> list[ScratchRepo]:
    return [tracked_pipeline, untracked_pipeline, unreachable_tracking_pipeline[0]]


def test_metrics_are_identical_except_timing(runs):
    first, *others = [without_timing(r.json("reports/metrics.json")) for r in runs]
    assert all(m == first for m in others)


def test_tables_are_identical_bytes_except_timing_columns(runs):
    reference, *others = runs
    names = table_files(reference)
    assert names and all(table_files(r) == names for r in others)
    for name in names:
        expected = comparable(reference.root / "reports/tables" / name)
        assert all(comparable(r.root / "reports/tables" / name) == expected for r in others), name


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_trained_weights_and_histories_are_identical(model, runs):
    first, *others = [load_torch(r.root / f"models/{model}/model.pt") for r in runs]
    for other in others:
        assert other["history"] == first["history"]
        assert all(torch.equal(other["state_dict"][k], v) for k, v in first["state_dict"].items())

"""The read side of MLflow: runs found by tags, and their artifacts, for :mod:`hdkd.report.revisions` and
:mod:`hdkd.report.ablations` (which find results bundles of earlier runs). Torch-free: it never loads the write
side's provenance.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdkd.infra.io import parse_json
from hdkd.infra.mlflow_store import check_server_reachable, open_client, tracking_store_exists


@dataclass(frozen=True)
class TrackedRun:
    """What readers need of an MLflow run, without MLflow types."""

    run_id: str
    tags: dict[str, str]


def find_runs(uri: str, filter_string: str = "", experiment_names: list[str] | None = None,
              max_results: int = 5000) -> list[TrackedRun]:
    """Runs matching an MLflow ``filter_string``, newest first, in the named experiments (default:
    all); no store (or none of the experiments) yields no runs and creates nothing. A tracking server
    that is down or does not answer raises ``ConnectionError`` at once, naming it."""
    if not tracking_store_exists(uri):
        return []
    check_server_reachable(uri, advice="start it, or point tracking.uri (or MLFLOW_TRACKING_URI) at a running one")
    client = open_client(uri)
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if experiment_names is None or e.name in experiment_names]
    if not ids:
        return []
    runs = client.search_runs(ids, filter_string, order_by=["attributes.start_time DESC"], max_results=max_results)
    return [TrackedRun(r.info.run_id, dict(r.data.tags)) for r in runs]


def find_artifact(uri: str, run_id: str, name: str) -> str | None:
    """Path of the first artifact called ``name`` in a run (searched at any depth), or ``None``."""
    client = open_client(uri)

    def search(path: str | None) -> str | None:
        for item in client.list_artifacts(run_id, path):
            if item.is_dir:
                found = search(item.path)
                if found:
                    return found
            elif Path(item.path).name == name:
                return item.path
        return None

    return search(None)


def read_json_artifact(uri: str, run_id: str, path: str) -> Any:
    """A run's JSON artifact, parsed (downloaded to a temporary directory that is then removed)."""
    with tempfile.TemporaryDirectory() as tmp, _without_progress_bars():
        local = open_client(uri).download_artifacts(run_id, path, tmp)
        return parse_json(Path(local).read_bytes(), f"artifact {path} of MLflow run {run_id}")


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per download on stderr: noise when reading dozens of small bundles."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key)
        else:
            os.environ[key] = previous

"""MLflow tracking — the only module that talks to MLflow.

One experiment per dataset (``hdkd-<dataset>``), one run per stage, nested under a parent run per
pipeline execution (same git commit, params and DVC experiment). Runs carry tags that lead back
to the code and data: ``hdkd.git_commit`` (exactly ``git rev-parse HEAD``), ``hdkd.git_dirty``,
``hdkd.params_hash``, ``hdkd.dep.<path>`` (the DVC hash of each of the stage's dependencies),
``hdkd.dvc_exp_name``, device and library versions.

The SQLite store (``sqlite:///mlflow.db``) and the artifacts (``mlartifacts/``) live at the repo
root — also for queued DVC experiments, which run in temporary copies under ``.dvc/tmp/exps``.
Tracking never costs a result: any MLflow failure is reported once and tracking switches off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from hdkd.config import Params, TrackingConfig
from hdkd.io import dvc_md5
from hdkd.provenance import dvc_exp_name, git_state

log = logging.getLogger(__name__)

TAG = "hdkd."


# ----------------------------------------------------------------------------- provenance
def repo_root(start: str | Path | None = None) -> Path:
    """The project root; from a DVC temporary experiment copy, the real repository it came from."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / ".git").exists():
            return candidate
    return path


def stage_dep_hashes(stage: str, root: Path) -> dict[str, str]:
    """The hashes ``dvc.lock`` records for the dependencies ``dvc.yaml`` declares for ``stage``
    (missing ones are skipped): a directory's hash leaves out what ``.dvcignore`` ignores."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return {}
    from dvc.fs import localfs
    from dvc.ignore import DvcIgnoreFilter

    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    deps = stages.get(stage, {}).get("deps", [])
    ignore = DvcIgnoreFilter(localfs, str(root))  # DVC's own reading of every .dvcignore

    def hashed_files(path: Path) -> list[Path]:
        return [f for f in path.rglob("*") if f.is_file() and not ignore.is_ignored_file(str(f))]

    return {dep: dvc_md5(root / dep, hashed_files(root / dep)) for dep in deps if (root / dep).exists()}


def environment_tags() -> dict[str, str]:
    import torch
    import torchvision

    tags = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "host": platform.node(), "cuda": str(torch.cuda.is_available())}
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("mlflow", "dvc"):
        try:
            from importlib.metadata import version

            tags[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing version string is not worth failing over
            pass
    return {f"{TAG}env.{k}": v for k, v in tags.items()}


def check_server_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ``ConnectionError`` at once when an HTTP(S) tracking server accepts no connection.

    MLflow's client retries a refused request with backoff for about four minutes before it
    gives up: without this check, a tracking server that is down stalls every stage that long.
    """
    url = urlsplit(uri)
    if url.scheme not in ("http", "https"):
        return
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    try:
        socket.create_connection(address, timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"MLflow tracking server {url.netloc} is unreachable ({e})") from None


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` wins; a relative ``sqlite:///x.db`` is anchored at the repo root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_absolute():
        uri = prefix + str(root / uri[len(prefix):])
    return uri


# ------------------------------------------------------------------------------------ runs
class Tracker:
    """A stage's MLflow run. Use as a context manager; every method is a no-op when disabled.

    >>> with Tracker(params.tracking, params, "train_teacher") as tracker:
    ...     tracker.log_metrics({"val_accuracy": 0.9}, step=1)
    """

    def __init__(self, cfg: TrackingConfig, params: Params, stage: str, root: Path | None = None,
                 extra_tags: dict[str, str] | None = None, resume_run_id: str | None = None):
        self.cfg, self.params, self.stage = cfg, params, stage
        self.resume_run_id = resume_run_id  # an interrupted run of this stage to continue
        self.root = root or repo_root()
        self.enabled = cfg.enabled
        self.extra_tags = extra_tags or {}
        self.client = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.ended = False
        self.uri = resolve_tracking_uri(cfg.uri, self.root)

    # -- lifecycle
    def __enter__(self) -> "Tracker":
        self._guard(self._start)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        check_server_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = self.cfg.experiment or f"hdkd-{self.params.data.dataset}"
        self.experiment_id = self._experiment(name)
        state = git_state(Path.cwd())
        commit, dirty = state["git_commit"] or "unknown", bool(state["git_dirty"])
        exp_name = dvc_exp_name() or ""
        tags = {
            f"{TAG}git_commit": commit, "mlflow.source.git.commit": commit, f"{TAG}git_dirty": str(dirty).lower(),
            f"{TAG}params_hash": self.params.digest(), f"{TAG}dataset": self.params.data.dataset,
            **({f"{TAG}dvc_exp_name": exp_name} if exp_name else {}),
        }
        self.parent_run_id = self._parent(tags, commit, dirty, exp_name)
        if self.resume_run_id and self._reopen(self.resume_run_id):
            return
        run_tags = {**tags, **environment_tags(), **self.extra_tags, f"{TAG}stage": self.stage,
                    "mlflow.parentRunId": self.parent_run_id,
                    **{f"{TAG}dep.{p}": h for p, h in stage_dep_hashes(self.stage, Path.cwd()).items()}}
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=self.stage)
        self.run_id = run.info.run_id
        self._log_params(self.run_id)
        self.log_dict(self.params.to_dict(), "params.json")
        log.info("MLflow run %s (%s) in experiment %s", self.run_id, self.stage, name)

    def _reopen(self, run_id: str) -> bool:
        """Continue an interrupted run (same stage, same inputs) instead of starting a second one."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.experiment_id != self.experiment_id:
            return False
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, f"{TAG}resumed", "true")
        self.run_id = run_id
        log.info("MLflow run %s (%s) continues", run_id, self.stage)
        return True

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (self.root / "mlartifacts" / name).as_uri()  # absolute: survives DVC temp dirs
        return self.client.create_experiment(name, artifact_location=location)

    def _parent(self, tags: dict[str, str], commit: str, dirty: bool, exp_name: str) -> str:
        key = hashlib.sha256(f"{commit}|{dirty}|{self.params.digest()}|{exp_name}".encode()).hexdigest()[:16]
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{TAG}pipeline_key` = '{key}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id
        name = exp_name or f"pipeline-{commit[:8]}{'-dirty' if dirty else ''}"
        run = self.client.create_run(self.experiment_id, tags={**tags, f"{TAG}pipeline_key": key,
                                                               f"{TAG}stage": "pipeline"}, run_name=name)
        self._log_params(run.info.run_id)
        return run.info.run_id

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (and mark its parent); later logging calls are ignored."""
        if self._active():
            self._guard(self.client.set_terminated, self.run_id, status)
            self._guard(self.client.set_terminated, self.parent_run_id, status)
        self.ended = True

    # -- logging
    def _log_params(self, run_id: str) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                 for k, v in sorted(self.params.flat().items())]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._active():
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self._guard(self.client.log_batch, self.run_id, metrics=batch)

    def log_missing_steps(self, rows: list[dict[str, float]], step_key: str = "epoch") -> None:
        """Log each row (``{metric: value}`` at step ``row[step_key]``) whose step the run lacks.

        Each row goes out as one batch, so a step is either all there or absent; looking up the
        steps of ``step_key`` (logged with every row) tells which rows to send.
        """
        if not self._active():
            return
        logged = self._guard(self.client.get_metric_history, self.run_id, step_key) or []
        steps = {m.step for m in logged}
        for row in rows:
            if int(row[step_key]) not in steps:
                self.log_metrics(row, step=int(row[step_key]))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._active():
            for k, v in tags.items():
                self._guard(self.client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._active():
            self._guard(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        if self._active():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
                self.log_artifact(path)

    def info(self) -> dict[str, Any]:
        """What leads from a DVC output back to this run (written next to checkpoints)."""
        return {"run_id": self.run_id, "parent_run_id": self.parent_run_id, "experiment_id": self.experiment_id,
                "tracking_uri": self.uri if self.enabled else None, "stage": self.stage}

    # -- failure isolation
    def _active(self) -> bool:
        return self.enabled and self.run_id is not None and not self.ended

    def _guard(self, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never cost a result
            log.warning("MLflow tracking failed (%s: %s); continuing without tracking. "
                        "Checkpoints and metrics on disk are complete.", type(e).__name__, e)
            self.enabled = False
            return None

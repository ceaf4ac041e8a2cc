"""MLflow tracking, the write side: a stage's runs, their params, metrics, tags and models.

One experiment per dataset (``hdkd-<dataset>``), one run per stage, nested under a parent run per
pipeline execution (same git commit, params and DVC experiment). Runs carry tags that lead back
to the code and data: ``hdkd.git_commit`` (exactly ``git rev-parse HEAD``), ``hdkd.git_dirty``,
``hdkd.params_hash``, ``hdkd.dep.<path>`` (the DVC hash of each of the stage's dependencies),
``hdkd.dvc_exp_name``, device and library versions (gathered by :mod:`hdkd.infra.provenance`).

The SQLite store (``sqlite:///mlflow.db``) and the artifacts (``mlartifacts/``) live at the repo
root — also for queued DVC experiments, which run in temporary copies under ``.dvc/tmp/exps``.
Experiments running at once (``dvc queue start -j 2``) share that store: a new store is created
under a file lock, and calls that find the database locked are retried.
Tracking never costs a result: any other MLflow failure is reported once and tracking switches off.

"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from hdkd.config import Params, TrackingConfig
from hdkd.infra import numerics
from hdkd.infra.mlflow_store import (
    EXPERIMENT_KIND,
    MODEL_TRAINING,
    TAG,
    _fluent_store,
    check_server_reachable,
    experiment_name,
    open_client,
    resolve_tracking_uri,
    sqlite_path,
)
from hdkd.infra.provenance import dvc_exp_name, git_state, repo_root, stage_command, stage_dep_hashes

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

def model_requirements() -> list[str]:
    """The pip pins of a logged model: torch and mlflow as installed (their distributions' versions).

    Not ``torch.__version__``: a CUDA wheel reports ``2.14.1+cu130`` there while its distribution (what
    pip installs and MLflow checks) says ``2.14.1``, and MLflow warned of a mismatch at every logging."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "mlflow")]


def environment() -> dict[str, str]:
    """Versions of Python and the libraries that shape a result (torch, numpy, MKL, oneDNN), whether the
    reproducible numerics mode is on, the host, its CPU's kernel level and its GPU."""
    import torch
    import torchvision

    tags = {"python": platform.python_version(), **numerics.numerics_versions(), "torchvision": torchvision.__version__,
            "reproducible_numerics": str(numerics.is_reproducible()).lower(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "host": platform.node(), "cuda": str(torch.cuda.is_available())}
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("mlflow", "dvc"):
        try:
            from importlib.metadata import version

            tags[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing version string is not worth failing over
            pass
    return tags


class Tracker:
    """A stage's MLflow run. Use as a context manager; every method is a no-op when disabled.

    >>> with Tracker(params.tracking, params, "train_teacher") as tracker:
    ...     tracker.log_metrics({"val_accuracy": 0.9}, step=1)
    """

    def __init__(self, cfg: TrackingConfig, params: Params, stage: str, extra_tags: dict[str, str] | None = None,
                 resume_run_id: str | None = None, datasets: dict[str, str] | None = None,
                 run_name: str | None = None):
        self.cfg, self.params, self.stage = cfg, params, stage
        self.run_name = run_name or stage
        self.resume_run_id = resume_run_id  # an interrupted run of this stage to continue
        self.datasets = datasets or {}  # a data dependency's path -> its role ("training", "validation", "test")
        self.root = repo_root()
        self.enabled = cfg.enabled
        self.extra_tags = extra_tags or {}
        self.client = None
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.ended = False
        self.uri = resolve_tracking_uri(cfg.uri, self.root)

    # -- lifecycle
    def __enter__(self) -> Tracker:
        self._guard(self._start)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FAILED" if exc_type else "FINISHED")

    def open_parent(self) -> None:
        """Find or create the experiment and the pipeline's parent run, and start no run: called once
        before runs that start side by side, so that they do not race to create them."""
        if self.enabled:
            self._guard(self._open_parent)

    def _open_parent(self) -> tuple[dict[str, str], str]:
        check_server_reachable(self.uri)
        self.client = open_client(self.uri)
        name = experiment_name(self.cfg, self.params.data.dataset)
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
        return tags, name

    def _start(self) -> None:
        tags, name = self._open_parent()
        if self.resume_run_id and self._reopen(self.resume_run_id):
            return
        env = {f"{TAG}env.{k}": v for k, v in environment().items()}
        deps = stage_dep_hashes(self.stage, Path.cwd())
        command = stage_command(self.stage, Path.cwd())
        source = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"} if command else {}
        run_tags = {**tags, **env, **self.extra_tags, **source, f"{TAG}stage": self.stage,
                    "mlflow.parentRunId": self.parent_run_id, **{f"{TAG}dep.{p}": h for p, h in deps.items()}}
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=self.run_name)
        self.run_id = run.info.run_id
        self._log_params(self.run_id)
        self._log_datasets(deps)
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
        experiment_id = self._find_or_create_experiment(name)
        # MLflow 3's UI opens an experiment without this tag on the GenAI traces overview.
        self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment_id

    def _find_or_create_experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        from mlflow.exceptions import MlflowException

        location = None
        if sqlite_path(self.uri) is not None:
            location = (self.root / "mlartifacts" / name).as_uri()  # absolute: survives DVC temp dirs
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id  # a parallel experiment created it

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

    def end_parent(self, status: str = "FAILED") -> None:
        """Close the pipeline's parent run found by :meth:`open_parent` (a stage that failed before any of
        its runs, whose trackers end it otherwise, started); nothing when tracking is off or it was not found."""
        if self.enabled and self.parent_run_id is not None:
            self._guard(self.client.set_terminated, self.parent_run_id, status)

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

    def _log_datasets(self, hashes: dict[str, str]) -> None:
        """The data this stage read, as MLflow datasets whose digests are their DVC hashes (the runs
        table's Dataset column); a path that is not one of the stage's DVC dependencies has no hash."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [DatasetInput(Dataset(name=f"{self.params.data.dataset}-{Path(path).name}",
                                       digest=hashes[path].removesuffix(".dir"), source_type="local",
                                       source=json.dumps({"uri": (self.root / path).as_uri()})),
                               tags=[InputTag("mlflow.data.context", role)])
                  for path, role in self.datasets.items() if path in hashes]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_model(self, model: Any, meta: dict[str, Any], registered_name: str) -> None:
        """Log ``model`` (put in eval mode) as this run's MLflow model and register it as a new version of
        ``registered_name``, tagged with the commit and params hash.

        Saved with ``torch.export`` ("pt2": a graph and weights, no pickled code) for a dynamic batch of
        float32 N x 3 x S x S normalised images -> N x C logits. ``meta`` (the model's metadata) must hold
        its ``classes`` and ``image_size``; with the network's name (:data:`hdkd.models.checkpoint.CHECKPOINT_KEYS`),
        ``hdkd predict --model models:/<name>/latest`` and ``mlflow models serve`` need nothing else.
        """
        if self._active():
            self._guard(self._log_model, model, meta, registered_name)

    def _log_model(self, model: Any, meta: dict[str, Any], registered_name: str) -> None:
        import mlflow
        import mlflow.pytorch
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        size, n_classes = meta["image_size"], len(meta["classes"])
        # Unnamed tensors: the scoring server would pass a named one to the PyTorch flavour as a dict.
        signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
                                   Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes))]))
        model.eval()  # exported as evaluated: BatchNorm statistics, and the student's one averaged output
        example = np.zeros((2, 3, size, size), np.float32)  # batch 2: torch.export fixes a batch of 1
        with _fluent_store(self.uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model, name="model", serialization_format="pt2", signature=signature, input_example=example,
                metadata=dict(meta),
                pip_requirements=model_requirements(),
                registered_model_name=registered_name)
        run = self.client.get_run(self.run_id)
        for key in ("git_commit", "params_hash"):
            self.client.set_model_version_tag(registered_name, info.registered_model_version, f"{TAG}{key}",
                                              run.data.tags[f"{TAG}{key}"])
        log.info("MLflow model %s version %s (%s)", registered_name, info.registered_model_version, info.model_uri)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._active():
            self._guard(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_bytes(self, data: bytes, name: str) -> None:
        """Log in-memory content (a figure, a JSON document) as the artifact ``name``."""
        if self._active():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(data)
                self.log_artifact(path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.log_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), name)

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

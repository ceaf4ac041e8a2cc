"""MLflow tracking — the only module that talks to MLflow.

One experiment per dataset (``hdkd-<dataset>``), one run per stage, nested under a parent run per
pipeline execution (same git commit, params and DVC experiment). Runs carry tags that lead back
to the code and data: ``hdkd.git_commit`` (exactly ``git rev-parse HEAD``), ``hdkd.git_dirty``,
``hdkd.params_hash``, ``hdkd.dep.<path>`` (the DVC hash of each of the stage's dependencies),
``hdkd.dvc_exp_name``, device and library versions (gathered by :mod:`hdkd.provenance`).

The SQLite store (``sqlite:///mlflow.db``) and the artifacts (``mlartifacts/``) live at the repo
root — also for queued DVC experiments, which run in temporary copies under ``.dvc/tmp/exps``.
Experiments running at once (``dvc queue start -j 2``) share that store: a new store is created
under a file lock, and calls that find the database locked are retried.
Tracking never costs a result: any other MLflow failure is reported once and tracking switches off.

The read side (:func:`find_runs`, :func:`find_artifact`, :func:`read_json_artifact`) serves
:mod:`hdkd.report.revisions` and :mod:`hdkd.report.ablations`, which find results bundles of earlier runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hdkd.config import Params, TrackingConfig
from hdkd.io import parse_json
from hdkd.provenance import dvc_exp_name, environment, git_state, repo_root, stage_command, stage_dep_hashes

log = logging.getLogger(__name__)

TAG = "hdkd."
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def registered_model_name(dataset: str, model: str) -> str:
    """The Model Registry name of a pipeline model: ``hdkd-<dataset>-<model>``."""
    return f"hdkd-{dataset}-{model}"


def experiment_name(cfg: TrackingConfig, dataset: str) -> str:
    """The MLflow experiment of a dataset's runs: ``tracking.experiment``, else ``hdkd-<dataset>``."""
    return cfg.experiment or f"hdkd-{dataset}"


# ------------------------------------------------------------------------------- store access
SQLITE = "sqlite:///"
RETRY_ATTEMPTS = 8  # delays doubling from RETRY_DELAY_S: ~25 s in all, after MLflow's own 20 s busy timeout
RETRY_DELAY_S = 0.2


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute), else ``None``."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


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
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        uri = SQLITE + str(root / path)
    return uri


def tracking_store_exists(uri: str) -> bool:
    """False for a ``sqlite:///`` file that does not exist (opening it would create an empty store)."""
    path = sqlite_path(uri)
    return path is None or path.is_file()


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Serialise the opening of a SQLite store across processes on this machine.

    MLflow creates the tables of a new SQLite store on first open, and two processes doing it at
    once (two queued experiments) leave a half-migrated database that no client can open again.
    """
    path = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows has no flock: queue experiments with -j 1 there
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"hdkd-mlflow-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_transient(error: Exception) -> bool:
    """A store error worth retrying: SQLite busy or locked while another process writes.

    Told by the message, not MLflow's error code: MLflow wraps *every* SQLAlchemy OperationalError
    as TEMPORARILY_UNAVAILABLE, also a read-only, full or corrupt database, which no wait mends.
    """
    text = str(error).lower()
    return any(s in text for s in ("database is locked", "database table is locked", "database is busy"))


def retry_transient(fn: Callable, *args, attempts: int = RETRY_ATTEMPTS, delay: float = RETRY_DELAY_S, **kwargs):
    """Call ``fn``; on a transient store error wait (doubling, jittered) and call again."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - filtered by is_transient
            if attempt == attempts - 1 or not is_transient(e):
                raise
            log.debug("MLflow store busy (%s); retry %d/%d", e, attempt + 1, attempts - 1)
            time.sleep(delay * 2**attempt * random.uniform(0.5, 1.5))  # jitter: two writers must not retry in step


class RetryingClient:
    """An ``MlflowClient`` whose every call goes through :func:`retry_transient`.

    A failed SQLite write is rolled back, so calling again never duplicates a run or a metric.
    """

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: retry_transient(attr, *args, **kwargs)


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.pytorch.log_model``) at ``uri``; afterwards the process's own
    settings again. ``mlflow.set_tracking_uri``/``set_registry_uri`` set module globals and environment
    variables that would otherwise outlive the call (and override a later ``MLFLOW_TRACKING_URI``)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry  # no public way to unset these
    from mlflow.tracking._tracking_service import utils as tracking

    variables = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking._tracking_uri, registry._registry_uri, {k: os.environ.get(k) for k in variables}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking._tracking_uri, registry._registry_uri = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def open_client(uri: str) -> RetryingClient:
    """An MLflow client of ``uri`` (which it creates, for a new SQLite store), safe under concurrency."""
    from mlflow.tracking import MlflowClient

    with _store_creation_lock(uri):
        # The registry explicitly too: by default it follows the process's tracking URI, not this one.
        client = retry_transient(MlflowClient, tracking_uri=uri, registry_uri=uri)  # opens (creates) the store
    return RetryingClient(client)


# ------------------------------------------------------------------------------------ reads
@dataclass(frozen=True)
class TrackedRun:
    """What readers need of an MLflow run, without MLflow types."""

    run_id: str
    tags: dict[str, str]


def find_runs(uri: str, filter_string: str = "", experiment_names: list[str] | None = None,
              max_results: int = 5000) -> list[TrackedRun]:
    """Runs matching an MLflow ``filter_string``, newest first, in the named experiments (default:
    all); no store (or none of the experiments) yields no runs and creates nothing."""
    if not tracking_store_exists(uri):
        return []
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


# ------------------------------------------------------------------------------------ runs

def model_requirements() -> list[str]:
    """The pip pins of a logged model: torch and mlflow as installed (their distributions' versions).

    Not ``torch.__version__``: a CUDA wheel reports ``2.14.1+cu130`` there while its distribution (what
    pip installs and MLflow checks) says ``2.14.1``, and MLflow warned of a mismatch at every logging."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "mlflow")]


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
        its ``classes`` and ``image_size``; with the network's name (:data:`hdkd.checkpoint.CHECKPOINT_KEYS`),
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

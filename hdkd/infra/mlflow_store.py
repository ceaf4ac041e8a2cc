"""The MLflow store: where it is (``tracking.uri``, ``MLFLOW_TRACKING_URI``), whether it answers, and a client
safe under concurrency (a new SQLite store created under a file lock, calls that find the database locked retried).

The SQLite store (``sqlite:///mlflow.db``) and the artifacts (``mlartifacts/``) live at the repo root, also for
queued DVC experiments, which run in temporary copies under ``.dvc/tmp/exps``. Experiments running at once
(``dvc queue start -j 2``) share that store. The write side is :mod:`hdkd.infra.tracking`, the read side
:mod:`hdkd.infra.mlflow_runs`; only these three modules talk to MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from hdkd.config import TrackingConfig

log = logging.getLogger(__name__)

TAG = "hdkd."
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def registered_model_name(dataset: str, model: str) -> str:
    """The Model Registry name of a pipeline model: ``hdkd-<dataset>-<model>``."""
    return f"hdkd-{dataset}-{model}"


def experiment_name(cfg: TrackingConfig, dataset: str) -> str:
    """The MLflow experiment of a dataset's runs: ``tracking.experiment``, else ``hdkd-<dataset>``."""
    return cfg.experiment or f"hdkd-{dataset}"


SQLITE = "sqlite:///"
RETRY_ATTEMPTS = 8  # delays doubling from RETRY_DELAY_S: ~25 s in all, after MLflow's own 20 s busy timeout
RETRY_DELAY_S = 0.2


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative or absolute), else ``None``."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


TRACKING_ADVICE = ("start it, point tracking.uri (or MLFLOW_TRACKING_URI) at a running one, "
                   "or set tracking.enabled: false")


def check_server_reachable(uri: str, timeout_s: float = 5.0, advice: str = TRACKING_ADVICE) -> None:
    """Raise ``ConnectionError`` naming ``uri`` at once when an HTTP(S) tracking server is down or does not
    answer an HTTP request within ``timeout_s`` (one try, no retries).

    MLflow's client retries a refused request with backoff for about four minutes, and waits 120 s for
    each answer of a server that accepts connections but never replies (stuck, overloaded, a port held by
    something else): without this check, such a server stalls every stage for minutes. Any HTTP answer
    (also an error status: a server behind authentication or a path prefix) counts as answering, and so
    does a TLS handshake that this check cannot verify (MLflow's own settings decide on certificates).
    ``advice``: what to do, ending the message.
    """
    import ssl
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    url = urlsplit(uri)
    if url.scheme not in ("http", "https"):
        return
    host = url.netloc.rpartition("@")[2]  # credentials in the URI are MLflow's to send, and not shown
    probe = urlunsplit((url.scheme, host, url.path.rstrip("/") + "/health", "", ""))
    uri = urlunsplit((url.scheme, host, url.path, url.query, ""))
    try:
        with urllib.request.urlopen(probe, timeout=timeout_s) as response:
            response.read(64)
    except urllib.error.HTTPError:
        return  # an answer
    except (OSError, HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, ssl.SSLError):
            return  # it answered the handshake
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise ConnectionError(f"MLflow tracking server {uri} does not answer (no reply within {timeout_s:g} s); "
                                  f"{advice}") from None
        if isinstance(reason, (ConnectionResetError, HTTPException)):
            raise ConnectionError(f"MLflow tracking server {uri} does not answer ({_reason(reason)}); "
                                  f"{advice}") from None
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({_reason(reason)}); {advice}") from None


def _reason(error: object) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


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



"""``train.executor: ray``: a training stage's (seed, fraction) runs as tasks on a Ray cluster.

The stage's process is Ray's driver: it submits one task per unfinished run, asking for a GPU where
CUDA is wanted (``train.device: cuda``, or ``auto`` on a cluster that has GPUs) and one CPU
otherwise. A task trains its run exactly as the local executor does (:func:`hdkd.training.run.train_run`),
in the node's copy of the workspace: every node needs the repository, with the stage's inputs, at
the driver's path (a shared file system, or a clone + ``dvc pull``); a task that sees other inputs
there stops before training. Its files (``model.pt``, the metrics and run record) come back to
the driver as bytes, which writes them atomically into the stage's staging directory and marks the
run done, so no output depends on a shared file system and a killed driver resumes where it stopped.
A task whose worker or node dies is retried ``train.ray_retries`` times; a Python error is not (it
would fail again), and a failed run is never marked done. Runs within a stage are independent: HDKD's
run (s, f) needs the teacher's run (s, f), which the earlier ``train_teacher`` stage wrote.

Ray is an optional extra (``pip install -e .[ray]``), imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hdkd.config import ConfigError, Params
from hdkd.infra import numerics
from hdkd.infra.io import output_set
from hdkd.infra.mlflow_store import resolve_tracking_uri
from hdkd.infra.provenance import repo_root
from hdkd.roster import RunKey, primary_run, roster_entry, run_name
from hdkd.training.run import PendingRun, StagePaths, input_fingerprint, train_run

logger = logging.getLogger(__name__)

# The driver's environment that a run's tags read (hdkd.infra.provenance): the experiment's name and its repository.
FORWARDED_ENV = ("DVC_EXP_NAME", "DVC_ROOT")


def train_on_ray(name: str, params: Params, staged: dict[RunKey, StagePaths],
                 todo: list[PendingRun]) -> None:
    """Train ``todo``'s runs as Ray tasks; their files land in ``staged``.

    After a failed run the tasks not finished are cancelled (a finished one still counts) and the
    first error is raised. A SIGTERM ends it as Ctrl-C does (:func:`terminate_as_exit`)."""
    if not todo:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.executor: ray trains each run as a Ray task; under torchrun set train.executor: "
                          "local (torchrun spreads one run over processes, Ray many runs over machines)")
    with terminate_as_exit():
        _train_on_ray(name, params, staged, todo)


def _train_on_ray(name: str, params: Params, staged: dict[RunKey, StagePaths], todo: list[PendingRun]) -> None:
    import ray

    try:
        connected = connect(params.train.ray_address)
    except BaseException:
        end_parent_run(name, params)
        raise
    try:
        check_tracking(params)
        root = str(Path.cwd().resolve())
        task, primary, stage = ray.remote(_run_task), primary_run(params), roster_entry(name, params).stage
        options = {"max_retries": params.train.ray_retries, "retry_exceptions": False,
                   "runtime_env": {"env_vars": worker_env(params, root)}, **task_resources(params)}
        pending = {task.options(name=f"{stage} {run_name(p.run)}", **options).remote(
            name, params, staged[p.run], p.run, p.run == primary, p.fingerprint, root): p for p in todo}
        logger.info("%s: %d runs submitted to Ray (%s)", stage, len(pending), ray.cluster_resources())
        error = None
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            finished = pending.pop(ref)
            try:
                files = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the task's error (or its cancellation), raised below
                if error is None:
                    error = e
                    for other in pending:
                        ray.cancel(other)
                continue
            store(files)
            finished.mark_done()
        if error is not None:
            raise error
    except BaseException:
        end_parent_run(name, params)  # a run's own tracker ends it too, but not a task that failed before its run
        raise
    finally:
        if connected:
            ray.shutdown()


@contextlib.contextmanager
def terminate_as_exit():
    """SIGTERM to this process (``kill <pid>``, not its group) raises ``SystemExit(143)`` here, as Ctrl-C raises
    KeyboardInterrupt: the ``finally`` that shuts Ray down runs, so the local Ray instance this stage started (its
    GCS server and raylet) does not outlive it, and the parent run is marked failed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return

    def exit_on_term(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_parent_run(name: str, params: Params) -> None:
    """Mark the pipeline's MLflow parent run FAILED: the stage failed, possibly before any run (whose tracker
    would end it) started. The stage opened the parent (:meth:`hdkd.infra.tracking.Tracker.open_parent`)."""
    from hdkd.infra.tracking import Tracker

    if not params.tracking.enabled:
        return
    try:  # the stage's own error is the one to raise: this one is only said
        parent = Tracker(params.tracking, params, roster_entry(name, params).stage)
        parent.open_parent()  # finds the stage's parent run: same commit, params and experiment
        parent.end_parent("FAILED")
    except Exception as e:  # noqa: BLE001
        logger.warning("could not mark the MLflow parent run failed (%s: %s)", type(e).__name__, e)


RAY_PROBE_TIMEOUT_S = 5.0
# An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray
# Client server) answers with its own SETTINGS frame at once.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``None``: Ray's ``RAY_ADDRESS``; without it, a new local
    instance); False if this process is connected already (then the caller's connection is used).

    A cluster address that nothing answers at raises ``ConnectionError`` naming it within seconds
    (:func:`check_ray_address`): ``ray.init`` would wait on it without end."""
    import ray

    if ray.is_initialized():
        return False
    check_ray_address(address)
    ray.init(address=address, log_to_driver=True)
    return True


def check_ray_address(address: str | None) -> None:
    """Raise ``ConnectionError`` unless the Ray cluster at ``address`` (``host:port`` of its GCS, or
    ``ray://host:port`` of its Ray Client server; ``None``: ``RAY_ADDRESS``) accepts a connection and answers
    it within :data:`RAY_PROBE_TIMEOUT_S`. ``auto``, ``local`` and a new local instance are Ray's to find."""
    key = "train.ray_address"
    if address is None:
        address, key = os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"
    if address is None or address in ("auto", "local"):
        return
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "ray"):
        return  # another client protocol (anyscale://, ...): Ray says what it makes of it
    try:
        where = urlsplit(f"//{rest}")
        host, port = where.hostname, where.port
    except ValueError:  # a port that is not a number: ray.init names the address
        return
    if not host or not port:
        return
    fix = ("start the cluster (`ray start --head` prints its address), correct the address, or set "
           "train.ray_address: null (and unset RAY_ADDRESS) for a Ray instance of this machine alone")
    try:
        with socket.create_connection((host, port), timeout=RAY_PROBE_TIMEOUT_S) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS listener answers only a TLS handshake: the open port must do
            conn.sendall(_HTTP2_PREFACE)
            answer = conn.recv(9)
    except TimeoutError:
        raise ConnectionError(f"{key} {address!r}: {host}:{port} does not answer (no reply within "
                              f"{RAY_PROBE_TIMEOUT_S:g} s): is it a Ray cluster's address? {fix}") from None
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        raise ConnectionError(f"{key} {address!r}: nothing answers at {host}:{port} ({reason}); {fix}") from None
    if not answer:
        raise ConnectionError(f"{key} {address!r}: {host}:{port} closed the connection without answering: it is "
                              f"not a Ray cluster's address; {fix}")


def task_resources(params: Params) -> dict[str, Any]:
    """A GPU where CUDA is asked for (``auto``: where the cluster has one), else a CPU: one run, one thread
    (what the reproducible mode fixes, and the local executor's side-by-side runs take)."""
    import ray

    wanted = params.train.device
    if wanted == "cuda" or (wanted == "auto" and ray.cluster_resources().get("GPU", 0) > 0):
        return {"num_gpus": 1}
    return {"num_cpus": 1}


def worker_env(params: Params, root: str) -> dict[str, str]:
    """A worker's environment: the reproducible mode's (it must be set before torch loads), the project
    code of the driver's workspace first on the path, the driver's tracking URI and experiment."""
    env = {"PYTHONPATH": f"{root}{os.pathsep}${{PYTHONPATH}}",  # Ray expands ${PYTHONPATH}: the node's own
           "MLFLOW_TRACKING_URI": resolve_tracking_uri(params.tracking.uri, repo_root()),
           **{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    return {**env, **(numerics.REPRODUCIBLE_ENV if params.train.reproducible else {})}


def check_tracking(params: Params) -> None:
    """Refuse a tracking store that is a file here (SQLite, a local path) when the cluster has nodes on
    other machines: their runs could not log to it. A cluster of this machine alone may keep it."""
    import ray

    uri = resolve_tracking_uri(params.tracking.uri, repo_root())
    if not params.tracking.enabled or urlsplit(uri).scheme not in ("", "file", "sqlite"):
        return
    remote = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - local_addresses())
    if remote:
        raise ConfigError(
            f"tracking.uri {uri!r} is a store on this machine, but the Ray cluster has nodes on other machines "
            f"({', '.join(remote)}), whose runs cannot log to it. Start an MLflow tracking server (`mlflow server "
            "--backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts --host 0.0.0.0 --port "
            "5000`) and set tracking.uri: http://<this host>:5000 (or MLFLOW_TRACKING_URI); README, \"On a cluster\"")


def local_addresses() -> set[str]:
    """This machine's IP addresses (every interface's, loopback included)."""
    import psutil

    families = (socket.AF_INET, socket.AF_INET6)
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family in families}


def store(files: dict[str, bytes]) -> None:
    """A finished run's files (path -> content), written atomically and together."""
    with output_set() as outputs:
        for path, content in files.items():
            outputs.file(path).write_bytes(content)


def _run_task(name: str, params: Params, paths: StagePaths, run: RunKey, register: bool, fingerprint: str,
              root: str) -> dict[str, bytes]:
    """A Ray task: one run, trained in this node's copy of the driver's workspace ``root``; its files."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"Ray node {socket.gethostname()} has no workspace at {root}: every node needs the "
                                "repository and the stage's inputs at the driver's path (a shared file system, or "
                                "a clone + `dvc pull`)")
    os.chdir(root)  # the stage's relative paths, git and dvc.lock (the run's tags) are the workspace's
    if input_fingerprint(name, params, paths, run) != fingerprint:
        inputs = ", ".join(str(p) for p in (paths.train, paths.val, paths.teacher) if p)
        raise RuntimeError(f"Ray node {socket.gethostname()} sees other inputs than the driver in {root} "
                           f"({inputs}) for run {run_name(run)}: sync the "
                           "workspace (git pull, `dvc pull` or `dvc repro` up to this stage's dependencies)")
    train_run(name, params, paths, run, register)
    return {str(p): Path(p).read_bytes() for p in (paths.out_dir / "model.pt", paths.run_record,
                                                    paths.metrics)}

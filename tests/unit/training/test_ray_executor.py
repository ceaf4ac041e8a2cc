"""``train.executor: ray``: a training stage's (seed, fraction) runs as tasks on a Ray cluster that the tests
start in this process (one node, 2 CPUs). The stage writes the local executor's bytes, also when a worker
is killed mid-run (retried, resumed); a failed run is never marked done and a rerun trains only the
unfinished runs; the workers' runs reach an MLflow tracking server; a store on this machine is refused
for a cluster with other machines. Faults come from tests/helpers/ray_faults.py, the cluster's worker setup hook."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from hdkd.config import ConfigError, is_result_param, parse_params
from hdkd.infra.io import file_md5, read_json
from hdkd.roster import run_name, training_runs
from hdkd.training.ray_executor import (
    _run_task,
    check_ray_address,
    check_tracking,
    connect,
    task_resources,
    train_on_ray,
)
from hdkd.training.run import PendingRun, StagePaths, input_fingerprint
from hdkd.training.stage import train_stage
from tests.helpers import ROOT
from tests.helpers.net import free_port
from tests.helpers.params import make_params, params_dict, params_without
from tests.helpers.pipeline import make_scratch_repo
from tests.helpers.ray_faults import InjectedFault
from tests.unit.training.test_stage import stage_paths, workspace  # noqa: F401 - workspace: a fixture


def with_train(params, **train):
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance of 2 CPUs, its workers' faults directory (tests/helpers/ray_faults.py) armed by the tests."""
    import ray

    faults = tmp_path_factory.mktemp("faults")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={
        "worker_process_setup_hook": "tests.helpers.ray_faults.install",
        "env_vars": {"HDKD_TEST_FAULTS": str(faults), "PYTHONPATH": str(ROOT)}})
    yield faults
    ray.shutdown()


@pytest.fixture
def faults(cluster):
    """The faults directory, emptied: no run armed, none recorded."""
    for marker in cluster.iterdir():
        marker.unlink()
    return cluster


def recorded(faults, kind: str) -> dict[str, str]:
    """What tests/helpers/ray_faults.py recorded of each run: ``{run: content}`` of its ``<run>.<kind>`` files."""
    return {p.name.removesuffix(f".{kind}"): p.read_text() for p in faults.glob(f"*.{kind}")}


@pytest.fixture(scope="module")
def local_teacher(workspace):  # noqa: F811 - the fixture imported above
    """The teacher stage on the local executor (two runs side by side): the reference bytes."""
    root, params = workspace
    paths = stage_paths(root, "teacher", "local")
    train_stage("teacher", with_train(params, run_workers=2), paths)
    return paths


def outputs(paths: StagePaths) -> dict[str, bytes]:
    """A training stage's model files and metrics, and its run record less the params hash (which covers
    train.executor, as it covers every param)."""
    record = {k: v for k, v in read_json(paths.run_record).items() if k != "params_hash"}
    return {**{p.relative_to(paths.out_dir).as_posix(): p.read_bytes() for p in sorted(paths.out_dir.rglob("*.pt"))},
            "metrics": paths.metrics.read_bytes(), "run.json": json.dumps(record, sort_keys=True).encode()}


def test_the_ray_keys_are_validated_and_change_no_result():
    for raw, message in [(params_dict({"train": {"executor": "slurm"}}), r"train\.executor: Input should be 'local' or 'ray'"),
                         (params_dict({"train": {"ray_retries": -1}}), r"train\.ray_retries: Input should be greater than or equal to 0"),
                         (params_without("train.ray_address"), r"train\.ray_address: missing")]:
        with pytest.raises(ConfigError, match=message):
            parse_params(raw)
    assert not any(is_result_param(k) for k in ("train.executor", "train.ray_address", "train.ray_retries"))


def test_the_local_executor_never_imports_ray():
    code = "import sys, pipeline.train_hdkd, hdkd.training.stage; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_run_asks_ray_for_a_gpu_where_cuda_is_wanted_else_a_cpu(monkeypatch):
    import ray

    gpus = {"CPU": 8.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: gpus)
    assert [task_resources(make_params({"train": {"device": d}})) for d in ("cpu", "cuda", "auto")] == [
        {"num_cpus": 1}, {"num_gpus": 1}, {"num_cpus": 1}]
    for n in (1.0, 4.0):  # auto: CUDA on a cluster with a GPU, though this machine has none
        gpus["GPU"] = n
        assert task_resources(make_params({"train": {"device": "auto"}})) == {"num_gpus": 1}


def test_the_cluster_is_train_ray_address_and_a_connection_is_kept_and_refused_under_torchrun(monkeypatch, tmp_path):
    import ray

    import hdkd.training.ray_executor as executor

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(executor, "check_ray_address", lambda address: None)  # no cluster at head:10001 here
    assert connect("ray://head:10001") and calls[0]["address"] == "ray://head:10001"
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # already connected (a caller's cluster): kept
    assert not connect(None) and len(calls) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^train\.executor: ray trains each run as a Ray task; under torchrun set "
                                          r"train\.executor: local \(torchrun spreads one run over processes, Ray "
                                          r"many runs over machines\)$"):
        train_on_ray("teacher", make_params({"train": {"executor": "ray"}}), {},
                     [PendingRun((0, 1.0), "f", tmp_path / "d")])


@pytest.mark.parametrize("uri, addresses, refused", [
    ("sqlite:///mlflow.db", ["127.0.0.1", "192.0.2.77"], True),
    ("mlruns", ["127.0.0.1", "192.0.2.77"], True),  # a plain path: a file store on this machine
    ("file:///srv/mlruns", ["127.0.0.1", "192.0.2.77"], True),
    ("sqlite:///mlflow.db", ["127.0.0.1"], False),  # a cluster of this machine alone keeps the default
    ("http://tracking.example:5000", ["127.0.0.1", "192.0.2.77"], False),
])
def test_a_store_on_this_machine_is_refused_for_a_cluster_with_other_machines(monkeypatch, uri, addresses, refused):
    import ray

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    nodes = [{"NodeManagerAddress": a, "Alive": True} for a in addresses] + [
        {"NodeManagerAddress": "192.0.2.99", "Alive": False}]  # a node that left the cluster does not count
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    params = make_params({"tracking": {"uri": uri}})
    if refused:
        with pytest.raises(ConfigError) as e:
            check_tracking(params)
        assert str(e.value).endswith(
            "is a store on this machine, but the Ray cluster has nodes on other machines (192.0.2.77), whose runs "
            "cannot log to it. Start an MLflow tracking server (`mlflow server --backend-store-uri sqlite:///mlflow.db "
            "--artifacts-destination ./mlartifacts --host 0.0.0.0 --port 5000`) and set tracking.uri: "
            'http://<this host>:5000 (or MLFLOW_TRACKING_URI); README, "On a cluster"')
        nodes.append({"NodeManagerAddress": "192.0.2.78", "Alive": True})
        with pytest.raises(ConfigError, match=r"nodes on other machines \(192\.0\.2\.77, 192\.0\.2\.78\), "):
            check_tracking(params)
    else:
        check_tracking(params)
    check_tracking(make_params({"tracking": {"uri": uri, "enabled": False}}))  # untracked: nothing to refuse


def test_a_task_refuses_a_node_without_the_driver_s_workspace_or_inputs(workspace, tmp_path, monkeypatch):  # noqa: F811
    root, params = workspace
    monkeypatch.chdir(ROOT)  # the task changes directory into the workspace; restored afterwards
    paths, run = stage_paths(root, "teacher", "refused"), (3, 1.0)
    with pytest.raises(FileNotFoundError, match=r"no workspace at .*missing.*dvc pull"):
        _run_task("teacher", params, paths, run, True, "f", str(tmp_path / "missing"))
    wrong = input_fingerprint("teacher", params, paths, run)[::-1]  # what another node's data would hash to
    with pytest.raises(RuntimeError, match=r"sees other inputs than the driver .* for run seed3-frac1"):
        _run_task("teacher", params, paths, run, True, wrong, str(ROOT))
    assert not paths.out_dir.exists()  # refused before training


@pytest.mark.slow
def test_a_stage_on_ray_writes_the_local_executor_s_bytes(workspace, faults, local_teacher):  # noqa: F811
    root, params = workspace
    (faults / "node-local").touch()  # the tasks' own files vanish: the driver writes what they returned
    paths = stage_paths(root, "teacher", "ray")
    summary = train_stage("teacher", with_train(params, executor="ray"), paths)
    assert set(recorded(faults, "trained")) == {f"teacher-{run_name(r)}" for r in training_runs(params)}  # in Ray
    assert outputs(paths) == outputs(local_teacher)
    assert summary == read_json(local_teacher.metrics)
    assert not paths.resume_dir.exists()  # every run finished: nothing left to resume


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_retried_and_resumes_to_the_same_bytes(workspace, faults, local_teacher):  # noqa: F811
    root, params = workspace
    (faults / "teacher-seed1-frac0.5.kill").touch()
    paths = stage_paths(root, "teacher", "ray-killed")
    train_stage("teacher", with_train(params, executor="ray"), paths)
    assert (faults / "teacher-seed1-frac0.5.killed").exists()  # the first attempt's worker died after epoch 1
    attempts = recorded(faults, "attempts")["teacher-seed1-frac0.5"].split()
    assert len(attempts) == 2 and attempts[0] != attempts[1]  # retried, in a new worker
    assert recorded(faults, "trained")["teacher-seed1-frac0.5"] == "1"  # from the resume state of epoch 1
    assert outputs(paths) == outputs(local_teacher)


@pytest.mark.slow
def test_with_no_retries_left_a_killed_worker_fails_the_stage_and_its_run_is_not_done(workspace, faults):  # noqa: F811
    from ray.exceptions import WorkerCrashedError

    root, params = workspace
    (faults / "teacher-seed1-frac0.5.kill").touch()
    paths = stage_paths(root, "teacher", "ray-no-retries")
    with pytest.raises(WorkerCrashedError):
        train_stage("teacher", with_train(params, executor="ray", ray_retries=0), paths)
    assert len(recorded(faults, "attempts")["teacher-seed1-frac0.5"].split()) == 1
    assert not (paths.resume_dir / "seed1-frac0.5" / "done.json").exists() and not paths.metrics.exists()


@pytest.mark.slow
def test_a_failed_run_is_never_marked_done_and_a_rerun_trains_only_the_others(workspace, faults, local_teacher):  # noqa: F811
    root, params = workspace
    # The last run submitted fails: the first ones have finished by then (on 2 CPUs), or are cancelled.
    p, paths, failing = with_train(params, executor="ray"), stage_paths(root, "teacher", "ray-failed"), (1, 0.5)
    (faults / f"teacher-{run_name(failing)}.fail").touch()
    with pytest.raises(InjectedFault, match="teacher-seed1-frac0.5 failed"):
        train_stage("teacher", p, paths)
    assert len(recorded(faults, "attempts")["teacher-seed1-frac0.5"].split()) == 1  # a Python error is not retried
    done = [r for r in training_runs(params) if (paths.resume_dir / run_name(r) / "done.json").is_file()]
    assert failing not in done and not paths.metrics.exists() and not paths.out_dir.exists()
    assert all((paths.resume_dir / run_name(r) / "out" / "model.pt").is_file() for r in done)  # files came back

    for marker in faults.iterdir():
        marker.unlink()
    train_stage("teacher", p, paths)
    assert set(recorded(faults, "trained")) == {f"teacher-{run_name(r)}" for r in training_runs(params) if r not in done}
    assert outputs(paths) == outputs(local_teacher)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """``mlflow server`` on a loopback port (a SQLite backend, artifacts proxied into a directory); its URL."""
    where, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    log = where / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                                   f"sqlite:///{where / 'mlflow.db'}", "--artifacts-destination", str(where / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=where, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{log.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:  # its job runner takes ~17 s to stop; the store is this test's
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_runs_on_ray_log_every_run_tag_and_model_to_a_tracking_server(workspace, cluster, tracking_server, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = workspace
    p = with_train(params.model_copy(update={"fractions": [1.0], "tracking": params.tracking.model_copy(
        update={"enabled": True, "uri": tracking_server})}), executor="ray")
    paths = StagePaths(root / "prepared", root / "prepared", tmp_path / "student", tmp_path / "student.json",
                       tmp_path / "checkpoints")
    train_stage("student", p, paths)

    client = MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name("hdkd-synthetic").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["hdkd.stage"] == "pipeline"]
    trained = sorted((r for r in runs if r.data.tags["hdkd.stage"] == "train_student"),
                     key=lambda r: r.data.tags["hdkd.seed"])
    assert len(runs) == 3 and [(r.data.tags["hdkd.seed"], r.data.tags["hdkd.fraction"]) for r in trained] == [
        ("1", "1"), ("3", "1")]
    for run in trained:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["hdkd.git_commit"] == parent.data.tags["hdkd.git_commit"] != "unknown"
        assert tags["hdkd.params_hash"] == p.digest() and tags["hdkd.env.reproducible_numerics"] == "true"
        assert run.data.params["student.epochs"] == "2"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    primary = trained[1]  # seed 3, all the data
    assert read_json(paths.run_record)["run_id"] == primary.info.run_id
    (version,) = client.search_model_versions("name='hdkd-synthetic-student'")
    assert version.run_id == primary.info.run_id and version.tags["hdkd.params_hash"] == p.digest()
    checkpoint = client.download_artifacts(primary.info.run_id, "checkpoint/model.pt", str(tmp_path))
    assert file_md5(checkpoint) == file_md5(paths.out_dir / "model.pt")


def ray_processes_since(created: float) -> list[psutil.Process]:
    """This user's processes started at or after ``created`` that belong to a Ray instance."""
    found = []
    for p in psutil.process_iter(["create_time", "cmdline", "username"]):
        line = " ".join(p.info["cmdline"] or [])
        if (p.info["create_time"] >= created and p.info["username"] == psutil.Process().username()
                and "ray" in line.lower() and p.pid != os.getpid()):
            found.append(p)
    return found


@pytest.mark.slow
def test_dvc_repro_on_ray_ends_ray_on_sigterm_resumes_and_switching_executors_reruns_nothing(tmp_path, monkeypatch):
    # As users run it: `dvc repro` of a scratch copy, the stage starting (and stopping) its own local Ray instance;
    # 3 runs on 2 CPUs, so that the last one still trains when the first is done. (That the bytes are the local
    # executor's, after a resume too, the tests above show at a fraction of the time.)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("SHELL", raising=False)  # DVC runs the stage through /bin/sh, as in CI: see `stage` below
    repo = make_scratch_repo(tmp_path / "repo", {"seeds": [0, 1, 2], "train": {"executor": "ray"},
                                                 "tracking": {"enabled": False}})
    repo.dvc("repro", "prepare")
    proc = repo.start_dvc("repro", "train_teacher", log=tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while not list((repo.root / "checkpoints" / "teacher").glob("*/done.json")):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.05)
    # `kill <pid>` of the stage's process alone (not its group): it stops as on Ctrl-C, and takes down the local Ray
    # instance it started (GCS server, raylet, agents, workers) instead of leaving it running.
    # The Python process itself: DVC starts it through $SHELL or /bin/sh, and dash (unlike bash) does not exec its
    # `-c` command, so a `sh -c "python -m pipeline.train_teacher"` parent may stand between them.
    stage = next(c for c in psutil.Process(proc.pid).children(recursive=True) if "pipeline.train_teacher" in c.cmdline())
    started = ray_processes_since(stage.create_time())  # Ray daemonises some: not all are the stage's children
    assert any("raylet" in " ".join(c.cmdline()) for c in started), [c.cmdline() for c in started]
    stage.terminate()
    assert proc.wait(timeout=120) != 0  # dvc fails with its stage
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left running after the stage ended: {[' '.join(c.cmdline())[:80] for c in alive]}"
    log = repo.dvc("repro", "train_teacher")
    assert "runs submitted to Ray" in log and re.search(r"train_teacher: 3 runs \([12] trained now\)", log), log
    models = repo.root / "models" / "teacher"
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*.pt")) == [
        "model.pt", "runs/seed1-frac1.pt", "runs/seed2-frac1.pt"]
    params = repo.params
    params["train"]["executor"] = "local"
    (repo.root / "params.yaml").write_text(yaml.safe_dump(params))
    assert json.loads(repo.dvc("status", "--json", "train_teacher")) == {}  # not a param of the stage


@pytest.fixture
def no_ray_init(monkeypatch):
    """A process not connected to Ray, where ray.init must not be reached."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail(f"ray.init({kwargs}) was reached"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_a_ray_address_where_nothing_answers_fails_within_seconds_naming_it(no_ray_init, monkeypatch):
    from tests.helpers.net import finished_within, silent_server

    port = free_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        done, error = finished_within(30, connect, address)
        assert done and isinstance(error, ConnectionError), error
        assert str(error).startswith(f"train.ray_address {address!r}: nothing answers at 127.0.0.1:{port} "
                                     "(connection refused); "), error
        assert str(error).endswith("); start the cluster (`ray start --head` prints its address), correct the "
                                   "address, or set train.ray_address: null (and unset RAY_ADDRESS) for a Ray "
                                   "instance of this machine alone"), error
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the address Ray takes when train.ray_address is null
    done, error = finished_within(30, connect, None)
    assert done and isinstance(error, ConnectionError) and str(error).startswith(f"RAY_ADDRESS '127.0.0.1:{port}'")
    with silent_server() as url:  # a port that accepts connections but where no Ray cluster answers
        address = url.removeprefix("http://")
        start = time.monotonic()
        done, error = finished_within(60, connect, address)
        assert done and isinstance(error, ConnectionError), error
        assert time.monotonic() - start < 30 and f"train.ray_address {address!r}: " in str(error)
        assert "does not answer" in str(error), error
        for tls in ("True", "1"):  # a TLS listener answers only a handshake: the open port must do
            monkeypatch.setenv("RAY_USE_TLS", tls)
            assert finished_within(30, check_ray_address, address) == (True, None)


def test_a_port_that_closes_the_connection_without_answering_is_not_a_ray_cluster(no_ray_init):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def close_each():  # reads what it is sent (else the close resets the connection), answers nothing
        conn = listener.accept()[0]
        conn.recv(1024)
        conn.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConnectionError) as e:
            check_ray_address(address)
    finally:
        listener.close()
    assert str(e.value).startswith(f"train.ray_address {address!r}: {address} closed the connection without "
                                   "answering: it is not a Ray cluster's address; start the cluster")


def test_a_connection_error_without_an_errno_is_named_by_its_message(no_ray_init, monkeypatch):
    import hdkd.training.ray_executor as executor

    def fail(*args, **kwargs):
        raise OSError("getaddrinfo returns an empty list")

    monkeypatch.setattr(executor.socket, "create_connection", fail)
    with pytest.raises(ConnectionError, match=r"^train\.ray_address 'head:6379': nothing answers at head:6379 "
                                              r"\(getaddrinfo returns an empty list\); start the cluster"):
        check_ray_address("head:6379")


def test_an_address_without_a_host_and_port_is_left_to_ray(no_ray_init, monkeypatch):
    import hdkd.training.ray_executor as executor

    monkeypatch.setattr(executor.socket, "create_connection", lambda *a, **k: pytest.fail(f"probed {a}"))
    for address in ("auto", "local", "head-node", ":6379", "ray://head-node", "host:port", "anyscale://x:1", None):
        check_ray_address(address)


def test_a_failed_ray_connection_fails_the_stage_and_its_mlflow_parent_run(no_ray_init, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from hdkd.infra.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store, address = f"sqlite:///{tmp_path / 'mlflow.db'}", f"127.0.0.1:{free_port()}"
    params = make_params({"tracking": {"uri": store}, "train": {"executor": "ray", "ray_address": address}})
    parent = Tracker(params.tracking, params, "train_teacher")
    parent.open_parent()  # as the stage does before its runs
    with pytest.raises(ConnectionError, match=rf"train\.ray_address '{re.escape(address)}': nothing answers"):
        train_on_ray("teacher", params, {}, [PendingRun((0, 1.0), "f", tmp_path / "d")])
    assert MlflowClient(store).get_run(parent.parent_run_id).info.status == "FAILED"

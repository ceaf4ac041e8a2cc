"""Reproducible CPU numerics (hdkd.infra.numerics): identical weights on emulated CPUs with the mode on.

Another CPU is emulated on this one by capping the instruction sets oneDNN, MKL and ATen may use
(ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY) and by the intra-op thread count
torch would default to on a machine with that many cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdkd.infra import numerics
from hdkd.models.checkpoint import load_model
from tests.helpers import ROOT
from tests.helpers.fit import load_benchmark
from tests.helpers.pipeline import command_env, make_scratch_repo

HAS_AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else False
# name -> (environment capping the instruction sets, intra-op threads; 0 = this machine's default)
EMULATED = {
    "native": ({}, 0),
    "avx-1core": ({"ONEDNN_MAX_CPU_ISA": "AVX", "MKL_ENABLE_INSTRUCTIONS": "AVX", "ATEN_CPU_CAPABILITY": "default"}, 1),
    "sse4-4cores": ({"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, 4),
}
if HAS_AVX512:  # native is AVX-512 here: emulate the AVX2 machines too
    EMULATED["avx2-capped"] = ({"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                "ATEN_CPU_CAPABILITY": "avx2"}, 0)


@pytest.fixture(scope="module")
def hashes():
    """mode -> emulated CPU -> SHA-256 of the teacher's, student's and HDKD student's weights after 2 steps."""
    bench = load_benchmark("reproducible_numerics")
    return {mode: {name: bench.run_worker(mode, threads, steps=2, image_size=32, batch=8, env=env)["sha256"]
                   for name, (env, threads) in EMULATED.items()}
            for mode in ("on", "off")}


def test_emulated_cpus_give_identical_weights_with_the_mode_on(hashes):
    if not HAS_AVX512:
        print("no AVX-512 on this CPU: emulated only the instruction sets up to AVX2")
    assert all(h == hashes["on"]["native"] for h in hashes["on"].values()), hashes["on"]


def test_emulated_cpus_differ_with_the_mode_off(hashes):
    # Shows the test above could fail: without the mode the same variants change the weights.
    differing = [name for name, h in hashes["off"].items() if h != hashes["off"]["native"]]
    if not differing:
        pytest.skip(f"on this CPU the emulated variants happen to agree with the mode off too: {hashes['off']}")
    assert set(differing) == set(EMULATED) - {"native"}, hashes["off"]


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in numerics.REPRODUCIBLE_ENV} | (env or {})
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=cwd, env=env, capture_output=True, text=True)
    return proc.stdout.strip() + proc.stderr


@pytest.mark.parametrize("params_text, expected", [
    ("train: {reproducible: false}\n", "None"),
    ("train: {reproducible: true}\n", "COMPATIBLE"),
    ("train: {batch_size: 16}\n", "COMPATIBLE"),  # the mode is the default
    (None, "COMPATIBLE"),
])
def test_a_stages_start_sets_the_environment_from_params_yaml(tmp_path, params_text, expected):
    if params_text is not None:
        (tmp_path / "params.yaml").write_text(params_text)
    code = ("import os, sys, pipeline; before = os.environ.get('MKL_CBWR'); pipeline.start()\n"
            "assert 'torch' not in sys.modules; print(before, os.environ.get('MKL_CBWR'))")
    assert run_python(code, tmp_path) == f"None {expected}"  # importing pipeline alone changes nothing


def test_a_stage_process_freezes_its_objects_at_exit(tmp_path):
    # pipeline.start(): the teardown's garbage collections over torch's and MLflow's objects took 3 s
    code = "import atexit, gc, pipeline\npipeline.start()\nbefore = gc.get_freeze_count()\natexit._run_exitfuncs()\n" \
           "print(before, gc.get_freeze_count() > 0)"
    assert run_python(code, tmp_path) == "0 True"


def test_the_mode_refuses_a_process_that_loaded_torch_first(tmp_path):
    code = ("import torch\nfrom hdkd.infra import numerics\nassert not numerics.apply_env()\n"
            "numerics.apply_runtime(False)\nnumerics.apply_runtime(True)")
    out = run_python(code, tmp_path)
    assert "NumericsError: train.reproducible is true but torch was loaded without" in out


def test_switching_off_restores_the_library_defaults():
    assert numerics.env_in_place()  # conftest applied it before torch loaded
    try:
        numerics.apply_runtime(True)
        facts = numerics.environment_facts()
        assert facts["reproducible"] and not facts["mkldnn"] and facts["threads"] == numerics.THREADS
        assert facts["cpu_capability"] == "AVX2" and facts["isa_caps"]["MKL_CBWR"] == "COMPATIBLE"
        assert facts["torch"] == torch.__version__ and facts["mkl"] and facts["onednn"]
    finally:
        numerics.apply_runtime(False)
    defaults = numerics._library_defaults  # what the process had before any stage switched the mode on
    assert (torch.backends.mkldnn.enabled, torch.get_num_threads()) == (defaults["mkldnn"], defaults["threads"])
    assert not numerics.environment_facts()["reproducible"]


@pytest.mark.slow
def test_a_whole_tiny_training_is_identical_on_emulated_cpus(tmp_path):
    """The shrunk pipeline's teacher and student stages, once natively and once on an emulated CPU."""
    repo = make_scratch_repo(tmp_path / "repo", {"tracking": {"enabled": False}})
    repo.dvc("repro", "balance")
    weights = {}
    for name in ("native", "sse4-4cores"):
        env, threads = EMULATED[name]
        env = {**command_env(), **env, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        for stage, role in (("train_teacher", "teacher"), ("train_student", "student")):
            out = Path("out") / name / role
            subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--out", str(out), "--metrics",
                            str(out / "metrics.json"), "--resume-dir", str(out / "resume")],
                           cwd=repo.root, env=env, check=True, capture_output=True)
            model, meta = load_model(repo.root / out / "model.pt")
            weights[name, role] = model.state_dict(), [row["val_loss"] for row in meta["history"]]
    for role in ("teacher", "student"):
        native, emulated = weights["native", role], weights["sse4-4cores", role]
        assert native[1] == emulated[1], role
        assert all(torch.equal(native[0][k], emulated[0][k]) for k in native[0]), role

"""`kill -9` of each stage at its worst moment, then `dvc repro`: the outputs of an uninterrupted run.

The worst moment of a stage is the renaming of its finished outputs into place: everything is
written, and an output set (:func:`hdkd.infra.io.output_set`) is put in place one rename at a time. Each
case kills the stage process (SIGKILL, from a ``sitecustomize`` that wraps ``os.replace`` in the
stage only, not in DVC) at the ``k``-th rename onto one of its outputs — ``k`` = 1 leaves one output
new and the rest old or missing — in a copy of a reproduced scratch repo; then ``dvc repro`` must
succeed and give the reference run's outputs: the same DVC hashes for everything but the files that
record timing or run ids, and for those the same numbers; the stage's next run leaves no temporary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from hdkd.infra.io import read_json
from tests.helpers.pipeline import ScratchRepo, command_env, stage_outputs

pytestmark = pytest.mark.slow

KILL_AT_RENAME = textwrap.dedent("""
    # Test-only: SIGKILL this stage at the HDKD_KILL_AT-th rename onto one of HDKD_KILL_OUTPUTS.
    import os, signal, sys
    from pathlib import Path

    _outputs = [Path(p) for p in os.environ["HDKD_KILL_OUTPUTS"].split(os.pathsep)]
    _renames = []
    _replace = os.replace

    def _onto_output(dst):
        dst = Path(os.path.abspath(dst))
        return not any(part.startswith(".") for part in dst.parts) and any(
            dst == o or o in dst.parents for o in _outputs)

    def replace(src, dst, *args, **kwargs):
        if "pipeline" in Path(sys.argv[0]).parts and _onto_output(dst):  # a stage, not DVC
            if len(_renames) == int(os.environ["HDKD_KILL_AT"]):
                Path(os.environ["HDKD_KILL_MARK"]).touch()  # proof the kill came from here
                os.kill(os.getpid(), signal.SIGKILL)
            _renames.append(dst)
        return _replace(src, dst, *args, **kwargs)

    os.replace = replace
""")

# stage -> the rename it is killed at (0: before any output is in place; 1: after the first).
CASES = {"download": 0, "prepare": 0, "balance": 0, "train_hdkd": 1, "train_baseline@vit": 0,
         "evaluate": 2, "explain": 0, "export": 1, "report": 1}

# Outputs whose bytes legitimately differ between two uninterrupted runs: measured latencies
# (and everything drawn or tabulated from them), MLflow run ids.
VARY = ("reports/bundle.json", "reports/metrics.json", "reports/eval", "reports/export.json",
        "reports/tables", "reports/figures", "reports/README.md", ".run.json")


def lock_hashes(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {out["path"]: out["md5"] for out in lock["outs"]}


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if not k.startswith("timing")}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def temporaries(repo: Path) -> list[str]:
    return sorted(str(p.relative_to(repo)) for p in repo.rglob(".*.tmp")) + sorted(
        str(p.relative_to(repo)) for p in repo.rglob(".*.old"))


@pytest.mark.parametrize("stage", CASES)
def test_a_stage_killed_while_putting_its_outputs_in_place_reruns_to_the_same_outputs(
        stage, tracked_pipeline, tmp_path):
    reference = tracked_pipeline.root
    repo = ScratchRepo(tmp_path / "repo")
    shutil.copytree(reference, repo.root, symlinks=True)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_AT_RENAME)
    env = {**command_env(), "PYTHONPATH": os.pathsep.join([str(hook), str(repo.root)]),
           "HDKD_KILL_AT": str(CASES[stage]), "HDKD_KILL_MARK": str(tmp_path / "killed"),
           "HDKD_KILL_OUTPUTS": os.pathsep.join(str(repo.root / p) for p in stage_outputs(stage))}
    killed = subprocess.run(["dvc", "repro", "--force", "--single-item", stage], cwd=repo.root, env=env,
                            capture_output=True, text=True)
    # How DVC words the signal depends on the shell it runs the command through (-9 or 137), so
    # the hook leaves a mark instead.
    assert killed.returncode != 0 and (tmp_path / "killed").exists(), killed.stdout + killed.stderr

    repo.dvc("repro")
    assert "up to date" in repo.dvc("status")
    # Killed before its first rename, a stage leaves its old outputs whole, so DVC need not run it
    # again; its temporaries wait for its next run, which clears them first.
    left = temporaries(repo.root)
    assert all(any(Path(t).name.startswith(f".{Path(o).name}.") for o in stage_outputs(stage)) for t in left), left
    if left:
        repo.dvc("repro", "--force", "--single-item", stage)
        assert temporaries(repo.root) == []
    expected, got = lock_hashes(reference, stage), lock_hashes(repo.root, stage)
    assert got.keys() == expected.keys()
    for path in expected:
        if not any(v in f"/{path}" for v in VARY):
            assert got[path] == expected[path], f"{path} differs from the uninterrupted run's"
    for path in [p for p in stage_outputs(stage) if p.endswith(".json") or p == "reports/eval"]:
        files = sorted((reference / path).rglob("*.json")) if (reference / path).is_dir() else [reference / path]
        for file in files:
            rel = file.relative_to(reference)
            if not rel.name.endswith(".run.json"):
                assert without_timing(read_json(repo.root / rel)) == without_timing(read_json(file)), rel

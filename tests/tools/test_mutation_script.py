"""scripts/mutation.py's guards: a survivors-only run retests the survivors of this module's own last full run,
on mutants/'s copy of this module, or refuses."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from tests.helpers import ROOT

MODULE = "hdkd/config.py"


@pytest.fixture
def mutation(tmp_path, monkeypatch):
    """scripts/mutation.py with its repository root at ``tmp_path``, holding MODULE and its last full run."""
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "SCORES", tmp_path / "mutation-scores.md")
    (tmp_path / MODULE).parent.mkdir(parents=True)
    (tmp_path / MODULE).write_text("LIMIT = 1 + 1\n")
    source = hashlib.sha256((tmp_path / MODULE).read_bytes()).hexdigest()
    script.state_file(MODULE, "last").parent.mkdir()
    script.state_file(MODULE, "last").write_text(json.dumps(
        {"source": source, "wall": 60.0, "status": {"hdkd.config.x__mutmut_1": "survived"}}))
    return script


def test_survivors_refuse_a_mutants_copy_that_another_modules_run_replaced(mutation, tmp_path, monkeypatch):
    copy = tmp_path / "mutants" / MODULE
    copy.parent.mkdir(parents=True)
    copy.write_text("LIMIT = 1 + 1\n")  # a later run of another module copied this one unmutated
    monkeypatch.setattr(mutation, "run", lambda *a, **k: pytest.fail("retested on an unmutated copy"))
    with pytest.raises(SystemExit, match=r"mutants/ holds another module's run, not hdkd/config.py's"):
        mutation.main([MODULE, "--survivors", "--no-write"])
    copy.unlink()
    with pytest.raises(SystemExit, match="another module's run"):
        mutation.main([MODULE, "--survivors", "--no-write"])


def test_survivors_of_this_modules_run_are_retested_and_the_rows_time_is_the_full_runs(mutation, tmp_path,
                                                                                        monkeypatch):
    copy = tmp_path / "mutants" / MODULE
    copy.parent.mkdir(parents=True)
    copy.write_text("def x__mutmut_1(): pass\n")
    retested = []
    monkeypatch.setattr(mutation, "run", lambda module, jobs, only: retested.extend(only) or {o: "killed" for o in only})
    assert mutation.main([MODULE, "--survivors"]) == 0
    assert retested == ["hdkd.config.x__mutmut_1"]
    # no row yet: the first run's kills are the full run's (none), the time the full run's
    assert "| `hdkd/config.py` | 1 | 0 | 0 | 1 | 100.0 % | 1.0 min |" in (tmp_path / "mutation-scores.md").read_text()


def test_survivors_refuse_a_module_changed_since_its_full_run(mutation, tmp_path):
    (tmp_path / MODULE).write_text("LIMIT = 1 + 2\n")
    with pytest.raises(SystemExit, match="no full run of hdkd/config.py as it is now"):
        mutation.main([MODULE, "--survivors"])

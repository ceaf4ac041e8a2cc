"""The mutation runs' tooling (scripts/mutation.py): a mutant's tests run fastest first, by mutmut's measured times."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests.helpers.fast_first import pytest_collection_modifyitems


def test_a_mutants_tests_run_fastest_first_and_unmeasured_ones_keep_their_order(tmp_path, monkeypatch):
    items = [SimpleNamespace(nodeid=n) for n in ("t::slow", "t::new_a", "t::fast", "t::new_b", "t::mid")]
    monkeypatch.chdir(tmp_path)
    pytest_collection_modifyitems(items)  # no measured times yet (mutmut's measuring run): pytest's order
    assert [i.nodeid for i in items] == ["t::slow", "t::new_a", "t::fast", "t::new_b", "t::mid"]
    (tmp_path / "mutmut-stats.json").write_text(json.dumps(
        {"duration_by_test": {"t::slow": 9.5, "t::fast": 0.01, "t::mid": 1.0}}))
    pytest_collection_modifyitems(items)
    assert [i.nodeid for i in items] == ["t::new_a", "t::new_b", "t::fast", "t::mid", "t::slow"]

"""The mutation run's list (scripts/mutants.py) stays applicable: each mutant changes its module in exactly one
place, to something else, and its module has tests to run against it."""

from __future__ import annotations

from tests.helpers import ROOT
from tests.helpers.fit import load_script

mutants = load_script("scripts/mutants.py")


def test_every_mutant_applies_to_the_code_once_and_changes_it():
    assert len(mutants.MUTANTS) >= 30
    for m in mutants.MUTANTS:
        source = (ROOT / m.file).read_text()
        assert source.count(m.old) == 1, f"{m.file}: {m.what}: its text is not there exactly once"
        assert source.replace(m.old, m.new, 1) != source
        assert all((ROOT / t).is_file() for t in mutants.TESTS[m.file]), m.file
    assert len({m.what for m in mutants.MUTANTS}) == len(mutants.MUTANTS)  # one line each in the results

"""A pytest plugin for mutation runs (scripts/mutation.py): each mutant's tests run fastest first, by the durations
mutmut measured on the unmutated code (``mutmut-stats.json`` in the working directory, ``mutants/``). Runs stop at the
first failure (``-x``), so a mutant that a fast test kills never waits for a slow one."""

from __future__ import annotations

import json
from pathlib import Path


def pytest_collection_modifyitems(items):
    stats = Path("mutmut-stats.json")
    if not stats.is_file():  # the measuring run itself
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: duration.get(item.nodeid, 0.0))  # stable: equal times keep pytest's order

"""Settings for tests, built from params.yaml (the one home of defaults) with overrides."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from hdkd.config import Params, Section, parse_params
from tests.helpers import ROOT

PARAMS_YAML = ROOT / "params.yaml"
PARAMS = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))


def merged(base: dict, change: dict) -> dict:
    """``base`` with ``change`` applied section by section (nested keys are replaced one by one;
    a mapping replaces a value that is not one, such as ``balance.targets: majority``)."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def params_dict(change: dict | None = None) -> dict[str, Any]:
    """params.yaml as a raw mapping, with ``change`` merged in (``{"distill": {"alpha": 0.9}}``)."""
    return merged(PARAMS, change or {})


def params_without(dotted: str) -> dict[str, Any]:
    """params.yaml as a raw mapping less one section or one key inside a section (``"distill.epochs"``)."""
    raw = params_dict()
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node[key]
    del node[leaf]
    return raw


def make_params(change: dict | None = None) -> Params:
    """Validated :class:`Params` of params.yaml with ``change`` merged in."""
    return parse_params(params_dict(change))


def section(dotted: str, **overrides: Any) -> Section:
    """One validated section of params.yaml (``"augment"``, ``"data.synthetic"``) with ``overrides``.

    ``section("teacher", epochs=3)`` is params.yaml's teacher settings trained for 3 epochs."""
    raw: dict[str, Any] = {}
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = overrides
    # Whole params validate the section; one training fraction keeps rules between sections (a
    # balance method needs the whole training split) from refusing a section that is valid alone.
    params = make_params({**raw, "fractions": [1.0], "baseline_fractions": [1.0]})
    for key in dotted.split("."):
        params = getattr(params, key)
    return params

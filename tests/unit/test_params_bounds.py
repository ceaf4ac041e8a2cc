"""Every bound of the params schema, as users rely on it: the value just past it is refused, naming the key.

BOUNDS is the contract, written out: a bound dropped or moved in hdkd/config.py fails here, and so does a value
just past a bound that validation lets through."""

from __future__ import annotations

import annotated_types as at
import pytest

from hdkd.config import ConfigError, Params
from tests.helpers.params import make_params

# key: (lowest allowed or None, its kind, highest allowed or None, its kind); kind ">=" / ">" for the lower bound,
# "<=" / "<" for the upper one.
BOUNDS = {
    "seed": (0, ">=", None, None),
    "data.image_size": (16, ">=", 1024, "<="),
    "data.val_fraction": (0, ">", 0.5, "<"),
    "data.test_fraction": (0, ">", 0.5, "<"),
    "data.synthetic.num_images": (50, ">=", 200_000, "<="),
    "data.synthetic.native_size": (16, ">=", 1024, "<="),
    "data.synthetic.seed": (0, ">=", None, None),
    "data.synthetic.ambiguity": (0, ">=", 1, "<="),
    "data.synthetic.subtypes": (1, ">=", 64, "<="),
    "data.synthetic.nuisance": (0, ">=", 1, "<="),
    "balance.k_neighbors": (1, ">=", 50, "<="),
    "augment.rotation": (0, ">=", 180, "<="),
    "augment.brightness": (0, ">=", 1, "<="),
    "augment.contrast": (0, ">=", 1, "<="),
    "augment.sharpness": (0, ">=", 10, "<="),
    "augment.blur_kernel": (0, ">=", None, None),
    "model.dropout": (0, ">=", 1, "<"),
    "train.batch_size": (1, ">=", None, None),
    "train.eval_batch_size": (1, ">=", None, None),
    "train.num_workers": (0, ">=", None, None),
    "train.grad_clip": (0, ">", None, None),
    "train.log_every": (0, ">=", None, None),
    "train.run_workers": (0, ">=", None, None),
    "train.ray_retries": (0, ">=", None, None),
    **{f"{section}.{key}": bound for section in ("teacher", "student", "distill") for key, bound in {
        "epochs": (1, ">=", None, None), "lr": (0, ">", None, None), "weight_decay": (0, ">=", None, None),
        "momentum": (0, ">=", 1, "<"), "warmup_epochs": (0, ">=", None, None), "warmup_lr": (0, ">=", None, None),
        "min_lr": (0, ">=", None, None)}.items()},
    "distill.alpha": (0, ">=", 1, "<="),
    "distill.tau": (0, ">", None, None),
    "distill.lambda": (0, ">=", None, None),
    "evaluate.bootstrap": (0, ">=", None, None),
    "evaluate.ci": (0, ">", 1, "<"),
    "evaluate.ece_bins": (1, ">=", None, None),
    "evaluate.latency_iters": (1, ">=", None, None),
    "evaluate.latency_warmup": (0, ">=", None, None),
    "report.dpi": (50, ">=", 600, "<="),
}


def schema_bounds(model=Params, prefix=""):
    """The numeric bounds hdkd.config declares, by dotted key, in BOUNDS' form."""
    found = {}
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            found |= schema_bounds(field.annotation, key + ".")
            continue
        low = high = (None, None)
        for m in field.metadata:
            if isinstance(m, (at.Ge, at.Gt)):
                low = (m.ge, ">=") if isinstance(m, at.Ge) else (m.gt, ">")
            elif isinstance(m, (at.Le, at.Lt)):
                high = (m.le, "<=") if isinstance(m, at.Le) else (m.lt, "<")
        if low != (None, None) or high != (None, None):
            found[key] = (*low, *high)
    return found


def test_the_schema_declares_exactly_these_bounds():
    assert schema_bounds() == BOUNDS


def overrides(key: str, value) -> dict:
    node: dict = {}
    top = node
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return top


def past(bound, kind, integer: bool):
    """The value just past a bound: one step for an integer, a hair (or the bound itself, exclusive) else."""
    step = 1 if integer else 1e-6
    if kind == ">=":
        return bound - step
    if kind == "<=":
        return bound + step
    return bound  # ">" and "<": the bound itself is outside


CASES = [(key, side) for key, (lo, _, hi, _) in BOUNDS.items()
         for side, bound in (("low", lo), ("high", hi)) if bound is not None]


@pytest.mark.parametrize("key, side", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_the_value_just_past_a_bound_is_refused_naming_the_key(key, side):
    lo, lo_kind, hi, hi_kind = BOUNDS[key]
    bound, kind = (lo, lo_kind) if side == "low" else (hi, hi_kind)
    integer = isinstance(make_params().flat()[key], int) and not isinstance(make_params().flat()[key], bool)
    with pytest.raises(ConfigError, match=rf"(?m)^  {key.replace('.', '[.]')}: "):
        make_params(overrides(key, past(bound, kind, integer)))

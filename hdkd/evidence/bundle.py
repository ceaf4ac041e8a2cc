"""The results bundle: one JSON object that holds a whole run; the report is built from it alone.

Written by the evaluate stage (``reports/bundle.json``, logged to MLflow as ``results_bundle.json``)
and read by the report stage. This module imports no torch, so reading a bundle stays cheap.

::

    {
      "schema_version": 1,
      "dataset": "synthetic",                 # what the models were evaluated on
      "class_names": ["akiec", "bcc", ...],   # index k = label k
      "params": {...},                        # resolved params (Params.to_dict(), YAML key names)
      "params_hash": "3f2a...",               # Params.digest()
      "git_commit": "<40 hex>" | null,        # HEAD when the evaluation ran
      "git_dirty": false | null,              # tracked code modified at that time
      "dvc_exp_name": "exp-lambda-1" | null,  # set under `dvc exp run`
      "test_labels": [3, 5, ...],             # the test split's labels, in the runs' predictions' order
      "models": {                             # keys: hdkd.roster.roster(params)'s names (others allowed)
        "<model>": {                          # its primary run (hdkd.roster.primary_run) in detail:
          "evaluation": {...},                # evaluate.evaluate_model(): metrics.classification_metrics()
                                              #   + "predictions": {true_counts, predicted_counts,
                                              #                     mean_confidence}
          "efficiency": {...} | null,         # efficiency.measure_efficiency()
          "history": [{"epoch": 1, "train_loss": .., "val_loss": .., "val_accuracy": .., "lr": ..}, ...],
          "runs": [                           # every (seed, fraction) run, the primary included
            {"seed": 0, "fraction": 1.0, "evaluation": {"accuracy": .., "f1_macro": .., ...},
             "predictions": [3, 4, ...],      # predicted label per test image
             "history": [{"epoch": 1, "loss_ce": .., "grad_norm_ce": .., "val_pred_<class>": .., ...}]}
                                              # the run's per-epoch history (absent in older bundles)
          ]
        }
      }
    }
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from hdkd.config import Params
from hdkd.infra.io import read_json
from hdkd.roster import roster

# What a run's per-epoch history keeps in the bundle: what the training diagnostics read
# (hdkd.report.diagnostics). The rest of it stays in the run's model.pt; the primary run's whole history is
# the model's ``history``. A bundle holds every run, so this is what keeps a study's bundle small.
RUN_HISTORY_KEYS = ("epoch", "loss_", "grad_norm_", "val_pred_")


def run_history(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The part of a run's history a bundle keeps (:data:`RUN_HISTORY_KEYS`, as prefixes)."""
    return [{k: v for k, v in row.items() if k.startswith(RUN_HISTORY_KEYS)} for row in history]


SCHEMA_VERSION = 2  # 2: runs per (seed, fraction) and test_labels
BUNDLE_ARTIFACT = "results_bundle.json"  # the bundle's name among the evaluate run's MLflow artifacts


def make_bundle(
    models: Mapping[str, Mapping[str, Any]],
    params: Params,
    class_names: Sequence[str],
    *,
    dataset: str | None = None,
    test_labels: Sequence[int] = (),
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble and validate a results bundle; ``models[name]`` holds evaluation, efficiency, history, runs.

    ``provenance``: ``git_commit``, ``git_dirty`` and ``dvc_exp_name`` (each ``None`` when not given), and
    ``numerics``, the versions that decide the numbers (:func:`hdkd.infra.numerics.numerics_versions`)."""
    provenance = provenance or {}
    numerics = provenance.get("numerics")
    bundle = {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset or params.data.dataset,
        "class_names": list(class_names),
        "params": params.to_dict(),
        "params_hash": params.digest(),
        "git_commit": provenance.get("git_commit"),
        "git_dirty": provenance.get("git_dirty"),
        "dvc_exp_name": provenance.get("dvc_exp_name"),
        **({"numerics": dict(numerics)} if numerics else {}),
        "test_labels": [int(y) for y in test_labels],
        "models": {
            name: {
                "evaluation": dict(m["evaluation"]),
                "efficiency": m.get("efficiency"),
                "history": [dict(row) for row in m.get("history") or []],
                "runs": [dict(run) for run in m.get("runs") or []],
            }
            for name, m in models.items()
        },
    }
    return validate_bundle(bundle)


class UnsupportedBundle(ValueError):
    """A results bundle of another schema version (an older pipeline's run): readable, but not by this code."""


def validate_bundle(bundle: Mapping[str, Any]) -> dict[str, Any]:
    """Check the parts the report relies on; raise ``ValueError`` saying what is wrong
    (:class:`UnsupportedBundle` for another schema version)."""
    version = bundle.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UnsupportedBundle(f"results bundle schema_version {version!r} is not supported "
                                f"(expected {SCHEMA_VERSION})")
    missing = [k for k in ("dataset", "class_names", "params", "params_hash", "test_labels", "models")
               if k not in bundle]
    if missing:
        raise ValueError(f"results bundle lacks {missing}")
    if not bundle["models"]:
        raise ValueError("results bundle holds no model")
    n_classes = len(bundle["class_names"])
    for name, m in bundle["models"].items():
        ev = m.get("evaluation") or {}
        if len(ev.get("per_class", ())) != n_classes or len(ev.get("confusion_matrix", ())) != n_classes:
            raise ValueError(f"results bundle: model {name!r} is not evaluated on the {n_classes} classes")
        if not m.get("runs"):
            raise ValueError(f"results bundle: model {name!r} has no run (one per seed and training fraction)")
        short = [f"seed {r['seed']} fraction {r['fraction']:g}" for r in m["runs"]
                 if len(r["predictions"]) != len(bundle["test_labels"])]
        if short:
            raise ValueError(f"results bundle: model {name!r}'s runs {short} do not predict every test image")
    return dict(bundle)


def load_bundle(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a bundle file."""
    return validate_bundle(read_json(path))


def model_names(bundle: Mapping[str, Any]) -> list[str]:
    """Models in report order: the run's roster (its params' baselines included), then any other by name."""
    names, known = bundle["models"], [m.name for m in roster(bundle.get("params"))]
    return [m for m in known if m in names] + sorted(set(names) - set(known))

"""The ablations: their definitions (:data:`ABLATIONS`, the one place the grids are spelled), the
DVC experiments that run them, and their collection from MLflow into the bundles the report reads.

Queue (``python -m pipeline.ablations queue [names]``): one ``dvc exp run --queue -n abl-<variant> -S key=value
evaluate`` per variant of each grid (:func:`queue_commands`); the reference value (that of params.yaml) is the
baseline itself.

Collect (``python -m pipeline.ablations collect``, then ``dvc repro report``):

1. the evaluate runs of the dataset's MLflow experiment that carry ``results_bundle.json``;
2. for each params hash, the newest one;
3. those differing from the reference bundle (the working tree's ``reports/bundle.json``) in the
   keys of exactly one ablation of :data:`ABLATIONS`;
4. written to ``reports/ablations/<label>.json`` (label: the DVC experiment name, else the params
   hash prefix), each file atomically, with the reference itself as ``reference.json``
   (:data:`REFERENCE_LABEL`, which no run's label takes); other ``*.json`` there are stale and removed.

The ablation tables compare the runs with that ``reference.json`` (a folder without one, collected
before it was written: with the report's own bundle), so a set of ablations keeps its reference when
the default params, and the main run, move on; the report says when they differ. The folder is
git-tracked: commit it with the reports so that ``--rev`` finds the same ablations and reference.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdkd.config import NO_VARIETY, flatten, is_result_param
from hdkd.evidence.bundle import UnsupportedBundle, validate_bundle
from hdkd.infra.io import write_json
from hdkd.infra.mlflow_runs import find_runs
from hdkd.infra.mlflow_store import TAG
from hdkd.report.revisions import tracked_bundle
from hdkd.roster import MODEL_NAMES

EVALUATE_STAGE = "evaluate"
UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
EXPERIMENT_PREFIX = "abl-"
REFERENCE_LABEL = "reference"  # <ablations dir>/reference.json: the bundle the ablation runs were grouped against

@dataclass(frozen=True)
class Ablation:
    name: str
    title: str
    keys: tuple[str, ...]  # dotted params keys; a run belongs here if it differs in a subset of them
    headers: tuple[str, ...]  # one column header per key
    models: tuple[str, ...] | None  # models the ablation changes (the paper's: MODEL_NAMES, built from params.yaml's
    #                                 model section; the baselines are not); None = all
    grid: tuple[Mapping[str, Any], ...]  # the queued variants: {key: value} each, for a subset of keys
    show_macs: bool = False


# Small grids for the embedded default; edit for real data.
ABLATIONS = (
    Ablation("lambda", "feature distillation weight λ", ("distill.lambda",), ("λ",), ("hdkd",),
             grid=({"distill.lambda": 0}, {"distill.lambda": 1})),
    Ablation("alpha_tau", "logit distillation α and τ", ("distill.alpha", "distill.tau"), ("α", "τ"), ("hdkd",),
             grid=({"distill.alpha": 0.1}, {"distill.alpha": 0.9}, {"distill.tau": 2}, {"distill.tau": 4})),
    Ablation("stages", "distilled feature stages", ("distill.stages",), ("Stages",), ("hdkd",),
             grid=({"distill.stages": [3]}, {"distill.stages": [2, 3]}, {"distill.stages": [1]})),
    Ablation("block", "MBCSA vs MBConv blocks", ("model.block",), ("Block",), MODEL_NAMES,
             grid=({"model.block": "mbconv"},), show_macs=True),
    Ablation("stem_stride", "stem stride", ("model.stem_stride",), ("Stem stride",), MODEL_NAMES,
             grid=({"model.stem_stride": 4},), show_macs=True),
)
AblationGroups = Mapping[str, Sequence[Mapping[str, Any]]]  # ablation name -> its runs


def split_reference(files: Mapping[str, Mapping[str, Any]]) -> tuple[Mapping[str, Any] | None, list[Mapping[str, Any]]]:
    """An ablations folder's bundles by file stem -> (its reference bundle or ``None``, the ablation runs by stem)."""
    return files.get(REFERENCE_LABEL), [b for stem, b in sorted(files.items()) if stem != REFERENCE_LABEL]


class NoTrackedRuns(LookupError):
    """MLflow holds no evaluate run to collect from (a wrong URI or experiment name, most likely)."""


class UnknownAblation(ValueError):
    """An ablation name that :data:`ABLATIONS` does not define."""


# ------------------------------------------------------------------------------------------ queue
def _set_value(value: Any) -> str:
    """A value as ``dvc exp run -S`` parses it (YAML): lists in flow style, numbers as written."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def variant_name(settings: Mapping[str, Any]) -> str:
    """``abl-`` and each key's last part with its value (``abl-stem-stride-4``, ``abl-stages-2-3``)."""
    parts = []
    for key, value in settings.items():
        values = value if isinstance(value, list) else [value]
        parts += [key.rsplit(".", 1)[-1].replace("_", "-"), *map(str, values)]
    return EXPERIMENT_PREFIX + "-".join(parts)


def queue_commands(names: Sequence[str] = ()) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of every variant of the named ablations (all when none),
    in :data:`ABLATIONS` order. An unknown name fails before anything is queued.

    A variant runs the pipeline up to ``evaluate``, whose results bundle is all the ablation tables
    read: a variant's explanations, ONNX exports and report would cost about 80 s each on the
    embedded default and add nothing to them."""
    known = [a.name for a in ABLATIONS]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownAblation(f"unknown ablation(s) {', '.join(unknown)} (one of: {', '.join(known)})")
    return [["dvc", "exp", "run", "--queue", "-n", variant_name(settings),
             *(arg for key, value in settings.items() for arg in ("-S", f"{key}={_set_value(value)}")), EVALUATE_STAGE]
            for a in ABLATIONS if not names or a.name in names for settings in a.grid]


# ------------------------------------------------------------------------------------- grouping
def run_label(bundle: Mapping[str, Any]) -> str:
    """How to name a run on the command line: its DVC experiment, else its commit, else its params hash."""
    return bundle.get("dvc_exp_name") or (bundle.get("git_commit") or "")[:12] or bundle["params_hash"]


def differing_params(reference: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """Dotted params keys whose values differ, ignoring :data:`hdkd.config.NON_RESULT_PARAMS`."""
    a, b = flatten(reference["params"]), flatten(other["params"])
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and is_result_param(k)]


def data_differences(bundle: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """What two bundles' data differ in: the data set evaluated, the params' data keys that can change a result,
    the classes, the test split's labels (another folder or split). Empty: the same data settings, so one's
    ablations may stand in the other's report."""
    diff = ["dataset"] if bundle["dataset"] != other["dataset"] else []
    # The keys both bundles' params hold (a key of another schema, renamed or moved since, says nothing of the
    # data; the classes and test labels below hold the data's identity); a bundle older than the synthetic
    # data's variety keys had none: their neutral values.
    neutral = {f"data.synthetic.{k}": v for k, v in NO_VARIETY.items()}
    a, b = ({**neutral, **flatten(x["params"])} for x in (bundle, other))
    diff += [k for k in sorted(set(a) & set(b)) if k.startswith("data.") and is_result_param(k) and a[k] != b[k]]
    diff += ["classes"] if list(bundle["class_names"]) != list(other["class_names"]) else []
    return diff + (["test split"] if list(bundle["test_labels"]) != list(other["test_labels"]) else [])


def group_ablations(
    reference: Mapping[str, Any], others: Iterable[Mapping[str, Any]]
) -> tuple[dict[str, list[Mapping[str, Any]]], list[tuple[Mapping[str, Any], list[str]]]]:
    """Runs per ablation name (a run differing in a non-empty subset of its keys), and the unused runs
    with their differing keys. Runs with one params hash count once (the first in sorted order)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    unused, seen = [], {reference["params_hash"]}
    for run in sorted(others, key=lambda b: (b["params_hash"], run_label(b))):
        diff = differing_params(reference, run)
        ablation = next((a for a in ABLATIONS if diff and set(diff) <= set(a.keys)), None)
        if ablation is None or run["params_hash"] in seen:
            unused.append((run, diff))
            continue
        seen.add(run["params_hash"])
        groups.setdefault(ablation.name, []).append(run)
    return groups, unused


# ------------------------------------------------------------------------------------ collection
@dataclass
class Collected:
    """What :func:`collect_ablations` did: files written and removed, and the runs left out with why."""

    written: dict[Path, Mapping[str, Any]] = field(default_factory=dict)
    removed: list[Path] = field(default_factory=list)
    skipped: list[tuple[Mapping[str, Any], str]] = field(default_factory=list)


def newest_bundle_per_params(
    tracking_uri: str, experiment: str
) -> tuple[list[dict[str, Any]], list[tuple[Mapping[str, Any], str]]]:
    """The newest results bundle of each params hash among the evaluate runs of ``experiment``, and the
    runs left out with why: those whose newest bundle an older pipeline wrote (another schema version;
    a store kept across upgrades holds them, and they cannot be compared with this pipeline's runs)."""
    runs = find_runs(tracking_uri, f"tags.`{TAG}stage` = '{EVALUATE_STAGE}'", [experiment])
    newest: dict[str, dict[str, Any]] = {}
    old: list[tuple[Mapping[str, Any], str]] = []
    decided: set[str] = set()  # params hashes whose newest bundle was read (this pipeline's or an older one's)
    for run in runs:  # newest first
        params_hash = run.tags.get(f"{TAG}params_hash")
        if params_hash in decided:
            continue
        try:
            bundle = tracked_bundle(tracking_uri, run.run_id)
        except UnsupportedBundle as e:
            old.append(({"params_hash": params_hash, "dvc_exp_name": run.tags.get(f"{TAG}dvc_exp_name")},
                        f"MLflow run {run.run_id}: {e}"))
            decided.add(params_hash)
            continue
        if bundle is not None:  # an evaluate run that failed before logging: an older run may have one
            newest[params_hash] = bundle
            decided.add(params_hash)
    return list(newest.values()), old


def select_ablations(
    reference: Mapping[str, Any], bundles: Iterable[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[tuple[Mapping[str, Any], str]]]:
    """The bundles that differ from ``reference`` in one ablation's keys (in :data:`ABLATIONS` order),
    and the others with the reason they are left out."""
    groups, unused = group_ablations(reference, bundles)
    chosen = [b for a in ABLATIONS for b in groups.get(a.name, [])]
    skipped = []
    for bundle, diff in unused:
        if bundle["params_hash"] == reference["params_hash"] or not diff:
            reason = "same results params as the reference"
        else:
            reason = f"differs in {', '.join(diff)}: not one ablation"
        skipped.append((bundle, reason))
    return chosen, skipped


def ablation_labels(bundles: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """File label -> bundle: the DVC experiment name (file-name safe), else the params hash prefix;
    an experiment name used twice (experiments of different baselines), or named :data:`REFERENCE_LABEL`,
    gets the hash appended."""
    bundles = list(bundles)
    names = [UNSAFE_FILE_CHARS.sub("-", b.get("dvc_exp_name") or "").strip("-.") for b in bundles]
    labels = {}
    for name, bundle in zip(names, bundles):
        short_hash = bundle["params_hash"][:12]
        if not name:
            labels[short_hash] = bundle
        elif names.count(name) > 1 or name == REFERENCE_LABEL:
            labels[f"{name}-{short_hash}"] = bundle
        else:
            labels[name] = bundle
    return labels


def write_ablations(bundles: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike,
                    reference: Mapping[str, Any]) -> Collected:
    """Write ``<label>.json`` per bundle and ``reference.json`` into ``out_dir`` (atomically each) and remove
    stale ``*.json``."""
    out = Path(out_dir)
    done = Collected(written={out / f"{label}.json": b for label, b in bundles.items()})
    reference_path = out / f"{REFERENCE_LABEL}.json"
    for path, bundle in (*done.written.items(), (reference_path, reference)):
        write_json(path, bundle)
    for path in sorted(out.glob("*.json")):
        if path not in done.written and path != reference_path:
            path.unlink()
            done.removed.append(path)
    return done


def collect_ablations(
    reference: Mapping[str, Any], tracking_uri: str, experiment: str, out_dir: str | os.PathLike
) -> Collected:
    """Fill ``out_dir`` with the ablation runs of ``reference`` found in MLflow (see module doc).

    No evaluate run at all is an error that leaves ``out_dir`` as it is: more likely a wrong store
    than a reason to delete every collected ablation."""
    tracked, old = newest_bundle_per_params(tracking_uri, experiment)
    if not tracked:
        older = f" (only {len(old)} of an older pipeline's bundle schema)" if old else ""
        raise NoTrackedRuns(f"no evaluate run with a results bundle in MLflow experiment {experiment!r} at "
                            f"{tracking_uri}{older}: nothing collected, {out_dir} left as it is")
    reference = validate_bundle(reference)
    chosen, skipped = select_ablations(reference, tracked)
    done = write_ablations(ablation_labels(chosen), out_dir, reference)
    done.skipped = skipped + old
    return done


def summary(done: Collected, reference: Mapping[str, Any]) -> str:
    """Human-readable account of a collection, one line per file and per run left out."""
    lines = [f"{len(done.written)} ablation run(s) of reference {reference['params_hash']} (written as "
             f"{REFERENCE_LABEL}.json):"]
    lines += [f"  wrote   {p}  ({', '.join(differing_params(reference, b))})" for p, b in done.written.items()]
    lines += [f"  removed {p} (stale)" for p in done.removed]
    lines += [f"  skipped {b.get('dvc_exp_name') or b['params_hash']}: {why}" for b, why in done.skipped]
    return "\n".join(lines)

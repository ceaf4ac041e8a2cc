"""Collect ablation runs from MLflow: the results bundles that the report turns into ablation tables.

``python -m pipeline.report --collect-ablations`` (then ``dvc repro report``):

1. the evaluate runs of the dataset's MLflow experiment that carry ``results_bundle.json``;
2. for each params hash, the newest one;
3. those differing from the reference bundle (the working tree's ``reports/bundle.json``) in the
   keys of exactly one ablation of :data:`hdkd.report.ABLATIONS`;
4. written to ``reports/ablations/<label>.json`` (label: the DVC experiment name, else the params
   hash prefix), each file atomically; other ``*.json`` there are stale and removed.

The folder is git-tracked: commit it with the reports so that ``--rev`` finds the same ablations.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from hdkd.bundle import validate_bundle
from hdkd.io import write_json
from hdkd.regenerate import tracked_bundle
from hdkd.report import ABLATIONS, differing_params, group_ablations
from hdkd.tracking import TAG, find_runs

EVALUATE_STAGE = "evaluate"
UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class NoTrackedRuns(LookupError):
    """MLflow holds no evaluate run to collect from (a wrong URI or experiment name, most likely)."""


@dataclass
class Collected:
    """What :func:`collect_ablations` did: files written and removed, and the runs left out with why."""

    written: dict[Path, Mapping[str, Any]] = field(default_factory=dict)
    removed: list[Path] = field(default_factory=list)
    skipped: list[tuple[Mapping[str, Any], str]] = field(default_factory=list)


def newest_bundle_per_params(tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """The newest results bundle of each params hash among the evaluate runs of ``experiment``."""
    runs = find_runs(tracking_uri, f"tags.`{TAG}stage` = '{EVALUATE_STAGE}'", [experiment])
    newest: dict[str, dict[str, Any]] = {}
    for run in runs:  # newest first
        params_hash = run.tags.get(f"{TAG}params_hash")
        if params_hash in newest:
            continue
        bundle = tracked_bundle(tracking_uri, run.run_id)
        if bundle is not None:  # an evaluate run that failed before logging: an older run may have one
            newest[params_hash] = bundle
    return list(newest.values())


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
    an experiment name used twice (experiments of different baselines) gets the hash appended."""
    bundles = list(bundles)
    names = [UNSAFE_FILE_CHARS.sub("-", b.get("dvc_exp_name") or "").strip("-.") for b in bundles]
    labels = {}
    for name, bundle in zip(names, bundles):
        short_hash = bundle["params_hash"][:12]
        if not name:
            labels[short_hash] = bundle
        elif names.count(name) > 1:
            labels[f"{name}-{short_hash}"] = bundle
        else:
            labels[name] = bundle
    return labels


def write_ablations(bundles: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike) -> Collected:
    """Write ``<label>.json`` per bundle into ``out_dir`` (atomically each) and remove stale ``*.json``."""
    out = Path(out_dir)
    done = Collected(written={out / f"{label}.json": b for label, b in bundles.items()})
    for path, bundle in done.written.items():
        write_json(path, bundle)
    for path in sorted(out.glob("*.json")):
        if path not in done.written:
            path.unlink()
            done.removed.append(path)
    return done


def collect_ablations(
    reference: Mapping[str, Any], tracking_uri: str, experiment: str, out_dir: str | os.PathLike
) -> Collected:
    """Fill ``out_dir`` with the ablation runs of ``reference`` found in MLflow (see module doc).

    No evaluate run at all is an error that leaves ``out_dir`` as it is: more likely a wrong store
    than a reason to delete every collected ablation."""
    tracked = newest_bundle_per_params(tracking_uri, experiment)
    if not tracked:
        raise NoTrackedRuns(f"no evaluate run with a results bundle in MLflow experiment {experiment!r} at "
                            f"{tracking_uri}: nothing collected, {out_dir} left as it is")
    chosen, skipped = select_ablations(validate_bundle(reference), tracked)
    done = write_ablations(ablation_labels(chosen), out_dir)
    done.skipped = skipped
    return done


def summary(done: Collected, reference: Mapping[str, Any]) -> str:
    """Human-readable account of a collection, one line per file and per run left out."""
    lines = [f"{len(done.written)} ablation run(s) of reference {reference['params_hash']}:"]
    lines += [f"  wrote   {p}  ({', '.join(differing_params(reference, b))})" for p, b in done.written.items()]
    lines += [f"  removed {p} (stale)" for p in done.removed]
    lines += [f"  skipped {b.get('dvc_exp_name') or b['params_hash']}: {why}" for b, why in done.skipped]
    return "\n".join(lines)

"""Evidence across seeds from a results bundle (:mod:`hdkd.evidence.bundle`): aggregates, the data-efficiency curve and
paired comparisons. Torch-free: the report stage builds its tables from these rows.

A bundle's ``models[<name>]["runs"]`` holds one entry per (seed, fraction) with its ``evaluation``
and per-image ``predictions``; ``bundle["test_labels"]`` holds the test labels in the same order.

**Did not learn** (one rule, :func:`did_not_learn`, for every table and sentence): a run whose test
predictions are at least :data:`ONE_CLASS_SHARE` one class, more than that class's share of the test
labels (so a model that learned a test set that lopsided is not flagged): it answers (nearly) always
the same, whatever its accuracy, and beating it, or losing to it, says nothing about a method. A model
at a training fraction did not learn when a majority of its seeds did not (:func:`not_learned`); the
verdict sentences give no verdict for a comparison with such a model. Computed from the per-run
predictions every schema-2 bundle holds, so older bundles are judged the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from hdkd.evidence.stats import (
    ALPHA,
    Comparison,
    holm,
    mcnemar_exact,
    mean_std,
    minimum_detectable_effect,
    paired_t,
    seeds_needed,
    verdict,
)

METRICS = ("accuracy", "f1_macro")  # the metrics aggregated and compared across seeds
FULL = 1.0  # the fraction of the main table
ONE_CLASS_SHARE = 0.95  # a run with at least this share of its test predictions on one class did not learn


def runs_at(bundle: Mapping[str, Any], model: str, fraction: float) -> dict[int, Mapping[str, Any]]:
    """``{seed: run}`` of ``model`` at ``fraction``."""
    return {int(r["seed"]): r for r in bundle["models"][model]["runs"] if float(r["fraction"]) == float(fraction)}


def fractions_of(bundle: Mapping[str, Any]) -> list[float]:
    return sorted({float(r["fraction"]) for m in bundle["models"].values() for r in m["runs"]})


def seeds_of(bundle: Mapping[str, Any]) -> list[int]:
    return sorted({int(r["seed"]) for m in bundle["models"].values() for r in m["runs"]})


def did_not_learn(run: Mapping[str, Any], test_labels: Sequence[int]) -> bool:
    """Whether one run's test predictions sit on one class (the module's rule)."""
    predictions, labels = np.asarray(run["predictions"]), np.asarray(test_labels)
    top = np.bincount(predictions).argmax()
    share = float(np.mean(predictions == top))
    return share >= ONE_CLASS_SHARE and share > float(np.mean(labels == top))


def seeds_not_learned(bundle: Mapping[str, Any], model: str, fraction: float = FULL) -> tuple[int, int]:
    """How many of ``model``'s seeds at ``fraction`` did not learn, and of how many."""
    runs = runs_at(bundle, model, fraction)
    return sum(did_not_learn(r, bundle["test_labels"]) for r in runs.values()), len(runs)


def not_learned(bundle: Mapping[str, Any], model: str, fraction: float = FULL) -> bool:
    """Whether ``model`` at ``fraction`` did not learn: a majority of its seeds did not."""
    failed, seeds = seeds_not_learned(bundle, model, fraction)
    return 2 * failed > seeds


def aggregate(bundle: Mapping[str, Any], model: str, fraction: float = FULL,
              metrics: Iterable[str] = METRICS) -> dict[str, Any]:
    """``<metric>_mean``, ``<metric>_std`` (sample std; ``None`` for one seed) and ``n_seeds``."""
    runs = runs_at(bundle, model, fraction)
    if not runs:
        raise ValueError(f"results bundle: model {model!r} has no run at training fraction {fraction:g}")
    out: dict[str, Any] = {}
    for metric in metrics:
        out[f"{metric}_mean"], out[f"{metric}_std"] = mean_std([runs[s]["evaluation"][metric] for s in sorted(runs)])
    out["n_seeds"] = len(runs)
    return out


def data_efficiency_rows(bundle: Mapping[str, Any], models: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (fraction, model): the columns of ``reports/tables/data_efficiency.csv``."""
    rows = []
    for fraction in fractions_of(bundle):
        for model in models:
            if runs_at(bundle, model, fraction):
                failed, _ = seeds_not_learned(bundle, model, fraction)
                rows.append({"fraction": fraction, "model": model, **aggregate(bundle, model, fraction),
                             "seeds_did_not_learn": failed, "did_not_learn": not_learned(bundle, model, fraction)})
    return rows


def compare(bundle: Mapping[str, Any], a: str, b: str, fraction: float, level: float = 0.95) -> list[dict[str, Any]]:
    """A − B at one fraction, paired by seed: a paired t row per metric, an exact McNemar row per seed.

    Only the seeds both models ran are paired; a comparison without a common seed is an error. Every row
    names the models of the pair that did not learn at that fraction (:func:`not_learned`).
    """
    runs_a, runs_b = runs_at(bundle, a, fraction), runs_at(bundle, b, fraction)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise ValueError(f"comparison {a} vs {b}: no seed in common at training fraction {fraction:g}")
    labels = np.asarray(bundle["test_labels"])
    base = {"comparison": f"{a} vs {b}", "fraction": fraction, "n_seeds": len(seeds),
            "did_not_learn": [m for m in (a, b) if not_learned(bundle, m, fraction)]}
    rows = [{**base, "metric": metric, **paired_by_seed(runs_a, runs_b, metric, level).as_dict()} for metric in METRICS]
    for s in seeds:
        correct_a = np.asarray(runs_a[s]["predictions"]) == labels
        correct_b = np.asarray(runs_b[s]["predictions"]) == labels
        c: Comparison = mcnemar_exact(correct_a, correct_b, level, label=f"mcnemar_exact_seed{s}")
        rows.append({**base, "metric": "accuracy", **c.as_dict()})
    return rows


def paired_by_seed(runs_a: Mapping[int, Mapping[str, Any]], runs_b: Mapping[int, Mapping[str, Any]], metric: str,
                   level: float = 0.95) -> Comparison:
    """A − B on ``metric`` by the paired t over the seeds both ``{seed: run}`` hold (at least one)."""
    seeds = sorted(set(runs_a) & set(runs_b))
    return paired_t([runs_a[s]["evaluation"][metric] for s in seeds], [runs_b[s]["evaluation"][metric] for s in seeds],
                    level)


def versus_reference(run: Mapping[str, Any], reference: Mapping[str, Any], model: str, metric: str = "accuracy",
                     level: float = 0.95) -> Comparison | None:
    """``model`` in another run's bundle − in the reference bundle, on the whole training split, paired by
    seed (an ablation's effect). ``None`` when the bundles share no seed or were tested on other images."""
    runs_a, runs_b = runs_at(run, model, FULL), runs_at(reference, model, FULL)
    if not set(runs_a) & set(runs_b) or run.get("test_labels") != reference.get("test_labels"):
        return None
    return paired_by_seed(runs_a, runs_b, metric, level)


PRIMARY, EXPLORATORY = "primary", "exploratory"  # the families of significance_rows
GAIN_TEST = "paired_t_of_differences"  # a claim on a difference of paired differences across fractions


def claim_row(bundle: Mapping[str, Any], claim: Mapping[str, Any], level: float = 0.95) -> dict[str, Any]:
    """The paired test of one pre-registered claim (``report.claims``' entry: ``claim``, ``compare`` [A, B],
    ``fraction``, ``minus_fraction``, ``metric``): A − B at ``fraction``, paired by seed (test ``paired_t``); with
    ``minus_fraction`` g, (A − B at ``fraction``) − (A − B at g), the seed's two paired differences paired by
    seed (test :data:`GAIN_TEST`). Only the seeds every run involved holds are paired; none is an error."""
    a, b = claim["compare"]
    fractions = [float(claim["fraction"])] + ([float(g)] if (g := claim.get("minus_fraction")) is not None else [])
    runs = {(m, f): runs_at(bundle, m, f) for m in (a, b) for f in fractions}
    missing = [f"{m} at {f:g}" for (m, f), r in runs.items() if not r]
    if missing:
        raise ValueError(f"claim {claim['claim']!r}: no run of {', '.join(missing)} in the results bundle")
    seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
    if not seeds:
        raise ValueError(f"claim {claim['claim']!r}: no seed in common to {a} and {b} at {fractions}")
    metric = claim["metric"]

    def gains(f: float) -> list[float]:
        return [runs[a, f][s]["evaluation"][metric] - runs[b, f][s]["evaluation"][metric] for s in seeds]

    if len(fractions) == 1:
        result = paired_by_seed(runs[a, fractions[0]], runs[b, fractions[0]], metric, level)
        differences = gains(fractions[0])
    else:
        gain, other = gains(fractions[0]), gains(fractions[1])
        result = paired_t(gain, other, level)
        result = Comparison(result.difference_mean, result.ci_low, result.ci_high, result.p_value, GAIN_TEST,
                            result.effect_size)
        differences = [x - y for x, y in zip(gain, other)]
    return {"family": PRIMARY, "claim": claim["claim"], "comparison": f"{a} vs {b}", "fraction": fractions[0],
            "minus_fraction": fractions[1] if len(fractions) > 1 else None, "metric": metric, "n_seeds": len(seeds),
            "did_not_learn": [m for m in (a, b) if any(not_learned(bundle, m, f) for f in fractions)],
            "difference_sd": mean_std(differences)[1], **result.as_dict()}


SUPPORTED, NOT_SUPPORTED, CONTRADICTED, NO_VERDICT = "supported", "not supported", "contradicted", "no verdict"


def claim_verdict(row: Mapping[str, Any], alpha: float = ALPHA) -> str:
    """A claim's verdict from its row of :func:`significance_rows` (the claim: A − B > 0): ``supported`` when the
    Holm-adjusted p is below ``alpha`` and the difference positive, ``contradicted`` when below and negative,
    ``not supported`` otherwise (no test included); ``no verdict`` when a model of the pair did not learn."""
    if row["did_not_learn"]:
        return NO_VERDICT
    p = row["p_value_holm"]
    if p is None or p >= alpha:
        return NOT_SUPPORTED
    return SUPPORTED if row["difference_mean"] > 0 else CONTRADICTED


def claims_power(rows: Sequence[Mapping[str, Any]], difference: float = 0.015, power: float = 0.8,
                 alpha: float = ALPHA) -> list[dict[str, Any]]:
    """For each primary row of :func:`significance_rows`, from the sample std of its per-seed differences: the
    seeds needed to detect a true ``difference`` (in the metric's units: 0.015 = 1.5 points) at ``power``, and
    the smallest difference detectable at ``power`` with the seeds used (``mde``); both at α/m, m the family's
    tests (Holm's strictest step: a conservative count, enough for every claim)."""
    primary = [r for r in rows if r["family"] == PRIMARY]
    level = alpha / max(sum(r["p_value"] is not None for r in primary), 1)
    return [{"seeds_needed": seeds_needed(difference, r["difference_sd"], level, power),
             "mde": minimum_detectable_effect(r["difference_sd"], r["n_seeds"], level, power), "alpha": level}
            for r in primary]


def significance_rows(bundle: Mapping[str, Any], comparisons: Sequence[Sequence[str]],
                      claims: Sequence[Mapping[str, Any]] = (), level: float = 0.95) -> list[dict[str, Any]]:
    """The rows of ``significance.csv``: the pre-registered ``claims`` (``report.claims``; family ``primary``),
    then every named comparison at every fraction both models ran (family ``exploratory``; a paired t row that
    tests exactly what a claim tests is left out: the claim's row is that test).

    Holm adjusts within each family: the claims' tests are one family, the exploratory paired t rows another;
    each row gets its ``p_value_holm`` (:func:`hdkd.evidence.stats.holm`); the McNemar rows (per-seed detail,
    exploratory) get ``None``."""
    rows = [{**claim_row(bundle, claim, level), "family": PRIMARY} for claim in claims]
    claimed = {(r["comparison"], r["fraction"], r["metric"]) for r in rows if r["minus_fraction"] is None}
    for a, b in comparisons:
        for model in (a, b):
            if model not in bundle["models"]:
                raise ValueError(f"comparison {a} vs {b}: model {model!r} is not in the results bundle")
        for fraction in fractions_of(bundle):
            if runs_at(bundle, a, fraction) and runs_at(bundle, b, fraction):
                rows.extend({"family": EXPLORATORY, "claim": None, "minus_fraction": None, **r}
                            for r in compare(bundle, a, b, fraction, level)
                            if r["test"] != "paired_t" or (r["comparison"], fraction, r["metric"]) not in claimed)
    adjusted: dict[int, float | None] = {}
    for family in (PRIMARY, EXPLORATORY):
        members = [i for i, r in enumerate(rows) if r["family"] == family and r["test"] in ("paired_t", GAIN_TEST)]
        adjusted |= dict(zip(members, holm([rows[i]["p_value"] for i in members])))
    return [{**r, "p_value_holm": adjusted.get(i)} for i, r in enumerate(rows)]


def paired_sentences(rows: Iterable[Mapping[str, Any]], a: str, b: str, labels: tuple[str, str],
                     metrics: Iterable[str] = METRICS) -> list[str]:
    """One plain sentence per metric: A − B on the whole training split, from the paired t rows of
    :func:`significance_rows` (:func:`sentence`); none when the table does not compare A with B."""
    names = dict(zip((a, b), labels))
    return [sentence(r, *labels, [names[m] for m in r["did_not_learn"]]) for r in rows
            if r["comparison"] == f"{a} vs {b}" and r["fraction"] == FULL and r["test"] == "paired_t"
            and r["metric"] in metrics]


def sentence(row: Mapping[str, Any], label_a: str, label_b: str, not_learned_labels: Sequence[str] = (),
             alpha: float = ALPHA) -> str:
    """One plain sentence for a paired-t row of :func:`significance_rows`: the difference in points, its CI,
    p and Holm-adjusted p, and the verdict (on the adjusted p); no verdict when a model did not learn
    (``not_learned_labels``: their labels)."""
    def points(x: float) -> str:
        return f"{100 * x:+.1f}"

    metric = {"accuracy": "accuracy", "f1_macro": "macro-F1"}[row["metric"]]
    head = f"{label_a} vs {label_b}: {points(row['difference_mean'])} points {metric}"
    if not_learned_labels:
        who = " and ".join(not_learned_labels)
        return (f"{head}; no verdict: {who} did not learn (at most of the {row['n_seeds']} seeds, at least "
                f"{100 * ONE_CLASS_SHARE:g} % of the test predictions are one class).")
    comparison = Comparison(*(row[k] for k in ("difference_mean", "ci_low", "ci_high", "p_value_holm", "test")))
    if comparison.untested:
        return f"{head}; no test ({comparison.untested})."
    ci = f"[{points(row['ci_low'])}, {points(row['ci_high'])}]"
    said = verdict(comparison, alpha)
    return (f"{head} {ci}, p = {row['p_value']:.3g} (Holm-adjusted {row['p_value_holm']:.3g}): {said} at {alpha:g} "
            f"(paired t over {row['n_seeds']} seeds).")

"""The report's tables and their formatting: every table of ``reports/tables/`` (markdown and CSV, byte-
deterministic: fixed decimals, orders fixed by the bundles' content, ``\\n`` endings, no timestamps) and the
verdict sentences; built from results bundles alone (:mod:`hdkd.evidence`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hdkd.config import flatten
from hdkd.evidence.aggregate import (
    EXPLORATORY,
    FULL,
    GAIN_TEST,
    NO_VERDICT,
    ONE_CLASS_SHARE,
    PRIMARY,
    aggregate,
    claim_verdict,
    claims_power,
    data_efficiency_rows,
    not_learned,
    paired_sentences,
    seeds_not_learned,
    versus_reference,
)
from hdkd.evidence.bundle import model_names
from hdkd.evidence.plots import model_label
from hdkd.evidence.stats import ALPHA, Comparison, holm
from hdkd.infra.io import csv_text
from hdkd.report.ablations import Ablation
from hdkd.report.diagnostics import diagnostics_rows
from hdkd.roster import primary_run, roster

NA = "n/a"


def models_note(bundle: Mapping[str, Any]) -> str:
    """One phrase per model of the bundle: what it is."""
    models = [m for m in roster(bundle["params"]) if m.name in bundle["models"]]
    return "; ".join(f"{m.label}: {m.description}" for m in models) + "."



@dataclass(frozen=True)
class Table:
    name: str  # file stem under tables/
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""  # Markdown only


# ------------------------------------------------------------------------------------ formatting
def pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.2f}"


def pct_interval(interval: Sequence[float] | None) -> str:
    return NA if interval is None else f"[{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def pct_spread(mean: float, std: float | None) -> str:
    """``75.12 ± 1.03`` (percent); the mean alone when the spread is undefined (one seed)."""
    return pct(mean) if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def points_difference(c: Comparison | None, p_holm: float | None) -> str:
    """``+1.25 [-0.50, +3.00], p = 0.12 (Holm 0.36)`` (percentage points; ``p_holm``: the Holm-adjusted p);
    why there is no test when there is none."""
    if c is None:
        return NA
    def points(x: float) -> str:
        return f"{round(100 * x, 2) + 0.0:+.2f}"  # + 0.0: a difference that rounds to zero prints +0.00, not -0.00

    head = points(c.difference_mean)
    if c.untested:
        return f"{head} (no test: {c.untested})"
    return f"{head} [{points(c.ci_low)}, {points(c.ci_high)}], p = {c.p_value:.3g} (Holm {p_holm:.3g})"


def learned(bundle: Mapping[str, Any], model: str, fraction: float = FULL) -> str:
    """``yes``, ``yes (1 of 3 seeds did not)``, or ``no (2 of 3 seeds)`` when the model did not learn
    (:func:`hdkd.evidence.aggregate.not_learned`)."""
    failed, seeds = seeds_not_learned(bundle, model, fraction)
    if not failed:
        return "yes"
    if not_learned(bundle, model, fraction):
        return f"no ({failed} of {seeds} seeds)"
    return f"yes ({failed} of {seeds} seeds did not)"


NOT_LEARNED_NOTE = (f"Did not learn: at least {100 * ONE_CLASS_SHARE:g} % of a run's test predictions are one class "
                    "(more than that class's share of the test labels); a model did not learn at a training fraction "
                    "when most of its seeds did not, and gets no verdict.")


def fixed(x: float | None, digits: int) -> str:
    return NA if x is None else f"{x:.{digits}f}"


def param_value(v: Any) -> str:
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (list, tuple)):
        return ", ".join(param_value(x) for x in v)
    return str(v)


def table_markdown(table: Table) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = [":---"] + ["---:"] * (len(table.columns) - 1)
    lines = [f"## {table.title}", "", line(table.columns), line(align), *map(line, table.rows)]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def table_csv(table: Table) -> str:
    return csv_text([table.columns, *table.rows])


# ---------------------------------------------------------------------------------------- tables
def _first_ci(bundle: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The bootstrap settings (one per run: every model is evaluated with the same config)."""
    return next((c for m in model_names(bundle) if (c := bundle["models"][m]["evaluation"].get("ci"))), None)


def _ci_label(bundle: Mapping[str, Any]) -> str:
    ci = _first_ci(bundle)
    return "CI" if ci is None else f"{100 * ci['level']:g}% CI"


def _ci_note(bundle: Mapping[str, Any]) -> str:
    ci = _first_ci(bundle)
    if ci is None:
        return "No bootstrap confidence intervals (evaluate.bootstrap = 0)."
    return f"CI: {ci['method']} bootstrap over test images, {ci['resamples']} resamples, seed {ci['seed']}."


def _interval(ev: Mapping[str, Any], key: str) -> Sequence[float] | None:
    return ev["ci"][key] if ev.get("ci") else None


def _efficiency(bundle: Mapping[str, Any], model: str) -> Mapping[str, Any]:
    return bundle["models"][model].get("efficiency") or {}


def _params_m(eff: Mapping[str, Any]) -> str:
    return fixed(eff["params"]["total"] / 1e6, 3) if eff else NA


def _macs_m(eff: Mapping[str, Any]) -> str:
    return fixed(eff["macs"] / 1e6, 1) if eff else NA


def main_table(bundle: Mapping[str, Any]) -> Table:
    ci = _ci_label(bundle)
    seed, _ = primary_run(bundle["params"])
    columns = ("Model", "Params (M)", "MACs (M)", "Accuracy (%)", f"Accuracy {ci}", "Precision (%)", "Recall (%)",
               "F1 (%)", f"F1 {ci}", "Accuracy mean ± std (%)", "F1 mean ± std (%)", "Seeds", "Learned")
    rows = []
    for m in model_names(bundle):
        ev, eff, agg = bundle["models"][m]["evaluation"], _efficiency(bundle, m), aggregate(bundle, m)
        rows.append((model_label(m, roster(bundle["params"])), _params_m(eff), _macs_m(eff), pct(ev["accuracy"]),
                     pct_interval(_interval(ev, "accuracy")), pct(ev["precision_macro"]), pct(ev["recall_macro"]),
                     pct(ev["f1_macro"]), pct_interval(_interval(ev, "f1_macro")),
                     pct_spread(agg["accuracy_mean"], agg["accuracy_std"]),
                     pct_spread(agg["f1_macro_mean"], agg["f1_macro_std"]), str(agg["n_seeds"]), learned(bundle, m)))
    n = len(bundle["class_names"])
    note = (f"Test split of {bundle['dataset']}, every model trained on the whole training split. Accuracy to F1 "
            f"CI: seed {seed}'s run; mean ± std: mean and sample standard deviation over the training seeds. "
            f"Precision, recall and F1 are macro averages over all {n} classes; MACs for one image. "
            f"{_ci_note(bundle)} {NOT_LEARNED_NOTE} {models_note(bundle)}")
    return Table("main", "Main comparison", columns, tuple(rows), note)


def data_efficiency_table(bundle: Mapping[str, Any]) -> Table:
    """Every model at every training fraction, over the seeds (the columns: ``data_efficiency.csv``'s contract)."""
    columns = ("fraction", "model", "accuracy_mean", "accuracy_std", "f1_macro_mean", "f1_macro_std", "n_seeds",
               "seeds_did_not_learn", "did_not_learn")
    rows = tuple((format(r["fraction"], "g"), r["model"], fixed(r["accuracy_mean"], 4), fixed(r["accuracy_std"], 4),
                  fixed(r["f1_macro_mean"], 4), fixed(r["f1_macro_std"], 4), str(r["n_seeds"]),
                  str(r["seeds_did_not_learn"]), "yes" if r["did_not_learn"] else "no")
                 for r in data_efficiency_rows(bundle, model_names(bundle)))
    note = ("Test accuracy and macro-F1 (fractions of 1) by share of the training split, mean and sample standard "
            "deviation over the seeds (n/a: one seed). The subsets are stratified by class, keep lesion groups "
            "whole, and are nested (each inside the next larger); every model of a seed trains on the same one. "
            f"Validation and test sets never shrink. {BUDGET_NOTES[bundle['params']['train'].get('budget', 'epochs')]} "
            f"{NOT_LEARNED_NOTE}")
    return Table("data_efficiency", "Data efficiency", columns, rows, note)


BUDGET_NOTES = {  # which training budget made the curve (bundles older than train.budget: epochs)
    "steps": "Every fraction trained for the optimizer steps of the full-data run (train.budget: steps): a smaller "
             "share takes more passes over its data, validated as often (once per epoch of the schedule), so the "
             "curve varies the data, not the training.",
    "epochs": "Every fraction trained for the recipe's epochs over its own share (train.budget: epochs): a smaller "
              "share also took fewer optimizer steps, so the curve mixes less data with less training.",
}


def diagnostics_table(bundle: Mapping[str, Any]) -> Table | None:
    """Per model and fraction, from the runs' histories: epochs, epochs spent on one class, trunk-gradient ratio."""
    rows = diagnostics_rows(bundle)
    if not rows:
        return None
    run = roster(bundle["params"])
    columns = ("Model", "Fraction (%)", "Seeds", "Epochs", "Epochs on one class",
               "Trunk gradient feature / CE, first epoch", "last epoch")
    cells = tuple((model_label(r["model"], run), f"{100 * r['fraction']:g}", str(r["seeds"]), fixed(r["epochs"], 1),
                   fixed(r["epochs_one_class"], 1), fixed(r["ratio_first"], 1), fixed(r["ratio_last"], 1))
                  for r in rows)
    note = (f"Means over the seeds. An epoch is on one class when at least {100 * ONE_CLASS_SHARE:g} % of its "
            "validation predictions are one class. The ratio is the summed gradient norms that the weighted "
            "feature-distillation terms send into the shared convolutional stages over the cross-entropy term's, "
            "measured on probe batches of each epoch (figures/hdkd_loss_terms.png).")
    return Table("training_diagnostics", "Training diagnostics", columns, cells, note)


def significance_table(rows: Sequence[Mapping[str, Any]]) -> Table | None:
    """A − B for each claim, and each comparison at each fraction, from
    :func:`hdkd.evidence.aggregate.significance_rows` (the columns: ``significance.csv``'s contract)."""
    if not rows:
        return None
    columns = ("family", "comparison", "fraction", "minus_fraction", "metric", "difference_mean", "ci_low", "ci_high",
               "effect_size", "p_value", "p_value_holm", "test", "did_not_learn")
    cells = tuple((r["family"], r["comparison"], format(r["fraction"], "g"),
                   NA if r["minus_fraction"] is None else format(r["minus_fraction"], "g"), r["metric"],
                   fixed(r["difference_mean"], 4), fixed(r["ci_low"], 4), fixed(r["ci_high"], 4),
                   fixed(r["effect_size"], 3), _p(r["p_value"]), _p(r["p_value_holm"]), r["test"],
                   ", ".join(r["did_not_learn"]) or "none") for r in rows)
    claims = "" if any(r["family"] == PRIMARY for r in rows) else "no claims were declared for this run: "
    note = (f"A − B on the same test images (fractions of 1), {_SIGNIFICANCE_METHOD} `family`: `primary` for the "
            "claims declared before the run (report.claims; tables/claims), `exploratory` for every other row; "
            f"{claims}{family_sizes(rows)}. `p_value_holm`: the paired t p-values Holm-adjusted within their "
            "family (statsmodels multipletests); the verdicts use the adjusted p. `minus_fraction`: a claim on a "
            f"difference of paired differences (test `{GAIN_TEST}`): (A − B at `fraction`) − (A − B at "
            "`minus_fraction`), paired by seed. `effect_size`: the mean paired difference over the sample standard "
            "deviation of the per-seed differences (n/a: one seed, or no spread). "
            f"`did_not_learn`: the models of the pair that did not learn at that fraction. {NOT_LEARNED_NOTE}")
    return Table("significance", "Paired comparisons", columns, cells, note)


def holm_tests(adjusted: Iterable[float | None]) -> str:
    """``3 paired t-tests``: the size of a Holm family, from its adjusted p-values."""
    n = sum(p is not None for p in adjusted)
    return f"{n} paired t-test{'' if n == 1 else 's'}"


def family_sizes(rows: Sequence[Mapping[str, Any]]) -> str:
    """``the primary family holds 9 paired t-tests, the exploratory one 40`` (each adjusted on its own); without
    claims, ``one family of 40 paired t-tests``."""
    sizes = {f: holm_tests(r["p_value_holm"] for r in rows if r["family"] == f) for f in (PRIMARY, EXPLORATORY)}
    if not any(r["family"] == PRIMARY for r in rows):
        return f"one family of {sizes[EXPLORATORY]}"
    return f"the primary family holds {sizes[PRIMARY]}, the exploratory one {sizes[EXPLORATORY]}"


CLAIM_DIFFERENCE = 0.015  # the difference the seed count is sized for: 1.5 points
CLAIM_POWER = 0.8


def claim_comparison(row: Mapping[str, Any], run: Sequence[Any]) -> str:
    """``HDKD − Student, accuracy, 10 % of the training data`` (a difference of differences: both fractions)."""
    a, _, b = row["comparison"].partition(" vs ")
    pair = f"{model_label(a, run)} − {model_label(b, run)}"
    metric = {"accuracy": "accuracy", "f1_macro": "macro-F1"}[row["metric"]]
    if row["minus_fraction"] is None:
        return f"{pair}, {metric}, {100 * row['fraction']:g} % of the training data"
    return (f"({pair} at {100 * row['fraction']:g} %) − ({pair} at {100 * row['minus_fraction']:g} %) of the training "
            f"data, {metric}, paired by seed")


def claims_table(bundle: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Table | None:
    """The pre-registered claims (the primary rows of :func:`hdkd.evidence.aggregate.significance_rows`): each
    one's comparison, paired difference, effect size, Holm-adjusted p and verdict, and the seeds it needs."""
    primary = [r for r in rows if r["family"] == PRIMARY]
    if not primary:
        return None
    run = roster(bundle["params"])
    power = claims_power(rows, CLAIM_DIFFERENCE, CLAIM_POWER)
    columns = ("Claim", "Comparison", "Paired difference [95 % CI] (points)", "Effect size", "Holm-adjusted p",
               "Verdict", "Seeds", f"Seeds for {100 * CLAIM_DIFFERENCE:g} points", "Detectable now (points)")
    cells = []
    for r, pw in zip(primary, power):
        said = claim_verdict(r)
        if said == NO_VERDICT:
            said += f" ({' and '.join(model_label(m, run) for m in r['did_not_learn'])} did not learn)"
        elif r["p_value_holm"] is None:
            untested = Comparison(r["difference_mean"], r["ci_low"], r["ci_high"], None, r["test"]).untested
            said += f" (no test: {untested})"
        cells.append((r["claim"], claim_comparison(r, run), _points_ci(r), fixed(r["effect_size"], 2),
                      _p(r["p_value_holm"]), said, str(r["n_seeds"]),
                      NA if pw["seeds_needed"] is None else str(pw["seeds_needed"]),
                      NA if pw["mde"] is None else f"{100 * pw['mde']:.1f}"))
    alpha = power[0]["alpha"]
    note = (f"Declared in the params before the run (report.claims); each claim is that the first model scores "
            f"higher. Paired by seed on the same test images: mean difference in percentage points with its 95 % "
            f"paired t-interval, effect size (mean over the standard deviation of the per-seed differences), p of the "
            f"two-sided paired t Holm-adjusted over the {holm_tests(r['p_value_holm'] for r in primary)} of this "
            f"family alone (every other comparison of the report is exploratory, adjusted apart). Supported: adjusted "
            f"p < {ALPHA:g} and the difference positive; contradicted: adjusted p < {ALPHA:g} and negative; not "
            "supported: otherwise; no verdict: a model did not learn. Seeds: those used; seeds for "
            f"{100 * CLAIM_DIFFERENCE:g} points: the seeds a paired t needs to detect a true difference of "
            f"{100 * CLAIM_DIFFERENCE:g} points with {100 * CLAIM_POWER:g} % power, from this run's standard "
            f"deviation of the per-seed differences, at α/m = {alpha:.3g} (Holm's strictest step, Bonferroni's "
            f"level: a conservative count); detectable now: the smallest true difference the seeds used detect with "
            f"{100 * CLAIM_POWER:g} % power at that level (noncentral t).")
    return Table("claims", "Claims", columns, tuple(cells), note)


def _points_ci(row: Mapping[str, Any]) -> str:
    def points(x: float) -> str:
        return f"{round(100 * x, 1) + 0.0:+.1f}"

    if row["ci_low"] is None:
        return f"{points(row['difference_mean'])} (one seed)"
    return f"{points(row['difference_mean'])} [{points(row['ci_low'])}, {points(row['ci_high'])}]"


def seeds_sentence(rows: Sequence[Mapping[str, Any]]) -> str:
    """The study's seeds against the claims: the most any claim needs for 1.5 points at 80 % power, and the range
    of the differences the seeds used detect; empty without claims."""
    primary = [r for r in rows if r["family"] == PRIMARY]
    power = claims_power(rows, CLAIM_DIFFERENCE, CLAIM_POWER)
    needed = [p["seeds_needed"] for p in power if p["seeds_needed"] is not None]
    mdes = [100 * p["mde"] for p in power if p["mde"] is not None]
    if not primary or not needed or not mdes:
        return ""
    seeds = max(r["n_seeds"] for r in primary)
    enough = max(needed) <= seeds
    low, high = f"{min(mdes):.1f}", f"{max(mdes):.1f}"
    detected = (f"is {low} points" if low == high
                else f"is {low} to {high} points (a claim's own: the table's last column)")
    return (f"Seeds: from this run's per-seed differences, detecting a {100 * CLAIM_DIFFERENCE:g}-point difference "
            f"with {100 * CLAIM_POWER:g} % power in every claim at α/m = {power[0]['alpha']:.3g} (conservative: "
            f"Holm's strictest step) needs {max(needed)} seeds; this run used {seeds}"
            + (", enough." if enough else
               f", so with them the smallest difference each claim detects at that power {detected}."))


def _p(p: float | None) -> str:
    return NA if p is None else f"{p:.4g}"


_SIGNIFICANCE_METHOD = (
    "paired by seed (seed s of both models shares the training subset and the seed's draws). `paired_t`: "
    "t-interval (95 %) and two-sided p-value over the per-seed differences (scipy.stats.ttest_rel), the "
    "verdict's test. `mcnemar_exact_seed<s>`: exact McNemar test on per-image correctness of seed s's pair "
    "(statsmodels), with the exact conditional interval of the accuracy difference; seeds are not pooled, "
    "since they share the test images and their counts are not independent; per-seed detail, not adjusted.")


def significance_sentences(bundle: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                           comparisons: Sequence[Sequence[str]]) -> list[str]:
    """One plain sentence per comparison: the accuracy difference on the whole training split, from the
    significance table's ``rows`` (so with its Holm adjustment)."""
    run = roster(bundle["params"])
    return [line for a, b in comparisons
            for line in paired_sentences(rows, a, b, (model_label(a, run), model_label(b, run)), ("accuracy",))]


def metrics_table(bundle: Mapping[str, Any]) -> Table:
    columns = ("Model", "Balanced accuracy (%)", "Weighted F1 (%)", "ROC-AUC (macro, OvR)", "ECE", "Test images")
    evaluations = [(m, bundle["models"][m]["evaluation"]) for m in model_names(bundle)]
    rows = tuple(
        (model_label(m, roster(bundle["params"])), pct(ev["balanced_accuracy"]), pct(ev["f1_weighted"]),
         fixed(ev["roc_auc_macro"], 4), fixed(ev["ece"], 4), str(ev["n"]))
        for m, ev in evaluations
    )
    note = (f"ECE: top-label, {evaluations[0][1]['ece_bins']} equal-width bins. ROC-AUC: one-vs-rest, averaged "
            "over the classes present in the test split.")
    return Table("metrics", "Additional metrics", columns, rows, note)


def per_class_table(bundle: Mapping[str, Any]) -> Table:
    names = model_names(bundle)
    per_class = {m: bundle["models"][m]["evaluation"]["per_class"] for m in names}
    supports = {tuple(c["support"] for c in per_class[m]) for m in names}
    if len(supports) != 1:
        raise ValueError("models of one bundle were evaluated on different test sets (per-class supports differ)")
    columns = ("Class", "Support") + tuple(
        f"{model_label(m, roster(bundle['params']))} {k} (%)" for m in names for k in ("P", "R", "F1"))
    rows = tuple(
        (cls, str(per_class[names[0]][k]["support"]))
        + tuple(pct(per_class[m][k][key]) for m in names for key in ("precision", "recall", "f1"))
        for k, cls in enumerate(bundle["class_names"])
    )
    return Table("per_class", "Per-class results", columns, rows, "P: precision, R: recall, on the test split.")


def efficiency_table(bundle: Mapping[str, Any], export: Mapping[str, Any] | None = None) -> Table | None:
    """Params, MACs and PyTorch timing from the bundle; with the export stage's ``export`` report, the
    exported networks' ONNX Runtime CPU latency beside PyTorch's."""
    names = [m for m in model_names(bundle) if _efficiency(bundle, m)]
    if not names:
        return None
    slots = sorted({(t["device"], t["batch_size"]) for m in names for t in _efficiency(bundle, m)["timing"]})
    exported = {m: {t["batch_size"]: t for t in e["timing_cpu"].values()}
                for m, e in (export or {}).get("models", {}).items()}
    onnx_slots = sorted({bs for timing in exported.values() for bs in timing})
    columns = ("Model", "Params", "Trainable params", "MACs (M)") + tuple(
        f"{dev.upper()} {unit} (bs {bs})" for dev, bs in slots for unit in ("ms/img", "img/s")) + tuple(
        f"ONNX Runtime CPU ms/img (bs {bs})" for bs in onnx_slots)
    rows = []
    for m in names:
        eff = _efficiency(bundle, m)
        timing = {(t["device"], t["batch_size"]): t for t in eff["timing"]}
        cells = [model_label(m, roster(bundle["params"])), str(eff["params"]["total"]),
                 str(eff["params"]["trainable"]), _macs_m(eff)]
        for slot in slots:
            t = timing.get(slot)
            cells += [fixed(t["ms_per_image"], 3), fixed(t["images_per_s"], 1)] if t else [NA, NA]
        onnx = exported.get(m, {})
        cells += [fixed(onnx[bs]["onnxruntime_ms_per_image"], 3) if bs in onnx else NA for bs in onnx_slots]
        rows.append(tuple(cells))
    note = "Timing: median of the timed forward passes, inference mode; machine-dependent, not compared by checks."
    if onnx_slots:
        note += (" ONNX Runtime: the export stage's ONNX file of the network, timed in the same process as PyTorch "
                 "with as many threads (`export.json`); baselines are not exported.")
    return Table("efficiency", "Efficiency", columns, tuple(rows), note)


# ------------------------------------------------------------------------------------- ablations
def _ablation_values(ablation: Ablation, bundle: Mapping[str, Any]) -> list[Any]:
    flat = flatten(bundle["params"])
    return [flat.get(k) for k in ablation.keys]


def _sort_key(values: Sequence[Any]) -> tuple:
    """Numbers in order; lists by length, then as written ([3], [2, 3], [1, 2, 3]: fewer distilled stages first)."""
    return tuple((0, v, "") if isinstance(v, (int, float)) else
                 (1, len(v) if isinstance(v, list) else 0, json.dumps(v)) for v in values)


def _ablation_series(ablation: Ablation, reference: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]):
    """(values, bundle, is_reference) sorted by the ablated values."""
    series = [(_ablation_values(ablation, b), b, b["params_hash"] == reference["params_hash"])
              for b in (reference, *runs)]
    return sorted(series, key=lambda s: (_sort_key(s[0]), s[1]["params_hash"]))


def ablation_table(ablation: Ablation, reference: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> Table:
    ci = _ci_label(reference)
    models = [m for m in model_names(reference) if ablation.models is None or m in ablation.models]
    per_model = ("Accuracy mean ± std (%)", "F1 mean ± std (%)", "Accuracy Δ vs reference (points)", "Accuracy (%)",
                 f"Accuracy {ci}", "F1 (%)") + (("MACs (M)",) if ablation.show_macs else ())
    columns = ablation.headers + ("Run (params hash)", "Reference") + tuple(
        f"{model_label(m, roster(reference['params']))} {c}" for m in models for c in per_model)
    series = _ablation_series(ablation, reference, runs)
    effects = {(i, m): versus_reference(bundle, reference, m) for i, (_, bundle, is_reference) in enumerate(series)
               if not is_reference for m in models if m in bundle["models"]}
    # one family per table: every Δ with a p-value
    adjusted = dict(zip(effects, holm([c.p_value if c else None for c in effects.values()])))
    rows = []
    for i, (values, bundle, is_reference) in enumerate(series):
        cells = [param_value(v) for v in values] + [bundle["params_hash"], "yes" if is_reference else "no"]
        for m in models:
            result = bundle["models"].get(m)
            if result is None:
                cells += [NA] * len(per_model)
                continue
            ev, agg = result["evaluation"], aggregate(bundle, m)
            effect = "reference" if is_reference else points_difference(effects[i, m], adjusted[i, m])
            if not_learned(bundle, m):
                effect += "; did not learn"
            cells += [pct_spread(agg["accuracy_mean"], agg["accuracy_std"]),
                      pct_spread(agg["f1_macro_mean"], agg["f1_macro_std"]), effect,
                      pct(ev["accuracy"]), pct_interval(_interval(ev, "accuracy")), pct(ev["f1_macro"])]
            if ablation.show_macs:
                cells.append(_macs_m(result.get("efficiency") or {}))
        rows.append(tuple(cells))
    seed, _ = primary_run(reference["params"])
    note = (f"Runs differing from the reference only in {', '.join(ablation.keys)}; F1 is macro. Mean ± sample std "
            f"over each run's training seeds, on the whole training split. Δ: the run's accuracy minus the "
            f"reference's, paired by seed on the same test images: mean [95% CI], p of the paired t over the seeds "
            f"both ran, and (Holm) that p adjusted over this table's {holm_tests(adjusted.values())}. "
            f"The other columns: seed {seed}'s run. {NOT_LEARNED_NOTE}")
    return Table(f"ablation_{ablation.name}", f"Ablation: {ablation.title}", columns, tuple(rows), note)



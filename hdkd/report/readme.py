"""The generated index of a report (``reports/README.md``): its source run, the verdicts, the tables and
figures, where the models look, and the other runs (ablations) it used or left out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hdkd.evidence.aggregate import (
    ONE_CLASS_SHARE,
    data_efficiency_rows,
    seeds_of,
)
from hdkd.evidence.bundle import model_names
from hdkd.evidence.plots import model_label
from hdkd.report.ablations import ABLATIONS, AblationGroups, differing_params, run_label
from hdkd.report.diagnostics import diagnosis_sentence
from hdkd.report.tables import (
    Table,
    table_markdown,
)
from hdkd.roster import roster


@dataclass(frozen=True)
class Explanations:
    """The explain stage's results (``explain.json``) and its figure, as a link relative to the report."""

    results: Mapping[str, Any]
    figure: str


# Above this mean rank correlation with a randomly re-initialised network's map, a map barely depends
# on the learned weights (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").
SANITY_LIMIT = 0.5
MAP_LABELS = {"teacher_gradcam": "Teacher Grad-CAM", "hdkd_gradcam": "HDKD Grad-CAM",
              "hdkd_rollout_cls": "HDKD attention rollout (class token)",
              "hdkd_rollout_dist": "HDKD attention rollout (distillation token)"}


def explanation_lines(explain: Explanations) -> list[str]:
    """The README section on where the models look: the figure, the sanity check, the agreement."""
    sanity = explain.results["sanity_trained_vs_random"]
    agreement = explain.results["agreement_teacher_vs_hdkd_gradcam"]
    lines = ["## Where the models look", "",
             f"![Grad-CAM of the teacher and the HDKD student, attention rollout of the student]({explain.figure})", "",
             "Sanity check: mean Spearman correlation of each map with the same network's after random "
             f"re-initialisation, over {next(iter(sanity.values()))['defined']} test images (near 0: the map "
             f"depends on what was learned; above {SANITY_LIMIT}: it barely does, and says little).", ""]
    for key, summary in sanity.items():
        verdict = "fails the check" if summary["mean_spearman"] > SANITY_LIMIT else "passes"
        lines.append(f"- {MAP_LABELS.get(key, key)}: {summary['mean_spearman']:.3f} ({verdict})")
    checks, dependence = explain.results.get("checks"), explain.results.get("input_dependence")
    if checks and dependence:  # explain stages that ran the second check, and withheld what failed either
        limit = explain.results["check_limits"]["input_dependence"]
        lines += ["", f"Input dependence: mean Spearman correlation between the maps of different test images "
                  f"(near 0: each image gets its own map; above {limit:g}: the same map on every image, which "
                  "explains nothing). A map that fails either check is withheld from the figure:", ""]
        for key, check in checks.items():
            rho = (dependence.get(key) or {}).get("mean_spearman")
            shown = "shown" if check["shown"] else "withheld: " + "; ".join(check["withheld_because"])
            lines.append(f"- {MAP_LABELS.get(key, key)}: {'n/a' if rho is None else f'{rho:.3f}'} ({shown})")
    lines += ["", f"Teacher and HDKD Grad-CAM agree with mean Spearman {agreement['mean_spearman']:.3f} "
              "(1: the student looks where the teacher looks).", ""]
    return lines


def ablation_reference_lines(bundle: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
    """Which run the ablation tables compare with, and, when it is not this report's run, what differs and how
    to rerun them at this one's params."""
    lines = [f"The ablation tables compare each run with the reference run {run_label(reference)} (commit "
             f"`{reference.get('git_commit') or 'unknown'}`, params hash `{reference['params_hash']}`"
             + (")." if reference is bundle else ", `ablations/reference.json`).")]
    diff = differing_params(bundle, reference)
    if diff:
        lines[0] += (f" The ablations were run at an earlier default than this report's run, which differs in "
                     f"{', '.join(diff)}: to rerun them at this one, `python -m pipeline.ablations queue`, "
                     "`dvc queue start`, then `python -m pipeline.ablations collect`.")
    elif reference is not bundle:
        lines[0] += " Its results params are this report's run's."
    return lines


@dataclass(frozen=True)
class Verdicts:
    """The verdict sentences (:func:`hdkd.report.tables.significance_sentences`), the families Holm's adjustment
    ran over (:func:`hdkd.report.tables.family_sizes`), the claims table and the sentence on its seeds (none
    without claims)."""

    sentences: Sequence[str] = ()
    tests: str = ""
    claims: Table | None = None
    seeds: str = ""


@dataclass(frozen=True)
class OtherRuns:
    """The ablation runs: ``groups`` used in ablation tables, ``unused`` with what they differ in, both as they
    differ from ``reference`` (default: the report's bundle)."""

    groups: AblationGroups = field(default_factory=dict)
    unused: Sequence[tuple[Mapping[str, Any], list[str]]] = ()
    reference: Mapping[str, Any] | None = None
    # ablation runs on other data settings than the report's, left out, with what their data differ in
    other_data: Sequence[tuple[Mapping[str, Any], list[str]]] = ()


def data_label(bundle: Mapping[str, Any]) -> str:
    """``synthetic (brain_tumor_mri layout, 3200 images)``: the data set a bundle was evaluated on."""
    data = bundle["params"].get("data", {})
    if bundle["dataset"] == "synthetic" and isinstance(data.get("synthetic"), Mapping):
        synthetic = data["synthetic"]
        return f"synthetic ({synthetic.get('layout')} layout, {synthetic.get('num_images')} images)"
    return str(bundle["dataset"])


def no_ablations_lines(bundle: Mapping[str, Any], other_data: Sequence[tuple[Mapping[str, Any], list[str]]]
                       ) -> list[str]:
    """The README section of a report without ablation tables: none exist for its data set (and the runs at hand,
    run on other data settings, are left out: a report never mixes data sets)."""
    line = f"No ablations exist for this data set, {data_label(bundle)}"
    if other_data:
        keys = sorted({k for _, diff in other_data for k in diff})
        line += (f": the {len(other_data)} ablation run{'' if len(other_data) == 1 else 's'} at hand "
                 f"{'was' if len(other_data) == 1 else 'were'} run on other data settings (differing in "
                 f"{', '.join(keys)}) and {'is' if len(other_data) == 1 else 'are'} left out, since a report never "
                 "mixes data sets")
    return ["## Ablations", "", line + ".", ""]


def data_matters_lines(bundle: Mapping[str, Any]) -> list[str]:
    """How far each model falls at the smallest training fraction from its accuracy on all of the training split
    (empty with one fraction): whether this data set is one where the amount of data matters."""
    rows = data_efficiency_rows(bundle, model_names(bundle))
    fractions = sorted({r["fraction"] for r in rows})
    if len(fractions) < 2:
        return []
    low, full = fractions[0], fractions[-1]
    accuracy = {(r["fraction"], r["model"]): r["accuracy_mean"] for r in rows}
    models = roster(bundle["params"])
    drops = [f"{model_label(m, models)} {100 * (accuracy[low, m] - accuracy[full, m]):+.1f}"
             for m in model_names(bundle) if (low, m) in accuracy and (full, m) in accuracy]
    return ["## How much the data matters", "",
            f"Mean test accuracy over the seeds with {100 * low:g} % of the training data, minus with "
            f"{100 * full:g} %, in points (every fraction at the same optimizer steps; "
            "[data efficiency](tables/data_efficiency.md)): " + ", ".join(drops) + ". Where a model loses little, "
            "the smaller share already holds what it learns from all of it at these steps: a comparison at the "
            "smallest fraction then compares models trained on less data, not in a regime where data is scarce for "
            "them.", ""]


def readme(bundle: Mapping[str, Any], tables: Sequence[Table], figures: Sequence[str], others: OtherRuns = OtherRuns(),
           explain: Explanations | None = None, verdicts: Verdicts = Verdicts()) -> str:
    """The generated index of ``reports/``; names its source run so anyone can regenerate it."""
    groups, unused, sentences, tests = others.groups, others.unused, verdicts.sentences, verdicts.tests
    claims = verdicts.claims
    dirty = {True: "yes", False: "no", None: "unknown"}[bundle.get("git_dirty")]
    reference = others.reference or bundle
    used = [(b, differing_params(reference, b), f"ablation_{a.name}")
            for a in ABLATIONS for b in groups.get(a.name, [])]
    rev = bundle.get("dvc_exp_name") or "<the commit holding these reports>"
    regenerate = f"python -m pipeline.revision_report {rev}"  # with the ablations committed in reports/ablations
    lines = [
        "# HDKD results",
        "",
        "Generated by `hdkd.report` from the results bundle `bundle.json`; do not edit by hand.",
        "",
        *(["## Claims", "", "Each claim of the paper that this run tests, declared before the run (the params' "
           "report.claims), with its paired comparison and verdict ([csv](tables/claims.csv)):", "",
           *table_markdown(claims).splitlines()[2:], "", *([verdicts.seeds, ""] if verdicts.seeds else []),
           "## The run", ""]
          if claims else []),
        f"- Dataset: {bundle['dataset']} ({len(bundle['class_names'])} classes: {', '.join(bundle['class_names'])})",
        f"- Git commit evaluated: `{bundle.get('git_commit') or 'unknown'}` (code modified: {dirty})",
        f"- DVC experiment: {bundle.get('dvc_exp_name') or 'none'}",
        f"- Params hash: `{bundle['params_hash']}`",
        f"- Regenerate without retraining: `{regenerate}`",
        "",
        *data_matters_lines(bundle),
        *(["## Does HDKD help?", "",
           f"Paired by seed on the same test images, every model trained on the whole training split "
           f"(seeds {', '.join(map(str, seeds_of(bundle)))}; 95 % paired t-interval over the seeds; p and, for the "
           f"verdict, p Holm-adjusted within its family ({tests}) of the [paired comparisons]"
           "(tables/significance.md), which also hold every training fraction and per-seed exact McNemar tests; "
           f"a model whose test predictions are at least {100 * ONE_CLASS_SHARE:g} % one class at most seeds did "
           "not learn and gets no verdict):", "", *(f"- {line}" for line in sentences), ""]
          if sentences else []),
        *(["## How the models trained", "", diagnosis, "See the [training diagnostics](tables/training_diagnostics.md) "
           "and [the loss terms per epoch](figures/hdkd_loss_terms.png).", ""]
          if (diagnosis := diagnosis_sentence(bundle)) else []),
        "## Tables",
        "",
        *(f"- [{t.title}](tables/{t.name}.md) ([csv](tables/{t.name}.csv))" for t in tables),
        "",
        "## Figures",
        "",
        *(f"- [{name.removesuffix('.png').replace('_', ' ')}](figures/{name})" for name in figures),
        "",
        *(explanation_lines(explain) if explain else []),
        *(["## Model card", "", "- [HDKD student](model_card.md): intended use, limits, weak spots, provenance", ""]
          if "hdkd" in bundle["models"] else []),
        "## Evaluation data",
        "",
        "- `bundle.json`: everything above is derived from it",
        "- `metrics.json`: DVC metrics, one key per model",
        "- `eval/<model>.json`: per-model detail (per-class, confusion matrix, CIs, efficiency)",
        "- `plots/`: DVC plots data (confusion matrices, training curves)",
    ]
    if not groups:
        lines += ["", *no_ablations_lines(bundle, others.other_data)[:-1]]
    if used or unused:
        lines += ["", "## Other runs", "", *ablation_reference_lines(bundle, reference), "",
                  "| Run | Params hash | Differs in | Used in |", "|:---|:---|:---|:---|"]
        for b, diff, where in used + [(b, diff, "not used") for b, diff in unused]:
            lines.append(f"| {run_label(b)} | `{b['params_hash']}` | {', '.join(diff) or 'nothing'} | {where} |")
    return "\n".join(lines) + "\n"

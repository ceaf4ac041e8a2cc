"""Paper tables and figures, built from results bundles alone (see :mod:`hdkd.evidence.bundle`).

:func:`build_report` writes under ``out_dir`` (the report stage's: ``reports/``)::

    tables/claims.{md,csv}            the pre-registered claims (report.claims): difference, Holm p, verdict, seeds
    tables/main.{md,csv}              model, params, MACs, accuracy and macro-F1 over seeds, macro P/R/F1, CIs
    tables/data_efficiency.{md,csv}   every model at every training fraction, mean ± std over seeds
    tables/significance.{md,csv}      the claims (family primary), then the comparisons (report.comparisons) at
                                      every fraction (exploratory); Holm within each family
    tables/metrics.{md,csv}           balanced accuracy, weighted F1, macro ROC-AUC, ECE
    tables/per_class.{md,csv}         per-class P/R/F1 of every model, support
    tables/efficiency.{md,csv}        params, MACs, timing (when measured)
    tables/ablation_<name>.{md,csv}   one per ablation with >= 1 run differing in exactly its keys
    figures/confusion_<model>.png     annotated confusion matrix per model
    figures/training_curves.png       loss and validation accuracy per epoch
    figures/per_class_f1.png          per-class F1 grouped by model
    figures/data_efficiency.png       accuracy and macro-F1 vs training fraction, mean ± std over seeds
    figures/hdkd_loss_terms.png       HDKD's weighted loss terms, their trunk gradients, one-class share per epoch
    figures/hdkd_loss_terms.csv       its loss terms and gradient norms per fraction and pass (a DVC plot)
    model_card.md                     the HDKD student's model card (:mod:`hdkd.report.model_card`)
    README.md                         index; dataset, git commit and params hash of the source

``dvc.yaml``'s top-level ``plots:`` draw ``tables/data_efficiency.csv`` (by model) and
``figures/hdkd_loss_terms.csv`` (by term), so that ``dvc plots diff`` compares two runs on them.

The report owns ``tables/`` and ``figures/``: they are replaced whole, with the other files, or not at all.

Tables are byte-deterministic: fixed decimals, orders fixed by the bundles' content, ``\\n``
endings, no timestamps. PNGs carry no software/date metadata, so they are byte-identical for the
same matplotlib and FreeType versions.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from hdkd.config import ReportConfig
from hdkd.evidence.aggregate import (
    significance_rows,
)
from hdkd.evidence.bundle import model_names, validate_bundle
from hdkd.evidence.plots import figure_png, training_curves_figure
from hdkd.infra.io import csv_text, output_set, write_bytes, write_text
from hdkd.report.ablations import ABLATIONS, AblationGroups, data_differences, group_ablations
from hdkd.report.diagnostics import loss_terms_figure, loss_terms_rows
from hdkd.report.figures import confusion_figure, data_efficiency_figure, per_class_f1_figure
from hdkd.report.model_card import model_card
from hdkd.report.readme import (
    Explanations,
    OtherRuns,
    Verdicts,
    readme,
)
from hdkd.report.tables import (
    Table,
    ablation_table,
    claims_table,
    data_efficiency_table,
    diagnostics_table,
    efficiency_table,
    family_sizes,
    main_table,
    metrics_table,
    per_class_table,
    seeds_sentence,
    significance_sentences,
    significance_table,
    table_csv,
    table_markdown,
)
from hdkd.roster import roster


def report_tables(bundle: Mapping[str, Any], ablation_groups: AblationGroups | None = None,
                  export: Mapping[str, Any] | None = None, significance: Sequence[Mapping[str, Any]] = (),
                  ablation_reference: Mapping[str, Any] | None = None) -> list[Table]:
    """The tables of one run: ``significance``, the rows of
    :func:`hdkd.evidence.aggregate.significance_rows`; the ablation
    tables compare ``ablation_groups`` with ``ablation_reference`` (default: ``bundle``)."""
    ablation_groups = ablation_groups or {}
    tables = [claims_table(bundle, significance), main_table(bundle), data_efficiency_table(bundle),
              significance_table(significance),
              metrics_table(bundle), per_class_table(bundle), efficiency_table(bundle, export),
              diagnostics_table(bundle)]
    tables += [ablation_table(a, ablation_reference or bundle, ablation_groups[a.name])
               for a in ABLATIONS if a.name in ablation_groups]
    return [t for t in tables if t is not None]


def report_significance(bundle: Mapping[str, Any], cfg: ReportConfig) -> tuple[list, list[dict[str, Any]]]:
    """The comparisons of ``cfg`` whose models the run has, and the significance rows of them and of its claims
    (:func:`hdkd.evidence.aggregate.significance_rows`)."""
    comparisons = [pair for pair in cfg.comparisons if all(m in bundle["models"] for m in pair)]
    claims = [c.model_dump() for c in cfg.claims if all(m in bundle["models"] for m in c.compare)]
    return comparisons, significance_rows(bundle, comparisons, claims)


def report_figures(
    bundle: Mapping[str, Any], ablation_groups: AblationGroups, cfg: ReportConfig
) -> dict[str, Callable[[], Figure | None]]:
    """File name -> figure builder (lazy: a figure is drawn only when written)."""
    figures: dict[str, Callable[[], Figure | None]] = {
        f"confusion_{m}.png": (lambda m=m: confusion_figure(bundle, m, cfg.confusion_normalize))
        for m in model_names(bundle)
    }
    figures["training_curves.png"] = lambda: training_curves_figure(
        {m: bundle["models"][m]["history"] for m in model_names(bundle)}, roster(bundle["params"]))
    figures["per_class_f1.png"] = lambda: per_class_f1_figure(bundle)
    figures["data_efficiency.png"] = lambda: data_efficiency_figure(bundle)
    figures["hdkd_loss_terms.png"] = lambda: loss_terms_figure(bundle)
    return figures


def report_plot_data(bundle: Mapping[str, Any]) -> dict[str, list[Sequence[Any]]]:
    """File name under ``figures/`` -> the rows (header first) of a figure's data that ``dvc.yaml``'s plots draw;
    a figure without data has no file."""
    data = {"hdkd_loss_terms.csv": loss_terms_rows(bundle)}
    return {name: rows for name, rows in data.items() if len(rows) > 1}


def build_report(
    bundle: Mapping[str, Any],
    out_dir: str | os.PathLike,
    cfg: ReportConfig,
    ablations: Iterable[Mapping[str, Any]] = (),
    export: Mapping[str, Any] | None = None,
    explain: Explanations | None = None,
    ablation_reference: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write the tables, figures and README of one run (plus ablations of other runs); return the paths.

    ``export``: the export stage's report (ONNX Runtime latency in the efficiency table); ``explain``:
    the explain stage's results (a README section on where the models look); ``ablation_reference``: the
    bundle the ablations were run against (``reports/ablations/reference.json``; default: ``bundle``)."""
    bundle = validate_bundle(bundle)
    reference = validate_bundle(ablation_reference) if ablation_reference else bundle
    # Reports never mix data sets: ablations run on other data settings than the report's (their reference, or
    # a run of their own) enter no table; the README says that no ablations exist for this data.
    ablations = [validate_bundle(b) for b in ablations]
    if data_differences(bundle, reference):  # their reference's data: every one of them
        other_data, ablations, reference = ablations, [], bundle
    else:
        other_data = [b for b in ablations if data_differences(bundle, b)]
    groups, unused = group_ablations(reference, [b for b in ablations if b not in other_data])
    out = Path(out_dir)
    written: list[Path] = []
    comparisons, significance = report_significance(bundle, cfg)
    tables = report_tables(bundle, groups, export, significance, reference)
    # All of it or none; tables/ and figures/ are replaced whole, so a table or figure that is no
    # longer made (an ablation dropped) does not linger.
    with output_set() as outputs:
        staged = {"tables": outputs.dir(out / "tables"), "figures": outputs.dir(out / "figures")}
        for table in tables:
            for suffix, text in ((".md", table_markdown(table)), (".csv", table_csv(table))):
                write_text(staged["tables"] / f"{table.name}{suffix}", text)
                written.append(out / "tables" / f"{table.name}{suffix}")
        figures = []
        for name, draw in report_figures(bundle, groups, cfg).items():
            fig = draw()
            if fig is not None:
                figures.append(name)
                write_bytes(staged["figures"] / name, figure_png(fig, cfg.dpi))
                written.append(out / "figures" / name)
        for name, rows in report_plot_data(bundle).items():
            write_text(staged["figures"] / name, csv_text(rows))
            written.append(out / "figures" / name)
        if "hdkd" in bundle["models"]:
            written.append(out / "model_card.md")
            write_text(outputs.file(written[-1]), model_card(bundle, significance))
        written.append(out / "README.md")
        verdicts = Verdicts(significance_sentences(bundle, significance, comparisons), family_sizes(significance),
                            claims_table(bundle, significance), seeds_sentence(significance))
        others = OtherRuns(groups, unused, reference, [(b, data_differences(bundle, b)) for b in other_data])
        write_text(outputs.file(written[-1]), readme(bundle, tables, figures, others, explain, verdicts))
    return written



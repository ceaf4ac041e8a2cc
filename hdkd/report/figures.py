"""The report's figures (``reports/figures/``): confusion matrices, per-class F1 and the data-efficiency curve;
the training curves and the loss terms come from :mod:`hdkd.evidence.plots` and :mod:`hdkd.report.diagnostics`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hdkd.evidence.aggregate import (
    data_efficiency_rows,
    fractions_of,
)
from hdkd.evidence.bundle import model_names
from hdkd.evidence.plots import model_color, model_label
from hdkd.roster import roster


def confusion_figure(bundle: Mapping[str, Any], model: str, normalize: bool = True) -> Figure:
    counts = np.asarray(bundle["models"][model]["evaluation"]["confusion_matrix"], dtype=float)
    classes = bundle["class_names"]
    rows = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalize else counts
    side = 2.5 + 0.75 * len(classes)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    bar = fig.colorbar(image, ax=ax, shrink=0.8, label="share of actual class" if normalize else "images")
    if not normalize:
        bar.locator = MaxNLocator(integer=True)
    threshold = (1 if normalize else shown.max()) / 2
    for (i, j), value in np.ndenumerate(shown):
        text = f"{value:.2f}\n({int(counts[i, j])})" if normalize else str(int(value))
        ax.text(j, i, text, ha="center", va="center", fontsize=10 if len(classes) <= 5 else 8,
                color="white" if value > threshold else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(f"{model_label(model, roster(bundle['params']))}: confusion matrix"
                 + (" (row-normalised)" if normalize else ""))
    return fig


def per_class_f1_figure(bundle: Mapping[str, Any]) -> Figure:
    models, classes, run = model_names(bundle), bundle["class_names"], roster(bundle["params"])
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(6.0, 1.1 * len(classes) + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    for i, m in enumerate(models):
        f1 = [100 * c["f1"] for c in bundle["models"][m]["evaluation"]["per_class"]]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, f1, width, label=model_label(m, run),
               color=model_color(m, models, run))
    ax.set_xticks(x, classes, rotation=30 if max(map(len, classes)) > 6 else 0)
    ax.set(ylabel="F1 (%)", ylim=(0, 100), title="Per-class F1 on the test split")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, ncols=len(models), loc="outside lower center")  # never over the bars
    return fig


def data_efficiency_figure(bundle: Mapping[str, Any]) -> Figure | None:
    """Accuracy and macro-F1 by training fraction: mean over the seeds, ± one std as a band; an open marker where
    the model did not learn (:func:`hdkd.evidence.aggregate.not_learned`)."""
    fractions = fractions_of(bundle)
    if len(fractions) < 2:
        return None
    models, run = model_names(bundle), roster(bundle["params"])
    rows = data_efficiency_rows(bundle, models)
    fig = Figure(figsize=(9, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in zip(axes, ("accuracy", "f1_macro"), ("Test accuracy (%)", "Test macro-F1 (%)")):
        for m in models:
            points = [r for r in rows if r["model"] == m]
            x = np.array([100 * r["fraction"] for r in points])
            mean = np.array([100 * r[f"{metric}_mean"] for r in points])
            std = np.array([100 * (r[f"{metric}_std"] or 0.0) for r in points])
            color = model_color(m, models, run)
            ax.plot(x, mean, marker="o", color=color, label=model_label(m, run))
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
            flagged = np.array([r["did_not_learn"] for r in points], dtype=bool)
            if flagged.any():
                ax.plot(x[flagged], mean[flagged], linestyle="none", marker="o", markerfacecolor="white",
                        markeredgecolor=color, zorder=3)
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set(xlabel="Training data used (%)", ylabel=title)
        ax.grid(alpha=0.3)
    n = max(r["n_seeds"] for r in rows)
    fig.suptitle(f"Data efficiency: mean ± std over {n} seed{'s' if n != 1 else ''}")
    if any(r["did_not_learn"] for r in rows):  # one legend entry for the open markers
        axes[0].plot([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="0.3",
                     label="did not learn")
    handles, labels = axes[0].get_legend_handles_labels()
    # below the axes: never over the curves
    fig.legend(handles, labels, fontsize=8, ncols=min(len(handles), 5), loc="outside lower center")
    return fig



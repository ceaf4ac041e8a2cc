"""Figures shared by the training stages (logged to MLflow) and the report: colours, labels, PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hdkd.roster import EXTRA_COLORS, ROSTER, ModelEntry


def model_label(name: str, models: Sequence[ModelEntry] = ROSTER) -> str:
    """``name``'s label among the run's ``models`` (:func:`hdkd.roster.roster`); else the name itself."""
    return next((m.label for m in models if m.name == name), name)


def model_color(name: str, names: Sequence[str], models: Sequence[ModelEntry] = ROSTER) -> str:
    """``name``'s colour among the models ``names`` of one figure: its entry's in the run's ``models``,
    else the extra colour after those the run's baselines take."""
    known = {m.name: m.color for m in models}
    if name in known:
        return known[name]
    others = [m for m in names if m not in known]
    return EXTRA_COLORS[(len(known) - len(ROSTER) + others.index(name)) % len(EXTRA_COLORS)]


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """A figure as PNG bytes, without the software stamp that would break byte-identical rebuilds."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})  # no version stamp
    return buf.getvalue()


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                           models: Sequence[ModelEntry] = ROSTER) -> Figure | None:
    """Loss (log scale: the distillation loss dwarfs cross-entropy) and validation accuracy per
    epoch; ``histories`` maps a model name to its per-epoch rows (the training stages log this too),
    ``models`` names and colours them."""
    shown = [m for m, h in histories.items() if h]
    if not shown:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for m in shown:
        history = histories[m]
        color = model_color(m, list(histories), models)  # as in the report's other figures

        def series(key: str, history=history) -> tuple[list, list]:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            return [p[0] for p in points], [p[1] for p in points]

        loss_ax.plot(*series("train_loss"), color=color, label=f"{model_label(m, models)} train")
        loss_ax.plot(*series("val_loss"), color=color, linestyle="--", label=f"{model_label(m, models)} val")
        epochs, acc = series("val_accuracy")
        acc_ax.plot(epochs, [100 * a for a in acc], color=color, marker="o", markersize=3, label=model_label(m, models))
    loss_ax.set_yscale("log")
    loss_ax.set(title="Loss (train: the stage's objective; val: cross-entropy)", xlabel="Epoch", ylabel="Loss")
    acc_ax.set(title="Validation accuracy", xlabel="Epoch", ylabel="Accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig

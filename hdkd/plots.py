"""Figures shared by the training stages (logged to MLflow) and the report: colours, labels, PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hdkd.roster import ROSTER

EXTRA_COLORS = ("#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")  # models outside the roster
_ROSTER = {m.name: m for m in ROSTER}


def model_label(name: str) -> str:
    return _ROSTER[name].label if name in _ROSTER else name


def model_color(name: str, names: Sequence[str]) -> str:
    """``name``'s colour among the models ``names`` of one figure: its own, else the next extra colour."""
    if name in _ROSTER:
        return _ROSTER[name].color
    others = [m for m in names if m not in _ROSTER]
    return EXTRA_COLORS[others.index(name) % len(EXTRA_COLORS)]


def figure_png(fig: Figure, dpi: int = 120) -> bytes:
    """A figure as PNG bytes, without the software stamp that would break byte-identical rebuilds."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})  # no version stamp
    return buf.getvalue()


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure | None:
    """Loss (log scale: the distillation loss dwarfs cross-entropy) and validation accuracy per
    epoch; ``histories`` maps a model name to its per-epoch rows (the training stages log this too)."""
    models = [m for m, h in histories.items() if h]
    if not models:
        return None
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for m in models:
        history = histories[m]
        color = model_color(m, list(histories))  # as in the report's other figures

        def series(key: str, history=history) -> tuple[list, list]:
            points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
            return [p[0] for p in points], [p[1] for p in points]

        loss_ax.plot(*series("train_loss"), color=color, label=f"{model_label(m)} train")
        loss_ax.plot(*series("val_loss"), color=color, linestyle="--", label=f"{model_label(m)} val")
        epochs, acc = series("val_accuracy")
        acc_ax.plot(epochs, [100 * a for a in acc], color=color, marker="o", markersize=3, label=model_label(m))
    loss_ax.set_yscale("log")
    loss_ax.set(title="Loss (train: the stage's objective; val: cross-entropy)", xlabel="Epoch", ylabel="Loss")
    acc_ax.set(title="Validation accuracy", xlabel="Epoch", ylabel="Accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig

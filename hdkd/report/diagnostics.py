"""Training diagnostics from the runs' per-epoch histories: what each loss term weighs, what gradient it
sends into the shared trunk, and how long a model predicts one class on validation.

The histories are those the training stages keep with each run (:func:`hdkd.training.engine.fit`'s rows:
``loss_<term>``, ``grad_norm_<term>``, ``val_pred_<class>``), carried by the results bundle per run.
Older bundles have none: every function here then returns nothing. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hdkd.evidence.aggregate import ONE_CLASS_SHARE  # the rule a run did not learn by, applied to a pass
from hdkd.evidence.bundle import model_names
from hdkd.evidence.plots import model_color, model_label
from hdkd.roster import roster

FEATURE_PREFIX = "feature_stage"


def _histories(bundle: Mapping[str, Any], model: str) -> dict[float, list[list[Mapping[str, Any]]]]:
    """Fraction -> the histories of the model's runs at that fraction (one per seed), where the bundle has them."""
    out: dict[float, list[list[Mapping[str, Any]]]] = {}
    for run in bundle["models"].get(model, {}).get("runs", []):
        if run.get("history"):
            out.setdefault(run["fraction"], []).append(run["history"])
    return dict(sorted(out.items()))


def _one_class_share(row: Mapping[str, Any]) -> float | None:
    shares = [v for k, v in row.items() if k.startswith("val_pred_")]
    return max(shares) if shares else None


def epochs_on_one_class(history: Sequence[Mapping[str, Any]]) -> int:
    """Epochs (validations) whose validation predictions fall on one class (≥ :data:`ONE_CLASS_SHARE`)."""
    return sum(1 for row in history if (_one_class_share(row) or 0.0) >= ONE_CLASS_SHARE)


def feature_to_ce_ratio(row: Mapping[str, Any]) -> float | None:
    """The gradient norm the feature terms send into the trunk over the cross-entropy's (summed over stages:
    an upper bound of their joint norm's share), in one epoch's row; ``None`` without both."""
    feature = [v for k, v in row.items() if k.startswith(f"grad_norm_{FEATURE_PREFIX}")]
    ce = row.get("grad_norm_ce")
    return sum(feature) / ce if feature and ce else None


def diagnostics_rows(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model and fraction with histories: epochs, epochs on one class (mean over seeds), and for a
    distilled model the trunk-gradient ratio feature / CE in the first and the last epoch (mean over seeds)."""
    rows = []
    for model in model_names(bundle):
        for fraction, histories in _histories(bundle, model).items():
            first = [r for h in histories if (r := feature_to_ce_ratio(h[0])) is not None]
            last = [r for h in histories if (r := feature_to_ce_ratio(h[-1])) is not None]
            rows.append({"model": model, "fraction": fraction, "seeds": len(histories),
                         "epochs": float(np.mean([len(h) for h in histories])),
                         "epochs_one_class": float(np.mean([epochs_on_one_class(h) for h in histories])),
                         "ratio_first": float(np.mean(first)) if first else None,
                         "ratio_last": float(np.mean(last)) if last else None})
    return rows


def diagnosis_sentence(bundle: Mapping[str, Any], model: str = "hdkd", reference: str = "student") -> str | None:
    """One sentence on the distilled model's training at its smallest fraction, against the plain student."""
    rows = {(r["model"], r["fraction"]): r for r in diagnostics_rows(bundle)}
    fractions = sorted(f for m, f in rows if m == model)
    if not fractions or rows[(model, fractions[0])]["ratio_first"] is None:
        return None
    f = fractions[0]
    mine, theirs = rows[(model, f)], rows.get((reference, f))
    lam = bundle["params"].get("distill", {}).get("lambda")
    budget = bundle["params"].get("train", {}).get("budget", "epochs")
    text = (f"In its first epoch the feature-distillation terms (λ = {lam:g}) send {mine['ratio_first']:.0f}× the "
            f"cross-entropy's gradient into HDKD's shared trunk ({mine['ratio_last']:.0f}× in its last); at "
            f"{100 * f:g} % of the data HDKD predicts one class on validation in {mine['epochs_one_class']:.1f} of its "
            f"{mine['epochs']:.0f} epochs")
    if theirs is not None:
        text += f", the student in {theirs['epochs_one_class']:.1f} of {theirs['epochs']:.0f}"
    return text + f" (mean over {mine['seeds']} seeds; {budget} budget)."


# The columns of figures/hdkd_loss_terms.csv; dvc.yaml's plots and .dvc/plots/loss_terms_by_fraction.json read them.
LOSS_TERMS_COLUMNS = ("fraction", "epoch", "term", "loss", "grad_norm")


def _has_loss_terms(by_fraction: Mapping[float, Sequence[Sequence[Mapping[str, Any]]]]) -> bool:
    return any("grad_norm_ce" in h[0] for hs in by_fraction.values() for h in hs)


def loss_terms_rows(bundle: Mapping[str, Any], model: str = "hdkd") -> list[Sequence[Any]]:
    """The data of :func:`loss_terms_figure`'s upper rows (``figures/<model>_loss_terms.csv``, a DVC plot): header,
    then per fraction, pass (epoch) and weighted loss term, the term's mean over the seeds and the mean gradient norm
    it sends into the trunk (empty where not probed); only the header for a model without per-term histories."""
    rows: list[Sequence[Any]] = [LOSS_TERMS_COLUMNS]
    by_fraction = _histories(bundle, model)
    if not _has_loss_terms(by_fraction):
        return rows
    for fraction, histories in by_fraction.items():
        terms = [k.removeprefix("loss_") for k in histories[0][0] if k.startswith("loss_")]
        for term in terms:
            losses = dict(zip(*_mean_curve(histories, f"loss_{term}")))
            norms = dict(zip(*_mean_curve(histories, f"grad_norm_{term}")))
            rows += [(format(fraction, "g"), epoch, term, loss, norms.get(epoch, "")) for epoch, loss in losses.items()]
    return rows


def loss_terms_figure(bundle: Mapping[str, Any], model: str = "hdkd") -> Figure | None:
    """Per fraction (columns), mean over the seeds per epoch: the weighted loss terms, the gradient norm each
    sends into the trunk, and the largest share of validation predictions on one class (every model)."""
    by_fraction = _histories(bundle, model)
    if not _has_loss_terms(by_fraction):
        return None
    run, models = roster(bundle["params"]), model_names(bundle)
    fig = Figure(figsize=(3.6 * len(by_fraction), 8.4), layout="constrained")
    axes = fig.subplots(3, len(by_fraction), squeeze=False, sharey="row")
    for col, (fraction, histories) in enumerate(by_fraction.items()):
        terms = [k.removeprefix("loss_") for k in histories[0][0] if k.startswith("loss_")]
        for row, (prefix, title) in enumerate((("loss_", "weighted loss term"), ("grad_norm_", "trunk gradient norm"))):
            ax = axes[row][col]
            for i, term in enumerate(terms):
                x, y = _mean_curve(histories, prefix + term)
                ax.plot(x, y, marker=".", color=f"C{i}", label=term.replace("_", " "))
            ax.set_yscale("log")
            ax.set(title=f"{model_label(model, run)}, {100 * fraction:g} % of the data" if row == 0 else None,
                   ylabel=title if col == 0 else None)
            ax.grid(alpha=0.3)
        ax = axes[2][col]
        for m in models:
            histories_m = _histories(bundle, m).get(fraction)
            if histories_m:
                x, y = _mean_curve(histories_m, None)
                ax.plot(x, y, marker=".", color=model_color(m, models, run), label=model_label(m, run))
        ax.axhline(ONE_CLASS_SHARE, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="pass over the training data (epoch)", ylim=(0, 1.02),
               ylabel="largest class share of val predictions" if col == 0 else None)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="outside upper center",
               ncols=len(axes[0][0].get_lines()))
    shown = {}  # every model of any column (the baselines train on the whole split alone), once
    for ax in axes[2]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(label, handle)
    fig.legend(list(shown.values()), list(shown), fontsize=8, loc="outside lower center", ncols=min(len(shown), 5))
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str | None) -> tuple[list[int], list[float]]:
    """Per pass, the mean of ``key`` over the runs that have it (``None``: the largest validation class share)."""
    length = max(len(h) for h in histories)
    x, y = [], []
    for i in range(length):
        values = [(_one_class_share(h[i]) if key is None else h[i].get(key)) for h in histories if i < len(h)]
        values = [v for v in values if v is not None]
        if values:
            x.append(i + 1)
            y.append(float(np.mean(values)))
    return x, y

"""Classification metrics on a held-out split, from labels and predicted probabilities.

scikit-learn computes everything it has; only the expected calibration error and the vectorised
bootstrap are implemented here.

Policies (stated once, relied on by the report):

- Averages are over **all** ``C`` classes (``labels=range(C)``, ``zero_division=0``): a class
  absent from the split scores 0 in the macro means and is listed in ``classes_absent``.
  Balanced accuracy is scikit-learn's: mean recall over the classes present in ``y_true``.
- One-vs-rest ROC-AUC is undefined for a class with no positive (or no negative) sample: its
  value is ``None`` and the macro AUC averages the defined classes only (``None`` if none is).
  ``None`` rather than NaN because results are JSON, which has no NaN.
- The confusion matrix has rows = actual class, columns = predicted class.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins (lo, hi] of share · |accuracy − confidence|."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidence, side="left")  # right-closed bins
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    return float(np.abs(correct_sum - conf_sum).sum() / len(y_true))


def roc_auc_one_vs_rest(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """Per-class one-vs-rest AUC; ``None`` where the class has no positive or no negative sample."""
    aucs: list[float | None] = []
    for k in range(probs.shape[1]):
        positive = y_true == k
        defined = 0 < positive.sum() < len(y_true)
        aucs.append(float(roc_auc_score(positive, probs[:, k])) if defined else None)
    return aucs


def bootstrap_replicates(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """Accuracy and macro-F1 on ``resamples`` resamples with replacement, all at once.

    Row ``b`` of the index matrix drawn from ``np.random.default_rng(seed)`` is resample ``b``;
    per-class counts come from one ``bincount`` over (resample, class) pairs. Memory: B·N indices.
    """
    rng = np.random.default_rng(seed)
    n = len(y_true)
    idx = rng.integers(0, n, size=(resamples, n))
    t, p = y_true[idx], y_pred[idx]
    hit = t == p
    offset = np.arange(resamples)[:, None] * n_classes  # one bincount slot per (resample, class)
    size = resamples * n_classes

    def counts(cls: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount((offset + cls).ravel(), weights=weights, minlength=size).reshape(resamples, n_classes)

    tp = counts(t, hit.ravel().astype(float))
    denom = counts(t) + counts(p)  # 2TP + FP + FN = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)  # zero_division=0
    return {"accuracy": hit.mean(axis=1), "f1_macro": f1.mean(axis=1)}


def percentile_interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    ece_bins: int = 15,
    bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of the report, JSON-able. Predictions are ``argmax(probs)``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if probs.ndim != 2 or probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probs must be (N={len(y_true)}, C={n_classes}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}), got [{y_true.min()}, {y_true.max()}]")
    y_pred = probs.argmax(axis=1)
    labels = list(range(n_classes))

    def prf(average: str | None):
        return precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)

    precision, recall, f1, support = prf(None)
    out: dict[str, Any] = {"n": len(y_true), "accuracy": float(accuracy_score(y_true, y_pred))}
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": covered by the policy above
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        p, r, f, _ = prf(average)
        out |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    aucs = roc_auc_one_vs_rest(y_true, probs)
    defined = [a for a in aucs if a is not None]
    out["roc_auc_macro"] = float(np.mean(defined)) if defined else None
    out["ece"] = expected_calibration_error(y_true, probs, ece_bins)
    out["ece_bins"] = ece_bins
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["per_class"] = [
        {"class": name, "precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
         "support": int(support[k]), "roc_auc": aucs[k]}
        for k, name in enumerate(class_names)
    ]
    out["classes_absent"] = [name for k, name in enumerate(class_names) if support[k] == 0]
    out["ci"] = None
    if bootstrap:
        reps = bootstrap_replicates(y_true, y_pred, n_classes, bootstrap, seed)
        out["ci"] = {"level": ci, "resamples": bootstrap, "seed": seed, "method": "percentile"}
        out["ci"] |= {name: percentile_interval(values, ci) for name, values in reps.items()}
    return out


"""Evaluate trained models once on the test split, and write the evaluate stage's outputs.

The run's results bundle (its format: :mod:`hdkd.evidence.bundle`) is assembled here from every model's
evaluation, efficiency and training history.

Files written by :func:`write_evaluation` (under ``reports/``, small, git-tracked)::

    bundle.json                 the results bundle
    metrics.json                DVC metrics: one key per model, headline numbers (timing under "timing")
    eval/<model>.json           per-model detail: all metrics, per-class, confusion matrix, CIs, efficiency
    plots/confusion.csv         DVC plots data, every model: model,actual,predicted,count,share (every cell
                                of each test-split confusion matrix; share: of the actual class's images)
    plots/training.csv          DVC plots data, every model with a history, one row per epoch: model,epoch,lr,
                                train_ce,train_accuracy,val_loss,val_accuracy (the primary run's)

One file per chart, a row per model and cell or epoch (long format): ``dvc.yaml``'s top-level ``plots:``
name no model, and their templates (``.dvc/plots/``) colour (or facet) by the ``model`` column, so the
charts show every model of the run, baselines included. ``plots/`` is an ordinary output: DVC draws only
the charts that ``plots:`` defines over it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hdkd.config import EvaluateConfig, Params
from hdkd.data.augment import eval_transform
from hdkd.data.loader import PackedDataset
from hdkd.data.packed import load_split
from hdkd.evaluation.efficiency import eval_mode, measure_efficiency
from hdkd.evaluation.metrics import classification_metrics
from hdkd.evidence.aggregate import aggregate
from hdkd.evidence.bundle import BUNDLE_ARTIFACT, make_bundle, model_names, run_history, validate_bundle
from hdkd.infra import numerics
from hdkd.infra.distributed import DistInfo, resolve_device
from hdkd.infra.io import output_set, write_csv, write_json
from hdkd.infra.provenance import dvc_exp_name, git_state
from hdkd.infra.tracking import Tracker
from hdkd.models.checkpoint import load_trained
from hdkd.roster import RunKey, primary_run, run_files


@torch.inference_mode()
def predict_proba(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``loader``: ``(labels (N,), softmax probabilities (N, C))`` as float64 numpy."""
    labels, probs = [], []
    model.to(device)
    with eval_mode(model):
        for images, y in loader:
            logits = model(images.to(device, non_blocking=True))
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(y):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"model must return logits (B={len(y)}, C) in eval mode, got {got}")
            probs.append(torch.softmax(logits.double(), dim=1).cpu())
            labels.append(y.cpu())
    return torch.cat(labels).numpy().astype(np.int64), torch.cat(probs).numpy()


def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    class_names: Sequence[str],
    cfg: EvaluateConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of one model on ``loader`` (inference runs once), JSON-able."""
    return evaluation_of(*predict_proba(model, loader, device), class_names, cfg, seed)


def evaluation_of(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], cfg: EvaluateConfig,
                  seed: int = 0, bootstrap: int | None = None) -> dict[str, Any]:
    """All metrics of predicted probabilities ``probs`` against ``y_true`` (``bootstrap``: the
    resamples of the intervals, ``cfg.bootstrap`` by default), JSON-able."""
    if probs.shape[1] != len(class_names):
        raise ValueError(f"model predicts {probs.shape[1]} classes, class_names has {len(class_names)}")
    result = classification_metrics(
        y_true, probs, class_names, ece_bins=cfg.ece_bins, ci=cfg.ci, seed=seed,
        bootstrap=cfg.bootstrap if bootstrap is None else bootstrap,
    )
    result["predictions"] = {  # the counts are the confusion matrix's row and column sums
        "true_counts": [c["support"] for c in result["per_class"]],
        "predicted_counts": np.sum(result["confusion_matrix"], axis=0).tolist(),
        "mean_confidence": float(probs.max(axis=1).mean()),
    }
    return result


def headline_metrics(bundle: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The small per-model record of ``metrics.json``: the primary run's metrics, then the mean and
    sample std over seeds on the whole training split (:func:`hdkd.evidence.aggregate.aggregate`)."""
    model = bundle["models"][name]
    ev, eff = model["evaluation"], model.get("efficiency") or {}
    out = {k: ev[k] for k in (
        "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
        "roc_auc_macro", "ece",
    )}
    if ev.get("ci"):
        for k in ("accuracy", "f1_macro"):
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = ev["ci"][k]
    if eff:
        out |= {"params": eff["params"]["total"], "macs": eff["macs"]}
        out["timing"] = {
            f"{t['device']}_bs{t['batch_size']}_{unit}": t[unit]
            for t in eff["timing"] for unit in ("ms_per_image", "images_per_s")
        }
    return out | aggregate(bundle, name)


CONFUSION_COLUMNS = ("model", "actual", "predicted", "count", "share")  # .dvc/plots/confusion_by_model.json reads them


def confusion_rows(bundle: Mapping[str, Any]) -> list[Sequence[Any]]:
    """``plots/confusion.csv``: header, then every cell of every model's confusion matrix (zeros included), by
    model (report order), actual and predicted class (class order); ``share``: the cell over its actual class's
    images (4 decimals; 0 for a class without test images)."""
    rows: list[Sequence[Any]] = [CONFUSION_COLUMNS]
    class_names = bundle["class_names"]
    for m in model_names(bundle):
        for i, row in enumerate(bundle["models"][m]["evaluation"]["confusion_matrix"]):
            total = sum(row)
            rows += [(m, class_names[i], class_names[j], count, round(count / total, 4) if total else 0.0)
                     for j, count in enumerate(row)]
    return rows


# Of each epoch's history row, what every model logs and the charts compare (train_ce: the classification loss,
# HDKD's without its weighted distillation terms; val_loss: cross-entropy on validation). The rest of the
# history (each loss term, gradient norms, validation predictions per class) stays in the bundle.
TRAINING_COLUMNS = ("model", "epoch", "lr", "train_ce", "train_accuracy", "val_loss", "val_accuracy")


def training_rows(bundle: Mapping[str, Any]) -> list[Sequence[Any]]:
    """``plots/training.csv``: header (:data:`TRAINING_COLUMNS`), then each model's primary-run history (report
    order), one row per epoch; a value the model did not log is empty."""
    rows: list[Sequence[Any]] = [TRAINING_COLUMNS]
    for m in model_names(bundle):
        rows += [(m, *(row.get(k, "") for k in TRAINING_COLUMNS[1:])) for row in bundle["models"][m]["history"]]
    return rows


def write_evaluation(bundle: Mapping[str, Any], out_dir: str | os.PathLike = "reports") -> list[Path]:
    """Write the bundle, DVC metrics, per-model detail and DVC plots data — together, or none of them
    (:func:`hdkd.infra.io.output_set`); return the paths written."""
    bundle = validate_bundle(bundle)
    out = Path(out_dir)
    names, class_names = model_names(bundle), bundle["class_names"]
    paths = [out / "bundle.json", out / "metrics.json"]
    with output_set() as outputs:
        write_json(outputs.file(paths[0]), bundle)
        write_json(outputs.file(paths[1]), {m: headline_metrics(bundle, m) for m in names})
        eval_dir, plots_dir = outputs.dir(out / "eval"), outputs.dir(out / "plots")
        for m in names:
            model = bundle["models"][m]
            write_json(eval_dir / f"{m}.json", {
                "model": m, "dataset": bundle["dataset"], "class_names": class_names,
                "evaluation": model["evaluation"], "efficiency": model["efficiency"],
            })
            paths.append(out / "eval" / f"{m}.json")
        write_csv(plots_dir / "confusion.csv", confusion_rows(bundle))
        paths.append(out / "plots" / "confusion.csv")
        training = training_rows(bundle)
        if len(training) > 1:  # a model with a history
            write_csv(plots_dir / "training.csv", training)
            paths.append(out / "plots" / "training.csv")
    return paths


RUN_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc_macro", "ece")  # per run


def run_evaluation(params: Params, models: Mapping[str, str | os.PathLike], test_set: torch.utils.data.Dataset,
                   class_names: Sequence[str], out_dir: str | os.PathLike = "reports",
                   device: torch.device | str = "cpu", datasets: dict[str, str] | None = None,
                   runs: Mapping[str, Mapping[RunKey, str | os.PathLike]] | None = None) -> dict[str, Any]:
    """The evaluate stage: every trained model on the test split, once; write and track the bundle.

    ``models`` maps a model's name (:mod:`hdkd.roster`) to the file its training stage wrote for its
    primary run (full evaluation, efficiency, history); ``runs`` maps it to every (seed, fraction)
    run's file (default: the primary alone), each evaluated for the statistics across seeds. Every
    file must be of ``data.image_size``. ``datasets``: the data read, for MLflow
    (:class:`hdkd.infra.tracking.Tracker`).
    """
    numerics.apply_runtime(params.train.reproducible and torch.device(device).type == "cpu")
    loader = DataLoader(test_set, batch_size=params.train.eval_batch_size, shuffle=False,
                        num_workers=params.train.num_workers)
    primary = primary_run(params)
    results, test_labels = {}, []
    for name, path in models.items():
        model, meta = load_trained(path, class_names, params.data.image_size, device)
        results[name] = {"history": meta.get("history", []), "runs": []}
        others = {run: p for run, p in (runs or {}).get(name, {}).items() if run != primary}
        for run, run_path in {primary: path, **others}.items():  # one inference pass per run
            run_model, run_meta = (model, meta) if run == primary else load_trained(
                run_path, class_names, params.data.image_size, device)
            y_true, probs = predict_proba(run_model, loader, device)
            # the seeds are the replicates of a run: no bootstrap but the primary run's, which has CIs
            evaluation = evaluation_of(y_true, probs, class_names, params.evaluate, params.seed,
                                       None if run == primary else 0)
            if run == primary:
                results[name]["evaluation"] = evaluation
            results[name]["runs"].append({"seed": run[0], "fraction": run[1],
                                          "evaluation": {k: evaluation[k] for k in RUN_METRICS},
                                          "predictions": probs.argmax(axis=1).tolist(),
                                          "history": run_history(run_meta.get("history", []))})
            test_labels = y_true.tolist()
        results[name]["efficiency"] = measure_efficiency(model, params.data.image_size, params.evaluate, device)
    state = git_state()
    provenance = {**state, "dvc_exp_name": dvc_exp_name(), "numerics": numerics.numerics_versions()}
    bundle = make_bundle(results, params, class_names, test_labels=test_labels, provenance=provenance)
    write_evaluation(bundle, out_dir)  # on disk first: tracking can never cost the result
    with Tracker(params.tracking, params, "evaluate", datasets=datasets) as tracker:
        for name in model_names(bundle):
            headline = headline_metrics(bundle, name)
            tracker.log_metrics({f"{name}.{k}": v for k, v in headline.items() if isinstance(v, (int, float))})
        tracker.log_dict(bundle, BUNDLE_ARTIFACT)
    return bundle


def evaluate_stage(params: Params, data_dir: str | os.PathLike, models_dir: str | os.PathLike,
                   out_dir: str | os.PathLike) -> dict[str, Any]:
    """The evaluate stage: the run's trained models under ``models_dir`` on the test split of ``data_dir``."""
    device = resolve_device(params.train.device, DistInfo())  # as training does: `cuda` without a GPU fails
    test = load_split(data_dir, "test", image_size=params.data.image_size)
    runs = run_files(models_dir, params)
    models = {name: files[primary_run(params)] for name, files in runs.items()}
    return run_evaluation(params, models, PackedDataset(test, eval_transform()), list(test.classes), out_dir, device,
                          datasets={str(data_dir): "test"}, runs=runs)

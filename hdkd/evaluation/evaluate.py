"""Evaluate trained models once on the test split, and write the evaluate stage's outputs.

The run's results bundle (its format: :mod:`hdkd.evidence.bundle`) is assembled here from every model's
evaluation, efficiency and training history.

Files written by :func:`write_evaluation` (under ``reports/``, small, git-tracked)::

    bundle.json                 the results bundle
    metrics.json                DVC metrics: one key per model, headline numbers (timing under "timing")
    eval/<model>.json           per-model detail: all metrics, per-class, confusion matrix, CIs, efficiency
    plots/confusion_<model>.csv DVC plots, one row per test image: actual,predicted (template: confusion)
    plots/curves_<model>.csv    per-epoch training history: epoch, then the logged columns (sorted)

``dvc.yaml``'s top-level ``plots:`` draws them: the confusion template (x: predicted, y: actual)
over ``confusion_<model>.csv``, and validation accuracy and training loss per epoch over
``curves_<model>.csv``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
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


def confusion_rows(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> Iterable[tuple[str, str]]:
    """One (actual, predicted) pair per test image, expanded from the matrix, in matrix order."""
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            yield from [(class_names[i], class_names[j])] * count


def history_rows(history: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """Header (epoch first, then the other logged keys sorted) and one row per epoch."""
    keys = sorted({k for row in history for k in row} - {"epoch"})
    header = ["epoch", *keys]
    return [header] + [[row.get(k, "") for k in header] for row in history]


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
        for m in names:
            model = bundle["models"][m]
            confusion = [("actual", "predicted"), *confusion_rows(model["evaluation"]["confusion_matrix"], class_names)]
            write_csv(plots_dir / f"confusion_{m}.csv", confusion)
            paths.append(out / "plots" / f"confusion_{m}.csv")
            if model["history"]:
                write_csv(plots_dir / f"curves_{m}.csv", history_rows(model["history"]))
                paths.append(out / "plots" / f"curves_{m}.csv")
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

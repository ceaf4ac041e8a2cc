"""One (seed, fraction) run of a training stage: one of the roster's models trained end to end, with its files.

Wiring around :func:`hdkd.training.engine.fit`: the model's recipe and loss (cross-entropy, or the HDKD
distillation loss with a frozen teacher beside the student), the checked teacher, the resume
fingerprint, MLflow, and the files ``dvc.yaml`` declares. Runs as a plain process or under
``torchrun`` (rank 0 writes and logs). The command lines are in ``pipeline/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from hdkd.config import DistillConfig, OptimConfig, Params, result_params
from hdkd.data.augment import BatchAugment, eval_transform, train_transform
from hdkd.data.loader import PackedDataset
from hdkd.data.packed import PackedSplit, load_split
from hdkd.data.splits import nested_subsets
from hdkd.infra import numerics
from hdkd.infra.distributed import DistInfo, device_type, init_distributed, resolve_device
from hdkd.infra.io import dvc_md5, output_set, read_json, write_json
from hdkd.infra.mlflow_store import registered_model_name
from hdkd.infra.tracking import Tracker
from hdkd.models import FrozenTeacher, create_model, model_name
from hdkd.models.checkpoint import CHECKPOINT_KEYS, load_model, save_model
from hdkd.roster import ModelEntry, RunKey, roster, roster_entry, run_name
from hdkd.training.engine import FitData, FitResult, FitSettings, Runtime, fit, seed_everything, steps_per_epoch
from hdkd.training.losses import (
    AlignedFeatureDistillationLoss,
    FeatureDistillationLoss,
    HDKDLoss,
    LogitDistillationLoss,
)

logger = logging.getLogger(__name__)


def recipe(params: Params, entry: ModelEntry) -> OptimConfig:
    """The model's training recipe: its params section (a baseline's: that section's ``optim``; a kd method's:
    its ``distill``)."""
    if entry.baseline:
        return params.baselines[entry.name].optim
    return params.kd[entry.name].distill if entry.kd else getattr(params, entry.section)


def network_spec(params: Params, entry: ModelEntry) -> tuple[str, dict[str, Any]]:
    """The model's registry name and constructor overrides (both saved in its model file): a timm network's
    keyword arguments, else the model section's (the paper's networks, and the kd methods on the student)."""
    if entry.baseline:
        return entry.registry, dict(params.baselines[entry.name].kwargs)
    if entry.kd and params.kd[entry.name].timm:
        return entry.registry, dict(params.kd[entry.name].kwargs)
    return model_name(entry.registry, params.model.size), {
        "block": params.model.block, "stem_stride": params.model.stem_stride, "dropout": params.model.dropout}


def build_criterion(model: str | ModelEntry, cfg: OptimConfig, channels: tuple[int, ...] = ()) -> HDKDLoss:
    """Cross-entropy for a model trained alone (a baseline too); the HDKD loss for one distilled from a
    teacher (a kd method: DeiT's and logit-only are its logit part, λ = 0; aligned's feature part runs through
    learned projectors, for stage widths ``channels``). ``model``: a roster entry, or the name of one of the
    paper's models."""
    entry = model if isinstance(model, ModelEntry) else roster_entry(model)
    if not entry.distills:
        return HDKDLoss(LogitDistillationLoss("none"), None, 0.0)
    assert isinstance(cfg, DistillConfig)
    feature = (AlignedFeatureDistillationLoss(channels, cfg.stages, beta=cfg.beta) if entry.kd == "aligned"
               else FeatureDistillationLoss(cfg.stages, beta=cfg.beta))
    return HDKDLoss(LogitDistillationLoss(cfg.type, cfg.alpha, cfg.tau, cfg.kl_reduction), feature, cfg.lambda_)


def make_runtime(params: Params, device: torch.device, dist: DistInfo) -> Runtime:
    """The engine's runtime from ``train.*``: mixed precision and channels-last on CUDA only."""
    amp_dtype = None
    if device.type == "cuda" and params.train.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    numerics.apply_runtime(params.train.reproducible and device.type == "cpu")
    return Runtime(device, dist, amp_dtype, params.train.channels_last and device.type == "cuda", dist.is_main)


@dataclass(frozen=True)
class StagePaths:
    """Where a training stage reads and writes (the paths ``dvc.yaml`` declares)."""

    train: Path  # packed directory holding the training split (after balancing)
    val: Path  # packed directory holding the validation split
    out_dir: Path  # model.pt (the primary run's) and runs/
    metrics: Path  # DVC metrics JSON (validation accuracy and loss)
    resume_dir: Path  # resume states: outside DVC's outputs, so they survive its clean-up
    teacher: Path | None = None  # a model that distils: the teacher's model.pt (a run), its directory (a stage)
    # The MLflow run the model was logged to (default: <metrics>.run.json): outside out_dir, so that a new run id
    # of the same weights reruns no stage that reads the model.
    run_record: Path = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.run_record is None:
            object.__setattr__(self, "run_record", self.metrics.with_name(f"{self.metrics.stem}.run.json"))


@dataclass(frozen=True)
class PendingRun:
    """A (seed, fraction) run of a stage and its done mark: ``done.json`` in the run's resume directory,
    holding the fingerprint of the inputs it was trained from (the one place that reads or writes it)."""

    run: RunKey
    fingerprint: str
    mark: Path

    def is_done(self) -> bool:
        return self.mark.is_file() and read_json(self.mark).get("fingerprint") == self.fingerprint

    def mark_done(self) -> None:
        """Written once the run's files are in place (never for a failed run): a resume after a kill keeps it."""
        write_json(self.mark, {"fingerprint": self.fingerprint})


# Per-epoch columns left out of the history kept with the model (and plotted by the evaluate stage):
# timings vary from run to run, so they stay in MLflow only.
TIMING_COLUMNS = ("epoch_time_s", "images_per_s")


def load_teacher(path: Path | None, classes: list[str], student: nn.Module, stages, device) -> FrozenTeacher:
    """The teacher stage's output, checked against the student before any training starts."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found: distillation needs the train_teacher "
                                "stage's output (run `dvc repro train_teacher`)")
    teacher, meta = load_model(path, device)
    if list(meta["classes"]) != list(classes):
        raise ValueError(f"teacher {path} was trained on classes {meta['classes']}, the data has {classes}: "
                         "retrain the teacher on this data (`dvc repro train_teacher`)")
    for s in stages:
        if teacher.feature_shapes[s - 1] != student.feature_shapes[s - 1]:
            raise ValueError(f"teacher {path} stage {s} maps are {teacher.feature_shapes[s - 1]}, the student's are "
                             f"{student.feature_shapes[s - 1]}: teacher and student need the same image size, "
                             "stem stride and stage widths for feature distillation")
    return FrozenTeacher(teacher.to(device))


def input_fingerprint(name: str, params: Params, paths: StagePaths, run: RunKey | None = None) -> str:
    """What a resume state is valid for: the params that can change a result and the exact input files.

    Of the baselines and kd methods only the model's own entry counts (none for the paper's models): editing
    one leaves every other model's resume state valid. ``run`` (default ``(params.seed, 1.0)``) is
    the run's seed and fraction; the lists of them are not: adding a seed leaves finished runs valid."""
    files = [paths.train, paths.val] + ([paths.teacher] if paths.teacher else [])
    own = {k: v for k, v in result_params(params).items() if k not in ("seeds", "fractions", "baseline_fractions") and (
        k.partition(".")[0] not in ("baselines", "kd") or k.startswith((f"baselines.{name}.", f"kd.{name}.")))}
    blob = json.dumps({"role": name, "params": own, "run": list(run or (params.seed, 1.0)),
                       "inputs": [dvc_md5(p) for p in files]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


METRIC_UNSAFE = re.compile(r"[^\w\-. /]")  # characters an MLflow metric name may not hold


def step_budget(params: Params, cfg: OptimConfig, paths: StagePaths, fraction: float, world: int = 1) -> int | None:
    """The run's optimizer steps under ``train.budget: steps``: those of ``cfg.epochs`` passes over the whole
    training split (``paths.train``), whatever share of it the run trains on, so that the data-efficiency
    curve varies the data alone, not the training too. ``None`` (``cfg.epochs`` passes over the run's own
    share) under ``epochs``, and for the whole split, where both budgets are the same."""
    if params.train.budget == "epochs" or fraction >= 1:
        return None
    full = load_split(paths.train, "train")  # memory-mapped: its length costs no image read
    return cfg.epochs * steps_per_epoch(len(full), params.train.batch_size, world)


def run_training(name: str, params: Params, paths: StagePaths, datasets: tuple[Dataset, Dataset, list[str]],
                 rt: Runtime, batch_hook: Callable | None = None, run: RunKey | None = None,
                 register: bool = True) -> dict[str, Any]:
    """Train the run's model ``name`` (:func:`hdkd.roster.roster`) once, and write its files.

    ``run``: the training seed and the share of the training data ``datasets`` holds (default:
    ``params.seed``, all of it).

    ``datasets`` is ``(train_set, val_set, class_names)``. Rank 0 writes ``model.pt`` (best weights
    and the per-epoch history), the metrics JSON and its run record, and logs to MLflow (tagged with the
    seed and fraction; ``register``: the network is logged as an MLflow model and registered); other
    ranks only train.
    """
    entry = roster_entry(name, params)
    cfg = recipe(params, entry)
    train_set, val_set, classes = datasets
    seed, fraction = run or (params.seed, 1.0)
    seed_everything(seed)  # identical initial weights on every rank
    network, overrides = network_spec(params, entry)
    model = create_model(network, len(classes), params.data.image_size, **overrides).to(rt.device)
    criterion = build_criterion(entry, cfg, tuple(shape[0] for shape in getattr(model, "feature_shapes", ())))
    criterion.to(rt.device)  # aligned feature distillation's projectors: drawn after the network, train beside it
    teacher = None
    if entry.distills:
        teacher = load_teacher(paths.teacher, classes, model, cfg.stages if criterion.needs_features else (),
                               rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model: nn.Module = torch.compile(model) if params.train.compile else model
    if rt.dist.enabled:
        unused = entry.distills and cfg.type == "none"  # the distillation head gets no gradient
        train_model = DistributedDataParallel(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                              else None, find_unused_parameters=unused)

    # The order of a run, each step held by a test (tests/unit/training/test_run.py): (1) the fingerprint of its
    # inputs first, so that nothing saved for other inputs is reused; (2) its files, all of them or none; (3) MLflow
    # after, so that tracking can never cost a finished run; (4) its resume state removed last, so that a failure
    # anywhere before leaves the run resumable.
    fingerprint = input_fingerprint(name, params, paths, (seed, fraction))
    resume_run = resumable_run_id(paths.resume_dir, fingerprint)
    tracking = params.tracking if rt.dist.is_main else params.tracking.model_copy(update={"enabled": False})
    extra = {"hdkd.model": network, "hdkd.world_size": str(rt.dist.world_size), "hdkd.device": str(rt.device),
             "hdkd.seed": str(seed), "hdkd.fraction": f"{fraction:g}"}
    settings = FitSettings(cfg, seed, params.train.batch_size, params.train.eval_batch_size,
                           params.train.num_workers, params.train.grad_clip, params.train.log_every,
                           total_steps=step_budget(params, cfg, paths, fraction, rt.dist.world_size),
                           class_names=tuple(METRIC_UNSAFE.sub("_", c) for c in classes),
                           resume_dir=paths.resume_dir, fingerprint=fingerprint,
                           desc=f"{name} {run_name((seed, fraction))}")
    inputs = {str(paths.train): "training", str(paths.val): "validation"}
    with Tracker(tracking, params, entry.stage, extra_tags=extra, resume_run_id=resume_run,
                 datasets=inputs, run_name=f"{entry.stage} {run_name((seed, fraction))}") as tracker:
        if rt.dist.is_main and tracker.run_id:
            write_json(paths.resume_dir / MLFLOW_RUN, {"fingerprint": fingerprint, "run_id": tracker.run_id})
        result = fit(train_model, criterion, FitData(train_set, val_set, batch_hook), rt, settings,
                     teacher, on_epoch=lambda row: tracker.log_metrics(row, step=int(row["epoch"])))
        summary = {"val_accuracy": result.best["val_accuracy"], "val_loss": result.best["val_loss"],
                   "best_epoch": result.best_epoch, "epochs": cfg.epochs}
        # Interned keys: pickle writes a string once and refers back to it after, by identity, so rows whose keys
        # were built per epoch (f-strings) or read back from a resume state would else give other bytes.
        history = [{sys.intern(k): v for k, v in row.items() if k not in TIMING_COLUMNS} for row in result.history]
        trained = TrainedRun(name, network, overrides, classes, (seed, fraction), model, summary, history)
        if rt.dist.is_main:
            write_run_files(trained, params, paths, tracker.info())
            track_run(tracker, trained, params, paths.out_dir / "model.pt", result, register)
    if rt.dist.is_main:
        shutil.rmtree(paths.resume_dir, ignore_errors=True)  # done: nothing left to resume
    return {**summary, "history": result.history, "resumed_from": result.resumed_from}


MLFLOW_RUN = "mlflow_run.json"  # in a run's resume directory: the MLflow run it logs to, and for which inputs


def resumable_run_id(resume_dir: Path, fingerprint: str) -> str | None:
    """The MLflow run an interrupted run logged to, if it was for the same inputs (``fingerprint``); else ``None``."""
    record = resume_dir / MLFLOW_RUN
    previous = read_json(record) if record.is_file() else {}
    return previous.get("run_id") if previous.get("fingerprint") == fingerprint else None


@dataclass(frozen=True)
class TrainedRun:
    """A finished run: its model's name, network and overrides (how to rebuild it), classes, (seed, fraction),
    best weights, summary and per-epoch history."""

    name: str
    network: str
    overrides: dict[str, Any]
    classes: list[str]
    run: RunKey
    model: nn.Module
    summary: dict[str, Any]
    history: list[dict[str, Any]]


def write_run_files(trained: TrainedRun, params: Params, paths: StagePaths, tracking: dict[str, Any]) -> None:
    """The run's files, all three or none: ``model.pt`` (best weights and history), the metrics JSON and
    the run record (``paths.run_record``; ``tracking``: the MLflow run it was logged to)."""
    seed, fraction = trained.run
    with output_set() as outputs:
        save_model(outputs.file(paths.out_dir / "model.pt"), trained.model, trained.network, trained.classes,
                   params.data.image_size, trained.overrides, trained.summary, trained.history)
        write_json(outputs.file(paths.metrics), trained.summary)
        write_json(outputs.file(paths.run_record), {
            **tracking, "params_hash": params.digest(), "model": trained.network, "seed": seed,
            "fraction": fraction, **trained.summary})


def track_run(tracker: Tracker, trained: TrainedRun, params: Params, model_path: Path, result: FitResult,
              register: bool) -> None:
    """Log a finished run to MLflow: its best metrics, the epochs a kill kept from MLflow, its history; with
    ``register``, the run that stands for the model, also its checkpoint, curves and registered MLflow model."""
    from hdkd.evidence.plots import figure_png, training_curves_figure  # matplotlib only where figures are drawn

    tracker.log_metrics({f"best_{k}": v for k, v in trained.summary.items()})
    if result.resumed_from:  # an epoch saved just before a kill may not have reached MLflow
        tracker.log_missing_steps(result.history[:result.resumed_from])
    tracker.log_dict(result.history, "history.json")
    if register:  # its files too (the other runs' are DVC outputs)
        tracker.log_artifact(model_path, "checkpoint")
        curves = training_curves_figure({trained.name: trained.history}, roster(params))  # a baseline's label too
        tracker.log_bytes(figure_png(curves), "training_curves.png")
        logged, meta = load_model(model_path)  # the saved weights, on the CPU
        tracker.log_model(logged, {k: meta[k] for k in CHECKPOINT_KEYS},
                          registered_model_name(params.data.dataset, trained.name))


def training_data(params: Params, paths: StagePaths, rt: Runtime, run: RunKey | None = None
                  ) -> tuple[tuple[Dataset, Dataset, list[str]], Callable | None]:
    """The packed train/val splits as datasets, and the batch hook for GPU augmentation (if any).

    ``run``: the training seed (default ``params.seed``) and the share of the training data; below 1,
    that share of the prepared training split (:func:`training_subset`)."""
    seed, fraction = run or (params.seed, 1.0)
    train = (training_subset(paths.val, params, seed, fraction) if fraction < 1
             else load_split(paths.train, "train", image_size=params.data.image_size))
    val = load_split(paths.val, "val", image_size=params.data.image_size)
    if list(train.classes) != list(val.classes):
        raise ValueError(f"{paths.train} and {paths.val} disagree on the classes: rerun `dvc repro balance`")
    hook = None
    if not params.augment.enabled:
        train_set = PackedDataset(train, eval_transform(), seed=seed)
    elif params.augment.batched:  # a few batched kernels per batch: 4.6x faster than image by image on a CPU
        train_set = PackedDataset(train, None, seed=seed)  # uint8 batches, augmented on the device
        hook = BatchAugment(params.augment, seed, rt.dist.rank)
    else:
        train_set = PackedDataset(train, train_transform(params.augment), seed=seed)
    return (train_set, PackedDataset(val, eval_transform()), list(train.classes)), hook


def training_subset(prepared: Path, params: Params, seed: int, fraction: float) -> PackedSplit:
    """``fraction`` of the prepared training split at training ``seed``: stratified by class, whole
    lesion groups, nested in the larger fractions' subsets, the same for every model
    (:func:`hdkd.data.splits.nested_subsets`). Held in memory."""
    train = load_split(prepared, "train", image_size=params.data.image_size)
    groups = pd.read_csv(Path(prepared) / "train" / "index.csv", dtype=str, keep_default_na=False)["group"]
    rows = nested_subsets(train.labels, groups.to_numpy(), [fraction], seed)[fraction]  # the same in any list
    return dataclasses.replace(train, images=np.ascontiguousarray(train.images[rows]), labels=train.labels[rows],
                               ids=train.ids[rows])


def train_run(name: str, params: Params, paths: StagePaths, run: RunKey, register: bool,
               threads: int | None = None) -> dict[str, Any]:
    """One (seed, fraction) run of a training stage, into its staging directory (a process of its own
    when runs train side by side: ``threads`` each, unless the reproducible mode fixes the count)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # a spawned worker logs as its stage does
    dist = init_distributed(device_type(params.train.device))
    rt = make_runtime(params, resolve_device(params.train.device, dist), dist)
    if threads and not params.train.reproducible:
        torch.set_num_threads(threads)
    datasets, hook = training_data(params, paths, rt, run)
    return run_training(name, params, paths, datasets, rt, batch_hook=hook, run=run, register=register)

"""Training engine: one loop for the teacher, the plain student and the HDKD student.

The three differ only in their loss (cross-entropy, or the HDKD distillation loss) and in whether
a frozen teacher runs beside the student. Model selection uses the validation split only. Each
epoch ends with an atomic resume state (weights, optimiser, scheduler, scaler, history), and every
random draw of an epoch is seeded from (seed, rank, epoch), so an interrupted run continues where it
stopped and — on the CPU — ends with the same numbers.
Runs as a plain process or under ``torchrun`` (DistributedDataParallel; rank 0 writes and logs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from hdkd import numerics
from hdkd.checkpoint import load_model, load_resume_state, save_model, unwrap
from hdkd.config import DistillConfig, OptimConfig, Params, load_params
from hdkd.distributed import (DistInfo, all_reduce_sum, barrier, broadcast_buffers, device_type, init_distributed,
                              resolve_device, same_on_all_ranks, shutdown)
from hdkd.data.seeding import derive_seed
from hdkd.io import dvc_md5, load_torch, read_json, save_torch, write_json
from hdkd.losses import FeatureDistillationLoss, HDKDLoss, LogitDistillationLoss, LossParts
from hdkd.models import FrozenTeacher, create_model, model_name
from hdkd.tracking import Tracker

log = logging.getLogger(__name__)

ROLES = ("teacher", "student", "hdkd")
STAGES = {"teacher": "train_teacher", "student": "train_student", "hdkd": "distill"}  # dvc.yaml stage names


# --------------------------------------------------------------------------- building blocks
def forward_loss(student: nn.Module, criterion: HDKDLoss, images: torch.Tensor, labels: torch.Tensor,
                 teacher: nn.Module | None = None) -> tuple[LossParts, Any]:
    """One student pass (and one no-grad teacher pass) → ``(loss parts, student outputs)``.

    Both networks return their stage maps from the same pass that produced the logits, so the
    feature loss costs no extra forward.
    """
    teacher_logits = teacher_feats = None
    if teacher is not None:
        teacher_logits, teacher_feats = teacher(images)
    outputs, student_feats = student(images, return_features=True)
    return criterion(outputs, labels, teacher_logits, student_feats, teacher_feats), outputs


def stage_config(params: Params, role: str) -> OptimConfig:
    return {"teacher": params.teacher, "student": params.student, "hdkd": params.distill}[role]


def build_criterion(role: str, cfg: OptimConfig) -> HDKDLoss:
    """Cross-entropy for the teacher and the plain student; the HDKD loss for distillation."""
    if role != "hdkd":
        return HDKDLoss(LogitDistillationLoss("none"), None, 0.0)
    assert isinstance(cfg, DistillConfig)
    return HDKDLoss(LogitDistillationLoss(cfg.type, cfg.alpha, cfg.tau, cfg.kl_reduction),
                    FeatureDistillationLoss(cfg.stages, beta=cfg.beta), cfg.lambda_)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD; weight decay skips biases and norm weights (as timm's optimiser factory)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_at(cfg: OptimConfig, progress: float) -> float:
    """Learning rate after ``progress`` epochs: linear warm-up from ``warmup_lr``, then cosine to ``min_lr``."""
    if cfg.schedule == "none":
        return cfg.lr
    if progress < cfg.warmup_epochs:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * progress / cfg.warmup_epochs
    t = (progress - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int):
    """Per-step schedule (smooth warm-up even with few epochs)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step / steps_per_epoch) / cfg.lr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """Where and how the loop runs."""

    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    amp_dtype: torch.dtype | None = None  # autocast dtype on CUDA; None = full precision
    channels_last: bool = False
    progress: bool = True

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)


def make_runtime(params: Params, device: torch.device, dist: DistInfo) -> Runtime:
    amp_dtype = None
    if device.type == "cuda" and params.train.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    numerics.apply_runtime(params.train.reproducible and device.type == "cpu")
    return Runtime(device, dist, amp_dtype, params.train.channels_last and device.type == "cuda", dist.is_main)


# ------------------------------------------------------------------------------------ the loop
def train_one_epoch(model: nn.Module, criterion: HDKDLoss, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loader: DataLoader, rt: Runtime, teacher: nn.Module | None = None,
                    grad_clip: float | None = None, batch_hook: Callable | None = None,
                    desc: str = "train", log_every: int = 0) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean loss parts, accuracy and throughput.

    Every ``log_every`` steps (0: never) rank 0 logs a line with the running mean loss.
    """
    model.train()
    # Sums stay on the device: reading a number back each step, or copying one there (a synchronous
    # host-to-device copy), would stall a GPU's queue. The sample count is known on the host.
    loss_sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # total, ce, logit_kd, feature (x samples)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    count = 0
    refresh = max(1, len(loader) // 20)  # progress-bar updates (and NaN checks) per epoch
    start = time.perf_counter()
    # disable=None: no per-batch bar when stderr is not a terminal (DVC logs, CI), only the log lines.
    bar = tqdm(loader, desc=desc, leave=False, disable=None if rt.progress else True, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar, 1):
        images, labels = rt.to_device(images, labels)
        if batch_hook is not None:  # e.g. whole-batch augmentation on the GPU
            images = batch_hook(images)
        with rt.autocast():
            parts, outputs = forward_loss(model, criterion, images, labels, teacher)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts.total).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        n = labels.shape[0]
        loss_sums += torch.stack([parts.total, parts.ce, parts.logit_kd, parts.feature]).detach().double() * n
        correct += (logits.argmax(1) == labels).sum()
        count += n
        log_step = log_every and step % log_every == 0 and rt.dist.is_main
        if log_step or step % refresh == 0 or step == len(loader):
            # The running sum, not this step's loss: it stays non-finite once any step was (an fp16
            # grad scaler skips such a step without a trace in the weights).
            loss = loss_sums[0].item() / count
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} ({desc}, by step {step}); lower the learning rate "
                                         "or check the data (train.grad_clip can help)")
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if log_step:
                log.info("%s step %d/%d  loss %.4f  lr %.2e", desc, step, len(loader), loss, lr)
    seconds = time.perf_counter() - start
    sums = torch.cat([loss_sums, correct.double().reshape(1), loss_sums.new_tensor([count])])
    sums = all_reduce_sum(sums, rt.dist).cpu()  # total, ce, logit_kd, feature, correct, count
    count = max(sums[5].item(), 1.0)
    return {"train_loss": sums[0].item() / count, "train_ce": sums[1].item() / count,
            "train_logit_kd": sums[2].item() / count, "train_feature_kd": sums[3].item() / count,
            "train_accuracy": sums[4].item() / count, "epoch_time_s": seconds, "images_per_s": sums[5].item() / seconds}


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, rt: Runtime) -> dict[str, float]:
    """Cross-entropy and accuracy of the inference-mode logits (HDKD: the average of its heads)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)  # on the device: read once, at the end
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    count = 0
    for images, labels in loader:
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += labels.shape[0]
    return {"val_loss": loss_sum.item() / max(count, 1), "val_accuracy": correct.item() / max(count, 1)}


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best: dict[str, float]
    resumed_from: int  # 0 = fresh start


def is_better(row: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher validation accuracy wins; equal accuracy is broken by lower validation loss."""
    if best is None:
        return True
    return (row["val_accuracy"], -row["val_loss"]) > (best["val_accuracy"], -best["val_loss"])


def fit(model: nn.Module, criterion: HDKDLoss, cfg: OptimConfig, train_set: Dataset, val_set: Dataset, rt: Runtime,
        *, seed: int, batch_size: int, eval_batch_size: int = 64, num_workers: int = 0,
        teacher: nn.Module | None = None, grad_clip: float | None = None, resume_dir: Path | None = None,
        fingerprint: str = "", on_epoch: Callable[[dict[str, float]], None] | None = None,
        batch_hook: Callable | None = None, desc: str = "train", log_every: int = 0) -> FitResult:
    """Train ``model`` for ``cfg.epochs``, selecting on validation; resumable from ``resume_dir``."""
    world = rt.dist.world_size
    if batch_size % world:
        raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rt.dist.rank, shuffle=True, seed=seed)
    pin = rt.device.type == "cuda"
    # drop_last: a final batch of one sample would break BatchNorm in training mode.
    loader = DataLoader(train_set, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin, drop_last=len(train_set) // world >= batch_size // world)
    val_loader = DataLoader(val_set, batch_size=eval_batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=pin)
    if len(train_set) < 2 * world:
        raise ValueError(f"the training split has {len(train_set)} samples: BatchNorm needs at least 2 per process")

    net = unwrap(model)
    optimizer = build_optimizer(net, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0

    last_path = best_path = None
    if resume_dir is not None:
        last_path, best_path = Path(resume_dir) / "last.pt", Path(resume_dir) / "best.pt"
        state = load_resume_state(last_path, fingerprint)
        if state is not None:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            history, best, start_epoch = state["history"], state["best"], state["epoch"]
            best_state = load_torch(best_path, rt.device)
            if rt.dist.is_main:
                log.info("resuming from epoch %d of %d (%s)", start_epoch, cfg.epochs, last_path)
        # Only rank 0 writes resume states: on nodes that do not share the directory, the other
        # ranks would start afresh beside it and the run would hang or diverge.
        if not same_on_all_ranks(start_epoch, rt.dist, rt.device):
            raise RuntimeError(f"the ranks found different resume states in {resume_dir}: it must be on a file "
                               "system that every node shares (or remove it on every node to start afresh)")

    epochs = tqdm(range(start_epoch, cfg.epochs), desc=desc, initial=start_epoch, total=cfg.epochs,
                  disable=None if rt.progress else True, dynamic_ncols=True)
    for epoch in epochs:
        # Every random draw of an epoch depends only on (seed, rank, epoch): dropout here, the data
        # order in the sampler, augmentation per sample or per batch. So each rank has its own streams
        # and a resumed run draws what an uninterrupted one would, with no RNG state to save.
        torch.manual_seed(derive_seed(seed, rt.dist.rank, epoch))
        sampler.set_epoch(epoch)
        for part in (train_set, batch_hook):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row |= train_one_epoch(model, criterion, optimizer, scheduler, scaler, loader, rt, teacher, grad_clip,
                               batch_hook, desc=f"{desc} {epoch + 1}/{cfg.epochs}", log_every=log_every)
        broadcast_buffers(net, rt.dist)
        row |= validate(net, val_loader, rt)
        history.append(row)
        improved = is_better(row, best)
        if improved:
            best = {"epoch": row["epoch"], "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if rt.dist.is_main:
            log.info("%s epoch %d/%d  loss %.4f  train acc %.3f  val loss %.4f  val acc %.3f  lr %.2e  %.0f img/s%s",
                     desc, row["epoch"], cfg.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
                     row["val_accuracy"], row["lr"], row["images_per_s"], "  *best" if improved else "")
        epochs.set_postfix(val_acc=f"{row['val_accuracy']:.3f}", best=f"{best['val_accuracy']:.3f}")
        if rt.dist.is_main and resume_dir is not None:
            if improved:  # before last.pt: a resume state never points at a missing best
                save_torch(best_path, best_state)
            save_torch(last_path, {
                "fingerprint": fingerprint, "epoch": epoch + 1, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "history": history, "best": best,
            })
        if on_epoch is not None and rt.dist.is_main:
            on_epoch(row)
        barrier(rt.dist)

    net.load_state_dict(best_state)
    return FitResult(history, best["epoch"], best, start_epoch)


# ---------------------------------------------------------------------------------- a stage
@dataclass(frozen=True)
class StagePaths:
    """Where a training stage reads and writes (the paths ``dvc.yaml`` declares)."""

    train: Path  # packed directory holding the training split (after balancing)
    val: Path  # packed directory holding the validation split
    out_dir: Path  # model.pt + run.json
    metrics: Path  # DVC metrics JSON (validation accuracy and loss)
    resume_dir: Path  # resume states: outside DVC's outputs, so they survive its clean-up
    teacher: Path | None = None  # the teacher stage's model.pt (distillation only)


# Per-epoch columns kept with the model (and plotted by the evaluate stage); timings stay in
# MLflow only, since they vary from run to run.
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_ce", "train_logit_kd", "train_feature_kd",
                   "train_accuracy", "val_loss", "val_accuracy")


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


def input_fingerprint(role: str, params: Params, paths: StagePaths) -> str:
    """What a resume state is valid for: the params that shape training and the exact input files."""
    relevant = {k: v for k, v in params.to_dict().items() if k not in ("tracking", "evaluate")}
    relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in ("num_workers", "log_every")}
    files = [paths.train, paths.val] + ([paths.teacher] if paths.teacher else [])
    blob = json.dumps({"role": role, "params": relevant, "inputs": [dvc_md5(p) for p in files]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_training(role: str, params: Params, paths: StagePaths, datasets: tuple[Dataset, Dataset, list[str]],
                 rt: Runtime, batch_hook: Callable | None = None) -> dict[str, Any]:
    """Train one of the paper's three models end to end and write the stage's outputs.

    ``datasets`` is ``(train_set, val_set, class_names)``. Rank 0 writes ``model.pt`` (best weights
    and the per-epoch history), ``run.json`` and the metrics JSON, and logs to MLflow; other ranks
    only train.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    from hdkd.plots import figure_png, training_curves_figure  # matplotlib only where figures are drawn

    cfg = stage_config(params, role)
    train_set, val_set, classes = datasets
    seed_everything(params.seed)  # identical initial weights on every rank
    name = model_name(role, params.model.size)
    overrides = {"block": params.model.block, "stem_stride": params.model.stem_stride,
                 "dropout": params.model.dropout}
    model = create_model(name, len(classes), params.data.image_size, **overrides).to(rt.device)
    teacher = None
    if role == "hdkd":
        teacher = load_teacher(paths.teacher, classes, model, params.distill.stages, rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model: nn.Module = torch.compile(model) if params.train.compile else model
    if rt.dist.enabled:
        unused = role == "hdkd" and params.distill.type == "none"  # the distillation head gets no gradient
        train_model = DistributedDataParallel(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                              else None, find_unused_parameters=unused)

    fingerprint = input_fingerprint(role, params, paths)
    run_file = paths.resume_dir / "mlflow_run.json"
    previous = read_json(run_file) if run_file.is_file() else {}
    resume_run = previous.get("run_id") if previous.get("fingerprint") == fingerprint else None
    stage = STAGES[role]
    tracking = params.tracking if rt.dist.is_main else params.tracking.model_copy(update={"enabled": False})
    extra = {"hdkd.model": name, "hdkd.world_size": str(rt.dist.world_size), "hdkd.device": str(rt.device)}
    with Tracker(tracking, params, stage, extra_tags=extra, resume_run_id=resume_run) as tracker:
        if rt.dist.is_main and tracker.run_id:
            write_json(run_file, {"fingerprint": fingerprint, "run_id": tracker.run_id})
        result = fit(train_model, build_criterion(role, cfg), cfg, train_set, val_set, rt, seed=params.seed,
                     batch_size=params.train.batch_size, eval_batch_size=params.train.eval_batch_size,
                     num_workers=params.train.num_workers, teacher=teacher, grad_clip=params.train.grad_clip,
                     resume_dir=paths.resume_dir, fingerprint=fingerprint, batch_hook=batch_hook, desc=role,
                     log_every=params.train.log_every,
                     on_epoch=lambda row: tracker.log_metrics(row, step=int(row["epoch"])))
        summary = {"val_accuracy": result.best["val_accuracy"], "val_loss": result.best["val_loss"],
                   "best_epoch": result.best_epoch, "epochs": cfg.epochs}
        if rt.dist.is_main:
            # Outputs first, MLflow after: a tracking failure can never cost a finished checkpoint.
            model_path = paths.out_dir / "model.pt"
            history = [{k: row[k] for k in HISTORY_COLUMNS} for row in result.history]
            save_model(model_path, model, name, classes, params.data.image_size, overrides, summary, history)
            write_json(paths.metrics, summary)
            tracker.log_metrics({f"best_{k}": v for k, v in summary.items()})
            if result.resumed_from:  # an epoch saved just before a kill may not have reached MLflow
                tracker.log_missing_steps(result.history[:result.resumed_from])
            tracker.log_artifact(model_path, "checkpoint")
            tracker.log_dict(result.history, "history.json")
            tracker.log_bytes(figure_png(training_curves_figure({role: history})), "training_curves.png")
            write_json(paths.out_dir / "run.json", {**tracker.info(), "params_hash": params.digest(),
                                                    "model": name, **summary})
            shutil.rmtree(paths.resume_dir, ignore_errors=True)  # done: nothing left to resume
    return {**summary, "history": result.history, "resumed_from": result.resumed_from}


def training_data(params: Params, paths: StagePaths, rt: Runtime) -> tuple[tuple[Dataset, Dataset, list[str]],
                                                                          Callable | None]:
    """The packed train/val splits as datasets, and the batch hook for GPU augmentation (if any)."""
    from hdkd.data import BatchAugment, PackedDataset, eval_transform, load_split, train_transform

    train = load_split(paths.train, "train", image_size=params.data.image_size)
    val = load_split(paths.val, "val", image_size=params.data.image_size)
    if list(train.classes) != list(val.classes):
        raise ValueError(f"{paths.train} and {paths.val} disagree on the classes: rerun `dvc repro balance`")
    hook = None
    if not params.augment.enabled:
        train_set = PackedDataset(train, eval_transform(), seed=params.seed)
    elif params.augment.on_gpu and rt.device.type == "cuda":
        train_set = PackedDataset(train, None, seed=params.seed)  # uint8 batches, augmented on the device
        hook = BatchAugment(params.augment, params.seed, rt.dist.rank)
    else:
        train_set = PackedDataset(train, train_transform(params.augment), seed=params.seed)
    return (train_set, PackedDataset(val, eval_transform()), list(train.classes)), hook


def train_stage(role: str, params: Params, paths: StagePaths) -> dict[str, Any]:
    """Entry point of the train_teacher / train_student / distill stages, plain or under torchrun."""
    requested = params.train.device
    dist = init_distributed(device_type(requested))
    try:
        rt = make_runtime(params, resolve_device(requested, dist), dist)
        datasets, hook = training_data(params, paths, rt)
        return run_training(role, params, paths, datasets, rt, batch_hook=hook)
    finally:
        shutdown(dist)


def main(role: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Command line of a training stage; the defaults are the paths ``dvc.yaml`` declares."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{STAGES[role]}")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train", type=Path, default=Path("data/balanced"), help="packed training split")
    parser.add_argument("--val", type=Path, default=Path("data/prepared"), help="packed validation split")
    parser.add_argument("--out", type=Path, default=Path(f"models/{role}"), help="model.pt and run.json")
    parser.add_argument("--metrics", type=Path, default=Path(f"reports/train/{role}.json"))
    parser.add_argument("--resume-dir", type=Path, default=Path(f"checkpoints/{role}"),
                        help="resume states (kept outside DVC's outputs)")
    if role == "hdkd":
        parser.add_argument("--teacher", type=Path, default=Path("models/teacher/model.pt"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)  # validated before any work
    paths = StagePaths(args.train, args.val, args.out, args.metrics, args.resume_dir, getattr(args, "teacher", None))
    return train_stage(role, params, paths)

"""Training engine: the loop that fits a model with a loss on data, on a runtime.

It knows nothing of params.yaml, paths of the pipeline or MLflow (:mod:`hdkd.training.stage` wires a stage).
Model selection uses the validation split only, once per epoch of the schedule (under an equal-steps budget a
smaller training set takes several passes per epoch). Each epoch ends with an atomic resume state
(weights, optimiser, scheduler, scaler, history), and every random draw of a pass is seeded from
(seed, rank, pass), so an interrupted run continues where it stopped and — on the CPU — ends with
the same numbers. Runs as a plain process or under ``torchrun`` (DistributedDataParallel; rank 0
writes resume states).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from hdkd.config import OptimConfig
from hdkd.data.seeding import derive_seed
from hdkd.infra.distributed import DistInfo, all_reduce_sum, barrier, broadcast_buffers, same_on_all_ranks
from hdkd.infra.torch_io import save_torch
from hdkd.models.checkpoint import load_resume_state, resume_paths, unwrap
from hdkd.training.losses import HDKDLoss, LossParts

log = logging.getLogger(__name__)


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Per-step schedule (smooth warm-up even with few epochs): ``cfg.epochs`` spread over ``total_steps``
    optimizer steps, so that under an equal-steps budget a smaller training set runs through the same
    curve (its epochs, shorter, are not the schedule's)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(cfg, step * cfg.epochs / total_steps) / cfg.lr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(num_samples: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps in one pass of :func:`fit`'s loader over ``num_samples`` (each of ``world`` processes
    takes ``batch_size / world`` of a padded share; the last, partial batch is dropped when a full one fits)."""
    per_rank, local = math.ceil(num_samples / world), batch_size // world
    return per_rank // local if num_samples // world >= local else math.ceil(per_rank / local)


def validation_rounds(total_steps: int, steps_per_pass: int, epochs: int) -> list[range]:
    """The passes over the training set between two validations, in order: each range ends with the first pass
    that reaches the next of the schedule's ``epochs`` (one every ``total_steps / epochs`` optimizer steps), the
    last with the run's last pass. Under an equal-steps budget a smaller training set takes more, shorter passes;
    validating once per epoch of the schedule rather than once per pass gives every fraction as many
    validations, checkpoints to select from and resume states (the best of 80 validations would flatter a tenth
    of the data against the best of 8, and cost ten times the validation)."""
    def reached(steps):  # epochs of the schedule complete after `steps` steps: all of them from the last pass on
        return steps * epochs // total_steps

    rounds, first = [], 0
    for number in range(math.ceil(total_steps / steps_per_pass)):
        if reached((number + 1) * steps_per_pass) > reached(number * steps_per_pass):
            rounds.append(range(first, number + 1))
            first = number + 1
    return rounds


@dataclass(frozen=True)
class Passes:
    """The batches of consecutive passes over ``loader``, each pass set up by ``begin(pass number)`` as its first
    batch is drawn (its seeds and data order); the consumer stops at its step budget."""

    loader: DataLoader
    numbers: range
    begin: Callable[[int], None]

    def __len__(self) -> int:
        return len(self.numbers) * len(self.loader)

    def __iter__(self):
        for number in self.numbers:
            self.begin(number)
            yield from self.loader


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


# ------------------------------------------------------------------------------------ the loop
@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit` trains, besides the model, the loss, the data and the runtime."""

    optim: OptimConfig  # epochs, optimiser and learning-rate schedule
    seed: int
    batch_size: int  # global: split evenly over the processes
    eval_batch_size: int = 64
    num_workers: int = 0
    grad_clip: float | None = None
    log_every: int = 0  # steps between log lines inside an epoch; 0 = per epoch only
    # Optimizer steps of the whole run; None = ``optim.epochs`` passes over the training set. Given,
    # the run takes as many passes as it needs and stops mid-pass at that count (train.budget: steps).
    total_steps: int | None = None
    class_names: tuple[str, ...] = ()  # validation logs the share of predictions per class under these names
    grad_probes: int = 2  # steps per epoch whose loss terms' gradient norms into the trunk are measured; 0 = none
    resume_dir: Path | None = None  # where resume states go; None = none
    fingerprint: str = ""  # what a resume state must have been saved for (the inputs it is valid for)
    desc: str = "train"  # progress bars and log lines


@dataclass(frozen=True)
class FitData:
    """What :func:`fit` trains and selects on: the training and validation sets, and the whole-batch augmentation
    the training batches go through on the device (``augment.batched``), if any."""

    train_set: Dataset
    val_set: Dataset
    batch_hook: Callable | None = None


@dataclass(frozen=True)
class Epoch:
    """One epoch of :func:`train_one_epoch`: ``steps`` batches of ``loader`` (default: all of them; in :func:`fit`,
    the :class:`Passes` between two validations), each through ``batch_hook`` when given; ``desc`` names the
    epoch in progress bars and log lines."""

    loader: DataLoader | Passes
    desc: str = "train"
    steps: int | None = None
    batch_hook: Callable | None = None


@dataclass
class Optimisation:
    """What one optimiser step uses: the optimiser, its per-step schedule and the grad scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def trunk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters every loss term reaches: the shared convolutional stages of the paper's networks
    (every trainable parameter of a network without them, a timm baseline)."""
    net = unwrap(model)
    return [p for p in getattr(net, "stages", net).parameters() if p.requires_grad]


def term_grad_norms(terms: dict[str, torch.Tensor], params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """The L2 norm of the gradient that each loss term alone sends into ``params``.

    One extra backward pass per term, through the kept graph: the step's own backward and the weights
    are untouched (nothing accumulates into ``.grad``), so a probed run trains exactly as an unprobed one.
    """
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=term.device)
    return norms


def probe_steps(steps: int, probes: int) -> set[int]:
    """The ``probes`` steps of an epoch of ``steps`` (1-based, evenly spaced from the first) that are probed."""
    return {1 + i * steps // probes for i in range(min(probes, steps))}


def train_one_epoch(model: nn.Module, criterion: HDKDLoss, opt: Optimisation, epoch: Epoch, rt: Runtime,
                    settings: FitSettings, teacher: nn.Module | None = None) -> dict[str, float]:
    """``epoch.steps`` optimizer steps (default: one pass over its loader); returns the epoch's mean loss parts,
    each weighted loss term (``loss_<term>``), the gradient norm each term sends into the trunk on the
    probed steps (``grad_norm_<term>``; single process only), accuracy and throughput.

    Every ``settings.log_every`` steps (0: never) rank 0 logs a line with the running mean loss.
    """
    optimizer, scheduler, scaler = opt.optimizer, opt.scheduler, opt.scaler
    grad_clip, log_every = settings.grad_clip, settings.log_every
    loader, desc, batch_hook = epoch.loader, epoch.desc, epoch.batch_hook
    steps = min(epoch.steps or len(loader), len(loader))
    # Probing under DDP would run extra backward passes outside its gradient reducer: skipped there.
    probed = probe_steps(steps, settings.grad_probes) if not rt.dist.enabled else set()
    trunk = trunk_parameters(model) if probed else []
    model.train()
    # Sums stay on the device: reading a number back each step, or copying one there (a synchronous
    # host-to-device copy), would stall a GPU's queue. The sample count is known on the host.
    loss_sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # total, ce, logit_kd, feature (x samples)
    term_sums: dict[str, torch.Tensor] = {}  # weighted term -> sum over samples
    grad_sums: dict[str, torch.Tensor] = {}  # weighted term -> sum of its gradient norms over the probed steps
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    count = 0
    refresh = max(1, steps // 20)  # progress-bar updates (and NaN checks) per epoch
    start = time.perf_counter()
    # disable=None: no per-batch bar when stderr is not a terminal (DVC logs, CI), only the log lines.
    bar = tqdm(loader, desc=desc, total=steps, leave=False, disable=None if rt.progress else True,
               dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar, 1):
        images, labels = rt.to_device(images, labels)
        if batch_hook is not None:  # whole-batch augmentation (augment.batched)
            images = batch_hook(images)
        with rt.autocast():
            parts, outputs = forward_loss(model, criterion, images, labels, teacher)
        if step in probed:
            for name, norm in term_grad_norms(parts.terms, trunk).items():
                grad_sums[name] = grad_sums.get(name, 0) + norm.double()
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
        for name, term in parts.terms.items():
            term_sums[name] = term_sums.get(name, 0) + term.detach().double() * n
        correct += (logits.argmax(1) == labels).sum()
        count += n
        log_step = log_every and step % log_every == 0 and rt.dist.is_main
        if log_step or step % refresh == 0 or step == steps:
            # The running sum, not this step's loss: it stays non-finite once any step was (an fp16
            # grad scaler skips such a step without a trace in the weights).
            loss = loss_sums[0].item() / count
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} ({desc}, by step {step}); lower the learning rate "
                                         "or check the data (train.grad_clip can help)")
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if log_step:
                log.info("%s step %d/%d  loss %.4f  lr %.2e", desc, step, steps, loss, lr)
        if step == steps:
            break
    bar.close()
    seconds = time.perf_counter() - start
    names = list(term_sums)
    sums = torch.cat([loss_sums, correct.double().reshape(1), loss_sums.new_tensor([count]),
                      *(term_sums[k].reshape(1) for k in names)])
    sums = all_reduce_sum(sums, rt.dist).cpu()  # total, ce, logit_kd, feature, correct, count, terms...
    count = max(sums[5].item(), 1.0)
    row = {"train_loss": sums[0].item() / count, "train_ce": sums[1].item() / count,
           "train_logit_kd": sums[2].item() / count, "train_feature_kd": sums[3].item() / count,
           "train_accuracy": sums[4].item() / count, "epoch_time_s": seconds, "images_per_s": sums[5].item() / seconds}
    row |= {f"loss_{k}": sums[6 + i].item() / count for i, k in enumerate(names)}
    row |= {f"grad_norm_{k}": v.item() / len(probed) for k, v in grad_sums.items()}
    return row


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, rt: Runtime, class_names: tuple[str, ...] = ()) -> dict[str, float]:
    """Cross-entropy and accuracy of the inference-mode logits (HDKD: the average of its heads), and the
    share of the predictions that falls on each class (``val_pred_<class>``): a collapse onto one class
    shows there first."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)  # on the device: read once, at the end
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    predicted = None
    count = 0
    for images, labels in loader:
        images, labels = rt.to_device(images, labels)
        with rt.autocast():
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        pred = logits.argmax(1)
        correct += (pred == labels).sum()
        counts = torch.bincount(pred, minlength=logits.shape[1])
        predicted = counts if predicted is None else predicted + counts
        count += labels.shape[0]
    row = {"val_loss": loss_sum.item() / max(count, 1), "val_accuracy": correct.item() / max(count, 1)}
    if predicted is not None:
        names = class_names or tuple(str(i) for i in range(len(predicted)))
        row |= {f"val_pred_{name}": n / count for name, n in zip(names, predicted.tolist())}
    return row


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


def fit(model: nn.Module, criterion: HDKDLoss, data: FitData, rt: Runtime, settings: FitSettings,
        teacher: nn.Module | None = None, on_epoch: Callable[[dict[str, float]], None] | None = None) -> FitResult:
    """Train ``model`` for ``settings.total_steps`` optimizer steps (default: ``settings.optim.epochs``
    passes over ``data.train_set``), selecting on ``data.val_set`` after each epoch of the schedule
    (:func:`validation_rounds`); resumable from ``settings.resume_dir``. ``on_epoch`` receives each epoch's row
    on rank 0.

    A loss with parameters of its own (aligned feature distillation's projectors) trains them with the model,
    in one process: they are in the optimizer and the resume state, not in the selected weights."""
    train_set, val_set, batch_hook = data.train_set, data.val_set, data.batch_hook
    cfg, seed, batch_size, desc = settings.optim, settings.seed, settings.batch_size, settings.desc
    resume_dir = settings.resume_dir
    world = rt.dist.world_size
    if batch_size % world:
        raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rt.dist.rank, shuffle=True, seed=seed)
    pin = rt.device.type == "cuda"
    # drop_last: a final batch of one sample would break BatchNorm in training mode.
    loader = DataLoader(train_set, batch_size=batch_size // world, sampler=sampler, num_workers=settings.num_workers,
                        pin_memory=pin, drop_last=len(train_set) // world >= batch_size // world)
    val_loader = DataLoader(val_set, batch_size=settings.eval_batch_size, shuffle=False,
                            num_workers=settings.num_workers, pin_memory=pin)
    if len(train_set) < 2 * world:
        raise ValueError(f"the training split has {len(train_set)} samples: BatchNorm needs at least 2 per process")

    net = unwrap(model)
    loss_parameters = any(p.requires_grad for p in criterion.parameters())
    if loss_parameters and rt.dist.enabled:
        raise ValueError("a loss with parameters (aligned feature distillation) trains in one process: "
                         "DistributedDataParallel would not reduce its gradients")
    # The model's parameters first: a loss without parameters leaves the optimizer as it was.
    optimizer = build_optimizer(nn.ModuleList([net, criterion]) if loss_parameters else net, cfg)
    steps_per_pass = len(loader)
    total_steps = settings.total_steps or cfg.epochs * steps_per_pass
    rounds = validation_rounds(total_steps, steps_per_pass, cfg.epochs)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    history: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    start = 0

    last_path = best_path = None
    if resume_dir is not None:
        last_path, best_path = resume_paths(resume_dir)
        state = load_resume_state(resume_dir, settings.fingerprint, rt.device)
        if state is not None and not (0 < state["epoch"] <= len(rounds)
                                      and state.get("passes") == rounds[state["epoch"] - 1].stop):
            log.info("resume state %s was saved at another point of the run's passes; starting afresh", last_path)
            state = None
        if state is not None:
            net.load_state_dict(state["model"])
            if loss_parameters:
                criterion.load_state_dict(state["criterion"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            history, best, start = state["history"], state["best"], state["epoch"]
            best_state = state["best_state"]
            if rt.dist.is_main:
                log.info("resuming from epoch %d of %d (%s)", start, len(rounds), last_path)
        # Only rank 0 writes resume states: on nodes that do not share the directory, the other
        # ranks would start afresh beside it and the run would hang or diverge.
        if not same_on_all_ranks(start, rt.dist, rt.device):
            raise RuntimeError(f"the ranks found different resume states in {resume_dir}: it must be on a file "
                               "system that every node shares (or remove it on every node to start afresh)")

    def begin_pass(number: int) -> None:
        # Every random draw of a pass depends only on (seed, rank, pass): dropout here, the data
        # order in the sampler, augmentation per sample or per batch. So each rank has its own streams
        # and a resumed run draws what an uninterrupted one would, with no RNG state to save.
        torch.manual_seed(derive_seed(seed, rt.dist.rank, number))
        sampler.set_epoch(number)
        for part in (train_set, batch_hook):
            if hasattr(part, "set_epoch"):
                part.set_epoch(number)

    epochs = tqdm(range(start, len(rounds)), desc=desc, initial=start, total=len(rounds),
                  disable=None if rt.progress else True, dynamic_ncols=True)
    for epoch in epochs:
        passes = rounds[epoch]
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        this_epoch = Epoch(Passes(loader, passes, begin_pass), f"{desc} {epoch + 1}/{len(rounds)}",
                           min(passes.stop * steps_per_pass, total_steps) - passes.start * steps_per_pass,
                           batch_hook)
        row |= train_one_epoch(model, criterion, Optimisation(optimizer, scheduler, scaler), this_epoch, rt,
                               settings, teacher)
        broadcast_buffers(net, rt.dist)
        row |= validate(net, val_loader, rt, settings.class_names)
        history.append(row)
        improved = is_better(row, best)
        if improved:
            best = {"epoch": row["epoch"], "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if rt.dist.is_main:
            log.info("%s epoch %d/%d  loss %.4f  train acc %.3f  val loss %.4f  val acc %.3f  lr %.2e  %.0f img/s%s",
                     desc, row["epoch"], len(rounds), row["train_loss"], row["train_accuracy"], row["val_loss"],
                     row["val_accuracy"], row["lr"], row["images_per_s"], "  *best" if improved else "")
        epochs.set_postfix(val_acc=f"{row['val_accuracy']:.3f}", best=f"{best['val_accuracy']:.3f}")
        if rt.dist.is_main and resume_dir is not None:
            if improved:  # before last.pt: a resume state never points at a missing best
                save_torch(best_path, best_state)
            save_torch(last_path, {
                "fingerprint": settings.fingerprint, "epoch": epoch + 1, "passes": passes.stop,
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "history": history, "best": best,
                **({"criterion": criterion.state_dict()} if loss_parameters else {}),
            })
        if on_epoch is not None and rt.dist.is_main:
            on_epoch(row)
        barrier(rt.dist)

    net.load_state_dict(best_state)
    return FitResult(history, best["epoch"], best, start)


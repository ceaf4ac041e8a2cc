"""Shared pieces of the training tests: a CPU runtime, a learnable toy split, and a fit that can be interrupted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hdkd.config import OptimConfig
from hdkd.training.engine import FitData, FitResult, FitSettings, Runtime, fit
from hdkd.training.run import build_criterion
from tests.helpers import ROOT

CPU = Runtime(torch.device("cpu"), progress=False)


def toy_split(n, classes=3, size=32, seed=0) -> TensorDataset:
    """Images whose class is their dominant colour channel, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, size, size, generator=g) * 0.5
    images[torch.arange(n), labels] += 1.5
    return TensorDataset(images, labels)


def interruptible_fit(make_model: Callable[[], nn.Module], criterion: str, cfg: OptimConfig, train, val, *,
                      seed: int, resume_dir: Path | None, stop_after: int | None = None,
                      fingerprint: str = "f", total_steps: int | None = None) -> tuple[FitResult, nn.Module]:
    """Fit a model made after ``torch.manual_seed(0)``; raise ``KeyboardInterrupt`` after epoch ``stop_after``.

    ``total_steps``: the run's step budget (``train.budget: steps``), None for the configured epochs.
    """
    torch.manual_seed(0)
    model = make_model()

    def stop(row):
        if row["epoch"] == stop_after:
            raise KeyboardInterrupt

    settings = FitSettings(cfg, seed=seed, batch_size=16, total_steps=total_steps, resume_dir=resume_dir,
                           fingerprint=fingerprint)
    return fit(model, build_criterion(criterion, cfg), FitData(train, val), CPU, settings, on_epoch=stop), model


def load_script(relpath: str):
    """A script of the project (``benchmarks/<name>.py``, ``scripts/<name>.py``: not packages) as a module."""
    import importlib.util
    import sys

    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    return load_script(f"benchmarks/{name}.py")

"""Model cost: parameters, MACs, latency and throughput.

- MACs come from PyTorch's own ``FlopCounterMode`` for one image (batch 1) at the configured
  input size, MACs = FLOPs / 2. It counts the matmul-like ops (convolutions, linear, matmul,
  attention), not bias adds, normalisation or activations — the usual convention (thop, fvcore).
  Fused attention (``scaled_dot_product_attention``) counts on the CPU as on CUDA.
- Timing runs under ``torch.inference_mode()`` in eval mode, ``warmup`` untimed passes then
  ``iters`` timed ones; the median batch time is reported. CPU timings depend on the machine and
  on ``torch.get_num_threads()`` (recorded); they are never compared between runs.
- On CUDA each timed pass is bracketed by ``torch.cuda.synchronize()`` (kernels are asynchronous),
  optionally under autocast (bf16 where supported, else fp16).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hdkd.config import EvaluateConfig


def count_parameters(model: nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts its CUDA attention kernels but not the CPU one that ``scaled_dot_product_attention``
# dispatches to there, so attention would vanish from the count on a CPU.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on a single ``input_shape`` (C, H, W) image."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *input_shape, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with eval_mode(model), torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() // 2


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not (amp and device.type == "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def median_seconds(run: Callable[[], object], warmup: int, iters: int,
                   sync: Callable[[], object] | None = None) -> float:
    """Median wall time of ``iters`` calls of ``run`` after ``warmup`` untimed ones.

    ``sync`` (e.g. ``torch.cuda.synchronize``) brackets each call: CUDA kernels are asynchronous.
    """
    times = []
    for i in range(warmup + iters):
        if sync:
            sync()
        start = time.perf_counter()
        run()
        if sync:
            sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_forward(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    warmup: int,
    iters: int,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> dict[str, Any]:
    """Median forward time of one batch of zeros on ``device`` (the model is moved there)."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    model.to(device)
    x = torch.zeros(batch_size, *input_shape, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else None
    with eval_mode(model), torch.inference_mode(), _autocast(device, amp):
        batch_s = median_seconds(lambda: model(x), warmup, iters, sync=sync)
    return {
        "device": device.type,
        "batch_size": batch_size,
        "amp": amp and on_cuda,
        "ms_per_batch": batch_s * 1e3,
        "ms_per_image": batch_s * 1e3 / batch_size,
        "images_per_s": batch_size / batch_s,
    }


def measure_efficiency(
    model: nn.Module, image_size: int, cfg: EvaluateConfig, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Params and MACs (on ``device``), then CPU timing, then GPU timing when CUDA is available.

    ``timing`` holds every machine-dependent number, so checks can skip it by name.
    """
    input_shape = (3, image_size, image_size)
    model.to(device)
    result: dict[str, Any] = {
        "params": count_parameters(model),
        "macs": count_macs(model, input_shape),
        "input_shape": list(input_shape),
    }
    timing_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    timing: list[dict[str, Any]] = []
    for dev in timing_devices:
        for bs in cfg.latency_batch_sizes:
            row = time_forward(
                model, input_shape, bs, warmup=cfg.latency_warmup, iters=cfg.latency_iters,
                device=dev, amp=cfg.latency_amp,
            )
            timing.append(row | _machine(dev))
    model.to(device)  # back where the caller had it
    result["timing"] = timing
    return result


def _machine(device_type: str) -> dict[str, Any]:
    if device_type == "cuda":
        return {"device_name": torch.cuda.get_device_name(), "threads": None}
    return {"device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}

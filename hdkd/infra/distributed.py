"""torchrun / DistributedDataParallel plumbing: who am I, which device, reduce a number.

A plain ``python`` process is rank 0 of 1; under ``torchrun --nproc_per_node N`` the usual
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) select the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def device_type(requested: str) -> str:
    """``"cuda"`` or ``"cpu"`` for ``train.device``: ``auto`` picks CUDA when present."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(requested: str, info: DistInfo) -> torch.device:
    """The device of ``train.device``; each rank takes the GPU of its local rank."""
    if device_type(requested) == "cuda":
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (identity for one process)."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def same_on_all_ranks(value: int, info: DistInfo, device: torch.device) -> bool:
    """Whether every rank holds the same integer (always true for one process)."""
    if not info.enabled:
        return True
    both = torch.tensor([value, -value], dtype=torch.int64, device=device)  # NCCL needs device tensors
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # max(v) == -max(-v) == min(v) iff all equal
    return both[0].item() == -both[1].item()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart: each rank updates them
    from its own shard), so that all ranks validate, select and save the same model."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DistributedSampler

from hdkd.training.engine import build_optimizer, build_scheduler, forward_loss
from hdkd.training.run import build_criterion
from tests.helpers import ROOT, ddp_step


def torchrun_ddp_step(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "helpers" / "ddp_step.py"), *map(str, args)], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    torchrun_ddp_step(tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # Reference: one process, the same global batch. DDP averages the gradients of the per-rank losses
    # and BatchNorm normalises per rank (SyncBatchNorm is CUDA-only), so the reference takes the global
    # batch as the same two shards the distributed sampler deals out and averages their losses.
    teacher, student, data = ddp_step.setup()
    criterion = build_criterion("hdkd", ddp_step.CFG)
    optimizer = build_optimizer(student, ddp_step.CFG)
    scheduler = build_scheduler(optimizer, ddp_step.CFG, total_steps=ddp_step.CFG.epochs)  # a step a pass
    student.train()
    losses = []
    for rank in (0, 1):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        images, labels = data[list(sampler)]
        losses.append(forward_loss(student, criterion, images, labels, teacher)[0].total)
    optimizer.zero_grad()
    (sum(losses) / 2).backward()
    optimizer.step()
    scheduler.step()

    params = dict(student.named_parameters())
    for name, value in params.items():
        torch.testing.assert_close(rank0[name], value.detach(), rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=name)  # replicas agree
    # BatchNorm statistics (each rank updates them from its own shard) are rank 0's everywhere before
    # validation, so every rank validates, selects and saves the same model.
    for name, value in rank0.items():
        torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=name)
    val0, val1 = (torch.load(tmp_path / f"val{r}.pt", weights_only=True) for r in (0, 1))
    assert val0 == val1
    moved = sum((rank0[n] - p0).abs().sum().item() for n, p0 in ddp_step.setup()[1].named_parameters())
    assert moved > 0  # the step changed the weights: the comparison is not between two untouched models


@pytest.mark.slow
def test_ranks_that_find_different_resume_states_stop_with_a_clear_error(tmp_path):
    torchrun_ddp_step(tmp_path, "unshared-resume")
    for rank in (0, 1):  # both stop (neither waits forever for the other), with the same advice
        assert "every node shares" in (tmp_path / f"error{rank}.txt").read_text()

"""Parameter and MAC counts against hand counts; timing shape and guards."""

import pytest
import torch
from torch import nn

from hdkd.evaluation.efficiency import count_macs, count_parameters, measure_efficiency, median_seconds, time_forward
from tests.helpers.params import section

FAST = section("evaluate", latency_batch_sizes=[1, 4], latency_iters=3, latency_warmup=1)


def tiny_net() -> nn.Module:
    """conv 3->4 (3x3) -> depthwise 3x3 -> BN -> flatten -> linear, on 3x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.BatchNorm2d(4),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    )


def test_macs_match_a_hand_count():
    # conv: 4 out x 3 in x 9 taps x 64 positions; depthwise: 4 x 1 x 9 x 64; linear: 256 x 5.
    # Bias, BatchNorm and GELU are not multiply-accumulates of a matmul or convolution: not counted.
    expected = 4 * 3 * 9 * 64 + 4 * 1 * 9 * 64 + 256 * 5
    net = tiny_net()
    assert count_macs(net, (3, 8, 8)) == expected == 10_496
    assert net.training  # the count ran in eval mode and gave the mode back


class Attention(nn.Module):
    """Fused self-attention, no projections: the input (B, heads, tokens, head width) is q, k and v."""

    def forward(self, x):
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_fused_attention_counts_on_the_cpu():
    # q·kᵀ: 2 heads x 16 x 16 scores x 8 wide; scores·v: the same again. (CUDA kernels are counted by PyTorch.)
    assert count_macs(Attention(), (2, 16, 8)) == 2 * (2 * 16 * 16 * 8) == 8192


def test_parameters_total_and_trainable():
    net = tiny_net()
    conv, dw, bn, linear = 3 * 4 * 9 + 4, 4 * 9 + 4, 2 * 4, 256 * 5 + 5
    assert count_parameters(net) == {"total": conv + dw + bn + linear, "trainable": conv + dw + bn + linear}
    net[0].requires_grad_(False)
    assert count_parameters(net) == {"total": conv + dw + bn + linear, "trainable": dw + bn + linear}


def test_time_forward_reports_consistent_units():
    row = time_forward(tiny_net(), (3, 8, 8), 4, warmup=1, iters=3)
    assert row["device"] == "cpu" and row["batch_size"] == 4 and row["amp"] is False
    assert row["ms_per_batch"] > 0
    assert row["ms_per_image"] == pytest.approx(row["ms_per_batch"] / 4)
    assert row["images_per_s"] == pytest.approx(1000 / row["ms_per_image"])


def test_median_seconds_times_only_the_runs_after_warmup_between_syncs(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr("hdkd.evaluation.efficiency.time.perf_counter", lambda: next(clock))
    events = []
    durations = iter([50, 1, 2, 9])  # the warm-up call's 50 must not count

    def run():
        events.append("run")
        for _ in range(next(durations) - 1):
            next(clock)

    assert median_seconds(run, warmup=1, iters=3, sync=lambda: events.append("sync")) == 2
    assert events == ["sync", "run", "sync"] * 4


def test_measure_efficiency_on_cpu():
    net = tiny_net()
    eff = measure_efficiency(net, 8, FAST)
    assert eff["macs"] == 10_496 and eff["params"]["total"] == count_parameters(net)["total"]
    assert eff["input_shape"] == [3, 8, 8]
    cpu = [(t["device"], t["batch_size"]) for t in eff["timing"] if t["device"] == "cpu"]
    assert cpu == [("cpu", 1), ("cpu", 4)]
    assert all(t["threads"] == torch.get_num_threads() for t in eff["timing"] if t["device"] == "cpu")
    assert len(eff["timing"]) == (4 if torch.cuda.is_available() else 2)


def test_latency_batch_sizes_are_validated():
    with pytest.raises(ValueError, match="distinct positive"):
        section("evaluate", latency_batch_sizes=[0, 32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_timing_with_amp():
    net = tiny_net()
    row = time_forward(net, (3, 8, 8), 4, warmup=1, iters=3, device="cuda", amp=True)
    assert row["device"] == "cuda" and row["amp"] is True and row["ms_per_batch"] > 0

"""benchmarks/distill_step.py: its "official" baseline really re-runs the stage prefixes, for the same loss."""

import json

import torch

from hdkd import models
from tests.helpers.fit import load_benchmark


def test_official_baseline_recomputes_prefixes_for_the_same_loss(monkeypatch):
    bench = load_benchmark("distill_step")
    made = []
    monkeypatch.setattr(bench, "create_model", lambda *a, **k: made.append(models.create_model(*a, **k)) or made[-1])
    variants = bench.make_variants("tiny", 32, 3, torch.device("cpu"))
    student = variants["hdkd"][0]
    [teacher] = [m for m in made if not any(p.requires_grad for p in m.parameters())]
    runs = {}
    for name, net in (("teacher", teacher), ("student", student)):
        for i, stage in enumerate(net.stages):
            stage.register_forward_hook(lambda *_, key=(name, i + 1): runs.__setitem__(key, runs.get(key, 0) + 1))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def count(variant):
        runs.clear()
        loss = variants[variant][1](x, y)
        return loss, {k: runs.get(k, 0) for k in [(n, s) for n in ("teacher", "student") for s in (1, 2, 3)]}

    ours, ours_runs = count("hdkd")
    official, official_runs = count("official")
    assert ours_runs == {(n, s): 1 for n in ("teacher", "student") for s in (1, 2, 3)}
    # SPEC §3: stage 1 runs 4 times, stage 2 three times, stage 3 twice, in both networks.
    assert official_runs == {(n, s): 5 - s for n in ("teacher", "student") for s in (1, 2, 3)}
    assert official.requires_grad
    torch.testing.assert_close(official, ours)  # train-mode BatchNorm: the re-runs give the same maps


def test_benchmark_prints_its_summary(monkeypatch, capsys):
    bench = load_benchmark("distill_step")
    monkeypatch.setitem(bench.CONFIGS, "tiny", dict(size="tiny", image_size=32, batch=4, rounds=1))
    bench.main(["--configs", "tiny"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["config"] == "tiny" and summary["speedup_vs_prefix_recompute"] > 0
    assert set(summary["by_config"]["tiny"]["train_images_per_s"]) == {
        "hdkd", "logit_only", "official", "floor", "teacher", "student"}

"""Time one HDKD training step against the official prefix-recomputing step and the floor.

Variants, timed side by side in interleaved rounds on the same machine:
  hdkd        teacher forward (no grad) + student forward/backward + AdamW step, features from the
              same passes (this project)
  logit_only  the same without the feature loss (λ = 0): what the feature loss costs
  official    the official way: besides the full passes, each network's stage prefixes are re-run
              once per distilled stage (teacher stage 1 runs 4×, stage 2 3×, stage 3 2×; the
              student's with gradients)
  floor       a student-only CE step plus one teacher forward: the least any distillation step costs
  teacher, student   plain CE training steps of the teacher and the student (training throughput)

Usage: python benchmarks/distill_step.py [--configs paper tiny] [--rounds N] [--device cpu|cuda]
The last line printed is a JSON object (paper configuration figures at the top level).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hdkd.models import FrozenTeacher, create_model, model_name
from hdkd.training.engine import forward_loss
from hdkd.training.losses import FeatureDistillationLoss, HDKDLoss, LogitDistillationLoss

CONFIGS = {  # size, image side, batch, timed rounds
    "paper": dict(size="paper", image_size=224, batch=16, rounds=8),  # page-fault-heavy: median of 8
    "tiny": dict(size="tiny", image_size=64, batch=16, rounds=30),
}


def run_prefix(net, x, k):
    for stage in net.stages[:k]:
        x = stage(x)
    return x


def make_variants(size, image_size, num_classes, device):
    teacher_net = create_model(model_name("teacher", size), num_classes, image_size).to(device)
    teacher = FrozenTeacher(teacher_net)
    student = create_model(model_name("hdkd", size), num_classes, image_size).to(device).train()
    plain = create_model(model_name("student", size), num_classes, image_size).to(device).train()
    trainee = create_model(model_name("teacher", size), num_classes, image_size).to(device).train()
    logit = LogitDistillationLoss("soft", 0.5, 1.0)
    stages = (1, 2, 3)
    hdkd = HDKDLoss(logit, FeatureDistillationLoss(stages, beta=1.0), 10.0)
    logit_only = HDKDLoss(logit, None, 0.0)

    def official(x, y):
        # The same loss as "hdkd"; only the stage maps come from re-running each network's prefixes.
        outputs = student(x)
        with torch.no_grad():
            t_logits = teacher_net(x)
            t_feats = [run_prefix(teacher_net, x, s) for s in stages]
        s_feats = [run_prefix(student, x, s) for s in stages]
        return hdkd(outputs, y, t_logits, s_feats, t_feats).total

    def floor(x, y):
        teacher(x)
        return F.cross_entropy(plain(x), y)

    return {
        "hdkd": (student, lambda x, y: forward_loss(student, hdkd, x, y, teacher)[0].total),
        "logit_only": (student, lambda x, y: forward_loss(student, logit_only, x, y, teacher)[0].total),
        "official": (student, official),
        "floor": (plain, floor),
        "teacher": (trainee, lambda x, y: F.cross_entropy(trainee(x), y)),
        "student": (plain, lambda x, y: F.cross_entropy(plain(x), y)),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name, cfg, device, rounds=None, warmup=2):
    num_classes = 7
    variants = make_variants(cfg["size"], cfg["image_size"], num_classes, device)
    optims = {k: torch.optim.AdamW(m.parameters(), lr=5e-5, weight_decay=0.05) for k, (m, _) in variants.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, cfg["image_size"], cfg["image_size"], generator=g).to(device)
    y = torch.randint(0, num_classes, (cfg["batch"],), generator=g).to(device)
    times = {k: [] for k in variants}
    rounds = rounds or cfg["rounds"]
    for r in range(warmup + rounds):
        for k, (_, loss_fn) in variants.items():  # interleaved: drift hits every variant alike
            opt = optims[k]
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(x, y).backward()
            opt.step()
            sync(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "config": name, "image_size": cfg["image_size"], "batch": cfg["batch"], "rounds": rounds,
        "step_s": med,
        "images_per_s": {k: cfg["batch"] / v for k, v in med.items()},
        "speedup_vs_prefix_recompute": med["official"] / med["hdkd"],
        "ratio_to_floor": med["hdkd"] / med["floor"],
        "feature_overhead": med["hdkd"] / med["logit_only"] - 1,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["paper", "tiny"], choices=sorted(CONFIGS))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default per config)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    results = [bench(name, CONFIGS[name], device, args.rounds) for name in args.configs]

    print(f"\nHDKD training step, {device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'config':8} {'variant':11} {'step (s)':>9} {'img/s':>8}")
    for res in results:
        for k in res["step_s"]:
            print(f"{res['config']:8} {k:11} {res['step_s'][k]:9.4f} {res['images_per_s'][k]:8.1f}")
        print(f"{res['config']:8} speedup vs prefix recompute {res['speedup_vs_prefix_recompute']:.2f}x, "
              f"ratio to floor {res['ratio_to_floor']:.3f}, feature overhead {100 * res['feature_overhead']:+.1f}%")
    head = results[0]
    summary = {k: round(head[k], 4) for k in ("speedup_vs_prefix_recompute", "ratio_to_floor", "feature_overhead")}
    summary.update(config=head["config"], device=device.type, by_config={
        r["config"]: {**{k: round(r[k], 4) for k in ("speedup_vs_prefix_recompute", "ratio_to_floor",
                                                     "feature_overhead")},
                      "train_images_per_s": {k: round(v, 1) for k, v in r["images_per_s"].items()}}
        for r in results})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

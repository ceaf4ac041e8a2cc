"""Reproducible CPU numerics (hdkd.infra.numerics, ``train.reproducible``): what the mode costs per training step.

Each measurement is a fresh process (the mode's environment acts only before torch loads) that
trains the teacher, the plain student and the HDKD student for a few AdamW steps on one fixed batch
and reports the median step time of each, and the SHA-256 of its final weights. Variants, run in
interleaved rounds on the same machine:
  off       the library defaults (oneDNN, NNPACK, every core, the CPU's widest instruction set)
  off-1t    the same on one thread: separates the cost of the single thread from that of the kernels
  on        the reproducible mode

Usage: python benchmarks/reproducible_numerics.py [--configs tiny paper] [--rounds N] [--steps N]
       python benchmarks/reproducible_numerics.py --worker --mode on|off [--threads N] [--steps N] ...
The worker prints one JSON line; tests/unit/infra/test_numerics.py runs it under emulated CPUs (instruction sets
capped with ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY; other thread counts).
The last line the benchmark prints is a JSON object of the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from hdkd.infra import numerics  # noqa: E402 (torch-free; must act before torch loads)

CONFIGS = {  # model size, image side, batch, steps timed per process (the first, untimed warm-up step comes on top)
    "tiny": {"size": "tiny", "image_size": 64, "batch": 16, "steps": 10},
    "paper": {"size": "paper", "image_size": 224, "batch": 16, "steps": 2},
}
VARIANTS = {"off": ("off", 0), "off-1t": ("off", 1), "on": ("on", 0)}  # name -> (mode, threads; 0 = default)


def train_and_hash(size: str, image_size: int, batch: int, steps: int) -> dict:
    """``steps`` AdamW steps of each role on one batch -> weights' SHA-256 and median step time (s)."""
    import torch

    from hdkd.config import load_params
    from hdkd.models import FrozenTeacher, create_model, model_name
    from hdkd.roster import roster_entry
    from hdkd.training.engine import build_optimizer, forward_loss
    from hdkd.training.run import build_criterion, recipe

    params = load_params(ROOT / "params.yaml")  # the default pipeline's losses and optimisers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 7, (batch,), generator=g)
    out: dict = {"sha256": {}, "step_s": {}}
    trained = {}
    for role in ("teacher", "student", "hdkd"):
        torch.manual_seed(0)
        model = create_model(model_name(role, size), 7, image_size).train()
        cfg = recipe(params, roster_entry(role))
        criterion, optimizer = build_criterion(role, cfg), build_optimizer(model, cfg)
        teacher = FrozenTeacher(trained["teacher"]) if role == "hdkd" else None
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            forward_loss(model, criterion, x, y, teacher)[0].total.backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        out["sha256"][role] = digest.hexdigest()
        out["step_s"][role] = statistics.median(times[1:])
        trained[role] = model
    return out


def worker(args) -> None:
    if args.mode == "on":
        numerics.apply_env()
    else:  # the library defaults, even under a parent process (pytest) that has the mode's environment
        for key in numerics.REPRODUCIBLE_ENV:
            os.environ.pop(key, None)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # a machine with this many cores, as torch would default to
    numerics.apply_runtime(args.mode == "on")
    result = train_and_hash(args.size, args.image_size, args.batch, args.steps)
    print(json.dumps({**result, "numerics": numerics.environment_facts()}))


def run_worker(mode: str, threads: int = 0, steps: int = 3, size: str = "tiny", image_size: int = 64,
               batch: int = 16, env: dict | None = None) -> dict:
    """One worker process under ``env`` (added to this process's environment) -> its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--threads", str(threads),
           "--steps", str(steps), "--size", size, "--image-size", str(image_size), "--batch", str(batch)]
    proc = subprocess.run(cmd, check=False, env={**os.environ, **(env or {})}, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(name: str, rounds: int, steps: int | None) -> dict:
    cfg = CONFIGS[name]
    steps = steps or cfg["steps"]
    times = {v: {} for v in VARIANTS}
    for _ in range(rounds):
        for variant, (mode, threads) in VARIANTS.items():  # interleaved: load drift hits every variant alike
            res = run_worker(mode, threads, steps, cfg["size"], cfg["image_size"], cfg["batch"])
            for role, t in res["step_s"].items():
                times[variant].setdefault(role, []).append(t)
    med = {v: {r: statistics.median(ts) for r, ts in roles.items()} for v, roles in times.items()}
    return {"config": name, "image_size": cfg["image_size"], "batch": cfg["batch"], "steps": steps, "rounds": rounds,
            "step_s": med, "ratio_on_off": {r: med["on"][r] / med["off"][r] for r in med["on"]},
            "ratio_on_off_1t": {r: med["on"][r] / med["off-1t"][r] for r in med["on"]}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "paper"], choices=sorted(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant and config")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per process (default per config)")
    ap.add_argument("--worker", action="store_true", help="one measurement in this process (JSON line)")
    ap.add_argument("--mode", choices=["on", "off"], default="on")
    ap.add_argument("--threads", type=int, default=0, help="worker: intra-op threads before the mode applies")
    ap.add_argument("--size", default="tiny", choices=["tiny", "paper"])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    results = [bench(name, args.rounds, args.steps) for name in args.configs]
    print(f"\nTraining step time (s), reproducible mode on vs off; {os.cpu_count()} CPUs")
    print(f"{'config':7} {'model':8} {'off':>8} {'off-1t':>8} {'on':>8} {'on/off':>7} {'on/off-1t':>9}")
    for res in results:
        for role, on in res["step_s"]["on"].items():
            print(f"{res['config']:7} {role:8} {res['step_s']['off'][role]:8.4f} {res['step_s']['off-1t'][role]:8.4f} "
                  f"{on:8.4f} {res['ratio_on_off'][role]:6.2f}x {res['ratio_on_off_1t'][role]:8.2f}x")
    print(json.dumps({r["config"]: {k: r[k] for k in ("step_s", "ratio_on_off", "ratio_on_off_1t", "steps", "rounds")}
                      for r in results}))


if __name__ == "__main__":
    main()

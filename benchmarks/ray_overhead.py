"""What running a training stage's runs as Ray tasks costs beside the local executor, on one machine.

The teacher stage (``hdkd.training.stage.train_stage``) on a tiny embedded dataset, tracking off, reproducible
mode: with ``train.executor: local``, one run after another in this process (the training alone),
then ``--workers`` side by side (this process and spawned ones, which import torch first); then with
``ray`` on a local Ray instance of ``--workers`` CPUs, twice: cold (the instance just started, its
workers spawn and import torch) and warm (the same instance again, its workers reused). Ray's start
is timed apart. Per-task overhead: (Ray's stage time - the local side-by-side one) / runs; and, warm,
against the one-by-one training spread perfectly over the workers: (warm - serial / workers) x
workers / runs (what each task adds to the training itself: scheduling, arguments, results). The model
files of every variant are compared byte for byte. The last line printed is a JSON object.

    python benchmarks/ray_overhead.py [--seeds 0 1] [--fractions 0.5 1.0] [--epochs 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from hdkd.infra import numerics  # noqa: E402

numerics.apply_env()  # before torch loads (hdkd.training.stage imports it), as pipeline/__init__.py does

from hdkd.config import parse_params, read_params_yaml  # noqa: E402
from hdkd.data.prepare import prepare_dataset  # noqa: E402
from hdkd.data.sources import fetch_dataset  # noqa: E402
from hdkd.training.run import StagePaths  # noqa: E402
from hdkd.training.stage import train_stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_params(args: argparse.Namespace, workdir: Path, executor: str, workers: int):
    raw = read_params_yaml(ROOT / "params.yaml")
    raw.update(seeds=args.seeds, fractions=args.fractions, baseline_fractions=[1.0])
    raw["data"].update(root=str(workdir / "raw"), image_size=32)
    raw["data"]["synthetic"].update(layout="brain_tumor_mri", num_images=args.images, native_size=40)
    raw["train"].update(run_workers=workers, executor=executor, reproducible=True)
    raw["teacher"]["epochs"] = args.epochs
    raw["tracking"]["enabled"] = False
    return parse_params(raw)


def timed_stage(params, workdir: Path, tag: str) -> tuple[float, dict[str, bytes]]:
    out = workdir / tag
    paths = StagePaths(workdir / "prepared", workdir / "prepared", out / "models", out / "teacher.json",
                       out / "checkpoints")
    start = time.perf_counter()
    train_stage("teacher", params, paths)
    wall = time.perf_counter() - start
    return wall, {p.relative_to(paths.out_dir).as_posix(): p.read_bytes() for p in paths.out_dir.rglob("*.pt")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        serial = tiny_params(args, workdir, "local", 1)
        fetch_dataset(serial.data, workdir / "raw")
        prepare_dataset(serial.data, serial.seed, workdir / "prepared", workdir / "raw" / "source.json")
        runs = len(args.seeds) * len(args.fractions)
        serial_s, serial_files = timed_stage(serial, workdir, "serial")
        local_s, local_files = timed_stage(tiny_params(args, workdir, "local", args.workers), workdir, "local")
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        start_s = time.perf_counter() - start
        try:
            on_ray = tiny_params(args, workdir, "ray", args.workers)
            cold_s, cold_files = timed_stage(on_ray, workdir, "ray-cold")
            warm_s, warm_files = timed_stage(on_ray, workdir, "ray-warm")
        finally:
            ray.shutdown()
    result = {"runs": runs, "epochs": args.epochs, "workers": args.workers, "local_serial_s": round(serial_s, 2),
              "local_s": round(local_s, 2),
              "ray_start_s": round(start_s, 2), "ray_cold_s": round(cold_s, 2), "ray_warm_s": round(warm_s, 2),
              "ratio_cold": round(cold_s / local_s, 2), "ratio_warm": round(warm_s / local_s, 2),
              "per_task_overhead_cold_s": round((cold_s - local_s) / runs, 2),
              "per_task_overhead_warm_s": round((warm_s - local_s) / runs, 2),
              "per_task_overhead_warm_vs_ideal_s": round((warm_s - serial_s / args.workers) * args.workers / runs, 2),
              "identical_model_files": serial_files == local_files == cold_files == warm_files}
    print(f"teacher stage, {runs} runs x {args.epochs} epochs: local one by one {serial_s:.1f} s, "
          f"{args.workers} side by side {local_s:.1f} s; "
          f"Ray start {start_s:.1f} s, then cold {cold_s:.1f} s ({cold_s / local_s:.2f}x), warm {warm_s:.1f} s "
          f"({warm_s / local_s:.2f}x); per task {result['per_task_overhead_cold_s']:+.2f} s cold, "
          f"{result['per_task_overhead_warm_s']:+.2f} s warm, "
          f"{result['per_task_overhead_warm_vs_ideal_s']:+.2f} s warm against perfect parallelism")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Calibration of the embedded benchmark: difficulty and cost of the default pipeline's trainings.

Generates the synthetic dataset with the given settings through the real stage functions
(``fetch_dataset``, ``prepare_dataset``) in a scratch directory, then for each seed trains the
teacher, the plain student and HDKD (distilled from that seed's and fraction's teacher) on nested
training subsets (:func:`hdkd.training.run.training_subset`, as the training stages draw them) through
``hdkd.training.run.run_training``, and prints, per training: test accuracy and macro-F1, wall seconds,
and CPU seconds (``time.process_time``, all threads). On a shared machine wall time is inflated;
CPU seconds / cores estimates the uncontended time. The last line is a JSON object with every
row and the estimated time of the default pipeline's trainings (seeds x fractions x models).

Usage (settings not given are params.yaml's)::

    python benchmarks/embedded_benchmark.py --set data.image_size=32 data.synthetic.ambiguity=0.4 \\
        --seeds 0 1 --fractions 0.1 1.0 [--pipeline-seeds 3 --pipeline-fractions 0.1 0.25 0.5 1.0 \\
        --pipeline-models 5 --cores 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from hdkd.infra import numerics  # noqa: E402

numerics.apply_env()  # before torch loads, as pipeline/__init__.py does for the stages

ROOT = Path(__file__).resolve().parents[1]


def params_with(overrides: list[str]):
    """params.yaml with dotted ``key=value`` overrides (values parsed as YAML)."""
    from hdkd.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for item in overrides:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = raw
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return parse_params(raw)


def test_scores(model_path: Path, test) -> dict[str, float]:
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    from hdkd.data.augment import eval_transform
    from hdkd.data.loader import PackedDataset
    from hdkd.models.checkpoint import load_model

    model, _ = load_model(model_path, torch.device("cpu"))
    model.eval()
    loader = torch.utils.data.DataLoader(PackedDataset(test, eval_transform()), batch_size=256)
    with torch.inference_mode():
        pred = torch.cat([model(x).argmax(1) for x, _ in loader]).numpy()
    return {"accuracy": accuracy_score(test.labels, pred),
            "f1_macro": f1_score(test.labels, pred, average="macro", labels=range(len(test.classes)))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params.yaml overrides")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 1.0])
    parser.add_argument("--roles", nargs="+", default=["teacher", "student", "hdkd"],
                        help="models of the roster (the params' baselines and kd methods too); a distilled one after "
                             "the teacher")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default). On a machine shared with other jobs use "
                             "1: a parallel region's threads wait for each other, and a descheduled one stalls all")
    parser.add_argument("--cores", type=float, default=2, help="for the uncontended estimate: CPU s / cores")
    parser.add_argument("--pipeline-seeds", type=int, default=3)
    parser.add_argument("--pipeline-fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--pipeline-models", type=int, default=5, help="models trained (baselines included)")
    args = parser.parse_args(argv)

    import logging

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        return run(args, work)


def run(args, work: Path) -> dict:
    import torch

    from hdkd.data.packed import load_split
    from hdkd.data.prepare import prepare_dataset
    from hdkd.data.sources import fetch_dataset
    from hdkd.infra.distributed import DistInfo
    from hdkd.roster import roster_entry
    from hdkd.training.run import StagePaths, make_runtime, run_training, training_data

    params = params_with(args.set + [f"data.root={work / 'raw'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"])
    t0, c0 = time.perf_counter(), time.process_time()
    fetch_dataset(params.data, work / "raw")
    prepare_dataset(params.data, params.seed, work / "prepared", source_record=work / "raw" / "source.json")
    data_wall, data_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"data: generate + prepare {data_wall:.1f} s wall, {data_cpu:.1f} s CPU", flush=True)

    size = params.data.image_size
    train = load_split(work / "prepared", "train", image_size=size)
    val = val_split = load_split(work / "prepared", "val", image_size=size)
    test = load_split(work / "prepared", "test", image_size=size)
    print(f"splits: train {len(train)}, val {len(val)}, test {len(test)}; test class counts {test.class_counts()}")
    rt = make_runtime(params, torch.device("cpu"), DistInfo())
    rt.progress = False

    rows = []
    for seed in args.seeds:
        run_params = params.model_copy(update={"seed": seed})
        for fraction in args.fractions:
            for role in args.roles:
                out = work / "models" / f"seed{seed}" / f"frac{fraction}"
                paths = StagePaths(work / "prepared", work / "prepared", out / role, out / f"{role}.json",
                                   work / "resume" / role,
                                   out / "teacher" / "model.pt" if roster_entry(role, params).distills else None)
                (part, val, classes), hook = training_data(run_params, paths, rt, (seed, fraction))  # as the stages
                t, c = time.perf_counter(), time.process_time()
                summary = run_training(role, run_params, paths, (part, val, classes), rt, batch_hook=hook,
                                       run=(seed, fraction))  # the run's fraction: its step budget, as the stages
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                row = {"role": role, "seed": seed, "fraction": fraction, "train_images": len(part),
                       **test_scores(out / role / "model.pt", test), "val_accuracy": summary["val_accuracy"],
                       "val_f1_macro": test_scores(out / role / "model.pt", val_split)["f1_macro"],
                       "wall_s": wall, "cpu_s": cpu}
                rows.append(row)
                print(f"{role:8s} seed {seed} frac {fraction:<5} n={len(part):5d}  test acc {row['accuracy']:.3f}  "
                      f"F1 {row['f1_macro']:.3f}  val acc {row['val_accuracy']:.3f}  val F1 {row['val_f1_macro']:.3f}  "
                      f"{wall:6.1f} s wall  "
                      f"{cpu:6.1f} s CPU", flush=True)
    table = pd.DataFrame(rows)
    print()
    print(table.pivot_table(index="role", columns=["fraction", "seed"], values="accuracy", sort=False).round(3))
    print(table.pivot_table(index="role", columns=["fraction", "seed"], values="f1_macro", sort=False).round(3))
    # Cost scales with the images seen: per role, uncontended seconds per full-data training
    # from a least-squares fit of CPU s / cores against the fraction (intercept = fixed start-up).
    per_full = {}
    for role, g in table.groupby("role", sort=False):
        slope, intercept = np.polyfit(g["fraction"], g["cpu_s"] / args.cores, 1) if g["fraction"].nunique() > 1 \
            else (g["cpu_s"].mean() / args.cores, 0.0)
        per_full[role] = {"per_full_s": float(slope), "fixed_s": float(intercept)}
    mean_slope = np.mean([v["per_full_s"] for v in per_full.values()])
    mean_fixed = np.mean([v["fixed_s"] for v in per_full.values()])
    runs = args.pipeline_seeds * len(args.pipeline_fractions) * args.pipeline_models
    trainings = args.pipeline_seeds * args.pipeline_models * sum(args.pipeline_fractions)
    estimate = trainings * mean_slope + runs * mean_fixed
    print(f"\nper role (uncontended, CPU s / {args.cores}): "
          + ", ".join(f"{r}: {v['per_full_s']:.1f} s per full-data training + {v['fixed_s']:.1f} s fixed"
                      for r, v in per_full.items()))
    print(f"estimated trainings of the default pipeline ({args.pipeline_seeds} seeds x {args.pipeline_fractions} x "
          f"{args.pipeline_models} models = {runs} runs): {estimate:.0f} s")
    result = {"settings": args.set, "data_wall_s": data_wall, "data_cpu_s": data_cpu, "rows": rows,
              "per_role": per_full, "estimated_training_s": estimate}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

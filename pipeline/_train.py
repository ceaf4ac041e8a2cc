"""The command line of the training stages ``train_<model>`` and ``train_baseline@<key>``: dvc.yaml's paths."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(name: str | None, argv: list[str] | None = None) -> dict:
    """Train the roster's model ``name`` (plain or under torchrun); ``None``: the baseline the first argument names."""
    from hdkd.config import load_params
    from hdkd.models.baselines import check_baselines
    from hdkd.roster import roster_entry
    from hdkd.training.run import StagePaths
    from hdkd.training.stage import train_stage

    baseline = name is None
    parser = argparse.ArgumentParser(prog="python -m pipeline." + ("train_baseline" if baseline else f"train_{name}"))
    if baseline:  # the key names the default paths: read first
        parser.add_argument("name", help="the baseline: a key of params.yaml's baselines")
        name = parser.parse_known_args(argv)[0].name
    add = parser.add_argument
    add("--params", type=Path, default=Path("params.yaml"))
    add("--train", type=Path, default=Path("data/balanced"), help="packed training split")
    add("--val", type=Path, default=Path("data/prepared"), help="packed validation split")
    add("--out", type=Path, default=Path(f"models/{name}"), help="model.pt and run.json")
    add("--metrics", type=Path, default=Path(f"reports/train/{name}.json"))
    add("--resume-dir", type=Path, default=Path(f"checkpoints/{name}"), help="resume states (outside DVC's outputs)")
    if not baseline and (teacher := roster_entry(name).teacher):
        add("--teacher", type=Path, default=Path(f"models/{teacher}"), help="its run (s, f) teaches run (s, f)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)  # validated before any work
    if baseline and name not in params.baselines:
        parser.error(f"no baseline {name!r} in {args.params}'s baselines; known: {', '.join(params.baselines)}")
    if baseline:
        check_baselines(params, args.params)
    paths = StagePaths(args.train, args.val, args.out, args.metrics, args.resume_dir, getattr(args, "teacher", None))
    return train_stage(name, params, paths)

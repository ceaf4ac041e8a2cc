"""The command line shared by the training stages ``train_<model>`` and ``train_baseline@<key>``; its
defaults are the paths ``dvc.yaml`` declares, named after the model (:mod:`hdkd.roster`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from hdkd.config import load_params
from hdkd.models.baselines import check_baselines
from hdkd.roster import roster_entry
from hdkd.training.run import StagePaths
from hdkd.training.stage import train_stage


def main(name: str | None, argv: list[str] | None = None) -> dict[str, Any]:
    """Train the roster's model ``name`` (``python -m pipeline.train_<name>``, plain or under torchrun);
    ``name=None``: the baseline named by the first argument (``python -m pipeline.train_baseline <key>``)."""
    argv = sys.argv[1:] if argv is None else argv
    baseline = name is None
    if baseline:  # the key names the default paths: read it before the full parser is built
        key = argparse.ArgumentParser(add_help=False)
        key.add_argument("name", nargs="?")
        name = key.parse_known_args(argv)[0].name or "<key>"
    prog = "python -m pipeline." + ("train_baseline" if baseline else roster_entry(name).stage)
    parser = argparse.ArgumentParser(prog=prog)
    if baseline:
        parser.add_argument("name", help="the baseline: a key of params.yaml's baselines")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train", type=Path, default=Path("data/balanced"), help="packed training split")
    parser.add_argument("--val", type=Path, default=Path("data/prepared"), help="packed validation split")
    parser.add_argument("--out", type=Path, default=Path(f"models/{name}"), help="model.pt and run.json")
    parser.add_argument("--metrics", type=Path, default=Path(f"reports/train/{name}.json"))
    parser.add_argument("--resume-dir", type=Path, default=Path(f"checkpoints/{name}"),
                        help="resume states (kept outside DVC's outputs)")
    if not baseline and roster_entry(name).distills:
        parser.add_argument("--teacher", type=Path, default=Path(f"models/{roster_entry(name).teacher}"),
                            help="the teacher's model directory: run (s, f) distils from its run (s, f)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)  # validated before any work
    if baseline and args.name not in params.baselines:
        parser.error(f"no baseline {args.name!r} in {args.params}'s baselines; known: {', '.join(params.baselines)}")
    if baseline:
        check_baselines(params, args.params)
    paths = StagePaths(args.train, args.val, args.out, args.metrics, args.resume_dir, getattr(args, "teacher", None))
    return train_stage(args.name if baseline else name, params, paths)

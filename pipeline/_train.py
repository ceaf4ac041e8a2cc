"""The command line shared by the training stages ``train_<model>``; its defaults are the paths
``dvc.yaml`` declares, named after the model (:mod:`hdkd.roster`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from hdkd.config import load_params
from hdkd.roster import roster_entry
from hdkd.train import StagePaths, train_stage


def main(name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Train the roster's model ``name`` (``python -m pipeline.train_<name>``, plain or under torchrun)."""
    entry = roster_entry(name)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{entry.stage}")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--train", type=Path, default=Path("data/balanced"), help="packed training split")
    parser.add_argument("--val", type=Path, default=Path("data/prepared"), help="packed validation split")
    parser.add_argument("--out", type=Path, default=Path(f"models/{name}"), help="model.pt and run.json")
    parser.add_argument("--metrics", type=Path, default=Path(f"reports/train/{name}.json"))
    parser.add_argument("--resume-dir", type=Path, default=Path(f"checkpoints/{name}"),
                        help="resume states (kept outside DVC's outputs)")
    if entry.distills:
        parser.add_argument("--teacher", type=Path, default=Path(f"models/{entry.teacher}/model.pt"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)  # validated before any work
    paths = StagePaths(args.train, args.val, args.out, args.metrics, args.resume_dir, getattr(args, "teacher", None))
    return train_stage(name, params, paths)

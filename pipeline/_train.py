"""The command line of the training stages ``train_<model>``, ``train_baseline@<key>``, ``train_kd@<key>``."""

import argparse
import logging
from pathlib import Path

KEYED = {"baselines": ("train_baseline", "baseline"), "kd": ("train_kd", "kd method")}  # group: module, one of them
PATHS = {"train": "data/balanced", "val": "data/prepared", "out": "models/{name}",
         "metrics": "reports/train/{name}.json", "resume_dir": "checkpoints/{name}",
         "run_record": "reports/train/{name}.run.json"}  # dvc.yaml's, in StagePaths' order (teacher: before the last)


def main(name: str | None, argv: list[str] | None = None, group: str = "baselines") -> dict:
    """Train the roster's model ``name``; ``None``: the model of params' ``group`` the first argument names."""
    from hdkd.config import load_params
    from hdkd.models.baselines import check_baselines
    from hdkd.roster import roster_entry
    from hdkd.training.run import StagePaths
    from hdkd.training.stage import train_stage
    keyed, (module, one) = name is None, KEYED[group]
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{module if keyed else f'train_{name}'}", add_help=False)
    if keyed:  # the key names the default paths: read it first (--help is added after, to list them all)
        parser.add_argument("name", nargs="?", default="<key>", help=f"the model: a key of params.yaml's {group}")
        name = parser.parse_known_args(argv)[0].name
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for option, default in PATHS.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=Path, default=Path(default.format(name=name)))
    teacher = "teacher" if keyed and group == "kd" else None if keyed else roster_entry(name).teacher  # kd: the teacher
    if teacher:
        parser.add_argument("--teacher", type=Path, default=Path(f"models/{teacher}"), help="run (s, f) teaches (s, f)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)  # validated before any work
    if keyed and name not in getattr(params, group):
        parser.error(f"no {one} {name!r} in {args.params}'s {group}; known: {', '.join(getattr(params, group))}")
    if keyed:
        check_baselines(params, args.params)
    paths = [getattr(args, k) for k in PATHS if k != "run_record"]
    return train_stage(name, params, StagePaths(*paths, getattr(args, "teacher", None), args.run_record))

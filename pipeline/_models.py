"""The command line shared by the stages that run the trained models on the test split (evaluate, export)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any


def parse(prog: str, doc: str, out: str, argv: list[str] | None, **extra: tuple[str, str]
          ) -> tuple[argparse.Namespace, Any]:
    """``--params``, ``--data`` (the packed test split), ``--models`` (``<dir>/<model>/model.pt``), ``--out``
    and ``extra`` path options (``name=(default, help)``); the validated params with the arguments."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="packed test split")
    parser.add_argument("--models", type=Path, default=Path("models"), help="<dir>/<model>/model.pt")
    parser.add_argument("--out", type=Path, default=Path(out))
    for name, (default, help_text) in extra.items():
        parser.add_argument(f"--{name}", type=Path, default=Path(default), help=help_text)
    args = parser.parse_args(argv)
    from hdkd.config import load_params  # after start(), as the library is

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args, load_params(args.params)

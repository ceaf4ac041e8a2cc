"""DVC stage `balance`: oversample the prepared training split (balance.method) into data/balanced."""

from __future__ import annotations

import argparse
import logging

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.config import load_params
    from hdkd.data.balance import balance_training_split

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--out", default="data/balanced")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    balance_training_split(params.balance, params.augment, params.seed, args.prepared, args.out)


if __name__ == "__main__":
    start()
    main()

"""DVC stage `download`: make data.dataset's raw data available and verified (download, generate
or validate in place) and record what identifies it in data/raw/source.json."""

from __future__ import annotations

import argparse
import logging

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.config import load_params
    from hdkd.data.sources import fetch_dataset
    from hdkd.models.baselines import check_baselines

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/raw", help="where the source record goes (the stage's output)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    check_baselines(params, args.params)  # the first stage: a bad baseline fails before any work
    fetch_dataset(params.data, args.out)


if __name__ == "__main__":
    start()
    main()

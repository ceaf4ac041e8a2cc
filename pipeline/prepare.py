"""DVC stage `prepare`: decode, split (train/val/test) and pack the raw data into data/prepared."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> None:
    from hdkd.config import load_params
    from hdkd.data.prepare import prepare_dataset
    from hdkd.data.sources import SOURCE_RECORD

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", default="data/raw", help="the download stage's output (its source record)")
    parser.add_argument("--out", default="data/prepared")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    prepare_dataset(params.data, params.seed, args.out, source_record=Path(args.raw) / SOURCE_RECORD)


if __name__ == "__main__":
    start()
    main()

"""DVC stage `explain`: where the teacher and the HDKD student look, on the first test images of each class.

Writes reports/explain/explanations.png (image | teacher Grad-CAM | HDKD Grad-CAM | HDKD rollout
from the class and distillation tokens) and reports/explain/explain.json (the sanity check:
rank correlation of each map with a randomly initialised network's; teacher-student agreement).
"""

import argparse
import logging
from pathlib import Path

from pipeline import start


def main(argv: list[str] | None = None) -> dict:
    from hdkd.config import load_params
    from hdkd.roster import require_trained
    from hdkd.use.explain import explain_test_split

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="seed: the random networks of the sanity check")
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher/model.pt"))
    parser.add_argument("--hdkd", type=Path, default=Path("models/hdkd/model.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="packed test split")
    parser.add_argument("--out", type=Path, default=Path("reports/explain"))
    parser.add_argument("--per-class", type=int, default=2, help="test images per class in the figure")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1, got {args.per_class}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params(args.params)
    require_trained({"teacher": args.teacher, "hdkd": args.hdkd})
    return explain_test_split(args.teacher, args.hdkd, args.data, args.out, params.data.image_size,
                              args.per_class, params.seed, params.report.dpi)


if __name__ == "__main__":
    start()
    main()

"""The bootstrap's speed: hdkd.evaluation.metrics.bootstrap_replicates (all resamples at once, one bincount)
against the plain loop (scikit-learn's accuracy and macro-F1 per resample), side by side on the same resamples.

Usage: python benchmarks/bootstrap.py [--n 2000] [--classes 7] [--resamples 1000] [--rounds 3]
The last line printed is a JSON object: seconds of each, and the loop's time over the vectorised one's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from hdkd.evaluation.metrics import bootstrap_replicates


def plain_loop(y: np.ndarray, pred: np.ndarray, classes: int, resamples: int, seed: int) -> None:
    idx = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))
    for row in idx:
        accuracy_score(y[row], pred[row])
        f1_score(y[row], pred[row], labels=range(classes), average="macro", zero_division=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="test images")
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(1)
    y = rng.integers(0, args.classes, args.n)
    pred = np.where(rng.random(args.n) < 0.7, y, rng.integers(0, args.classes, args.n))
    times: dict[str, list[float]] = {"vectorised": [], "plain_loop": []}
    for _ in range(args.rounds):  # interleaved: both see the same machine load
        for name, fn in (("vectorised", bootstrap_replicates), ("plain_loop", plain_loop)):
            start = time.perf_counter()
            fn(y, pred, args.classes, args.resamples, 0)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, seconds in median.items():
        print(f"{name:>10}: {seconds:.3f} s for {args.resamples} resamples of {args.n} predictions")
    print(json.dumps({**{f"{k}_s": round(v, 4) for k, v in median.items()},
                      "speedup": round(median["plain_loop"] / median["vectorised"], 1)}))


if __name__ == "__main__":
    main()

"""One training epoch of the tiny teacher, the tiny student and each baseline of a params file.

The engine's ``fit`` (AdamW, validation included, no augmentation) on random tensors shaped like
the embedded dataset's training split at ``data.image_size`` (2,167 train / 383 validation
images of 3,000), batch ``train.batch_size``, one thread. CPU seconds of the process are reported
beside wall seconds: they stay comparable when other processes share the cores.
The last line printed is a JSON object with the figures. Usage::

    python benchmarks/baseline_epochs.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from hdkd.config import load_params  # noqa: E402
from hdkd.evaluation.efficiency import count_macs, count_parameters  # noqa: E402
from hdkd.models import create_model  # noqa: E402
from hdkd.roster import roster  # noqa: E402
from hdkd.training.engine import FitData, FitSettings, Runtime, fit  # noqa: E402
from hdkd.training.run import build_criterion, network_spec  # noqa: E402

N_TRAIN, N_VAL, CLASSES = 2167, 383, 7  # 3,000 images: 15 % test, then 15 % of the rest for validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    params = load_params(parser.parse_args().params)
    size = params.data.image_size
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as the engine's CPU runtime
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N_TRAIN + N_VAL, 3, size, size, generator=g)
    labels = torch.randint(0, CLASSES, (N_TRAIN + N_VAL,), generator=g)
    train, val = TensorDataset(images[:N_TRAIN], labels[:N_TRAIN]), TensorDataset(images[N_TRAIN:], labels[N_TRAIN:])
    cfg = params.student.model_copy(update={"epochs": 1})  # one epoch of the student's recipe for every model
    settings = FitSettings(cfg, seed=0, batch_size=params.train.batch_size)
    rows = {}
    for entry in (e for e in roster(params) if not e.distills):  # networks as the pipeline builds them
        name, overrides = network_spec(params, entry)
        torch.manual_seed(0)
        model = create_model(name, CLASSES, size, **overrides)
        wall, cpu = time.perf_counter(), time.process_time()
        fit(model, build_criterion("student", cfg), FitData(train, val), Runtime(torch.device("cpu"), progress=False),
            settings)
        key = entry.name
        rows[key] = {"params": count_parameters(model)["total"], "macs": count_macs(model, (3, size, size)),
                     "epoch_cpu_s": round(time.process_time() - cpu, 2),
                     "epoch_wall_s": round(time.perf_counter() - wall, 2)}
        print(key, rows[key], flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""One distillation step under torchrun (2 CPU processes, gloo); run by tests/unit/infra/test_distributed.py.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_step.py OUT_DIR [unshared-resume]

``unshared-resume``: one epoch with a resume directory, then a longer run in which rank 1 looks
for the resume state in a directory of its own (as on a node that does not share the file system).
"""

import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from hdkd.infra.distributed import init_distributed, shutdown
from hdkd.models import FrozenTeacher, create_model
from hdkd.training.engine import FitData, FitSettings, Runtime, fit
from hdkd.training.run import build_criterion
from tests.helpers.params import section

# SGD: Adam would turn float-noise gradients (e.g. of pre-norm biases that a following BatchNorm
# cancels) into full-size steps of arbitrary sign, hiding the comparison in noise.
CFG = section("distill", epochs=1, optimizer="sgd", lr=0.05, weight_decay=0.05, momentum=0.9, schedule="none")
GLOBAL_BATCH = 8


def setup():
    """Identical on every process and in the single-process reference."""
    torch.manual_seed(0)
    teacher = FrozenTeacher(create_model("teacher_tiny", 3, image_size=32))
    student = create_model("hdkd_tiny", 3, image_size=32)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.arange(GLOBAL_BATCH) % 3)
    return teacher, student, data


def main(out: Path):
    info = init_distributed("cpu")
    teacher, student, data = setup()
    rt = Runtime(torch.device("cpu"), info, progress=False)
    result = fit(DistributedDataParallel(student), build_criterion("hdkd", CFG), FitData(data, data), rt,
                 FitSettings(CFG, seed=0, batch_size=GLOBAL_BATCH), teacher=teacher)
    torch.save(student.state_dict(), out / f"rank{info.rank}.pt")
    torch.save({k: result.history[0][k] for k in ("val_loss", "val_accuracy")}, out / f"val{info.rank}.pt")
    shutdown(info)


def unshared_resume(out: Path):
    info = init_distributed("cpu")
    teacher, student, data = setup()
    rt = Runtime(torch.device("cpu"), info, progress=False)
    settings = FitSettings(CFG, seed=0, batch_size=GLOBAL_BATCH, resume_dir=out / "shared", fingerprint="f")
    fit(DistributedDataParallel(student), build_criterion("hdkd", CFG), FitData(data, data), rt, settings, teacher=teacher)
    longer = CFG.model_copy(update={"epochs": 2})
    settings = replace(settings, optim=longer, resume_dir=out / ("shared" if info.is_main else "node1"))
    try:
        fit(DistributedDataParallel(student), build_criterion("hdkd", longer), FitData(data, data), rt, settings, teacher=teacher)
    except RuntimeError as e:
        (out / f"error{info.rank}.txt").write_text(str(e))
    shutdown(info)


if __name__ == "__main__":
    (unshared_resume if sys.argv[2:] == ["unshared-resume"] else main)(Path(sys.argv[1]))

"""The models of the pipeline: one table that training, evaluation, figures and the report read.

A model's name names everything it owns: its DVC stage ``train_<name>``, ``models/<name>/``,
``reports/train/<name>.json`` and its MLflow run. Its training recipe is the params section it
names (the HDKD student's is ``distill``: the recipe *and* the distillation loss, so that
``dvc exp run -S distill.alpha=..`` reads as what it changes). Adding a model is one entry here
(and its stage in ``dvc.yaml``, which ``tests/test_roster.py`` holds to this table).

Torch-free: the report stage reads it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the role: models/<name>/, reports/train/<name>.json, the bundle's key
    section: str  # params.yaml section holding the training recipe (an OptimConfig)
    registry: str  # registry prefix: the network is <registry>_<model.size> (hdkd.models.model_name)
    label: str  # in tables and figures
    color: str  # in figures, the same in every one
    description: str  # one phrase for the report's note on the models
    teacher: str | None = None  # the model it is distilled from: that model's model.pt is an input

    @property
    def stage(self) -> str:
        """The DVC stage that trains it."""
        return f"train_{self.name}"

    @property
    def distills(self) -> bool:
        return self.teacher is not None


ROSTER: tuple[ModelEntry, ...] = (
    ModelEntry("teacher", "teacher", "teacher", "Teacher", "#4c72b0", "CNN"),
    ModelEntry("student", "student", "student", "Student", "#dd8452", "hybrid CNN + transformer"),
    ModelEntry("hdkd", "distill", "hdkd", "HDKD", "#55a868", "the student distilled from the teacher",
               teacher="teacher"),
)
MODEL_NAMES = tuple(entry.name for entry in ROSTER)  # the report's order


def roster_entry(name: str) -> ModelEntry:
    """The entry of model ``name``; ``KeyError`` naming the known models otherwise."""
    for entry in ROSTER:
        if entry.name == name:
            return entry
    raise KeyError(f"no model {name!r} in the roster; known: {', '.join(MODEL_NAMES)}")


def model_files(models_dir: str | os.PathLike) -> dict[str, Path]:
    """``<models_dir>/<name>/model.pt`` of every model in the roster; all must exist (else: which stages to run)."""
    files = {m.name: Path(models_dir) / m.name / "model.pt" for m in ROSTER}
    missing = [m for m in ROSTER if not files[m.name].is_file()]
    if missing:
        raise FileNotFoundError(f"trained models missing: {[str(files[m.name]) for m in missing]}; run "
                                f"`dvc repro {' '.join(m.stage for m in missing)}` first")
    return files

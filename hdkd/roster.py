"""The models of the pipeline: one table that training, evaluation, figures and the report read.

A model's name names everything it owns: its DVC stage ``train_<name>``, ``models/<name>/``,
``reports/train/<name>.json`` and its MLflow run. Its training recipe is the params section it
names (the HDKD student's is ``distill``: the recipe *and* the distillation loss, so that
``dvc exp run -S distill.alpha=..`` reads as what it changes). Adding a model is one entry here
(and its stage in ``dvc.yaml``, which ``tests/test_roster.py`` holds to this table).

A run's models are these plus one entry per comparison baseline of its params (:func:`roster`):
``params.yaml``'s ``baselines.<key>`` trained by the stage ``train_baseline@<key>`` (a ``foreach``
in ``dvc.yaml``) into ``models/<key>/``, like the others.

Torch-free: the report stage reads it too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the role: models/<name>/, reports/train/<name>.json, the bundle's key
    section: str  # params.yaml section holding the training recipe (an OptimConfig)
    registry: str  # registry prefix: the network is <registry>_<model.size> (hdkd.models.model_name)
    label: str  # in tables and figures
    color: str  # in figures, the same in every one
    description: str  # one phrase for the report's note on the models
    teacher: str | None = None  # the model it is distilled from: that model's model.pt is an input
    baseline: bool = False  # a timm baseline: ``registry`` is the network, ``timm:<architecture>``

    @property
    def stage(self) -> str:
        """The DVC stage that trains it."""
        return f"train_baseline@{self.name}" if self.baseline else f"train_{self.name}"

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
# Colours of the models outside ROSTER, in their order: the baselines, then any other model a figure shows.
EXTRA_COLORS = ("#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def roster(params: Any = None) -> tuple[ModelEntry, ...]:
    """The models of a run: ROSTER, then its params' baselines in their order.

    ``params`` is a :class:`hdkd.config.Params`, its ``to_dict()`` form (a bundle's ``params``; one
    without ``baselines`` has none), or ``None`` for ROSTER alone.
    """
    if params is None:
        return ROSTER
    baselines = params.get("baselines") or {} if isinstance(params, Mapping) else params.baselines
    return ROSTER + tuple(baseline_entry(key, spec["timm"] if isinstance(spec, Mapping) else spec.timm, i)
                          for i, (key, spec) in enumerate(baselines.items()))


def baseline_entry(key: str, arch: str, index: int) -> ModelEntry:
    """The entry of baseline ``key`` (timm ``arch``), the ``index``-th of its params."""
    return ModelEntry(key, f"baselines.{key}", f"timm:{arch}", f"{key_label(key)} (timm {arch})",
                      EXTRA_COLORS[index % len(EXTRA_COLORS)], f"timm {arch} trained from scratch",
                      baseline=True)


def key_label(key: str) -> str:
    """A baseline key as a name: ``vit`` -> ``VIT`` (a short key reads as an acronym), ``wide_resnet`` ->
    ``Wide resnet``."""
    return key.upper() if len(key) <= 3 else key.replace("_", " ").capitalize()


def roster_entry(name: str, params: Any = None) -> ModelEntry:
    """The entry of model ``name`` among :func:`roster` ``(params)``; ``KeyError`` naming the known models otherwise."""
    entries = roster(params)
    for entry in entries:
        if entry.name == name:
            return entry
    raise KeyError(f"no model {name!r} in the roster; known: {', '.join(e.name for e in entries)}")


def model_files(models_dir: str | os.PathLike, params: Any = None) -> dict[str, Path]:
    """``<models_dir>/<name>/model.pt`` of every model of the run (:func:`roster`: the paper's models and
    ``params``' baselines), in report order; all must exist (else: which stages to run)."""
    return require_trained({m.name: Path(models_dir) / m.name / "model.pt" for m in roster(params)}, params)


def require_trained(files: Mapping[str, Path], params: Any = None) -> Mapping[str, Path]:
    """``files`` (model name -> its ``model.pt``) if they all exist; else an error naming the stages to run."""
    missing = [name for name, path in files.items() if not Path(path).is_file()]
    if missing:
        stages = " ".join(roster_entry(name, params).stage for name in missing)
        raise FileNotFoundError(f"trained models missing: {[str(files[n]) for n in missing]}; run "
                                f"`dvc repro {stages}` first")
    return files

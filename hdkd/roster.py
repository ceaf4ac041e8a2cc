"""The models of the pipeline: one table that training, evaluation, figures and the report read.

A model's name names everything it owns: its DVC stage ``train_<name>``, ``models/<name>/``,
``reports/train/<name>.json`` and its MLflow run. Its training recipe is the params section it
names (the HDKD student's is ``distill``: the recipe *and* the distillation loss, so that
``dvc exp run -S distill.alpha=..`` reads as what it changes). Adding a model is one entry here
(and its stage in ``dvc.yaml``, which ``tests/unit/test_roster.py`` holds to this table).

A run's models are these plus one entry per comparison baseline of its params (:func:`roster`):
``params.yaml``'s ``baselines.<key>`` trained by the stage ``train_baseline@<key>`` (a ``foreach``
in ``dvc.yaml``) into ``models/<key>/``, like the others; then one per comparison distillation method,
``kd.<key>`` (DeiT into a ViT, logit-only, aligned features), distilled from the teacher by the stage
``train_kd@<key>`` (another ``foreach``).

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
    kd: str | None = None  # a comparison distillation method (params' ``kd.<name>.method``): deit, logit, aligned

    @property
    def stage(self) -> str:
        """The DVC stage that trains it."""
        if self.baseline:
            return f"train_baseline@{self.name}"
        return f"train_kd@{self.name}" if self.kd else f"train_{self.name}"

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
    """The models of a run: ROSTER, then its params' baselines, then its kd methods, each in their order.

    ``params`` is a :class:`hdkd.config.Params`, its ``to_dict()`` form (a bundle's ``params``; one
    without ``baselines`` or ``kd`` has none), or ``None`` for ROSTER alone.
    """
    if params is None:
        return ROSTER
    baselines = (params.get("baselines") if isinstance(params, Mapping) else params.baselines) or {}
    kd = (params.get("kd") if isinstance(params, Mapping) else params.kd) or {}
    methods = [_field(spec, "method") for spec in kd.values()]
    return (ROSTER
            + tuple(baseline_entry(key, _field(spec, "timm"), i) for i, (key, spec) in enumerate(baselines.items()))
            + tuple(kd_entry(key, method, _field(spec, "timm"), len(baselines) + i, methods.count(method) > 1)
                    for i, ((key, spec), method) in enumerate(zip(kd.items(), methods))))


def _field(spec: Any, key: str) -> Any:
    return spec[key] if isinstance(spec, Mapping) else getattr(spec, key)


def baseline_entry(key: str, arch: str, index: int) -> ModelEntry:
    """The entry of baseline ``key`` (timm ``arch``), the ``index``-th of its params."""
    return ModelEntry(key, f"baselines.{key}", f"timm:{arch}", f"{key_label(key)} (timm {arch})",
                      EXTRA_COLORS[index % len(EXTRA_COLORS)], f"timm {arch} trained from scratch",
                      baseline=True)


KD_METHODS = {  # method -> (label, description)
    "deit": ("DeiT-distilled ViT", "a ViT with a distillation token, distilled from the teacher the DeiT way (hard)"),
    "logit": ("Logit-only KD", "the student distilled from the teacher's logits alone (HDKD with λ = 0)"),
    "aligned": ("Aligned feature KD", "the student distilled through learned 1×1 alignment layers (FitNets-style)"),
}


def kd_entry(key: str, method: str, arch: str | None, index: int, keyed: bool = False) -> ModelEntry:
    """The entry of kd method ``key`` (``method``; ``arch``: a deit ViT's timm architecture), the ``index``-th
    model after ROSTER; ``keyed``: its label names the key (another kd entry has the same method)."""
    label, description = KD_METHODS[method]
    return ModelEntry(key, f"kd.{key}", f"timm:{arch}" if arch else "hdkd", f"{label} ({key})" if keyed else label,
                      EXTRA_COLORS[index % len(EXTRA_COLORS)], description, teacher="teacher", kd=method)


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


# ----------------------------------------------------------------------------- runs of a model
# A model is trained once per (seed, fraction) of its params' ``seeds`` x ``fractions``. Its
# *primary* run (the first seed, the whole training split) is ``models/<name>/model.pt``: what the
# single-model stages (explain, export, predict, the model registry) use; every other run is
# ``models/<name>/runs/<run_name>.pt``. Seed s of every model trains on the same subset.
RunKey = tuple[int, float]  # (seed, fraction)


def _param(params: Any, key: str) -> Any:
    return params[key] if isinstance(params, Mapping) else getattr(params, key)


def training_runs(params: Any, name: str | None = None) -> list[RunKey]:
    """Every (seed, fraction) model ``name`` trains, the primary first, then by fraction and seed; a
    comparison baseline trains at ``baseline_fractions`` only (``None``: the paper's models' runs)."""
    baseline = name is not None and name in (_param(params, "baselines") or {})
    fractions = sorted(_param(params, "baseline_fractions" if baseline else "fractions"), reverse=True)
    return [(int(s), float(f)) for f in fractions for s in _param(params, "seeds")]


def primary_run(params: Any) -> RunKey:
    """The run of the main tables, explanations, export and registry: the first seed on all the data."""
    return int(_param(params, "seeds")[0]), 1.0


def run_name(run: RunKey) -> str:
    """``seed1-frac0.25``: the run's name in files, MLflow and the training metrics."""
    seed, fraction = run
    return f"seed{seed}-frac{fraction:g}"


def run_file(model_dir: str | os.PathLike, run: RunKey, params: Any) -> Path:
    """Where a model's run is saved (the primary run: ``<model_dir>/model.pt``)."""
    model_dir = Path(model_dir)
    return model_dir / "model.pt" if run == primary_run(params) else model_dir / "runs" / f"{run_name(run)}.pt"


def run_files(models_dir: str | os.PathLike, params: Any) -> dict[str, dict[RunKey, Path]]:
    """Every run of every model of the run (:func:`roster`), in report order; all must exist."""
    return require_trained({m.name: {run: run_file(Path(models_dir) / m.name, run, params)
                                     for run in training_runs(params, m.name)} for m in roster(params)}, params)


def model_files(models_dir: str | os.PathLike, params: Any = None) -> dict[str, Path]:
    """``<models_dir>/<name>/model.pt`` of every model of the run (:func:`roster`: the paper's models and
    ``params``' baselines), in report order; all must exist (else: which stages to run)."""
    return require_trained({m.name: Path(models_dir) / m.name / "model.pt" for m in roster(params)}, params)


def require_trained(files: Mapping[str, Any], params: Any = None) -> Mapping[str, Any]:
    """``files`` (model name -> its ``model.pt``, or -> ``{run: file}``) if they all exist; else an
    error naming the missing files and the stages to run."""
    missing = {name: [str(p) for p in (v.values() if isinstance(v, Mapping) else [v]) if not Path(p).is_file()]
               for name, v in files.items()}
    missing = {name: paths for name, paths in missing.items() if paths}
    if missing:
        stages = " ".join(roster_entry(name, params).stage for name in missing)
        raise FileNotFoundError(f"trained runs missing: {sum(missing.values(), [])}; run `dvc repro {stages}` first "
                                "(the params' seeds and fractions name the runs)")
    return files

"""dvc.yaml's plots are worth opening: every chart `dvc plots show` draws has data, and each per-model chart
draws every model of the run (the roster: the paper's models and the params' baselines), though dvc.yaml
names none. Checked on what DVC itself makes of the files (``dvc plots show --json``): the files the
evaluate and report stages write for a hand-made results bundle (fast), and those of a whole pipeline
run (slow)."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import hdkd.report.build
from hdkd.config import load_params
from hdkd.evaluation.evaluate import write_evaluation
from hdkd.evidence.bundle import make_bundle, model_names
from hdkd.report.build import build_report
from hdkd.roster import roster
from tests.helpers.bundles import CLASSES, TEST_LABELS, hand_models, hand_runs
from tests.helpers.params import make_params
from tests.helpers.pipeline import DVC_YAML, ROOT, command_env, declared_paths

TEMPLATES = ROOT / ".dvc" / "plots"  # DVC's folder of custom templates
PLOTS = {plot_id: definition for entry in DVC_YAML["plots"] for plot_id, definition in entry.items()}
PER_MODEL = {"epochs_by_model", "fractions_by_model", "confusion_by_model"}  # templates with a mark per model
LOG_Y = {"loss_terms_by_fraction"}  # templates on a log axis: only positive values are drawn


def plot_file(definition: dict[str, Any]) -> tuple[str, str]:
    """The one file of a chart and its y column."""
    ((path, field),) = definition["y"].items()
    return path, field


# ---------------------------------------------------------------------------------------- dvc.yaml
def test_dvc_draws_only_the_charts_of_dvc_yaml_each_over_one_file_of_a_stage_with_a_template_of_the_project():
    # No stage output is a plot: DVC would draw each of its files with its default template (x: step).
    assert not [s for s, stage in DVC_YAML["stages"].items() if "plots" in stage]
    assert {d["template"] for d in PLOTS.values()} <= PER_MODEL | LOG_Y  # each checked below as what it draws
    for plot_id, definition in PLOTS.items():
        path, _ = plot_file(definition)
        assert (TEMPLATES / f"{definition['template']}.json").is_file(), plot_id
        writer = [s for s in DVC_YAML["stages"] if any(Path(o) in (Path(path), *Path(path).parents)
                                                        for o in declared_paths(s, "outs"))]
        assert writer in (["evaluate"], ["report"]), (plot_id, writer)


def test_no_per_model_chart_names_a_model():
    # The roster is the one list of models: a chart over a file per model would miss a baseline added later.
    names = {m.name for m in roster(load_params(ROOT / "params.yaml"))}
    for plot_id, definition in PLOTS.items():
        if definition["template"] in PER_MODEL:
            path, _ = plot_file(definition)
            assert not names & set(Path(path).stem.split("_")), plot_id


# ------------------------------------------------------------------------------------ the checks
def show_json(repo: Path) -> dict[str, Any]:
    """``dvc plots show --json`` in ``repo`` (its stdout alone: DVC's notes go to stderr)."""
    proc = subprocess.run(["dvc", "plots", "show", "--json"], cwd=repo, env=command_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def drawn(value: Any, log: bool) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and (number > 0 or not log)


def chart_problems(shown: dict[str, Any], models: list[str]) -> list[str]:
    """What is wrong with the charts of ``dvc plots show --json``: an error, a chart of dvc.yaml missing or
    without a value to draw, a per-model chart that does not draw exactly ``models`` (each at least once)."""
    problems = [f"error: {e}" for e in shown.get("errors", [])]
    data = shown.get("data", {})
    problems += [f"{p}: not shown" for p in PLOTS if p not in data]
    for plot_id, renderers in data.items():
        definition = PLOTS.get(plot_id)
        if definition is None:
            problems.append(f"{plot_id}: drawn, but not a chart of dvc.yaml")
            continue
        if [r["type"] for r in renderers] != ["vega"]:
            problems.append(f"{plot_id}: {len(renderers)} charts ({[r['type'] for r in renderers]})")
            continue
        values = renderers[0]["content"]["data"]["values"]
        template, (x, (_, y)) = definition["template"], (definition["x"], plot_file(definition))
        if template == "confusion_by_model":  # x and y are classes; the cells' counts are drawn
            points = [v for v in values if v.get(x) and v.get(y) and drawn(v.get("count"), False)]
        else:
            points = [v for v in values if drawn(v.get(x), False) and drawn(v.get(y), template in LOG_Y)]
        if not points:
            problems.append(f"{plot_id}: no value to draw ({len(values)} data points)")
        if template in PER_MODEL and {v["model"] for v in points} != set(models):
            problems.append(f"{plot_id}: draws {sorted({v['model'] for v in points})}, not every model {models}")
    return problems


# ------------------------------------------------------------------------------- a hand-made run
def history(model: str, epochs: int = 3) -> list[dict[str, Any]]:
    """A primary run's history as the training stages log it (HDKD: its loss terms too)."""
    terms = {"ce": 0.5, "kd": 0.05, "feature_stage3": 100.0} if model == "hdkd" else {"ce": 1.0}
    return [{"epoch": e, "lr": 0.001, "train_loss": sum(terms.values()) / e, "train_ce": 1.0 / e,
             "train_accuracy": 0.5 + 0.1 * e, "val_loss": 1.25 / e, "val_accuracy": 0.5 + 0.125 * e,
             **{f"loss_{t}": w / e for t, w in terms.items()}, **{f"grad_norm_{t}": w for t, w in terms.items()}}
            for e in range(1, epochs + 1)]


def hand_run_bundle() -> dict[str, Any]:
    """A hand-made results bundle of every model of params.yaml's run (the roster; a baseline at the whole split
    alone), each run with its history."""
    params = make_params()
    models = hand_models()
    for entry in roster(params):
        if entry.name not in models:  # as the student, at its own accuracy
            models[entry.name] = copy.deepcopy(models["student"]) | {
                "runs": hand_runs(0.7, 1, fractions=(1.0,)) if entry.baseline else hand_runs(0.75, 1)}
    for name, model in models.items():
        model["history"] = history(name)
        for run in model["runs"]:
            run["history"] = [{k: v for k, v in row.items() if k.startswith(("epoch", "loss_", "grad_norm_"))}
                              for row in history(name)]
    bundle = make_bundle(models, params, CLASSES, dataset="toy", test_labels=TEST_LABELS)
    assert model_names(bundle) == [m.name for m in roster(params)]
    return bundle


def test_every_chart_of_the_stages_files_has_data_and_every_model(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(TEMPLATES, repo / ".dvc" / "plots")
    (repo / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")  # plots show reads the workspace alone
    bundle = hand_run_bundle()
    write_evaluation(bundle, repo / "reports")  # as the evaluate stage writes them
    monkeypatch.setattr(hdkd.report.build, "report_figures", lambda *args: {})  # PNGs are no chart: not drawn
    build_report(bundle, repo / "reports", make_params().report)  # as the report stage writes them

    shown = show_json(repo)
    assert chart_problems(shown, model_names(bundle)) == []
    loss_terms = shown["data"]["HDKD weighted loss terms per epoch (mean over seeds, log scale)"][0]["content"]
    assert {v["term"] for v in loss_terms["data"]["values"]} == {"ce", "kd", "feature_stage3"}

    # The check finds a chart that misses a model, and one without a value to draw.
    edit_csv(repo / "reports" / "plots" / "confusion.csv", lambda row: None if row["model"] == "vit" else row)
    edit_csv(repo / "reports" / "plots" / "training.csv", lambda row: row | {"val_loss": ""})
    assert chart_problems(show_json(repo), model_names(bundle)) == [
        "Confusion matrices (test split): draws ['hdkd', 'resnet', 'student', 'teacher'], not every model "
        "['teacher', 'student', 'hdkd', 'vit', 'resnet']",
        "Validation cross-entropy per epoch: no value to draw (15 data points)",
        "Validation cross-entropy per epoch: draws [], not every model ['teacher', 'student', 'hdkd', 'vit', "
        "'resnet']"]


def edit_csv(path: Path, edit) -> None:
    """Rewrite the CSV at ``path`` with ``edit(row)`` for each row (a dict; ``None`` drops it)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, [r for row in reader if (r := edit(row)) is not None]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------- a pipeline run
@pytest.mark.slow
def test_every_chart_of_a_pipeline_run_has_data_and_every_model_of_its_roster(tracked_pipeline):
    # Read only: `dvc plots show --json` writes nothing (no HTML) in the shared scratch repo.
    models = [m.name for m in roster(tracked_pipeline.params)]
    assert len(models) > 3  # the baselines too
    assert chart_problems(show_json(tracked_pipeline.root), models) == []

"""dvc.yaml tells the truth (foreach stages expanded as DVC does): each stage depends on all the code it
can run and on real params, and writes what it declares, where no other stage writes.

Static checks (no stage runs): the code a stage can import is found by walking the ``import``
statements of ``pipeline/<stage>.py`` and everything it reaches, function-level imports included.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.helpers.pipeline import DVC_YAML, ROOT, declared_paths, stage_outputs

PROJECT_PACKAGES = ("hdkd", "pipeline")
STAGES = DVC_YAML["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


# ------------------------------------------------------------------------------- import closure
def module_file(name: str) -> Path | None:
    """The source file of a project module (a package: its ``__init__.py``); ``None`` for anything else
    (third-party modules, or a name imported *from* a module rather than a submodule)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute dotted names a module's ``import`` statements mention, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            base = ".".join(filter(None, (base, node.module)))
            names.add(base)
            for alias in node.names:
                names.add(f"{base}.{alias.name}")  # kept only if it is a submodule (module_file)
    return names


def with_parent_packages(name: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_closure(module: str) -> set[Path]:
    """Source files of every project module that running ``python -m <module>`` can import."""
    seen: set[str] = set()
    todo = list(with_parent_packages(module))  # `python -m pipeline.x` runs pipeline/__init__.py first
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        for imported in imported_names(module_file(name), name):
            todo += with_parent_packages(imported)
    return {module_file(name) for name in seen}


def stage_command(stage: str) -> tuple[str, list[str]]:
    """The module a stage runs and its arguments (a foreach stage's key)."""
    match = re.fullmatch(r"python -m ([\w.]+)((?: \w+)*)", STAGES[stage]["cmd"])
    assert match, f"{stage}: cmd {STAGES[stage]['cmd']!r} is not `python -m <module> [<key>]`"
    return match[1], match[2].split()


def stage_module(stage: str) -> str:
    return stage_command(stage)[0]


# ------------------------------------------------------------------------------------- dvc.yaml
def is_within(path: Path, container: Path) -> bool:
    return path == container or container in path.parents


def code_deps(stage: str) -> list[Path]:
    return [ROOT / d for d in declared_paths(stage, "deps") if d.split("/")[0] in PROJECT_PACKAGES]


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_every_module_the_stage_can_import(stage):
    deps = code_deps(stage)
    missing = sorted(f.relative_to(ROOT).as_posix() for f in import_closure(stage_module(stage))
                     if not any(is_within(f, d) for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs these files but does not list them in deps: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_every_code_dep_is_code_the_stage_runs(stage):
    # A file the stage never imports would only make DVC re-run it for nothing.
    closure = import_closure(stage_module(stage))
    stale = [d.relative_to(ROOT).as_posix() for d in code_deps(stage) if not any(is_within(f, d) for f in closure)]
    assert not stale, f"dvc.yaml stage {stage!r} lists deps its code never imports: {stale}"


WINGS = sorted(p for p in (ROOT / "hdkd").iterdir() if (p / "__init__.py").is_file())


def expected_code_deps(stage: str) -> set[str]:
    """dvc.yaml's rule: a wing by its folder where the stage runs more than half of its modules (moving a file
    within it then needs no edit of dvc.yaml), else each file the stage runs."""
    files = {f.relative_to(ROOT).as_posix() for f in import_closure(stage_module(stage))}
    for wing in WINGS:
        modules = {f.relative_to(ROOT).as_posix() for f in wing.glob("*.py")}
        if 2 * len(modules & files) > len(modules):
            files = (files - modules) | {wing.relative_to(ROOT).as_posix()}
    return files


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_name_a_wing_where_the_stage_runs_most_of_it(stage):
    declared = {p.relative_to(ROOT).as_posix() for p in code_deps(stage)}
    assert declared == expected_code_deps(stage), (
        f"dvc.yaml stage {stage!r}: list {sorted(expected_code_deps(stage) - declared)}, "
        f"drop {sorted(declared - expected_code_deps(stage))}")


def has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@pytest.mark.parametrize("stage", STAGES)
def test_params_are_keys_of_params_yaml(stage):
    keys = [k for entry in STAGES[stage].get("params", []) for k in ([entry] if isinstance(entry, str) else
                                                                     [k for ks in entry.values() for k in ks])]
    unknown = [k for k in keys if not has_key(PARAMS, k)]
    assert not unknown, f"dvc.yaml stage {stage!r} tracks params that params.yaml does not have: {unknown}"


class _Parsed(Exception):
    """Raised right after a stage parsed its command line: stops it before any work."""


def cli_defaults(module: str, args: list[str]) -> dict:
    """The parsed command line of ``python -m <module> <args>`` (as DVC runs it), options left at their defaults."""
    parsed = {}
    real_parse_args = argparse.ArgumentParser.parse_args

    def capture(parser, argv=None, namespace=None):
        parsed.update(vars(real_parse_args(parser, args, namespace)))
        raise _Parsed

    with (mock.patch.object(argparse.ArgumentParser, "parse_args", capture),
          mock.patch.object(sys, "argv", [module, *args]), pytest.raises(_Parsed)):
        runpy.run_module(module, run_name="__main__")
    return parsed


def cli_output_locations(stage: str) -> list[Path]:
    """The paths the stage's command line names by default, less its declared inputs (deps,
    params.yaml), its arguments (a foreach key) and the repository root."""
    inputs = {Path(d) for d in declared_paths(stage, "deps")} | {Path("."), Path("params.yaml")}
    module, args = stage_command(stage)
    paths = {Path(v) for v in cli_defaults(module, args).values() if isinstance(v, (str, Path)) and v not in args}
    return sorted(paths - inputs)


@pytest.mark.parametrize("stage", STAGES)
def test_outputs_are_where_the_stage_writes_by_default(stage):
    locations = cli_output_locations(stage)
    stray = [p for p in stage_outputs(stage) if not any(is_within(Path(p), loc) for loc in locations)]
    assert not stray, (f"dvc.yaml stage {stage!r} declares outputs that its command line does not write "
                       f"(its default output paths: {[str(p) for p in locations]}): {stray}")


def test_no_two_stages_write_the_same_path():
    owners = [(Path(p), stage) for stage in STAGES for p in stage_outputs(stage)]
    clashes = [(str(a), sa, str(b), sb) for i, (a, sa) in enumerate(owners) for b, sb in owners[i + 1:]
               if is_within(a, b) or is_within(b, a)]
    assert not clashes, f"paths written by two stages (path, stage, path, stage): {clashes}"


@pytest.mark.slow
def test_recompiled_code_is_no_changed_dependency(tracked_pipeline):
    # Python rewrites __pycache__ beside a source whose timestamp changed, and the .pyc embeds that
    # timestamp: DVC must not take it for a code change (a re-run of every training stage).
    # Only timestamps and __pycache__ change in the shared repo: no output other tests read.
    for source in (tracked_pipeline.root / "hdkd").rglob("*.py"):
        os.utime(source)
    tracked_pipeline.run(sys.executable, "-c", "import hdkd.training.stage, hdkd.evaluation.evaluate, hdkd.report.build, hdkd.report.stage")
    assert json.loads(tracked_pipeline.dvc("status", "--json")) == {}


def test_the_kd_stage_is_held_as_the_others_are():
    # No kd method by default (the stage expands to none above): expanded with the study's, its code deps follow
    # the wing rule, its params are params.yaml's keys, and its outputs are where its command line writes.
    from hdkd.config import apply_overlay
    from tests.helpers.pipeline import expand_foreach

    study = yaml.safe_load(apply_overlay(ROOT / "params.yaml", ROOT / "params" / "study.yaml"))
    stages = expand_foreach(yaml.safe_load((ROOT / "dvc.yaml").read_text()), study)["stages"]
    kd = [name for name in stages if name.startswith("train_kd@")]
    assert kd == [f"train_kd@{key}" for key in study["kd"]] and kd
    for name in kd:
        stage, key = stages[name], name.partition("@")[2]
        files = {f.relative_to(ROOT).as_posix() for f in import_closure("pipeline.train_kd")}
        for wing in WINGS:
            modules = {f.relative_to(ROOT).as_posix() for f in wing.glob("*.py")}
            if 2 * len(modules & files) > len(modules):
                files = (files - modules) | {wing.relative_to(ROOT).as_posix()}
        assert {d for d in stage["deps"] if d.split("/")[0] in PROJECT_PACKAGES} == files
        assert [k for k in stage["params"] if not has_key(study, k)] == []
        locations = {Path(v) for v in cli_defaults("pipeline.train_kd", [key]).values() if isinstance(v, (str, Path))
                     and v != key} - {Path(d) for d in stage["deps"]} - {Path("."), Path("params.yaml")}
        outs = [p for e in stage["outs"] + stage["metrics"] for p in ([e] if isinstance(e, str) else e)]
        assert all(any(is_within(Path(p), loc) for loc in locations) for p in outs), (outs, locations)


def test_no_stage_reads_a_file_holding_mlflow_run_ids():
    # A run id is new at every training, even of byte-identical weights: a stage that read one (or a directory
    # holding one) would rerun, and everything after it, on `dvc repro -f train_teacher` with nothing changed.
    records = [Path(p) for s in STAGES for p in stage_outputs(s) if p.endswith("run.json")]
    assert records, "the training stages' run records (reports/train/<model>.run.json)"
    for stage in STAGES:
        for dep in map(Path, declared_paths(stage, "deps")):
            reads = [r for r in records if r == dep or dep in r.parents]
            assert not reads, f"{stage} depends on {dep}, which holds the run record {reads[0]}"

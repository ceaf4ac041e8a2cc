"""pipeline/ holds thin command lines: each at most 40 lines, none loading the library (torch) on import, and each
calling pipeline.start() before main(), so that the numerics environment is in place before torch loads. And no
function of the project takes more than 8 parameters (an options object where a call needs more)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import ROOT

COMMANDS = sorted(p for p in (ROOT / "pipeline").glob("*.py") if not p.name.startswith("_"))
MAX_LINES, MAX_PARAMETERS = 40, 8


@pytest.mark.parametrize("path", sorted((ROOT / "pipeline").glob("*.py")), ids=lambda p: p.name)
def test_a_command_is_thin(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"pipeline/{path.name} has {lines} lines: move its logic into hdkd/"


def test_importing_the_commands_loads_no_library_and_changes_no_environment():
    modules = ", ".join(f"pipeline.{p.stem}" for p in COMMANDS)
    code = (f"import os, sys; before = dict(os.environ); import {modules}\n"
            "print(sorted(m for m in ('torch', 'timm', 'mlflow') if m in sys.modules), dict(os.environ) == before)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"


def _main_block_calls(path) -> list[str]:
    """The functions the ``if __name__ == "__main__":`` block calls, in the order they run."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
            return [ast.unparse(c.func) for c in sorted(calls, key=lambda c: (c.lineno, -c.col_offset))]
    return []


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_a_command_starts_before_its_main(path):
    calls = [c for c in _main_block_calls(path) if c != "SystemExit"]
    assert calls[:2] == ["start", "main"], f"pipeline/{path.name}: its __main__ block calls {calls}"


def test_no_function_takes_more_than_eight_parameters():
    found = []
    for path in sorted([*(ROOT / "hdkd").rglob("*.py"), *(ROOT / "pipeline").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x]
                names = [n for n in names if n not in ("self", "cls")]
                if len(names) > MAX_PARAMETERS:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({len(names)})")
    assert not found, f"functions with more than {MAX_PARAMETERS} parameters: {found}"

"""Compare freshly produced reports with committed ones: exactly between runs of one kind of CPU, numbers
within tolerance across CPUs, per-seed results statistically where runs cannot be bit-identical.

Both sides are report trees: a directory, or ``reports/`` as committed at a git revision
(``git show <rev>:reports/...``). Compared in every mode:

- the set of files;
- ``*.json``: the same keys and list lengths everywhere, equal strings/booleans/nulls, numbers
  within tolerance (JSON records also hold values from outside the reproducible numerics: ONNX
  Runtime's parity with PyTorch, picked by the CPU's instruction set);
- ``*.csv`` and ``*.md``: the same lines and cells; table headers, row labels (first column) and
  lines outside tables exactly.

The other table cells and the figures, by the kind of comparison (:func:`comparison_kind`):

- exact, when both results bundles come from CPU runs under the reproducible numerics mode
  (``train.reproducible``) on the same kind of CPU: every printed character of every table cell, and
  every pixel of every figure (``*.png``, decoded: the file's metadata and compression may differ).
  The mode's runs are bit-identical there, so any other difference is an edit or a bug;
- tolerance, when both used the mode but the bundles name different CPUs (or none): the text around
  numbers exactly and the numbers within tolerance (defaults :data:`DEFAULT_RTOL` = 1e-3,
  :data:`DEFAULT_ATOL` = 1e-6: a fresh number ``y`` matches a committed ``x`` when
  ``|y - x| <= atol + rtol * |x|``; a number printed with ``d`` decimals in a table may also differ by
  one unit of its last digit, ``10**-d``: rounding); figures by presence only (their pixels depend on
  the matplotlib/FreeType build);
- statistical, for reports made where the numbers cannot be bit-identical (a run with
  ``train.reproducible: false``, or on a GPU; or forced with ``check_reports --statistical``): the
  files and every table's structure are compared as above, but the numbers are not; instead, for each
  model, training fraction and metric of the results bundles, the committed and fresh per-seed values
  are compared with Welch's t-test (scipy), and a p-value below ``alpha`` is a difference: the fresh
  runs differ from the committed ones by more than their seeds' spread explains.

The kind of CPU is what the bundles record of the machine that timed (so ran) the models: the
``device_name`` of their CPU timings (the processor architecture, ``x86_64``). The bundles record no
CPU model or instruction set, and need none under the mode: it pins ATen to its AVX2 kernels and MKL to
its cross-CPU branch, so runs on any x86-64 CPU with AVX2 agree bit for bit.

Locations are named ``<file>:<json.path>`` or ``<file>:<column header>`` (``<file>:<line>``
outside tables); those matching a :data:`DEFAULT_IGNORE` glob (case-insensitive) are skipped in
every mode: timing (machine-dependent) and provenance (the commit and experiment of a fresh run differ).
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from hdkd.infra.io import parse_json
from hdkd.infra.provenance import git, git_ignored, git_show

DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-6
DEFAULT_ALPHA = 0.01  # statistical mode: a p-value below it is a difference
DEFAULT_IGNORE = ("*timing*", "*ms/img*", "*img/s*", "*git?commit*", "*git?dirty*", "*dvc?exp*")
TEXT_SUFFIXES = (".json", ".csv", ".md")
FIGURE_SUFFIXES = (".png",)
MODES = ("exact", "tolerance", "statistical")

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.(\d+))?(?:[eE][-+]?\d+)?(?![\w.])")


@dataclass(frozen=True)
class Tolerance:
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def allowed(self, committed: float, decimals: int = 0) -> float:
        return self.atol + self.rtol * abs(committed) + (10.0**-decimals if decimals else 0.0)

    def ignores(self, location: str) -> bool:
        return any(fnmatchcase(location.lower(), p.lower()) for p in self.ignore)


@dataclass(frozen=True)
class Difference:
    file: str
    kind: str  # "structure" or "value"
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.file}: {self.message}"


# ------------------------------------------------------------------------------------------ trees
class ReportTree(Protocol):
    def files(self) -> set[str]: ...  # paths relative to the tree root, "/"-separated
    def read(self, name: str) -> bytes: ...


def is_report_file(name: str) -> bool:
    """Dot-files (a .gitignore DVC writes, atomic-write leftovers, tool state) are never report files."""
    return not any(part.startswith(".") for part in name.split("/"))


@dataclass(frozen=True)
class DirTree:
    root: Path

    def files(self) -> set[str]:
        # dot-files are atomic-write leftovers or tool state, never report files; nor is what git ignores there (a
        # DVC-cached output such as train/<model>.run.json, a run's MLflow ids): the committed reports never hold it
        found = {p.relative_to(self.root).as_posix() for p in Path(self.root).rglob("*") if p.is_file()}
        return {f for f in found if is_report_file(f)} - git_ignored(self.root, found)

    def read(self, name: str) -> bytes:
        return (Path(self.root) / name).read_bytes()

    def __str__(self) -> str:
        return str(self.root)


@dataclass(frozen=True)
class GitTree:
    """``prefix`` (e.g. ``reports``) as committed at ``rev`` in the repository at ``repo_root``."""

    repo_root: Path
    rev: str
    prefix: str = "reports"

    def files(self) -> set[str]:
        out = git("ls-tree", "-r", "--name-only", self.rev, "--", self.prefix, repo_root=self.repo_root)
        return {name for line in out.decode().splitlines() if is_report_file(name := line[len(self.prefix) + 1:])}

    def read(self, name: str) -> bytes:
        return git_show(self.rev, f"{self.prefix}/{name}", self.repo_root)

    def __str__(self) -> str:
        return f"{self.rev}:{self.prefix}"


# ------------------------------------------------------------------------------------- comparing
def _number_diff(label: str, a: str, b: str, tol: Tolerance, decimals: int = 0) -> str | None:
    """``None`` if the numbers written ``a`` (committed) and ``b`` (fresh) agree, else the message."""
    x, y = float(a), float(b)
    allowed = tol.allowed(x, decimals)
    if abs(y - x) <= allowed or (math.isnan(x) and math.isnan(y)):
        return None
    rounding = f" + {10.0**-decimals:g} rounding" if decimals else ""
    return (f"{label}: committed {a} vs fresh {b} "
            f"(tol {allowed:.3g} = atol {tol.atol:g} + rtol {tol.rtol:g}·|committed|{rounding})")


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def compare_json(file: str, a: Any, b: Any, tol: Tolerance, path: str = "") -> list[Difference]:
    """Differences between two parsed JSON values, walking both together."""
    if path and tol.ignores(f"{file}:{path}"):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for side, keys in (("committed", a.keys() - b.keys()), ("fresh", b.keys() - a.keys())):
            keys = [k for k in sorted(keys) if not tol.ignores(f"{file}:{_key_path(path, k)}")]
            if keys:
                out.append(Difference(file, "structure", f"{path or '<root>'}: keys only in {side}: {keys}"))
        for k in sorted(a.keys() & b.keys()):
            out += compare_json(file, a[k], b[k], tol, _key_path(path, k))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [Difference(file, "structure", f"{path}: {len(a)} items committed vs {len(b)} fresh")]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare_json(file, x, y, tol, f"{path}[{i}]")]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        message = _number_diff(path, repr(a), repr(b), tol)
        return [Difference(file, "value", message)] if message else []
    if type(a) is not type(b):
        return [Difference(file, "structure", f"{path}: committed {a!r} vs fresh {b!r} (different types)")]
    return [] if a == b else [Difference(file, "value", f"{path}: committed {a!r} vs fresh {b!r}")]


@dataclass(frozen=True)
class Line:
    cells: tuple[str, ...]
    kind: str  # "header", "row", "separator" (Markdown ---) or "text" (outside tables)
    headers: tuple[str, ...] = ()  # the column headers in effect


def parse_lines(name: str, text: str) -> list[Line]:
    """A CSV or Markdown file as lines of cells, each knowing its table's headers."""
    if name.endswith(".csv"):
        rows = [tuple(r) for r in csv.reader(io.StringIO(text))]
        return [Line(r, "header" if i == 0 else "row", rows[0]) for i, r in enumerate(rows)]  # [] if empty
    raw = text.split("\n")
    lines: list[Line] = []
    headers: tuple[str, ...] = ()
    for i, line in enumerate(raw):
        if not line.startswith("|"):
            lines.append(Line((line,), "text"))
            continue
        cells = tuple(c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1])
        if all(set(c) <= set(":-") and c for c in cells):
            lines.append(Line(cells, "separator", headers))
        elif i + 1 < len(raw) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", raw[i + 1].strip()):
            headers = cells
            lines.append(Line(cells, "header", headers))
        else:
            lines.append(Line(cells, "row", headers))
    return lines


def _compare_cell(file: str, label: str, a: str, b: str, tol: Tolerance, exact: bool = False) -> Difference | None:
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        return Difference(file, "structure", f"{label}: committed {a!r} vs fresh {b!r}")
    if exact:
        return None if a == b else Difference(file, "value", f"{label}: committed {a!r} vs fresh {b!r} "
                                                              "(exact: every printed character must match)")
    for ma, mb in zip(NUMBER.finditer(a), NUMBER.finditer(b)):
        message = _number_diff(label, ma[0], mb[0], tol, len(ma[1] or ""))
        if message:
            return Difference(file, "value", message)
    return None


def compare_text(file: str, a: str, b: str, tol: Tolerance, exact: bool = False) -> list[Difference]:
    """Differences between two CSV or Markdown files; ``exact``: table cells character for character, else
    their numbers within ``tol``."""
    la, lb = parse_lines(file, a), parse_lines(file, b)
    if len(la) != len(lb):
        return [Difference(file, "structure", f"{len(la)} lines committed vs {len(lb)} fresh")]
    out = []
    for number, (x, y) in enumerate(zip(la, lb), start=1):
        if (x.kind, len(x.cells)) != (y.kind, len(y.cells)):
            out.append(Difference(file, "structure", f"line {number}: {x.kind} of {len(x.cells)} cells committed "
                                                     f"vs {y.kind} of {len(y.cells)} fresh"))
            continue
        for col, (ca, cb) in enumerate(zip(x.cells, y.cells)):
            column = x.headers[col] if col < len(x.headers) else f"column {col + 1}"
            if tol.ignores(f"{file}:{ca if x.kind == 'text' else column}"):
                continue
            if x.kind != "row" or col == 0:  # headers, row labels and prose: exactly
                if ca != cb:
                    what = "row label" if x.kind == "row" else x.kind
                    out.append(Difference(file, "structure", f"line {number} {what}: committed {ca!r} vs fresh {cb!r}"))
                continue
            diff = _compare_cell(file, f"line {number}, {column}", ca, cb, tol, exact)
            if diff:
                out.append(diff)
    return out


def compare_trees(committed: ReportTree, fresh: ReportTree, tol: Tolerance = Tolerance(),
                  exact: bool = False) -> list[Difference]:
    """All differences between two report trees, file by file in name order; ``exact``: table cells
    character for character and figures pixel for pixel (the module's docstring), else within ``tol``."""
    a_files, b_files = committed.files(), fresh.files()
    out = [Difference(f, "structure", "missing from the fresh reports") for f in sorted(a_files - b_files)]
    out += [Difference(f, "structure", "not in the committed reports") for f in sorted(b_files - a_files)]
    for name in sorted(a_files & b_files):
        if tol.ignores(name):
            continue
        if name.lower().endswith(FIGURE_SUFFIXES):
            if exact:
                out += compare_figure(name, committed.read(name), fresh.read(name))
            continue
        if not name.endswith(TEXT_SUFFIXES):
            continue
        a, b = committed.read(name).decode("utf-8"), fresh.read(name).decode("utf-8")
        if a == b:
            continue
        if name.endswith(".json"):
            out += compare_json(name, parse_json(a, f"committed {name}"), parse_json(b, f"fresh {name}"), tol)
        else:
            out += compare_text(name, a, b, tol, exact)
    return out


def compare_figure(file: str, a: bytes, b: bytes) -> list[Difference]:
    """Differences between two figures' pixels (decoded: PNG metadata and compression do not count)."""
    if a == b:
        return []
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(a)) as x, Image.open(io.BytesIO(b)) as y:
            pa, pb = np.asarray(x.convert("RGBA")), np.asarray(y.convert("RGBA"))
    except (UnidentifiedImageError, OSError) as e:
        return [Difference(file, "structure", f"not a readable image ({e})")]
    if pa.shape != pb.shape:
        return [Difference(file, "structure", f"committed {pa.shape[1]}x{pa.shape[0]} pixels vs fresh "
                                              f"{pb.shape[1]}x{pb.shape[0]}")]
    changed = np.any(pa != pb, axis=-1)
    if not changed.any():
        return []
    rows, cols = np.nonzero(changed)
    largest = int(np.abs(pa.astype(np.int16) - pb.astype(np.int16)).max())
    return [Difference(file, "value", f"{int(changed.sum())} of {changed.size} pixels differ (exact: every pixel "
                                      f"must match), in x {cols.min()}..{cols.max()}, y {rows.min()}..{rows.max()}, "
                                      f"by up to {largest} levels")]


STATISTICAL_TEST = "Welch's t-test over the seeds (scipy.stats.ttest_ind, equal_var=False)"


BUNDLE = "bundle.json"  # the results bundle of a report tree: how its numbers were made


def read_bundle(tree: ReportTree) -> dict[str, Any] | None:
    """The tree's results bundle, parsed (``None`` without one)."""
    return parse_json(tree.read(BUNDLE), f"{tree}/{BUNDLE}") if BUNDLE in tree.files() else None


def statistical_differences(a: dict[str, Any] | None, b: dict[str, Any] | None, alpha: float) -> list[Difference]:
    """Each model, fraction and metric whose fresh per-seed values (bundle ``b``) differ from the
    committed ones (``a``) at level ``alpha`` (:data:`STATISTICAL_TEST`); identical values, or two that
    do not vary, must be equal."""
    from scipy import stats as sps

    from hdkd.evidence.aggregate import METRICS, fractions_of, runs_at

    if a is None or b is None:
        return []  # reported as a missing file by compare_trees
    name, out = BUNDLE, []
    for model in sorted(a["models"].keys() & b["models"].keys()):
        for fraction in fractions_of(a):
            runs_a, runs_b = runs_at(a, model, fraction), runs_at(b, model, fraction)
            for metric in METRICS:
                x = [runs_a[s]["evaluation"][metric] for s in sorted(runs_a)]
                y = [runs_b[s]["evaluation"][metric] for s in sorted(runs_b)]
                if not x or not y:
                    continue
                where = f"{model} at fraction {fraction:g}, {metric}"
                if len(x) < 2 or len(y) < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
                    if sorted(x) != sorted(y):
                        out.append(Difference(name, "value", f"{where}: committed {x} vs fresh {y} (no spread "
                                                             "to test against: must be equal)"))
                    continue
                p = float(sps.ttest_ind(x, y, equal_var=False).pvalue)
                if p < alpha:
                    out.append(Difference(name, "value", f"{where}: committed mean {np.mean(x):.4f} "
                                          f"(sd {np.std(x, ddof=1):.4f}, {len(x)} seeds) vs fresh {np.mean(y):.4f} "
                                          f"(sd {np.std(y, ddof=1):.4f}, {len(y)} seeds): p = {p:.3g} < {alpha:g}"))
    return out


def comparison_kind(committed: dict[str, Any] | None, fresh: dict[str, Any] | None) -> tuple[str, str]:
    """How the numbers of two trees, given their results bundles, are compared (one of :data:`MODES`), and why:
    ``exact`` when both bundles come from CPU runs under the reproducible numerics mode (``train.reproducible``)
    on the same kind of CPU (the ``device_name`` of their CPU timings); ``tolerance`` when both used the mode but
    on other kinds of CPU, or a bundle names none; otherwise ``statistical`` (their numbers differ by the seeds'
    noise)."""
    reasons, cpus = [], {}
    for side, bundle in (("committed", committed), ("fresh", fresh)):
        if bundle is None:
            return "tolerance", f"the {side} reports hold no {BUNDLE} to tell how they were made"
        timings = [t for m in bundle["models"].values() for t in (m.get("efficiency") or {}).get("timing", [])]
        devices = {t["device"] for t in timings}
        cpus[side] = sorted({str(t.get("device_name") or "") for t in timings if t["device"] == "cpu"} - {""})
        if not bundle["params"]["train"]["reproducible"]:
            reasons.append(f"the {side} run had train.reproducible off")
        if devices - {"cpu"}:
            reasons.append(f"the {side} run ran on {', '.join(sorted(devices - {'cpu'}))}")
    if reasons:
        return "statistical", "; ".join(reasons) + ": its numbers differ from another run's by the seeds' noise"
    mode = "both runs used the reproducible CPU numerics mode"
    if not cpus["committed"] or not cpus["fresh"]:
        return "tolerance", f"{mode}, but a results bundle records no CPU timing to tell which kind of CPU made it"
    if cpus["committed"] != cpus["fresh"]:
        return "tolerance", (f"{mode}, on other kinds of CPU (committed {', '.join(cpus['committed'])}, fresh "
                             f"{', '.join(cpus['fresh'])}): their numbers agree to rounding, their figures may not")
    return "exact", (f"{mode} on the same CPU ({', '.join(cpus['fresh'])}), so they are bit-identical: "
                     "any difference is an edit or a bug")


def unified_diffs(committed: ReportTree, fresh: ReportTree, differences: Iterable[Difference]) -> str:
    """Unified diffs of the tables (CSV, Markdown) that have differences, for reading."""
    tables = {d.file for d in differences if d.file.endswith((".csv", ".md"))}
    in_both = committed.files() & fresh.files() if tables else set()  # listed once: a GitTree runs git
    chunks = []
    for name in sorted(tables & in_both):
        a = committed.read(name).decode("utf-8").splitlines(keepends=True)
        b = fresh.read(name).decode("utf-8").splitlines(keepends=True)
        chunks.append("".join(difflib.unified_diff(a, b, f"committed/{name}", f"fresh/{name}", n=1)))
    return "".join(chunks)


def check_reports(
    committed: ReportTree, fresh: ReportTree, tol: Tolerance = Tolerance(), stream: TextIO | None = None,
    mode: str = "auto", alpha: float = DEFAULT_ALPHA,
) -> list[Difference]:
    """Compare, print a readable account to ``stream`` (stdout), return the differences (empty = match).

    ``mode``: ``exact``, ``tolerance``, ``statistical`` (at level ``alpha``; the module's docstring) or ``auto``:
    the kind :func:`comparison_kind` tells from the two results bundles."""
    stream = stream or sys.stdout
    if mode not in ("auto", *MODES):
        raise ValueError(f"unknown comparison mode {mode!r}; known: auto, {', '.join(MODES)}")
    bundles = read_bundle(committed), read_bundle(fresh)  # read once: a GitTree runs git for each read
    if mode == "auto":
        mode, why = comparison_kind(*bundles)
    else:
        why = f"--{mode} was given"
    differences = compare_trees(committed, fresh, tol, exact=mode == "exact")
    if mode == "exact":
        print(f"comparing committed {committed} with fresh {fresh} exactly: every printed character of the tables "
              f"and every pixel of the figures; JSON numbers within rtol {tol.rtol:g}, atol {tol.atol:g} ({why})",
              file=stream)
    elif mode == "tolerance":
        print(f"comparing committed {committed} with fresh {fresh}: every number within rtol {tol.rtol:g}, "
              f"atol {tol.atol:g}, figures by presence ({why})", file=stream)
    else:
        differences = [d for d in differences if d.kind == "structure"] + statistical_differences(*bundles, alpha)
        print(f"comparing committed {committed} with fresh {fresh} statistically: the structure of every file, "
              f"and per model, training fraction and metric the per-seed values by {STATISTICAL_TEST} at "
              f"alpha {alpha:g} ({why})", file=stream)
    for d in differences:
        print(d, file=stream)
    diffs = unified_diffs(committed, fresh, differences)
    if diffs:
        print("\n" + diffs, file=stream, end="")
    versions = version_differences(*bundles)
    if versions:
        print(f"numerics versions differ (committed -> fresh): {versions}; these alone change the numbers: "
              "install the locked ones (pip install -r requirements.lock)", file=stream)
    print(f"{len(differences)} difference(s)" if differences else "reports match", file=stream)
    return differences


def version_differences(committed: dict[str, Any] | None, fresh: dict[str, Any] | None) -> str:
    """The numerics versions (torch, numpy, MKL, oneDNN) that differ between two results bundles,
    as ``torch 2.14.1 -> 2.15.0, ...``; empty when they agree or a side does not record them."""
    before, after = ((bundle or {}).get("numerics") or {} for bundle in (committed, fresh))
    if not before or not after:
        return ""
    return ", ".join(f"{k} {before.get(k, 'absent')} -> {after.get(k, 'absent')}"
                     for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k))


def check(
    fresh: str | os.PathLike,
    committed: str | os.PathLike | None,
    rev: str,
    repo_root: str | os.PathLike,
    prefix: str,
    tol: Tolerance = Tolerance(),
    mode: str = "auto",
    alpha: float = DEFAULT_ALPHA,
) -> int:
    """Exit code of the check: 0 when the reports match, 1 otherwise.

    ``committed`` is a directory; without it, ``prefix`` as committed at ``rev``. ``mode``, ``alpha``: as
    :func:`check_reports`.
    """
    committed_tree: ReportTree = DirTree(Path(committed)) if committed else GitTree(Path(repo_root), rev, prefix)
    return 1 if check_reports(committed_tree, DirTree(Path(fresh)), tol, mode=mode, alpha=alpha) else 0

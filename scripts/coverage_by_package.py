"""Line and branch coverage of hdkd/ per package, from a coverage data file (``make coverage`` writes
``.coverage``); files of scratch copies of the project count as the working tree's (pyproject's
``[tool.coverage.paths]``)::

    python scripts/coverage_by_package.py [DATA_FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
from pathlib import Path

from coverage import Coverage

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("num_statements", "covered_lines", "num_branches", "covered_branches")


def by_package(data_file: Path) -> dict[str, dict[str, int]]:
    """``{package: {num_statements, covered_lines, num_branches, covered_branches}}``, ``total`` included."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(data_file, Path(tmp) / ".coverage.measured")  # combine (path remapping) leaves the input alone
        cov = Coverage(data_file=str(Path(tmp) / ".coverage"), config_file=str(ROOT / "pyproject.toml"))
        cov.combine([tmp])
        cov.save()
        cov.json_report(outfile=str(Path(tmp) / "coverage.json"), ignore_errors=True)
        files = json.loads((Path(tmp) / "coverage.json").read_text())["files"]
    packages: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path, info in files.items():
        rel = Path(path).resolve().relative_to(ROOT) if Path(path).is_absolute() else Path(path)
        for package in (rel.parent.as_posix(), "total"):
            packages[package].update({k: info["summary"][k] for k in FIELDS})
    return {p: dict(c) for p, c in sorted(packages.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_file", nargs="?", default=".coverage", type=Path)
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()
    table = by_package(args.data_file)
    print("| package | statements | lines covered | branches | branches covered |\n|---|---:|---:|---:|---:|")
    for package, c in table.items():
        print(f"| {package} | {c['num_statements']} | {c['covered_lines'] / max(c['num_statements'], 1):.1%} | "
              f"{c['num_branches']} | {c['covered_branches'] / max(c['num_branches'], 1):.1%} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()

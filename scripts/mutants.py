"""Test power: a fixed set of mutants of the code the results depend on, and which of them the fast
tests kill.

The statistics (hdkd/evidence/stats.py), the reports check (hdkd/report/check.py), the losses, the splits and
the atomic writes (hdkd/infra/io.py) each get a list of small, plausible bugs: a flipped comparison, a
dropped term, an off-by-one, a missing fsync. Each mutant is applied alone to a git worktree of
``--rev`` (``../shared`` linked beside it, so the reference tests run), then that module's fast tests
run with ``-x``; a failing test kills it. The same mutants against two revisions compare two test
suites::

    python scripts/mutants.py                      # HEAD
    python scripts/mutants.py --rev <before> --jobs 2

An unmutated run of every selected test must pass first (else nothing is measured). Prints one line
per mutant and the survivors; exits 1 if a mutant's text is not found at ``--rev`` (the list is stale).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The fast tests that exercise each module (tests of a module's users too, since they catch its bugs).
TESTS = {
    "hdkd/evidence/stats.py": ["tests/unit/evidence/test_stats.py", "tests/unit/evidence/test_aggregate.py"],
    "hdkd/report/check.py": ["tests/unit/report/test_check.py"],
    "hdkd/training/losses.py": ["tests/unit/training/test_losses.py", "tests/unit/models/test_reference.py"],
    "hdkd/data/splits.py": ["tests/unit/data/test_splits.py", "tests/unit/data/test_prepare.py"],
    "hdkd/infra/io.py": ["tests/unit/infra/test_io.py", "tests/unit/data/test_prepare.py"],
    "hdkd/infra/torch_io.py": ["tests/unit/infra/test_io.py"],
}


@dataclass(frozen=True)
class Mutant:
    file: str
    old: str  # must occur exactly once in the file
    new: str
    what: str


MUTANTS = [
    # statistics
    Mutant("hdkd/evidence/stats.py", "float(v.std(ddof=1))", "float(v.std(ddof=0))", "population std in aggregates"),
    Mutant("hdkd/evidence/stats.py", "if v.size > 1 else None", "if v.size > 0 else None", "std of one seed"),
    Mutant("hdkd/evidence/stats.py", "    diff = a - b\n", "    diff = b - a\n", "difference sign"),
    Mutant("hdkd/evidence/stats.py",
           "p = 1.0 if abs(mean) <= NO_SPREAD else None", "p = None", "all-zero differences untested"),
    Mutant("hdkd/evidence/stats.py", "result = sps.ttest_rel(a, b)", "result = sps.ttest_ind(a, b)", "unpaired t"),
    Mutant("hdkd/evidence/stats.py", "return float(d.mean() / d.std(ddof=1))", "return float(d.mean() / d.std(ddof=0))",
           "effect size with population std"),
    Mutant("hdkd/evidence/stats.py", 'method="holm"', 'method="bonferroni"', "Bonferroni for Holm"),
    Mutant("hdkd/evidence/stats.py",
           "n10 = int(np.sum(ca & ~cb))", "n10 = int(np.sum(ca & cb))", "McNemar discordant count"),
    Mutant("hdkd/evidence/stats.py", "return Comparison(0.0, 0.0, 0.0, 1.0, label)",
           "return Comparison(0.0, 0.0, 0.0, None, label)",
           "no discordant pairs untested"),
    Mutant("hdkd/evidence/stats.py", 'method="exact")', 'method="wilson")', "Wilson for Clopper-Pearson"),
    Mutant("hdkd/evidence/stats.py", 'if comparison.p_value < alpha else', 'if comparison.p_value <= 2 * alpha else',
           "verdict threshold"),
    # reports check
    Mutant("hdkd/report/check.py", "if abs(y - x) <= allowed or", "if abs(y - x) < allowed * 10 or", "tolerance x10"),
    Mutant("hdkd/report/check.py", "(10.0**-decimals if decimals else 0.0)",
           "(10.0**-(decimals - 1) if decimals else 0.0)",
           "rounding slack of ten units"),
    Mutant("hdkd/report/check.py", 'if p.is_file() and not any(part.startswith(".")',
           'if p.is_file() and any(part.startswith(".")', "dot-files only"),
    Mutant("hdkd/report/check.py", "if len(a) != len(b):\n            return [Difference(file, \"structure\"",
           "if len(a) < len(b):\n            return [Difference(file, \"structure\"", "shorter fresh list passes"),
    Mutant("hdkd/report/check.py", "if x.kind != \"row\" or col == 0:",
           "if x.kind != \"row\":", "row labels as numbers"),
    Mutant("hdkd/report/check.py", "if NUMBER.sub(\"#\", a) != NUMBER.sub(\"#\", b):", "if False:",
           "text around numbers unchecked"),
    Mutant("hdkd/report/check.py", "out = [Difference(f, \"structure\", \"missing from the fresh reports\") for f in "
           "sorted(a_files - b_files)]", "out = []", "missing files pass"),
    Mutant("hdkd/report/check.py", "if p < alpha:", "if p < alpha / 100:", "statistical alpha / 100"),
    Mutant("hdkd/report/check.py", "if not bundle[\"params\"][\"train\"][\"reproducible\"]:", "if False:",
           "non-reproducible runs compared exactly"),
    # losses
    Mutant("hdkd/training/losses.py", "kd = kl * (t * t) /", "kd = kl * t /", "tau instead of tau squared"),
    Mutant("hdkd/training/losses.py", "(z_dist.numel() if self.reduction == \"numel\" else z_dist.shape[0])",
           "(z_dist.shape[0] if self.reduction == \"numel\" else z_dist.shape[0])", "batch for numel reduction"),
    Mutant("hdkd/training/losses.py", "return (1 - self.alpha) * ce + self.alpha * kd, ce, kd",
           "return self.alpha * ce + (1 - self.alpha) * kd, ce, kd", "alpha on the wrong term"),
    Mutant("hdkd/training/losses.py", "kd = F.cross_entropy(z_dist, teacher_logits.argmax(dim=1))",
           "kd = F.cross_entropy(z_cls, teacher_logits.argmax(dim=1))", "hard KD on the class head"),
    Mutant("hdkd/training/losses.py", "self.weights = [(i + 1) ** beta for i", "self.weights = [i ** beta + 1 for i",
           "stage weights"),
    Mutant("hdkd/training/losses.py", "fs, ft = student_feats[s - 1], teacher_feats[s - 1]",
           "fs, ft = student_feats[s - 1], teacher_feats[s - 1].flip(0)", "teacher features of other images"),
    Mutant("hdkd/training/losses.py",
           "return LossParts(logit + self.lambda_ * feature,", "return LossParts(logit + feature,",
           "lambda ignored"),
    Mutant("hdkd/training/losses.py",
           "return self.feature is not None and self.lambda_ > 0", "return self.feature is not None",
           "features at lambda 0"),
    Mutant("hdkd/training/losses.py", "log_target=True)", "log_target=False)", "KL target as probabilities"),
    # splits
    Mutant("hdkd/data/splits.py", "return group_of, size, counts.argmax(axis=1)",
           "return group_of, size, counts.argmin(axis=1)",
           "a group's class"),
    Mutant("hdkd/data/splits.py", "for g in members[:-1]:", "for g in members:", "no group left behind"),
    Mutant("hdkd/data/splits.py", "if taken + size[g] - target < target - taken:", "if taken < target:",
           "overshooting groups taken"),
    Mutant("hdkd/data/splits.py", "if not taken:", "if False:", "no group when all overshoot"),
    Mutant("hdkd/data/splits.py", "np.random.default_rng([seed, stream])", "np.random.default_rng([seed, 0])",
           "one stream for test and val"),
    Mutant("hdkd/data/splits.py", "rng = np.random.default_rng([seed, 3])", "rng = np.random.default_rng([seed, 2])",
           "subsets' stream"),
    Mutant("hdkd/data/splits.py", "chosen[members[: k + 1]] = True", "chosen[members[:k]] = True",
           "subset prefix one short"),
    Mutant("hdkd/data/splits.py", "bad = [f for f in fractions if not 0 < f <= 1]",
           "bad = [f for f in fractions if f > 1]",
           "fraction 0 accepted"),
    # atomic writes
    Mutant("hdkd/infra/io.py", "                    os.fsync(f.fileno())\n", "                    pass\n", "no fsync"),
    Mutant("hdkd/infra/io.py", "os.chmod(tmp, 0o666 & ~_UMASK)", "os.chmod(tmp, 0o600)", "outputs left private"),
    Mutant("hdkd/infra/io.py", "        yield outputs\n        outputs.commit()\n",
           "        outputs.commit()\n        yield outputs\n", "committed before written"),
    Mutant("hdkd/infra/io.py", "        for old in aside:\n            shutil.rmtree(old)\n",
           "", "old directory left behind"),
    Mutant("hdkd/infra/io.py",
           "remove_stale_temporaries(path.parent, path.name)  # what", "(path.parent, path.name)  # what",
           "stale temporaries kept"),
    Mutant("hdkd/infra/io.py", "if m and name in (None, m[\"name\"]):", "if m:", "other outputs' temporaries removed"),
    Mutant("hdkd/infra/io.py",
           "json.dumps(obj, indent=2, sort_keys=True,", "json.dumps(obj, indent=2, sort_keys=False,",
           "unsorted JSON keys"),
    Mutant("hdkd/infra/torch_io.py", "weights_only=True)", "weights_only=False)", "unsafe checkpoint loading"),
    Mutant("hdkd/infra/io.py", "if hasattr(o, \"tolist\"):", "if False:", "numpy values not serialisable"),
]


def run_tests(tree: Path, tests: list[str]) -> bool:
    """Whether ``tests`` (fast ones) pass in ``tree``; its hdkd wins over the installed one in subprocesses too."""
    env = {**os.environ, "PYTHONPATH": str(tree), "CI": "true", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tree,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.returncode == 0


def worktree(rev: str, parent: Path) -> Path:
    parent.mkdir()
    tree = parent / "repo"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), rev], cwd=ROOT, check=True)
    (parent / "shared").symlink_to(ROOT.parent / "shared")  # tests read ../shared/reference
    return tree


def try_mutant(tree: Path, mutant: Mutant) -> bool:
    """Apply ``mutant`` in ``tree``, run its module's tests, restore; True if a test failed (killed)."""
    path = tree / mutant.file
    original = path.read_text()
    path.write_text(original.replace(mutant.old, mutant.new, 1))
    try:
        return not run_tests(tree, [t for t in TESTS[mutant.file] if (tree / t).is_file()])
    finally:
        path.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the revision whose tests are measured (default HEAD)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tried at once (one worktree each)")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="hdkd-mutants-") as tmp:
        trees = [worktree(args.rev, Path(tmp) / str(j)) for j in range(args.jobs)]
        try:
            stale = [m for m in MUTANTS if (trees[0] / m.file).read_text().count(m.old) != 1]
            for m in stale:
                print(f"stale mutant (its text is not in {m.file} exactly once at {args.rev}): {m.what}")
            if stale:
                return 1
            if not run_tests(trees[0], sorted({t for ts in TESTS.values() for t in ts if (trees[0] / t).is_file()})):
                print(f"the unmutated tests fail at {args.rev}: nothing measured")
                return 1
            free = list(trees)

            def attempt(mutant: Mutant) -> bool:
                tree = free.pop()
                try:
                    return try_mutant(tree, mutant)
                finally:
                    free.append(tree)

            with ThreadPoolExecutor(args.jobs) as pool:
                killed = list(pool.map(attempt, MUTANTS))
        finally:
            for tree in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    for m, k in zip(MUTANTS, killed):
        print(f"{'killed  ' if k else 'SURVIVED'}  {m.file:22s}  {m.what}")
    survivors = [m for m, k in zip(MUTANTS, killed) if not k]
    print(f"\n{args.rev}: {len(MUTANTS) - len(survivors)} of {len(MUTANTS)} mutants killed "
          f"({time.time() - start:.0f} s)" + "".join(f"\n  survived: {m.file}: {m.what}" for m in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())

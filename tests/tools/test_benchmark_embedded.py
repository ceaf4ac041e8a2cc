"""benchmarks/embedded_benchmark.py: trains every (seed, fraction, model) on nested subsets and sums the cost."""

import json

import pytest

from tests.helpers.fit import load_benchmark


@pytest.mark.slow  # six trainings through the real data stages and training code
def test_benchmark_trains_each_seed_fraction_and_model_and_estimates_the_pipeline(tmp_path, capsys):
    bench = load_benchmark("embedded_benchmark")
    settings = ["data.image_size=16", "data.synthetic.num_images=80", "data.synthetic.native_size=24",
                "data.synthetic.ambiguity=0.3", "teacher.epochs=1", "student.epochs=2", "distill.epochs=2",
                "baselines.vit.optim.warmup_epochs=1",
                "train.batch_size=8", "tracking.enabled=false"]
    bench.main(["--set", *settings, "--seeds", "0", "--fractions", "0.5", "1.0",
                "--workdir", str(tmp_path), "--pipeline-seeds", "3", "--pipeline-models", "5"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["rows"]
    assert [(r["fraction"], r["role"]) for r in rows] == [
        (f, role) for f in (0.5, 1.0) for role in ("teacher", "student", "hdkd")]
    half, full = rows[0]["train_images"], rows[3]["train_images"]
    assert 0 < half < full and all(0 <= r["accuracy"] <= 1 and r["cpu_s"] > 0 for r in rows)
    assert (tmp_path / "raw" / "synthetic_ham10000" / "HAM10000_metadata.csv").is_file()  # the real formats
    # the estimate: 3 seeds x 5 models x sum of the default fractions (1.85) full-data trainings + fixed costs
    per_full = sum(v["per_full_s"] for v in result["per_role"].values()) / 3
    fixed = sum(v["fixed_s"] for v in result["per_role"].values()) / 3
    assert abs(result["estimated_training_s"] - (3 * 5 * 1.85 * per_full + 60 * fixed)) < 1e-6

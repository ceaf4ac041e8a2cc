"""The results bundle (hdkd.evidence.bundle): assembled with its params and provenance, checked, and
readable without torch (the report stage imports it)."""

import json
import os
import subprocess
import sys

import pytest

from hdkd.evidence.bundle import load_bundle, model_names, validate_bundle
from hdkd.infra.io import write_json
from tests.helpers.bundles import CLASSES, bundle_with
from tests.helpers.pipeline import ROOT


def test_bundle_records_params_and_provenance():
    b = bundle_with({"distill": {"lambda": 1.0}}, dvc_exp_name="exp-l1")
    assert b["schema_version"] == 2 and b["class_names"] == CLASSES and b["dataset"] == "toy"
    assert b["params"]["distill"]["lambda"] == 1.0 and len(b["params_hash"]) == 16
    assert b["params_hash"] != bundle_with()["params_hash"]
    assert b["dvc_exp_name"] == "exp-l1" and b["git_commit"].startswith("0123")
    assert set(b["models"]) == {"teacher", "student", "hdkd"}


def test_validate_bundle_says_what_is_wrong(bundle):
    with pytest.raises(ValueError, match="schema_version 99"):
        validate_bundle(bundle | {"schema_version": 99})
    with pytest.raises(ValueError, match="lacks \\['params_hash'\\]"):
        validate_bundle({k: v for k, v in bundle.items() if k != "params_hash"})
    broken = json.loads(json.dumps(bundle))
    broken["models"]["hdkd"]["evaluation"]["per_class"].pop()
    with pytest.raises(ValueError, match="'hdkd' is not evaluated on the 3 classes"):
        validate_bundle(broken)


def test_a_truncated_bundle_is_named(tmp_path, bundle):
    path = tmp_path / "reports/bundle.json"
    write_json(path, bundle)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        load_bundle(path)


def test_load_bundle_validates_what_it_reads(tmp_path, bundle):
    write_json(tmp_path / "bundle.json", bundle)
    assert load_bundle(tmp_path / "bundle.json") == bundle
    write_json(tmp_path / "old.json", bundle | {"schema_version": 0})
    with pytest.raises(ValueError, match="schema_version 0"):
        load_bundle(tmp_path / "old.json")


def test_model_names_in_report_order():
    # teacher, student, hdkd as far as present, then any other model by name
    names = model_names({"models": {"zeta": {}, "hdkd": {}, "alpha": {}, "teacher": {}}})
    assert names == ["teacher", "hdkd", "alpha", "zeta"]


def test_the_report_stage_imports_no_torch():
    # A fresh interpreter: other tests' imports would already have put torch into sys.modules.
    code = ("import sys, pipeline.report; from hdkd.config import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", "the report stage (importing pipeline.report, reading params) imported torch"

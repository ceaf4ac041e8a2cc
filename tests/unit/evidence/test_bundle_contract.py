"""The results bundle as its docstrings promise it (hdkd/evidence/bundle.py): what a run's history keeps, what
``make_bundle`` fills in when a part is not given, the copies it holds, every check ``validate_bundle`` makes with
the message that names the fault, and the report's order of the models, its params' baselines included."""

from __future__ import annotations

import copy
import json

import pytest

from hdkd.evidence.bundle import (
    SCHEMA_VERSION,
    UnsupportedBundle,
    load_bundle,
    make_bundle,
    model_names,
    run_history,
    validate_bundle,
)
from tests.helpers.bundles import CLASSES, TEST_LABELS, hand_models
from tests.helpers.params import make_params


def test_a_runs_history_keeps_the_epoch_the_losses_gradients_and_validation_predictions_only():
    history = [{"epoch": 1, "loss_ce": 0.9, "grad_norm_ce": 2.0, "val_pred_akiec": 0.3, "train_loss": 1.0,
                "val_loss": 1.1, "lr": 0.001, "val_accuracy": 0.5},
               {"epoch": 2, "loss_kd": 0.5, "lr": 0.0005}]
    assert run_history(history) == [{"epoch": 1, "loss_ce": 0.9, "grad_norm_ce": 2.0, "val_pred_akiec": 0.3},
                                    {"epoch": 2, "loss_kd": 0.5}]
    assert run_history([]) == []


def test_make_bundle_fills_in_what_is_not_given():
    params = make_params()
    models = {"m": {"evaluation": hand_models()["hdkd"]["evaluation"],
                    "runs": [{"seed": 0, "fraction": 1.0, "predictions": [], "evaluation": {}}]}}
    b = make_bundle(models, params, CLASSES)
    assert b["schema_version"] == SCHEMA_VERSION == 2
    assert b["dataset"] == params.data.dataset == "synthetic"  # the params' dataset
    assert (b["git_commit"], b["git_dirty"], b["dvc_exp_name"]) == (None, None, None)
    assert "numerics" not in b and b["test_labels"] == []
    assert b["models"]["m"]["efficiency"] is None and b["models"]["m"]["history"] == []
    assert b["params"] == params.to_dict() and b["params_hash"] == params.digest()
    none_history = make_bundle({"m": {**models["m"], "history": None}}, params, CLASSES)
    assert none_history["models"]["m"]["history"] == []


def test_make_bundle_records_provenance_numerics_and_integer_labels():
    import numpy as np

    models = hand_models()
    b = make_bundle(models, make_params(), tuple(CLASSES), dataset="ham10000",
                    test_labels=np.asarray(TEST_LABELS, dtype=np.int64),
                    provenance={"git_commit": "abc", "git_dirty": True, "dvc_exp_name": "exp-1",
                                "numerics": {"torch": "2.4"}})
    assert (b["dataset"], b["git_commit"], b["git_dirty"], b["dvc_exp_name"]) == ("ham10000", "abc", True, "exp-1")
    assert b["numerics"] == {"torch": "2.4"} and b["class_names"] == CLASSES
    assert b["test_labels"] == TEST_LABELS and all(type(y) is int for y in b["test_labels"])
    json.dumps(b)  # a JSON object: the labels are no numpy integers
    assert b["models"]["teacher"]["efficiency"] == models["teacher"]["efficiency"]
    assert b["models"]["teacher"]["history"] == models["teacher"]["history"]
    assert b["models"]["teacher"]["runs"] == models["teacher"]["runs"]
    assert list(b) == ["schema_version", "dataset", "class_names", "params", "params_hash", "git_commit", "git_dirty",
                       "dvc_exp_name", "numerics", "test_labels", "models"]


def test_the_bundle_holds_copies_not_the_callers_objects():
    models = hand_models()
    b = make_bundle(models, make_params(), CLASSES, test_labels=TEST_LABELS)
    before = copy.deepcopy(b)
    models["hdkd"]["evaluation"]["accuracy"] = 0.0
    models["hdkd"]["history"][0]["val_loss"] = 99.0
    models["hdkd"]["runs"][0]["seed"] = 99
    models["hdkd"]["runs"].clear()
    assert b == before


def _valid():
    return make_bundle(hand_models(), make_params(), CLASSES, test_labels=TEST_LABELS)


def test_another_schema_version_is_unsupported_saying_which():
    with pytest.raises(UnsupportedBundle, match=r"^results bundle schema_version 1 is not supported \(expected 2\)$"):
        validate_bundle({**_valid(), "schema_version": 1})
    with pytest.raises(UnsupportedBundle, match=r"^results bundle schema_version None is not supported"):
        validate_bundle({k: v for k, v in _valid().items() if k != "schema_version"})
    assert issubclass(UnsupportedBundle, ValueError)


def test_validate_bundle_names_every_missing_part_and_returns_a_copy():
    b = _valid()
    with pytest.raises(ValueError, match=r"^results bundle lacks \['dataset', 'test_labels', 'models'\]$"):
        validate_bundle({k: v for k, v in b.items() if k not in ("dataset", "test_labels", "models")})
    for key in ("class_names", "params"):
        with pytest.raises(ValueError, match=rf"^results bundle lacks \['{key}'\]$"):
            validate_bundle({k: v for k, v in b.items() if k != key})
    with pytest.raises(ValueError, match="^results bundle holds no model$"):
        validate_bundle({**b, "models": {}})
    checked = validate_bundle(b)
    assert checked == b and checked is not b and type(checked) is dict


def test_validate_bundle_checks_each_models_evaluation_and_runs():
    b = _valid()
    matrix = copy.deepcopy(b)
    evaluation = matrix["models"]["student"]["evaluation"]
    evaluation["confusion_matrix"] = [*evaluation["confusion_matrix"], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"^results bundle: model 'student' is not evaluated on the 3 classes$"):
        validate_bundle(matrix)
    unevaluated = copy.deepcopy(b)
    unevaluated["models"]["student"]["evaluation"] = None
    with pytest.raises(ValueError, match="'student' is not evaluated on the 3 classes"):
        validate_bundle(unevaluated)
    no_runs = copy.deepcopy(b)
    no_runs["models"]["teacher"]["runs"] = []
    with pytest.raises(ValueError, match=r"^results bundle: model 'teacher' has no run \(one per seed and training "
                                         r"fraction\)$"):
        validate_bundle(no_runs)
    short = copy.deepcopy(b)
    for run in short["models"]["hdkd"]["runs"]:
        if run["seed"] == 2 and run["fraction"] in (0.25, 1.0):
            run["predictions"] = run["predictions"][:-1]
    with pytest.raises(ValueError, match=r"^results bundle: model 'hdkd'\'s runs \['seed 2 fraction 0.25', "
                                         r"'seed 2 fraction 1'\] do not predict every test image$"):
        validate_bundle(short)


def test_load_bundle_refuses_an_unsupported_file(tmp_path):
    from hdkd.infra.io import write_json

    write_json(tmp_path / "b.json", {**_valid(), "schema_version": 3})
    with pytest.raises(UnsupportedBundle, match="schema_version 3"):
        load_bundle(tmp_path / "b.json")


def test_model_names_put_the_params_baselines_after_the_roster_then_the_rest_by_name():
    params = make_params().to_dict()
    assert list(params["baselines"])[:1] == ["vit"]
    models = {name: {} for name in ("zz", "vit", "hdkd", "aa", "teacher")}
    assert model_names({"params": params, "models": models}) == ["teacher", "hdkd", "vit", "aa", "zz"]
    # without params: the roster alone, so a baseline is one more model by name
    assert model_names({"models": models}) == ["teacher", "hdkd", "aa", "vit", "zz"]

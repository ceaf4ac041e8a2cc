"""The roster is the one list of models: dvc.yaml, params and the model registry agree with it."""

from __future__ import annotations

import pytest
import yaml

from hdkd.config import NON_RESULT_PARAMS, Params, is_result_param
from hdkd.models import list_models
from hdkd.roster import MODEL_NAMES, ROSTER, roster_entry
from tests.pipeline_fixtures import DVC_YAML, ROOT

STAGES = DVC_YAML["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_lookup_names_the_known_models():
    assert roster_entry("hdkd").section == "distill" and roster_entry("hdkd").teacher == "teacher"
    with pytest.raises(KeyError, match="known: teacher, student, hdkd"):
        roster_entry("distill")


def test_every_model_has_a_recipe_a_network_and_a_distinct_look():
    for m in ROSTER:
        assert m.section in Params.model_fields, m.name
        assert {m.registry, f"{m.registry}_tiny"} <= set(list_models()), m.name
        assert m.teacher is None or m.teacher in MODEL_NAMES[:MODEL_NAMES.index(m.name)], m.name
    for attr in ("name", "label", "color"):
        assert len({getattr(m, attr) for m in ROSTER}) == len(ROSTER), attr


def test_dvc_yaml_trains_exactly_the_roster():
    training = [s for s in STAGES if s.startswith("train_")]
    assert training == [m.stage for m in ROSTER]


@pytest.mark.parametrize("model", ROSTER, ids=MODEL_NAMES)
def test_a_training_stage_owns_what_its_model_names(model):
    stage = STAGES[model.stage]
    assert stage["cmd"] == f"python -m pipeline.{model.stage}"
    assert stage["outs"] == [f"models/{model.name}/model.pt", f"models/{model.name}/run.json"]
    assert [next(iter(m)) for m in stage["metrics"]] == [f"reports/train/{model.name}.json"]
    assert (f"models/{model.teacher}/model.pt" in stage["deps"]) == model.distills
    assert f"models/{model.name}/model.pt" in STAGES["evaluate"]["deps"]
    for plot in DVC_YAML["plots"]:
        assert any(f"_{model.name}.csv" in path for path in next(iter(plot.values()))["y"]), plot


@pytest.mark.parametrize("model", ROSTER, ids=MODEL_NAMES)
def test_a_training_stage_tracks_its_recipe_and_no_param_that_leaves_results_alone(model):
    listed = STAGES[model.stage]["params"]
    assert model.section in listed
    # Every key a listed entry covers (a section covers all of its keys).
    covered = [k for entry in listed for k in flat_keys(entry)]
    assert not [k for k in covered if not is_result_param(k)], f"tracks params in {NON_RESULT_PARAMS}"
    missing = [k for section in ("train", "model", "augment") for k in flat_keys(section)
               if is_result_param(k) and k not in covered]
    assert not missing, f"{model.stage} does not track {missing}: changing them would not retrain"


def flat_keys(dotted: str) -> list[str]:
    node = PARAMS
    for part in dotted.split("."):
        node = node[part]
    if not isinstance(node, dict) or not node:
        return [dotted]
    return [k for key in node for k in flat_keys(f"{dotted}.{key}")]

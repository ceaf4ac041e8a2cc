"""The roster is the one list of models: dvc.yaml, params and the model registry agree with it."""

from __future__ import annotations

import pytest
import yaml

from hdkd.config import NON_RESULT_PARAMS, Params, is_result_param, load_params
from hdkd.evidence.plots import EXTRA_COLORS, model_color, model_label
from hdkd.models import list_models
from hdkd.roster import MODEL_NAMES, ROSTER, roster, roster_entry
from tests.helpers.pipeline import DVC_YAML, ROOT

STAGES = DVC_YAML["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
RUN = roster(load_params(ROOT / "params.yaml"))  # the shipped run: the paper's models and the baselines


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


def test_baselines_join_the_roster_in_params_order_with_their_own_look():
    assert [m.name for m in RUN] == [*MODEL_NAMES, *PARAMS["baselines"]]
    vit = roster_entry("vit", PARAMS)  # the dict form (a bundle's params) gives the same entries
    assert vit == RUN[len(ROSTER)]
    assert (vit.stage, vit.section, vit.registry) == ("train_baseline@vit", "baselines.vit",
                                                      "timm:deit_tiny_patch16_224")
    assert vit.label == "VIT (timm deit_tiny_patch16_224)" and not vit.distills
    assert [m.color for m in RUN[len(ROSTER):]] == list(EXTRA_COLORS[:len(RUN) - len(ROSTER)])
    assert model_label("vit", RUN) == vit.label and model_label("vit") == "vit"
    names = [m.name for m in RUN] + ["other"]  # a model outside the run takes the next free colour
    assert model_color("other", names, RUN) == EXTRA_COLORS[len(RUN) - len(ROSTER)]
    with pytest.raises(KeyError, match="known: teacher, student, hdkd, vit, resnet"):
        roster_entry("vit2", PARAMS)


def test_dvc_yaml_trains_exactly_the_roster():
    training = [s for s in STAGES if s.startswith("train_")]
    assert training == [m.stage for m in RUN]


@pytest.mark.parametrize("model", RUN, ids=[m.name for m in RUN])
def test_a_training_stage_owns_what_its_model_names(model):
    stage = STAGES[model.stage]
    module = "train_baseline " + model.name if model.baseline else model.stage
    assert stage["cmd"] == f"python -m pipeline.{module}"
    assert stage["outs"] == [f"models/{model.name}/model.pt", f"models/{model.name}/run.json",
                             f"models/{model.name}/runs"]
    assert [next(iter(m)) for m in stage["metrics"]] == [f"reports/train/{model.name}.json"]
    assert (f"models/{model.teacher}" in stage["deps"]) == model.distills  # every run of the teacher
    assert "models" in STAGES["evaluate"]["deps"]  # a directory: every model's stage runs first
    if not model.baseline:  # DVC's plots are a fixed list; the report draws the baselines
        for plot in DVC_YAML["plots"]:
            assert any(f"_{model.name}.csv" in path for path in next(iter(plot.values()))["y"]), plot


@pytest.mark.parametrize("model", RUN, ids=[m.name for m in RUN])
def test_a_training_stage_tracks_its_recipe_and_no_param_that_leaves_results_alone(model):
    listed = STAGES[model.stage]["params"]
    assert model.section in listed
    # A baseline's optim inherits the student's values; no other model depends on the baselines.
    assert ("student" in listed) == (model.name == "student" or model.baseline)
    assert [k for k in listed if k.startswith("baselines")] == ([model.section] if model.baseline else [])
    # Every key a listed entry covers (a section covers all of its keys).
    covered = [k for entry in listed for k in flat_keys(entry)]
    assert not [k for k in covered if not is_result_param(k)], f"tracks params in {NON_RESULT_PARAMS}"
    architecture = [] if model.baseline else ["model"]  # a baseline's architecture is its own section
    assert ("model" in listed) == (not model.baseline)
    missing = [k for section in ("train", *architecture, "augment") for k in flat_keys(section)
               if is_result_param(k) and k not in covered]
    assert not missing, f"{model.stage} does not track {missing}: changing them would not retrain"


def flat_keys(dotted: str) -> list[str]:
    node = PARAMS
    for part in dotted.split("."):
        node = node[part]
    if not isinstance(node, dict) or not node:
        return [dotted]
    return [k for key in node for k in flat_keys(f"{dotted}.{key}")]

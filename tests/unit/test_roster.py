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
    assert stage["outs"] == [f"models/{model.name}/model.pt", f"models/{model.name}/runs",
                             f"reports/train/{model.name}.run.json"]  # run ids outside what downstream reads
    assert [next(iter(m)) for m in stage["metrics"]] == [f"reports/train/{model.name}.json"]
    assert (f"models/{model.teacher}" in stage["deps"]) == model.distills  # every run of the teacher
    assert "models" in STAGES["evaluate"]["deps"]  # a directory: every model's stage runs first
    # DVC's plots name no model and draw every one: tests/tools/test_dvc_plots.py


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


# ------------------------------------------------------------------ the kd methods (none by default: the study's)
def study_params():
    from hdkd.config import apply_overlay, parse_params

    return parse_params(yaml.safe_load(apply_overlay(ROOT / "params.yaml", ROOT / "params" / "study.yaml")))


STUDY = study_params()
STUDY_RUN = roster(STUDY)
KD = [m for m in STUDY_RUN if m.kd]


def test_kd_methods_join_the_roster_after_the_baselines_distilled_from_the_teacher():
    assert not roster(load_params(ROOT / "params.yaml"))[len(ROSTER) + len(PARAMS["baselines"]):]  # none by default
    assert [m.name for m in STUDY_RUN] == [*MODEL_NAMES, *STUDY.baselines, *STUDY.kd]
    assert {m.kd for m in KD} == {"deit", "logit", "aligned"}
    for m in KD:
        assert (m.stage, m.section, m.teacher, m.distills, m.baseline) == (f"train_kd@{m.name}", f"kd.{m.name}",
                                                                           "teacher", True, False)
    deit = roster_entry("deit_vit", STUDY.to_dict())  # the dict form (a bundle's params) gives the same entry
    assert deit == roster_entry("deit_vit", STUDY) and deit.registry == "timm:deit_tiny_distilled_patch16_224"
    assert {roster_entry(k, STUDY).registry for k in ("logit_kd", "aligned_kd")} == {"hdkd"}
    for attr in ("name", "label", "color"):  # every model of the study is told apart in tables and figures
        assert len({getattr(m, attr) for m in STUDY_RUN}) == len(STUDY_RUN), attr
    # the study's DeiT ViT is its ViT baseline's network, with a distillation token
    assert STUDY.kd["deit_vit"].kwargs == STUDY.baselines["vit"].kwargs
    assert STUDY.kd["deit_vit"].distill.lr == STUDY.baselines["vit"].optim.lr
    # every model at every fraction of the study
    from hdkd.roster import training_runs

    assert {tuple(training_runs(STUDY, m.name)) for m in STUDY_RUN} == {tuple(training_runs(STUDY, "hdkd"))}


def study_stages():
    from tests.helpers.pipeline import expand_foreach

    return expand_foreach(yaml.safe_load((ROOT / "dvc.yaml").read_text()),
                          yaml.safe_load((ROOT / "params.yaml").read_text()) | {"kd": STUDY.to_dict()["kd"]})["stages"]


def test_dvc_yaml_trains_exactly_the_studys_roster():
    assert [s for s in study_stages() if s.startswith("train_")] == [m.stage for m in STUDY_RUN]


@pytest.mark.parametrize("model", KD, ids=[m.name for m in KD])
def test_a_kd_stage_owns_what_its_model_names_and_tracks_its_recipe(model):
    stages = study_stages()
    stage = stages[model.stage]
    assert stage["cmd"] == f"python -m pipeline.train_kd {model.name}"
    assert stage["outs"] == [f"models/{model.name}/model.pt", f"models/{model.name}/runs",
                             f"reports/train/{model.name}.run.json"]  # run ids outside what downstream reads
    assert [next(iter(m)) for m in stage["metrics"]] == [f"reports/train/{model.name}.json"]
    assert "models/teacher" in stage["deps"]  # every run of the teacher
    listed = stage["params"]
    # its own entry (no other kd method's, no baseline's), the distill section it inherits, the model section
    assert [k for k in listed if k.startswith(("kd", "baselines"))] == [model.section]
    assert {"distill", "model", "seeds", "fractions", "augment"} <= set(listed) and "baseline_fractions" not in listed
    missing = [k for k in flat_keys("train") if is_result_param(k) and k not in listed]
    assert not missing, f"{model.stage} does not track {missing}"
    assert "kd" in stages["evaluate"]["params"]

"""params.yaml validation: the one home of the defaults, overlays on it, and errors that name the file and key."""

import math
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from hdkd.config import REPLACED_WHOLE, BaselineConfig, ConfigError, Params, apply_overlay, load_params, parse_params
from pipeline.params import main as params_cli
from tests.helpers import ROOT
from tests.helpers.params import PARAMS, PARAMS_YAML, make_params, params_without

OVERLAYS = sorted((ROOT / "params").glob("paper-*.yaml"))


def test_params_yaml_is_valid():
    params = load_params(PARAMS_YAML)
    assert params.flat()["distill.lambda"] == params.distill.lambda_


def test_the_code_carries_no_defaults():
    # every setting comes from params.yaml: a model field with a default would be one nobody runs
    def defaulted(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            if not field.is_required():
                out.append(key)
            for inner in models_in(field.annotation):  # a section, or the values of dict[str, Section]
                out += defaulted(inner, key + ".")
        return out

    def models_in(annotation) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    assert "optim" in BaselineConfig.model_fields and models_in(Params.model_fields["baselines"].annotation)

    assert defaulted(Params) == []


def overlaid(overlay: Path) -> Params:
    return parse_params(yaml.safe_load(apply_overlay(PARAMS_YAML, overlay)))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_each_overlay_names_only_keys_of_params_yaml_with_other_values(overlay):
    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and f"{prefix}{k}" not in REPLACED_WHOLE:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    base = dict(leaves(PARAMS))
    for key, value in leaves(yaml.safe_load(overlay.read_text())):
        assert key in base, f"{overlay.name}: {key} is not in params.yaml"
        assert value != base[key], f"{overlay.name}: {key} repeats params.yaml's value"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_paper_overlays_give_the_official_hyper_parameters(overlay):
    p = overlaid(overlay)
    assert p.data.dataset == overlay.stem.removeprefix("paper-").replace("-", "_")
    assert (p.model.size, p.data.image_size, p.train.batch_size) == ("paper", 224, 16)
    assert (p.teacher.optimizer, p.teacher.lr, p.teacher.schedule, p.teacher.epochs) == ("adam", 1e-3, "none", 200)
    for s in (p.student, p.distill):
        assert (s.optimizer, s.lr, s.weight_decay, s.schedule, s.warmup_epochs, s.warmup_lr, s.min_lr, s.epochs) == (
            "adamw", 5e-5, 0.05, "cosine", 5, 2e-5, 2e-5, 200)
    assert (p.distill.type, p.distill.alpha, p.distill.tau, p.distill.lambda_, p.distill.beta) == (
        "soft", 0.5, 1.0, 10.0, 1.0)
    assert p.balance.method == "none"


def test_applying_an_overlay_rewrites_only_its_values_and_keeps_the_comments(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text(PARAMS_YAML.read_text())
    # The first paper overlay less its baselines, which replace whole, and the comparisons naming them.
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(OVERLAYS[0].read_text()).items()
                                       if k not in (*REPLACED_WHOLE, "report")}))
    params_cli(["--apply", str(overlay), "--params", str(target)])
    assert load_params(target) == overlaid(overlay)
    before, after = PARAMS_YAML.read_text().splitlines(), target.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == len(list(_leaves_of(overlay)))
    assert all(a.split(":")[0] == b.split(":")[0] for a, b in changed)  # same keys, same places
    assert "# synthetic | imagefolder" in target.read_text() and "grad_clip: null" in target.read_text()


def _leaves_of(overlay):
    def walk(d):
        for v in d.values():
            yield from (walk(v) if isinstance(v, dict) else [v])
    return walk(yaml.safe_load(overlay.read_text()))


def test_an_overlay_key_params_yaml_lacks_is_refused_and_nothing_is_written(tmp_path):
    target = tmp_path / "params.yaml"
    target.write_text(PARAMS_YAML.read_text())
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("distill:\n  lamda: 5\n")
    with pytest.raises(ConfigError, match=rf"{overlay}: distill\.lamda is not a key"):
        params_cli(["--apply", str(overlay), "--params", str(target)])
    overlay.write_text("distill:\n  alpha: 2\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml:\n  distill\.alpha: Input should be less than or equal to 1"):
        params_cli(["--apply", str(overlay), "--params", str(target)])
    assert target.read_text() == PARAMS_YAML.read_text()


@pytest.mark.parametrize("raw,key", [
    ({"distill": {"alpha": 1.5}}, "distill.alpha"),
    ({"distill": {"tau": 0}}, "distill.tau"),
    ({"distill": {"stages": [1, 4]}}, "distill.stages"),
    ({"distill": {"stages": []}}, "distill.stages"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset"),
    ({"model": {"size": "huge"}}, "model.size"),
    ({"model": {"stem_stride": 3}}, "model.stem_stride"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"teacher": {"lr": -1}}, "teacher.lr"),
    ({"augment": {"blur_kernel": 4}}, "augment.blur_kernel"),
    ({"balance": {"targets": {"mel": 0}}}, "balance.targets"),
    ({"distil": {"alpha": 0.5}}, "distil"),
    ({"data": {"imagesize": 64}}, "data.imagesize"),
])
def test_invalid_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"(?m)^  {key.replace('.', r'[.]')}(\.\S+)?: "):
        make_params(raw)


def test_image_size_must_fit_the_models():
    with pytest.raises(ConfigError, match="data.image_size .60. must be a multiple of 16"):
        make_params({"data": {"image_size": 60}})
    with pytest.raises(ConfigError, match="multiple of 32 for model.stem_stride=4"):
        make_params({"data": {"image_size": 48}, "model": {"stem_stride": 4}})


def test_schedule_must_fit_the_epochs():
    with pytest.raises(ConfigError, match="warmup_epochs .5. must be < epochs .5."):
        make_params({"student": {"epochs": 5, "optimizer": "adamw", "lr": 1e-3, "schedule": "cosine",
                                 "warmup_epochs": 5}})


def test_load_params_reports_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(tmp_path / "list.yaml")


def params_text(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


# Each was accepted before params.yaml became the one home of the defaults: the code filled it in.
def test_an_empty_params_file_is_an_error_naming_it(tmp_path):
    path = params_text(tmp_path, "# nothing set\n")
    with pytest.raises(ConfigError, match=rf"^{path} is empty"):
        load_params(path)


@pytest.mark.parametrize("key", ["teacher", "report", "data.synthetic", "distill.lambda", "train.grad_clip",
                                 "data.synthetic.num_images", "tracking.experiment"])
def test_a_missing_section_or_key_is_an_error_naming_the_file_and_key(tmp_path, key):
    path = params_text(tmp_path, yaml.safe_dump(params_without(key)))
    with pytest.raises(ConfigError, match=rf"invalid params in {path}:\n  {key.replace('.', '[.]')}: missing") as e:
        load_params(path)
    assert str(e.value).count("\n") == 1  # that one key, nothing else


def test_a_duplicated_key_is_an_error_naming_the_file_line_and_key(tmp_path):
    lines = PARAMS_YAML.read_text().splitlines(keepends=True)
    at = lines.index("distill:\n") + 1  # a second "epochs" right below distill's first
    path = params_text(tmp_path, "".join(lines[:at] + ["  epochs: 200\n"] + lines[at:]))
    with pytest.raises(ConfigError, match=rf"^{path}:{at + 2}: duplicate key distill\.epochs \(first set on line "):
        load_params(path)
    path = params_text(tmp_path, PARAMS_YAML.read_text() + "seed: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: duplicate key seed "):
        load_params(path)


def test_digest_ignores_formatting_but_not_values(tmp_path):
    a = make_params({"distill": {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "lambda": 10}})
    b = make_params({"distill": {"lambda": 10.0, "lr": 0.001, "optimizer": "adamw", "epochs": 2}})
    c = make_params({"distill": {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "lambda": 5}})
    assert a.digest() == b.digest() != c.digest()
    assert a.to_dict()["distill"]["lambda"] == 10.0  # YAML key names, not Python ones


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted params.yaml keys of every float field, found by walking the models (new ones included)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        if typing.get_origin(field.annotation) is dict:  # a named collection: walk the entry params.yaml names first
            kinds = typing.get_args(field.annotation)[1:]
            if not (isinstance(kinds[0], type) and issubclass(kinds[0], BaseModel)):
                continue
            node = PARAMS
            for part in key.split("."):
                node = node[part]
            if not node:  # none in params.yaml (kd: the study's): nothing to set
                continue
            key += "." + next(iter(node))
        if typing.get_origin(field.annotation) is list and any(isinstance(t, type) and issubclass(t, BaseModel)
                                                                 for t in kinds):
            continue  # a list of sections (report.claims), empty in params.yaml: its tests check its entries
        if float in kinds:
            keys.append(key)
        keys += [k for t in kinds if isinstance(t, type) and issubclass(t, BaseModel) for k in _float_keys(t, key + ".")]
    return keys


FLOAT_KEYS = _float_keys(Params)


def test_float_keys_are_all_found():
    assert {"augment.sharpness", "distill.beta", "distill.lambda", "teacher.lr", "train.grad_clip"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(key, value):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    *sections, leaf = key.split(".")
    node = raw
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = [value] if isinstance(node.get(leaf), list) else value  # a list of floats: one item
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(key)}(\.0)?: Input should be a finite number"):
        parse_params(raw)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_an_overlay_replaces_the_baselines_set_whole(overlay):
    named = yaml.safe_load(overlay.read_text())["baselines"]
    assert set(overlaid(overlay).baselines) == set(named) and not set(named) & set(PARAMS["baselines"])


@pytest.mark.parametrize(("overrides", "message"), [
    ({"seeds": []}, r"seeds: List should have at least 1 item"),
    ({"seeds": [0, 0]}, r"seeds: Value error, seeds must be distinct non-negative integers; got \[0, 0\]"),
    ({"fractions": [0.5]}, r"fractions: .*include 1.0 .*got \[0.5\]"),
    ({"fractions": [0.0, 1.0]}, r"fractions: .*in \(0, 1\]"),
    ({"fractions": [0.5, 0.5, 1.0]}, r"fractions: .*distinct"),
    ({"baseline_fractions": [0.3, 1.0]}, r"baseline_fractions \[0.3\] are not among fractions"),
    ({"baseline_fractions": [0.5]}, r"baseline_fractions: .*include 1.0"),
    ({"report": {"comparisons": [["hdkd", "hdkd"]]}}, r"report.comparisons: .*compared with itself"),
    ({"report": {"comparisons": [["hdkd", "nope"]]}}, r"report.comparisons names \['nope'\], not models of this run"),
    ({"balance": {"method": "smote"}}, r"balance.method 'smote' balances the whole training split; .*fractions: \[1.0\]"),
])
def test_seeds_fractions_and_comparisons_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_params(overrides)


def test_fractions_are_sorted_and_balancing_works_on_the_whole_split():
    assert make_params({"fractions": [1.0, 0.25]}).fractions == [0.25, 1.0]
    assert make_params({"balance": {"method": "smote"}, "fractions": [1.0]}).balance.method == "smote"


def test_augment_sharpness_has_an_upper_bound():
    make_params({"augment": {"sharpness": 10.0}})  # the bound itself: a strong but real sharpening
    for value in (10.01, 1e6):
        with pytest.raises(ConfigError, match=r"augment\.sharpness: Input should be less than or equal to 10"):
            make_params({"augment": {"sharpness": value}})


def claim(**change):
    return {"claim": "HDKD beats the student", "compare": ["hdkd", "student"], "fraction": 1.0,
            "minus_fraction": None, "metric": "accuracy"} | change


def test_claims_name_models_and_fractions_of_the_run():
    assert make_params({"report": {"claims": [claim()]}}).report.claims[0].compare == ("hdkd", "student")
    with pytest.raises(ConfigError, match=r"report.claims\[0\] names \['deit'\], not models of this run"):
        make_params({"report": {"claims": [claim(compare=["hdkd", "deit"])]}})
    with pytest.raises(ConfigError, match=r"report.claims\[0\]: hdkd, student not trained at fraction 0.5"):
        make_params({"report": {"claims": [claim(fraction=0.5)]}})
    with pytest.raises(ConfigError, match="vit not trained at fraction 0.25"):  # the baselines: at baseline_fractions
        make_params({"report": {"claims": [claim(compare=["hdkd", "vit"], fraction=0.25)]}})
    with pytest.raises(ConfigError, match="minus_fraction must differ from fraction"):
        make_params({"report": {"claims": [claim(minus_fraction=1.0)]}})
    with pytest.raises(ConfigError, match="a model compared with itself"):
        make_params({"report": {"claims": [claim(compare=["hdkd", "hdkd"])]}})
    with pytest.raises(ConfigError, match="claims.0.minus_fraction: missing"):
        make_params({"report": {"claims": [{k: v for k, v in claim().items() if k != "minus_fraction"}]}})


def test_the_study_declares_the_papers_claims_before_the_run():
    study = overlaid(ROOT / "params" / "study.yaml")
    claims = study.report.claims
    smallest, full = min(study.fractions), 1.0
    assert len(claims) == 9 and {c.metric for c in claims} == {"accuracy"}
    tested = {(c.compare, c.fraction, c.minus_fraction) for c in claims}
    assert {(("hdkd", "student"), f, None) for f in study.fractions} <= tested  # HDKD > student at each fraction
    for rival in ("logit_kd", "aligned_kd", "deit_vit"):  # > each method it claims to beat, smallest and full
        assert {(("hdkd", rival), smallest, None), (("hdkd", rival), full, None)} <= tested
    assert (("hdkd", "student"), smallest, full) in tested  # a larger gain with less data
    assert study.baseline_fractions == study.fractions  # every model at every fraction
    assert {m.method for m in study.kd.values()} == {"deit", "logit", "aligned"}

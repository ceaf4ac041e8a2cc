import math
import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from hdkd.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "params").glob("*.yaml"))])
def test_shipped_params_files_are_valid(path):
    params = load_params(ROOT / path)
    assert params.flat()["distill.lambda"] == params.distill.lambda_


def test_paper_files_hold_the_official_hyper_parameters():
    for path in (ROOT / "params").glob("paper-*.yaml"):
        p = load_params(path)
        assert (p.model.size, p.data.image_size, p.train.batch_size) == ("paper", 224, 16)
        assert (p.teacher.optimizer, p.teacher.lr, p.teacher.schedule, p.teacher.epochs) == ("adam", 1e-3, "none", 200)
        for s in (p.student, p.distill):
            assert (s.optimizer, s.lr, s.weight_decay, s.schedule, s.warmup_epochs, s.warmup_lr, s.min_lr, s.epochs) == (
                "adamw", 5e-5, 0.05, "cosine", 5, 2e-5, 2e-5, 200)
        assert (p.distill.type, p.distill.alpha, p.distill.tau, p.distill.lambda_, p.distill.beta) == (
            "soft", 0.5, 1.0, 10.0, 1.0)
        assert p.balance.method == "none"


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
    base = {"distill": {"epochs": 2, "optimizer": "adamw", "lr": 1e-3}, "teacher": {"epochs": 2, "optimizer": "adam",
                                                                                   "lr": 1e-3}}
    for section, values in raw.items():
        base[section] = {**base.get(section, {}), **values}
    with pytest.raises(ConfigError, match=rf"(?m)^  {key.replace('.', r'[.]')}(\.\S+)?: "):
        parse_params(base)


def test_image_size_must_fit_the_models():
    with pytest.raises(ConfigError, match="data.image_size .60. must be a multiple of 16"):
        parse_params({"data": {"image_size": 60}})
    with pytest.raises(ConfigError, match="multiple of 32 for model.stem_stride=4"):
        parse_params({"data": {"image_size": 48}, "model": {"stem_stride": 4}})


def test_schedule_must_fit_the_epochs():
    with pytest.raises(ConfigError, match="warmup_epochs .5. must be < epochs .5."):
        parse_params({"student": {"epochs": 5, "optimizer": "adamw", "lr": 1e-3, "schedule": "cosine",
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


def test_digest_ignores_formatting_but_not_values(tmp_path):
    a = parse_params({"distill": {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "lambda": 10}})
    b = parse_params({"distill": {"lambda": 10.0, "lr": 0.001, "optimizer": "adamw", "epochs": 2}})
    c = parse_params({"distill": {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "lambda": 5}})
    assert a.digest() == b.digest() != c.digest()
    assert a.to_dict()["distill"]["lambda"] == 10.0  # YAML key names, not Python ones


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted params.yaml keys of every float field, found by walking the models (new ones included)."""
    keys = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        kinds = typing.get_args(field.annotation) or (field.annotation,)
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
    node[leaf] = value
    with pytest.raises(ConfigError, match=rf"(?m)^  {re.escape(key)}: Input should be a finite number"):
        parse_params(raw)

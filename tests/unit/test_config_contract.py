"""The params contract as a user meets it: the errors of a bad params file or overlay (each names the file, the
line or the key, and why), the params hash (the same params give the same hash in any key order, and the hash of
params.yaml is the one its committed reports and MLflow tags carry), and which keys can change a result."""

import json
import re

import pytest
import yaml

from hdkd.config import ConfigError, apply_overlay, load_params, parse_params, read_params_yaml, result_params
from tests.helpers import ROOT
from tests.helpers.params import PARAMS, PARAMS_YAML, make_params, params_dict


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


# --- errors ------------------------------------------------------------------------------------------------------


def test_a_key_set_twice_inside_a_list_item_names_its_path_and_both_lines(tmp_path):
    path = write(tmp_path, "dup.yaml", "a:\n  - x: 1\n    y: 2\n  - x: 1\n    x: 2\n")
    with pytest.raises(ConfigError) as e:
        read_params_yaml(path)
    assert str(e.value) == (f"{path}:5: duplicate key a[1].x (first set on line 4; "
                            "YAML would silently keep the last)")


def test_a_top_level_key_set_twice_is_named_alone(tmp_path):
    path = write(tmp_path, "dup.yaml", "seed: 1\nother: 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3: duplicate key seed (first set on line 1;")):
        read_params_yaml(path)


def test_a_params_file_that_is_not_utf8_is_named(tmp_path):
    path = write(tmp_path, "latin.yaml", "# réglages\nseed: 1\n", encoding="latin-1")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} is not UTF-8 text: "):
        read_params_yaml(path)


def test_a_params_file_holding_a_list_says_what_it_holds(tmp_path):
    path = write(tmp_path, "list.yaml", "- seed\n- 1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} must hold a mapping of sections, got list$"):
        load_params(path)


def test_an_unknown_key_is_called_one_with_the_advice_to_check_its_spelling():
    with pytest.raises(ConfigError) as e:
        parse_params(params_dict({"distill": {"lamda": 3}}))
    assert str(e.value) == ("invalid params:\n  distill.lamda: unknown key "
                            "(check the spelling against params.yaml's documented keys)")


def test_every_error_is_on_its_own_line_after_the_source():
    with pytest.raises(ConfigError) as e:
        parse_params(params_dict({"distill": {"alpha": 1.5}, "teacher": {"epochs": 0}}), "my.yaml")
    head, *lines = str(e.value).split("\n")
    assert head == "invalid params in my.yaml:"
    assert sorted(line.split(":")[0] for line in lines) == ["  distill.alpha", "  teacher.epochs"]


def test_a_rule_across_sections_is_reported_at_the_root():
    with pytest.raises(ConfigError) as e:
        parse_params(params_dict({"data": {"image_size": PARAMS["data"]["image_size"] + 1}}))
    (line,) = str(e.value).split("\n")[1:]
    assert line.startswith("  <root>: ") and "data.image_size" in line


@pytest.mark.parametrize("text", ["{}\n", "- seed\n"])
def test_an_overlay_that_changes_nothing_or_is_not_a_mapping_is_refused_by_name(tmp_path, text):
    overlay = write(tmp_path, "overlay.yaml", text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(overlay))} must hold a mapping of the sections"):
        apply_overlay(PARAMS_YAML, overlay)


def test_an_overlay_key_params_yaml_lacks_says_what_an_overlay_may_do(tmp_path):
    overlay = write(tmp_path, "overlay.yaml", "distill:\n  lamda: 3\n")
    with pytest.raises(ConfigError) as e:
        apply_overlay(PARAMS_YAML, overlay)
    assert str(e.value) == (f"{overlay}: distill.lamda is not a key of the params it overlays "
                            "(an overlay only changes values that params.yaml sets)")


def test_an_overlay_sets_nested_values_in_place_keeping_every_other_line(tmp_path):
    overlay = write(tmp_path, "overlay.yaml", "data:\n  synthetic:\n    num_images: 123\n")
    text = apply_overlay(PARAMS_YAML, overlay)
    before, after = PARAMS_YAML.read_text(encoding="utf-8").splitlines(), text.splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and re.fullmatch(r"\s+num_images: 123(\s+#.*)?", changed[0][1]), changed
    assert yaml.safe_load(text)["data"]["synthetic"]["num_images"] == 123


# --- the params hash ---------------------------------------------------------------------------------------------


def test_the_hash_does_not_depend_on_the_order_of_named_entries():
    forward = make_params()
    raw = params_dict()
    raw["baselines"] = dict(reversed(list(raw["baselines"].items())))
    assert list(raw["baselines"]) != list(PARAMS["baselines"])  # two entries, now the other way round
    assert parse_params(raw).digest() == forward.digest()
    assert re.fullmatch(r"[0-9a-f]{16}", forward.digest())


def test_the_hash_of_params_yaml_is_the_one_its_committed_reports_carry():
    # MLflow runs are tagged and found by it (hdkd.params_hash), and reports name it: a change of how it is
    # computed would orphan every run and report made before.
    bundle = json.loads((ROOT / "reports" / "bundle.json").read_text(encoding="utf-8"))
    assert load_params(PARAMS_YAML).digest() == bundle["params_hash"]


# --- which keys change a result ----------------------------------------------------------------------------------


def test_where_runs_are_logged_and_how_they_are_spread_change_no_result():
    base = result_params(make_params())
    assert "seed" in base and "distill.lambda" in base and not any(k.startswith("tracking.") for k in base)
    for change in ({"tracking": {"uri": "http://elsewhere:5000", "enabled": False}},
                   {"train": {"executor": "ray", "num_workers": 3, "run_workers": 1}},
                   {"evaluate": {"latency_batch_sizes": [1]}}):
        assert result_params(make_params(change)) == base, change
    for change in ({"seed": PARAMS["seed"] + 1}, {"distill": {"lambda": 3}}, {"train": {"batch_size": 8}}):
        assert result_params(make_params(change)) != base, change

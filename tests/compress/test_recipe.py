"""Recipes: shorthands, files, and clear errors for every bad key or value."""

from __future__ import annotations

import json

import pytest

from rapidlm.compress.configs import Calibration, Int4WeightOnly, Int8WeightOnly, KVCacheInt8, Native, W8A8Dynamic
from rapidlm.compress.recipe import SHORTHANDS, load_recipe_file, recipe_from_dict, resolve_recipe
from rapidlm.errors import ConfigError


def test_every_documented_shorthand_resolves():
    for name in ["int8", "int4-g32", "int4-g128", "int4-g128-gptq", "int4-g128-awq", "w8a8", "kv-int8", "native"]:
        assert name in SHORTHANDS
        assert resolve_recipe(name).steps
    r = resolve_recipe("int4-g128-gptq")
    assert r.steps == (Int4WeightOnly(group_size=128, method="gptq"),) and r.needs_calibration
    assert resolve_recipe("int8").steps == (Int8WeightOnly(),) and not resolve_recipe("int8").needs_calibration
    combo = resolve_recipe("int4-g32+kv-int8")
    assert combo.kv_int8 and combo.weight_step == Int4WeightOnly(group_size=32)
    assert resolve_recipe("native").native


def test_yaml_and_json_recipe_files(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text(
        "name: mine\nsteps:\n  - type: int4_weight_only\n    group_size: 64\n    method: awq\n"
        "  - kv_cache_int8\ncalibration:\n  samples: 8\n  seq_len: 128\n"
    )
    r = load_recipe_file(y)
    assert r.name == "mine" and r.kv_int8 and r.calibration.samples == 8
    assert r.weight_step == Int4WeightOnly(group_size=64, method="awq")
    j = tmp_path / "w8.json"
    j.write_text(json.dumps({"steps": [{"type": "w8a8_dynamic", "smoothquant_alpha": 0.6}]}))
    assert resolve_recipe(str(j)).steps == (W8A8Dynamic(smoothquant_alpha=0.6),)
    assert recipe_from_dict(r.to_dict()) == r  # round trip through the manifest form


@pytest.mark.parametrize(
    "data,match",
    [
        ({"steps": [{"type": "int4_weight_only", "grup_size": 64}]}, "unknown key 'grup_size'"),
        ({"steps": [{"type": "int4_weight_only", "group_size": 48}]}, "group_size"),
        ({"steps": [{"type": "int4_weight_only", "method": "magic"}]}, "method"),
        ({"steps": [{"type": "w8a8_dynamic", "smoothquant_alpha": 2}]}, "smoothquant_alpha"),
        ({"steps": [{"type": "int3"}]}, "unknown step type 'int3'"),
        ({"steps": []}, "non-empty"),
        ({"stepz": []}, "unknown key 'stepz'"),
        ({"steps": ["int8_weight_only", "native"]}, "more than once"),
        ({"steps": ["int8_weight_only"], "calibration": {"samples": 0}}, "samples"),
        ({"steps": ["int8_weight_only"], "calibration": {"region": [0.8, 0.2]}}, "region"),
        ({"steps": ["int8_weight_only"], "calibration": {"sampels": 3}}, "unknown key 'sampels'"),
        ({"steps": [{"type": "int8_weight_only", "lm_head": "int4"}]}, "lm_head"),
        ({"steps": [{"type": "int4_weight_only", "act_order": "yes"}]}, "act_order"),
    ],
)
def test_bad_recipes_are_rejected_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(data, "r.yaml")


def test_bad_files_and_shorthands(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe_file(bad)
    with pytest.raises(ConfigError, match="neither a recipe file nor a shorthand"):
        resolve_recipe("int4-g100")
    with pytest.raises(ConfigError, match="more than once"):
        resolve_recipe("int8+int4-g32")


def test_config_objects_validate_on_construction():
    with pytest.raises(ConfigError, match="Int4WeightOnly.damp"):
        Int4WeightOnly(damp=-1)
    with pytest.raises(ConfigError, match="Calibration.seq_len"):
        Calibration(seq_len=1)
    assert resolve_recipe(KVCacheInt8()).kv_int8 and resolve_recipe(Native()).native

"""Recipes: read, validate and name compression steps. A recipe is a YAML/JSON file or a shorthand.

    name: int4-g128-gptq            # optional
    steps:                          # applied in order: pruning steps first, then one weight quantization at
                                    # most; kv_cache_int8 may join it
      - type: int4_weight_only
        group_size: 128
        method: gptq
    calibration:                    # optional; used by steps that calibrate (gptq, awq, smoothquant)
      data: ../shared/data/wikitext-2/valid.txt
      samples: 64
      seq_len: 512

Shorthands (see SHORTHANDS) may be joined with '+', e.g. "int4-g32+kv-int8".
Every unknown key and every bad value is an error naming the key, with the file it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from rapidlm.compress.configs import (
    STEP_TYPES,
    Calibration,
    Dequantized,
    Int4WeightOnly,
    Int8WeightOnly,
    KVCacheInt8,
    Magnitude,
    Native,
    Recipe,
    SemiStructured,
    StepConfig,
    Structured,
    W8A8Dynamic,
    Wanda,
)
from rapidlm.errors import ConfigError

# Shorthand -> the steps it stands for. Exact names only: nothing is guessed from a near miss.
SHORTHANDS: dict[str, Callable[[], list[StepConfig]]] = {
    "native": lambda: [Native()],
    "dequantized": lambda: [Dequantized()],
    "int8": lambda: [Int8WeightOnly()],
    "w8a8": lambda: [W8A8Dynamic(smoothquant_alpha=0.5)],
    "w8a8-plain": lambda: [W8A8Dynamic()],
    "kv-int8": lambda: [KVCacheInt8()],
    "2:4": lambda: [SemiStructured(2, 4, "wanda")],
    "2:4-magnitude": lambda: [SemiStructured(2, 4, "magnitude")],
}
for _s in (10, 20, 30, 40, 50, 60, 70):  # unstructured sparsity in percent
    SHORTHANDS[f"magnitude-{_s}"] = lambda s=_s: [Magnitude(s / 100)]
    SHORTHANDS[f"magnitude-global-{_s}"] = lambda s=_s: [Magnitude(s / 100, scope="global")]
    SHORTHANDS[f"wanda-{_s}"] = lambda s=_s: [Wanda(s / 100)]
for _n in range(1, 25):  # whole layers removed, least important (block influence) first
    SHORTHANDS[f"prune-layers-{_n}"] = lambda n=_n: [Structured(layers=n)]
for _g in (32, 64, 128):
    SHORTHANDS[f"int4-g{_g}"] = lambda g=_g: [Int4WeightOnly(group_size=g)]
    SHORTHANDS[f"int4-g{_g}-gptq"] = lambda g=_g: [Int4WeightOnly(group_size=g, method="gptq")]
    SHORTHANDS[f"int4-g{_g}-awq"] = lambda g=_g: [Int4WeightOnly(group_size=g, method="awq")]


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known)) or 'none'})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe (a mapping with `steps`, or a bare list of steps)."""
    if isinstance(data, list):
        data = {"steps": data}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{source}: a recipe is a mapping with 'steps' (or a list of steps), got {kind}")
    for key in data:
        if key not in ("name", "steps", "calibration"):
            raise ConfigError(f"{source}: unknown key {key!r} (known: calibration, name, steps)")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{source}: 'steps' must be a non-empty list of steps")
    steps = []
    for i, raw in enumerate(raw_steps):
        where = f"{source}: steps[{i}]"
        if isinstance(raw, str):
            raw = {"type": raw}
        if not isinstance(raw, dict) or "type" not in raw:
            raise ConfigError(f"{where} must be a mapping with a 'type' key, got {raw!r}")
        raw = dict(raw)
        kind = raw.pop("type")
        if kind not in STEP_TYPES:
            raise ConfigError(f"{where}: unknown step type {kind!r} (known: {', '.join(sorted(STEP_TYPES))})")
        steps.append(_build(STEP_TYPES[kind], raw, f"{where} ({kind})"))
    cal = data.get("calibration") or {}
    if not isinstance(cal, dict):
        raise ConfigError(f"{source}: 'calibration' must be a mapping, got {cal!r}")
    calibration = _build(Calibration, cal, f"{source}: calibration")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: 'name' must be a string, got {name!r}")
    try:
        return Recipe(tuple(steps), calibration, name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_recipe_file(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)  # safe_load: plain data only, no Python objects
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    recipe = recipe_from_dict(data, str(path))
    return recipe if recipe.name else Recipe(recipe.steps, recipe.calibration, path.stem)


def resolve_recipe(spec: str | os.PathLike | Recipe | StepConfig | None) -> Recipe | None:
    """A shorthand ('int4-g128-gptq', 'int4-g32+kv-int8'), a recipe file, a Recipe or a single step config."""
    if spec is None or isinstance(spec, Recipe):
        return spec
    if isinstance(spec, tuple(STEP_TYPES.values())):
        return Recipe((spec,), name=type(spec).__name__)
    text = str(spec)
    if os.path.isfile(text):
        return load_recipe_file(text)
    parts = text.split("+")
    if all(p in SHORTHANDS for p in parts):
        steps = [s for p in parts for s in SHORTHANDS[p]()]
        try:
            return Recipe(tuple(steps), name=text)
        except ConfigError as exc:
            raise ConfigError(f"quantization {text!r}: {exc}") from None
    unknown = next(p for p in parts if p not in SHORTHANDS)
    raise ConfigError(
        f"quantization {unknown!r} is neither a recipe file nor a shorthand "
        f"(shorthands: {', '.join(sorted(SHORTHANDS))})"
    )

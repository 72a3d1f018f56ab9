"""Saved compressed models: a folder with `model.safetensors`, the tokenizer files and `rapidlm.json`.

The manifest records the format version, the recipe, the source model (path, size, sha256), the model config
and, per quantized module, its kind and shape. Quantized weights are stored portably (codes, scales, offsets;
4-bit codes two per byte), never in a kernel's machine-specific packed layout, and packed again on load, so a
folder written on one machine runs on another. Only safetensors and JSON are read back: no pickles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rapidlm.compress.apply import cast_float_modules
from rapidlm.compress.configs import Recipe
from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight
from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight
from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear
from rapidlm.compress.quantize import QuantizeReport
from rapidlm.compress.recipe import recipe_from_dict
from rapidlm.config import ModelConfig, RopeScaling
from rapidlm.errors import ModelFormatError
from rapidlm.loading.loader import COMPRESSED_MANIFEST, LoadedModel
from rapidlm.loading.registry import model_class
from rapidlm.loading.tokenizer import Tokenizer

MANIFEST = COMPRESSED_MANIFEST
FORMAT = "rapidlm-compressed"
FORMAT_VERSION = 1


def is_compressed_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) bytes: element 2j in the low nibble, 2j+1 in the high one."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)


def save_compressed(
    loaded: LoadedModel,
    recipe: Recipe,
    report: QuantizeReport,
    out: str | os.PathLike,
    extra: dict | None = None,
    ignore: tuple[str, ...] = (),
) -> Path:
    """Write the compressed model in `loaded` (quantized with keep_weights=True, or pruned) to the folder `out`.
    `extra` adds keys to the manifest; entries named in `ignore` may already be in `out` (a training checkpoint)."""
    out = Path(out)
    if out.exists() and any(p.name not in ignore for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    if not report.keep_weights:
        raise ValueError("save_compressed needs a QuantizeReport made with keep_weights=True")
    out.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    for name, (kind, w) in report.weights.items():
        if kind == "int4":
            tensors[f"{name}.codes"] = _pack_nibbles(w.q)
            tensors[f"{name}.scale"], tensors[f"{name}.offset"] = w.scale, w.offset
        else:  # int8 and w8a8 both hold an Int8Weight
            tensors[f"{name}.codes"], tensors[f"{name}.scale"] = w.q, w.scale
        bias = getattr(model.get_submodule(name), "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float()
        modules[name] = {"kind": kind, "shape": list(w.shape), "group_size": w.group_size}
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in modules:
            continue
        if key == "lm_head.weight" and loaded.config.tie_word_embeddings:
            continue
        if key == "embed.weight" and report.tied_embedding:
            continue  # rebuilt on load from the int8 head it equals
        tensors[key] = value.detach().contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    if loaded.tokenizer is not None:
        loaded.tokenizer.save(out)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe.to_dict(),
        "method": report.method,
        "source": {
            "path": str(loaded.path),
            "bytes": os.path.getsize(loaded.path) if loaded.path.is_file() else None,
            "sha256": file_sha256(loaded.path),
        },
        "config": dataclasses.asdict(loaded.config),
        "modules": modules,
        "embedding_from_lm_head": report.tied_embedding,
        "tokenizer": "tokenizer.json" if loaded.tokenizer is not None else None,
    }
    if report.pruning:
        manifest["pruning"] = [dataclasses.asdict(p) for p in report.pruning]
    manifest.update(extra or {})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{folder / MANIFEST} is not a readable JSON manifest: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ModelFormatError(f"{folder / MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"{folder / MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this rapidlm reads version {FORMAT_VERSION})"
        )
    return manifest


def manifest_recipe(folder: str | os.PathLike) -> Recipe:
    folder = Path(folder)
    return recipe_from_dict(read_manifest(folder)["recipe"], str(folder / MANIFEST))


def manifest_config(folder: str | os.PathLike, manifest: dict | None = None) -> ModelConfig:
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    try:
        raw_cfg = dict(manifest["config"])
        raw_cfg["rope_scaling"] = RopeScaling(**raw_cfg["rope_scaling"])
        return ModelConfig(**raw_cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{folder / MANIFEST}: bad model config: {exc}") from None


def _module(kind: str, spec: dict, t: dict[str, torch.Tensor], name: str) -> nn.Module:
    bias = t.get(f"{name}.bias")
    try:
        if kind == "int4":
            codes = _unpack_nibbles(t[f"{name}.codes"])
            w4 = Int4Weight(codes, t[f"{name}.scale"].float(), t[f"{name}.offset"].float(), spec["group_size"])
            return Int4Linear(w4, bias)
        w8 = Int8Weight(t[f"{name}.codes"], t[f"{name}.scale"].float(), spec["group_size"])
        if kind == "int8":
            return Int8Linear(w8, bias)
        if kind == "w8a8":
            return W8A8Linear(w8.q, w8.scale[:, 0], bias)
    except KeyError as exc:
        raise ModelFormatError(f"model.safetensors lacks the tensor {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ModelFormatError(f"quantized module {name!r} is inconsistent: {exc}") from None
    raise ModelFormatError(f"quantized module {name!r} has unknown kind {kind!r}")


def load_compressed(
    folder: str | os.PathLike,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
    with_tokenizer: bool = True,
) -> LoadedModel:
    """Load a folder written by save_compressed, with its quantized modules packed for this machine."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    cfg = manifest_config(folder, manifest)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelFormatError(f"{folder} has no model.safetensors")
    try:
        t = load_file(str(weights))
    except Exception as exc:
        raise ModelFormatError(f"{weights} is a corrupt or truncated safetensors file: {exc}") from None
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, max_seq_len=max_seq_len)
    for name, spec in manifest.get("modules", {}).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _module(spec["kind"], spec, t, name))
    float_sd = {k: v for k, v in t.items() if k.rpartition(".")[0] not in manifest.get("modules", {})}
    if manifest.get("embedding_from_lm_head"):
        if manifest.get("modules", {}).get("lm_head", {}).get("kind") not in ("int8", "w8a8"):
            raise ModelFormatError(f"{folder / MANIFEST}: embedding_from_lm_head needs an int8 or w8a8 lm_head")
        head = Int8Weight(t["lm_head.codes"], t["lm_head.scale"].float(), manifest["modules"]["lm_head"]["group_size"])
        float_sd["embed.weight"] = head.dequantize()
    expected = {k for k in model.state_dict() if k.rpartition(".")[0] not in manifest.get("modules", {})}
    if cfg.tie_word_embeddings and type(model.lm_head) is nn.Linear:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(float_sd))
    if missing:
        raise ModelFormatError(f"{weights} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(float_sd, strict=False, assign=True)
    if cfg.tie_word_embeddings and type(model.lm_head) is nn.Linear:
        model.lm_head.weight = model.embed.weight
    model.reset_rope(device)
    model = model.eval().requires_grad_(False)
    cast_float_modules(model, dtype)
    tok = Tokenizer.from_hf_folder(folder) if with_tokenizer else None
    return LoadedModel(cfg, model, tok, folder, "rapidlm")

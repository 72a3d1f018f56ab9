"""Hugging Face model folders: `config.json` + `*.safetensors` (memory-mapped; pickles are never loaded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rapidlm.config import ModelConfig
from rapidlm.errors import ModelFormatError


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} is not a model folder: it has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{path} must hold a JSON object")
    return cfg


def hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Check the architecture first, so an unsupported model is named as such, not as a missing field."""
    from rapidlm.loading.registry import model_class

    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelFormatError("config.json has no 'architectures' field")
    model_class(archs[0])
    return ModelConfig.from_hf(cfg)


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them to safetensors)"
        raise ModelFormatError(f"{folder} has no *.safetensors weights" + (hint if pickles else ""))
    return files


def hf_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) from every safetensors shard, memory-mapped, in the file's own dtype."""
    from safetensors import safe_open

    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ModelFormatError:
            raise
        except Exception as exc:  # safetensors raises SafetensorError on truncated/corrupt headers
            raise ModelFormatError(f"{file} is a corrupt or truncated safetensors file: {exc}") from exc

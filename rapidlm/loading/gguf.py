"""GGUF files (llama.cpp's format): metadata -> ModelConfig, tensors -> Hugging Face-named fp32 tensors.

Tensors are memory-mapped by `gguf.GGUFReader` and dequantized one at a time with the `gguf` package's
reference dequantizers, so peak memory is one fp32 tensor above the converted model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rapidlm.compress.kernels.int4_cpu import Int4Weight
from rapidlm.compress.kernels.int8_cpu import Int8Weight
from rapidlm.config import ModelConfig, RopeScaling
from rapidlm.errors import ModelFormatError, UnsupportedArchitectureError

GGUF_MAGIC = b"GGUF"

# GGUF `general.architecture` -> (Hugging Face architecture, whether llama.cpp permuted the Q/K rows).
# llama.cpp's converter reorders Q/K rows of "llama" models so its interleaved RoPE can run on them;
# we undo that to get back the HF layout (rotate-half RoPE). Qwen2 files are written unpermuted.
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

# The quantization types we dequantize (by GGMLQuantizationType name). Others raise a clear error.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF tensor name, or None for tensors the model does not use (e.g. rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's `permute`: rows (n_heads, hd/2, 2) interleaved back to (n_heads, 2, hd/2) halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFFile:
    """An opened GGUF file: its metadata as plain Python values and its (still memory-mapped) tensors."""

    path: Path
    metadata: dict[str, Any]
    reader: Any  # gguf.GGUFReader

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ModelFormatError(f"{self.path}: GGUF metadata is missing {key!r}")
        return self.metadata[key]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open and validate a GGUF file; raise ModelFormatError if it is not one, or is truncated or corrupt."""
    import gguf  # imported here: it pulls in numpy machinery that the HF path does not need

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
        raise ModelFormatError(f"{path} is a corrupt or truncated GGUF file: {type(exc).__name__}: {exc}") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ModelFormatError(
                f"{path} is truncated: tensor {t.name!r} ends at byte {end} but the file has {size} bytes"
            )
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception as exc:
            raise ModelFormatError(f"{path}: cannot read GGUF metadata {key!r}: {exc}") from exc
    return GGUFFile(path=path, metadata=metadata, reader=reader)


def gguf_config(g: GGUFFile) -> ModelConfig:
    arch = g.require("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{g.path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    hf_arch, _ = GGUF_ARCHITECTURES[arch]
    n_heads = int(g.require(f"{arch}.attention.head_count"))
    hidden = int(g.require(f"{arch}.embedding_length"))
    vocab = g.get(f"{arch}.vocab_size") or len(g.get("tokenizer.ggml.tokens") or [])
    names = {t.name for t in g.reader.tensors}
    scaling_type = g.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("none", None):
        scaling = RopeScaling()
    elif scaling_type == "linear":
        scaling = RopeScaling("linear", factor=float(g.require(f"{arch}.rope.scaling.factor")))
    else:
        raise UnsupportedArchitectureError(f"{g.path}: rope scaling type {scaling_type!r} is not supported")
    if "rope_freqs.weight" in names:
        # Llama 3.1 GGUFs carry precomputed llama3-scaled frequency factors instead of the scaling metadata.
        raise UnsupportedArchitectureError(f"{g.path}: GGUF rope_freqs (Llama 3.1 scaling) is not supported yet")
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g.require(f"{arch}.feed_forward_length")),
        num_layers=int(g.require(f"{arch}.block_count")),
        num_heads=n_heads,
        num_kv_heads=int(g.get(f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(g.get(f"{arch}.attention.key_length", 0)),
        rms_norm_eps=float(g.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(g.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(g.require(f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )


def dequantize(t: Any) -> torch.Tensor:
    """One GGUF tensor -> fp32 torch tensor in PyTorch (rows, cols) order."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise UnsupportedArchitectureError(
            f"GGUF tensor {t.name!r} has quantization type {qtype.name}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists the fastest-moving dim first
    try:
        arr = gguf.quants.dequantize(np.asarray(t.data), qtype)
    except Exception as exc:
        raise ModelFormatError(f"cannot dequantize GGUF tensor {t.name!r} ({qtype.name}): {exc}") from exc
    # np.array copies: F32/F16 tensors come back as read-only views of the memory map.
    return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))


# Bytes per 32-weight block of the 4-bit formats we can keep packed: fp16 scale (+ fp16 min), 16 code bytes.
_Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}


def q4_blocks(t: Any) -> Int4Weight:
    """A Q4_0 / Q4_1 tensor as 4-bit codes and per-32 scale/offset, without dequantizing.

    Block layout (ggml): fp16 d, [fp16 m,] 16 bytes whose low nibbles are elements 0-15 and high nibbles
    elements 16-31. Q4_0: w = d * (q - 8); Q4_1: w = d * q + m.
    """
    import gguf

    kind = gguf.GGMLQuantizationType(t.tensor_type).name
    n, k = (int(d) for d in reversed(t.shape))
    raw = np.asarray(t.data, dtype=np.uint8).reshape(n, k // 32, _Q4_BLOCK_BYTES[kind])
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    if kind == "Q4_1":
        offset = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = raw[..., 4:]
    else:
        offset = -8.0 * d
        qs = raw[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)  # (N, K) in 0..15
    return Int4Weight(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(offset), 32)


def q8_blocks(t: Any) -> Int8Weight:
    """A Q8_0 tensor as int8 codes and per-32 fp32 scales, without dequantizing.

    Block layout (ggml): fp16 d, then 32 int8 codes; w = d * q.
    """
    n, k = (int(d) for d in reversed(t.shape))
    raw = np.asarray(t.data, dtype=np.uint8).reshape(n, k // 32, 34)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    codes = raw[..., 2:].copy().view(np.int8).reshape(n, k)
    return Int8Weight(torch.from_numpy(codes), torch.from_numpy(d), 32)


NATIVE_KINDS = ("Q4_0", "Q4_1", "Q8_0")  # GGUF block formats rapidlm can run as stored


def gguf_tensors(
    g: GGUFFile, cfg: ModelConfig, keep: tuple[str, ...] | frozenset[str] = ()
) -> Iterator[tuple[str, torch.Tensor | Int4Weight | Int8Weight]]:
    """Yield (HF name, tensor) for every tensor the model uses, Q/K rows un-permuted where needed.

    Tensors come back as fp32, except matmul weights whose GGUF type is in `keep` (a subset of NATIVE_KINDS):
    those stay packed (Int4Weight / Int8Weight) so the model runs them as stored. A tied embedding kept this
    way is yielded twice: dequantized as the embedding table (a gather) and packed as `lm_head.weight`.
    """
    import gguf

    _, permuted = GGUF_ARCHITECTURES[g.require("general.architecture")]
    for t in g.reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        matmul = name.endswith("_proj.weight") or name == "lm_head.weight"
        if kind in keep and kind in _Q4_BLOCK_BYTES and matmul:
            w: torch.Tensor | Int4Weight | Int8Weight = q4_blocks(t)
        elif kind in keep and kind == "Q8_0" and matmul:
            w = q8_blocks(t)
        else:
            w = dequantize(t)
        if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings and kind in keep and kind == "Q8_0":
            yield "lm_head.weight", q8_blocks(t)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _rows(w, lambda x: unpermute_qk(x, cfg.num_heads))
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _rows(w, lambda x: unpermute_qk(x, cfg.num_kv_heads))
        yield name, w


def _rows(w, fn):  # noqa: ANN001, ANN202 - a tensor or a packed weight: reorder its output rows
    return fn(w) if isinstance(w, torch.Tensor) else w.map_rows(fn)

"""Test helpers: tiny random checkpoints written in the formats rapidlm loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rapidlm.loading import resolve_model

TINY = dict(
    vocab_size=49152,  # the real SmolLM2 vocabulary, so the real tokenizer can ride along
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_hf_model(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random transformers model of the given family (the reference in equivalence tests)."""
    import transformers

    config_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[arch]
    cfg = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_folder(model: torch.nn.Module, folder: Path, with_tokenizer: bool = True) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    if with_tokenizer:
        from rapidlm.loading.gguf import open_gguf
        from rapidlm.loading.tokenizer import Tokenizer

        meta = open_gguf(resolve_model("smollm2-135m")).metadata
        tok = Tokenizer.from_gguf_metadata(meta)
        tok.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template})
        )
    return folder


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders Q/K rows for its interleaved RoPE (the forward direction)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf(
    model: torch.nn.Module, path: Path, qtypes: dict[str, str] | None = None, arch: str = "llama"
) -> Path:
    """Write a transformers Llama (or Qwen2, arch="qwen2") model as llama.cpp writes it: GGUF names, Q/K rows
    permuted for "llama", the real SmolLM2 tokenizer.

    qtypes maps a GGUF tensor-name suffix (e.g. "ffn_up.weight") to a quantization type name.
    """
    import gguf

    cfg = model.config
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    src = gguf.GGUFReader(resolve_model("smollm2-135m"))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        w.add_string(key, src.fields[key].contents())
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            i, rest = name.split(".", 3)[2], name.split(".", 3)[3]
            gname = f"blk.{i}.{layer[rest]}"
        else:
            gname = names[name]
        arr = t.float().numpy()
        if arch == "llama" and gname.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        qtype = next((q for suffix, q in qtypes.items() if gname.endswith(suffix)), "F32") if arr.ndim == 2 else "F32"
        kind = gguf.GGMLQuantizationType[qtype]
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, np.ascontiguousarray(arr))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gguf(path: Path, arch: str = "llama", tensors: list[tuple[str, np.ndarray, Any]] = ()) -> Path:
    """A GGUF with just an architecture and the given (name, data, raw_dtype or None) tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for name, data, raw_dtype in tensors:
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

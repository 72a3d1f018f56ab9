"""Which model code runs which architecture, and how HF-named weights become that model's weights."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight
from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight
from rapidlm.config import ModelConfig
from rapidlm.errors import ModelFormatError, UnsupportedArchitectureError
from rapidlm.models.llama import Transformer

# HF `architectures[0]` -> model class. Explicit: a name not listed here is refused, never guessed.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": Transformer,
    "MistralForCausalLM": Transformer,
    "Qwen2ForCausalLM": Transformer,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[architecture]


Weight = torch.Tensor | Int4Weight | Int8Weight
PACKED = (Int4Weight, Int8Weight)
# Packed weight type -> the module that runs it.
PACKED_MODULES: dict[type, type[nn.Module]] = {Int4Weight: Int4Linear, Int8Weight: Int8Linear}


def _cat(parts: list[Weight], dtype: torch.dtype, device: torch.device) -> Weight:
    """Concatenate along output rows; packed parts stay packed only if all share one packed format."""
    kinds = {type(p) for p in parts}
    if len(kinds) == 1 and kinds <= set(PACKED):
        try:
            return parts[0].cat(parts)  # type: ignore[union-attr]
        except ValueError:
            pass  # e.g. different group sizes: fall through to dense
    dense = [p.dequantize().to(device=device, dtype=dtype) if isinstance(p, PACKED) else p for p in parts]
    return torch.cat(dense, dim=0)


def fuse_hf_weights(
    cfg: ModelConfig, tensors: Iterable[tuple[str, Weight]], dtype: torch.dtype, device: torch.device
) -> dict[str, Weight]:
    """Map HF names to rapidlm's, concatenating q/k/v and gate/up, converting each tensor as it arrives."""
    hf: dict[str, Weight] = {}
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints store RoPE frequencies; we compute them
        hf[name] = t if isinstance(t, PACKED) else t.to(device=device, dtype=dtype)

    def take(name: str) -> Weight:
        if name not in hf:
            raise ModelFormatError(f"checkpoint is missing the tensor {name!r}")
        return hf.pop(name)

    sd: dict[str, Weight] = {
        "embed.weight": take("model.embed_tokens.weight"),
        "norm.weight": take("model.norm.weight"),
    }
    if cfg.tie_word_embeddings and not isinstance(hf.get("lm_head.weight"), PACKED):
        hf.pop("lm_head.weight", None)  # a tied head shares the embedding; a packed one runs on its own
    elif "lm_head.weight" in hf or not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[f"layers.{i}.attn_norm.weight"] = take(p + "input_layernorm.weight")
        sd[f"layers.{i}.mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        qkv = [take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        sd[f"layers.{i}.attn.wqkv.weight"] = _cat(qkv, dtype, device)
        if cfg.attention_bias:
            sd[f"layers.{i}.attn.wqkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        sd[f"layers.{i}.attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        gate_up = [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
        sd[f"layers.{i}.mlp.w_gate_up.weight"] = _cat(gate_up, dtype, device)
        sd[f"layers.{i}.mlp.w_down.weight"] = take(p + "mlp.down_proj.weight")
    if hf:
        extra = ", ".join(sorted(hf)[:5])
        raise ModelFormatError(f"checkpoint has {len(hf)} tensors this architecture does not use, e.g. {extra}")
    return sd


def build_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, Weight]],
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int | None = None,
) -> nn.Module:
    """Instantiate the architecture's model with the given weights, without a throwaway random init.

    Weights that arrive packed (Int4Weight, Int8Weight) swap their nn.Linear for the module that runs them.
    """
    cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = cls(cfg, max_seq_len=max_seq_len)
    sd = fuse_hf_weights(cfg, tensors, dtype, device)
    swapped: list[str] = []
    for name in [n for n, w in sd.items() if isinstance(w, PACKED)]:
        module_name = name.removesuffix(".weight")
        swapped.append(module_name + ".")
        linear = model.get_submodule(module_name)
        weight = sd.pop(name)
        if weight.shape != (linear.out_features, linear.in_features):
            raise ModelFormatError(
                f"tensor {name!r} has shape {tuple(weight.shape)} but the config implies "
                f"{(linear.out_features, linear.in_features)}"
            )
        parent_name, _, child = module_name.rpartition(".")
        bias = sd.pop(module_name + ".bias", None)
        if isinstance(weight, Int4Weight):  # the int4 kernel computes in bf16, or fp32 when that is asked for
            act = dtype if dtype in (torch.bfloat16, torch.float32) else torch.bfloat16
            module: nn.Module = Int4Linear(weight, bias, act_dtype=act)
        else:
            module = PACKED_MODULES[type(weight)](weight, bias)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    # A swapped-in packed module already holds its weight and bias; only the rest comes from `sd`.
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(tuple(swapped))}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in sd:
            raise ModelFormatError(f"checkpoint gives no value for {name!r}")
        if sd[name].shape != shape:
            raise ModelFormatError(
                f"tensor {name!r} has shape {tuple(sd[name].shape)} but the config implies {tuple(shape)}"
            )
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings and type(model.lm_head) is nn.Linear:
        model.lm_head.weight = model.embed.weight
    model.reset_rope(device)
    return model.eval().requires_grad_(False)

"""`rapidlm estimate`: time to first token, decode tokens/s and memory of a model on some hardware, predicted from
the architecture and the hardware's ceilings alone (nothing is run).

The model is described by a ModelSpec (per-layer shapes and weight formats): from a model file's headers (a GGUF
file's tensor types, a `rapidlm compress` folder's manifest, an HF folder's config.json), from a config JSON, or
from a loaded model. `quant` applies a compression recipe to it as rapidlm would (int8, int4-g128, w8a8, native,
kv-int8, structured pruning). The hardware is `cpu-here` (measured, rapidlm.profile.roofline) or a datasheet GPU.

How a step's time is predicted (printed with every estimate):

  linear      t = max(weight_bytes / stream[fmt] + act_bytes / BW,  flops / peak[compute dtype])
              stream[fmt]: the rate rapidlm's decode kernel of that weight format streams weights (cpu-here:
              measured; datasheet GPUs: the memory bandwidth)
  other ops   t = max(flops / peak, bytes / BW)                                        (the roofline)
  fixed       CPU (eager PyTorch): ops per step x measured fixed cost per op of a decoder layer of that format;
              CUDA (rapidlm's graph-captured decode): kernels per step x per-kernel cost
  step        sum over op kinds of (t + fixed); decode at the mean context prompt + gen/2
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from rapidlm.config import ModelConfig
from rapidlm.errors import ConfigError
from rapidlm.profile.costs import (
    SILU_MUL_FLOPS,
    STEP_KEYS,
    LayerSpec,
    LinearSpec,
    ModelSpec,
    OpCost,
    attention_cost,
    elementwise_cost,
    embedding_cost,
    norm_cost,
    rope_cost,
)
from rapidlm.profile.roofline import (
    CPU_HERE,
    CPU_LAYER_OPS,
    CPU_STEP_OPS,
    Ceilings,
    attention_key,
    complete_ceilings,
    get_hardware,
    linear_key,
    step_key,
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# rapidlm's CUDA decode step (runtime/cuda_graphs.py, docs/cuda.md): 10 kernels per layer, captured in a graph:
# add+RMSNorm x2, q|k|v matmul, RoPE + KV write, attention split + combine, o matmul, gate|up, silu*up, down.
CUDA_LAYER_KERNELS = {"norms": 2, "qkv_proj": 1, "rotary": 1, "attention": 2, "o_proj": 1, "mlp": 3}
CUDA_STEP_KERNELS = {"embedding": 1, "norms": 1, "head": 2}  # gather, final norm, head + argmax
TP_COLLECTIVES_PER_LAYER = 2  # all-reduce after o_proj and after down_proj (Megatron-style tensor parallelism)


# ----------------------------------------------------------------------------------------------------------------
# What is estimated


@dataclass(frozen=True)
class EstimateConfig:
    """The run to predict: batch sequences, each a prompt_len-token prompt then gen_len generated tokens."""

    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 128
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_len", "gen_len", "tensor_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"EstimateConfig.{name} must be a positive int, got {value!r}")


@dataclass
class OpRow:
    """One op kind of one step: its work and the predicted time split into roofline and fixed parts."""

    kind: str
    flops: float
    bytes: float
    roofline_s: float  # its kernels: sum of max(compute, memory) per op; on cpu-here decode, linears as measured
    fixed_s: float  # fixed per-op / per-kernel costs
    ops: float  # framework ops (CPU) or kernels (CUDA) per step
    bound: str  # "compute", "memory" or "overhead": the largest of its three times

    @property
    def time_s(self) -> float:
        return self.roofline_s + self.fixed_s


@dataclass
class Phase:
    name: str  # "prefill" or "decode"
    batch: int
    q_len: int
    kv_len: int
    rows: list[OpRow]
    measured_linears: bool = False  # linears timed by cpu-here microbenchmarks at their shapes (else roofline)

    @property
    def time_s(self) -> float:
        return sum(r.time_s for r in self.rows)

    @property
    def flops(self) -> float:
        return sum(r.flops for r in self.rows)

    @property
    def bytes(self) -> float:
        return sum(r.bytes for r in self.rows)


@dataclass
class Estimate:
    model: str
    description: str  # architecture summary
    weights: str  # formats, e.g. "int4 g32 projections, int8 head"
    hardware: Ceilings
    dtype: str
    kv_dtype: str
    config: EstimateConfig
    spec: ModelSpec
    prefill: Phase  # one sequence's prompt
    decode: Phase  # one step for the whole batch at the mean context
    memory: dict[str, float]  # bytes per device: weights, kv_cache, activations, total
    formulas: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        """Until every sequence has its first token: rapidlm prefills the batch one sequence at a time."""
        return self.config.batch * self.prefill.time_s

    @property
    def prefill_tok_s(self) -> float:
        return self.config.prompt_len / self.prefill.time_s

    @property
    def decode_step_s(self) -> float:
        return self.decode.time_s

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over all sequences of the batch."""
        return self.config.batch / self.decode.time_s

    @property
    def total_s(self) -> float:
        return self.ttft_s + (self.config.gen_len - 1) * self.decode.time_s

    @property
    def fits(self) -> bool | None:
        mem = self.hardware.memory_gib
        return None if mem is None else self.memory["total"] <= mem * 2**30

    def to_dict(self) -> dict:
        def phase(p: Phase) -> dict:
            return {
                "batch": p.batch,
                "q_len": p.q_len,
                "kv_len": p.kv_len,
                "time_s": p.time_s,
                "rows": [{**r.__dict__, "time_s": r.time_s} for r in p.rows],
            }

        return {
            "model": self.model,
            "description": self.description,
            "weights": self.weights,
            "hardware": self.hardware.to_json(),
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "config": self.config.__dict__,
            "ttft_s": self.ttft_s,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_step_s": self.decode_step_s,
            "decode_tok_s": self.decode_tok_s,
            "total_s": self.total_s,
            "memory_bytes": self.memory,
            "fits": self.fits,
            "prefill": phase(self.prefill),
            "decode": phase(self.decode),
            "formulas": self.formulas,
            "notes": self.notes,
        }

    def render(self) -> str:
        c, h = self.config, self.hardware
        mib = 2**20
        lines = [
            f"model     {self.model}: {self.description}",
            f"weights   {self.weights}; activations {self.dtype}, KV cache {self.kv_dtype}",
            f"hardware  {h.name} ({h.device}): {h.source}",
            "          " + _hardware_line(h),
            f"run       batch {c.batch}, prompt {c.prompt_len}, generate {c.gen_len}"
            + (f", tensor parallel {c.tensor_parallel}" if c.tensor_parallel > 1 else ""),
            "",
            f"time to first token  {1e3 * self.ttft_s:9.1f} ms   "
            f"(prefill {self.prefill_tok_s:,.0f} tok/s per sequence)",
            f"decode               {self.decode_tok_s:9.1f} tok/s ({1e3 * self.decode_step_s:.2f} ms per step of "
            f"{c.batch} token{'s' if c.batch > 1 else ''}, context {self.decode.kv_len})",
            f"total                {self.total_s:9.2f} s",
            f"memory{' per device' if c.tensor_parallel > 1 else ''}  "
            f"weights {self.memory['weights'] / mib:,.1f} MiB + KV cache {self.memory['kv_cache'] / mib:,.1f} MiB "
            f"+ activations {self.memory['activations'] / mib:,.1f} MiB = {self.memory['total'] / mib:,.1f} MiB"
            + ("" if self.fits is None else f"  ({'fits' if self.fits else 'does NOT fit'} in "
                                           f"{h.memory_gib:,.0f} GiB)"),
        ]
        for p in (self.decode, self.prefill):
            lines += ["", f"{p.name} step (batch {p.batch}, {p.q_len} token{'s' if p.q_len > 1 else ''} each, "
                          f"context {p.kv_len}): {1e3 * p.time_s:.2f} ms"]
            lines.append(f"  {'op kind':<14}{'GFLOP':>10}{'MB':>10}{'ops':>7}{'kernels ms':>13}{'fixed ms':>10}"
                         f"{'time ms':>10}{'share':>7}  bound")
            for r in p.rows:
                lines.append(
                    f"  {r.kind:<14}{r.flops / 1e9:>10.4f}{r.bytes / 1e6:>10.2f}{r.ops:>7.0f}"
                    f"{1e3 * r.roofline_s:>13.3f}{1e3 * r.fixed_s:>10.3f}{1e3 * r.time_s:>10.3f}"
                    f"{100 * r.time_s / p.time_s:>6.0f}%  {r.bound}"
                )
        lines += ["", "formulas:"] + [f"  {f}" for f in self.formulas]
        if self.notes:
            lines += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def _hardware_line(h: Ceilings) -> str:
    peaks = ", ".join(f"{k} {v:,.0f}" for k, v in h.flops_gflops.items())
    parts = [f"bandwidth {h.bandwidth_gbs:,.1f} GB/s", f"peak GFLOP/s: {peaks}", f"per-op {h.op_overhead_us:.2f} us"]
    if h.weight_stream_gbs:
        parts.append("decode-kernel stream GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in h.weight_stream_gbs.items()))
    if h.layer_op_overhead_us:
        parts.append("per-op us in a layer: " + ", ".join(f"{k} {v:.2f}" for k, v in h.layer_op_overhead_us.items()))
    if h.link_gbs:
        parts.append(f"link {h.link_gbs:,.0f} GB/s per direction, collective {h.collective_latency_us:.0f} us")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# Building a ModelSpec: formats a linear can be given


def plain_linear(k: int, n: int, dtype: str, bias: bool = False) -> LinearSpec:
    return LinearSpec(k, n, dtype, 8.0 * DTYPE_BYTES[dtype], None, 0, bias)


def int8_linear(k: int, n: int, group: int | None = None, bias: bool = False) -> LinearSpec:
    """rapidlm's Int8Linear: int8 codes, an fp32 scale per group (default: per output channel)."""
    return LinearSpec(k, n, "int8", 8.0, group or k, 4, bias)


def int4_linear(k: int, n: int, group: int, scale_bytes: int, bias: bool = False) -> LinearSpec:
    """rapidlm's Int4Linear: 4-bit codes, scale and offset per group (fp16 each = 4 bytes when exact, as GGUF's;
    fp32 each = 8 bytes for rapidlm's own quantization)."""
    return LinearSpec(k, n, "int4", 4.0, group, scale_bytes, bias)


def w8a8_linear(k: int, n: int, bias: bool = False) -> LinearSpec:
    """rapidlm's W8A8Linear (VNNI kernel): int8 codes, an fp32 scale and an int32 row sum per output channel."""
    return LinearSpec(k, n, "w8a8", 8.0, k, 8, bias)


def spec_from_config(cfg: ModelConfig, dtype: str, linear=None, head=None) -> ModelSpec:  # noqa: ANN001
    """A ModelSpec of `cfg` with float weights in `dtype`, or each block linear made by linear(k, n, bias) and the
    head by head(k, n)."""
    linear = linear or (lambda k, n, bias=False: plain_linear(k, n, dtype, bias))
    qkv_out = cfg.q_size + 2 * cfg.kv_size
    layer = LayerSpec(
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        linear(cfg.hidden_size, qkv_out, cfg.attention_bias),
        linear(cfg.q_size, cfg.hidden_size),
        linear(cfg.hidden_size, 2 * cfg.intermediate_size),
        linear(cfg.intermediate_size, cfg.hidden_size),
    )
    head_spec = head(cfg.hidden_size, cfg.vocab_size) if head else plain_linear(cfg.hidden_size, cfg.vocab_size, dtype)
    return _assemble_spec(cfg, (layer,) * cfg.num_layers, head_spec, dtype)


def _assemble_spec(cfg: ModelConfig, layers: tuple[LayerSpec, ...], head: LinearSpec, dtype: str) -> ModelSpec:
    """A ModelSpec with the embedding and norms in `dtype` (the head shares the embedding's bytes when tied and
    plain)."""
    return ModelSpec(
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        layers=layers,
        head=head,
        embed_bytes_per_elem=float(DTYPE_BYTES[dtype]),
        norm_bytes_per_elem=float(DTYPE_BYTES[dtype]),
        tied_shared=cfg.tie_word_embeddings and head.fmt == dtype,
        tied=cfg.tie_word_embeddings,
    )


def _gguf_spec(g, cfg: ModelConfig, dtype: str) -> tuple[ModelSpec, str]:  # noqa: ANN001 - an opened GGUFFile
    """The formats `native` loading gives a GGUF file's tensors on a bf16 CPU: Q4_0/Q4_1 projections as int4 g32
    with fp16 scale + offset, Q8_0 as int8 g32 with fp32 scales; fused q|k|v and gate|up stay packed only if
    their parts share one format; a tied Q8_0 embedding is also the int8 head; the rest dequantized to dtype."""
    import gguf

    from rapidlm.loading.gguf import _Q4_BLOCK_BYTES, hf_name

    kinds = {}
    for t in g.reader.tensors:
        name = hf_name(t.name)
        if name is not None:
            kinds[name] = gguf.GGMLQuantizationType(t.tensor_type).name

    def fmt_of(names: list[str], k: int, n: int, bias: bool = False) -> LinearSpec:
        found = {kinds.get(x) for x in names}
        if len(found) == 1 and found <= set(_Q4_BLOCK_BYTES):
            return int4_linear(k, n, 32, 4, bias)
        if found == {"Q8_0"}:
            return int8_linear(k, n, 32, bias)
        return plain_linear(k, n, dtype, bias)

    layers = []
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        attn = [pre + f"self_attn.{p}_proj.weight" for p in "qkv"]
        layers.append(
            LayerSpec(
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                fmt_of(attn, cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias),
                fmt_of([pre + "self_attn.o_proj.weight"], cfg.q_size, cfg.hidden_size),
                fmt_of([pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"], cfg.hidden_size,
                       2 * cfg.intermediate_size),
                fmt_of([pre + "mlp.down_proj.weight"], cfg.intermediate_size, cfg.hidden_size),
            )
        )
    head_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if cfg.tie_word_embeddings and kinds.get(head_src) != "Q8_0":
        head = plain_linear(cfg.hidden_size, cfg.vocab_size, dtype)  # the embedding table itself
    else:
        head = fmt_of([head_src], cfg.hidden_size, cfg.vocab_size)
    spec = _assemble_spec(cfg, tuple(layers), head, dtype)
    return spec, "native GGUF blocks (" + ", ".join(sorted({v for v in kinds.values()})) + ")"


def _compressed_spec(folder: Path, dtype: str) -> tuple[ModelConfig, ModelSpec, str]:
    """A `rapidlm compress` folder: its manifest's (possibly pruned) config and quantized modules."""
    from rapidlm.compress.saved import manifest_config, read_manifest

    manifest = read_manifest(folder)
    cfg = manifest_config(folder, manifest)
    modules = manifest.get("modules", {})
    scale_dtypes = _safetensors_dtypes(folder / "model.safetensors")

    def module(name: str, k: int, n: int, bias: bool = False) -> LinearSpec:
        m = modules.get(name)
        if m is None:
            return plain_linear(k, n, dtype, bias)
        if m["kind"] == "int4":  # fp16 scales load as fp16 (exact); fp32 ones stay fp32 unless fp16-exact
            sb = 4 if scale_dtypes.get(f"{name}.scale") == "F16" else 8
            return int4_linear(k, n, int(m["group_size"]), sb, bias)
        if m["kind"] == "int8":
            return int8_linear(k, n, int(m["group_size"]), bias)
        return w8a8_linear(k, n, bias)

    layers = []
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        layers.append(
            LayerSpec(
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                module(pre + "attn.wqkv", cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias),
                module(pre + "attn.wo", cfg.q_size, cfg.hidden_size),
                module(pre + "mlp.w_gate_up", cfg.hidden_size, 2 * cfg.intermediate_size),
                module(pre + "mlp.w_down", cfg.intermediate_size, cfg.hidden_size),
            )
        )
    head = module("lm_head", cfg.hidden_size, cfg.vocab_size)
    spec = _assemble_spec(cfg, tuple(layers), head, dtype)
    return cfg, spec, f"rapidlm compress folder ({manifest.get('method', '?')})"


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> dtype from a safetensors header (no data read)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _apply_recipe(cfg: ModelConfig, recipe, dtype: str, device: str) -> tuple[ModelConfig, ModelSpec, str]:  # noqa: ANN001
    """The config after the recipe's structured pruning, and the formats its quantization step gives."""
    from rapidlm.compress.configs import (
        Dequantized,
        Int4WeightOnly,
        Int8WeightOnly,
        Native,
        Structured,
        W8A8Dynamic,
    )
    from rapidlm.compress.quantize import int4_group_for

    for step in recipe.prune_steps:
        if isinstance(step, Structured):
            cfg = _pruned_config(cfg, step)
    step = recipe.weight_step
    if step is None or isinstance(step, Dequantized):
        return cfg, spec_from_config(cfg, dtype), f"{dtype} (dequantized)"
    if isinstance(step, Native):
        raise ConfigError("quant 'native' runs a GGUF file's blocks as stored: give --model with a .gguf file")

    def head_for(mode: str):  # noqa: ANN202
        if mode == "int8":
            return lambda k, n: int8_linear(k, n)
        if mode == "w8a8":
            return lambda k, n: w8a8_linear(k, n)
        return None  # keep

    if isinstance(step, Int8WeightOnly):
        per_channel = lambda k, n, bias=False: int8_linear(k, n, None, bias)  # noqa: E731
        spec = spec_from_config(cfg, dtype, per_channel, head_for(step.lm_head))
        return cfg, spec, f"int8 per-channel projections, head {step.lm_head}"
    if isinstance(step, Int4WeightOnly):
        def int4(k: int, n: int, bias: bool = False) -> LinearSpec:
            # rapidlm's RTN/GPTQ/AWQ scales and offsets are fp32 (not fp16-exact): 8 bytes per group
            return int4_linear(k, n, int4_group_for(k, step.group_size), 8, bias)

        spec = spec_from_config(cfg, dtype, int4, head_for(step.lm_head))
        return cfg, spec, f"int4 g{step.group_size} ({step.method}) projections, head {step.lm_head}"
    if isinstance(step, W8A8Dynamic):
        if device == "cuda":
            raise ConfigError("quant: W8A8 runs on the CPU only; on a GPU use int8 or int4 weight-only")
        spec = spec_from_config(cfg, dtype, lambda k, n, bias=False: w8a8_linear(k, n, bias), head_for(step.lm_head))
        return cfg, spec, f"w8a8 projections, head {step.lm_head}"
    raise ConfigError(f"quant: step {type(step).__name__} is not modelled by the estimate")


def _pruned_config(cfg: ModelConfig, step) -> ModelConfig:  # noqa: ANN001
    group = cfg.num_heads // cfg.num_kv_heads
    kv = cfg.num_kv_heads - step.heads
    inter = cfg.intermediate_size - step.ffn_channels
    layers = cfg.num_layers - step.layers
    if kv <= 0 or inter <= 0 or layers <= 0:
        raise ConfigError(f"quant: structured pruning removes everything from {cfg.architecture} "
                          f"(kv heads {kv}, MLP channels {inter}, layers {layers} left)")
    return replace(cfg, num_kv_heads=kv, num_heads=kv * group, intermediate_size=inter, num_layers=layers)


def _read_config_json(path: str | os.PathLike) -> ModelConfig:
    """A config JSON: Hugging Face's config.json, or rapidlm's ModelConfig fields."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--config {path}: not a readable JSON file: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a JSON object")
    if "architectures" in raw:
        return ModelConfig.from_hf(raw)
    from rapidlm.config import RopeScaling

    try:
        if isinstance(raw.get("rope_scaling"), dict):
            raw["rope_scaling"] = RopeScaling(**raw["rope_scaling"])
        return ModelConfig(**raw)
    except TypeError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# Step time


@dataclass
class _Part:
    cost: OpCost
    linear: LinearSpec | None  # the linear it is, if one
    compute_dtype: str
    attention: tuple | None = None  # (batch, heads, kv_heads, head_dim, kv_len, dtype) of an attention op


def _step_parts(spec: ModelSpec, batch: int, q_len: int, kv_len: int, act: str, kv: str, attn_dtype: str,
                tp: int = 1) -> dict[str, list[_Part]]:
    """The ops of one forward step per op kind (the same counts as costs.step_costs), each device's share
    under tensor parallelism `tp` (linears, heads and the head split; norms, embedding replicated)."""
    ab, kb = DTYPE_BYTES[act], (1 if kv == "int8" else DTYPE_BYTES[kv])
    tokens = batch * q_len
    parts: dict[str, list[_Part]] = {k: [] for k in STEP_KEYS}

    def lin(s: LinearSpec, m: int) -> _Part:
        c = s.cost(m, ab)
        weight = s.weight_bytes - (4 * s.out_features if s.bias else 0)
        weight_share = OpCost(c.flops / tp, c.bytes - weight + weight / tp)
        cdt = "int8" if s.fmt == "w8a8" else ("float32" if s.fmt == "float32" else act)
        return _Part(weight_share, s, cdt)

    parts["embedding"].append(_Part(embedding_cost(tokens, spec.hidden, spec.embed_bytes_per_elem, ab), None, act))
    for layer in spec.layers:
        parts["norms"].append(_Part(norm_cost(tokens, spec.hidden, ab) * 2, None, act))
        parts["qkv_proj"].append(lin(layer.wqkv, tokens))
        h, hkv = layer.n_heads // tp, layer.n_kv_heads // tp
        parts["rotary"].append(_Part(rope_cost(tokens, h, hkv, layer.head_dim, DTYPE_BYTES[attn_dtype]), None,
                                     attn_dtype))
        parts["attention"].append(_Part(attention_cost(batch, q_len, kv_len, h, hkv, layer.head_dim, kb,
                                                       DTYPE_BYTES[attn_dtype]), None, attn_dtype,
                                        (batch, h, hkv, layer.head_dim, kv_len, attn_dtype, q_len)))
        parts["o_proj"].append(lin(layer.wo, tokens))
        parts["o_proj"].append(_Part(elementwise_cost(tokens * spec.hidden, 1, 2, ab), None, act))
        parts["mlp"].append(lin(layer.w_gate_up, tokens))
        parts["mlp"].append(_Part(elementwise_cost(tokens * layer.intermediate // tp, SILU_MUL_FLOPS, 2, ab), None,
                                  act))
        parts["mlp"].append(lin(layer.w_down, tokens))
        parts["mlp"].append(_Part(elementwise_cost(tokens * spec.hidden, 1, 2, ab), None, act))
    parts["norms"].append(_Part(norm_cost(batch, spec.hidden, ab), None, act))
    parts["head"].append(lin(spec.head, batch))
    return parts


def _layer_format(spec: ModelSpec) -> str:
    """The weight format most of the model's block linears have (it picks the per-op fixed cost)."""
    counts: dict[str, int] = {}
    for layer in spec.layers:
        for s in layer.linears:
            counts[s.fmt] = counts.get(s.fmt, 0) + 1
    return max(counts, key=counts.get) if counts else spec.head.fmt


# Measured calls among CPU_LAYER_OPS / CPU_STEP_OPS (linears, SDPA): their cost is in their own measured time,
# not in the fixed part.
_LAYER_LINEARS = {"qkv_proj": 1, "o_proj": 1, "mlp": 2, "attention": 1}
_STEP_LINEARS = {"head": 1}


def _nonlinear_ops(kind: str, layers: int) -> int:
    return (CPU_LAYER_OPS.get(kind, 0) - _LAYER_LINEARS.get(kind, 0)) * layers + CPU_STEP_OPS.get(kind, 0) - \
        _STEP_LINEARS.get(kind, 0)


def _measured_linears(spec: ModelSpec, batch: int, q_len: int = 1) -> list[tuple[str, int, int, int]]:
    """(fmt, n, k, m) of every distinct linear of a step: the layers' on batch x q_len rows, the head's on batch
    (it runs on the last position of each sequence)."""
    m = batch * q_len
    shapes = {(s.fmt, s.out_features, s.in_features, m) for la in spec.layers for s in la.linears}
    return sorted(shapes | {(spec.head.fmt, spec.head.out_features, spec.head.in_features, batch)})


def _measured_attentions(spec: ModelSpec, batch: int, kv_len: int, q_len: int = 1) -> list[tuple]:
    return sorted({(batch, la.n_heads, la.n_kv_heads, la.head_dim, kv_len, "float32", q_len) for la in spec.layers})


def _measured(hw: Ceilings, spec: ModelSpec, batch: int, q_len: int, kv_len: int) -> bool:
    """cpu-here with the per-shape linear and attention times and the fixed step cost this step needs."""
    return (
        hw.device == "cpu"
        and all(linear_key(*shape) in hw.linear_us for shape in _measured_linears(spec, batch, q_len))
        and all(attention_key(*a) in hw.attention_us for a in _measured_attentions(spec, batch, kv_len, q_len))
        and step_key(_layer_format(spec), len(spec.layers), batch) in hw.step_fixed_us
    )


def _phase(name: str, spec: ModelSpec, hw: Ceilings, batch: int, q_len: int, kv_len: int, act: str, kv: str,
           tp: int) -> Phase:
    """One forward step's predicted time per op kind. Kernel time: the roofline of each op (linears stream their
    weights at their format's rate), except on cpu-here decode steps, where each linear takes its measured time
    at its shape. Fixed time: CPU, measured per-step cost of a width-64 model with this many layers (minus its
    linear calls), shared over the op kinds by their op counts, else op count x fixed cost per op; CUDA, kernels
    x per-kernel cost."""
    attn_dtype = "float32" if hw.device == "cpu" else act  # rapidlm's CPU attention runs in fp32
    parts = _step_parts(spec, batch, q_len, kv_len, act, kv, attn_dtype, tp)
    n_layers = len(spec.layers)
    fmt = _layer_format(spec)
    measured = tp == 1 and kv != "int8" and _measured(hw, spec, batch, q_len, kv_len)
    per_op_s = 0.0
    if measured:
        tiny = hw.step_fixed_us[step_key(fmt, n_layers, batch)]  # its linear calls already taken out
        per_op_s = tiny * 1e-6 / sum(_nonlinear_ops(k, n_layers) for k in STEP_KEYS)
    rows = []
    for kind in STEP_KEYS:
        flops = sum(p.cost.flops for p in parts[kind])
        nbytes = sum(p.cost.bytes for p in parts[kind])
        compute_s = memory_s = kernel_s = 0.0
        for p in parts[kind]:
            c = p.cost.flops / (hw.peak_gflops(p.compute_dtype) * 1e9)
            if p.linear is not None:
                w = p.linear.weight_bytes / tp
                m = w / (hw.stream_gbs(p.linear.fmt) * 1e9) + (p.cost.bytes - w) / (hw.bandwidth_gbs * 1e9)
            else:
                m = p.cost.bytes / (hw.bandwidth_gbs * 1e9)
            compute_s, memory_s = compute_s + c, memory_s + m
            if measured and p.linear is not None:
                s = p.linear
                m_rows = batch if s is spec.head else batch * q_len
                kernel_s += hw.linear_us[linear_key(s.fmt, s.out_features, s.in_features, m_rows)] * 1e-6
            elif measured and kind == "attention":
                kernel_s += hw.attention_us[attention_key(*p.attention)] * 1e-6
            else:
                kernel_s += max(c, m)
        if hw.device == "cpu" and measured:
            ops = CPU_LAYER_OPS.get(kind, 0) * n_layers + CPU_STEP_OPS.get(kind, 0)
            fixed = _nonlinear_ops(kind, n_layers) * per_op_s
        elif hw.device == "cpu":
            ops = CPU_LAYER_OPS.get(kind, 0) * n_layers + CPU_STEP_OPS.get(kind, 0)
            fixed = ops * hw.layer_op_us(fmt) * 1e-6
            if kind == "head":  # its one linear call, at that format's measured call cost
                fixed += (hw.linear_fixed_us(spec.head.fmt) - hw.layer_op_us(fmt)) * 1e-6
        else:
            ops = CUDA_LAYER_KERNELS.get(kind, 0) * n_layers + CUDA_STEP_KERNELS.get(kind, 0)
            if name == "prefill":  # prefill runs the eager model: every framework op is a launch
                ops = CPU_LAYER_OPS.get(kind, 0) * n_layers + CPU_STEP_OPS.get(kind, 0)
            fixed = ops * hw.op_overhead_us * 1e-6
        if fixed > kernel_s:
            bound = "overhead"
        else:
            bound = "compute" if compute_s > memory_s else "memory"
        rows.append(OpRow(kind, flops, nbytes, kernel_s, max(fixed, 0.0), float(ops), bound))
    if tp > 1:
        rows.append(_communication(spec, hw, batch * q_len, batch, act, tp))
    return Phase(name, batch, q_len, kv_len, rows, measured)


def _communication(spec: ModelSpec, hw: Ceilings, tokens: int, batch: int, act: str, tp: int) -> OpRow:
    """Tensor parallelism's collectives: 2 all-reduces of the hidden state per layer (ring: each device sends
    and receives 2(N-1)/N of the message) and an all-gather of the head's logits."""
    if not hw.link_gbs:
        raise ConfigError(f"tensor_parallel: hardware {hw.name!r} has no device link bandwidth")
    msg = tokens * spec.hidden * DTYPE_BYTES[act]
    per_layer = TP_COLLECTIVES_PER_LAYER * 2 * (tp - 1) / tp * msg
    gather = (tp - 1) / tp * batch * spec.vocab * 4
    nbytes = len(spec.layers) * per_layer + gather
    n = len(spec.layers) * TP_COLLECTIVES_PER_LAYER + 1
    link = nbytes / (hw.link_gbs * 1e9)
    fixed = n * hw.collective_latency_us * 1e-6
    return OpRow("communication", 0.0, nbytes, link, fixed, float(n), "overhead" if fixed > link else "memory")


# ----------------------------------------------------------------------------------------------------------------
# Memory


def memory_bytes(spec: ModelSpec, cfg: EstimateConfig, act: str, kv: str, max_len: int) -> dict[str, float]:
    """Per device. weights: every stored byte (linears + scales, embedding, norms); the block linears, heads and
    head split over tensor_parallel devices, embedding and norms replicated. KV cache: rapidlm's static cache,
    layers x 2 x batch x kv_heads x S x head_dim x kv bytes (+ an fp32 scale per token and head for int8), S =
    prompt + gen (at most the context). Activations: the largest transient, prefilling one sequence of T
    tokens: T x (3·hidden + q|k|v + 3·intermediate) x act bytes + T x (heads + 2·kv_heads) x head_dim x 4
    (q, k, v widened to fp32) + the mask T x S bytes + logits batch x vocab x 4."""
    tp = cfg.tensor_parallel
    ab = DTYPE_BYTES[act]
    linears = sum(s.weight_bytes for layer in spec.layers for s in layer.linears)
    head = 0.0 if spec.tied_shared else spec.head.weight_bytes
    embed = spec.vocab * spec.hidden * spec.embed_bytes_per_elem
    norms = (2 * len(spec.layers) + 1) * spec.hidden * spec.norm_bytes_per_elem
    weights = (linears + head) / tp + embed + norms
    s = min(cfg.prompt_len + cfg.gen_len, max_len)
    kv_bytes = 0.0
    for layer in spec.layers:
        per_token = 2 * cfg.batch * (layer.n_kv_heads // tp) * s
        kv_bytes += per_token * layer.head_dim * (1 if kv == "int8" else DTYPE_BYTES[kv])
        kv_bytes += per_token * 4 if kv == "int8" else 0
    t = cfg.prompt_len
    widest = max(spec.layers, key=lambda la: la.wqkv.out_features + 3 * la.intermediate) if spec.layers else None
    acts = 0.0
    if widest is not None:
        acts = t * (3 * spec.hidden + widest.wqkv.out_features + 3 * widest.intermediate) * ab / tp
        acts += t * (widest.n_heads + 2 * widest.n_kv_heads) * widest.head_dim * 4 / tp + t * s
    acts += cfg.batch * spec.vocab * 4
    return {"weights": weights, "kv_cache": kv_bytes, "activations": acts, "total": weights + kv_bytes + acts}


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def estimate(
    model: str | os.PathLike | ModelConfig | nn.Module | None = None,
    hardware: str | Ceilings = "cpu-here",
    dtype: str = "auto",
    quant: str | None = None,
    batch: int = 1,
    prompt_len: int = 128,
    gen_len: int = 128,
    tensor_parallel: int = 1,
    config_json: str | os.PathLike | None = None,
    remeasure: bool = False,
    measure: bool = True,
) -> Estimate:
    """Predict a run of `model` (an alias, .gguf file or folder; a ModelConfig; a loaded rapidlm Transformer; or
    `config_json`, a config file) on `hardware` ("cpu-here", a HARDWARE name, or Ceilings). On "cpu-here",
    measure=True times the model's linear shapes and the fixed step cost for its layer count the first time they
    are needed (a few seconds, cached); measure=False uses the roofline and per-op costs instead."""
    run = EstimateConfig(batch, prompt_len, gen_len, tensor_parallel)
    hw = hardware if isinstance(hardware, Ceilings) else get_hardware(hardware, remeasure=remeasure)
    if tensor_parallel > 1 and hw.device != "cuda":
        raise ConfigError(f"tensor_parallel={tensor_parallel} needs several GPUs; hardware {hw.name!r} is a CPU")
    act = _resolve_dtype(dtype, hw)
    notes: list[str] = []

    from rapidlm.compress.recipe import resolve_recipe

    recipe = resolve_recipe(quant) if quant not in (None, "", "none") else None
    name, cfg, spec, weights = _model_spec(model, config_json, act, hw, recipe, notes)
    if tensor_parallel > 1:
        for layer in spec.layers:
            if layer.n_kv_heads % tensor_parallel or layer.intermediate % tensor_parallel:
                raise ConfigError(
                    f"tensor_parallel={tensor_parallel} must divide the kv heads ({layer.n_kv_heads}) and the MLP "
                    f"width ({layer.intermediate})"
                )
    kv = "int8" if recipe is not None and recipe.kv_int8 else ("float32" if hw.device == "cpu" else act)
    max_len = cfg.max_position_embeddings
    if prompt_len + gen_len > max_len:
        notes.append(f"prompt + gen = {prompt_len + gen_len} exceeds the context {max_len}: rapidlm would refuse it")
    mean_ctx = prompt_len + gen_len // 2
    if hardware == CPU_HERE and measure:
        # cpu-here: time each distinct linear shape of this model at this batch and the fixed cost of a step
        # with this many layers, once (cached with the ceilings)
        # (the prefill of one sequence too: its linears on prompt_len rows, its attention over the prompt)
        fmt, n_layers = _layer_format(spec), len(spec.layers)
        complete_ceilings(
            hw,
            _measured_linears(spec, batch) + _measured_linears(spec, 1, prompt_len),
            [(fmt, n_layers, batch), (fmt, n_layers, 1)],
            [] if kv == "int8" else _measured_attentions(spec, batch, mean_ctx)
            + _measured_attentions(spec, 1, prompt_len, prompt_len),
        )
    prefill = _phase("prefill", spec, hw, 1, prompt_len, prompt_len, act, kv, tensor_parallel)
    decode = _phase("decode", spec, hw, batch, 1, mean_ctx, act, kv, tensor_parallel)
    if any(s.fmt == "int4" for la in spec.layers for s in la.linears) and hw.device == "cuda":
        notes.append("int4 on CUDA: rapidlm's Triton int4 GEMV is ALU-bound (docs/cuda.md measured ~1 TB/s of codes on "
                     "an H200), so the bandwidth roofline here is optimistic for int4")
    if hw.device == "cpu" and batch > 1:
        notes.append("batch > 1 on the CPU: linears read their weights once per step (the kernels handle all rows); "
                     "their compute is taken at the GEMM peak, which the decode kernels do not reach")
    desc = (
        f"{cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, heads "
        f"{cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}, vocab {cfg.vocab_size:,}, {spec.params / 1e6:,.1f}M "
        "parameters"
    )
    return Estimate(
        model=name,
        description=desc,
        weights=weights,
        hardware=hw,
        dtype=act,
        kv_dtype=kv,
        config=run,
        spec=spec,
        prefill=prefill,
        decode=decode,
        memory=memory_bytes(spec, run, act, kv, max_len),
        formulas=formulas(hw, spec, decode.measured_linears),
        notes=notes,
    )


def _resolve_dtype(dtype: str, hw: Ceilings) -> str:
    if dtype == "auto":
        if hw.device == "cuda":
            return "bfloat16"
        from rapidlm.runtime.device import cpu_has_fast_bf16

        # cpu-here runs bf16 where the CPU has native bf16 (as LLM's dtype="auto"); that is what was measured
        return "bfloat16" if cpu_has_fast_bf16() else "float32"
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return dtype


def _model_spec(model, config_json, act: str, hw: Ceilings, recipe, notes: list[str]):  # noqa: ANN001, ANN202
    """(name, config, spec, weights description) for whatever describes the model."""
    if isinstance(model, nn.Module):
        if recipe is not None:
            raise ConfigError("quant: a loaded model is estimated as it is; quantize it first, or pass its path")
        return "loaded model", model.cfg, ModelSpec.of(model), "as loaded"
    if config_json is not None and model is not None:
        raise ConfigError("give a model or a config JSON, not both")
    if config_json is not None or isinstance(model, ModelConfig):
        cfg = model if isinstance(model, ModelConfig) else _read_config_json(config_json)
        name = "config" if isinstance(model, ModelConfig) else str(config_json)
        if recipe is None:
            return name, cfg, spec_from_config(cfg, act), f"{act} (unquantized)"
        cfg, spec, weights = _apply_recipe(cfg, recipe, act, hw.device)
        return name, cfg, spec, weights
    from rapidlm.loading.loader import DEFAULT_MODEL, describe_model, resolve_model

    model = model if model is not None else DEFAULT_MODEL
    path = resolve_model(model)
    if path.is_dir() and (path / "rapidlm.json").is_file():
        if recipe is not None:
            raise ConfigError("quant: this folder is already compressed; estimate it without quant")
        cfg, spec, weights = _compressed_spec(path, act)
        return str(model), cfg, spec, weights
    gguf = None
    if path.is_file():  # a GGUF file: its metadata and tensor types, parsed once (seconds for a large vocabulary)
        from rapidlm.loading.gguf import gguf_config, open_gguf

        gguf = open_gguf(path)
        cfg = gguf_config(gguf)
    else:
        cfg = describe_model(path).config
    gguf_native = (
        path.is_file()
        and hw.device == "cpu"
        and act == "bfloat16"
        and (recipe is None or recipe.native or (recipe.weight_step is None and not recipe.prune_steps))
    )
    if recipe is not None and recipe.native and not (path.is_file() and hw.device == "cpu" and act == "bfloat16"):
        raise ConfigError("quant 'native' needs a .gguf model on a CPU with bf16 activations")
    if gguf_native:
        spec, weights = _gguf_spec(gguf, cfg, act)
        return str(model), cfg, spec, weights
    if recipe is None:
        return str(model), cfg, spec_from_config(cfg, act), f"{act} (dequantized)"
    cfg, spec, weights = _apply_recipe(cfg, recipe, act, hw.device)
    return str(model), cfg, spec, weights


def formulas(hw: Ceilings, spec: ModelSpec, measured: bool = False) -> list[str]:
    fmt = _layer_format(spec)
    lines = [
        "linear:    t = max(weight_bytes / stream[fmt] + m·(K+N)·act_bytes / BW, 2·m·K·N / peak[dtype]);  "
        "weight_bytes = K·N·bits/8 + N·⌈K/G⌉·scale_bytes",
        "attention: flops = B·H·q·L·(4·d + 5), bytes = B·(2·q·H·d·a + 2·L·Hkv·d·kv + 2·q·Hkv·d·kv)  (GQA: K, V read "
        "once per kv head)",
        "norms:     flops = 4·T·C, bytes = (2·T·C + C)·a;  rope: flops = 3·T·(H+Hkv)·d, bytes = (2·T·(H+Hkv)·d + "
        "2·T·d)·a",
        "other ops: t = max(flops / peak[dtype], bytes / BW)",
    ]
    if hw.device == "cpu" and measured:
        lines[0] = ("linear:    the kernel's measured time at its shape and batch (rapidlm's kernel of that format, "
                    "weights cold);  roofline: max(weight_bytes / stream[fmt] + m·(K+N)·a / BW, 2·m·K·N / peak)")
        lines[1] = ("attention: SDPA's measured time at its shape and context (rapidlm's cache layout, 32 layers' "
                    "caches);  counts: flops = B·H·q·L·(4·d + 5), bytes = B·(2·q·H·d·a + 2·L·Hkv·d·kv + 2·q·Hkv·d·kv)")
        n = len(spec.layers)
        lines.append(
            f"fixed:     the measured decode step of a width-64 model with {n} layers of {fmt} (engine, greedy) "
            f"minus its {4 * n + 1} linear and {n} attention calls, shared over the "
            f"{sum(_nonlinear_ops(k, n) for k in STEP_KEYS)} other ops by op kind; other ops add their roofline"
        )
    elif hw.device == "cpu":
        per_layer = sum(CPU_LAYER_OPS.values())
        per_step = sum(CPU_STEP_OPS.values())
        lines.append(
            f"fixed:     ({per_layer}·L + {per_step}) framework ops × {hw.layer_op_us(fmt):.2f} us (fixed cost per op "
            f"of a {fmt} decoder layer, measured at width 64); the head's call "
            f"{hw.linear_fixed_us(spec.head.fmt):.2f} us"
        )
    else:
        lines.append(
            f"fixed:     decode: {sum(CUDA_LAYER_KERNELS.values())}·L + {sum(CUDA_STEP_KERNELS.values())} kernels "
            f"(CUDA graph) × {hw.op_overhead_us:.1f} us; prefill (eager): {sum(CPU_LAYER_OPS.values())}·L + "
            f"{sum(CPU_STEP_OPS.values())} ops × {hw.op_overhead_us:.1f} us"
        )
    lines += [
        "step:      Σ over op kinds (roofline + fixed);  decode tok/s = batch / step(context = prompt + gen/2)",
        "TTFT:      batch × prefill(prompt_len)  (rapidlm prefills one sequence at a time);  total = TTFT + "
        "(gen-1)·step",
        "memory:    weights + KV (L·2·B·Hkv·S·d·kv_bytes, S = prompt + gen) + activations (one prefill's largest "
        "transient + logits)",
    ]
    return lines


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


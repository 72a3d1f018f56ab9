"""FLOP and byte counts of each op kind of a decoder step: the numerator of every roofline.

Each count is the work an op must do and the fewest bytes it must move through memory (weights and their
scales, activations in and out, the KV cache read and written), not what a given kernel happens to do: caches,
re-reads and padding are a kernel's business, and the roofline's measured ceilings absorb them. The formulas:

    linear   flops = 2·m·K·N (+ m·N bias)
             bytes = K·N·bits/8 + N·⌈K/G⌉·scale_bytes + m·(K + N)·act_bytes (+ N·act_bytes bias)
    attention (B sequences, q new tokens over L keys, H query heads, Hkv kv heads, head dim d, P query-key pairs:
             P = q·L, or with causal=True q·(L - q) + q·(q + 1)/2)
             flops = B·H·P·(4·d + 5)            QKᵀ and PV (2·d each) + scale, max, exp, sum, divide (5)
             bytes = B·(2·q·H·d·act + 2·L·Hkv·d·kv + 2·q·Hkv·d·kv)   q in, out; K and V read once per kv head
                                                                     (GQA: the H/Hkv query heads share them);
                                                                     this step's K and V written
    rmsnorm  flops = 4·T·C             square, sum, scale by 1/rms, by the weight
             bytes = (2·T·C + C)·act   x in, y out, the weight
    rope     flops = 3·T·(H + Hkv)·d   x·cos + swap(x)·sin on q and k
             bytes = (2·T·(H + Hkv)·d + 2·T·d)·act   q, k in and out; cos and sin rows
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Softmax over one score: scale, subtract the max, exp, add to the sum, divide (per query-key pair).
SOFTMAX_FLOPS = 5
# silu(gate) * up per intermediate element: negate, exp, add 1, divide (silu) and the product.
SILU_MUL_FLOPS = 5

STEP_KEYS = ("embedding", "norms", "qkv_proj", "rotary", "attention", "o_proj", "mlp", "head")


@dataclass(frozen=True)
class OpCost:
    """Work of one op (or a sum of ops): flops and the fewest bytes moved through memory."""

    flops: float  # floating-point operations (integer multiply-accumulates count 2, like float FMAs)
    bytes: float  # weights (+ scales) + activations in/out (+ KV cache read/write)

    def __post_init__(self) -> None:
        for name in ("flops", "bytes"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"OpCost.{name} must be a finite number >= 0, got {value!r}")

    def __add__(self, other: OpCost) -> OpCost:
        if not isinstance(other, OpCost):
            return NotImplemented
        return OpCost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> OpCost:  # n identical ops
        return OpCost(self.flops * k, self.bytes * k)

    __rmul__ = __mul__

    @property
    def intensity(self) -> float:
        """flops per byte: above the machine's flops/bandwidth ratio the op is compute-bound."""
        return self.flops / self.bytes if self.bytes else math.inf


ZERO = OpCost(0.0, 0.0)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def linear_cost(
    m: int,
    in_features: int,
    out_features: int,
    weight_bits: float,
    act_bytes: int,
    group_size: int | None = None,
    scale_bytes: int = 0,
    bias: bool = False,
) -> OpCost:
    """y (m, N) = x (m, K) @ Wᵀ: the weight read once whatever m is, plus its per-group scales.

    weight_bits: bits per stored weight (32 fp32, 16 bf16, 8 int8, 4 int4); group_size: inputs per scale group
    (None: no scales, or pass in_features for one scale per output row); scale_bytes: bytes of scale data per
    group (an int4 group with an fp16 scale and an fp16 offset has 4)."""
    _positive(m=m, in_features=in_features, out_features=out_features, act_bytes=act_bytes)
    if not weight_bits > 0:
        raise ValueError(f"weight_bits must be > 0, got {weight_bits!r}")
    if group_size is not None:
        _positive(group_size=group_size)
    if scale_bytes < 0:
        raise ValueError(f"scale_bytes must be >= 0, got {scale_bytes!r}")
    k, n = in_features, out_features
    flops = 2.0 * m * k * n + (m * n if bias else 0)
    weight = k * n * weight_bits / 8
    scales = n * math.ceil(k / group_size) * scale_bytes if group_size else 0
    acts = m * (k + n) * act_bytes
    return OpCost(flops, weight + scales + acts + (n * act_bytes if bias else 0))


def attention_pairs(q_len: int, kv_len: int, causal: bool = False) -> float:
    """Query-key pairs scored: every pair (what a masked kernel computes), or only the causal ones (the new
    tokens are the last q_len of kv_len, each sees the keys up to its own position)."""
    if not causal or q_len == 1:
        return float(q_len * kv_len)
    return q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2


def attention_cost(
    batch: int,
    q_len: int,
    kv_len: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    kv_bytes: int,
    act_bytes: int,
    causal: bool = False,
) -> OpCost:
    """softmax(QKᵀ/√d)·V for q_len new tokens per sequence over kv_len keys (the new ones included), the new
    keys/values written to the cache. K and V are read once per kv head: grouped-query heads share them."""
    _positive(batch=batch, q_len=q_len, kv_len=kv_len, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)
    _positive(kv_bytes=kv_bytes, act_bytes=act_bytes)
    if q_len > kv_len:
        raise ValueError(f"q_len ({q_len}) cannot exceed kv_len ({kv_len}): the new tokens are in the cache")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    pairs = attention_pairs(q_len, kv_len, causal)
    flops = batch * n_heads * pairs * (4 * head_dim + SOFTMAX_FLOPS)
    q_and_out = 2 * q_len * n_heads * head_dim * act_bytes
    kv_read = 2 * kv_len * n_kv_heads * head_dim * kv_bytes
    kv_write = 2 * q_len * n_kv_heads * head_dim * kv_bytes
    return OpCost(flops, batch * (q_and_out + kv_read + kv_write))


def norm_cost(tokens: int, hidden: int, act_bytes: int) -> OpCost:
    """RMSNorm of tokens x hidden: sum of squares, 1/rms, the weight multiply."""
    _positive(tokens=tokens, hidden=hidden, act_bytes=act_bytes)
    return OpCost(4.0 * tokens * hidden, (2 * tokens * hidden + hidden) * act_bytes)


def rope_cost(tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, act_bytes: int) -> OpCost:
    """Rotary embedding of q and k (n_heads + n_kv_heads heads per token): x·cos + swap(x)·sin."""
    _positive(tokens=tokens, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, act_bytes=act_bytes)
    elems = tokens * (n_heads + n_kv_heads) * head_dim
    return OpCost(3.0 * elems, (2 * elems + 2 * tokens * head_dim) * act_bytes)


def elementwise_cost(elems: int, flops_per_elem: float, reads: int, act_bytes: int) -> OpCost:
    """An elementwise op over `elems` outputs reading `reads` inputs of the same size (residual add: 1 flop,
    2 reads; silu(gate)·up: 5 flops, 2 reads)."""
    _positive(elems=elems, act_bytes=act_bytes)
    return OpCost(float(elems * flops_per_elem), float(elems * (reads + 1) * act_bytes))


def embedding_cost(tokens: int, hidden: int, table_bytes_per_elem: float, act_bytes: int) -> OpCost:
    """A gather of `tokens` rows of the embedding table: no flops, the rows read and written."""
    _positive(tokens=tokens, hidden=hidden, act_bytes=act_bytes)
    return OpCost(0.0, tokens * hidden * (table_bytes_per_elem + act_bytes))


# ----------------------------------------------------------------------------------------------------------------
# Reading the formats and shapes off a loaded model


def linear_weight_format(module: nn.Module) -> tuple[float, int | None, int]:
    """(bits per weight, group size, scale bytes per group) of a linear as rapidlm holds it.

    nn.Linear / PackedLinear: the weight's dtype, no scales. Int4Linear: 4 bits, its group, scale + offset per
    group (fp16 each in rapidlm's layout when exact, as for GGUF; fp32 otherwise). Int8Linear: 8 bits, its
    group (K for per-channel), one fp32 scale. W8A8Linear: 8 bits, one group per row, an fp32 scale (+ the
    int32 row sum the VNNI kernel keeps). CUDA int4/int8 linears likewise."""
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        return float(module.weight.element_size() * 8), None, 0
    if name == "PackedLinear":
        return float(module.packed_weight.element_size() * 8), None, 0
    if name in ("Int4Linear", "CudaInt4Linear"):
        bufs = dict(module.named_buffers())
        if "scales_zeros" in bufs:  # rapidlm's layout (fp16/fp32) or PyTorch's (act dtype): scale and offset
            per_group = 2 * bufs["scales_zeros"].element_size()
        else:  # plain: scale and offset tensors
            per_group = bufs["scale"].element_size() + bufs["offset"].element_size()
        return 4.0, int(module.group_size), int(per_group)
    if name in ("Int8Linear", "CudaInt8Linear"):
        group = int(module.group_size)
        # odd groups are padded to even ones in the kernel's layout: one extra code per group is read
        bits = 8.0 * getattr(module, "packed_group_size", group) / group
        return bits, group, 4
    if name == "W8A8Linear":
        extra = 4 if module.backend == "rapidlm-vnni" else 0  # the int32 row sums
        return 8.0, int(module.in_features), 4 + extra
    raise ValueError(
        f"linear_weight_format: unsupported module type {name} (expected nn.Linear, PackedLinear, Int4Linear, "
        "Int8Linear or W8A8Linear)"
    )


def weight_format_name(module: nn.Module) -> str:
    """The weight format a linear runs in, as Ceilings keys it: float32, bfloat16, float16, int8, int4, w8a8."""
    name = type(module).__name__
    if name in ("Int4Linear", "CudaInt4Linear"):
        return "int4"
    if name in ("Int8Linear", "CudaInt8Linear"):
        return "int8"
    if name == "W8A8Linear":
        return "w8a8"
    weight = module.packed_weight if name == "PackedLinear" else getattr(module, "weight", None)
    if weight is None:
        raise ValueError(f"weight_format_name: unsupported module type {name}")
    return str(weight.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LinearSpec:
    """One linear as the cost model sees it: shape and stored format."""

    in_features: int
    out_features: int
    fmt: str  # float32, bfloat16, float16, int8, int4 or w8a8 (rapidlm.profile.roofline.WEIGHT_FORMATS)
    bits: float  # bits per stored weight
    group_size: int | None = None  # inputs per scale group (None: no scales)
    scale_bytes: int = 0  # scale (+ offset) bytes per group
    bias: bool = False

    def __post_init__(self) -> None:
        _positive(in_features=self.in_features, out_features=self.out_features)
        if not self.bits > 0:
            raise ValueError(f"LinearSpec.bits must be > 0, got {self.bits!r}")

    @classmethod
    def of(cls, module: nn.Module) -> LinearSpec:
        if type(module).__name__ == "DenseCopyLinear":  # decode steps run its quantized module
            module = module.quantized
        bits, group, scale_bytes = linear_weight_format(module)
        has_bias = getattr(module, "bias", None) is not None
        fmt = weight_format_name(module)
        return cls(module.in_features, module.out_features, fmt, bits, group, scale_bytes, has_bias)

    @property
    def weight_bytes(self) -> float:
        """Stored bytes: weights + scales (+ bias, kept in fp32 by the quantized modules)."""
        k, n = self.in_features, self.out_features
        scales = n * math.ceil(k / self.group_size) * self.scale_bytes if self.group_size else 0
        return k * n * self.bits / 8 + scales + (4 * n if self.bias else 0)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def cost(self, m: int, act_bytes: int) -> OpCost:
        return linear_cost(
            m, self.in_features, self.out_features, self.bits, act_bytes, self.group_size, self.scale_bytes, self.bias
        )


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: attention heads and its four linears (fused q|k|v, o, fused gate|up, down)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    wqkv: LinearSpec
    wo: LinearSpec
    w_gate_up: LinearSpec
    w_down: LinearSpec

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        return (self.wqkv, self.wo, self.w_gate_up, self.w_down)

    @property
    def intermediate(self) -> int:
        return self.w_down.in_features


@dataclass(frozen=True)
class ModelSpec:
    """What the cost model needs of a model: per-layer shapes and formats, the head, the embedding table.
    Built from a loaded model (ModelSpec.of) or from a config and chosen formats (rapidlm.profile.estimate)."""

    hidden: int
    vocab: int
    layers: tuple[LayerSpec, ...]
    head: LinearSpec
    embed_bytes_per_elem: float  # the embedding table's dtype size
    norm_bytes_per_elem: float
    tied_shared: bool  # the head IS the embedding table (tied, both plain float): its bytes count once
    tied: bool = False  # the config ties head and embedding (one matrix of parameters, maybe stored twice)

    @classmethod
    def of(cls, model: nn.Module) -> ModelSpec:
        layers = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            layers.append(
                LayerSpec(
                    attn.n_heads,
                    attn.n_kv,
                    attn.head_dim,
                    LinearSpec.of(attn.wqkv),
                    LinearSpec.of(attn.wo),
                    LinearSpec.of(mlp.w_gate_up),
                    LinearSpec.of(mlp.w_down),
                )
            )
        head = model.lm_head
        shared = isinstance(head, nn.Linear) and head.weight is model.embed.weight
        return cls(
            hidden=model.cfg.hidden_size,
            vocab=model.embed.weight.shape[0],
            layers=tuple(layers),
            head=LinearSpec.of(head),
            embed_bytes_per_elem=float(model.embed.weight.element_size()),
            norm_bytes_per_elem=float(model.norm.weight.element_size()),
            tied_shared=shared,
            tied=bool(model.cfg.tie_word_embeddings),
        )

    @property
    def weight_bytes(self) -> float:
        """Every stored weight byte: linears (+ scales), the embedding table (once if the head shares it), norms."""
        linears = sum(lin.weight_bytes for layer in self.layers for lin in layer.linears)
        embed = self.vocab * self.hidden * self.embed_bytes_per_elem
        norms = (2 * len(self.layers) + 1) * self.hidden * self.norm_bytes_per_elem
        return linears + embed + norms + (0 if self.tied_shared else self.head.weight_bytes)

    @property
    def params(self) -> int:
        linears = sum(lin.params for layer in self.layers for lin in layer.linears)
        head = 0 if self.tied or self.tied_shared else self.head.params
        return linears + self.vocab * self.hidden + (2 * len(self.layers) + 1) * self.hidden + head


def module_linear_cost(module: nn.Module, m: int, act_bytes: int) -> OpCost:
    """linear_cost for `m` rows through a loaded linear module, its format read off the module (a
    DenseCopyLinear: its bf16 copy from its row threshold on, else its quantized module)."""
    if type(module).__name__ == "DenseCopyLinear":
        module = module.dense if m * module.in_features >= module.min_elements else module.quantized
    return LinearSpec.of(module).cost(m, act_bytes)


def step_costs(
    model: nn.Module | ModelSpec,
    batch: int,
    q_len: int,
    kv_len: int,
    act_bytes: int,
    kv_bytes: int,
    causal: bool = False,
) -> dict[str, OpCost]:
    """Work of ONE forward step of a rapidlm Transformer (the shapes and weight formats of the loaded model,
    so a pruned or quantized model counts as what it is), summed per op kind over all layers.

    batch sequences each feed q_len tokens (1 = a decode step) and attend over kv_len keys. The output head runs
    on the last position of each sequence only, as rapidlm's prefill and decode do. Keys: embedding, norms
    (every RMSNorm), qkv_proj, rotary, attention, o_proj (+ the residual add after attention), mlp (gate/up,
    silu·up, down, + the residual add after the MLP), head. Attention and RoPE run in the KV cache's dtype
    (kv_bytes; rapidlm widens q and k to it before RoPE)."""
    _positive(batch=batch, q_len=q_len, kv_len=kv_len, act_bytes=act_bytes, kv_bytes=kv_bytes)
    spec = model if isinstance(model, ModelSpec) else ModelSpec.of(model)
    tokens = batch * q_len
    hidden = spec.hidden
    costs = dict.fromkeys(STEP_KEYS, ZERO)
    costs["embedding"] = embedding_cost(tokens, hidden, spec.embed_bytes_per_elem, act_bytes)
    for layer in spec.layers:
        costs["norms"] += norm_cost(tokens, hidden, act_bytes) * 2
        costs["qkv_proj"] += layer.wqkv.cost(tokens, act_bytes)
        costs["rotary"] += rope_cost(tokens, layer.n_heads, layer.n_kv_heads, layer.head_dim, kv_bytes)
        costs["attention"] += attention_cost(
            batch, q_len, kv_len, layer.n_heads, layer.n_kv_heads, layer.head_dim, kv_bytes, act_bytes, causal
        )
        costs["o_proj"] += layer.wo.cost(tokens, act_bytes) + elementwise_cost(tokens * hidden, 1, 2, act_bytes)
        costs["mlp"] += layer.w_gate_up.cost(tokens, act_bytes)
        costs["mlp"] += elementwise_cost(tokens * layer.intermediate, SILU_MUL_FLOPS, 2, act_bytes)
        costs["mlp"] += layer.w_down.cost(tokens, act_bytes) + elementwise_cost(tokens * hidden, 1, 2, act_bytes)
    costs["norms"] += norm_cost(batch, hidden, act_bytes)  # the final norm, last positions only
    costs["head"] = spec.head.cost(batch, act_bytes)
    return costs


def total(costs: dict[str, OpCost]) -> OpCost:
    out = ZERO
    for c in costs.values():
        out = out + c
    return out


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

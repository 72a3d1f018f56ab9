"""Hardware ceilings and the roofline: how long an op of known FLOPs and bytes must take on a machine.

A machine is described by a `Ceilings`: memory bandwidth, peak FLOP/s per dtype and the fixed cost of one
framework op. `cpu-here` measures them on this machine (a few seconds, cached per CPU model and thread count);
GPUs come from datasheets (HARDWARE). The roofline time of an op is

    t = max(flops / peak_flops[dtype], bytes / bandwidth)

A CPU running rapidlm eagerly is not only bound by those two: every op also costs a fixed amount (Python, the
dispatcher, OpenMP's fork/join), and the decode matmul kernels stream their weights at their own rate, below the
copy bandwidth. So `cpu-here` also measures, for each weight format rapidlm runs, its decode kernel's weight
streaming rate (a large matrix at one token: weight bytes / time), the fixed cost of one such linear call (a
tiny matrix) and the fixed cost per op of a whole decoder layer built with it (the layer at width 64, where no
op moves more than a few KiB, divided by its op count). rapidlm.profile.estimate combines them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rapidlm.profile.costs import OpCost

DTYPES = ("float32", "bfloat16", "float16", "int8")
# Weight formats a decode linear can have (rapidlm.profile.costs.linear_weight_format maps modules to these).
WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4", "w8a8")
DEVICES = ("cpu", "cuda")
CACHE_VERSION = 6  # bump when what is measured changes, so old cache files are re-measured

# Framework ops of rapidlm's eager forward (models/llama.py, models/layers.py, runtime/attention.py,
# runtime/kv_cache.py) at one decode step, as the PyTorch profiler counts top-level ops (views included: each is a
# Python call and a dispatch), by op kind. tests/profile/test_roofline.py counts them on a live model.
CPU_LAYER_OPS: dict[str, int] = {
    "norms": 16,  # 2 RMSNorms x (vector_norm, square_, div_, add_, rsqrt_, empty_like, mul, weight mul)
    "qkv_proj": 6,  # linear, view, slices of q|k, q, k, v
    "rotary": 7,  # widening .to, RoPE (2 slices, cat, mul, addcmul), a view
    "attention": 9,  # K and V writes (index_put through a view), v .to, the pools viewed as blocks, q reshape,
    # the fused decode kernel (runtime/kv_cache.LayerKV; SDPA where the kernel is unavailable), its output view
    "o_proj": 5,  # transpose, reshape, .to, linear, residual add
    "mlp": 6,  # gate|up linear, split, silu, mul, down linear, residual add
}
CPU_STEP_OPS: dict[str, int] = {  # outside the layers, per step
    "embedding": 6,  # embedding, token/position unsqueezes, batch-index arange + unsqueeze + expand
    "rotary": 6,  # cos/sin table gathers, casts, unsqueezes
    "attention": 6,  # the decode kernel's tables and lengths, built once for all layers
    "norms": 8,  # the final RMSNorm
    "head": 4,  # linear, select of the last position, .float(), the sampler's argmax
}
CPU_OPS_PER_LAYER = sum(CPU_LAYER_OPS.values())  # 49


@dataclass
class Ceilings:
    """What a machine can do. flops_gflops is keyed by dtype ("float32", "bfloat16", "int8", ...)."""

    name: str
    bandwidth_gbs: float  # streaming copy: bytes read + written per second, GB/s (1e9)
    flops_gflops: dict[str, float]  # peak dense matmul rate by dtype, GFLOP/s (int8: GOP/s)
    op_overhead_us: float  # fixed cost per framework op call (CPU dispatch / GPU launch)
    source: str  # "measured on <cpu>, <n> threads, <date>" or "datasheet: <what>"
    device: str = "cpu"  # "cpu" (rapidlm's eager CPU path) or "cuda" (CUDA-graph decode)
    threads: int | None = None  # CPU threads the measurement used
    # Measured on cpu-here, per weight format (WEIGHT_FORMATS); a missing format falls back as noted:
    weight_stream_gbs: dict[str, float] = field(default_factory=dict)  # decode kernel's weight bytes/s (bandwidth)
    linear_overhead_us: dict[str, float] = field(default_factory=dict)  # one linear call's fixed cost (op_overhead)
    layer_op_overhead_us: dict[str, float] = field(default_factory=dict)  # fixed cost per op in a layer (op_overhead)
    # Measured on cpu-here when an estimate first needs them, then cached (keys: linear_key, step_key):
    linear_us: dict[str, float] = field(default_factory=dict)  # one decode linear of a format and shape, cold weights
    step_fixed_us: dict[str, float] = field(default_factory=dict)  # a width-64 decode step with L layers, batch B
    attention_us: dict[str, float] = field(default_factory=dict)  # one layer's decode attention (SDPA) at a shape
    memory_gib: float | None = None  # device memory (GPUs) or RAM, for "does it fit"
    link_gbs: float | None = None  # GPU-to-GPU bandwidth per direction (tensor parallelism), GB/s
    collective_latency_us: float = 0.0  # fixed cost of one all-reduce / all-gather between the GPUs
    details: dict[str, str] = field(default_factory=dict)  # how each number was obtained

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Ceilings.name must be a non-empty string, got {self.name!r}")
        if self.device not in DEVICES:
            raise ValueError(f"Ceilings.device must be one of {list(DEVICES)}, got {self.device!r}")
        _check_positive("Ceilings.bandwidth_gbs", self.bandwidth_gbs)
        _check_positive("Ceilings.op_overhead_us", self.op_overhead_us, allow_zero=True)
        if not isinstance(self.flops_gflops, dict) or not self.flops_gflops:
            raise ValueError(f"Ceilings.flops_gflops must be a non-empty dict dtype -> GFLOP/s: {self.flops_gflops}")
        for table, keys in (
            ("flops_gflops", DTYPES),
            ("weight_stream_gbs", WEIGHT_FORMATS),
            ("linear_overhead_us", WEIGHT_FORMATS),
            ("layer_op_overhead_us", WEIGHT_FORMATS),
        ):
            for key, value in getattr(self, table).items():
                if key not in keys:
                    raise ValueError(f"Ceilings.{table} has unknown key {key!r} (valid: {', '.join(keys)})")
                _check_positive(f"Ceilings.{table}[{key!r}]", value, allow_zero=table != "flops_gflops")
        for table in ("linear_us", "step_fixed_us", "attention_us"):
            for key, value in getattr(self, table).items():
                _check_positive(f"Ceilings.{table}[{key!r}]", value, allow_zero=True)
        if not isinstance(self.source, str) or not self.source:
            raise ValueError("Ceilings.source must say where the numbers come from (measured or datasheet)")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise ValueError(f"Ceilings.threads must be a positive int or None, got {self.threads!r}")
        if self.memory_gib is not None:
            _check_positive("Ceilings.memory_gib", self.memory_gib)
        if self.link_gbs is not None:
            _check_positive("Ceilings.link_gbs", self.link_gbs)
        _check_positive("Ceilings.collective_latency_us", self.collective_latency_us, allow_zero=True)

    # ---- lookups with the documented fallbacks ----

    def peak_gflops(self, dtype: str) -> float:
        if dtype not in self.flops_gflops:
            if dtype == "float16" and "bfloat16" in self.flops_gflops:
                return self.flops_gflops["bfloat16"]
            raise ValueError(
                f"hardware {self.name!r} has no peak for dtype {dtype!r} (has: {', '.join(self.flops_gflops)})"
            )
        return self.flops_gflops[dtype]

    def stream_gbs(self, weight_format: str) -> float:
        """Rate at which a decode linear of this format streams its weights (GB/s); the copy bandwidth where
        it was not measured (datasheet hardware)."""
        return self.weight_stream_gbs.get(weight_format, self.bandwidth_gbs)

    def linear_fixed_us(self, weight_format: str) -> float:
        return self.linear_overhead_us.get(weight_format, self.op_overhead_us)

    def layer_op_us(self, weight_format: str) -> float:
        return self.layer_op_overhead_us.get(weight_format, self.op_overhead_us)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Ceilings:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Ceilings: unknown fields {sorted(unknown)}")
        return cls(**data)


def _check_positive(name: str, value: object, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def op_time_s(cost: OpCost, ceilings: Ceilings, dtype: str) -> float:
    """The roofline: max(flops / peak, bytes / bandwidth) in seconds (no fixed per-op cost)."""
    compute = cost.flops / (ceilings.peak_gflops(dtype) * 1e9)
    memory = cost.bytes / (ceilings.bandwidth_gbs * 1e9)
    return max(compute, memory)


# ----------------------------------------------------------------------------------------------------------------
# Datasheet hardware. Dense (no sparsity) tensor-core peaks; bandwidth is the HBM/GDDR figure; memory the nominal
# size (a little less is usable); link = NVLink (or PCIe) bandwidth per direction, for tensor parallelism.
# op_overhead_us is the cost of one small kernel in rapidlm's CUDA-graph decode step, measured on an H200
# (docs/cuda.md: the six small kernels per layer of the 7B shape, with the gaps between launches, took 0.62 ms
# over 32 layers = 192 kernels: 3.2 us each); graph launch gaps are similar across these GPUs, so it serves all.
# collective_latency_us is an assumption, not a measurement: the order of NCCL's small-message all-reduce time.

_GPU_OP_US = 3.2
_GPU_NOTES = {
    "op_overhead_us": "3.2 us per small kernel, measured in rapidlm's CUDA-graph decode on an H200 (docs/cuda.md)",
    "collective_latency_us": "assumed 10 us per all-reduce (order of NCCL small-message latency), not measured",
}


def _gpu(name: str, bandwidth: float, fp32: float, bf16: float, int8: float, memory: float, link: float,
         source: str) -> Ceilings:
    """A datasheet GPU: bandwidth GB/s, peaks in TFLOP/s (int8: TOPS), memory GB, link GB/s per direction."""
    return Ceilings(
        name=name,
        bandwidth_gbs=bandwidth,
        flops_gflops={"float32": fp32 * 1e3, "bfloat16": bf16 * 1e3, "float16": bf16 * 1e3, "int8": int8 * 1e3},
        op_overhead_us=_GPU_OP_US,
        source="datasheet: " + source,
        device="cuda",
        memory_gib=memory,
        link_gbs=link,
        collective_latency_us=10.0,
        details=dict(_GPU_NOTES),
    )


HARDWARE: dict[str, Ceilings] = {
    "h100": _gpu("h100", 3350, 67, 989, 1979, 80, 450, "NVIDIA H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOP/s bf16 "
                 "dense, 1979 TOPS int8 dense, 67 TFLOP/s fp32, NVLink 900 GB/s (450 per direction)"),
    "h100-pcie": _gpu("h100-pcie", 2000, 51, 756, 1513, 80, 64, "NVIDIA H100 PCIe 80GB: 2.0 TB/s HBM2e, 756 TFLOP/s "
                      "bf16 dense, 1513 TOPS int8 dense, 51 TFLOP/s fp32, PCIe Gen5 x16 128 GB/s (64 per direction)"),
    "h200": _gpu("h200", 4800, 67, 989, 1979, 141, 450, "NVIDIA H200 SXM 141GB: 4.8 TB/s HBM3e, 989 TFLOP/s bf16 "
                 "dense, 1979 TOPS int8 dense, 67 TFLOP/s fp32, NVLink 900 GB/s (450 per direction)"),
    "a100": _gpu("a100", 2039, 19.5, 312, 624, 80, 300, "NVIDIA A100 SXM4 80GB: 2.039 TB/s HBM2e, 312 TFLOP/s bf16 "
                 "dense, 624 TOPS int8 dense, 19.5 TFLOP/s fp32, NVLink 600 GB/s (300 per direction)"),
    "a100-40gb": _gpu("a100-40gb", 1555, 19.5, 312, 624, 40, 300, "NVIDIA A100 SXM4 40GB: 1.555 TB/s HBM2, "
                      "312 TFLOP/s bf16 dense, 624 TOPS int8 dense, 19.5 TFLOP/s fp32, NVLink 600 GB/s (300 per "
                      "direction)"),
    "l4": _gpu("l4", 300, 30.3, 121, 242, 24, 32, "NVIDIA L4 24GB: 300 GB/s GDDR6, 121 TFLOP/s bf16 dense, 242 TOPS "
               "int8 dense, 30.3 TFLOP/s fp32, PCIe Gen4 x16 64 GB/s (32 per direction)"),
}

CPU_HERE = "cpu-here"


def hardware_names() -> list[str]:
    return [CPU_HERE, *HARDWARE]


def get_hardware(name: str, remeasure: bool = False, cache_dir: Path | None = None) -> Ceilings:
    """`cpu-here` (measured, cached) or a datasheet entry of HARDWARE; unknown names list the valid ones."""
    if name == CPU_HERE:
        return load_ceilings(remeasure=remeasure, cache_dir=cache_dir)
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; valid: {', '.join(hardware_names())}")
    return HARDWARE[name]


# ----------------------------------------------------------------------------------------------------------------
# Measuring this machine


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        if m:
            return re.sub(r"\s+", " ", m.group(1)).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


QUIET_CORES = 0.25  # a timing pass counts as quiet when other processes used less CPU than this meanwhile
QUIET_WAIT_S = 20.0  # how long a measurement retries disturbed passes before it takes them as they are


def _other_cpu_s() -> float:
    """CPU seconds every other process has used (busy time in /proc/stat minus this process's)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    t = os.times()
    return busy - t.user - t.system


def _timed(fn: Callable[[], object], inner: int, passes: int, stat: str = "min", max_seconds: float | None = None
           ) -> float:
    """Seconds per call of fn: `passes` timings of `inner` calls each, taken while other processes were nearly
    idle (a pass during which they used more than QUIET_CORES is retried, up to max_seconds; then the disturbed
    ones count too). stat "min": the best pass (a ceiling: interference only slows a run down); "median": the
    typical one (a cost that predictions are compared with medians of real runs against)."""
    fn()
    quiet: list[float] = []
    noisy: list[float] = []
    deadline = time.perf_counter() + (QUIET_WAIT_S if max_seconds is None else max_seconds)
    while len(quiet) < passes and (time.perf_counter() < deadline or len(quiet) + len(noisy) < passes):
        other0, t0 = _other_cpu_s(), time.perf_counter()
        for _ in range(inner):
            fn()
        wall = time.perf_counter() - t0
        # /proc/stat counts in 10 ms ticks: allow two of them on short passes
        (quiet if _other_cpu_s() - other0 <= QUIET_CORES * wall + 0.02 else noisy).append(wall / inner)
    pool = quiet if len(quiet) >= max(1, passes // 2) else quiet + noisy
    return min(pool) if stat == "min" else statistics.median(pool)


def _best(fn: Callable[[], object], inner: int, repeats: int) -> float:
    """Seconds per call: the best of `repeats` quiet timings of `inner` calls."""
    return _timed(fn, inner, repeats, "min")


def _median_of_best(fn: Callable[[], object], inner: int, repeats: int, rounds: int = 3) -> float:
    return statistics.median(_best(fn, inner, repeats) for _ in range(rounds))


def measure_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """GB/s of a streaming copy of `mib` MiB (bytes read + written), far beyond any cache."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), 1, repeats)
    return 2 * src.numel() * 4 / t / 1e9


def measure_gemm(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s (int8: GOP/s) of an n x n x n matmul: fp32/bf16 by torch.matmul, int8 by torch._int_mm."""
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (n, n), dtype=torch.int8)
        b = torch.randint(-127, 127, (n, n), dtype=torch.int8)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        fn = lambda: torch.matmul(a, b)  # noqa: E731
    return 2 * n**3 / _best(fn, 1, repeats) / 1e9


def _make_linear(fmt: str, n: int, k: int) -> tuple[torch.nn.Module, torch.dtype]:
    """One decode linear of weight format `fmt` as rapidlm runs it on this CPU, random weights, and the
    activation dtype it runs with."""
    from torch import nn

    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    if fmt == "float32":
        return lin, torch.float32
    if fmt in ("bfloat16", "float16"):
        from rapidlm.runtime.cpu_linear import PackedLinear, mkldnn_bf16_available

        lin = lin.to(torch.bfloat16)
        return (PackedLinear(lin) if mkldnn_bf16_available() else lin), torch.bfloat16
    if fmt == "int8":  # GGUF Q8_0's layout: groups of 32, one fp32 scale each (the default model's head)
        from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight

        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return Int8Linear(Int8Weight(q, torch.rand(n, k // 32) * 1e-3, 32)), torch.bfloat16
    if fmt == "int4":  # GGUF Q4_0/Q4_1's layout: groups of 32, fp16 scale and offset
        from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight

        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        scale = (torch.rand(n, k // 32) * 1e-3).half().float()
        return Int4Linear(Int4Weight(q, scale, -8 * scale, 32)), torch.bfloat16
    if fmt == "w8a8":
        from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear

        q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        return W8A8Linear(q, torch.rand(n) * 1e-3), torch.bfloat16
    raise ValueError(f"unknown weight format {fmt!r} (valid: {', '.join(WEIGHT_FORMATS)})")


def _cold_copies(fmt: str, n: int, k: int, total_mib: int) -> tuple[list[torch.nn.Module], torch.dtype, float]:
    """Copies of one n x k linear of format `fmt` holding `total_mib` MiB together (at least 2), so that calls
    rotating over them find their weights cold; also the activation dtype and one copy's weight bytes."""
    import copy

    from rapidlm.profile.costs import LinearSpec

    probe, act = _make_linear(fmt, n, k)
    per_matrix = LinearSpec.of(probe).weight_bytes
    mods = [probe]
    for _ in range(max(2, int(total_mib * 2**20 // per_matrix)) - 1):
        try:
            mods.append(copy.deepcopy(probe))  # a memcpy: faster than packing again
        except (NotImplementedError, RuntimeError):  # oneDNN's packed weight is opaque: pack another one
            mods.append(_make_linear(fmt, n, k)[0])
    return mods, act, per_matrix


def measure_weight_stream(fmt: str, n: int = 2048, k: int = 2048, total_mib: int = 128) -> float:
    """GB/s at which rapidlm's decode linear of format `fmt` streams its weights: one token through copies of
    an n x k matrix holding `total_mib` MiB together (4x this machine's 32 MiB L3; a model's weights do not fit
    a cache either), each call's weight + scale bytes over its time less the fixed cost of one call."""
    mods, act, per_matrix = _cold_copies(fmt, n, k, total_mib)
    x = torch.randn(1, k).to(act)
    i = [0]

    def call() -> None:
        i[0] = (i[0] + 1) % len(mods)
        mods[i[0]](x)

    with torch.inference_mode():
        t = _best(call, len(mods), 5)
    fixed = measure_linear_overhead(fmt) * 1e-6
    return per_matrix / max(t - fixed, t / 2) / 1e9


def measure_linear_overhead(fmt: str) -> float:
    """Microseconds of one call of format `fmt` on a 64 x 64 matrix: its fixed cost (module call, dispatch,
    threads), the data being a few KiB."""
    mod, act = _make_linear(fmt, 64, 64)
    x = torch.randn(1, 64).to(act)
    with torch.inference_mode():
        return _median_of_best(lambda: mod(x), 200, 5) * 1e6


def tiny_layer_runner(fmt: str, num_layers: int = 1):  # noqa: ANN201
    """A ModelRunner over a rapidlm Transformer of width 64 whose layers' linears have format `fmt` (random
    weights): every op's data fits in L1, so its decode step's time is fixed cost."""
    from torch import nn

    from rapidlm.config import ModelConfig
    from rapidlm.models.llama import Transformer
    from rapidlm.runtime.model_runner import ModelRunner

    cfg = ModelConfig("LlamaForCausalLM", 64, 64, 64, num_layers, 4, 2)
    torch.manual_seed(0)
    model = Transformer(cfg, 128).eval().requires_grad_(False)
    _, act = _make_linear(fmt, 64, 64)
    model.to(act)
    if fmt not in ("float32", "bfloat16", "float16"):
        parents = [p for layer in model.layers for p in (layer.attn, layer.mlp)] + [model]
        for parent in parents:
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _make_linear(fmt, child.out_features, child.in_features)[0])
    return ModelRunner(model, cfg, torch.device("cpu"), act)  # packs bf16 linears, as LLM does


def measure_layer_op_overhead(fmt: str, rounds: int = 5) -> float:
    """Microseconds per framework op inside a decoder layer of format `fmt`: a width-64 model's decode step
    with 9 layers minus with 1 layer, / 8 layers / CPU_OPS_PER_LAYER. Best of interleaved rounds."""
    runs = {}
    for layers in (1, 9):
        runner = tiny_layer_runner(fmt, layers)
        cache = runner.allocate(1, 64)
        runner.prefill(cache, 0, [1, 2, 3, 4])
        runs[layers] = (runner, cache)
    token, pos = torch.tensor([1]), torch.tensor([4])
    best = {1: math.inf, 9: math.inf}
    for _ in range(rounds):
        for layers, (runner, cache) in runs.items():
            best[layers] = min(best[layers], _best(lambda r=runner, c=cache: r.decode(c, token, pos, 5), 10, 3))
    return max(best[9] - best[1], 0.0) / 8 / CPU_OPS_PER_LAYER * 1e6


def linear_key(fmt: str, n: int, k: int, m: int) -> str:
    return f"{fmt}:{n}x{k}:m{m}"


def step_key(fmt: str, layers: int, batch: int) -> str:
    return f"{fmt}:L{layers}:B{batch}"


def attention_key(batch: int, heads: int, kv_heads: int, head_dim: int, kv_len: int, dtype: str,
                  q_len: int = 1) -> str:
    return f"B{batch}:q{q_len}:H{heads}/{kv_heads}x{head_dim}:L{kv_len}:{dtype}"


def _sdpa_inputs(batch: int, heads: int, kv_heads: int, head_dim: int, kv_len: int, dtype: torch.dtype,
                 max_len: int, q_len: int = 1):  # noqa: ANN202
    """What rapidlm's dense cache hands SDPA: q a transposed view (B, H, q_len, d), keys and values the first
    kv_len slots of (B, Hkv, max_len, d) cache views, a (B, 1, q_len, L) causal bool mask unless one sequence
    decodes one token (the model skips the mask then)."""
    q = torch.randn(batch, q_len, heads, head_dim, dtype=dtype).transpose(1, 2)
    cache = torch.randn(2, batch, kv_heads, max_len, head_dim, dtype=dtype)
    mask = None
    if batch > 1 or q_len > 1:
        pos = torch.arange(kv_len - q_len, kv_len)
        mask = (torch.arange(kv_len)[None, :] <= pos[:, None]).expand(batch, 1, q_len, kv_len)
    return q, cache[0, :, :, :kv_len], cache[1, :, :, :kv_len], mask


def _sdpa(q, k, v, mask):  # noqa: ANN001, ANN202
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _kernel_inputs(batch: int, heads: int, kv_heads: int, head_dim: int, kv_len: int, max_len: int):  # noqa: ANN202
    """What the dense cache hands the CPU decode kernel (runtime/kv_cache.LayerKV): q (B*Hkv, H/Hkv, d), each
    (row, kv head) of the (B, Hkv, max_len, d) cache as one block, every row kv_len long."""
    q = torch.randn(batch * kv_heads, heads // kv_heads, head_dim)
    cache = torch.randn(2, batch * kv_heads, max_len, 1, head_dim)
    tables = torch.arange(batch * kv_heads, dtype=torch.int32)[:, None]
    lens = torch.full((batch * kv_heads,), kv_len, dtype=torch.int32)
    return q, cache[0], cache[1], tables, lens, head_dim**-0.5, 0


def measure_attention_us(batch: int, heads: int, kv_heads: int, head_dim: int, kv_len: int,
                         dtype: str = "float32", q_len: int = 1, layers: int = 32) -> float:
    """Microseconds of one layer's attention as rapidlm runs it over its dense cache (a decode token: the fused
    decode kernel where it is available on the CPU; prompt tokens: SDPA over the cache's first kv_len slots),
    calls rotating over `layers` layers' caches as a step does. Median of 7 quiet passes."""
    from rapidlm.runtime.paged_kv import decode_kernel_for

    tdt = getattr(torch, dtype)
    kernel = decode_kernel_for(torch.device("cpu"), tdt, tdt) if q_len == 1 else None
    if kernel is not None:
        inputs = [_kernel_inputs(batch, heads, kv_heads, head_dim, kv_len, kv_len + 64) for _ in range(layers)]
    else:
        inputs = [_sdpa_inputs(batch, heads, kv_heads, head_dim, kv_len, tdt, kv_len + 64, q_len)
                  for _ in range(layers)]  # fmt: skip
    i = [0]

    def call() -> None:
        i[0] = (i[0] + 1) % len(inputs)
        if kernel is not None:
            kernel(*inputs[i[0]])
        else:
            _sdpa(*inputs[i[0]])

    with torch.inference_mode():
        return _timed(call, len(inputs), 7, "median") * 1e6


def measure_linear_us(fmt: str, n: int, k: int, m: int = 1, total_mib: int = 128) -> float:
    """Microseconds of one call of rapidlm's linear of format `fmt`, n x k, on m rows, the weights cold: calls
    rotate over copies holding `total_mib` MiB together (4x this machine's L3, as a model's weights exceed it).
    Median of 7 quiet passes (3 over 32 MiB for m > 16, where the matmul is compute-bound): the kernel's
    typical cost at that shape, call overhead included."""
    passes = 7 if m <= 16 else 3
    total_mib = total_mib if m <= 16 else min(total_mib, 32)
    mods, act, per_matrix = _cold_copies(fmt, n, k, total_mib)
    x = torch.randn(m, k).to(act)
    i = [0]

    def call() -> None:
        i[0] = (i[0] + 1) % len(mods)
        mods[i[0]](x)

    with torch.inference_mode():
        return _timed(call, len(mods), passes, "median") * 1e6


def measure_step_fixed_us(fmt: str, layers: int, batch: int = 1, steps: int = 32) -> float:
    """Microseconds per decode step of rapidlm's engine over a width-64 model with `layers` layers whose linears
    have format `fmt`, `batch` sequences, less the time of its 4 x layers + 1 (tiny) linear calls, timed on the
    model's own modules right after: every tensor is a few KiB, so what is left is the fixed cost of a step
    (Python, dispatch, threads, the small ops, greedy sampling, detokenizing) for that many layers. Median of 5
    quiet runs of `steps` steps."""
    from rapidlm.engine.engine import Engine
    from rapidlm.engine.sampling import SamplingParams

    runner = tiny_layer_runner(fmt, layers)
    tokenizer = _default_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    prompts = [[1 + (i + j) % 60 for j in range(8)] for i in range(batch)]

    def run() -> float:  # seconds per decode step
        if tokenizer is None:  # no tokenizer: the runner's decode and an argmax per step
            cache = runner.allocate(batch, 8 + steps + 1)
            for row, p in enumerate(prompts):
                runner.prefill(cache, row, p)
            tok, pos = torch.ones(batch, dtype=torch.long), torch.full((batch,), 8)
            t = time.perf_counter()
            for i in range(steps):
                tok = runner.decode(cache, tok, pos + i, 9 + i).argmax(-1)
            return (time.perf_counter() - t) / steps
        engine = Engine(runner, tokenizer)
        seqs = engine.make_sequences(prompts, [params] * batch)
        for _ in engine.run(seqs):
            pass
        return engine.output(seqs[0]).metrics.decode_time_s / steps

    with torch.inference_mode():
        run()  # warm-up
        quiet, noisy = [], []
        deadline = time.perf_counter() + QUIET_WAIT_S
        while len(quiet) < 5 and (time.perf_counter() < deadline or len(quiet) + len(noisy) < 5):
            other0, t0 = _other_cpu_s(), time.perf_counter()
            per_step = run()
            wall = time.perf_counter() - t0
            (quiet if _other_cpu_s() - other0 <= QUIET_CORES * wall + 0.02 else noisy).append(per_step)
        step = statistics.median(quiet if len(quiet) >= 3 else quiet + noisy)
        linears = [m for m in runner.model.modules() if hasattr(m, "in_features")]
        x = torch.randn(batch, 1, 64).to(runner.dtype)
        per_linear = _timed(lambda: [m(x) for m in linears], 20, 5, "median") / len(linears)
        cfg = runner.cfg  # its attention: a mid-run context, the cache dtype
        sdpa = _sdpa_inputs(batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 8 + steps // 2, runner.kv_dtype,
                            8 + steps + 1)
        per_sdpa = _timed(lambda: _sdpa(*sdpa), 50, 5, "median")
    return max(step - len(linears) * per_linear - layers * per_sdpa, 0.0) * 1e6


@functools.cache
def _default_tokenizer():  # noqa: ANN202
    """The default model's tokenizer (its GGUF metadata takes seconds to parse: once per process)."""
    try:
        from rapidlm.loading.loader import load_tokenizer

        return load_tokenizer()
    except Exception:  # noqa: BLE001 - no default model installed: measure without detokenizing
        return None


def complete_ceilings(
    ceilings: Ceilings,
    linears: list[tuple[str, int, int, int]] = (),
    steps: list[tuple[str, int, int]] = (),
    attentions: list[tuple[int, int, int, int, int, str, int]] = (),
    cache_dir: Path | None = None,
) -> Ceilings:
    """Measure the per-shape linear times (fmt, n, k, m), fixed step costs (fmt, layers, batch) and attention
    times (batch, heads, kv_heads, head_dim, kv_len, dtype, q_len) an estimate needs that `ceilings` (cpu-here) lacks,
    add them and rewrite the cache. Each takes about a second, once."""
    added = False
    for shape in attentions:
        key = attention_key(*shape)
        if key not in ceilings.attention_us:
            ceilings.attention_us[key] = measure_attention_us(*shape)
            added = True
    for fmt, n, k, m in linears:
        key = linear_key(fmt, n, k, m)
        if key not in ceilings.linear_us:
            ceilings.linear_us[key] = measure_linear_us(fmt, n, k, m)
            added = True
    for fmt, layers, batch in steps:
        key = step_key(fmt, layers, batch)
        if key not in ceilings.step_fixed_us:
            ceilings.step_fixed_us[key] = measure_step_fixed_us(fmt, layers, batch)
            added = True
    if added and ceilings.name == CPU_HERE:
        _write_cache(ceilings, cache_path(cache_dir, ceilings.threads))
    return ceilings


def measure_ceilings(threads: int | None = None, formats: tuple[str, ...] = ("float32", "bfloat16", "int8", "int4",
                                                                              "w8a8")) -> Ceilings:
    """Measure this CPU (a few seconds): copy bandwidth, GEMM rate per dtype, and for each weight format its
    decode kernel's streaming rate, a linear call's fixed cost and the fixed cost per op of a decoder layer."""
    from rapidlm.runtime.device import set_threads

    if threads is not None:
        set_threads(threads)
    n_threads = torch.get_num_threads()
    started = time.perf_counter()
    bandwidth = measure_bandwidth()
    flops = {
        "float32": measure_gemm(torch.float32),
        "bfloat16": measure_gemm(torch.bfloat16),
        "int8": measure_gemm(torch.int8),
    }
    stream, lin_us, layer_us = {}, {}, {}
    for fmt in formats:
        try:
            stream[fmt] = measure_weight_stream(fmt)
            lin_us[fmt] = measure_linear_overhead(fmt)
            layer_us[fmt] = measure_layer_op_overhead(fmt)
        except (RuntimeError, ValueError):  # a format this machine cannot run (no kernel): left to the fallbacks
            continue
    op_us = layer_us.get("float32") or next(iter(layer_us.values()), 0.0)
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Ceilings(
        name=CPU_HERE,
        bandwidth_gbs=bandwidth,
        flops_gflops=flops,
        op_overhead_us=op_us,
        source=f"measured on {cpu_model()}, {n_threads} threads, {date} ({time.perf_counter() - started:.0f} s)",
        device="cpu",
        threads=n_threads,
        weight_stream_gbs=stream,
        linear_overhead_us=lin_us,
        layer_op_overhead_us=layer_us,
        memory_gib=_ram_gib(),
        details={
            "bandwidth_gbs": "copy_ of 256 MiB fp32 (bytes read + written), best of 7",
            "flops_gflops": "2048^3 matmul (int8: torch._int_mm), best of 5",
            "weight_stream_gbs": "rapidlm's linear of that format, 1 token x 2048x2048, copies over 128 MiB, "
            "(weight + scale bytes) / (time - fixed call cost)",
            "linear_overhead_us": "the same linear at 64x64, 1 token",
            "layer_op_overhead_us": f"width-64 decode step, (9 layers - 1 layer) / 8 / {CPU_OPS_PER_LAYER} ops",
            "op_overhead_us": "layer_op_overhead_us of float32",
            "linear_us": "added when an estimate needs them: rapidlm's linear of format:NxK on m rows, copies over "
            "128 MiB (weights cold), best of 5",
            "step_fixed_us": "added when an estimate needs them: rapidlm's engine decoding a width-64 model of that "
            "format with L layers and B sequences, greedy, less its linear and attention calls; median of 5 runs of "
            "32 steps",
            "attention_us": "added when an estimate needs them: SDPA as rapidlm's dense cache calls it at one decode "
            "step (B, H/Hkv x d, context L, dtype), rotating over 32 layers' caches; median of 7 passes",
        },
    )


def _ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rapidlm"


def cache_path(cache_dir: Path | None = None, threads: int | None = None) -> Path:
    """~/.cache/rapidlm/ceilings-<cpu model>-<threads>t.json"""
    n = threads or torch.get_num_threads()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model()).strip("-").lower() or "cpu"
    return (cache_dir or default_cache_dir()) / f"ceilings-{slug}-{n}t.json"


def load_ceilings(remeasure: bool = False, cache_dir: Path | None = None, threads: int | None = None) -> Ceilings:
    """cpu-here's ceilings: read from the cache (keyed by CPU model and thread count), else measured and
    written there. remeasure=True measures again and overwrites the cache."""
    if threads is not None:
        from rapidlm.runtime.device import set_threads

        set_threads(threads)
    path = cache_path(cache_dir)
    if not remeasure and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.pop("cache_version", None) == CACHE_VERSION:
                return Ceilings.from_json(data)
        except (ValueError, TypeError, json.JSONDecodeError):
            pass  # an unreadable or outdated cache is measured again
    ceilings = measure_ceilings()
    _write_cache(ceilings, path)
    return ceilings


def _write_cache(ceilings: Ceilings, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"cache_version": CACHE_VERSION, **ceilings.to_json()}, indent=1))
    tmp.replace(path)

"""`rapidlm profile`: run generation instrumented and account for where every decode step's time goes.

The run is the real one: `Engine.run`, the loop behind `LLM.generate`, on random prompts of a given length,
greedy, `ignore_eos`. The profiler observes it and changes nothing in the model, runtime or engine code:

* step wall time: a clock read around each step of the engine's generator (its first step is the prefill of
  every prompt; each later step is one decode of every live row: forward, sampling, detokenization, stops);
* parts, each from its own pair of clock reads: forward pre/post hooks on the model's modules (embedding, each
  Block, its norms, Attention and its wqkv / wo, the MLP, the final norm, lm_head), a wrapper around
  `apply_rope` (RoPE is a function, not a module), wrappers around the runner's prefill/decode/allocate, the
  engine's sampler and its per-token bookkeeping. Times nest; each op kind gets its *exclusive* time:
  attention = Attention minus wqkv, wo and RoPE (the attention core with its reshapes and casts);
  framework = the runner's and model's own code between the timed modules (RoPE table gather, mask, the layer
  loop, residual adds, module dispatch); engine = detokenization and stop checks; sampling = the sampler;
* the unattributed remainder: step wall time minus the sum of the parts, i.e. what no clock pair saw (the
  engine loop's own lines: the token copy to the host, position updates, the generator). It is reported, not
  folded into a part, and must stay under 10% for the profile to account for the run;
* an un-instrumented pass of the same run, interleaved with the instrumented one round by round, gives the
  step-time distribution a user sees and the hooks' real overhead; the hooks' cost is also calibrated on a
  no-op module, so the shares can be stated without it ("corrected").

On a GPU every clock read is preceded by torch.cuda.synchronize() (instrumented pass only). Compiled or
CUDA-graph decode steps run as one graph that module hooks cannot see: the instrumented pass then runs the
model eagerly (the runner's graphs are set aside for that pass and put back), the plain pass as configured.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rapidlm.engine import engine as engine_module
from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import ConfigError
from rapidlm.profile.costs import OpCost, dtype_bytes, step_costs
from rapidlm.profile.stats import StepStats, step_stats

# Every part of a step, in report order. The first eight have FLOP/byte counts (profile.costs.STEP_KEYS).
OP_KINDS = ("embedding", "norms", "qkv_proj", "rotary", "attention", "o_proj", "mlp", "head")
KINDS = (*OP_KINDS, "sampling", "engine", "framework")
# What a Block is made of, for the per-layer breakdown.
LAYER_KINDS = ("norms", "qkv_proj", "rotary", "attention", "o_proj", "mlp", "framework")
# Parts a user cannot speed up by a faster kernel: the Python and dispatch around the ops.
OVERHEAD_KINDS = ("engine", "framework")
KIND_LABELS: dict[str, str] = {
    "embedding": "embedding",
    "norms": "RMSNorms",
    "qkv_proj": "QKV projection",
    "rotary": "rotary (RoPE)",
    "attention": "attention core",
    "o_proj": "O projection",
    "mlp": "MLP",
    "head": "LM head",
    "sampling": "sampling",
    "engine": "engine (detok, stops)",
    "framework": "framework / Python",
}
ACCOUNTING_LIMIT = 0.10  # the unattributed share a profile may leave and still account for the run


@dataclass(frozen=True)
class ProfileConfig:
    """What to run: `batch` random prompts of `prompt_len` tokens, `gen_len` tokens generated for each (the
    first by the prefill, so gen_len - 1 decode steps), `rounds` plain/instrumented pairs interleaved."""

    batch: int = 1
    prompt_len: int = 128
    gen_len: int = 64
    rounds: int = 3
    warmup_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("batch", 1, 4096),
            ("prompt_len", 1, 1 << 20),
            ("gen_len", 2, 1 << 20),  # at least one decode step
            ("rounds", 1, 100),
            ("warmup_tokens", 0, 1 << 20),
            ("seed", 0, 2**63 - 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"ProfileConfig.{name} must be an int in [{lo}, {hi}], got {value!r}")


# ---- clocks -----------------------------------------------------------------------------------------------------


class _Region:
    """Indices of the timed regions in a step's accumulator (one flat list: hooks stay a few attribute reads)."""

    FORWARD, ALLOCATE, MODEL, EMBED, NORM, HEAD, SAMPLING, ENGINE = range(8)
    TOP = 8
    BLOCK, ATTN_NORM, ATTN, WQKV, ROPE, WO, MLP_NORM, MLP = range(8)
    PER_LAYER = 8

    @staticmethod
    def layer(i: int, part: int) -> int:
        return _Region.TOP + i * _Region.PER_LAYER + part


class _Recorder:
    """Accumulates inclusive seconds per region for the current step. Regions nest properly (a module's post
    hook runs before its parent's), so one stack of start times serves all of them."""

    def __init__(self, n_layers: int, sync: Callable[[], None] | None) -> None:
        self.n = _Region.TOP + n_layers * _Region.PER_LAYER
        self.acc = [0.0] * self.n
        self.calls = [0] * self.n
        self.stack: list[float] = []
        self.layer = 0  # the Block running now (RoPE is a function: its region follows the layer)
        self.in_batch_sampling = False
        self.sync = sync
        self.steps: list[tuple[list[float], list[int]]] = []  # take()n totals of the finished steps

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self.stack.append(time.perf_counter())  # the clock is read last, so the push is not timed

    def stop(self, region: int) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.acc[region] += now - self.stack.pop()
        self.calls[region] += 1

    def take(self) -> tuple[list[float], list[int]]:
        """This step's totals, and a fresh accumulator for the next."""
        if self.stack:
            raise RuntimeError(f"profiler: {len(self.stack)} timed regions were never closed (a forward raised?)")
        acc, calls = self.acc, self.calls
        self.acc, self.calls = [0.0] * self.n, [0] * self.n
        return acc, calls

    def timed(self, fn: Callable, region: int | Callable[[], int]) -> Callable:
        """fn wrapped in a start/stop pair; `region` may be a function of the recorder's state (RoPE's layer)."""
        start, stop = self.start, self.stop

        if callable(region):
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start()
                out = fn(*args, **kwargs)
                stop(region())
                return out
        else:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start()
                out = fn(*args, **kwargs)
                stop(region)
                return out

        return wrapper


def _module_hooks(module: nn.Module, rec: _Recorder, region: int, on_start: Callable[[], None] | None = None) -> list:
    if on_start is None:
        pre = lambda _m, _a: rec.start()  # noqa: E731 - the hooks are the hot path: keep them one call deep
    else:

        def pre(_m: nn.Module, _a: tuple) -> None:
            on_start()
            rec.start()

    post = lambda _m, _a, _o: rec.stop(region)  # noqa: E731
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _model_parts(model: nn.Module) -> None:
    """Refuse a model without the modules the profile hooks, naming what is missing."""
    need = ["embed", "layers", "norm", "lm_head"]
    missing = [n for n in need if not hasattr(model, n)]
    if not missing and len(model.layers):
        block = model.layers[0]
        missing = [f"layers.0.{n}" for n in ("attn_norm", "attn", "mlp_norm", "mlp") if not hasattr(block, n)]
        if not missing:
            missing = [f"layers.0.attn.{n}" for n in ("wqkv", "wo") if not hasattr(block.attn, n)]
    if missing:
        raise ConfigError(
            f"the profiler hooks a rapidlm Transformer; {type(model).__name__} lacks {', '.join(missing)}"
        )


class _Patches:
    """Attribute swaps undone in reverse order on exit, whatever happens: instance attributes that shadow a
    class attribute are deleted again rather than left behind."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, obj: object, name: str, value: Any) -> None:
        own = name in getattr(obj, "__dict__", {})  # else it came from the class: delete ours to uncover it
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append((lambda: setattr(obj, name, old)) if own else (lambda: delattr(obj, name)))

    def add(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextlib.contextmanager
def instrument(llm: Any, rec: _Recorder) -> Iterator[None]:
    """Hooks and wrappers on `llm` (its runner, model and engine) for the duration of the block."""
    runner, engine = llm.runner, llm.engine
    model = runner.model
    _model_parts(model)
    R = _Region
    p = _Patches()
    try:
        handles: list = []
        handles += _module_hooks(model, rec, R.MODEL)
        handles += _module_hooks(model.embed, rec, R.EMBED)
        handles += _module_hooks(model.norm, rec, R.NORM)
        handles += _module_hooks(model.lm_head, rec, R.HEAD)
        for i, block in enumerate(model.layers):

            def enter(i: int = i) -> None:
                rec.layer = i

            handles += _module_hooks(block, rec, R.layer(i, R.BLOCK), on_start=enter)
            handles += _module_hooks(block.attn_norm, rec, R.layer(i, R.ATTN_NORM))
            handles += _module_hooks(block.attn, rec, R.layer(i, R.ATTN))
            handles += _module_hooks(block.attn.wqkv, rec, R.layer(i, R.WQKV))
            handles += _module_hooks(block.attn.wo, rec, R.layer(i, R.WO))
            handles += _module_hooks(block.mlp_norm, rec, R.layer(i, R.MLP_NORM))
            handles += _module_hooks(block.mlp, rec, R.layer(i, R.MLP))
        p.add(lambda: [h.remove() for h in handles])
        # RoPE is a module-level function the attention looks up at call time: wrap it where the model finds it.
        attn_module = sys.modules[type(model.layers[0].attn).__module__] if len(model.layers) else None
        if attn_module is not None and hasattr(attn_module, "apply_rope"):
            p.set(attn_module, "apply_rope",
                  rec.timed(attn_module.apply_rope, lambda: R.layer(rec.layer, R.ROPE)))
        # Compiled and CUDA-graph decode run one graph the hooks cannot see: this pass runs the model eagerly.
        if getattr(runner, "compiled_decode", None) is not None:
            p.set(runner, "compiled_decode", None)
        if getattr(runner, "cuda_graphs", None) is not None:
            p.set(runner, "cuda_graphs", None)
        p.set(runner, "prefill", rec.timed(runner.prefill, R.FORWARD))
        p.set(runner, "decode", rec.timed(runner.decode, R.FORWARD))
        p.set(runner, "allocate", rec.timed(runner.allocate, R.ALLOCATE))
        p.set(engine, "_append", rec.timed(engine._append, R.ENGINE))
        batch_sampler = engine_module.sample_batch

        def sample_batch(logits: torch.Tensor, samplers: list) -> torch.Tensor:
            rec.in_batch_sampling = True  # a per-sequence sample() inside is already in this region
            rec.start()
            try:
                out = batch_sampler(logits, samplers)
            finally:
                rec.in_batch_sampling = False
            rec.stop(R.SAMPLING)
            return out

        p.set(engine_module, "sample_batch", sample_batch)
        yield
    finally:
        p.close()


def _wrap_samplers(seqs: list, rec: _Recorder) -> None:
    """The prefill samples each sequence's first token with its own sampler: time those calls (outside a
    batch call, which times itself)."""
    for seq in seqs:
        sample = seq.sampler.sample

        def timed(logits: torch.Tensor, sample: Callable = sample) -> torch.Tensor:
            if rec.in_batch_sampling:
                return sample(logits)
            rec.start()
            out = sample(logits)
            rec.stop(_Region.SAMPLING)
            return out

        seq.sampler.sample = timed  # the sequence (and its sampler) lives for this run only


# ---- calibration of the instrumentation's own cost --------------------------------------------------------------


@dataclass(frozen=True)
class HookCost:
    """Seconds the instrumentation adds per timed call, measured on no-op callables on this machine:
    `module` for a module with a pre/post hook pair, `function` for a wrapped function."""

    module_s: float
    function_s: float

    def __post_init__(self) -> None:
        for name in ("module_s", "function_s"):
            v = getattr(self, name)
            if not isinstance(v, float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"HookCost.{name} must be a finite float >= 0, got {v!r}")


def calibrate_hooks(calls: int = 4000, repeats: int = 7) -> HookCost:
    """Time a no-op module and a no-op function with and without the profiler's hooks; the least of several
    repeats (the least disturbed by other work on the machine) of the difference per call."""

    class Noop(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def noop(x: torch.Tensor) -> torch.Tensor:
        return x

    x = torch.zeros(1)
    plain, hooked = Noop(), Noop()
    rec = _Recorder(0, None)
    _module_hooks(hooked, rec, _Region.MODEL)
    wrapped = rec.timed(noop, _Region.MODEL)

    def per_call(fn: Callable) -> float:
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                fn(x)
            best = min(best, (time.perf_counter() - t) / calls)
            rec.take()
        return best

    with torch.inference_mode():
        module_s = max(0.0, per_call(hooked) - per_call(plain))
        function_s = max(0.0, per_call(wrapped) - per_call(noop))
    return HookCost(module_s, function_s)


# ---- one profiled run -------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """The instrumented steps of one phase ("prefill": one step per round, all prompts; "decode")."""

    name: str
    wall_s: list[float] = field(default_factory=list)  # per step, clock around the engine's step
    parts_s: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})  # per step, measured
    hook_s: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})  # calibrated cost in it
    layers_s: list[dict[str, float]] = field(default_factory=list)  # per layer, kind -> summed seconds
    costs: dict[str, OpCost] = field(default_factory=dict)  # op kind -> FLOPs/bytes summed over the steps
    tokens: int = 0  # tokens fed through the model in these steps

    @property
    def steps(self) -> int:
        return len(self.wall_s)

    def mean_part(self, kind: str, corrected: bool = False) -> float:
        parts = self.parts_s[kind]
        total = math.fsum(parts) - (math.fsum(self.hook_s[kind]) if corrected else 0.0)
        return total / max(1, len(parts))

    @property
    def mean_wall(self) -> float:
        return math.fsum(self.wall_s) / max(1, len(self.wall_s))


def _step_parts(acc: list[float], calls: list[int], n_layers: int, hook: HookCost) -> tuple[dict, dict, list]:
    """Exclusive seconds per kind for one step from the inclusive region totals; the calibrated cost of the
    hooks of each timed call, charged to the kind that encloses the call (its parent's exclusive time); and the
    per-layer split."""
    R = _Region
    parts = dict.fromkeys(KINDS, 0.0)
    hooks = dict.fromkeys(KINDS, 0.0)
    layers = []
    parts["embedding"] = acc[R.EMBED]
    parts["norms"] = acc[R.NORM]
    parts["head"] = acc[R.HEAD]
    parts["sampling"] = acc[R.SAMPLING]
    parts["engine"] = acc[R.ENGINE]
    blocks = 0.0
    for i in range(n_layers):
        a = acc[R.layer(i, 0) : R.layer(i, 0) + R.PER_LAYER]
        c = calls[R.layer(i, 0) : R.layer(i, 0) + R.PER_LAYER]
        lp = {
            "norms": a[R.ATTN_NORM] + a[R.MLP_NORM],
            "qkv_proj": a[R.WQKV],
            "rotary": a[R.ROPE],
            "attention": a[R.ATTN] - a[R.WQKV] - a[R.WO] - a[R.ROPE],
            "o_proj": a[R.WO],
            "mlp": a[R.MLP],
            "framework": a[R.BLOCK] - a[R.ATTN_NORM] - a[R.ATTN] - a[R.MLP_NORM] - a[R.MLP],
        }
        # Attention's children's hooks run in Attention's own time; the Block's children's in the Block's.
        hooks["attention"] += (c[R.WQKV] + c[R.WO]) * hook.module_s + c[R.ROPE] * hook.function_s
        hooks["framework"] += (c[R.ATTN_NORM] + c[R.ATTN] + c[R.MLP_NORM] + c[R.MLP]) * hook.module_s
        layers.append(lp)
        blocks += a[R.BLOCK]
        for k, v in lp.items():
            parts[k] += v
    model_self = acc[R.MODEL] - acc[R.EMBED] - blocks - acc[R.NORM] - acc[R.HEAD]
    runner_self = acc[R.FORWARD] - acc[R.MODEL]
    parts["framework"] += model_self + runner_self + acc[R.ALLOCATE]
    # The model's children (embed, blocks, norm, head) are called from Transformer.forward; the model itself
    # from the runner: their hooks run in framework time.
    top_calls = calls[R.EMBED] + calls[R.NORM] + calls[R.HEAD] + calls[R.MODEL]
    top_calls += sum(calls[R.layer(i, R.BLOCK)] for i in range(n_layers))
    hooks["framework"] += top_calls * hook.module_s
    return parts, hooks, layers


def _run_steps(llm: Any, prompts: list[list[int]], params: SamplingParams, rec: _Recorder | None) -> list[float]:
    """Run the engine's loop over `prompts`, returning each step's wall time; with a recorder, also leave each
    step's region totals in rec.steps."""
    engine = llm.engine
    seqs = engine.make_sequences(prompts, [params] * len(prompts))
    sync = rec.sync if rec is not None else _sync_for(llm.runner.device)
    if rec is not None:
        _wrap_samplers(seqs, rec)
    walls: list[float] = []
    steps = engine.run(seqs)
    while True:
        if sync is not None:
            sync()
        t = time.perf_counter()
        try:
            next(steps)
        except StopIteration:
            break
        if sync is not None:
            sync()
        walls.append(time.perf_counter() - t)
        if rec is not None:
            rec.steps.append(rec.take())
    return walls


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`batch` different prompts of random token ids, seeded; the lowest ids (special tokens) left out."""
    g = torch.Generator().manual_seed(seed)
    low = min(256, vocab_size // 2)
    return torch.randint(low, vocab_size, (batch, prompt_len), generator=g).tolist()


@dataclass
class Profile:
    """Everything one `rapidlm profile` run measured; report.py renders it, to_dict() is the JSON."""

    model: dict[str, Any]
    config: ProfileConfig
    ceilings: Any  # rapidlm.profile.roofline.Ceilings
    hook_cost: HookCost
    plain_decode_s: list[float]  # un-instrumented decode step times, all rounds
    plain_prefill_s: list[float]  # un-instrumented prefill step (all prompts) per round
    prefill: Phase
    decode: Phase
    notes: list[str]

    # ---- derived views (pure arithmetic over the fields) ----

    def decode_stats(self, plain: bool = True) -> StepStats:
        return step_stats(self.plain_decode_s if plain else self.decode.wall_s)

    def accounting(self, phase: str = "decode") -> dict[str, float]:
        """Parts (each its own clocks) against the step wall time of the same, instrumented, steps; and, less
        the hooks' calibrated cost, against the un-instrumented steps of the plain pass (medians: the passes
        alternate, and a burst of other work on the machine lands in one of them)."""
        ph = self.decode if phase == "decode" else self.prefill
        plain = self.plain_decode_s if phase == "decode" else self.plain_prefill_s
        wall = math.fsum(ph.wall_s)
        parts = math.fsum(math.fsum(v) for v in ph.parts_s.values())
        corrected = [sum(ph.parts_s[k][i] - ph.hook_s[k][i] for k in KINDS) for i in range(ph.steps)]
        return {
            "steps": ph.steps,
            "wall_s": wall,
            "parts_s": parts,
            "unattributed_s": wall - parts,
            "unattributed_share": (wall - parts) / wall if wall > 0 else 0.0,
            "instrumented_step_s": wall / max(1, ph.steps),
            "plain_step_s": math.fsum(plain) / max(1, len(plain)),
            "plain_step_p50_s": statistics.median(plain) if plain else 0.0,
            "instrumented_step_p50_s": statistics.median(ph.wall_s) if ph.wall_s else 0.0,
            "corrected_parts_step_p50_s": statistics.median(corrected) if corrected else 0.0,
        }

    @property
    def prefill_time_s(self) -> float:
        """Un-instrumented prefill of all prompts (one step), mean over the rounds."""
        return math.fsum(self.plain_prefill_s) / max(1, len(self.plain_prefill_s))

    def hook_overhead(self) -> float:
        """How much slower the median instrumented decode step is than the median plain one (a fraction)."""
        plain = statistics.median(self.plain_decode_s)
        return statistics.median(self.decode.wall_s) / plain - 1 if plain > 0 else 0.0

    def shares(self, phase: str = "decode", corrected: bool = True) -> dict[str, float]:
        """Each part's share of the step. corrected: less the hooks' calibrated cost, over the sum of the
        corrected parts and the unattributed remainder (what a plain step is made of); else as measured, over
        the instrumented wall time."""
        ph = self.decode if phase == "decode" else self.prefill
        parts = {k: ph.mean_part(k, corrected) for k in KINDS}
        rest = ph.mean_wall - sum(ph.mean_part(k) for k in KINDS)
        denom = sum(parts.values()) + rest
        out = {k: v / denom for k, v in parts.items()}
        out["unattributed"] = rest / denom
        return out

    def ops(self, phase: str = "decode") -> list[dict[str, Any]]:
        """Per op kind: FLOPs and bytes per step, measured time (corrected), achieved rates and the roofline."""
        from rapidlm.profile.roofline import op_time_s

        ph = self.decode if phase == "decode" else self.prefill
        c = self.ceilings
        rows = []
        for kind in OP_KINDS:
            cost = ph.costs.get(kind)
            t = ph.mean_part(kind, corrected=True)
            if cost is None or ph.steps == 0:
                continue
            flops, nbytes = cost.flops / ph.steps, cost.bytes / ph.steps
            # RoPE and attention compute in the attention dtype (fp32 on CPU, also over an int8 cache)
            dtype = _roof_dtype(c, self.model["attention_dtype"] if kind in ("rotary", "attention")
                                else self.model["dtype"])
            peak = _peak(c, dtype)
            intensity = flops / nbytes if nbytes else math.inf
            roof = min(peak, intensity * c.bandwidth_gbs) if math.isfinite(intensity) else peak
            gflops = flops / t / 1e9 if t > 0 else 0.0
            gbs = nbytes / t / 1e9 if t > 0 else 0.0
            rows.append({
                "kind": kind,
                "flops": flops,
                "bytes": nbytes,
                "time_s": t,
                "intensity": intensity,
                "gflops": gflops,
                "gbs": gbs,
                "roof_gflops": roof,
                "roof_share": gflops / roof if roof > 0 else 0.0,
                "bandwidth_share": gbs / c.bandwidth_gbs if c.bandwidth_gbs > 0 else 0.0,
                "bound": "compute" if intensity * c.bandwidth_gbs >= peak else "memory",
                "dtype": dtype,
                "roofline_time_s": op_time_s(OpCost(flops, nbytes), c, dtype),
            })
        return rows

    def bottleneck(self) -> str:
        """One sentence: what bounds a decode step and how much of it is overhead."""
        return bottleneck_sentence(self)

    def to_dict(self) -> dict[str, Any]:
        acc = self.accounting("decode")
        return {
            "schema": "rapidlm.profile/1",
            "model": self.model,
            "config": asdict(self.config),
            "ceilings": asdict(self.ceilings) if hasattr(self.ceilings, "__dataclass_fields__") else dict(
                vars(self.ceilings)),
            "bottleneck": self.bottleneck(),
            "decode": {
                "steps": self.decode.steps,
                "step_stats": self.decode_stats(plain=True).to_dict(),
                "instrumented_step_stats": self.decode_stats(plain=False).to_dict(),
                "step_times_s": self.plain_decode_s,
                "instrumented_step_times_s": self.decode.wall_s,
                "parts_s": {k: self.decode.mean_part(k) for k in KINDS},
                "parts_corrected_s": {k: self.decode.mean_part(k, corrected=True) for k in KINDS},
                "shares": self.shares("decode"),
                "shares_measured": self.shares("decode", corrected=False),
                "layers_s": [{k: v / max(1, self.decode.steps) for k, v in lp.items()} for lp in self.decode.layers_s],
                "ops": self.ops("decode"),
                "accounting": acc,
            },
            "prefill": {
                "rounds": self.prefill.steps,
                "tokens": self.prefill.tokens // max(1, self.prefill.steps),
                "time_s": self.prefill_time_s,
                "instrumented_time_s": self.prefill.mean_wall,
                "parts_s": {k: self.prefill.mean_part(k) for k in KINDS},
                "shares": self.shares("prefill"),
                "layers_s": [{k: v / max(1, self.prefill.steps) for k, v in lp.items()}
                             for lp in self.prefill.layers_s],
                "ops": self.ops("prefill"),
                "accounting": self.accounting("prefill"),
            },
            "instrumentation": {
                "hook_overhead": self.hook_overhead(),
                "module_hook_s": self.hook_cost.module_s,
                "function_wrapper_s": self.hook_cost.function_s,
                "calibrated_cost_per_decode_step_s": math.fsum(
                    self.decode.mean_part(k) - self.decode.mean_part(k, True) for k in KINDS),
            },
            "notes": self.notes,
        }


def _roof_dtype(ceilings: Any, dtype: str) -> str:
    """The dtype whose peak applies: itself if the ceilings have it, else the nearest they do have."""
    peaks = ceilings.flops_gflops
    for candidate in (dtype, "bfloat16" if dtype == "float16" else dtype, "float32"):
        if candidate in peaks:
            return candidate
    return max(peaks, key=peaks.get)


def _peak(ceilings: Any, dtype: str) -> float:
    peaks = ceilings.flops_gflops
    if dtype in peaks:
        return peaks[dtype]
    return peaks.get("float32", max(peaks.values()))


def bottleneck_sentence(p: Profile) -> str:
    ops = p.ops("decode")
    shares = p.shares("decode")
    overhead = sum(shares[k] for k in OVERHEAD_KINDS)
    flops = sum(o["flops"] for o in ops)
    nbytes = sum(o["bytes"] for o in ops)
    # Step and op times from the same (instrumented) steps, the hooks' calibrated cost removed, so "the step"
    # and "in the ops" compare like with like.
    d = p.decode
    step = sum(d.mean_part(k, corrected=True) for k in KINDS) + d.mean_wall - sum(d.mean_part(k) for k in KINDS)
    op_time = sum(o["time_s"] for o in ops)
    c = p.ceilings
    bw_step = nbytes / step / 1e9 / c.bandwidth_gbs if step > 0 else 0.0  # over the whole step
    bw_ops = nbytes / op_time / 1e9 / c.bandwidth_gbs if op_time > 0 else 0.0  # while in the ops
    peak = _peak(c, _roof_dtype(c, p.model["dtype"]))
    intensity = flops / nbytes if nbytes else math.inf
    ridge = peak / c.bandwidth_gbs
    roof_time = sum(o["roofline_time_s"] for o in ops)
    slower = f"{op_time / roof_time:.1f}x their roofline time" if roof_time > 0 else "no roofline time"
    top = max(OP_KINDS, key=lambda k: shares[k])
    tail = (f"{100 * overhead:.0f}% of each step is framework and Python overhead, and the largest op is the "
            f"{KIND_LABELS[top]} ({100 * shares[top]:.0f}%).")
    if intensity >= ridge:
        rate = flops / step / 1e9 / peak if step > 0 else 0.0
        return (f"decode is compute-bound ({intensity:.1f} FLOP/byte, ridge {ridge:.1f}) at {100 * rate:.0f}% of "
                f"the {p.model['dtype']} peak (its ops take {slower}); {tail}")
    if overhead >= 0.5:
        return (f"decode is overhead-bound: its ops, memory-bound at {intensity:.1f} FLOP/byte, reach "
                f"{100 * bw_ops:.0f}% of bandwidth ({slower}), but {tail}")
    return (f"decode is memory-bound ({intensity:.1f} FLOP/byte, ridge {ridge:.1f}) at {100 * bw_step:.0f}% of "
            f"bandwidth ({100 * bw_ops:.0f}% inside the ops, which take {slower}); {tail}")


def _load_average() -> float:
    """1-minute load average (0 where the OS has none): was the machine shared while we timed it?"""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0


def _model_info(llm: Any) -> dict[str, Any]:
    runner = llm.runner
    model = runner.model
    recipe = getattr(llm, "recipe", None)
    params = _count_params(model, runner.cfg.tie_word_embeddings)
    return {
        "name": getattr(llm.model_path, "name", str(llm.model_path)),
        "path": str(llm.model_path),
        "architecture": runner.cfg.architecture,
        "layers": len(model.layers),
        "hidden_size": runner.cfg.hidden_size,
        "parameters": params,
        "device": runner.device.type,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "kv_dtype": "int8" if runner.kv_int8 else str(runner.kv_dtype).removeprefix("torch."),
        "attention_dtype": str(runner.kv_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "quantization": _recipe_name(recipe),
        "linears": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(("wqkv", "wo", "w_down"))}),
        "compiled": getattr(runner, "compiled_decode", None) is not None,
        "cuda_graphs": getattr(runner, "cuda_graphs", None) is not None,
    }


def _count_params(model: nn.Module, tied: bool) -> int:
    """Weights as the model's shapes count them: packed int4/int8 linears keep codes in buffers, not parameters,
    so their in x out is counted instead of their storage."""
    total = model.embed.weight.numel()
    copies = [name + "." for name, m in model.named_modules() if type(m).__name__ == "DenseCopyLinear"]
    for name, m in model.named_modules():
        if name == "lm_head" and tied or name.startswith(tuple(copies)):  # a DenseCopyLinear counts once
            continue
        if hasattr(m, "in_features") and hasattr(m, "out_features"):
            total += m.in_features * m.out_features + (m.bias.numel() if getattr(m, "bias", None) is not None else 0)
        elif hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 1:  # norms
            total += m.weight.numel()
    return total


def _recipe_name(recipe: Any) -> str | None:
    if recipe is None:
        return None
    for attr in ("name", "label"):
        if isinstance(getattr(recipe, attr, None), str):
            return getattr(recipe, attr)
    return type(recipe).__name__


def ceilings_for(device: torch.device, hardware: str = "auto", remeasure: bool = False) -> Any:
    """The roof to profile against: `hardware` by name (rapidlm.profile.roofline.hardware_names()), or "auto":
    this CPU measured (cached) for a CPU run, the datasheet entry whose name the GPU's name contains (longest
    match first: "H100 PCIe" before "H100") for a CUDA run."""
    from rapidlm.profile import roofline

    if hardware != "auto":
        return roofline.get_hardware(hardware, remeasure=remeasure)
    if device.type != "cuda":
        return roofline.load_ceilings(remeasure=remeasure)
    gpu = torch.cuda.get_device_name(device).lower().replace(" ", "-")
    for name in sorted(roofline.HARDWARE, key=len, reverse=True):
        if roofline.HARDWARE[name].device == "cuda" and name in gpu:
            return roofline.HARDWARE[name]
    raise ConfigError(
        f"no datasheet ceilings for GPU {torch.cuda.get_device_name(device)!r}: pass --hardware with one of "
        f"{', '.join(n for n in roofline.hardware_names() if n != roofline.CPU_HERE)}"
    )


def profile(llm: Any, config: ProfileConfig, ceilings: Any, hook_cost: HookCost | None = None) -> Profile:
    """Profile generation with a loaded `rapidlm.LLM` (any model it loads: quantized, pruned, distilled)."""
    runner = llm.runner
    cfg = config
    if cfg.prompt_len + cfg.gen_len > llm.max_model_len:
        raise ConfigError(
            f"prompt_len + gen_len = {cfg.prompt_len + cfg.gen_len} exceeds the model's context "
            f"({llm.max_model_len}); lower ProfileConfig.prompt_len or gen_len"
        )
    prompts = random_prompts(runner.cfg.vocab_size, cfg.batch, cfg.prompt_len, cfg.seed)
    params = SamplingParams(temperature=0.0, max_tokens=cfg.gen_len, ignore_eos=True)
    hook_cost = hook_cost or calibrate_hooks()
    n_layers = len(runner.model.layers)
    notes: list[str] = []
    model_info = _model_info(llm)
    if model_info["compiled"] or model_info["cuda_graphs"]:
        what = "torch.compile" if model_info["compiled"] else "CUDA graphs"
        notes.append(f"decode ran with {what} in the plain pass; the instrumented pass ran it eagerly (hooks "
                     "cannot see inside a graph), so the breakdown describes the eager step")
    if runner.device.type == "cuda":
        notes.append("on the GPU every clock read of the instrumented pass waits for the GPU (synchronize): each part "
                     "is its kernels' time plus their launches, without the overlap of CPU and GPU work")

    load_before = _load_average()
    # Warm-up, plain and instrumented alike: allocator growth, kernel builds, first-call costs stay out.
    sync = _sync_for(runner.device)
    if cfg.warmup_tokens:
        warm = SamplingParams(temperature=0.0, max_tokens=cfg.warmup_tokens + 1, ignore_eos=True)
        _run_steps(llm, prompts, warm, None)
        rec = _Recorder(n_layers, sync)
        with instrument(llm, rec):
            _run_steps(llm, prompts, warm, rec)

    prefill, decode = Phase("prefill"), Phase("decode")
    plain_decode: list[float] = []
    plain_prefill: list[float] = []
    for _ in range(cfg.rounds):
        walls = _run_steps(llm, prompts, params, None)
        plain_prefill.append(walls[0])
        plain_decode.extend(walls[1:])
        rec = _Recorder(n_layers, sync)
        with instrument(llm, rec):
            walls = _run_steps(llm, prompts, params, rec)
        for i, (wall, (acc, calls)) in enumerate(zip(walls, rec.steps)):
            ph = prefill if i == 0 else decode
            parts, hooks, layers = _step_parts(acc, calls, n_layers, hook_cost)
            ph.wall_s.append(wall)
            for k in KINDS:
                ph.parts_s[k].append(parts[k])
                ph.hook_s[k].append(hooks[k])
            if not ph.layers_s:
                ph.layers_s = [dict.fromkeys(LAYER_KINDS, 0.0) for _ in range(n_layers)]
            for total, lp in zip(ph.layers_s, layers):
                for k, v in lp.items():
                    total[k] += v

    load = max(load_before, _load_average())
    cpus = os.cpu_count() or 1
    if runner.device.type == "cpu" and load > model_info["threads"] + 1:  # we account for `threads` of it
        notes.append(f"the machine was busy: load average {load:.1f} on {cpus} CPUs while profiling (other "
                     "processes competed for the cores), so step times vary more and run slower than alone")

    # FLOPs and bytes of the very steps timed: each prompt's prefill, then decode steps over growing caches.
    act = dtype_bytes(runner.dtype)
    kv = 1 if runner.kv_int8 else dtype_bytes(runner.kv_dtype)
    model = runner.model
    pre = step_costs(model, 1, cfg.prompt_len, cfg.prompt_len, act, kv)
    prefill.costs = {k: c * (cfg.batch * cfg.rounds) for k, c in pre.items()}
    prefill.tokens = cfg.batch * cfg.prompt_len * cfg.rounds
    dec: dict[str, OpCost] = {}
    for step in range(1, cfg.gen_len):
        for k, c in step_costs(model, cfg.batch, 1, cfg.prompt_len + step, act, kv).items():
            dec[k] = dec[k] + c if k in dec else c
    decode.costs = {k: c * cfg.rounds for k, c in dec.items()}
    decode.tokens = cfg.batch * (cfg.gen_len - 1) * cfg.rounds
    result = Profile(model_info, config, ceilings, hook_cost, plain_decode, plain_prefill, prefill, decode, notes)
    above = [f"{KIND_LABELS[o['kind']]} ({phase}, {100 * o['roof_share']:.0f}%)"
             for phase in ("decode", "prefill") for o in result.ops(phase) if o["roof_share"] > 1.1]
    if above:
        notes.append(f"above the roof: {', '.join(above)}. A roof an op beats is too low: measured while the "
                     "machine was busy (measure again with --remeasure when it is quiet), or set by a slower "
                     "kernel than the op's own (the 2048^3 GEMM sets the FLOP/s roof, a read + write copy the "
                     "bandwidth roof, which a read-only stream can beat)")
    return result

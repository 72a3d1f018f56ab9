"""Typed configs for every compression step, validated on construction; errors name the field.

A config says *what* to do; rapidlm.compress.quantize says *how*. Recipes (rapidlm.compress.recipe) are lists of
these configs, read from YAML/JSON or from a shorthand such as "int4-g128-gptq".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from rapidlm.errors import ConfigError

LM_HEAD_MODES = ("keep", "int8")  # the output head: left in the model dtype, or int8 per output channel
# W8A8 may also run the head as W8A8 (int8 weights and per-token int8 activations): its largest matmul.
W8A8_LM_HEAD_MODES = (*LM_HEAD_MODES, "w8a8")

# WikiText-2 validation beside a source checkout (../shared/data), the project's calibration/evaluation text.
# An installed package has no such file: then a recipe that calibrates must name its data.
_SHARED_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_CALIBRATION_DATA = str(_SHARED_TEXT) if _SHARED_TEXT.is_file() else ""


def _check_choice(cls: str, name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{cls}.{name} must be one of {list(choices)}, got {value!r}")


def _check_number(cls: str, name: str, value: object, lo: float, hi: float, integer: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (lo <= value <= hi):
        kind = "an int" if integer else "a number"
        raise ConfigError(f"{cls}.{name} must be {kind} in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class Calibration:
    """Calibration text: `samples` windows of `seq_len` tokens drawn (seeded) from a region of a text file.

    `region` is a (start, end) fraction of the file's tokens; the default, the second half, leaves the first
    half for evaluation so calibration never sees the text its perplexity is measured on.
    """

    data: str = DEFAULT_CALIBRATION_DATA
    samples: int = 64
    seq_len: int = 512
    region: tuple[float, float] = (0.5, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.data, (str, Path)):
            raise ConfigError(f"Calibration.data must be a path to a text file, got {self.data!r}")
        _check_number("Calibration", "samples", self.samples, 1, 100_000, integer=True)
        _check_number("Calibration", "seq_len", self.seq_len, 2, 1_000_000, integer=True)
        _check_number("Calibration", "seed", self.seed, 0, 2**63 - 1, integer=True)
        region = tuple(self.region) if isinstance(self.region, (list, tuple)) else None
        if region is None or len(region) != 2 or not all(isinstance(r, (int, float)) for r in region):
            raise ConfigError(f"Calibration.region must be [start, end] fractions, got {self.region!r}")
        if not 0 <= region[0] < region[1] <= 1:
            raise ConfigError(f"Calibration.region must satisfy 0 <= start < end <= 1, got {list(region)}")
        object.__setattr__(self, "region", (float(region[0]), float(region[1])))


@dataclass(frozen=True)
class Int8WeightOnly:
    """int8 weights, symmetric, one scale per output channel; activations stay in the model dtype."""

    lm_head: str = "int8"

    def __post_init__(self) -> None:
        _check_choice("Int8WeightOnly", "lm_head", self.lm_head, LM_HEAD_MODES)


INT4_METHODS = ("rtn", "gptq", "awq")
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Int4WeightOnly:
    """4-bit weights in groups along the input dimension, chosen by round-to-nearest, GPTQ or AWQ.

    gptq: error-compensating quantization, column by column, from the Hessian of calibration inputs
    (Frantar et al., 2022); `damp` is the fraction of the mean Hessian diagonal added for stability, and
    `act_order` quantizes the columns with the largest Hessian diagonal first (with group parameters fixed
    beforehand, "static groups", so the stored layout stays in the original column order).
    awq: activation-aware per-input-channel scaling searched on calibration inputs, folded into the op before
    (Lin et al., 2023), then round-to-nearest; `awq_grid` is the number of exponents tried in [0, 1).
    """

    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    damp: float = 0.01
    act_order: bool = False
    awq_grid: int = 20
    lm_head: str = "int8"

    def __post_init__(self) -> None:
        _check_choice("Int4WeightOnly", "group_size", self.group_size, INT4_GROUP_SIZES)
        _check_choice("Int4WeightOnly", "symmetric", self.symmetric, (True, False))
        _check_choice("Int4WeightOnly", "method", self.method, INT4_METHODS)
        _check_number("Int4WeightOnly", "damp", self.damp, 0.0, 1.0)
        _check_choice("Int4WeightOnly", "act_order", self.act_order, (True, False))
        _check_number("Int4WeightOnly", "awq_grid", self.awq_grid, 1, 1000, integer=True)
        _check_choice("Int4WeightOnly", "lm_head", self.lm_head, LM_HEAD_MODES)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"


@dataclass(frozen=True)
class W8A8Dynamic:
    """int8 weights (per output channel) and int8 activations quantized per token at run time.

    smoothquant_alpha: if set, migrate activation outliers into the weights first (Xiao et al., 2023):
    per input channel s = max|X|^alpha / max|W|^(1 - alpha), X / s folded into the preceding norm or linear.
    lm_head: "w8a8" (default; the head is not smoothed: a tied head shares its matrix with the embedding),
    "int8" (weight-only) or "keep".
    """

    smoothquant_alpha: float | None = None
    lm_head: str = "w8a8"

    def __post_init__(self) -> None:
        if self.smoothquant_alpha is not None:
            _check_number("W8A8Dynamic", "smoothquant_alpha", self.smoothquant_alpha, 0.0, 1.0)
        _check_choice("W8A8Dynamic", "lm_head", self.lm_head, W8A8_LM_HEAD_MODES)

    @property
    def needs_calibration(self) -> bool:
        return self.smoothquant_alpha is not None


@dataclass(frozen=True)
class KVCacheInt8:
    """Keys and values stored as int8 with one fp32 scale per (token, kv head): 4x smaller than fp32."""


@dataclass(frozen=True)
class Native:
    """Run a GGUF file's Q4_0/Q4_1 (int4) and Q8_0 (int8) tensors as stored: no dequantize/requantize loss."""


@dataclass(frozen=True)
class Dequantized:
    """Load every tensor dequantized to the run dtype: the unquantized reference a compression is judged by."""


PRUNE_SCOPES = ("layer", "global")
NM_SCORES = ("wanda", "magnitude")


@dataclass(frozen=True)
class Magnitude:
    """Zero the block weights whose |w| is at or below the threshold that gives `sparsity`, per projection
    (scope "layer": q, k, v, o, gate, up, down each reach it) or over all of them at once ("global")."""

    sparsity: float
    scope: str = "layer"

    def __post_init__(self) -> None:
        _check_number("Magnitude", "sparsity", self.sparsity, 0.0, 1.0)
        _check_choice("Magnitude", "scope", self.scope, PRUNE_SCOPES)


@dataclass(frozen=True)
class Wanda:
    """Zero the `sparsity` fraction of each output row with the lowest |W_ij| * ||X_j|| (calibration norms)."""

    sparsity: float

    def __post_init__(self) -> None:
        _check_number("Wanda", "sparsity", self.sparsity, 0.0, 1.0)

    @property
    def needs_calibration(self) -> bool:
        return True


@dataclass(frozen=True)
class SemiStructured:
    """N:M sparsity: in every M consecutive inputs of a row keep the N highest scores (Wanda or magnitude)."""

    n: int = 2
    m: int = 4
    score: str = "wanda"

    def __post_init__(self) -> None:
        _check_number("SemiStructured", "m", self.m, 2, 64, integer=True)
        _check_number("SemiStructured", "n", self.n, 1, self.m - 1, integer=True)
        _check_choice("SemiStructured", "score", self.score, NM_SCORES)

    @property
    def needs_calibration(self) -> bool:
        return self.score == "wanda"


@dataclass(frozen=True)
class Structured:
    """Remove, least important first: `heads` KV groups per layer (each with its query heads), `ffn_channels`
    MLP channels per layer and `layers` whole layers. The result is a smaller dense model."""

    heads: int = 0
    ffn_channels: int = 0
    layers: int = 0

    def __post_init__(self) -> None:
        for name in ("heads", "ffn_channels", "layers"):
            _check_number("Structured", name, getattr(self, name), 0, 1 << 20, integer=True)
        if not (self.heads or self.ffn_channels or self.layers):
            raise ConfigError("Structured removes nothing: set heads, ffn_channels or layers")

    @property
    def needs_calibration(self) -> bool:
        return True


PRUNE_STEPS = (Magnitude, Wanda, SemiStructured, Structured)


StepConfig = (
    Int8WeightOnly
    | Int4WeightOnly
    | W8A8Dynamic
    | KVCacheInt8
    | Native
    | Dequantized
    | Magnitude
    | Wanda
    | SemiStructured
    | Structured
)

# Recipe step type name -> config class. Explicit, so a typo is an error rather than a guess.
STEP_TYPES: dict[str, type] = {
    "int8_weight_only": Int8WeightOnly,
    "int4_weight_only": Int4WeightOnly,
    "w8a8_dynamic": W8A8Dynamic,
    "kv_cache_int8": KVCacheInt8,
    "native": Native,
    "dequantized": Dequantized,
    "magnitude": Magnitude,
    "wanda": Wanda,
    "semi_structured": SemiStructured,
    "structured": Structured,
}
STEP_NAMES: dict[type, str] = {cls: name for name, cls in STEP_TYPES.items()}


def step_to_dict(step: StepConfig) -> dict:
    """{'type': name, field: value, ...}: the form recipes and manifests store."""
    out: dict = {"type": STEP_NAMES[type(step)]}
    for f in fields(step):
        out[f.name] = getattr(step, f.name)
    return out


@dataclass(frozen=True)
class Recipe:
    """An ordered list of compression steps plus the calibration text they may need."""

    steps: tuple[StepConfig, ...]
    calibration: Calibration = field(default_factory=Calibration)
    name: str = ""

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError("Recipe.steps is empty: give at least one step")
        kinds = [type(s) for s in self.steps]
        weight_kinds = [k for k in kinds if k is not KVCacheInt8 and k not in PRUNE_STEPS]
        prune_at = [i for i, k in enumerate(kinds) if k in PRUNE_STEPS]
        if prune_at:
            if Native in kinds:
                raise ConfigError("Recipe.steps prunes a native GGUF model: pruning needs float weights (drop native)")
            first_weight = next((i for i, k in enumerate(kinds) if k in weight_kinds), len(kinds))
            if prune_at[-1] > first_weight:
                raise ConfigError("Recipe.steps prunes after quantizing: list pruning steps first")
        if len(weight_kinds) > 1:
            names = ", ".join(STEP_NAMES[k] for k in weight_kinds)
            raise ConfigError(f"Recipe.steps quantizes the weights more than once ({names}); keep one")
        if kinds.count(KVCacheInt8) > 1:
            raise ConfigError("Recipe.steps lists kv_cache_int8 twice")

    @property
    def weight_step(self) -> StepConfig | None:
        """The quantization (or load-format) step, if any: not KV-cache int8, not pruning."""
        for s in self.steps:
            if not isinstance(s, (KVCacheInt8, *PRUNE_STEPS)):
                return s
        return None

    @property
    def prune_steps(self) -> tuple[StepConfig, ...]:
        return tuple(s for s in self.steps if isinstance(s, PRUNE_STEPS))

    @property
    def kv_int8(self) -> bool:
        return any(isinstance(s, KVCacheInt8) for s in self.steps)

    @property
    def native(self) -> bool:
        return isinstance(self.weight_step, Native)

    @property
    def needs_calibration(self) -> bool:
        return any(getattr(s, "needs_calibration", False) for s in self.steps)

    def to_dict(self) -> dict:
        cal = self.calibration
        return {
            "name": self.name,
            "steps": [step_to_dict(s) for s in self.steps],
            "calibration": {
                "data": str(cal.data),
                "samples": cal.samples,
                "seq_len": cal.seq_len,
                "region": list(cal.region),
                "seed": cal.seed,
            },
        }

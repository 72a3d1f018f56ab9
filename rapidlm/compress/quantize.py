"""`quantize(model, config, calibration)`: a pure transform that swaps a loaded model's linears for quantized
modules. The model code knows nothing of it; the runtime runs whatever modules the model has.

Which linears: every projection of every block (fused q|k|v, o, fused gate|up, down) and, per the config's
`lm_head`, the output head. The token embedding stays in the model dtype (it is a gather, not a matmul).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rapidlm.compress.awq import awq_search_scale
from rapidlm.compress.calibration import collect_input_stats
from rapidlm.compress.configs import Int4WeightOnly, Int8WeightOnly, W8A8Dynamic
from rapidlm.compress.gptq import gptq_quantize
from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight
from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight
from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear
from rapidlm.compress.primitives import QuantSpec, choose_qparams
from rapidlm.compress.primitives import quantize as quantize_codes
from rapidlm.compress.smoothing import fold_scale, scale_sites, smoothquant_scale
from rapidlm.errors import ConfigError

Progress = Callable[[int, int], None]


@dataclass
class QuantizeReport:
    method: str
    swapped: list[str] = field(default_factory=list)  # module names now quantized
    notes: dict[str, float] = field(default_factory=dict)  # e.g. AWQ's chosen exponent per site
    # Portable copies of the quantized weights (for saving), kept only when quantize(keep_weights=True):
    # name -> (kind, weight), kind "int4" (Int4Weight), "int8" (Int8Weight) or "w8a8" (Int8Weight per channel).
    weights: dict[str, tuple[str, object]] = field(default_factory=dict)
    keep_weights: bool = False
    tied_embedding: bool = False  # the embedding table equals the int8 head's dequantized weights
    pruning: list = field(default_factory=list)  # rapidlm.compress.prune.PruneReport of each pruning step, in order

    def record(self, name: str, kind: str, weight: object) -> None:
        self.swapped.append(name)
        if self.keep_weights:
            self.weights[name] = (kind, weight)


def block_linears(model: nn.Module) -> list[str]:
    """Names of the projections inside the transformer blocks, in execution order."""
    return [
        name
        for name, m in model.named_modules()
        if name.startswith("layers.") and type(m) is nn.Linear  # exactly nn.Linear: not already quantized
    ]


def int8_weight(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 of w (N, K)."""
    spec = QuantSpec(8, None, symmetric=True)
    w = w.detach().float()
    scale, offset = choose_qparams(w, spec)
    codes = quantize_codes(w, scale, offset, spec)
    return Int8Weight((codes.to(torch.int16) - 128).to(torch.int8), scale, w.shape[1])


# CUDA (issue 7): weights quantized on a GPU run rapidlm's CUDA modules (rapidlm.compress.kernels.cuda_linear).
def _int8_linear(w8: Int8Weight, bias: torch.Tensor | None) -> nn.Module:
    if w8.q.is_cuda:
        from rapidlm.compress.kernels.cuda_linear import CudaInt8Linear

        return CudaInt8Linear(w8, bias)
    return Int8Linear(w8, bias)


def _int4_linear(w4: Int4Weight, bias: torch.Tensor | None) -> nn.Module:
    if w4.q.is_cuda:
        from rapidlm.compress.kernels.cuda_linear import CudaInt4Linear

        return CudaInt4Linear(w4, bias)
    return Int4Linear(w4, bias)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _bias(lin: nn.Linear) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias.detach().float()


def _check_float_model(model: nn.Module, names: list[str]) -> None:
    if not names:
        raise ConfigError(
            "the model has no float nn.Linear projections to quantize: it is already quantized "
            "(e.g. a GGUF loaded natively); load it dequantized (quantization=None, dtype float32) first"
        )


def _head(model: nn.Module, mode: str, report: QuantizeReport) -> None:
    if mode in ("int8", "w8a8") and type(model.lm_head) is nn.Linear:
        w8 = int8_weight(model.lm_head.weight)
        bias = _bias(model.lm_head)
        _swap(model, "lm_head", _int8_linear(w8, bias) if mode == "int8" else W8A8Linear(w8.q, w8.scale[:, 0], bias))
        report.record("lm_head", mode, w8)
        if model.cfg.tie_word_embeddings:
            # Tied weights stay tied: the embedding table becomes the int8 head's values too (as llama.cpp's
            # one Q8_0 token_embd serves both), so a saved model stores the matrix once, as int8.
            model.embed.weight.data = w8.dequantize().to(model.embed.weight.dtype)
            report.tied_embedding = True


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: Int8WeightOnly | Int4WeightOnly | W8A8Dynamic,
    calibration: list[list[int]] | None = None,
    progress: Progress | None = None,
    keep_weights: bool = False,
) -> QuantizeReport:
    """Quantize `model` (a float rapidlm Transformer, ideally fp32) in place; `calibration` is a list of token
    id windows, needed by GPTQ, AWQ and SmoothQuant. keep_weights: also return portable copies (for saving)."""
    names = block_linears(model)
    _check_float_model(model, names)
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda and (isinstance(config, W8A8Dynamic) or getattr(config, "lm_head", None) == "w8a8"):
        raise ConfigError("W8A8 runs on the CPU only; on CUDA use int8 or int4 weight-only quantization")
    if getattr(config, "needs_calibration", False) and not calibration:
        raise ConfigError(f"{type(config).__name__} as configured needs calibration samples; none were given")
    if isinstance(config, Int8WeightOnly):
        report = QuantizeReport("int8_weight_only", keep_weights=keep_weights)
        for name in names:
            lin = model.get_submodule(name)
            w8 = int8_weight(lin.weight)
            _swap(model, name, _int8_linear(w8, _bias(lin)))
            report.record(name, "int8", w8)
    elif isinstance(config, Int4WeightOnly):
        report = _int4(model, config, names, calibration, progress, keep_weights)
    elif isinstance(config, W8A8Dynamic):
        report = _w8a8(model, config, names, calibration, progress, keep_weights)
    else:
        raise ConfigError(f"quantize() does not apply {type(config).__name__}; it is a load or engine option")
    _head(model, config.lm_head, report)
    return report


def int4_group_for(k: int, group_size: int) -> int:
    """`group_size` if it divides the K inputs, else the largest smaller supported group that does.

    SmolLM2's hidden size 576 = 4.5 x 128, so at "g128" its q|k|v, o and gate|up use groups of 64 (only
    down_proj, K = 1536, gets 128): the same fallback llama.cpp makes when a row does not fit a block format.
    """
    for g in (group_size, 64, 32):
        if g <= group_size and k % g == 0:
            return g
    raise ConfigError(f"no int4 group size <= {group_size} among (32, 64, 128) divides the {k} inputs of a linear")


def _int4(
    model: nn.Module,
    config: Int4WeightOnly,
    names: list[str],
    calibration: list[list[int]] | None,
    progress: Progress | None,
    keep_weights: bool,
) -> QuantizeReport:
    report = QuantizeReport(f"int4_weight_only/{config.method}/g{config.group_size}", keep_weights=keep_weights)
    specs = {}
    for name in names:
        k = model.get_submodule(name).in_features
        group = int4_group_for(k, config.group_size)
        if group != config.group_size:
            report.notes[f"{name}.group_size"] = group
        specs[name] = QuantSpec(4, group, config.symmetric)
    hessians = {}
    if config.method == "awq":
        sites = scale_sites(model)
        site_linears = [n for s in sites for n in s.linears]
        stats = collect_input_stats(model, site_linears, calibration, sample_rows=512, progress=progress)
        for site in sites:
            st = stats[site.linears[0]]
            weights = [model.get_submodule(n).weight for n in site.linears]
            spec = specs[site.linears[0]]
            s, a, rel = awq_search_scale(weights, st.sample(), st.abs_mean, spec, config.awq_grid)
            fold_scale(model, site, s)
            report.notes[f"{site.linears[0]}.alpha"] = a
            report.notes[f"{site.linears[0]}.rel_mse"] = rel
    elif config.method == "gptq":
        stats = collect_input_stats(model, names, calibration, want_hessian=True, progress=progress)
        hessians = {n: stats[n].hessian for n in names}
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        w = lin.weight.detach().float()
        spec = specs[name]
        if config.method == "gptq":
            codes, scale, offset = gptq_quantize(w, hessians.pop(name), spec, config.damp, config.act_order)
        else:
            scale, offset = choose_qparams(w, spec)
            codes = quantize_codes(w, scale, offset, spec)
        w4 = Int4Weight(codes, scale, offset, spec.group_size)
        _swap(model, name, _int4_linear(w4, _bias(lin)))
        report.record(name, "int4", w4)
        if progress is not None and config.method == "gptq":
            progress(i + 1, len(names))
    return report


def _w8a8(
    model: nn.Module,
    config: W8A8Dynamic,
    names: list[str],
    calibration: list[list[int]] | None,
    progress: Progress | None,
    keep_weights: bool,
) -> QuantizeReport:
    sq = f"/smoothquant{config.smoothquant_alpha}" if config.smoothquant_alpha is not None else ""
    report = QuantizeReport("w8a8_dynamic" + sq, keep_weights=keep_weights)
    if config.smoothquant_alpha is not None:
        sites = scale_sites(model)
        stats = collect_input_stats(model, [s.linears[0] for s in sites], calibration, progress=progress)
        for site in sites:
            weights = [model.get_submodule(n).weight for n in site.linears]
            s = smoothquant_scale(stats[site.linears[0]].abs_max, weights, config.smoothquant_alpha)
            fold_scale(model, site, s)
    for name in names:
        lin = model.get_submodule(name)
        w8 = int8_weight(lin.weight)
        _swap(model, name, W8A8Linear(w8.q, w8.scale[:, 0], _bias(lin)))
        report.record(name, "w8a8", w8)
    return report

"""GPTQ, AWQ and SmoothQuant on random data: each must beat plain rounding on its own objective."""

from __future__ import annotations

import torch

from rapidlm.compress.awq import awq_search_scale
from rapidlm.compress.gptq import gptq_quantize
from rapidlm.compress.primitives import QuantSpec, dequantize, fake_quantize
from rapidlm.compress.smoothing import smoothquant_scale


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, like LLM activations (GPTQ needs correlation)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + mix)
    x[:, :4] *= 8  # outlier channels
    return x


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).mean())


def test_gptq_reduces_layer_output_error_vs_rtn():
    torch.manual_seed(0)
    x = correlated_inputs(1024, 128)
    w = torch.randn(64, 128) * 0.05
    for spec in (QuantSpec(4, 32, False), QuantSpec(4, 64, True), QuantSpec(4, None, False)):
        codes, scale, offset = gptq_quantize(w, x.T @ x, spec, damp=0.01)
        w_gptq = dequantize(codes, scale, offset, spec)
        rtn = output_error(x, w, fake_quantize(w, spec))
        gptq = output_error(x, w, w_gptq)
        assert gptq < 0.8 * rtn, (spec, gptq, rtn)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15


def test_gptq_act_order_keeps_layout_and_beats_rtn():
    x = correlated_inputs(1024, 128, seed=1)
    w = torch.randn(32, 128) * 0.05
    spec = QuantSpec(4, 32, False)
    codes, scale, offset = gptq_quantize(w, x.T @ x, spec, act_order=True)
    assert scale.shape == (32, 4)
    assert output_error(x, w, dequantize(codes, scale, offset, spec)) < 0.8 * output_error(x, w, fake_quantize(w, spec))


def test_gptq_handles_dead_inputs():
    x = correlated_inputs(256, 64)
    x[:, 10] = 0  # a channel that never fires: H has a zero row/column
    w = torch.randn(16, 64)
    codes, scale, offset = gptq_quantize(w, x.T @ x, QuantSpec(4, 32, False))
    assert torch.isfinite(dequantize(codes, scale, offset, QuantSpec(4, 32, False))).all()


def test_awq_scale_search_is_no_worse_than_rtn_and_better_with_outliers():
    x = correlated_inputs(512, 128)
    w = torch.randn(48, 128) * 0.05
    spec = QuantSpec(4, 32, False)
    s, alpha, rel = awq_search_scale([w[:24], w[24:]], x, x.abs().mean(0), spec, grid=20)
    assert s.shape == (128,) and 0 <= alpha < 1
    w_awq = fake_quantize(w * s, spec) / s
    rtn = output_error(x, w, fake_quantize(w, spec))
    assert output_error(x, w, w_awq) <= rtn * 1.0001
    assert rel < 0.9  # the outlier channels make scaling pay


def test_smoothquant_scale_formula():
    x_max = torch.tensor([4.0, 1.0, 0.25])
    w = torch.tensor([[1.0, 2.0, 0.5], [-2.0, 1.0, 0.5]])
    s = smoothquant_scale(x_max, [w], alpha=0.5)
    expected = x_max.sqrt() / torch.tensor([2.0, 2.0, 0.5]).sqrt()
    torch.testing.assert_close(s, expected)

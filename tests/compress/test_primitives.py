"""Quantization primitives against float64 references, and their error bounds."""

from __future__ import annotations

import pytest
import torch

from rapidlm.compress.primitives import (
    QuantSpec,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_per_token_int8,
)


def reference(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Plain float64 loops over groups: the textbook formulas, written independently of the module."""
    w = w.double()
    out = torch.empty_like(w)
    qmax = 2**bits - 1
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            seg = w[r, g0 : g0 + group]
            if symmetric:
                half = 2 ** (bits - 1)
                scale = float(seg.abs().max()) / (half - 1) or 1.0
                q = torch.clamp(torch.round(seg / scale), -(half - 1), half - 1)
                out[r, g0 : g0 + group] = q * scale
            else:
                lo, hi = min(float(seg.min()), 0.0), max(float(seg.max()), 0.0)
                scale = (hi - lo) / qmax or 1.0
                q = torch.clamp(torch.round((seg - lo) / scale), 0, qmax)
                out[r, g0 : g0 + group] = q * scale + lo
    return out


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (4, 32, False), (4, 32, True), (4, 64, False)])
def test_fake_quantize_matches_float64_reference(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(12, 128, dtype=torch.float64) * 0.05
    spec = QuantSpec(bits, group, symmetric)
    got = fake_quantize(w, spec)
    expected = reference(w, bits, group or 128, symmetric)
    # Both in float64; rounding ties could differ by one code, random data has none at this tolerance.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_quantize_dequantize_error_is_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(1)
    w = torch.randn(16, 96, dtype=torch.float64)
    spec = QuantSpec(bits, 32, symmetric)
    scale, offset = choose_qparams(w, spec)
    q = quantize(w, scale, offset, spec)
    assert q.dtype == torch.uint8 and int(q.max()) <= spec.qmax
    if symmetric:
        assert int(q.min()) >= 1  # symmetric range is +-(2**(bits-1) - 1)
    err = (dequantize(q, scale, offset, spec) - w).abs().view(16, 3, 32)
    assert (err <= scale[..., None] / 2 + 1e-12).all()


def test_zero_group_and_zero_weights_stay_exact():
    w = torch.zeros(2, 64)
    w[1, 32:] = torch.linspace(-1, 1, 32)
    for symmetric in (True, False):
        spec = QuantSpec(4, 32, symmetric)
        w_hat = fake_quantize(w, spec)
        assert w_hat[0].eq(0).all() and w_hat[1, :32].eq(0).all()


def test_per_token_int8_bounds_and_reconstruction():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 2, 5)[None, :, None]
    q, s = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and s.shape == (3, 5, 1)
    assert int(q.abs().max()) == 127
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_quant_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(5)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, 0)
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(torch.zeros(2, 48), QuantSpec(4, 32))

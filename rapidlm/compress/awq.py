"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"),
written from the paper.

Weights that meet large activations matter most. Scaling input channel j of W by s_j (and the activation by
1/s_j) shrinks their relative rounding error. AWQ searches s = mean|x|^a over a grid of exponents a in [0, 1),
keeping the one whose quantized layer best reproduces the float layer's output on calibration inputs.
"""

from __future__ import annotations

import torch

from rapidlm.compress.primitives import QuantSpec, fake_quantize


def awq_search_scale(
    weights: list[torch.Tensor],  # linears sharing the input, each (N_i, K)
    x: torch.Tensor,  # (R, K) calibration inputs
    x_abs_mean: torch.Tensor,  # (K,) mean |x| over all calibration tokens
    spec: QuantSpec,
    grid: int = 20,
) -> tuple[torch.Tensor, float, float]:
    """(s (K,), best exponent, its output MSE relative to the unscaled a=0 choice)."""
    W = torch.cat([w.float() for w in weights])  # (N, K)
    x = x.float()
    ref = x @ W.T  # (R, N) float output
    base = x_abs_mean.float().clamp(min=1e-4)
    best_err, best_a, best_s, err0 = float("inf"), 0.0, torch.ones_like(base), None
    for step in range(grid):
        a = step / grid
        s = base**a
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 so neither end under/overflows
        w_hat = fake_quantize(W * s[None, :], spec) / s[None, :]
        err = float(((x @ w_hat.T - ref) ** 2).mean())
        if err0 is None:
            err0 = err
        if err < best_err:
            best_err, best_a, best_s = err, a, s
    return best_s, best_a, best_err / err0 if err0 else 1.0

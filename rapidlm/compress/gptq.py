"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), written from the paper.

Quantize a weight W (N, K) column by column; after each column, spread its rounding error over the columns not
yet quantized, weighted by the inverse Hessian H^-1 of the layer's squared output error, H = 2 X^T X. This
minimises ||X W^T - X Q^T||^2 far better than rounding each weight alone. The paper's tricks, kept here:
- the Cholesky factor of H^-1 (upper) gives every row of the sequential update at once, stably;
- lazy batches: updates inside a block of 128 columns are applied eagerly, the rest once per block;
- damping: add `damp` x mean(diag H) to the diagonal; dead inputs (diag 0) get weight 0;
- act-order: quantize columns in order of decreasing diag(H), with each group's scale/offset fixed from the
  original weights beforehand ("static groups") so the stored layout keeps the original column order.
"""

from __future__ import annotations

import torch

from rapidlm.compress.primitives import QuantSpec, choose_qparams


def gptq_quantize(
    w: torch.Tensor,  # (N, K)
    hessian: torch.Tensor,  # (K, K): sum of x x^T over calibration inputs (any positive scale)
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (N, K) uint8, scale and offset (N, G) fp32, in the primitives' convention (w = scale*q + offset)."""
    W = w.detach().float().clone()
    N, K = W.shape
    gs = spec.group_size or K
    G = spec.groups(K)
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    col_spec = QuantSpec(spec.bits, None, spec.symmetric)  # qparams of one group slice (N, gs) -> (N, 1)
    scale = torch.zeros(N, G)
    offset = torch.zeros(N, G)
    static = act_order or gs == K  # per-channel or act-order: all qparams fixed up front
    if static:
        scale, offset = choose_qparams(W, spec)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # rows of the sequential update

    lo = 1 if spec.symmetric else 0
    codes = torch.zeros(N, K, dtype=torch.uint8)
    if not static and block_size % gs:
        block_size = gs * max(1, block_size // gs)  # a group must not straddle two lazy blocks
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # (N, B) this block, updated eagerly
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // gs
            if not static and col % gs == 0:  # a new group: qparams from its current (error-updated) weights
                s, o = choose_qparams(W1[:, i : i + gs], col_spec)
                scale[:, g], offset[:, g] = s[:, 0], o[:, 0]
            w_col = W1[:, i]  # (N,)
            q = torch.round((w_col - offset[:, g]) / scale[:, g]).clamp_(lo, spec.qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (w_col - (q * scale[:, g] + offset[:, g])) / Hinv1[i, i]  # (N,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the deferred update of every later column
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, scale, offset

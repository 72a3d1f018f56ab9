"""Per-input-channel scaling folded into the op before a linear: the shared step of AWQ and SmoothQuant.

For an input x feeding linear(s) W, scaling W's input channels by s and x by 1/s leaves the product unchanged:
(x / s) (W * s)^T = x W^T. The 1/s is folded into whatever produced x, so nothing extra runs:
- an RMSNorm (x = norm(h) * g): divide g by s;
- the up half of the fused gate/up linear (x = silu(gate) * up feeds w_down): divide those rows by s.
AWQ picks s to protect the weights that meet large activations; SmoothQuant picks it to move activation
outliers into the weights so that int8 activations lose less.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScaleSite:
    """Linears sharing one input, and where that input is produced."""

    linears: tuple[str, ...]  # module names, all with the same in_features
    producer: str  # module name of the RMSNorm or linear that produces their input
    producer_rows: tuple[int, int] | None = None  # a linear producer: the output rows that form the input


def scale_sites(model: nn.Module) -> list[ScaleSite]:
    """The foldable sites of a rapidlm Transformer. o_proj has none: under GQA its input channels come from
    shared v heads, so one scale per channel cannot be folded back exactly; it is quantized unscaled."""
    sites = []
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        hidden = block.mlp.hidden
        sites.append(ScaleSite((p + "attn.wqkv",), p + "attn_norm"))
        sites.append(ScaleSite((p + "mlp.w_gate_up",), p + "mlp_norm"))
        sites.append(ScaleSite((p + "mlp.w_down",), p + "mlp.w_gate_up", (hidden, 2 * hidden)))
    return sites


@torch.no_grad()
def fold_scale(model: nn.Module, site: ScaleSite, s: torch.Tensor) -> None:
    """Multiply the site's linears' input channels by s (K,) and divide its producer's output by s."""
    s = s.float()
    for name in site.linears:
        lin = model.get_submodule(name)
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
    producer = model.get_submodule(site.producer)
    if site.producer_rows is None:  # RMSNorm: its gain scales each channel of its output
        producer.weight.div_(s.to(producer.weight.dtype))
    else:
        a, b = site.producer_rows
        producer.weight[a:b].div_(s.to(producer.weight.dtype)[:, None])
        if getattr(producer, "bias", None) is not None:
            producer.bias[a:b].div_(s.to(producer.bias.dtype))


def smoothquant_scale(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), per input channel j."""
    w_absmax = torch.cat([w.float().abs() for w in weights]).amax(dim=0)  # (K,)
    s = x_absmax.float().clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-5)

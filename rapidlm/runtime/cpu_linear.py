"""bf16 linears on the CPU with their weights pre-packed once into oneDNN's blocked layout.

`F.linear` on a bf16 weight re-reads it in plain row-major order on every call; packing it once into the
layout oneDNN's AVX512-BF16 kernels stream from halves the time of a decode-step matmul on this model's small
matrices (measured: 0.14 ms -> 0.07 ms for 3072x576 at one token) with bit-identical results.
This is a module swap done by the runner after loading; the model code knows nothing of it.
"""

from __future__ import annotations

import torch
from torch import nn


def mkldnn_bf16_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("rapidlm::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x @ W^T (+ b) with W pre-packed by oneDNN. An opaque op, so torch.compile calls it as it is."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class PackedLinear(nn.Module):
    """A frozen nn.Linear whose weight lives in oneDNN's packed layout (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The batch-size hint picks the packed format; 1 suits decode and measured no slower for prefill.
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the opaque custom op keeps Inductor from lowering oneDNN's call
            return packed_linear(x, self.packed_weight, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Swap every bf16 nn.Linear in `model` for a PackedLinear; returns how many were swapped."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                setattr(module, child_name, PackedLinear(child))
                swapped += 1
    return swapped

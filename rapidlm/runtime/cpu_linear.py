"""bf16 linears on the CPU with their weights pre-packed once into oneDNN's blocked layout.

`F.linear` on a bf16 weight re-reads it in plain row-major order on every call; packing it once into the
layout oneDNN's AVX512-BF16 kernels stream from halves the time of a decode-step matmul on this model's small
matrices (measured: 0.14 ms -> 0.07 ms for 3072x576 at one token) with bit-identical results.
This is a module swap done by the runner after loading; the model code knows nothing of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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


# Rows (tokens) from which a weight-only quantized linear runs its bf16 copy instead of its kernel. Measured on
# SmolLM2-135M's projections (2 Zen4 threads, weights hot): the int4/int8 kernels win up to ~24 rows, the packed
# bf16 GEMM from ~32; 64 leaves batched decode (whose weights are cold, where 4-bit bytes count) on the kernels.
DENSE_MIN_ROWS = 64
# The output head (a GGUF's tied Q8_0 embedding: 49152 x 576 int8 on SmolLM2) sees one row per sequence in a decode
# step. Measured with its weight cold (as in a step): int8 kernel vs the bf16 copy at 8 rows 3.0 vs 3.3 ms, at 16
# rows 6.0 vs 4.2 ms, at 32 rows 9.6 vs 6.7 ms. So batched decode steps of 12+ sequences run its copy.
DENSE_HEAD_MIN_ROWS = 12


def _copyable(module: nn.Module) -> bool:
    """A weight-only quantized CPU linear whose weight can be read back (PyTorch's int4pack layout cannot)."""
    from rapidlm.compress.kernels.int4_cpu import Int4Linear
    from rapidlm.compress.kernels.int8_cpu import Int8Linear

    if type(module) is Int4Linear:
        return module.act_dtype == torch.bfloat16 and module.layout != "torch"
    return type(module) is Int8Linear


def _dequantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The (N, K) fp32 weight of a weight-only quantized CPU linear, or None for any other module."""
    if not _copyable(module):
        return None
    weight = module.int4_weight() if hasattr(module, "int4_weight") else module.int8_weight()
    return weight.dequantize()


class DenseCopyLinear(nn.Module):
    """A weight-only quantized linear plus a bf16 copy of its dequantized weight, packed for oneDNN.

    Prefill is compute-bound: there the 4-/8-bit kernels (or their dequantize-every-call path for long chunks)
    reach 200-280 GFLOP/s on this machine where oneDNN's bf16 GEMM on a pre-packed weight reaches 300-370
    (SmolLM2-135M, 2 Zen4 threads: a 150-token prefill forward 190 -> 150 ms). Decode is memory-bound, and the
    quantized bytes win there. So inputs of at least `min_rows` rows run the copy, fewer the quantized module.
    The copy costs 2 bytes per weight. Its numerics are those of the kernels' own long-chunk path: the weight
    rounded to bf16 once, bf16 products summed in fp32.
    """

    def __init__(self, quantized: nn.Module, weight: torch.Tensor, min_rows: int = DENSE_MIN_ROWS) -> None:
        super().__init__()
        self.quantized = quantized
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.min_elements = min_rows * self.in_features
        bias = getattr(quantized, "bias", None)
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        dense.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.dense = PackedLinear(dense)
        # Bound methods held as plain attributes: a decode step calls ~120 of these wrappers, and going through
        # nn.Module's __getattr__ and __call__ for the inner module cost ~3 us each
        self._quantized_forward = quantized.forward
        self._dense_forward = self.dense.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            groups = _ROW_GROUPS.get()
            if groups is not None:
                sizes = groups.get(x.numel() // self.in_features)
                if sizes is not None and len(sizes) > 1:
                    return self._forward_groups(x, sizes)
            if x.numel() >= self.min_elements:
                return self._dense_forward(x)
        return self._quantized_forward(x)

    def _forward_groups(self, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """Each group of consecutive rows takes the path it would take alone (see row_groups). Consecutive groups on
        the same path share one call where that gives the same rows: the bf16 GEMM's rows never depend on the rest
        of the batch, the kernels' only below their own large-batch switch (so a shared kernel call stays under
        min_rows rows, below it)."""
        min_rows = self.min_elements // self.in_features
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        runs: list[tuple[bool, int, int]] = []  # (dense, first row, end row)
        row = 0
        for size in sizes:
            dense = size >= min_rows
            if runs and runs[-1][0] == dense and (dense or row + size - runs[-1][1] < min_rows):
                runs[-1] = (dense, runs[-1][1], row + size)
            else:
                runs.append((dense, row, row + size))
            row += size
        outs = [(self._dense_forward if dense else self._quantized_forward)(x2[a:b]) for dense, a, b in runs]
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"bf16 copy from {self.min_elements // self.in_features} rows"


# Row groups of the forward in progress: {rows in a linear's input: sizes of its groups of consecutive rows}.
_ROW_GROUPS: ContextVar[dict[int, tuple[int, ...]] | None] = ContextVar("rapidlm_row_groups", default=None)


@contextmanager
def row_groups(groups: dict[int, tuple[int, ...]]) -> Iterator[None]:
    """Within this block, a DenseCopyLinear whose input has M rows with `groups[M]` = (m1, m2, ...) (m1 + m2 + ...
    = M) treats each group of consecutive rows as if it were a call of its own: the bf16 copy from its min_rows,
    the quantized kernel below. One forward can then carry several sequences' prompt chunks and a batch of decode
    rows (rapidlm.engine's one forward per step), and every row still gets the bits it would get in the forward
    that ran it alone: both paths compute each row independently of the others in its call."""
    token = _ROW_GROUPS.set(groups)
    try:
        yield
    finally:
        _ROW_GROUPS.reset(token)


def dense_copy_bytes(model: nn.Module) -> int:
    """Bytes a bf16 copy of every weight-only quantized CPU linear in `model` takes (see add_dense_copies)."""
    return sum(2 * m.in_features * m.out_features for m in model.modules() if _copyable(m))


def add_dense_copies(
    model: nn.Module, min_rows: int = DENSE_MIN_ROWS, head_min_rows: int = DENSE_HEAD_MIN_ROWS
) -> int:
    """Wrap every weight-only quantized CPU linear of `model` (bf16 activations) in a DenseCopyLinear that runs
    its copy from `min_rows` rows (`head_min_rows` for the output head, `lm_head`); returns how many."""
    if not mkldnn_bf16_available():
        return 0
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            weight = _dequantized_weight(child)
            if weight is not None:
                rows = head_min_rows if child_name == "lm_head" else min_rows
                setattr(module, child_name, DenseCopyLinear(child, weight, rows))
                swapped += 1
    return swapped

"""Decode steps on CUDA as captured CUDA graphs over a fused forward (rapidlm's own Triton kernels).

A decode step of a 7B model reads ~13 GB of weights in ~3.5 ms on an H100/H200; the eager model launches ~30
kernels per layer from Python, so launch cost alone would exceed that. Here a step is:

- a fused forward (`fused_decode_forward`) with 10 launches per layer: add+RMSNorm, q|k|v matmul, RoPE with the
  k/v cache write, decode attention (split + combine), o matmul, add+RMSNorm, gate|up matmul, silu*up, down
  matmul. The matmuls are whatever modules the model holds (nn.Linear -> cuBLAS or rapidlm's Triton GEMV,
  whichever was timed faster for the shape; rapidlm's CUDA int8/int4 modules), so quantized models take the
  same path;
- captured once per (cache, batch size) as a CUDA graph and replayed at every position: shapes never change
  because attention reads each row's length from a device tensor (positions + 1) and the number of splits
  depends only on the cache capacity (rapidlm.runtime.kernels.paged_attention_triton).

`DecodeGraphs` is what ModelRunner uses for device cuda (dense StaticKVCache rows, any batch size);
`PagedDecodeGraph` runs the same forward over a paged pool with block tables (the serving engine's layout),
captured for one batch size. RAPIDLM_CUDA_GRAPHS=0 in the environment turns the graph path off (the eager model
runs instead), as does a missing Triton, an int8 KV cache or a model that is not rapidlm's Transformer.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from rapidlm.compress.kernels.cuda_linear import GEMV_MAX_M, linear_decode
from rapidlm.models.llama import Transformer
from rapidlm.runtime.kernels import decode_triton as fused
from rapidlm.runtime.kernels.paged_attention_triton import (
    HAS_TRITON,
    dense_attention_decode,
    paged_attention_decode,
)

MAX_GRAPHS = 8  # captured graphs kept per runner (each holds its own small memory pool)


def cuda_graphs_enabled() -> bool:
    return HAS_TRITON and torch.cuda.is_available() and os.environ.get("RAPIDLM_CUDA_GRAPHS", "1") != "0"


def model_supported(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    hd = getattr(cfg, "head_dim", 0)
    return isinstance(model, Transformer) and hd > 0 and hd & (hd - 1) == 0


def _project(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear at decode size: plain float nn.Linear weights go to cuBLAS or rapidlm's Triton GEMV, whichever is
    faster for the shape (rapidlm.compress.kernels.cuda_linear.linear_decode); other modules run themselves."""
    if type(module) is torch.nn.Linear and x.is_cuda and x.shape[0] <= GEMV_MAX_M:
        return linear_decode(x, module.weight, module.bias)
    return module(x)


def fused_decode_forward(
    model: Transformer,
    tokens: torch.Tensor,  # (B,) int64, one token per row
    positions: torch.Tensor,  # (B,) int64, its position
    kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: dense (B, nkv, S, hd) rows, or paged pools
    block_tables: torch.Tensor | None = None,  # (B, max_blocks) int32 when kv holds paged pools
) -> torch.Tensor:  # (B, vocab) fp32 logits
    """One decode step of rapidlm's Transformer with the fused kernels: same function as model.forward for
    one token per row (which writes its k/v at `positions` and attends over positions [0, position])."""
    cfg = model.cfg
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    window = cfg.sliding_window or 0
    scale = hd**-0.5
    B = tokens.shape[0]
    seq_lens = (positions + 1).to(torch.int32)
    h = model.embed(tokens)  # (B, C), the residual stream, updated in place below
    delta = None
    for layer, (k, v) in zip(model.layers, kv):
        xn = fused.add_rmsnorm_(h, delta, layer.attn_norm.weight, layer.attn_norm.eps)
        qkv = _project(layer.attn.wqkv, xn)
        q = fused.rope_write(qkv, model.rope_cos, model.rope_sin, positions, k, v, nh, nkv, hd, block_tables)
        if block_tables is None:
            o = dense_attention_decode(q, k, v, seq_lens, scale, window)
        else:
            o = paged_attention_decode(q, k, v, block_tables, seq_lens, scale, window)
        delta = _project(layer.attn.wo, o.view(B, nh * hd).to(h.dtype))
        xn = fused.add_rmsnorm_(h, delta, layer.mlp_norm.weight, layer.mlp_norm.eps)
        delta = _project(layer.mlp.w_down, fused.silu_mul(_project(layer.mlp.w_gate_up, xn)))
    xn = fused.add_rmsnorm_(h, delta, model.norm.weight, model.norm.eps)
    return _project(model.lm_head, xn).float()


class _Captured:
    """One captured step: static inputs, the graph, its output."""

    def __init__(self, fn, inputs: dict[str, torch.Tensor]) -> None:  # noqa: ANN001 - fn(**inputs) -> logits
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        # Warm up on a side stream (Triton compiles and autotunes, cuBLAS sets up) with the real inputs: it writes
        # the same k/v the replay will write, so running it is harmless. Then capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(**self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = fn(**self.inputs)

    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        for name, value in inputs.items():
            self.inputs[name].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Graph-captured decode steps over a StaticKVCache's live rows, one graph per (cache storage, batch size)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    @staticmethod
    def supports(cache: object) -> bool:
        return getattr(cache, "scales", 1) is None and getattr(cache, "data", None) is not None

    def decode(self, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        """Logits (B, vocab) fp32 for one token per live row of `cache` (a StaticKVCache without int8)."""
        layers = cache.layers()
        B = tokens.shape[0]
        data = cache.data
        key = (B, data.data_ptr(), tuple(data.shape), data.stride(), data.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            kv = [(layer.k, layer.v) for layer in layers]

            def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                return fused_decode_forward(self.model, tokens, positions, kv)

            graph = _Captured(step, {"tokens": tokens, "positions": positions})
            self.graphs[key] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return graph.run(tokens=tokens, positions=positions).clone()


class PagedDecodeGraph:
    """A decode step of B rows over a paged pool (layers, 2, num_blocks, block_size, nkv, hd), captured once
    and replayed with new tokens, positions and block tables (B, max_blocks) int32 of a fixed width."""

    def __init__(self, model: Transformer, pool: torch.Tensor, tokens, positions, block_tables) -> None:  # noqa: ANN001
        kv = [(layer[0], layer[1]) for layer in pool]

        def step(tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
            return fused_decode_forward(model, tokens, positions, kv, block_tables)

        self.captured = _Captured(step, {"tokens": tokens, "positions": positions, "block_tables": block_tables})

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        return self.captured.run(tokens=tokens, positions=positions, block_tables=block_tables)

"""Checks of rapidlm's CUDA Triton kernels run on the CPU by Triton's interpreter (TRITON_INTERPRET=1).

Run by tests/runtime/test_cuda_kernels_cpu.py in a subprocess (the interpreter is chosen when the kernels are
defined, so it needs a fresh process); prints one line per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from rapidlm.compress.kernels import cuda_linear as cl  # noqa: E402
from rapidlm.compress.quantize import int8_weight  # noqa: E402
from rapidlm.config import ModelConfig  # noqa: E402
from rapidlm.models.llama import Transformer  # noqa: E402
from rapidlm.runtime.cuda_graphs import fused_decode_forward  # noqa: E402
from rapidlm.runtime.kernels.paged_attention import paged_attention_reference  # noqa: E402
from rapidlm.runtime.kernels.paged_attention_triton import dense_attention_decode, paged_attention_decode  # noqa: E402
from rapidlm.runtime.kv_cache import StaticKVCache  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check(name: str, err: float, tol: float) -> None:
    print(f"{name}: {err:.2e} (tol {tol:.0e})")
    if not err <= tol:
        sys.exit(f"FAILED {name}")


def attention() -> None:
    g = torch.Generator().manual_seed(0)
    for B, nh, nkv, hd, bs, nb, window in [(3, 4, 2, 16, 4, 40, 0), (2, 4, 4, 32, 8, 10, 5), (1, 2, 1, 16, 16, 8, 0)]:
        nblocks = B * nb + 3
        k = torch.randn(nblocks, bs, nkv, hd, generator=g)
        v = torch.randn(nblocks, bs, nkv, hd, generator=g)
        q = torch.randn(B, nh, hd, generator=g)
        tables = torch.randperm(nblocks, generator=g)[: B * nb].view(B, nb).to(torch.int32)
        lens = torch.randint(0, nb * bs + 1, (B,), generator=g, dtype=torch.int32)
        lens[0] = nb * bs
        ref = paged_attention_reference(q, k, v, tables, lens, hd**-0.5, window)
        check(f"paged attention B{B} nh{nh} nkv{nkv} w{window}", rel(paged_attention_decode(q, k, v, tables, lens,
              hd**-0.5, window), ref), 1e-5)  # fmt: skip
        dense_k = k[tables.long()].reshape(B, nb * bs, nkv, hd).transpose(1, 2)  # (B, nkv, S, hd), strided view
        dense_v = v[tables.long()].reshape(B, nb * bs, nkv, hd).transpose(1, 2)
        got = dense_attention_decode(q, dense_k, dense_v, lens, hd**-0.5, window)
        check(f"dense attention B{B} nh{nh} nkv{nkv} w{window}", rel(got, ref), 1e-5)


def fused_forward() -> None:
    torch.manual_seed(0)
    for window, bias in [(None, False), (5, True)]:
        cfg = ModelConfig("LlamaForCausalLM", vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=64, sliding_window=window,
                          attention_bias=bias)  # fmt: skip
        model = Transformer(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        eager, fused = (StaticKVCache(cfg, 2, 32, torch.float32, torch.device("cpu")) for _ in range(2))
        with torch.inference_mode():
            for row, n in [(0, 7), (1, 12)]:
                toks, pos = torch.randint(0, 100, (1, n)), torch.arange(n)[None]
                for cache in (eager, fused):
                    model(toks, pos, cache.layers(slice(row, row + 1)), n)
            tokens, positions = torch.tensor([3, 9]), torch.tensor([7, 12])
            want = model(tokens[:, None], positions[:, None], eager.layers(), 13)[:, 0]
            got = fused_decode_forward(model, tokens, positions, [(x.k, x.v) for x in fused.layers()])
        check(f"fused decode forward window={window} bias={bias}", rel(got, want), 1e-5)
        check("fused decode cache write", rel(fused.data, eager.data), 1e-6)
        # the same step over a paged pool holding the rows' positions in scattered blocks
        bs, nb = 4, 8
        pool = torch.zeros(cfg.num_layers, 2, 2 * nb + 1, bs, cfg.num_kv_heads, cfg.head_dim)
        tables = torch.randperm(2 * nb + 1)[: 2 * nb].view(2, nb).to(torch.int32)
        for row in range(2):
            for j in range(nb):
                pool[:, :, tables[row, j]] = fused.data[:, :, row, :, j * bs : (j + 1) * bs].transpose(2, 3)
        with torch.inference_mode():
            got = fused_decode_forward(model, tokens, positions, [(x[0], x[1]) for x in pool], tables)
        check(f"fused paged decode window={window} bias={bias}", rel(got, want), 1e-5)


def linears() -> None:
    from rapidlm.compress.kernels.int4_cpu import Int4Weight
    from rapidlm.compress.primitives import QuantSpec, choose_qparams, quantize

    torch.manual_seed(0)
    N, K = 40, 384
    w, b = torch.randn(N, K), torch.randn(N)
    for M in (1, 3):
        x = torch.randn(M, K)
        m8 = cl.CudaInt8Linear(int8_weight(w), b)
        want = x.double() @ m8.dequantize().double().t() + b.double()
        check(f"int8 gemv M={M}", rel(cl.dense_gemv(x, m8.q, m8.scale, m8.bias), want), 1e-5)
        for g in (32, 128):
            spec = QuantSpec(4, g, symmetric=False)
            s, o = choose_qparams(w, spec)
            m4 = cl.CudaInt4Linear(Int4Weight(quantize(w, s, o, spec), s, o, g), b)
            want = x.double() @ m4.dequantize().double().t() + b.double()
            got = cl.int4_gemv(x, m4.packed, m4.scale, m4.offset, g, m4.bias)
            check(f"int4 gemv g{g} M={M}", rel(got, want), 1e-5)
            check(f"int4 module M={M} (dequantize path on CPU)", rel(m4(x), want), 1e-5)
        check(f"bf16 gemv M={M}", rel(cl.dense_gemv(x.bfloat16(), w.bfloat16()), x.bfloat16().double()
              @ w.bfloat16().double().t()), 1e-2)  # fmt: skip


if __name__ == "__main__":
    attention()
    fused_forward()
    linears()
    print("all interpreter checks passed")

"""Micro-benchmark of the CPU paged-attention decode kernel against gather + SDPA on SmolLM2-135M's attention shape.

    python benchmarks/paged_attention.py --threads 2 [--kv-dtypes float32 bfloat16]

One decode step's attention for one layer (nh 9, nkv 3, hd 64, block size 16, fp32 queries) at each batch size B
and context length (every sequence holds `ctx` tokens, its blocks shuffled through the pool), timed per call and
multiplied by the model's 30 layers:
* kernel: `paged_attention_decode` (rapidlm_paged::decode) reading the blocks in place, once per pool dtype of
  --kv-dtypes (fp32, and bf16: half the bytes, widened to fp32 in registers);
* gather + SDPA: what a paged cache does without it, `k_pool[block_tables[:, :nb]].view(B, nb*bs, nkv, hd)
  .transpose(1, 2)` for K and V, then `scaled_dot_product_attention` with a boolean mask (built once per step,
  outside the timing, as the model does) and enable_gqa, over the fp32 pools.
Each method cycles through enough copies of the layer's pools (>= --working-set MiB, at most 30: one per layer) that
K/V come from memory as they do when 30 layers take turns. Short rounds alternate the two methods; the best
round counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapidlm.runtime.kernels import paged_attention  # noqa: E402

NH, NKV, HD, LAYERS, BS = 9, 3, 64, 30, 16


def make_layers(batch: int, ctx: int, copies: int, g: torch.Generator) -> list[dict]:
    nb = -(-ctx // BS)
    num_blocks = batch * nb + 8
    layers = []
    for _ in range(copies):
        tables = torch.randperm(num_blocks, generator=g)[: batch * nb].view(batch, nb).to(torch.int32)
        layers.append(
            {
                "q": torch.randn(batch, NH, HD, generator=g),
                "k": torch.randn(num_blocks, BS, NKV, HD, generator=g),
                "v": torch.randn(num_blocks, BS, NKV, HD, generator=g),
                "tables32": tables,
                "tables64": tables.long(),
            }
        )
    return layers


def time_rounds(fns: list[Callable[[dict], torch.Tensor]], layers: list[dict], seconds: float) -> list[float]:
    """us per call of each fn: the best of many short rounds (a few ms each), the fns taking turns round by round.
    Short rounds let some of them miss the moments another process holds a core (the machine may be shared)."""
    per_call = []
    for fn in fns:  # warm up, and size the rounds
        fn(layers[0])
        start = time.perf_counter()
        fn(layers[1 % len(layers)])
        per_call.append(max(time.perf_counter() - start, 1e-7))
    calls = [max(1, int(3e-3 / t)) for t in per_call]
    best = [float("inf")] * len(fns)
    i, deadline = 0, time.perf_counter() + seconds * len(fns)
    while time.perf_counter() < deadline:
        for j, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls[j]):
                fn(layers[i % len(layers)])
                i += 1
            best[j] = min(best[j], (time.perf_counter() - start) / calls[j] * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per method and shape")
    ap.add_argument("--working-set", type=int, default=128, help="MiB of fp32 K/V pool copies cycled through")
    ap.add_argument(
        "--kv-dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="pool dtypes to time the kernel with",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not paged_attention.decode_kernel_available():
        sys.exit("the paged-attention CPU kernel is not available here (needs a C++ compiler)")
    g = torch.Generator().manual_seed(0)
    scale = HD**-0.5
    print(
        f"SmolLM2-135M attention (nh {NH}, nkv {NKV}, hd {HD}, block {BS}, fp32 q), {args.threads} threads, "
        f"{torch.ops.rapidlm_paged.simd()} kernel; us per layer per decode step (best ~3 ms round), "
        f"x{LAYERS} layers = ms per step; load average {os.getloadavg()[0]:.1f}"
    )
    dtypes = {name: getattr(torch, name) for name in dict.fromkeys(args.kv_dtypes)}
    short = {"float32": "fp32", "bfloat16": "bf16"}
    cols = [f"kernel {short[n]} us" for n in dtypes] + ["gather+SDPA (fp32) us"]
    cols += [f"kernel {short[n]} ms/step (x30)" for n in dtypes] + ["gather+SDPA ms/step (x30)"]
    cols += [f"{short[n]} speed-up" for n in dtypes]
    if "float32" in dtypes and "bfloat16" in dtypes:
        cols.append("bf16 / fp32 kernel")
    print("| B | ctx | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for ctx in args.contexts:
        for batch in args.batches:
            lens = torch.full((batch,), ctx, dtype=torch.int32)
            nb = -(-ctx // BS)
            mask = (torch.arange(nb * BS) < lens[:, None])[:, None, None, :]  # (B, 1, 1, nb*bs)
            layer_bytes = 2 * (batch * nb + 8) * BS * NKV * HD * 4
            copies = max(2, min(LAYERS, (args.working_set << 20) // layer_bytes))
            layers = make_layers(batch, ctx, copies, g)
            for layer in layers:
                if "bfloat16" in dtypes:
                    layer["k_bfloat16"], layer["v_bfloat16"] = layer["k"].bfloat16(), layer["v"].bfloat16()
                layer["k_float32"], layer["v_float32"] = layer["k"], layer["v"]

            def make_kernel(name: str, lens: torch.Tensor = lens) -> Callable[[dict], torch.Tensor]:
                def kernel(d: dict) -> torch.Tensor:
                    return paged_attention.paged_attention_decode(
                        d["q"], d["k_" + name], d["v_" + name], d["tables32"], lens, scale
                    )

                return kernel

            kernels = [make_kernel(name) for name in dtypes]

            def gather_sdpa(d: dict, batch: int = batch, nb: int = nb, mask: torch.Tensor = mask) -> torch.Tensor:
                t = d["tables64"][:, :nb]
                k = d["k"][t].view(batch, nb * BS, NKV, HD).transpose(1, 2)
                v = d["v"][t].view(batch, nb * BS, NKV, HD).transpose(1, 2)
                out = F.scaled_dot_product_attention(d["q"][:, :, None], k, v, attn_mask=mask, enable_gqa=True)
                return out[:, :, 0]

            with torch.inference_mode():
                for name, fn in zip(dtypes, kernels, strict=True):
                    widened = dict(layers[0], k=layers[0]["k_" + name].float(), v=layers[0]["v_" + name].float())
                    err = (fn(layers[0]) - gather_sdpa(widened)).abs().max().item()
                    assert err < 1e-4, f"kernel ({name} pools) and gather + SDPA disagree by {err}"
                *k_us, g_us = time_rounds([*kernels, gather_sdpa], layers, args.seconds)
            cells = [f"{t:.1f}" for t in k_us] + [f"{g_us:.1f}"]
            cells += [f"{t * LAYERS / 1e3:.2f}" for t in k_us] + [f"{g_us * LAYERS / 1e3:.2f}"]
            cells += [f"{g_us / t:.1f}x" for t in k_us]
            if "float32" in dtypes and "bfloat16" in dtypes:
                names = list(dtypes)
                cells.append(f"{k_us[names.index('bfloat16')] / k_us[names.index('float32')]:.2f}")
            print(f"| {batch} | {ctx} | " + " | ".join(cells) + " |", flush=True)
            del layers


if __name__ == "__main__":
    main()

"""Micro-benchmark of the W8A8 CPU kernel against int8 weight-only and fbgemm on SmolLM2-135M's shapes.

    python benchmarks/w8a8_kernel.py --threads 2

For each weight shape (N, K) (fused q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536, the tied head
49152x576) and batch M it prints ms per call (best of 5 rounds of many calls, bf16 x) for
* int8 wo: rapidlm's Int8Linear (rapidlm_int8::gemm, per-channel scales, bf16 x against widened int8 codes);
* w8a8: W8A8Linear on rapidlm_w8a8::gemm (per-token int8 x, VNNI int8 dot products);
* fbgemm: W8A8Linear on fbgemm's quantized::linear_dynamic (its path on CPUs without VNNI);
and the ratio int8 wo / w8a8. Every method cycles through enough copies of its weight (>= --working-set MiB) that
each call streams the weight from DRAM, as decoding does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapidlm.compress.kernels import w8a8_cpu  # noqa: E402
from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight  # noqa: E402
from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


def best_ms(layers: list[Callable], x: torch.Tensor, calls: int) -> float:
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            layers[i % len(layers)](x)
        rounds.append((time.perf_counter() - start) / calls)
    return min(rounds) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 256])
    ap.add_argument("--working-set", type=int, default=256, help="MiB of weight copies per method")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not w8a8_cpu.w8a8_kernel_available():
        sys.exit("the W8A8 VNNI kernel is not available on this machine (needs AVX512-VNNI and a C++ compiler)")
    g = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}; ms per call, bf16 x; weights streamed from DRAM")
    print("| N x K | M | int8 wo | w8a8 | fbgemm | int8 wo / w8a8 |")
    print("|---|---|---|---|---|---|")
    for n, k in SHAPES:
        copies = max(2, (args.working_set << 20) // (n * k))
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        scale = torch.rand(n, generator=g) * 0.01 + 1e-3
        w8a8 = [W8A8Linear(q.clone(), scale) for _ in range(copies)]
        w8a8_cpu.FORCE_FALLBACK = True
        fbgemm = [W8A8Linear(q.clone(), scale) for _ in range(copies)] if w8a8_cpu.fbgemm_available() else []
        w8a8_cpu.FORCE_FALLBACK = False
        wo = [Int8Linear(Int8Weight(q.clone(), scale[:, None].clone(), k)) for _ in range(copies)]
        for m in args.batches:
            x = torch.randn(m, k, generator=g).to(torch.bfloat16)
            calls = max(20, min(400, 8_000_000 // (n * k) // max(1, m // 8)))
            with torch.inference_mode():
                t_wo, t_w8 = best_ms(wo, x, calls), best_ms(w8a8, x, calls)
                t_fb = best_ms(fbgemm, x, calls) if fbgemm else float("nan")
            print(f"| {n}x{k} | {m} | {t_wo:.3f} | {t_w8:.3f} | {t_fb:.3f} | {t_wo / t_w8:.2f} |", flush=True)


if __name__ == "__main__":
    main()

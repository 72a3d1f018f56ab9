"""Micro-benchmark of the int8 weight-only CPU kernel against the other ways to run one linear layer.

    python benchmarks/int8_kernel.py --threads 2

For each weight shape (N, K) of SmolLM2-135M (fused q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536,
the tied head 49152x576) and batch M it prints ms per call (median over many calls) for
* int8 g32 / int8 ch: rapidlm's Int8Linear (rapidlm_int8::gemm), Q8_0-style groups of 32 / one scale per row,
  bf16 x (the model's activations); "int8 g32 f32x" is the same with fp32 x;
* bf16 packed: rapidlm.runtime.cpu_linear.PackedLinear (oneDNN, weight pre-packed), bf16 x, today's path;
* i8pack_mm: torch.ops.aten._weight_int8pack_mm (per-row scales), bf16 x;
* fp32 linear: F.linear with fp32 weight and x;
and GB/s = weight bytes (int8 codes + fp32 scales) / time of the int8 g32 column. Each figure is the median of
many calls in each of 5 interleaved rounds, best round.

Cache state: decode reads every weight of the model once per token (hundreds of MiB, far more than the L3), so by
default every method cycles through enough copies of its weights (>= --working-set MiB) that each call streams
its weight from DRAM. --hot reuses one copy instead (small matrices then sit in L2/L3: an optimistic bound).
The methods are timed in interleaved rounds so that drifts of a shared machine hit all of them alike.
The last table times large batches (prefill): the kernel, dequantize + at::linear (which gemm switches to for bf16
x above SMALL_M_MAX rows) and bf16 PackedLinear.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rapidlm.compress.kernels import int8_cpu
from rapidlm.compress.kernels.int8_cpu import Int8Linear, Int8Weight
from rapidlm.runtime.cpu_linear import PackedLinear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
MIB = 1 << 20


def read_bandwidth_gbs() -> float:
    t = torch.ones(128 * MIB // 4 * 4)  # 512 MiB fp32
    best = float("inf")
    for _ in range(8):
        a = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - a)
    return t.numel() * 4 / best / 1e9


def copies_for(nbytes: int, working_set: int, hot: bool) -> int:
    return 1 if hot else max(2, -(-working_set // nbytes))


def int8_weight(n: int, k: int, group: int, g: torch.Generator) -> Int8Weight:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return Int8Weight(q, torch.rand(n, k // group, generator=g) * 0.01, group)


def make_methods(n: int, k: int, working_set: int, hot: bool) -> dict[str, tuple[list[Callable], torch.dtype]]:
    """name -> (one callable per weight copy taking x, x dtype)."""
    g = torch.Generator().manual_seed(0)
    methods: dict[str, tuple[list[Callable], torch.dtype]] = {}
    c8 = copies_for(n * k, working_set, hot)
    g32 = [Int8Linear(int8_weight(n, k, 32, g)) for _ in range(c8)]
    methods["int8 g32"] = (g32, torch.bfloat16)
    methods["int8 ch"] = ([Int8Linear(int8_weight(n, k, k, g)) for _ in range(c8)], torch.bfloat16)
    methods["int8 g32 f32x"] = (g32, torch.float32)
    c16 = copies_for(2 * n * k, working_set, hot)
    methods["bf16 packed"] = (
        [PackedLinear(nn.Linear(k, n, bias=False).to(torch.bfloat16)) for _ in range(c16)],
        torch.bfloat16,
    )
    pm = []
    for _ in range(c8):
        w = int8_weight(n, k, k, g)
        q, s = w.q, w.scale.view(n).to(torch.bfloat16)
        pm.append(lambda x, q=q, s=s: torch.ops.aten._weight_int8pack_mm(x, q, s))
    methods["i8pack_mm"] = (pm, torch.bfloat16)
    c32 = copies_for(4 * n * k, working_set, hot)
    fl = []
    for _ in range(c32):
        w = torch.randn(n, k, generator=g)
        fl.append(lambda x, w=w: F.linear(x, w))
    methods["fp32 linear"] = (fl, torch.float32)
    return methods


def time_methods(methods: dict[str, tuple[list[Callable], torch.dtype]], m: int, k: int, budget_s: float) -> dict:
    """ms per call: in each of 5 interleaved rounds the median of many calls, then the best round (a shared VM
    has spells, seconds long, when every call of every method is several ms slower)."""
    xs = {dt: torch.randn(m, k).to(dt) for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(methods, float("inf"))
    counters = dict.fromkeys(methods, 0)
    for fns, dt in methods.values():  # warm up (and first-touch every copy)
        for f in fns:
            f(xs[dt])
    rounds = 5
    for _ in range(rounds):
        for name, (fns, dt) in methods.items():
            x, times = xs[dt], []
            start = time.perf_counter()
            while time.perf_counter() - start < budget_s / rounds / len(methods) or not times:
                f = fns[counters[name] % len(fns)]
                counters[name] += 1
                a = time.perf_counter()
                f(x)
                times.append(time.perf_counter() - a)
            best[name] = min(best[name], statistics.median(times) * 1e3)
    return best


def crossover(threads: int, working_set: int, hot: bool, budget_s: float) -> None:
    print(
        "\nLarge batches (prefill), bf16 x, group 32, ms per call: the kernel, dequantize + at::linear (what gemm "
        f"runs for bf16 x above M = {int8_cpu.SMALL_M_MAX}), bf16 PackedLinear."
    )
    print(f"{'N x K':>11} {'M':>4} {'kernel':>9} {'dequant+mm':>11} {'bf16 packed':>12}")
    g = torch.Generator().manual_seed(1)
    for (n, k), ms in [((3072, 576), (16, 64, 256, 512, 2048)), ((49152, 576), (16, 64, 256, 512))]:
        c8 = copies_for(n * k, working_set, hot)
        lins = [Int8Linear(int8_weight(n, k, 32, g)) for _ in range(c8)]
        c16 = copies_for(2 * n * k, working_set, hot)
        packed = [PackedLinear(nn.Linear(k, n, bias=False).to(torch.bfloat16)) for _ in range(c16)]

        def kernel(x, lin):  # noqa: ANN001, ANN202
            return torch.ops.rapidlm_int8.gemm_small(x, lin.packed, lin.packed_scale, lin.out_features, 32)

        def dequant(x, lin):  # noqa: ANN001, ANN202
            return torch.ops.rapidlm_int8.dequantize_matmul(x, lin.packed, lin.packed_scale, lin.out_features, 32)

        for m in ms:
            methods = {
                "kernel": ([lambda x, lin=lin: kernel(x, lin) for lin in lins], torch.bfloat16),
                "dequant": ([lambda x, lin=lin: dequant(x, lin) for lin in lins], torch.bfloat16),
                "packed": (packed, torch.bfloat16),
            }
            r = time_methods(methods, m, k, budget_s * 2)
            print(f"{n:>5} x {k:<4} {m:>4} {r['kernel']:>9.3f} {r['dequant']:>11.3f} {r['packed']:>12.3f}", flush=True)
        del lins, packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes M (default 1 8)")
    ap.add_argument("--working-set", type=int, default=192, help="MiB of weight copies per method (default 192)")
    ap.add_argument("--hot", action="store_true", help="one copy per method: weights stay in cache when they fit")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing budget per (shape, M) (default 1.5)")
    ap.add_argument("--no-crossover", action="store_true", help="skip the large-M table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not int8_cpu.int8_kernel_available():
        print("WARNING: the int8 kernel is not available here; the int8 columns time the pure-torch fallback")
    else:
        print(f"int8 kernel: {torch.ops.rapidlm_int8.simd()}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"{'hot (one weight copy)' if args.hot else f'cold (>= {args.working_set} MiB of weight copies per method)'}, "
        f"read bandwidth (512 MiB sum) {read_bandwidth_gbs():.1f} GB/s"
    )
    working_set = args.working_set * MIB
    names = ["int8 g32", "int8 ch", "int8 g32 f32x", "bf16 packed", "i8pack_mm", "fp32 linear"]
    print(f"\n{'N x K':>11} {'M':>3} " + " ".join(f"{h:>13}" for h in names) + f" {'int8 g32 GB/s':>14}")
    with torch.inference_mode():
        for n, k in SHAPES:
            methods = make_methods(n, k, working_set, args.hot)
            for m in args.batch:
                r = time_methods(methods, m, k, args.seconds)
                gbs = (n * k + n * (k // 32) * 4) / (r["int8 g32"] * 1e-3) / 1e9
                print(
                    f"{n:>5} x {k:<4} {m:>3} " + " ".join(f"{r[h]:>13.4f}" for h in names) + f" {gbs:>14.1f}",
                    flush=True,
                )
            del methods
        if not args.no_crossover:
            crossover(args.threads, working_set, args.hot, args.seconds)


if __name__ == "__main__":
    main()

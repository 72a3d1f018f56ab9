"""Micro-benchmark of the int4 CPU kernel against the other ways to run one linear layer.

    python benchmarks/int4_kernel.py --threads 2

For each weight shape (N, K) of SmolLM2-135M (fused q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536),
group size and batch M it prints ms per call (median over many calls) for
* rapidlm: rapidlm's kernel, the op alone (rapidlm_int4::gemm), bf16 x (the model's activations);
* Int4Linear: the same through the nn.Module (as the model calls it: + Python call overhead);
* f32x: Int4Linear with act_dtype=float32 (the exact path), fp32 x;
* torch int4: torch.ops.aten._weight_int4pack_mm_for_cpu (what Int4Linear ran before), bf16 x, bf16 scales;
* bf16 packed: rapidlm.runtime.cpu_linear.PackedLinear (oneDNN, weight pre-packed), bf16 x;
and GB/s = weight bytes (codes + fp16 scale/offset, as a GGUF's Q4_0/Q4_1 weights are held; torch's bf16 scale
and zero point take the same bytes) / time. Batches above SMALL_M_MAX (M = 512) run gemm's dequantize + oneDNN
path.

Cache state: decode reads every weight of the model once per token (tens of MiB, more than the L3), so by
default every method cycles through enough copies of its weights (>= --working-set MiB) that each call streams
its weight from DRAM. --hot reuses one copy instead (small matrices then sit in L2/L3: an optimistic bound).
The methods are timed in interleaved rounds so that drifts of a shared machine hit all of them alike.
The last table times larger batches: the kernel (gemm_small), dequantize + at::linear (what gemm runs for bf16 x
above SMALL_M_MAX rows), PyTorch's int4 kernel and bf16 PackedLinear, to place the crossover.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from rapidlm.compress.kernels import int4_cpu
from rapidlm.compress.kernels.int4_cpu import Int4Linear, Int4Weight
from rapidlm.runtime.cpu_linear import PackedLinear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
MIB = 1 << 20


def read_bandwidth_gbs() -> float:
    t = torch.ones(128 * MIB)  # 512 MiB fp32
    best = float("inf")
    for _ in range(8):
        a = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - a)
    return t.numel() * 4 / best / 1e9


def copies_for(nbytes: int, working_set: int, hot: bool) -> int:
    return 1 if hot else max(2, -(-working_set // nbytes))


def int4_weight(n: int, k: int, group: int, g: torch.Generator) -> Int4Weight:
    """Q4_0-like: fp16 scales (so the kernel holds them as fp16, as for a GGUF file), offset = -8 scale."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half().float()
    return Int4Weight(q, scale, -8 * scale, group)


def weight_bytes(n: int, k: int, group: int) -> int:
    return n * k // 2 + n * (k // group) * 4  # codes + fp16 scale and offset (the same for torch's bf16 pair)


def torch_int4(w: Int4Weight) -> Callable:
    """PyTorch's int4 kernel as Int4Linear ran it before (bf16 scale and zero point)."""
    n = w.shape[0]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32).contiguous(), 1)
    zero = w.offset + 8 * w.scale
    sz = torch.stack([w.scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    gs = w.group_size
    assert n % 16 == 0
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)


def rapidlm_op(lin: Int4Linear) -> Callable:
    """The C++ op alone (as torch_int4 below: no nn.Module call around it)."""
    op = torch.ops.rapidlm_int4.gemm.default
    args = (lin.packed, lin.scales_zeros, lin.out_features, lin.group_size, None)
    return lambda x: op(x, *args)


def make_methods(
    n: int, k: int, group: int, working_set: int, hot: bool
) -> dict[str, tuple[list[Callable], torch.dtype]]:
    """name -> (one callable per weight copy taking x, x dtype)."""
    g = torch.Generator().manual_seed(0)
    c4 = copies_for(weight_bytes(n, k, group), working_set, hot)
    ws = [int4_weight(n, k, group, g) for _ in range(c4)]
    lins = [Int4Linear(w) for w in ws]
    methods: dict[str, tuple[list[Callable], torch.dtype]] = {
        "rapidlm": ([rapidlm_op(lin) for lin in lins], torch.bfloat16),
        "Int4Linear": (lins, torch.bfloat16),
        "f32x": ([Int4Linear(w, act_dtype=torch.float32) for w in ws], torch.float32),
        "torch int4": ([torch_int4(w) for w in ws], torch.bfloat16),
    }
    c16 = copies_for(2 * n * k, working_set, hot)
    methods["bf16 packed"] = (
        [PackedLinear(nn.Linear(k, n, bias=False).to(torch.bfloat16)) for _ in range(c16)],
        torch.bfloat16,
    )
    return methods


def time_methods(methods: dict[str, tuple[list[Callable], torch.dtype]], m: int, k: int, budget_s: float) -> dict:
    xs = {dt: torch.randn(m, k).to(dt) for dt in (torch.float32, torch.bfloat16)}
    times: dict[str, list[float]] = {name: [] for name in methods}
    counters = dict.fromkeys(methods, 0)
    for fns, dt in methods.values():  # warm up (and first-touch every copy)
        for f in fns:
            f(xs[dt])
    rounds = 5
    for r in range(rounds):
        for name, (fns, dt) in methods.items():
            x = xs[dt]
            start = time.perf_counter()
            while time.perf_counter() - start < budget_s / rounds / len(methods) or len(times[name]) <= r:
                f = fns[counters[name] % len(fns)]
                counters[name] += 1
                a = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - a)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def crossover(working_set: int, hot: bool, budget_s: float, ms: list[int]) -> None:
    print(
        "\nLarger batches, bf16 x, group 32, ms per call: the kernel at any M (gemm_small), dequantize + "
        f"at::linear (what gemm runs above M = {int4_cpu.SMALL_M_MAX}), PyTorch's int4 kernel, bf16 PackedLinear."
    )
    print(f"{'N x K':>11} {'M':>5} {'kernel':>9} {'dequant+mm':>11} {'torch int4':>11} {'bf16 packed':>12}")
    g = torch.Generator().manual_seed(1)
    for n, k in [(3072, 576), (576, 1536), (960, 576)]:
        c4 = copies_for(weight_bytes(n, k, 32), working_set, hot)
        ws = [int4_weight(n, k, 32, g) for _ in range(c4)]
        lins = [Int4Linear(w) for w in ws]
        tis = [torch_int4(w) for w in ws]
        c16 = copies_for(2 * n * k, working_set, hot)
        packed = [PackedLinear(nn.Linear(k, n, bias=False).to(torch.bfloat16)) for _ in range(c16)]

        def kernel(x, lin):  # noqa: ANN001, ANN202
            return torch.ops.rapidlm_int4.gemm_small(x, lin.packed, lin.scales_zeros, lin.out_features, 32, None)

        def dequant(x, lin):  # noqa: ANN001, ANN202
            return torch.ops.rapidlm_int4.dequantize_matmul(x, lin.packed, lin.scales_zeros, lin.out_features, 32)

        for m in ms:
            methods = {
                "kernel": ([lambda x, lin=lin: kernel(x, lin) for lin in lins], torch.bfloat16),
                "dequant": ([lambda x, lin=lin: dequant(x, lin) for lin in lins], torch.bfloat16),
                "torch int4": (tis, torch.bfloat16),
                "packed": (packed, torch.bfloat16),
            }
            r = time_methods(methods, m, k, budget_s * (2 if m >= 256 else 1))
            print(
                f"{n:>5} x {k:<4} {m:>5} {r['kernel']:>9.3f} {r['dequant']:>11.3f} {r['torch int4']:>11.3f} "
                f"{r['packed']:>12.3f}",
                flush=True,
            )
        del lins, tis, packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 512], help="batch sizes M (default 1 8 512)")
    ap.add_argument("--working-set", type=int, default=192, help="MiB of weight copies per method (default 192)")
    ap.add_argument("--hot", action="store_true", help="one copy per method: weights stay in cache when they fit")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing budget per (shape, M) (default 1.5)")
    ap.add_argument("--shapes", type=str, nargs="*", help="only these NxK (e.g. 3072x576)")
    ap.add_argument(
        "--crossover",
        type=int,
        nargs="*",
        default=[8, 16, 32, 64, 128, 256, 512, 2048],
        help="batch sizes of the large-M table (none: skip it)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not int4_cpu.load_kernel():
        raise SystemExit("the int4 kernel is not available here")
    print(f"int4 kernel: {torch.ops.rapidlm_int4.simd()}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"{'hot (one weight copy)' if args.hot else f'cold (>= {args.working_set} MiB of weight copies per method)'}, "
        f"read bandwidth (512 MiB sum) {read_bandwidth_gbs():.1f} GB/s"
    )
    working_set = args.working_set * MIB
    names = ["rapidlm", "Int4Linear", "f32x", "torch int4", "bf16 packed"]
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    print(
        f"\n{'N x K':>11} {'g':>3} {'M':>4} " + " ".join(f"{h:>11}" for h in names) + f" {'rapidlm GB/s':>13}"
        f" {'torch GB/s':>11}"
    )
    with torch.inference_mode():
        for n, k in shapes:
            for group in (32, 64) + ((128,) if k == 1536 else ()):
                methods = make_methods(n, k, group, working_set, args.hot)
                for m in args.batch:
                    r = time_methods(methods, m, k, args.seconds * (2 if m >= 256 else 1))
                    gbs = weight_bytes(n, k, group) / (r["rapidlm"] * 1e-3) / 1e9
                    tgbs = weight_bytes(n, k, group) / (r["torch int4"] * 1e-3) / 1e9
                    print(
                        f"{n:>5} x {k:<4} {group:>3} {m:>4} "
                        + " ".join(f"{r[h]:>11.4f}" for h in names)
                        + f" {gbs:>13.1f} {tgbs:>11.1f}",
                        flush=True,
                    )
                del methods
        if args.crossover:
            crossover(working_set, args.hot, args.seconds, args.crossover)


if __name__ == "__main__":
    main()

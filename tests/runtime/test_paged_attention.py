"""CPU paged-attention decode: rapidlm's C++ kernel against the gather + mask + fp64 SDPA reference.

Every pool row that no sequence attends to (spare blocks, the tail of a partial last block, rows before a sliding
window) is NaN, and every table entry a sequence does not read is garbage: a kernel that touched any of them would
return NaN or fail its bounds check. The pools are fp32 or bf16; with bf16 pools the reference reads the same bf16
values (widened to fp64), so the tolerance is the same.
"""

from __future__ import annotations

import importlib
import platform
import shutil

import pytest
import torch

from rapidlm.runtime.kernels import paged_attention
from rapidlm.runtime.kernels.paged_attention import (
    decode_kernel_available,
    paged_attention_decode,
    paged_attention_reference,
)

needs_kernel = pytest.mark.skipif(
    not decode_kernel_available(),
    reason="rapidlm's paged-attention CPU kernel unavailable (no compiler, or RAPIDLM_PAGED_KERNEL=0)",
)

BS = 16


def make_case(
    lens: list[int],
    nh: int,
    nkv: int,
    hd: int,
    window: int = 0,
    seed: int = 0,
    bs: int = BS,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """q, k_pool, v_pool, block_tables, seq_lens, scale for sequences of the given lengths, their blocks shuffled
    through a pool (of `dtype`) with spare blocks; everything the sequences must not read is NaN (pool) or garbage
    (table)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    counts = [-(-n // bs) for n in lens]
    num_blocks = sum(counts) + 3  # spare blocks nobody owns
    max_blocks = max(counts + [0]) + 2  # wider than any sequence needs
    k_pool = torch.full((num_blocks, bs, nkv, hd), float("nan"))
    v_pool = torch.full((num_blocks, bs, nkv, hd), float("nan"))
    tables = torch.randint(-(2**31), 2**31 - 1, (B, max_blocks), generator=g, dtype=torch.int64).to(torch.int32)
    free = iter(torch.randperm(num_blocks, generator=g).tolist())
    for b, n in enumerate(lens):
        start = max(0, n - window) if window else 0
        for j in range(counts[b]):
            lo, hi = max(j * bs, start) - j * bs, min(n, (j + 1) * bs) - j * bs  # rows of block j it reads
            if hi <= lo:
                continue  # wholly before the window: the entry stays garbage (a freed block)
            blk = next(free)
            tables[b, j] = blk
            k_pool[blk, lo:hi] = torch.randn(hi - lo, nkv, hd, generator=g) * 2
            v_pool[blk, lo:hi] = torch.randn(hi - lo, nkv, hd, generator=g)
    q = torch.randn(B, nh, hd, generator=g)
    return q, k_pool.to(dtype), v_pool.to(dtype), tables, torch.tensor(lens, dtype=torch.int32), hd**-0.5


def assert_matches_reference(out: torch.Tensor, args: tuple, window: int = 0) -> None:
    ref = paged_attention_reference(*args, window)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert not ref.isnan().any()
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


LENS = {1: [300], 3: [1, 37, 256], 8: [1, 16, 17, 100, 5, 64, 333, 2]}  # 1, partial blocks, exact blocks, many
BF16 = torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("hd", [64, 128, 40])
@pytest.mark.parametrize("nh,nkv", [(9, 3), (8, 8), (32, 8)])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_kernel_matches_reference(B, nh, nkv, hd):
    args = make_case(LENS[B], nh, nkv, hd, seed=B * 1000 + nh + hd)
    assert_matches_reference(paged_attention_decode(*args), args)


@needs_kernel
@pytest.mark.parametrize("hd", [8, 13, 16, 32, 96, 256])
@pytest.mark.parametrize("nh,nkv", [(4, 2), (16, 2), (16, 1)])
def test_other_head_dims_and_group_sizes(nh, nkv, hd):
    """Every tile width (1, 2, 4, 8, 16 vectors), the generic path (13, 96) and groups split into several tiles."""
    args = make_case([3, 50], nh, nkv, hd, seed=hd + nh)
    assert_matches_reference(paged_attention_decode(*args), args)


@needs_kernel
@pytest.mark.parametrize("window", [1, 7, 16, 50, 500])
@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (8, 8, 40)])
def test_sliding_window(window, nh, nkv, hd):
    args = make_case([1, 20, 100, 333], nh, nkv, hd, window=window, seed=window)
    assert_matches_reference(paged_attention_decode(*args, window), args, window)


@needs_kernel
@pytest.mark.parametrize("hd", [64, 128, 40])
@pytest.mark.parametrize("nh,nkv", [(9, 3), (8, 8), (32, 8)])
@pytest.mark.parametrize("B", [1, 3, 8])
def test_bf16_pools_match_reference(B, nh, nkv, hd):
    """bf16 pools (widened to fp32 in registers): the same function of the same bf16 values as the reference."""
    args = make_case(LENS[B], nh, nkv, hd, seed=B * 1000 + nh + hd, dtype=BF16)
    assert args[1].dtype == args[2].dtype == BF16 and args[1].isnan().any()  # unread rows are NaN in bf16 too
    assert_matches_reference(paged_attention_decode(*args), args)


@needs_kernel
@pytest.mark.parametrize("hd", [8, 13, 16, 32, 96, 256])
@pytest.mark.parametrize("nh,nkv", [(4, 2), (16, 2), (16, 1)])
def test_bf16_other_head_dims_and_group_sizes(nh, nkv, hd):
    args = make_case([3, 50], nh, nkv, hd, seed=hd + nh, dtype=BF16)
    assert_matches_reference(paged_attention_decode(*args), args)


@needs_kernel
@pytest.mark.parametrize("window", [1, 7, 16, 50, 500])
@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (8, 8, 40), (8, 2, 128)])
def test_bf16_sliding_window(window, nh, nkv, hd):
    args = make_case([1, 20, 100, 333], nh, nkv, hd, window=window, seed=window, dtype=BF16)
    assert_matches_reference(paged_attention_decode(*args, window), args, window)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_bf16_pools_are_close_to_fp32_pools(use_kernel, monkeypatch):
    """Rounding K/V to bf16 moves the output by about bf16's precision (2^-8 relative), no more."""
    if use_kernel and not decode_kernel_available():
        pytest.skip("kernel unavailable")
    monkeypatch.setattr(paged_attention, "FORCE_FALLBACK", not use_kernel)
    q, kp, vp, tables, lens, scale = make_case(LENS[8], 9, 3, 64, seed=11)
    fp32 = paged_attention_decode(q, kp, vp, tables, lens, scale)
    bf16 = paged_attention_decode(q, kp.bfloat16(), vp.bfloat16(), tables, lens, scale)
    err = (fp32 - bf16).abs().max().item()
    assert 0 < err < 0.05, err


@needs_kernel
def test_block_size_other_than_16():
    args = make_case([1, 5, 40], 6, 2, 64, bs=5, seed=3)
    assert_matches_reference(paged_attention_decode(*args), args)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_empty_sequence_gives_zeros(use_kernel, monkeypatch):
    if use_kernel and not decode_kernel_available():
        pytest.skip("kernel unavailable")
    monkeypatch.setattr(paged_attention, "FORCE_FALLBACK", not use_kernel)
    args = make_case([0, 20, 0], 4, 2, 64)
    out = paged_attention_decode(*args)
    assert torch.equal(out[0], torch.zeros(4, 64)) and torch.equal(out[2], torch.zeros(4, 64))
    assert_matches_reference(out, args)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_rows_do_not_depend_on_the_batch_or_threads(dtype):
    """A sequence decoded alone or in any batch, on any number of threads, gives bit-identical outputs."""
    q, kp, vp, tables, lens, scale = make_case(LENS[8], 9, 3, 64, seed=5, dtype=dtype)
    together = paged_attention_decode(q, kp, vp, tables, lens, scale)
    alone = torch.cat(
        [paged_attention_decode(q[b : b + 1], kp, vp, tables[b : b + 1], lens[b : b + 1], scale) for b in range(8)]
    )
    assert torch.equal(together, alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(paged_attention_decode(q, kp, vp, tables, lens, scale), together)
    finally:
        torch.set_num_threads(threads)


def chunk_rows(tables: torch.Tensor, lens: torch.Tensor, seq: int, first: int, count: int):
    """The rows the engine sends for a prompt chunk of sequence `seq`: positions first .. first + count - 1, one row
    each, with the sequence's table and length position + 1."""
    return tables[seq : seq + 1].expand(count, -1), torch.arange(first + 1, first + count + 1, dtype=torch.int32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_prompt_chunk_rows_do_not_depend_on_the_batch_or_threads(dtype):
    """A prompt chunk as the engine sends it (one row per query token over one table), alone, after decode rows or
    beside another chunk, on any number of threads: the same bits for each row. Chunks of 12+ rows run as tiles of
    16 (row, head) pairs (several tiles per kv head here, the last one partial); shorter ones row by row."""
    q, kp, vp, tables, lens, scale = make_case([300, 40, 90, 3, 17, 60, 120], 9, 3, 64, seed=11, dtype=dtype)
    pieces = {  # name: (tables, lengths) of its rows
        "decode": (tables[1:6], lens[1:6]),
        "chunk": chunk_rows(tables, lens, 0, 230, 70),  # positions 230..299 of sequence 0
        "other": chunk_rows(tables, lens, 6, 100, 20),  # positions 100..119 of sequence 6
        "short": chunk_rows(tables, lens, 6, 0, 3),  # 3 rows: the row-by-row path
    }
    gen = torch.Generator().manual_seed(3)
    qs = {k: torch.randn(len(t), 9, 64, generator=gen) for k, (t, _) in pieces.items()}
    alone = {k: paged_attention_decode(qs[k], kp, vp, t, n, scale) for k, (t, n) in pieces.items()}
    for k, (t, n) in pieces.items():
        assert_matches_reference(alone[k], (qs[k], kp, vp, t, n, scale))
    order = ["decode", "chunk", "short", "other"]
    rows = torch.cat([pieces[k][0] for k in order])
    row_lens = torch.cat([pieces[k][1] for k in order])
    q_all = torch.cat([qs[k] for k in order])
    expected = torch.cat([alone[k] for k in order])
    threads = torch.get_num_threads()
    try:
        for t in (threads, 1, 3):
            torch.set_num_threads(t)
            assert torch.equal(paged_attention_decode(q_all, kp, vp, rows, row_lens, scale), expected)
    finally:
        torch.set_num_threads(threads)
    # rows of chunks under 12 rows get the bits they get alone, one by one
    short = torch.cat(
        [
            paged_attention_decode(qs["short"][i : i + 1], kp, vp, *chunk_rows(tables, lens, 6, i, 1), scale)
            for i in range(3)
        ]
    )
    assert torch.equal(alone["short"], short)


@needs_kernel
@pytest.mark.parametrize("count", [12, 13, 33, 200])
@pytest.mark.parametrize("first", [0, 7, 250])
@pytest.mark.parametrize("nh,nkv,hd,bs", [(9, 3, 64, 16), (32, 8, 128, 16), (4, 1, 64, 8)])
def test_prompt_chunks_of_any_size_match_the_reference(count, first, nh, nkv, hd, bs):
    """Tiles cut at any row and head (G = 3 heads per kv head: 16-lane tiles straddle rows), chunks starting at
    position 0, inside a block and after many blocks, partial last tiles, other head dims and block sizes."""
    n = first + count
    q, kp, vp, tables, lens, scale = make_case([n], nh, nkv, hd, seed=count + first, bs=bs, dtype=BF16)
    t, row_lens = chunk_rows(tables, lens, 0, first, count)
    qs = torch.randn(count, nh, hd, generator=torch.Generator().manual_seed(1))
    assert_matches_reference(paged_attention_decode(qs, kp, vp, t, row_lens, scale), (qs, kp, vp, t, row_lens, scale))


@needs_kernel
def test_strided_query_is_accepted():
    q, kp, vp, tables, lens, scale = make_case([10, 40], 8, 2, 64)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    assert not q_strided.is_contiguous()
    assert torch.equal(
        paged_attention_decode(q_strided, kp, vp, tables, lens, scale),
        paged_attention_decode(q, kp, vp, tables, lens, scale),
    )


def _bad_inputs() -> list[tuple[str, dict, str]]:
    return [
        ("q float64", {"q": lambda a: a["q"].double()}, "q must be float32"),
        ("q bf16", {"q": lambda a: a["q"].bfloat16()}, "q must be float32"),
        ("k_pool bf16, v_pool fp32", {"k_pool": lambda a: a["k_pool"].bfloat16()}, "float32 or both bfloat16"),
        ("k_pool fp32, v_pool bf16", {"v_pool": lambda a: a["v_pool"].bfloat16()}, "float32 or both bfloat16"),
        (
            "pools fp16",
            {"k_pool": lambda a: a["k_pool"].half(), "v_pool": lambda a: a["v_pool"].half()},
            "float32 or both bfloat16",
        ),
        ("pools fp64", {"k_pool": lambda a: a["k_pool"].double(), "v_pool": lambda a: a["v_pool"].double()}, "both"),
        ("q 2-D", {"q": lambda a: a["q"][:, 0]}, r"\(B, nh, hd\)"),
        ("k_pool 3-D", {"k_pool": lambda a: a["k_pool"][0]}, "k_pool must be"),
        ("v_pool shape", {"v_pool": lambda a: a["v_pool"][:, :8]}, "v_pool shape"),
        ("head dim", {"q": lambda a: a["q"][..., :32]}, "head dim"),
        ("nh not a multiple", {"q": lambda a: a["q"][:, :3]}, "multiple of nkv"),
        ("tables int64", {"block_tables": lambda a: a["block_tables"].long()}, "block_tables must be"),
        ("tables 1-D", {"block_tables": lambda a: a["block_tables"][0]}, "block_tables must be"),
        ("lens int64", {"seq_lens": lambda a: a["seq_lens"].long()}, "seq_lens must be"),
        ("lens length", {"seq_lens": lambda a: a["seq_lens"][:1]}, "seq_lens must be"),
        ("len too long", {"seq_lens": lambda a: a["seq_lens"] + 10_000}, "outside"),
        ("len negative", {"seq_lens": lambda a: a["seq_lens"] - 100}, "outside"),
        ("block out of range", {"block_tables": lambda a: a["block_tables"].fill_(999)}, "not a block of the pool"),
        ("block negative", {"block_tables": lambda a: a["block_tables"].fill_(-1)}, "not a block of the pool"),
        ("window", {"window": lambda a: -1}, "window"),
    ]


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("label,change,match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_are_rejected(label, change, match, use_kernel, monkeypatch):
    if use_kernel and not decode_kernel_available():
        pytest.skip("kernel unavailable")
    monkeypatch.setattr(paged_attention, "FORCE_FALLBACK", not use_kernel)
    q, kp, vp, tables, lens, scale = make_case([5, 40], 8, 2, 64)
    args = {"q": q, "k_pool": kp, "v_pool": vp, "block_tables": tables, "seq_lens": lens, "window": 0}
    for key, fn in change.items():
        args[key] = fn(args)
    with pytest.raises(RuntimeError if use_kernel else ValueError, match=match):
        paged_attention_decode(
            args["q"], args["k_pool"], args["v_pool"], args["block_tables"], args["seq_lens"], scale, args["window"]
        )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_kernel_requires_contiguous_pools(dtype):
    q, kp, vp, tables, lens, scale = make_case([5, 40], 8, 2, 64, dtype=dtype)
    strided = torch.empty(kp.shape[::-1], dtype=dtype).permute(3, 2, 1, 0)
    strided.copy_(kp)
    with pytest.raises(RuntimeError, match="contiguous"):
        paged_attention_decode(q, strided, vp, tables, lens, scale)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_fallback_matches_kernel(dtype, monkeypatch):
    """The pure-torch path (no compiler, or RAPIDLM_PAGED_KERNEL=0) gives the same function."""
    args = make_case(LENS[3], 9, 3, 64, seed=9, dtype=dtype)
    monkeypatch.setattr(paged_attention, "FORCE_FALLBACK", True)
    fallback = paged_attention_decode(*args, 16)
    assert torch.equal(fallback, paged_attention_reference(*args, 16))
    monkeypatch.undo()
    if decode_kernel_available():
        assert_matches_reference(paged_attention_decode(*args, 16), args, 16)


def test_build_failure_warns_and_falls_back(monkeypatch):
    from rapidlm.compress.kernels import build

    def no_compiler(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(build, "build_and_load", no_compiler)
    monkeypatch.setattr(paged_attention, "FORCE_FALLBACK", False)
    monkeypatch.setattr(paged_attention, "_kernel_tried", False)
    monkeypatch.setattr(paged_attention, "_kernel_ready", False)
    args = make_case([20, 3], 4, 2, 64, seed=6)
    with pytest.warns(RuntimeWarning, match="paged CPU kernel unavailable.*no C\\+\\+ compiler"):
        out = paged_attention_decode(*args)
    assert not paged_attention.decode_kernel_available()
    assert torch.equal(out, paged_attention_reference(*args))


def test_env_var_forces_the_fallback(monkeypatch):
    args = make_case([20, 3], 4, 2, 64, seed=4)
    monkeypatch.setenv("RAPIDLM_PAGED_KERNEL", "0")
    try:
        importlib.reload(paged_attention)  # the module reads the variable at import
        assert paged_attention.FORCE_FALLBACK and not paged_attention.decode_kernel_available()
        assert not paged_attention._kernel_tried  # forced off: the build is never attempted
        assert torch.equal(paged_attention.paged_attention_decode(*args), paged_attention_reference(*args))
    finally:
        monkeypatch.undo()
        importlib.reload(paged_attention)  # back to the environment's setting


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_under_torch_compile_fullgraph(use_kernel, dtype, monkeypatch):
    if use_kernel and not decode_kernel_available():
        pytest.skip("kernel unavailable")
    monkeypatch.setattr(paged_attention, "FORCE_FALLBACK", not use_kernel)

    def step(q, k_pool, v_pool, tables, lens):  # noqa: ANN001, ANN202 - ops around the attention, as a model has
        out = paged_attention_decode(q * 1.0, k_pool, v_pool, tables, lens, 0.125, 24)
        return out.sum(dim=-1), out

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for lens, seed in (([3, 40, 17], 1), ([70, 2], 2)):  # two batch sizes / table widths through one graph
        args = make_case(lens, 8, 2, 64, window=24, seed=seed, dtype=dtype)[:5]
        got_sum, got = compiled(*args)
        want_sum, want = step(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") or not shutil.which("g++"),
    reason="the kernel is only required to build on x86-64 Linux with g++",
)
def test_kernel_builds_where_a_compiler_is_present():
    if paged_attention.FORCE_FALLBACK:
        pytest.skip("RAPIDLM_PAGED_KERNEL=0")
    assert paged_attention.load_kernel()
    assert torch.ops.rapidlm_paged.simd() in ("avx512", "avx2")


# ---- the paged cache with a storage dtype narrower than the attention dtype -----------------------------------


def _tiny_cfg():  # noqa: ANN202
    from rapidlm.config import ModelConfig

    return ModelConfig(
        architecture="llama", vocab_size=16, hidden_size=128, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip


def test_paged_cache_storage_defaults_to_the_attention_dtype():
    from rapidlm.runtime.paged_kv import PagedKVCache

    cache = PagedKVCache(_tiny_cfg(), 4, 4, torch.float32, torch.device("cpu"))
    assert cache.storage_dtype == cache.dtype == cache.data.dtype == torch.float32
    layer = cache.layers([[0, 1]], torch.tensor([[5]]), [6])[0]
    assert layer.dtype == layer.k_pool.dtype == torch.float32


@pytest.mark.parametrize("use_kernel", [True, False])
def test_paged_cache_bf16_storage(use_kernel):
    """bf16 pools under fp32 attention: K/V are rounded to bf16 as they are written; prefill (gather + SDPA) and
    decode (the kernel, or gather + SDPA without it) attend over those bf16 values in fp32, and the model-facing
    dtype stays fp32."""
    import torch.nn.functional as F

    from rapidlm.runtime.paged_kv import PagedKVCache

    if use_kernel and not decode_kernel_available():
        pytest.skip("kernel unavailable")
    cfg = _tiny_cfg()
    nh, nkv, hd, bs = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 4
    cache = PagedKVCache(cfg, 8, bs, torch.float32, torch.device("cpu"), use_kernel, storage_dtype=BF16)
    assert cache.data.dtype == BF16 and cache.dtype == torch.float32 and cache.nbytes == cache.data.numel() * 2
    assert (cache.kernel is not None) == use_kernel
    g = torch.Generator().manual_seed(0)
    table, T = [5, 2, 7], 10
    q, k, v = (torch.randn(1, T + 1, n, hd, generator=g) for n in (nh, nkv, nkv))

    def want(t: int) -> torch.Tensor:  # fp32 attention of query t over the bf16-rounded keys/values [0, t]
        kk, vv = (x[:, : t + 1].to(BF16).float().transpose(1, 2) for x in (k, v))
        return F.scaled_dot_product_attention(q[:, t : t + 1].transpose(1, 2), kk, vv, enable_gqa=True)

    pos = torch.arange(T)[None]
    layer = cache.layers([table], pos, [T])[0]
    assert layer.dtype == torch.float32 and layer.k_pool.dtype == BF16
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    out = layer.attend(q[:, :T], k[:, :T], v[:, :T], (torch.zeros_like(pos), pos), mask, T)
    assert out.dtype == torch.float32
    for t in range(T):
        torch.testing.assert_close(out[:, :, t : t + 1], want(t), rtol=1e-5, atol=1e-5)
    stored = cache.data[0, 0, table].view(-1, nkv, hd)[:T]
    assert torch.equal(stored, k[0, :T].to(BF16))  # rounded to bf16 on write

    layer = cache.layers([table], torch.tensor([[T]]), [T + 1])[0]
    assert (layer.kernel is not None) == use_kernel
    out = layer.attend(q[:, T:], k[:, T:], v[:, T:], (torch.zeros(1, 1), torch.tensor([[T]])), None, T + 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want(T), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("storage", [torch.float32, BF16])
def test_prefill_through_the_kernel_equals_gather_and_sdpa(window, storage):
    """A prompt chunk (T > 1 tokens, after earlier ones) through PagedKVCache's kernel path, a kernel row per query
    token, equals the gather + masked SDPA path of the same cache (fp32 attention; tolerance: summation order)."""
    from dataclasses import replace

    from rapidlm.runtime.paged_kv import PagedKVCache

    cfg = replace(_tiny_cfg(), sliding_window=window)
    torch.manual_seed(0)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    tables = [[3, 7, 1], [5, 2, 6]]  # 2 rows, positions 10..20 (T = 11) after 10 cached each
    start, T = 10, 11
    outs = []
    for use_kernel in (True, False):
        cache = PagedKVCache(cfg, 8, 8, torch.float32, torch.device("cpu"), use_kernel, storage)
        gen = torch.Generator().manual_seed(1)
        cache.data.copy_(torch.randn(cache.data.shape, generator=gen).to(storage))
        pos = torch.arange(start, start + T)[None].expand(2, T)
        layer = cache.layers(tables, pos, [start + T] * 2)[0]
        assert (layer.seq_lens is not None) == use_kernel
        q = torch.randn(2, T, nh, hd, generator=gen)
        k, v = torch.randn(2, T, nkv, hd, generator=gen), torch.randn(2, T, nkv, hd, generator=gen)
        slots = torch.arange(start + T)
        allowed = slots[None, None, :] <= pos[:, :, None]
        if window is not None:
            allowed &= slots[None, None, :] > pos[:, :, None] - window
        b_idx = torch.arange(2)[:, None].expand(2, T)
        outs.append(layer.attend(q, k, v, (b_idx, pos), allowed.unsqueeze(1), start + T))  # (B, nh, T, hd)
    assert outs[0].shape == outs[1].shape == (2, nh, T, hd)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=1e-5)


def test_pool_memory_is_zeroed_with_or_without_huge_pages(monkeypatch):
    """The CPU pool is advised as transparent huge pages (Linux); where madvise is missing it is plain zeros."""
    import ctypes

    from rapidlm.runtime import paged_kv

    t = paged_kv._zeros_on_huge_pages((5, 1 << 20), torch.bfloat16)  # 10 MiB: large enough to be advised
    assert t.shape == (5, 1 << 20) and t.dtype == torch.bfloat16 and not t.any()

    def no_libc(*args, **kwargs):
        raise OSError("no libc here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    t = paged_kv._zeros_on_huge_pages((3, 1 << 20), torch.float32)
    assert t.shape == (3, 1 << 20) and not t.any()


@needs_kernel
@pytest.mark.parametrize("window", [None, 6])
def test_static_cache_decode_through_the_kernel(window):
    """A one-token step over the dense (static) cache runs the decode kernel, each (row, kv head) as one block: the
    same attention as SDPA over the row's own slots (fp32 tolerance), and each row bit-identical whatever else is
    in the batch and however long the cache is (what SDPA did not give)."""
    from dataclasses import replace

    import torch.nn.functional as F

    from rapidlm.runtime.kv_cache import StaticKVCache

    cfg = replace(_tiny_cfg(), sliding_window=window)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    lens = [9, 14, 4]  # each row's length after this step's token
    q, k, v = (torch.randn(3, 1, n, hd, generator=g) for n in (nh, nkv, nkv))
    history = torch.randn(2, 3, nkv, 20, hd, generator=g)

    def step(rows: list[int], max_len: int) -> torch.Tensor:
        cache = StaticKVCache(cfg, len(rows), max_len, torch.float32, torch.device("cpu"))
        assert cache.kernel is not None
        for i, r in enumerate(rows):  # the row's earlier keys and values (layer 0 is the one used)
            cache.data[0, :, i, :, : lens[r] - 1] = history[:, r, :, : lens[r] - 1]
        layer = cache.layers()[0]
        pos = torch.tensor([[lens[r] - 1] for r in rows])
        b_idx = torch.arange(len(rows))[:, None]
        return layer.attend(q[rows], k[rows], v[rows], (b_idx, pos), None, max(lens[r] for r in rows))

    batched = step([0, 1, 2], 24)
    assert batched.shape == (3, nh, 1, hd)
    for r in range(3):
        assert torch.equal(step([r], lens[r] + 3)[0], batched[r])  # alone, a shorter cache: the same bits
        n = lens[r]
        keys = torch.cat([history[0, r, :, : n - 1], k[r, 0, :, None]], dim=1)  # (nkv, n, hd)
        values = torch.cat([history[1, r, :, : n - 1], v[r, 0, :, None]], dim=1)
        lo = max(0, n - window) if window else 0
        want = F.scaled_dot_product_attention(
            q[r].transpose(0, 1)[None], keys[None, :, lo:], values[None, :, lo:], enable_gqa=True
        )[0]  # (nh, 1, hd)
        torch.testing.assert_close(batched[r], want, rtol=1e-5, atol=2e-6)

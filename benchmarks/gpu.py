"""CUDA benchmark (issue 7): correctness tests, HBM bandwidth, batch-1 decode (bf16/int8/int4), paged batched decode,
and transformers' generate with its static cache + torch.compile on the same shapes, in one run.

    PYTHONPATH=. python benchmarks/gpu.py --out OUTDIR [--budget 420] [--parts env,pytest,decode,paged,hf]

Weights are random at real shapes (Llama-2-7B: 32 layers, d=4096, MLP 11008, 32 heads, vocab 32000; Llama-3-8B:
GQA 32/8, MLP 14336, vocab 128256), built directly on the GPU. Each part runs in its own process with a time limit
(what is left of --budget), so one failure or timeout loses only that part; results go to OUTDIR/results.json
after every part and the log to OUTDIR/log.txt; a table is printed last.

Decode figures: "graph" = rapidlm's decode step (CUDA graph over the fused forward) replayed in a loop with greedy
argmax on the device and no host sync until the end (model throughput); "engine" = LLM-level generation through
rapidlm's Engine (sampling, detokenization, one host sync per token). Limit = copy bandwidth / bytes read per token
(every weight byte once + the KV cache at the mean context); fraction = tok/s / limit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
}  # fmt: skip
PROMPT = 128  # prompt tokens before the timed decode steps
STEPS = 128  # timed decode steps
PART_LIMITS = {"env": 90, "decode": 200, "hf": 200, "pytest": 150, "paged": 120}


# ---- helpers (run inside the parts) ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def sync():  # noqa: ANN201
    import torch

    torch.cuda.synchronize()


def build_model(shape: str, dtype=None, seed: int = 0):  # noqa: ANN001, ANN201
    """rapidlm Transformer with random weights (std 0.02, norms ~1) built on the GPU without a CPU copy."""
    import torch

    from rapidlm.config import ModelConfig
    from rapidlm.models.llama import Transformer

    dtype = dtype or torch.bfloat16
    cfg = ModelConfig("LlamaForCausalLM", **SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg, max_seq_len=1024)
    model = model.to_empty(device="cuda").to(dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32))
            else:
                p.normal_(0, 0.02, generator=g)
    model.reset_rope("cuda")
    return model.eval(), cfg


def weight_bytes(model) -> int:  # noqa: ANN001
    """Bytes a decode step reads from the model: every parameter and buffer except the embedding table (one row
    is gathered) and the RoPE tables (one row each); a tied embedding counts once, as the head."""
    seen, total = set(), 0
    skip = {id(model.rope_cos), id(model.rope_sin)}
    if not model.cfg.tie_word_embeddings:
        skip.add(id(model.embed.weight))
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in skip or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(cfg, context: float, dtype_bytes: int = 2) -> float:  # noqa: ANN001
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes * context


def word_tokenizer(vocab: int):  # noqa: ANN201
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from rapidlm.loading.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, eos_token_ids=[2])


def bandwidth_gbs() -> dict:
    import torch

    n = 2 * 1024**3  # 2 GiB source -> 2 GiB destination
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    t = times[len(times) // 2]
    del src, dst
    torch.cuda.empty_cache()
    return {"copy_bytes": n, "copy_s_median": t, "copy_GBps_read_plus_write": 2 * n / t / 1e9}


def time_fn(fn, iters: int = 50) -> float:  # noqa: ANN001
    import torch

    fn()
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


# ---- parts ------------------------------------------------------------------------------------------------------


def part_env(res: dict) -> None:
    import torch

    props = torch.cuda.get_device_properties(0)
    res["device"] = torch.cuda.get_device_name(0)
    res["sm_count"] = props.multi_processor_count
    res["memory_GiB"] = round(props.total_memory / 1024**3, 1)
    res["torch"] = torch.__version__
    res["cuda"] = torch.version.cuda
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except ImportError:
        res["transformers"] = None
    try:
        q = "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
        res["nvidia_smi"] = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True,
                                           text=True, timeout=20).stdout.strip()  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        res["nvidia_smi"] = f"unavailable: {exc}"
    res["bandwidth"] = bandwidth_gbs()
    log(f"bandwidth: {res['bandwidth']}")
    gemv_micro(res)


def gemv_micro(res: dict) -> None:
    """GB/s of each matmul kind at M=1 on the 7B shapes, rotating over copies larger than L2 together."""
    import torch

    from rapidlm.compress.kernels import cuda_linear as cl

    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
              "head": (32000, 4096)}  # fmt: skip
    out: dict = {}
    for name, (n, k) in shapes.items():
        row = _gemv_shape(n, k)
        out[name] = row
        log(f"gemv {name} {n}x{k}: " + ", ".join(f"{k2} {v:.0f} GB/s" if isinstance(v, float) else f"{k2} {v}"
                                                 for k2, v in row.items()))  # fmt: skip
        torch.cuda.empty_cache()
    res["gemv_GBps"] = out
    res["gemv_tuned"] = {str(k): v for k, v in cl.tuned_configs().items()}


def _gemv_shape(n: int, k: int) -> dict:
    import torch
    import torch.nn.functional as F

    from rapidlm.compress.kernels import cuda_linear as cl
    from rapidlm.compress.kernels.int4_cpu import Int4Weight
    from rapidlm.compress.primitives import QuantSpec, choose_qparams, quantize
    from rapidlm.compress.quantize import int8_weight

    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    row: dict = {}
    wb = w.bfloat16()
    row["cublas_bf16"] = _rotating_gbps(lambda: wb.clone(), wb.nbytes, lambda t: F.linear(x, t))
    if not cl.HAS_TRITON:
        return row
    cl.DENSE_BACKEND = "triton"
    row["triton_bf16"] = _rotating_gbps(lambda: wb.clone(), wb.nbytes, lambda t: cl.linear_decode(x, t, None))
    cl.DENSE_BACKEND = "auto"
    m8 = cl.CudaInt8Linear(int8_weight(w), None)
    b8 = m8.q.nbytes + m8.scale.nbytes
    row["triton_int8"] = _rotating_gbps(lambda: cl.CudaInt8Linear(int8_weight(w), None), b8, lambda m: m(x))
    spec = QuantSpec(4, 128, symmetric=False)
    s, o = choose_qparams(w, spec)
    w4 = Int4Weight(quantize(w, s, o, spec), s, o, 128)
    for backend in ("triton", "tinygemm"):
        try:
            b4 = sum(t.nbytes for t in cl.CudaInt4Linear(w4, None, backend=backend).buffers())
            make = lambda backend=backend: cl.CudaInt4Linear(w4, None, backend=backend)  # noqa: E731
            row[f"{backend}_int4"] = _rotating_gbps(make, b4, lambda m: m(x))
        except Exception as exc:  # noqa: BLE001
            row[f"{backend}_int4"] = f"error: {exc!r}"[:200]
    return row


def _rotating_gbps(make, nbytes: int, call) -> float:  # noqa: ANN001
    """GB/s of call(item), timed as 16 calls captured in a CUDA graph (no Python launch cost) over enough copies
    (make()) to exceed 256 MiB together, so L2 never holds the weight."""
    import torch

    items = [make() for _ in range(max(2, -(-256 * 1024**2 // nbytes)))]
    call(items[0])
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(16):
            call(items[i % len(items)])
    graph.replay()
    sync()
    return 16 * nbytes / time_fn(graph.replay, iters=5) / 1e9


def part_pytest(res: dict) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
           "-rfE", "--timeout=120"]  # fmt: skip
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        cmd.remove("--timeout=120")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-6000:]
    log(tail)
    res["returncode"] = proc.returncode
    res["summary"] = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " failed" in ln][-1:]
    res["tail"] = tail[-2500:]


def _decode_variant(shape: str, variant: str, bw: float | None) -> dict:
    import torch

    from rapidlm.compress.configs import Int4WeightOnly, Int8WeightOnly
    from rapidlm.compress.kernels import cuda_linear as cl
    from rapidlm.compress.quantize import quantize
    from rapidlm.engine.engine import Engine
    from rapidlm.engine.sampling import SamplingParams
    from rapidlm.runtime.model_runner import ModelRunner

    r: dict = {"shape": shape, "variant": variant}
    t0 = time.perf_counter()
    model, cfg = build_model(shape)
    cl.DENSE_BACKEND = "cublas" if variant == "bf16-cublas" else "auto"
    if variant == "int8":
        quantize(model, Int8WeightOnly())
    elif variant.startswith("int4"):
        cl.INT4_BACKEND = "tinygemm" if variant == "int4-tinygemm" else "triton"
        quantize(model, Int4WeightOnly(group_size=128))
    torch.cuda.empty_cache()
    r["build_s"] = round(time.perf_counter() - t0, 1)
    runner = ModelRunner(model, cfg, torch.device("cuda"), torch.bfloat16)
    r["graphs"] = runner.cuda_graphs is not None
    wb = weight_bytes(model)
    r["weight_GB"] = wb / 1e9
    dev = torch.device("cuda")
    max_len = PROMPT + STEPS + 16
    cache = runner.allocate(1, max_len)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT,)).tolist()
    t0 = time.perf_counter()
    runner.prefill(cache, 0, prompt)
    sync()
    r["prefill_first_s"] = round(time.perf_counter() - t0, 3)
    tok = torch.tensor([1], device=dev)
    pos = torch.tensor([PROMPT], device=dev)
    t0 = time.perf_counter()
    logits = runner.decode(cache, tok, pos, PROMPT + 1)  # captures the graph (Triton compile + tuning first time)
    sync()
    r["first_decode_s"] = round(time.perf_counter() - t0, 2)
    if variant == "bf16":  # graph decode and the eager bf16 model against the same weights in fp32, same step
        from rapidlm.runtime.kv_cache import StaticKVCache

        def rel(a, b) -> float:  # noqa: ANN001
            return ((a - b).abs().max() / b.abs().max()).item()

        ref_cache = runner.allocate(1, max_len)
        with torch.inference_mode():
            runner.prefill(ref_cache, 0, prompt)
            eager = model(tok[:, None], pos[:, None], ref_cache.layers(), PROMPT + 1)[:, 0].float()
        del ref_cache
        r["graph_vs_eager_bf16_rel_err"] = rel(logits, eager)
        try:
            import copy

            ref = copy.deepcopy(model).float()
            ref.reset_rope("cuda")
            c32 = StaticKVCache(cfg, 1, max_len, torch.float32, dev)
            ids = torch.tensor([prompt], device=dev)
            with torch.inference_mode():
                ref(ids, torch.arange(PROMPT, device=dev)[None], c32.layers(), PROMPT)
                want = ref(tok[:, None], pos[:, None], c32.layers(), PROMPT + 1)[:, 0].float()
            r["graph_vs_fp32_rel_err"] = rel(logits, want)
            r["eager_bf16_vs_fp32_rel_err"] = rel(eager, want)
            r["graph_vs_fp32_top1_agree"] = bool(logits.argmax() == want.argmax())
            del ref, c32
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            r["fp32_check_error"] = repr(exc)[:300]
    # model-level: replay + argmax on the device, no host sync until the end
    for _ in range(8):
        logits = runner.decode(cache, tok, pos, 0)
        tok = logits.argmax(-1)
    pos = torch.tensor([PROMPT], device=dev)
    sync()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(STEPS):
        logits = runner.decode(cache, tok, pos, 0)
        tok = logits.argmax(-1)
        pos += 1
    b.record()
    b.synchronize()
    step_s = a.elapsed_time(b) / 1e3 / STEPS
    r["graph_ms_per_token"] = step_s * 1e3
    r["graph_tok_s"] = 1 / step_s
    bytes_tok = wb + kv_bytes_per_token(cfg, PROMPT + STEPS / 2)
    r["bytes_per_token_GB"] = bytes_tok / 1e9
    if bw:
        r["limit_tok_s"] = bw / bytes_tok
        r["fraction_of_limit"] = r["graph_tok_s"] / r["limit_tok_s"]
    # engine-level greedy generation (what LLM.generate runs)
    try:
        engine = Engine(runner, word_tokenizer(cfg.vocab_size))
        p = SamplingParams(temperature=0, max_tokens=STEPS + 1, ignore_eos=True)
        for _ in range(2):  # the same cache shape twice: the second call reuses the first one's graph
            seqs = engine.make_sequences([prompt], [p])
            first = None
            for i, _chunk in enumerate(engine.run(seqs)):
                if i == 0:  # prefill and the first token are done: time the STEPS decode steps after it
                    sync()
                    first = time.perf_counter()
            sync()
            t1 = time.perf_counter()
        r["engine_tok_s"] = (STEPS) / (t1 - first)
    except Exception as exc:  # noqa: BLE001
        r["engine_error"] = repr(exc)[:300]
    r["tuned"] = {str(k): v for k, v in cl.tuned_configs().items()}
    del runner, model, cache
    torch.cuda.empty_cache()
    return r


def part_decode(res: dict, bw: float | None, variants: list[tuple[str, str]]) -> None:
    res["runs"] = []
    for shape, variant in variants:
        try:
            r = _decode_variant(shape, variant, bw)
        except Exception:  # noqa: BLE001
            r = {"shape": shape, "variant": variant, "error": traceback.format_exc()[-1500:]}
        log(json.dumps(r))
        res["runs"].append(r)
        _flush_partial(res)


def part_paged(res: dict, bw: float | None) -> None:
    import torch

    from rapidlm.runtime.cuda_graphs import PagedDecodeGraph

    model, cfg = build_model("llama2-7b")
    wb = weight_bytes(model)
    bs, ctx, steps = 16, PROMPT, 64
    res["context"], res["steps"], res["block_size"] = ctx, steps, bs
    res["runs"] = []
    for B in (1, 8, 32, 64):
        r: dict = {"batch": B}
        try:
            nb = -(-(ctx + steps + 1) // bs)
            num_blocks = B * nb + 1
            pool = torch.randn((cfg.num_layers, 2, num_blocks, bs, cfg.num_kv_heads, cfg.head_dim),
                               dtype=torch.bfloat16, device="cuda")  # fmt: skip
            pool.mul_(0.5)
            tables = (torch.randperm(num_blocks - 1, device="cuda")[: B * nb] + 1).view(B, nb).to(torch.int32)
            tokens = torch.randint(0, cfg.vocab_size, (B,), device="cuda")
            positions = torch.full((B,), ctx, device="cuda") - torch.arange(B, device="cuda") % 7  # ragged
            t0 = time.perf_counter()
            with torch.inference_mode():
                graph = PagedDecodeGraph(model, pool, tokens, positions, tables)
                sync()
                r["capture_s"] = round(time.perf_counter() - t0, 2)
                for _ in range(4):
                    tokens = graph(tokens, positions, tables).argmax(-1)
                sync()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(steps):
                    tokens = graph(tokens, positions, tables).argmax(-1)
                    positions += 1
                b.record()
                b.synchronize()
            step = a.elapsed_time(b) / 1e3 / steps
            r["ms_per_step"] = step * 1e3
            r["tok_s"] = B / step
            kv = B * kv_bytes_per_token(cfg, ctx + steps / 2)
            r["bytes_per_step_GB"] = (wb + kv) / 1e9
            if bw:
                r["fraction_of_limit"] = (wb + kv) / step / bw
            del graph, pool
        except Exception:  # noqa: BLE001
            r["error"] = traceback.format_exc()[-1500:]
        torch.cuda.empty_cache()
        log(json.dumps(r))
        res["runs"].append(r)
        _flush_partial(res)
    # the serving engine's own paged cache (eager forward, no graph), if it is in this tree
    try:
        from rapidlm.runtime.model_runner import ModelRunner

        runner = ModelRunner(model, cfg, torch.device("cuda"), torch.bfloat16)
        if hasattr(runner, "allocate_paged"):
            eng = {}
            for B in (1, 64):
                nb = -(-(ctx + 9) // bs)
                cache = runner.allocate_paged(B * nb + 1, bs)
                tables = [[1 + b * nb + j for j in range(nb)] for b in range(B)]
                runner.forward_paged(cache, [[5] for _ in range(B)], [ctx] * B, tables)
                sync()
                t0 = time.perf_counter()
                for s in range(8):
                    runner.forward_paged(cache, [[5] for _ in range(B)], [ctx + 1 + s] * B, tables)
                sync()
                eng[B] = B * 8 / (time.perf_counter() - t0)
            res["engine_paged_eager_tok_s"] = eng
            log(f"engine paged cache, eager forward: {eng}")
    except Exception:  # noqa: BLE001
        res["engine_paged_error"] = traceback.format_exc()[-800:]


def part_hf(res: dict, shape: str) -> None:
    import torch
    import transformers

    s = SHAPES[shape]
    cfg = transformers.LlamaConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=s["max_position_embeddings"],
        **({"rope_theta": s["rope_theta"]} if "rope_theta" in s else {}),
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    model.generation_config.cache_implementation = "static"
    model.generation_config.pad_token_id = 0
    ids = torch.randint(0, s["vocab_size"], (1, PROMPT), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        assert out.shape[1] == PROMPT + n, out.shape
        return time.perf_counter() - t

    res["mode"] = "generate(cache_implementation='static'): transformers' own auto-compile of the decode step"
    t0 = time.perf_counter()
    gen(16 + STEPS)  # compiles; sizes the static cache for the longest call so later calls reuse it
    res["first_generate_s"] = round(time.perf_counter() - t0, 1)
    res["compiled"] = getattr(model, "_compiled_call", None) is not None
    log(f"hf first generate (compile) {res['first_generate_s']} s, compiled: {res['compiled']}")
    gen(16)
    short = min(gen(16) for _ in range(2))
    long = min(gen(16 + STEPS) for _ in range(2))
    res["tok_s"] = STEPS / (long - short)
    res["ms_per_token"] = (long - short) / STEPS * 1e3
    log(f"hf {shape}: {res['tok_s']:.1f} tok/s")


# ---- orchestration ----------------------------------------------------------------------------------------------

_PARTIAL: dict = {}


def _flush_partial(res: dict) -> None:
    out = _PARTIAL.get("path")
    if out:
        Path(out).write_text(json.dumps(res, indent=1, default=str))


def run_part(args: argparse.Namespace) -> None:
    import torch

    res: dict = {}
    out = Path(args.out) / f"part-{args.part}.json"
    _PARTIAL["path"] = str(out)
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = args.bw
    try:
        if args.part == "env":
            part_env(res)
        elif args.part == "pytest":
            part_pytest(res)
        elif args.part == "decode":
            variants = [tuple(v.split(":")) for v in args.variants.split(",")]
            part_decode(res, bw, variants)
        elif args.part == "paged":
            part_paged(res, bw)
        elif args.part == "hf":
            part_hf(res, args.hf_shape)
    except Exception:  # noqa: BLE001
        res["error"] = traceback.format_exc()[-2000:]
        log(res["error"])
    out.write_text(json.dumps(res, indent=1, default=str))


def fmt(v, nd: int = 1) -> str:  # noqa: ANN001
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else "-"


def table(results: dict) -> str:
    lines = []
    env = results.get("env", {})
    bw = env.get("bandwidth", {}).get("copy_GBps_read_plus_write")
    lines.append(f"device: {env.get('device')} | {env.get('nvidia_smi')} | torch {env.get('torch')} | "
                 f"triton {env.get('triton')} | transformers {env.get('transformers')}")  # fmt: skip
    lines.append(f"copy bandwidth (read+write): {fmt(bw, 0)} GB/s")
    py = results.get("pytest", {})
    lines.append(f"pytest -m cuda: rc={py.get('returncode')} {py.get('summary')}")
    lines.append("")
    lines.append("| shape | variant | GB/token | ms/token | tok/s (graph) | limit tok/s | fraction | tok/s (engine) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in results.get("decode", {}).get("runs", []):
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error'].splitlines()[-1][:80]} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['variant']} | {fmt(r.get('bytes_per_token_GB'), 2)} | "
            f"{fmt(r.get('graph_ms_per_token'), 3)} | {fmt(r.get('graph_tok_s'))} | {fmt(r.get('limit_tok_s'))} | "
            f"{fmt(r.get('fraction_of_limit'), 3)} | {fmt(r.get('engine_tok_s'))} |"
        )
    hf = results.get("hf", {})
    if hf:
        lines.append(f"transformers generate static+compile: {fmt(hf.get('tok_s'))} tok/s "
                     f"(first generate {hf.get('first_generate_s')} s) {hf.get('error', '')[-200:]}")  # fmt: skip
    pg = results.get("paged", {})
    if pg:
        lines.append("")
        lines.append("| batch | ms/step | tok/s | fraction of bandwidth |")
        lines.append("|---|---|---|---|")
        for r in pg.get("runs", []):
            lines.append(f"| {r['batch']} | {fmt(r.get('ms_per_step'), 3)} | {fmt(r.get('tok_s'))} | "
                         f"{fmt(r.get('fraction_of_limit'), 3)} | {r.get('error', '')[-100:]}")  # fmt: skip
        if "engine_paged_eager_tok_s" in pg:
            lines.append(f"engine's PagedKVCache, eager forward: {pg['engine_paged_eager_tok_s']} tok/s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / ".bench-work" / "gpu")))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together")
    ap.add_argument("--parts", default="env,decode,hf,pytest,paged")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--bw", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--variants",
        default="llama2-7b:bf16,llama2-7b:int4,llama2-7b:int8,llama2-7b:int4-tinygemm,llama2-7b:bf16-cublas,"
        "llama3-8b:bf16,llama3-8b:int4",
    )
    ap.add_argument("--hf-shape", default="llama2-7b")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args)
        return
    start = time.perf_counter()
    results: dict = {"command": " ".join(sys.argv)}
    logf = open(Path(args.out) / "log.txt", "a")  # noqa: SIM115
    for part in args.parts.split(","):
        left = args.budget - (time.perf_counter() - start)
        limit = min(PART_LIMITS.get(part, 120), left - 5)
        if limit < 20:
            results[part] = {"skipped": f"budget left {left:.0f} s"}
            continue
        bw = results.get("env", {}).get("bandwidth", {}).get("copy_GBps_read_plus_write")
        cmd = [sys.executable, __file__, "--part", part, "--out", args.out, "--variants", args.variants,
               "--hf-shape", args.hf_shape] + (["--bw", str(bw * 1e9)] if bw else [])  # fmt: skip
        t0 = time.perf_counter()
        logf.write(f"\n===== {part} (limit {limit:.0f} s) =====\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:  # end the part and everything it started (pytest, compile workers)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        pj = Path(args.out) / f"part-{part}.json"
        res = json.loads(pj.read_text()) if pj.exists() else {}
        res["_rc"], res["_seconds"] = rc, round(time.perf_counter() - t0, 1)
        results[part] = res
        if pj.exists():
            pj.unlink()
        (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"[{part}] rc={rc} in {res['_seconds']} s", flush=True)
    logf.close()
    text = table(results)
    (Path(args.out) / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""CUDA paths: run only where a GPU is present (skipped on CPU-only machines and in CI).

Self-contained on a GPU machine: the checkpoints are tiny random transformers models with a word-level tokenizer
written here (no download, no packaged GGUF). Tolerances are stated per test; fp32 comparisons run with TF32 off.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from rapidlm import LLM, SamplingParams
from tests.helpers import tiny_hf_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

needs_triton = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("triton"), reason="the CUDA kernels are written in Triton"
)


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def hf_folder(model: nn.Module, folder: Path) -> Path:
    """Save a transformers model with a word-level tokenizer ("t0", "t1", ... one per id): no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(folder, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "bos_token": "t1"}))
    return folder


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2), ("float16", 5e-3)])
def test_cuda_logits_close_to_cpu_fp32(tmp_path, dtype, tol):
    ref = tiny_hf_model("Qwen2ForCausalLM", tie_word_embeddings=False)
    folder = hf_folder(ref, tmp_path / "m")
    cpu = LLM(folder, device="cpu", dtype="float32")
    gpu = LLM(folder, device="cuda", dtype=dtype)
    ids = list(range(500, 540))
    a = cpu.runner.prefill(cpu.runner.allocate(1, 64), 0, ids)
    b = gpu.runner.prefill(gpu.runner.allocate(1, 64), 0, ids).cpu()
    assert (a - b).abs().max() <= tol * a.abs().max()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_cuda_decode_matches_transformers(tmp_path, arch, dtype, tol):
    """Prefill + graph-captured decode steps against transformers' full forward on the same tokens, on the GPU.
    Tolerance: max |diff| <= tol * max |reference logit|; bf16 against transformers in fp32."""
    extra = {"sliding_window": 6} if arch == "MistralForCausalLM" else {}
    ref = tiny_hf_model(arch, **extra)
    folder = hf_folder(ref, tmp_path / "m")
    ref = ref.to("cuda", torch.float32)
    llm = LLM(folder, device="cuda", dtype=dtype)
    assert llm.runner.cuda_graphs is not None or not _triton()
    runner = llm.runner
    ids = [5, 17, 300, 41, 9, 77, 1000, 3]
    cache = runner.allocate(1, 32)
    logits = [runner.prefill(cache, 0, ids)]
    seq = list(ids)
    for _ in range(10):
        nxt = int(logits[-1].argmax())
        seq.append(nxt)
        pos = len(seq) - 1
        tok, at = torch.tensor([nxt], device="cuda"), torch.tensor([pos], device="cuda")
        logits.append(runner.decode(cache, tok, at, pos + 1)[0])
    with torch.no_grad():
        want = ref(torch.tensor([seq], device="cuda")).logits[0].float()  # (T, V)
    got = torch.stack(logits)  # logits after ids[-1], then after each decoded token
    assert rel_err(got, want[len(ids) - 1 :]) <= tol


def _triton() -> bool:
    from rapidlm.runtime.kernels.paged_attention_triton import decode_kernel_available

    return decode_kernel_available()


@needs_triton
def test_cuda_graph_decode_equals_eager(tmp_path, monkeypatch):
    folder = hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m")
    llm = LLM(folder, device="cuda", dtype="float32")
    assert llm.runner.cuda_graphs is not None
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [list(range(100, 110)), list(range(200, 213))]
    graphed = llm.generate(prompts, p)
    graphs, llm.runner.cuda_graphs = llm.runner.cuda_graphs, None  # the eager model
    eager = llm.generate(prompts, p)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert graphs.graphs  # the graph path did run


def test_cuda_batch_equals_single(tmp_path):
    folder = hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m")
    llm = LLM(folder, device="cuda", dtype="float32")
    prompts = [list(range(100, 110)), list(range(200, 230))]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batched = llm.generate(prompts, p)
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == llm.generate([prompt], p)[0].token_ids


def test_cuda_serving_engine_equals_generate(tmp_path):
    """The continuous-batching engine on a CUDA paged cache (Triton paged attention; a forward per batch and per
    prompt chunk, since one flat forward per step is CPU-only): greedy outputs equal LLM.generate's."""
    from rapidlm.engine.llm_engine import EngineConfig, EngineCore

    folder = hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m")
    llm = LLM(folder, device="cuda", dtype="float32")
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [list(range(100, 110)), list(range(200, 237)), [5, 6, 7]]
    core = EngineCore(llm.runner, llm.tokenizer, EngineConfig(max_batched_tokens=24, block_size=4))
    assert core.cache.device.type == "cuda" and not core.flat
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        core.add_request(str(i), prompt, p)
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    while core.has_unfinished:
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [got[str(i)] for i in range(len(prompts))] == [llm.generate([q], p)[0].token_ids for q in prompts]
    assert core.kv.num_used == 0


# ---- kernels -----------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,nh,nkv,hd,bs,nb,window",
    [(3, 8, 2, 64, 16, 20, 0), (1, 32, 32, 128, 16, 64, 0), (5, 4, 4, 128, 8, 9, 17), (64, 8, 8, 64, 16, 4, 0)],
)
def test_triton_paged_attention_matches_reference(dtype, B, nh, nkv, hd, bs, nb, window):
    """Against the CPU op's fp64 reference on the same (rounded) inputs: fp32 within 1e-5, bf16 within 1e-2
    (relative to max |out|; bf16 rounds the output)."""
    from rapidlm.runtime.kernels.paged_attention import paged_attention_reference
    from rapidlm.runtime.kernels.paged_attention_triton import paged_attention_decode

    g = torch.Generator().manual_seed(B * 1000 + nh)
    nblocks = B * nb + 5
    k = torch.randn(nblocks, bs, nkv, hd, generator=g).to(dtype)
    v = torch.randn(nblocks, bs, nkv, hd, generator=g).to(dtype)
    q = torch.randn(B, nh, hd, generator=g).to(dtype)
    tables = torch.randperm(nblocks, generator=g)[: B * nb].view(B, nb).to(torch.int32)
    lens = torch.randint(0, nb * bs + 1, (B,), generator=g, dtype=torch.int32)
    lens[0] = nb * bs
    ref = paged_attention_reference(q.float(), k.float(), v.float(), tables, lens, hd**-0.5, window)
    out = torch.full_like(q, float("nan"), device="cuda")
    got = paged_attention_decode(
        q.cuda(), k.cuda(), v.cuda(), tables.cuda(), lens.cuda(), hd**-0.5, window, out=out
    ).cpu()
    assert not got.isnan().any()
    assert rel_err(got, ref) <= (1e-5 if dtype == torch.float32 else 1e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_paged_decode_matches_dense(tmp_path, dtype):
    """The fused forward over a paged pool (scattered blocks) equals the same over the dense cache."""
    from rapidlm.runtime.cuda_graphs import PagedDecodeGraph, fused_decode_forward

    folder = hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path / "m")
    llm = LLM(folder, device="cuda", dtype="float32" if dtype == torch.float32 else "bfloat16")
    runner, cfg = llm.runner, llm.config
    lens = [9, 30, 17]
    B, bs, S = len(lens), 16, 64
    dense = runner.allocate(B, S)
    for row, n in enumerate(lens):
        runner.prefill(dense, row, list(range(50 + row, 50 + row + n)))
    nb = S // bs
    pool = torch.zeros((cfg.num_layers, 2, B * nb + 3, bs, cfg.num_kv_heads, cfg.head_dim), dtype=dense.dtype,
                       device="cuda")  # fmt: skip
    tables = (torch.randperm(B * nb + 3)[: B * nb].view(B, nb) + 0).to(torch.int32).cuda()
    for row in range(B):  # copy each row's dense cache into its blocks
        for j in range(nb):
            pool[:, :, tables[row, j]] = dense.data[:, :, row, :, j * bs : (j + 1) * bs].transpose(2, 3)
    tokens = torch.tensor([7, 8, 9], device="cuda")
    positions = torch.tensor(lens, device="cuda")
    with torch.inference_mode():
        want = fused_decode_forward(runner.model, tokens, positions, [(x.k, x.v) for x in dense.layers()])
        graph = PagedDecodeGraph(runner.model, pool, tokens, positions, tables)
        got = graph(tokens, positions, tables)
    assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)


def _int4_weight(w: torch.Tensor, g: int):
    from rapidlm.compress.kernels.int4_cpu import Int4Weight
    from rapidlm.compress.primitives import QuantSpec, choose_qparams, quantize

    spec = QuantSpec(4, g, symmetric=False)
    s, o = choose_qparams(w, spec)
    return Int4Weight(quantize(w, s, o, spec), s, o, g)


@needs_triton
@pytest.mark.parametrize("M", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int4-g128", "int4-g32", "int4-tinygemm"])
def test_cuda_quantized_linear_matches_dequantized(M, dtype, kind):
    """Kernel output against x @ dequantized(W)^T in fp64: fp32 within 1e-5, bf16 within 1e-2 (relative to the
    largest output; bf16 rounds x for the kernel and the reference alike, and the output once)."""
    from rapidlm.compress.kernels.cuda_linear import CudaInt4Linear, CudaInt8Linear
    from rapidlm.compress.quantize import int8_weight

    if kind == "int4-tinygemm" and dtype != torch.bfloat16:
        pytest.skip("PyTorch's int4 kernel takes bf16 activations")
    torch.manual_seed(M)
    N, K = 200, 1024
    w = torch.randn(N, K, device="cuda")
    bias = torch.randn(N, device="cuda")
    if kind == "int8":
        mod = CudaInt8Linear(int8_weight(w), bias)
    else:
        g = 32 if kind == "int4-g32" else 128
        mod = CudaInt4Linear(_int4_weight(w, g), bias, backend="tinygemm" if kind == "int4-tinygemm" else "triton")
    x = torch.randn(M, K, device="cuda").to(dtype)
    want = x.double() @ mod.dequantize().double().t() + bias.double()
    got = mod(x)
    assert got.dtype == dtype and got.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else (2e-2 if kind == "int4-tinygemm" else 1e-2)
    assert rel_err(got, want) <= tol
    assert rel_err(mod.dequantize(), w) <= (0.02 if kind == "int8" else 0.2)  # quantization error, not kernel


def _dequantized_copy(model: nn.Module) -> nn.Module:
    from rapidlm.compress.kernels.cuda_linear import CudaInt4Linear, CudaInt8Linear

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, (CudaInt4Linear, CudaInt8Linear)):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="cuda")
            lin.weight.data = m.dequantize()
            if m.bias is not None:
                lin.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, lin)
    return ref


@needs_triton
@pytest.mark.parametrize("quantization", ["int8", "int4-g128", "int4-g32"])
def test_llm_cuda_quantized(tmp_path, quantization):
    """LLM(device="cuda", quantization=...) runs rapidlm's CUDA modules; in fp32 its logits (prefill and graph
    decode) equal the same model with the dequantized weights in nn.Linear within 1e-4."""
    from rapidlm.compress.kernels.cuda_linear import CudaInt4Linear, CudaInt8Linear

    folder = hf_folder(tiny_hf_model("LlamaForCausalLM", hidden_size=128, intermediate_size=256), tmp_path / "m")
    llm = LLM(folder, device="cuda", dtype="float32", quantization=quantization)
    kinds = {type(m) for m in llm.runner.model.modules()}
    assert (CudaInt8Linear if quantization == "int8" else CudaInt4Linear) in kinds
    ref = _dequantized_copy(llm.runner.model)
    ids = list(range(300, 320))
    cache = llm.runner.allocate(1, 32)
    got = [llm.runner.prefill(cache, 0, ids)]
    dev = torch.device("cuda")
    got.append(llm.runner.decode(cache, torch.tensor([5], device=dev), torch.tensor([20], device=dev), 21)[0])
    from rapidlm.runtime.kv_cache import StaticKVCache

    with torch.inference_mode():
        rc = StaticKVCache(llm.config, 1, 32, torch.float32, dev)
        want = ref(torch.tensor([ids + [5]], device=dev), torch.arange(21, device=dev)[None], rc.layers(), 21)[0]
    assert rel_err(torch.stack(got), want[-2:].float()) <= 1e-4
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


@needs_triton
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_cuda_linear_decode_matches_reference(monkeypatch, backend, M):
    """The decode-size float linear (cuBLAS or rapidlm's Triton GEMV, as tuned) against fp64: bf16 within 1e-2."""
    from rapidlm.compress.kernels import cuda_linear as cl

    monkeypatch.setattr(cl, "DENSE_BACKEND", backend)
    torch.manual_seed(M)
    w = torch.randn(300, 2048, device="cuda").bfloat16()
    b = torch.randn(300, device="cuda").bfloat16()
    x = torch.randn(M, 2048, device="cuda").bfloat16()
    want = x.double() @ w.double().t() + b.double()
    got = cl.linear_decode(x, w, b)
    assert got.shape == (M, 300) and rel_err(got, want) <= 1e-2

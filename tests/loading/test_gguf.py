"""GGUF loading: the real default model against transformers, tiny written files, every tensor type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from rapidlm.loading import load_model
from rapidlm.loading.gguf import SUPPORTED_TYPES, dequantize, open_gguf, q4_blocks, unpermute_qk
from rapidlm.runtime.kv_cache import StaticKVCache
from tests.helpers import llama_cpp_permute, tiny_hf_model, write_gguf, write_gguf_from_hf


def logits(model, ids):
    cache = StaticKVCache(model.cfg, 1, len(ids), torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache.layers(), len(ids))[0]


def test_real_model_config(gguf_path):
    g = open_gguf(gguf_path)
    from rapidlm.loading.gguf import gguf_config

    cfg = gguf_config(g)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152 and cfg.max_position_embeddings == 8192


@pytest.mark.slow
def test_real_model_logits_match_transformers(llm_fp32, hf_reference, wikitext_lines):
    """fp32: max |delta| <= 1e-4 * max |logit| on the real SmolLM2 weights (the issue's tolerance)."""
    ids = llm_fp32.tokenizer.encode(" ".join(wikitext_lines[:3]))[:96]
    with torch.inference_mode():
        expected = hf_reference(torch.tensor([ids])).logits[0]
    got = logits(llm_fp32.runner.model, ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    back = unpermute_qk(torch.from_numpy(llama_cpp_permute(w, 3)), 3)
    assert torch.equal(back, torch.from_numpy(w))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_tiny_gguf_matches_source_model(tmp_path, qtype):
    """A tiny Llama written the way llama.cpp writes it (permuted Q/K) loads back to the same function."""
    ref = tiny_hf_model("LlamaForCausalLM", tie_word_embeddings=False)
    path = write_gguf_from_hf(
        ref,
        tmp_path / "tiny.gguf",
        qtypes={"_proj.weight": qtype, "attn_q.weight": qtype, "attn_k.weight": qtype, "ffn_up.weight": qtype},
    )
    loaded = load_model(path, dtype=torch.float32)
    ids = list(range(300, 340))
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = logits(loaded.model, ids)
    tol = {"F32": 2e-5, "F16": 2e-2, "Q8_0": 5e-2}[qtype]  # quantization error of the written weights
    assert (got - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES)
def test_every_supported_type_dequantizes_to_the_reference(tmp_path, qtype):
    """Each type goes through the writer and our reader with its shape intact (K types: random blocks)."""
    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    rows, cols = 4, 256
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data = rng.standard_normal((rows, cols)).astype(np.float32 if qtype == "F32" else np.float16)
        raw_dtype = None
    else:
        data = rng.integers(0, 256, (rows, cols // block * nbytes), dtype=np.uint8)
        raw_dtype = kind
        # Keep fp16 scale fields finite: write small positive halves where the format starts with them.
        half = np.array([0.01], dtype=np.float16).view(np.uint8)
        view = data.reshape(rows, cols // block, nbytes)
        if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            view[..., 0:2] = half
            if qtype in ("Q4_1", "Q5_1"):
                view[..., 2:4] = half
        elif qtype in ("Q4_K", "Q5_K"):
            view[..., 0:2] = half
            view[..., 2:4] = half
        elif qtype == "Q6_K":
            view[..., -2:] = half
        elif qtype == "Q2_K":
            view[..., -4:] = np.tile(half, 2)
        elif qtype == "Q3_K":
            view[..., -2:] = half
        elif qtype == "BF16":
            data = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            data = data.view(np.uint8).reshape(rows, cols * 2)
    t = open_gguf(write_gguf(tmp_path / "t.gguf", tensors=[("t", data, raw_dtype)])).reader.tensors[0]
    got = dequantize(t)
    assert got.shape == (rows, cols)
    expected = gguf.quants.dequantize(np.asarray(t.data), kind).reshape(rows, cols)
    assert np.isfinite(expected).all()
    torch.testing.assert_close(got, torch.from_numpy(expected.astype(np.float32)), atol=0, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_blocks_parse_matches_gguf_dequantize(tmp_path, qtype):
    """Our own nibble/scale parsing (kept 4-bit for the int4 kernel) agrees exactly with gguf's dequantizer."""
    kind = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", tensors=[("q", gguf.quants.quantize(x, kind), kind)])
    t = open_gguf(path).reader.tensors[0]
    blocks = q4_blocks(t)
    assert blocks.q.max() <= 15 and blocks.q.dtype == torch.uint8
    torch.testing.assert_close(blocks.dequantize(), dequantize(t), atol=1e-6, rtol=0)


def test_unsupported_tensor_type_is_a_clear_error(tmp_path):
    from rapidlm.errors import UnsupportedArchitectureError

    kind = gguf.GGMLQuantizationType.Q8_K  # llama.cpp's internal dot-product type: never a stored weight we read
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    path = write_gguf(tmp_path / "k.gguf", tensors=[("t", np.zeros((2, nbytes), dtype=np.uint8), kind)])
    with pytest.raises(UnsupportedArchitectureError, match="Q8_K"):
        dequantize(open_gguf(path).reader.tensors[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_weights_run_as_int4_close_to_dequantized(tmp_path, arch):
    """bf16 on the CPU keeps Q4_0/Q4_1 projections 4-bit (Int4Linear, with QKV bias for Qwen2): its logits stay
    within bf16 error of the fp32 dequantized model built from the same file."""
    from rapidlm.compress.kernels.int4_cpu import Int4Linear, int4_kernel_available

    if not int4_kernel_available():
        pytest.skip("no int4 CPU kernel")
    hf_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    ref = tiny_hf_model(hf_arch, tie_word_embeddings=False)
    qtypes = {"attn_q.weight": "Q4_0", "attn_k.weight": "Q4_1", "attn_v.weight": "Q4_1", "attn_output.weight": "Q4_0"}
    qtypes.update({f"ffn_{x}.weight": "Q4_1" for x in ("gate", "up", "down")})
    path = write_gguf_from_hf(ref, tmp_path / f"{arch}.gguf", qtypes=qtypes, arch=arch)
    exact = load_model(path, dtype=torch.float32, with_tokenizer=False)
    packed = load_model(path, dtype=torch.bfloat16, with_tokenizer=False, native=True)
    assert isinstance(packed.model.layers[0].attn.wqkv, Int4Linear)
    assert isinstance(packed.model.layers[0].mlp.w_gate_up, Int4Linear)
    ids = list(range(300, 340))
    expected = logits(exact.model, ids)
    cache = StaticKVCache(packed.config, 1, len(ids), torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        got = packed.model(torch.tensor([ids]), torch.arange(len(ids))[None], cache.layers(), len(ids))[0].float()
    assert (got - expected).abs().max() <= 3e-2 * expected.abs().max()


def test_native_q8_0_and_q4_in_fp32_equal_the_dequantized_model(tmp_path):
    """Native execution in fp32 is lossless: Q8_0 q/k/v (un-permuted as Int8Weight rows, fused), Q4_0/Q4_1 MLP
    and a tied Q8_0 embedding (which also becomes the int8 head) give the dequantized model's logits."""
    from rapidlm.compress.kernels.int4_cpu import Int4Linear, int4_kernel_available
    from rapidlm.compress.kernels.int8_cpu import Int8Linear

    if not int4_kernel_available():
        pytest.skip("no int4 CPU kernel")
    ref = tiny_hf_model("LlamaForCausalLM", tie_word_embeddings=True)
    qtypes = {f"attn_{x}.weight": "Q8_0" for x in ("q", "k", "v")}
    qtypes.update({"attn_output.weight": "Q4_0", "ffn_gate.weight": "Q4_1", "ffn_up.weight": "Q4_1"})
    qtypes.update({"ffn_down.weight": "Q4_0", "token_embd.weight": "Q8_0"})
    path = write_gguf_from_hf(ref, tmp_path / "mixed.gguf", qtypes=qtypes)
    exact = load_model(path, dtype=torch.float32, with_tokenizer=False, native=False)
    native = load_model(path, dtype=torch.float32, with_tokenizer=False, native=True)
    m = native.model
    assert isinstance(m.layers[0].attn.wqkv, Int8Linear) and isinstance(m.layers[0].mlp.w_down, Int4Linear)
    assert isinstance(m.lm_head, Int8Linear)
    ids = list(range(300, 340))
    expected, got = logits(exact.model, ids), logits(m, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))

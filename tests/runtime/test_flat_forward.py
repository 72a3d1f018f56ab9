"""One forward per engine step: decode rows and prompt chunks laid end to end (ModelRunner.forward_flat).

Every segment's rows must come out as the separate forwards (forward_paged) give them: bit for bit with bf16
activations and 4-bit weights (the kernels and the bf16 GEMM compute each row on its own, and row_groups keeps
each segment's linears on the path its own forward takes), and within fp32 rounding for fp32 models (MKL's
matrix-vector and matrix-matrix paths sum a row differently).
"""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM
from rapidlm.runtime.cpu_linear import DenseCopyLinear, _dequantized_weight, mkldnn_bf16_available, row_groups
from tests.helpers import save_hf_folder, tiny_hf_model
from tests.runtime.test_cpu_linear import _int4_linear

needs_bf16 = pytest.mark.skipif(not mkldnn_bf16_available(), reason="oneDNN bf16 linears unavailable")


@needs_bf16
def test_row_groups_route_each_group_as_a_call_of_its_own():
    quantized = _int4_linear(seed=4)
    layer = DenseCopyLinear(quantized, _dequantized_weight(quantized), min_rows=8)
    sizes = (3, 10, 2, 5, 9)  # kernel, copy, kernel, kernel (2 + 5 < 8 share a call), copy
    x = torch.randn(1, sum(sizes), 128).bfloat16()
    with row_groups({sum(sizes): sizes}):
        got = layer(x)
    expected, row = [], 0
    for size in sizes:
        expected.append(layer(x[:, row : row + size]))  # no groups in force: routed by its own row count
        row += size
    assert got.shape == (1, sum(sizes), 96)
    assert torch.equal(got, torch.cat(expected, dim=1))
    with row_groups({99: (90, 9)}):  # a plan for another row count leaves this call alone
        assert torch.equal(layer(x), layer.dense(x))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=5), tmp_path_factory.mktemp("flat"))


def _histories(llm: LLM, cache, n_seqs: int, g: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts run into the cache (identically for every cache this is called on): tokens and block tables."""
    vocab = llm.runner.cfg.vocab_size
    lengths = [7, 20, 33, 1, 12][:n_seqs]
    tokens = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    tables = [list(range(1 + 12 * i, 1 + 12 * (i + 1))) for i in range(n_seqs)]  # 12 blocks of 8 = 96 positions
    for ids, table in zip(tokens, tables):
        llm.runner.forward_paged(cache, [ids], [0], [table])
    return tokens, tables


@pytest.mark.parametrize("variant", ["bf16-int4-copies", "fp32"])
def test_flat_step_equals_separate_forwards(tiny_folder, variant):
    if variant == "bf16-int4-copies":
        if not mkldnn_bf16_available():
            pytest.skip("oneDNN bf16 linears unavailable")
        llm = LLM(tiny_folder, dtype="bfloat16", quantization="int4-g32", dense_prefill="on")
        assert llm.runner.dense_copies > 0
    else:
        llm = LLM(tiny_folder, dtype="float32")
    runner = llm.runner
    caches = [runner.allocate_paged(80, 8) for _ in range(2)]
    assert runner.flat_ok(caches[0])
    histories = [_histories(llm, c, 5, torch.Generator().manual_seed(0)) for c in caches]
    tokens, tables = histories[0]
    g = torch.Generator().manual_seed(1)
    vocab = runner.cfg.vocab_size
    # decode rows for sequences 0-2; a 70-token chunk (the bf16 copy's path) for sequence 3 after its 1 token;
    # a 5-token chunk (the kernel's path) for sequence 4 after its 12, which wants no logits
    decode = [0, 1, 2]
    dec_tok = [[int(torch.randint(0, vocab, (1,), generator=g))] for _ in decode]
    dec_start = [len(tokens[i]) for i in decode]
    chunk3, chunk4 = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (70, 5))

    separate = runner.forward_paged(caches[0], dec_tok, dec_start, [tables[i] for i in decode])[:, -1]
    last3 = runner.forward_paged(caches[0], [chunk3], [1], [tables[3]])[0, -1]
    runner.forward_paged(caches[0], [chunk4], [12], [tables[4]])
    expected = torch.cat([separate, last3[None]])

    flat = runner.forward_flat(
        caches[1],
        dec_tok + [chunk3, chunk4],
        dec_start + [1, 12],
        [tables[i] for i in decode] + [tables[3], tables[4]],
        n_decode=3,
        want_logits=[True, False],
    )
    assert flat.shape == (4, vocab) and flat.dtype == torch.float32
    if variant == "fp32":
        torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(flat, expected)
    # both caches now hold the same keys and values
    torch.testing.assert_close(caches[1].data, caches[0].data, rtol=1e-5, atol=1e-6)


@needs_bf16
def test_flat_needs_every_quantized_linear_wrapped(tiny_folder):
    bare = LLM(tiny_folder, dtype="bfloat16", quantization="int4-g32", dense_prefill="off")
    assert not bare.runner.flat_ok(bare.runner.allocate_paged(8, 8))  # the bare kernel switches paths by batch
    wrapped = LLM(tiny_folder, dtype="bfloat16", quantization="int4-g32", dense_prefill="on")
    cache = wrapped.runner.allocate_paged(8, 8)
    assert wrapped.runner.flat_ok(cache)
    cache.kernel_prefill = False  # (as on CUDA)
    assert not wrapped.runner.flat_ok(cache)

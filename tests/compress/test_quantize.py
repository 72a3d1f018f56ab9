"""quantize() on a tiny random model: modules swapped, outputs close to float, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rapidlm import LLM, SamplingParams
from rapidlm.compress.configs import Calibration, Int4WeightOnly, Int8WeightOnly, KVCacheInt8, Recipe, W8A8Dynamic
from rapidlm.compress.kernels.int4_cpu import Int4Linear, int4_kernel_available
from rapidlm.compress.kernels.int8_cpu import Int8Linear
from rapidlm.compress.kernels.w8a8_cpu import W8A8Linear
from rapidlm.compress.quantize import block_linears, int4_group_for, quantize
from rapidlm.compress.saved import MANIFEST, read_manifest
from rapidlm.compress.smoothing import fold_scale, scale_sites
from rapidlm.errors import ConfigError, ModelFormatError
from rapidlm.loading.loader import load_model
from tests.conftest import WIKITEXT
from tests.helpers import save_hf_folder, tiny_hf_model

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="no int4 CPU kernel in this PyTorch")
CAL = Calibration(data=WIKITEXT, samples=4, seq_len=64)
IDS = [1, 504, 3458, 314, 4481, 28, 253, 2657, 282, 5549, 30, 1135, 260, 7]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=3), tmp_path_factory.mktemp("tiny"))


def logits(model: nn.Module, ids: list[int] = IDS) -> torch.Tensor:
    from rapidlm.runtime.kv_cache import StaticKVCache

    cache = StaticKVCache(model.cfg, 1, len(ids), torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache.layers(), len(ids))[0].float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "config,module,tol",
    [
        (Int8WeightOnly(), Int8Linear, 0.02),
        (Int4WeightOnly(group_size=32), Int4Linear, 0.15),
        (Int4WeightOnly(group_size=64, method="gptq"), Int4Linear, 0.15),
        (Int4WeightOnly(group_size=64, method="awq", symmetric=True), Int4Linear, 0.15),
        (W8A8Dynamic(), W8A8Linear, 0.05),
        (W8A8Dynamic(smoothquant_alpha=0.5), W8A8Linear, 0.05),
    ],
)
def test_quantize_swaps_every_projection_and_stays_close(tiny_folder, config, module, tol):
    loaded = load_model(tiny_folder, torch.float32)
    ref = logits(loaded.model)
    names = block_linears(loaded.model)
    assert len(names) == 2 * 4
    samples = None
    if getattr(config, "needs_calibration", False):
        from rapidlm.compress.calibration import calibration_samples

        samples = calibration_samples(loaded.tokenizer, CAL)
    report = quantize(loaded.model, config, samples)
    assert all(isinstance(loaded.model.get_submodule(n), module) for n in names)
    assert set(report.swapped) >= set(names)
    assert block_linears(loaded.model) == []
    got = logits(loaded.model)
    assert rel_err(got, ref) < tol, rel_err(got, ref)


def test_gptq_and_awq_need_calibration(tiny_folder):
    loaded = load_model(tiny_folder, torch.float32)
    with pytest.raises(ConfigError, match="calibration"):
        quantize(loaded.model, Int4WeightOnly(method="gptq"))
    quantize(loaded.model, Int8WeightOnly())
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(loaded.model, Int8WeightOnly())


def test_group_fallback_when_group_does_not_divide_k():
    assert int4_group_for(576, 128) == 64 and int4_group_for(1536, 128) == 128 and int4_group_for(96, 64) == 32
    with pytest.raises(ConfigError):
        int4_group_for(40, 32)


def test_scale_folding_leaves_the_float_model_unchanged(tiny_folder):
    loaded = load_model(tiny_folder, torch.float32)
    ref = logits(loaded.model)
    g = torch.Generator().manual_seed(0)
    for site in scale_sites(loaded.model):
        k = loaded.model.get_submodule(site.linears[0]).in_features
        fold_scale(loaded.model, site, torch.rand(k, generator=g) * 4 + 0.25)
    torch.testing.assert_close(logits(loaded.model), ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_int8_stays_close_to_fp32_cache(tiny_folder):
    from rapidlm.runtime.kv_cache import StaticKVCache

    loaded = load_model(tiny_folder, torch.float32)
    ref = logits(loaded.model)
    cache = StaticKVCache(loaded.config, 1, len(IDS), torch.float32, torch.device("cpu"), int8=True)
    hd = loaded.config.head_dim  # int8 codes plus one fp32 scale per head_dim values, against 4 bytes each
    assert cache.data.dtype == torch.int8 and cache.nbytes == cache.data.numel() * (1 + 4 / hd)
    with torch.inference_mode():
        got = loaded.model(torch.tensor([IDS]), torch.arange(len(IDS))[None], cache.layers(), len(IDS))[0]
    assert rel_err(got, ref) < 0.02


def test_llm_quantization_option_and_kv_int8_generate(tiny_folder):
    # A random tiny model's logits are nearly flat, so greedy tokens may differ: closeness is tested above.
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kv = LLM(tiny_folder, dtype="float32", quantization="kv-int8")
    assert kv.runner.kv_int8 and kv.runner.allocate(1, 4).data.dtype == torch.int8
    assert len(kv.generate(["Hello there", "Hi"], params)[1].token_ids) == 6
    with pytest.raises(ConfigError, match="shorthand"):
        LLM(tiny_folder, quantization="int5")


def test_save_load_round_trip_gives_the_same_tokens(tiny_folder, tmp_path):
    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.saved import save_compressed

    recipe = Recipe((Int4WeightOnly(group_size=32, method="gptq"), KVCacheInt8()), CAL, "test")
    loaded, recipe, report = load_with_recipe(
        tiny_folder, recipe, torch.bfloat16, torch.device("cpu"), keep_weights=True
    )
    out = save_compressed(loaded, recipe, report, tmp_path / "out")
    manifest = read_manifest(out)
    assert manifest["format_version"] == 1 and manifest["recipe"]["steps"][0]["method"] == "gptq"
    assert len(manifest["source"]["sha256"]) == 64 and (out / "tokenizer.json").is_file()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    direct = LLM(tiny_folder, dtype="bfloat16", quantization=recipe)
    reloaded = LLM(out, dtype="bfloat16")
    assert reloaded.runner.kv_int8
    wqkv = reloaded.runner.model.layers[0].attn.wqkv  # a DenseCopyLinear (bf16 copy for prompt chunks) around it
    assert isinstance(getattr(wqkv, "quantized", wqkv), Int4Linear)
    assert reloaded.generate("Hello there", params)[0].token_ids == direct.generate("Hello there", params)[0].token_ids
    with pytest.raises(FileExistsError):
        save_compressed(loaded, recipe, report, out)
    (out / MANIFEST).write_text('{"format": "rapidlm-compressed", "format_version": 99}')
    with pytest.raises(ModelFormatError, match="format_version"):
        LLM(out)


@pytest.mark.parametrize("head", ["w8a8", "int8", "keep"])
def test_w8a8_head_modes_save_and_load(tiny_folder, tmp_path, head):
    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.saved import save_compressed

    recipe = Recipe((W8A8Dynamic(lm_head=head),), CAL, "test")
    loaded, recipe, report = load_with_recipe(
        tiny_folder, recipe, torch.float32, torch.device("cpu"), keep_weights=True
    )
    expected = {"w8a8": W8A8Linear, "int8": Int8Linear, "keep": nn.Linear}[head]
    assert type(loaded.model.lm_head) is expected
    ref = logits(loaded.model)
    out = save_compressed(loaded, recipe, report, tmp_path / "out")
    reloaded = load_model(out, torch.float32)
    assert type(reloaded.model.lm_head) is expected
    torch.testing.assert_close(logits(reloaded.model), ref, rtol=0, atol=0)

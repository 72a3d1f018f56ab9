"""Pruning: exact sparsity and patterns, structured removal that keeps logits, save/load of pruned models."""

from __future__ import annotations

import pytest
import torch

from rapidlm import LLM, SamplingParams
from rapidlm.compress.calibration import calibration_samples, collect_input_stats
from rapidlm.compress.configs import (
    Calibration,
    Int8WeightOnly,
    Magnitude,
    Native,
    Recipe,
    SemiStructured,
    Structured,
    Wanda,
)
from rapidlm.compress.prune import lowest_k_mask, projection_rows, prune, prune_structured
from rapidlm.compress.quantize import block_linears
from rapidlm.compress.recipe import resolve_recipe
from rapidlm.errors import ConfigError
from rapidlm.loading.loader import load_model
from tests.compress.test_quantize import logits
from tests.conftest import WIKITEXT
from tests.helpers import save_hf_folder, tiny_hf_model

CAL = Calibration(data=WIKITEXT, samples=4, seq_len=64)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=5), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def samples(tiny_folder):
    return calibration_samples(load_model(tiny_folder, torch.float32).tokenizer, CAL)


def test_lowest_k_mask_is_exact_even_with_ties():
    score = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    keep = lowest_k_mask(score, 3)
    assert keep.tolist() == [True, False, False, True, True, False]  # 0.5 and the first two of the tied 1.0s
    assert lowest_k_mask(score, 0).all() and not lowest_k_mask(score, 6).any()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_hits_the_target_and_prunes_the_smallest(tiny_folder, scope):
    loaded = load_model(tiny_folder, torch.float32)
    model = loaded.model
    before = {n: model.get_submodule(n).weight.detach().clone() for n in block_linears(model)}
    _, report = prune(model, Magnitude(0.5, scope=scope))
    groups = []  # (original weights, pruned weights) per unit that must reach the target on its own
    for n, w0 in before.items():
        w = model.get_submodule(n).weight
        rows = projection_rows(model, n) if scope == "layer" else [slice(None)]
        groups += [(w0[r], w[r]) for r in rows]
    if scope == "global":
        groups = [(torch.cat([g[0].flatten() for g in groups]), torch.cat([g[1].flatten() for g in groups]))]
    for w0, w in groups:
        zero = w == 0
        assert int(zero.sum()) == round(0.5 * w.numel())
        assert w0[zero].abs().max() <= w0[~zero].abs().min()  # exactly the smallest magnitudes went
        assert torch.equal(w[~zero], w0[~zero])
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)


def test_wanda_prunes_each_row_by_weight_times_input_norm(tiny_folder, samples):
    loaded = load_model(tiny_folder, torch.float32)
    model = loaded.model
    names = block_linears(model)
    norms = {n: s.sq_sum.sqrt() for n, s in collect_input_stats(model, names, samples).items()}
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    prune(model, Wanda(0.5), samples)
    for n in names:
        w, w0 = model.get_submodule(n).weight, before[n]
        score = w0.abs() * norms[n]
        zero = w == 0
        assert (zero.sum(1) == w.shape[1] // 2).all()  # each output row at exactly 50%
        for r in range(w.shape[0]):
            assert score[r][zero[r]].max() <= score[r][~zero[r]].min()


@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_two_four_pattern_is_exact(tiny_folder, samples, score):
    loaded = load_model(tiny_folder, torch.float32)
    prune(loaded.model, SemiStructured(2, 4, score), samples)
    for n in block_linears(loaded.model):
        w = loaded.model.get_submodule(n).weight
        assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) == 2).all(), n


def _zero_units(model, group: int, channels: list[int], dead_layer: int | None = None) -> None:
    """Zero KV group `group` (q, k, v rows and wo columns) and MLP `channels` in every layer."""
    cfg = model.cfg
    hd, per = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    q0, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            w = layer.attn.wqkv.weight
            w[group * per * hd : (group + 1) * per * hd] = 0
            w[q0 + group * hd : q0 + (group + 1) * hd] = 0
            w[q0 + kv + group * hd : q0 + kv + (group + 1) * hd] = 0
            layer.attn.wo.weight[:, group * per * hd : (group + 1) * per * hd] = 0
            layer.mlp.w_gate_up.weight[channels] = 0
            layer.mlp.w_gate_up.weight[[c + cfg.intermediate_size for c in channels]] = 0
            layer.mlp.w_down.weight[:, channels] = 0
            if i == dead_layer:  # the block adds nothing to the residual stream: it is the identity
                layer.attn.wo.weight.zero_()
                layer.mlp.w_down.weight.zero_()


def test_structured_removal_of_zero_units_keeps_logits(tiny_folder, samples):
    model = load_model(tiny_folder, torch.float32, max_seq_len=64).model
    channels = [3, 17, 40, 41, 99]
    _zero_units(model, group=1, channels=channels, dead_layer=0)
    ref = logits(model)
    small, report = prune_structured(model, Structured(heads=1, ffn_channels=len(channels), layers=1), samples)
    assert report.removed_layers == [0]
    assert report.removed_kv_groups == {0: [1]}
    cfg = small.cfg
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (1, 2, 1, 128 - 5)
    assert cfg.head_dim == 16 and report.params_after < report.params_before
    torch.testing.assert_close(logits(small), ref, rtol=1e-5, atol=1e-5)


def test_structured_counts_are_checked(tiny_folder, samples):
    model = load_model(tiny_folder, torch.float32).model
    with pytest.raises(ConfigError, match="Structured.heads"):
        prune_structured(model, Structured(heads=2), samples)
    with pytest.raises(ConfigError, match="Structured.layers"):
        prune_structured(model, Structured(layers=2), samples)
    with pytest.raises(ConfigError, match="calibration"):
        prune_structured(model, Structured(layers=1), None)


def test_pruned_model_saves_loads_and_generates(tiny_folder, tmp_path):
    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.saved import read_manifest, save_compressed

    recipe = Recipe((Structured(heads=1, ffn_channels=32, layers=1), Wanda(0.3), Int8WeightOnly()), CAL, "t")
    loaded, recipe, report = load_with_recipe(
        tiny_folder, recipe, torch.float32, torch.device("cpu"), keep_weights=True
    )
    assert loaded.config.num_layers == 1 and loaded.config.intermediate_size == 96
    assert [p.method.split("/")[0] for p in report.pruning] == ["structured", "wanda"]
    out = save_compressed(loaded, recipe, report, tmp_path / "out")
    assert read_manifest(out)["config"]["num_kv_heads"] == 1
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    direct = LLM(tiny_folder, dtype="float32", quantization=recipe)
    reloaded = LLM(out, dtype="float32")
    assert reloaded.runner.model.cfg.num_layers == 1
    assert reloaded.generate("Hello", params)[0].token_ids == direct.generate("Hello", params)[0].token_ids


def test_recipes_with_pruning_are_validated():
    assert resolve_recipe("wanda-50+int4-g32").prune_steps == (Wanda(0.5),)
    assert resolve_recipe("2:4").steps == (SemiStructured(2, 4, "wanda"),)
    assert resolve_recipe("prune-layers-10").steps == (Structured(layers=10),)
    with pytest.raises(ConfigError, match="prunes after quantizing"):
        Recipe((Int8WeightOnly(), Magnitude(0.5)))
    with pytest.raises(ConfigError, match="native"):
        Recipe((Magnitude(0.5), Native()))
    with pytest.raises(ConfigError, match="Magnitude.sparsity"):
        Magnitude(1.5)
    with pytest.raises(ConfigError, match="Magnitude.scope"):
        Magnitude(0.5, scope="row")
    with pytest.raises(ConfigError, match="SemiStructured.n"):
        SemiStructured(4, 4)
    with pytest.raises(ConfigError, match="removes nothing"):
        Structured()


def test_calibration_longer_than_the_context_is_a_clear_error(tiny_folder):
    from rapidlm.compress.apply import load_with_recipe

    long_cal = Calibration(data=WIKITEXT, samples=1, seq_len=4096)
    recipe = Recipe((Structured(layers=1),), long_cal, "t")
    with pytest.raises(ConfigError, match=r"Calibration.seq_len=4096 .*context"):
        load_with_recipe(tiny_folder, recipe, torch.float32, torch.device("cpu"))

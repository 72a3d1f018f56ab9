"""The profiler on a tiny random model: it accounts for the run, covers every layer, leaves nothing behind.

Accounting: every part is timed by its own clock pair (hooks on modules, wrappers on functions); the step's wall
time by a separate pair around the engine's step. The unattributed remainder is what no part saw, and must stay
under 10% of the wall time.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rapidlm import SamplingParams
from rapidlm.engine import engine as engine_module
from rapidlm.errors import ConfigError
from rapidlm.profile.profiler import (
    ACCOUNTING_LIMIT,
    KINDS,
    LAYER_KINDS,
    OP_KINDS,
    HookCost,
    ProfileConfig,
    _Region,
    _step_parts,
    profile,
)
from tests.profile.conftest import TINY_CONFIG


def test_parts_sum_to_the_wall_time_within_ten_percent(tiny_profile):
    for phase in ("decode", "prefill"):
        acc = tiny_profile.accounting(phase)
        assert acc["parts_s"] > 0.5 * acc["wall_s"], acc  # the parts are real measurements, not a plug
        assert 0 <= acc["unattributed_share"] < ACCOUNTING_LIMIT, (phase, acc)
    # Step by step too, not only on the sum: no step hides a gap behind another's surplus.
    d = tiny_profile.decode
    for i, wall in enumerate(d.wall_s):
        parts = sum(d.parts_s[k][i] for k in KINDS)
        assert 0 <= wall - parts < ACCOUNTING_LIMIT * wall, (i, wall, parts)


def test_every_part_and_every_layer_is_timed(tiny_profile, tiny_llm):
    d = tiny_profile.decode
    n_layers = len(tiny_llm.runner.model.layers)
    assert len(d.layers_s) == n_layers
    for i, layer in enumerate(d.layers_s):
        assert set(layer) == set(LAYER_KINDS)
        for kind in ("norms", "qkv_proj", "rotary", "attention", "o_proj", "mlp"):
            assert layer[kind] > 0, (i, kind)
    for kind in KINDS:
        assert d.mean_part(kind) > 0, kind
    # Per layer sums equal the kinds' totals (the head, embedding, sampling etc. live outside the layers).
    for kind in ("qkv_proj", "rotary", "attention", "o_proj", "mlp"):
        assert sum(layer[kind] for layer in d.layers_s) == pytest.approx(math.fsum(d.parts_s[kind]), rel=1e-9)


def test_step_counts_and_statistics(tiny_profile):
    cfg = ProfileConfig(**TINY_CONFIG)
    steps = cfg.rounds * (cfg.gen_len - 1)
    assert len(tiny_profile.plain_decode_s) == steps and tiny_profile.decode.steps == steps
    assert tiny_profile.prefill.steps == len(tiny_profile.plain_prefill_s) == cfg.rounds
    s = tiny_profile.decode_stats()
    assert s.n == steps and s.min <= s.p50 <= s.p99 <= s.max
    shares = tiny_profile.shares("decode")
    assert set(shares) == {*KINDS, "unattributed"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert tiny_profile.hook_overhead() > -0.5  # instrumented steps are not wildly faster than plain ones


def test_costs_cover_the_timed_steps(tiny_profile, tiny_llm):
    from rapidlm.profile.costs import step_costs

    cfg = ProfileConfig(**TINY_CONFIG)
    first = step_costs(tiny_llm.runner.model, cfg.batch, 1, cfg.prompt_len + 1, 4, 4)
    ops = {o["kind"]: o for o in tiny_profile.ops("decode")}
    assert set(ops) == set(OP_KINDS)
    # The weights do not change from step to step: per step, a linear's bytes equal one step's count.
    assert ops["mlp"]["bytes"] == pytest.approx(first["mlp"].bytes)
    # Attention reads a cache one token longer each step: its mean lies between the first and last step's.
    assert ops["attention"]["bytes"] > first["attention"].bytes
    for o in ops.values():
        assert o["time_s"] > 0 and o["gbs"] > 0
        assert o["bound"] in ("memory", "compute")
        assert o["roofline_time_s"] > 0


def test_json_schema(tiny_profile):
    from rapidlm.profile.report import to_json

    d = json.loads(json.dumps(to_json(tiny_profile), allow_nan=False))
    assert d["schema"] == "rapidlm.profile/1"
    assert set(d) >= {"model", "config", "ceilings", "bottleneck", "decode", "prefill", "instrumentation", "notes"}
    assert d["config"] == TINY_CONFIG | {"seed": 0}
    assert d["model"]["layers"] == 2 and d["model"]["dtype"] == "float32"
    dec = d["decode"]
    assert set(dec) >= {"steps", "step_stats", "instrumented_step_stats", "step_times_s", "parts_s", "shares",
                        "layers_s", "ops", "accounting"}
    assert set(dec["step_stats"]) >= {"n", "mean", "std", "p50", "p90", "p99", "min", "max", "histogram"}
    assert len(dec["step_times_s"]) == dec["steps"] == dec["step_stats"]["n"]
    assert set(dec["parts_s"]) == set(KINDS)
    assert len(dec["layers_s"]) == 2 and set(dec["layers_s"][0]) == set(LAYER_KINDS)
    assert {o["kind"] for o in dec["ops"]} == set(OP_KINDS)
    assert set(dec["ops"][0]) >= {"flops", "bytes", "time_s", "gflops", "gbs", "intensity", "roof_gflops", "bound"}
    assert dec["accounting"]["unattributed_share"] < ACCOUNTING_LIMIT
    assert set(d["prefill"]) >= {"time_s", "tokens", "parts_s", "shares", "ops", "accounting"}
    assert isinstance(d["bottleneck"], str) and "% of each step is framework" in d["bottleneck"]


def test_profiling_leaves_the_model_runner_and_engine_as_they_were(tiny_llm, tiny_profile):
    import rapidlm.models.llama as llama

    runner, engine = tiny_llm.runner, tiny_llm.engine
    for name, m in runner.model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    for name in ("prefill", "decode", "allocate"):
        assert name not in vars(runner), name  # the class's methods again, not a wrapper
    assert "_append" not in vars(engine)
    assert engine_module.sample_batch.__module__ == "rapidlm.engine.sampling"
    assert llama.apply_rope.__module__ == "rapidlm.models.layers"


def test_profiling_does_not_change_what_is_generated(tiny_llm, ceilings, single_thread):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = tiny_llm.generate([[5, 6, 7, 8]], params)[0].token_ids
    profile(tiny_llm, ProfileConfig(batch=1, prompt_len=4, gen_len=3, rounds=1, warmup_tokens=0), ceilings)
    assert tiny_llm.generate([[5, 6, 7, 8]], params)[0].token_ids == before


def test_quantized_model(tiny_folder, ceilings, single_thread):
    from rapidlm import LLM

    llm = LLM(tiny_folder, device="cpu", dtype="float32", quantization="int8")
    p = profile(llm, ProfileConfig(batch=1, prompt_len=8, gen_len=4, rounds=1, warmup_tokens=1), ceilings)
    assert p.model["linears"] == ["Int8Linear"]
    assert p.accounting()["unattributed_share"] < ACCOUNTING_LIMIT
    ops = {o["kind"]: o for o in p.ops()}
    fp32 = {o["kind"]: o for o in profile(
        LLM(tiny_folder, device="cpu", dtype="float32"),
        ProfileConfig(batch=1, prompt_len=8, gen_len=4, rounds=1, warmup_tokens=1), ceilings).ops()}
    assert ops["mlp"]["bytes"] < 0.5 * fp32["mlp"]["bytes"]  # int8 weights: a quarter of fp32's, plus scales


def test_step_parts_arithmetic():
    """Exclusive times from nested inclusive ones, and the hooks' cost charged to the enclosing part."""
    R = _Region
    n_layers = 1
    acc = [0.0] * (R.TOP + R.PER_LAYER * n_layers)
    calls = [0] * len(acc)
    values = {
        R.FORWARD: 10.0, R.MODEL: 9.0, R.EMBED: 0.5, R.NORM: 0.25, R.HEAD: 1.0, R.SAMPLING: 0.75, R.ENGINE: 0.5,
        R.layer(0, R.BLOCK): 7.0, R.layer(0, R.ATTN_NORM): 0.25, R.layer(0, R.ATTN): 3.0, R.layer(0, R.WQKV): 1.0,
        R.layer(0, R.ROPE): 0.5, R.layer(0, R.WO): 0.5, R.layer(0, R.MLP_NORM): 0.25, R.layer(0, R.MLP): 3.0,
    }
    for region, seconds in values.items():
        acc[region] = seconds
        calls[region] = 1
    parts, hooks, layers = _step_parts(acc, calls, n_layers, HookCost(0.01, 0.001))
    assert parts["attention"] == 3.0 - 1.0 - 0.5 - 0.5
    assert parts["norms"] == 0.25 + 0.25 + 0.25
    # framework: block 7 - 0.25 - 3 - 0.25 - 3 = 0.5; model 9 - 0.5 - 7 - 0.25 - 1 = 0.25; runner 10 - 9 = 1
    assert parts["framework"] == pytest.approx(1.75)
    assert sum(parts.values()) == pytest.approx(10.0 + 0.75 + 0.5)  # forward + sampling + engine, nothing more
    assert hooks["attention"] == pytest.approx(2 * 0.01 + 0.001)  # wqkv, wo hooks; the RoPE wrapper
    assert hooks["framework"] == pytest.approx(4 * 0.01 + 5 * 0.01)  # block's 4 children; embed/norm/head/model/block
    assert layers[0]["framework"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "field, value", [("batch", 0), ("gen_len", 1), ("prompt_len", 1.5), ("rounds", True), ("seed", -1)]
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"ProfileConfig.{field}"):
        ProfileConfig(**{field: value})


def test_a_run_longer_than_the_context_is_refused(tiny_llm, ceilings):
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        profile(tiny_llm, ProfileConfig(prompt_len=250, gen_len=10), ceilings)


def test_hook_calibration_is_small_and_positive():
    from rapidlm.profile.profiler import calibrate_hooks

    cost = calibrate_hooks(calls=500, repeats=3)
    assert 0 <= cost.function_s < 1e-4 and 0 <= cost.module_s < 1e-4


@pytest.mark.slow
def test_default_model_accounts_for_its_decode_steps(llm_auto, ceilings):
    """SmolLM2-135M as `rapidlm profile` runs it (native Q4_1/Q8_0 on a bf16 CPU): the same accounting."""
    p = profile(llm_auto, ProfileConfig(batch=1, prompt_len=32, gen_len=16, rounds=1, warmup_tokens=2), ceilings)
    acc = p.accounting()
    assert 0 <= acc["unattributed_share"] < ACCOUNTING_LIMIT, acc
    assert len(p.decode.layers_s) == 30
    assert p.model["threads"] == torch.get_num_threads()
    assert "bandwidth" in p.bottleneck() or "peak" in p.bottleneck()


def test_cli_writes_the_report(tiny_folder, ceilings, single_thread, tmp_path, monkeypatch, capsys):
    import io

    from rapidlm import cli
    from rapidlm.profile import profiler

    monkeypatch.setattr(profiler, "ceilings_for", lambda device, hardware, remeasure: ceilings)
    out = io.StringIO()
    rc = cli.main(["profile", "--model", str(tiny_folder), "--dtype", "float32", "--prompt-len", "8", "--gen-len",
                   "4", "--rounds", "1", "--out", str(tmp_path / "prof")], out=out)
    assert rc == 0, capsys.readouterr().err
    text = out.getvalue()
    assert "accounting:" in text and "report.html" in text
    assert {p.name for p in (tmp_path / "prof").iterdir()} >= {"report.html", "profile.json", "roofline.png"}
    assert cli.main(["profile", "--model", str(tiny_folder), "--gen-len", "1"], out=io.StringIO()) == 2
    assert "ProfileConfig.gen_len" in capsys.readouterr().err  # refused before the model loads


def test_ceilings_for_picks_the_roof():
    from rapidlm.profile import roofline
    from rapidlm.profile.profiler import ceilings_for

    assert ceilings_for(torch.device("cpu"), "h200") is roofline.HARDWARE["h200"]
    with pytest.raises(ValueError, match="unknown hardware"):
        ceilings_for(torch.device("cpu"), "tpu-v9")


def test_structurally_pruned_and_quantized_model(tmp_path, ceilings, single_thread):
    """A smaller model (a KV group, MLP channels and a layer removed) run as int4: shapes read off the model."""
    from rapidlm import LLM
    from tests.helpers import save_hf_folder, tiny_hf_model

    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM", num_hidden_layers=3), tmp_path / "m")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "steps:\n  - type: structured\n    heads: 1\n    ffn_channels: 32\n    layers: 1\n"
        "  - type: int4_weight_only\n    group_size: 32\ncalibration:\n  samples: 4\n  seq_len: 32\n"
    )
    llm = LLM(folder, device="cpu", dtype="float32", quantization=str(recipe))
    p = profile(llm, ProfileConfig(batch=1, prompt_len=8, gen_len=4, rounds=1, warmup_tokens=1), ceilings)
    assert p.model["layers"] == 2 and len(p.decode.layers_s) == 2
    assert p.model["linears"] == ["Int4Linear"]
    assert p.accounting()["unattributed_share"] < ACCOUNTING_LIMIT
    mlp = {o["kind"]: o for o in p.ops()}["mlp"]
    assert mlp["flops"] == pytest.approx(2 * (2 * 64 * 2 * 96 + 2 * 96 * 64) + 2 * (5 * 96 + 64), rel=1e-9)


def test_int8_kv_cache(tiny_folder, ceilings, single_thread):
    from rapidlm import LLM

    llm = LLM(tiny_folder, device="cpu", dtype="float32", quantization="kv-int8")
    p = profile(llm, ProfileConfig(batch=1, prompt_len=8, gen_len=4, rounds=1, warmup_tokens=1), ceilings)
    assert p.model["kv_dtype"] == "int8" and p.model["attention_dtype"] == "float32"
    assert {o["kind"]: o for o in p.ops()}["attention"]["dtype"] == "float32"
    assert p.accounting()["unattributed_share"] < ACCOUNTING_LIMIT

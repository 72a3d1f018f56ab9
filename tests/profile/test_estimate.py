"""rapidlm.profile.estimate: monotonicity, memory by hand, formats from configs/recipes/files, tensor parallelism,
the CLI, and the H200 figures docs/cuda.md measured."""

from __future__ import annotations

import io
import json

import pytest
import torch

from rapidlm.cli import main
from rapidlm.config import ModelConfig
from rapidlm.errors import ConfigError
from rapidlm.profile.costs import STEP_KEYS, ModelSpec, step_costs
from rapidlm.profile.estimate import _step_parts, estimate, spec_from_config
from rapidlm.profile.roofline import CPU_LAYER_OPS, CPU_STEP_OPS, Ceilings

# a CPU with fixed ceilings: the tests check the arithmetic, not this machine
CPU = Ceilings(
    name="cpu-test",
    bandwidth_gbs=16.0,
    flops_gflops={"float32": 50.0, "bfloat16": 120.0, "int8": 200.0},
    op_overhead_us=4.0,
    source="fixed in tests/profile/test_estimate.py",
    threads=2,
    weight_stream_gbs={"float32": 10.0, "bfloat16": 14.0, "int8": 20.0, "int4": 22.0, "w8a8": 18.0},
    linear_overhead_us={"float32": 5.0, "bfloat16": 9.0, "int8": 6.0, "int4": 5.0, "w8a8": 8.0},
    layer_op_overhead_us={"float32": 4.0, "bfloat16": 4.5, "int8": 4.5, "int4": 4.5, "w8a8": 4.4},
    memory_gib=8.0,
)
TINY = ModelConfig("LlamaForCausalLM", 100, 32, 48, 3, 4, 2, tie_word_embeddings=True, max_position_embeddings=64)
LLAMA2_7B = {  # Hugging Face config.json fields of Llama-2-7B
    "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
}


def test_decode_speeds_up_with_batch_and_ttft_grows():
    runs = [estimate(TINY, CPU, "float32", batch=b, prompt_len=8, gen_len=16) for b in (1, 2, 4, 8)]
    tok_s = [r.decode_tok_s for r in runs]
    assert tok_s == sorted(tok_s) and tok_s[-1] > tok_s[0]
    steps = [r.decode_step_s for r in runs]
    assert steps == sorted(steps)
    ttft = [r.ttft_s for r in runs]
    assert ttft == sorted(ttft) and ttft[-1] == pytest.approx(8 * ttft[0])  # prefill one sequence at a time


def test_longer_generation_takes_longer_and_reads_more_cache():
    runs = [estimate(TINY, CPU, "float32", batch=2, prompt_len=8, gen_len=g) for g in (4, 16, 48)]
    assert [r.total_s for r in runs] == sorted(r.total_s for r in runs)
    tok_s = [r.decode_tok_s for r in runs]
    assert tok_s == sorted(tok_s, reverse=True) and tok_s[0] > tok_s[-1]
    assert [r.decode.kv_len for r in runs] == [10, 16, 32]  # the mean context prompt + gen/2
    assert [r.memory["kv_cache"] for r in runs] == sorted(r.memory["kv_cache"] for r in runs)


def test_memory_is_weights_plus_kv_plus_activations_by_hand():
    e = estimate(TINY, CPU, "float32", batch=2, prompt_len=10, gen_len=6)
    linears = 32 * (32 + 2 * 16) + 32 * 32 + 32 * 96 + 48 * 32  # q|k|v, o, gate|up, down per layer
    weights = (3 * linears + 100 * 32 + 7 * 32) * 4  # + the tied embedding once, 2 norms per layer + final
    kv = 3 * 2 * 2 * 2 * 16 * 8 * 4  # layers x K,V x batch x kv heads x (10 + 6) x head dim x fp32
    assert e.memory["weights"] == weights
    assert e.memory["kv_cache"] == kv
    assert e.memory["total"] == weights + kv + e.memory["activations"]
    assert 0 < e.memory["activations"] < weights  # one prefill's transient + logits
    assert e.fits


def test_step_parts_agree_with_step_costs():
    spec = spec_from_config(TINY, "bfloat16")
    parts = _step_parts(spec, 3, 1, 9, "bfloat16", "bfloat16", "bfloat16")
    costs = step_costs(spec, 3, 1, 9, 2, 2)
    for kind in STEP_KEYS:
        assert sum(p.cost.flops for p in parts[kind]) == costs[kind].flops
        assert sum(p.cost.bytes for p in parts[kind]) == pytest.approx(costs[kind].bytes)


def test_cpu_fixed_cost_is_op_count_times_measured_op_cost():
    e = estimate(TINY, CPU, "float32", batch=1, prompt_len=4, gen_len=4)
    fixed = sum(r.fixed_s for r in e.decode.rows)
    ops = sum(CPU_LAYER_OPS.values()) * 3 + sum(CPU_STEP_OPS.values())
    head_call = CPU.linear_overhead_us["float32"] - CPU.layer_op_overhead_us["float32"]
    assert fixed == pytest.approx((ops * 4.0 + head_call) * 1e-6)
    assert sum(r.ops for r in e.decode.rows) == ops
    assert "formulas:" in e.render() and any("49·L + 30" in f for f in e.formulas)


def test_quantization_formats_from_a_config():
    big = ModelConfig("LlamaForCausalLM", 49152, 576, 1536, 4, 9, 3, tie_word_embeddings=True)
    fp = estimate(big, CPU, "bfloat16")
    int8 = estimate(big, CPU, "bfloat16", quant="int8")
    int4 = estimate(big, CPU, "bfloat16", quant="int4-g128")
    layer8, layer4 = int8.spec.layers[0], int4.spec.layers[0]
    assert layer8.wqkv.fmt == "int8" and layer8.wqkv.group_size == 576 and int8.spec.head.fmt == "int8"
    # 576 inputs do not split into groups of 128: rapidlm falls back to 64 (down_proj, K = 1536, keeps 128)
    assert layer4.wqkv.group_size == 64 and layer4.w_down.group_size == 128 and layer4.wqkv.scale_bytes == 8
    def block_bytes(e):  # noqa: ANN001, ANN202
        return sum(s.weight_bytes for la in e.spec.layers for s in la.linears)

    assert block_bytes(fp) > block_bytes(int8) > block_bytes(int4)
    # a tied head quantized to int8 no longer shares the embedding table, which stays in bf16 beside it
    assert int8.memory["weights"] - block_bytes(int8) > fp.memory["weights"] - block_bytes(fp)
    assert fp.decode_tok_s < int8.decode_tok_s < int4.decode_tok_s
    kv8 = estimate(big, CPU, "bfloat16", quant="int8+kv-int8", prompt_len=512)
    assert kv8.kv_dtype == "int8" and kv8.memory["kv_cache"] < estimate(big, CPU, "bfloat16", quant="int8",
                                                                       prompt_len=512).memory["kv_cache"] / 3
    pruned = estimate(big, CPU, "bfloat16", quant="prune-layers-2")
    assert len(pruned.spec.layers) == 2 and pruned.decode_tok_s > fp.decode_tok_s
    with pytest.raises(ConfigError, match="native"):
        estimate(big, CPU, "bfloat16", quant="native")
    with pytest.raises(ConfigError, match="W8A8 runs on the CPU only"):
        estimate(big, "h100", quant="w8a8")


def test_tensor_parallel_splits_weights_and_adds_communication(tmp_path):
    path = tmp_path / "llama2-7b.json"
    path.write_text(json.dumps(LLAMA2_7B))
    one = estimate(hardware="h100", config_json=path, batch=4)
    two = estimate(hardware="h100", config_json=path, batch=4, tensor_parallel=2)
    spec = one.spec
    linears = sum(s.weight_bytes for la in spec.layers for s in la.linears) + spec.head.weight_bytes
    rest = one.memory["weights"] - linears  # embedding + norms, replicated on every GPU
    assert two.memory["weights"] == pytest.approx(linears / 2 + rest)
    assert two.memory["kv_cache"] == pytest.approx(one.memory["kv_cache"] / 2)
    comm = [r for r in two.decode.rows if r.kind == "communication"]
    assert comm and comm[0].ops == 2 * 32 + 1 and comm[0].time_s > 0
    assert not [r for r in one.decode.rows if r.kind == "communication"]
    assert one.decode_tok_s < two.decode_tok_s < 2 * one.decode_tok_s  # faster, not 2x: collectives, fixed costs
    with pytest.raises(ConfigError, match="tensor_parallel=3 must divide"):
        estimate(hardware="h100", config_json=path, tensor_parallel=3)
    with pytest.raises(ConfigError, match="tensor_parallel=2 needs several GPUs"):
        estimate(TINY, CPU, tensor_parallel=2)


def test_h200_llama2_7b_bf16_is_near_what_docs_cuda_measured():
    """docs/cuda.md: Llama-2-7B bf16 on an H200, 128-token prompt, 128 graph-decoded steps: 251.5 tok/s."""
    e = estimate(ModelConfig.from_hf(LLAMA2_7B), "h200", "bfloat16", batch=1, prompt_len=128, gen_len=129)
    assert abs(e.decode_tok_s / 251.5 - 1) < 0.25
    assert e.memory["weights"] == pytest.approx(6.74e9 * 2, rel=0.01)  # 6.74B parameters in bf16


def test_bad_arguments_name_the_field():
    with pytest.raises(ConfigError, match="batch"):
        estimate(TINY, CPU, batch=0)
    with pytest.raises(ConfigError, match="gen_len"):
        estimate(TINY, CPU, gen_len=-1)
    with pytest.raises(ConfigError, match="dtype"):
        estimate(TINY, CPU, dtype="float8")
    with pytest.raises(ValueError, match="unknown hardware 'tpu'; valid: cpu-here, h100"):
        estimate(TINY, "tpu")


def test_compressed_folder_is_estimated_from_its_manifest(tiny_folder, tmp_path):
    from rapidlm import LLM
    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.configs import Int8WeightOnly, Recipe
    from rapidlm.compress.saved import save_compressed

    loaded, recipe, report = load_with_recipe(
        tiny_folder, Recipe((Int8WeightOnly(),), name="int8"), torch.float32, torch.device("cpu"), keep_weights=True
    )
    out = save_compressed(loaded, recipe, report, tmp_path / "int8")
    e = estimate(out, CPU, "float32")
    assert e.spec.layers[0].wqkv.fmt == "int8" and e.spec.head.fmt == "int8"
    live = ModelSpec.of(LLM(out, device="cpu", dtype="float32").runner.model)
    assert e.spec.weight_bytes == live.weight_bytes
    with pytest.raises(ConfigError, match="already compressed"):
        estimate(out, CPU, "float32", quant="int8")


@pytest.mark.slow
def test_default_gguf_headers_give_the_loaded_models_formats(llm_auto):
    """The estimate reads the GGUF's tensor types only; the loaded native model must have those formats."""
    if llm_auto.dtype != torch.bfloat16:
        pytest.skip("native int4 runs on CPUs with bf16")
    e = estimate("smollm2-135m", CPU, "bfloat16")
    live = ModelSpec.of(llm_auto.runner.model)
    assert e.spec.layers == live.layers and e.spec.head == live.head
    assert e.spec.weight_bytes == live.weight_bytes


def test_cli_estimate_prints_the_prediction_and_formulas(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA2_7B))
    out = io.StringIO()
    assert main(["estimate", "--hardware", "h100", "--config", str(path), "--batch", "8", "--json",
                 str(tmp_path / "e.json")], out=out) == 0
    text = out.getvalue()
    for expected in ("time to first token", "tok/s", "memory", "datasheet: NVIDIA H100", "formulas:",
                     "attention: flops = B·H·q·L·(4·d + 5)", "decode step (batch 8"):
        assert expected in text
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["config"]["batch"] == 8 and saved["decode_tok_s"] > 0 and saved["hardware"]["name"] == "h100"
    assert main(["estimate", "--hardware", "tpu", "--config", str(path)], out=io.StringIO()) == 2
    assert "valid: cpu-here, h100" in capsys.readouterr().err
    assert main(["estimate", "--hardware", "h100", "--config", str(path), "--batch", "0"], out=io.StringIO()) == 2
    assert "EstimateConfig.batch" in capsys.readouterr().err


def test_cpu_here_tables_replace_the_roofline_where_measured():
    """With per-shape linear and attention times and the fixed step cost measured (as cpu-here records them), a
    decode step = those times + the roofline of the remaining small ops; nothing else."""
    from dataclasses import replace

    from rapidlm.profile.estimate import _measured_attentions, _measured_linears
    from rapidlm.profile.roofline import attention_key, linear_key, step_key

    spec = spec_from_config(TINY, "float32")
    linears = {linear_key(*s): 100.0 + i for i, s in enumerate(_measured_linears(spec, 2))}
    attention = {attention_key(*a): 50.0 for a in _measured_attentions(spec, 2, 8)}
    hw = replace(CPU, linear_us=linears, attention_us=attention, step_fixed_us={step_key("float32", 3, 2): 1000.0})
    e = estimate(TINY, hw, "float32", batch=2, prompt_len=4, gen_len=8)
    assert e.decode.measured_linears and e.decode.kv_len == 8 and not e.prefill.measured_linears
    per_layer = sum(linears[linear_key("float32", s.out_features, s.in_features, 2)] for s in spec.layers[0].linears)
    head = linears[linear_key("float32", 100, 32, 2)]
    kernels = 3 * per_layer + head + 3 * 50.0  # us
    small = sum(r.roofline_s for r in e.decode.rows) * 1e6 - kernels  # the other ops' roofline: tiny here
    assert 0 <= small < 5
    assert sum(r.fixed_s for r in e.decode.rows) == pytest.approx(1000.0e-6)
    assert e.decode_step_s == pytest.approx((kernels + small + 1000.0) * 1e-6)
    assert any("measured time at its shape" in f for f in e.formulas)

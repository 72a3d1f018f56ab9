"""Ceilings: validation, the roofline, datasheet entries, the measured-and-cached cpu-here, the op counts."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from rapidlm.profile import roofline
from rapidlm.profile.costs import OpCost
from rapidlm.profile.roofline import (
    CPU_LAYER_OPS,
    CPU_OPS_PER_LAYER,
    CPU_STEP_OPS,
    HARDWARE,
    Ceilings,
    get_hardware,
    load_ceilings,
    op_time_s,
)


def ceilings(**overrides) -> Ceilings:
    base = dict(name="t", bandwidth_gbs=10.0, flops_gflops={"float32": 50.0, "bfloat16": 100.0}, op_overhead_us=2.0,
                source="test")
    return Ceilings(**{**base, **overrides})


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"bandwidth_gbs": 0}, "bandwidth_gbs"),
        ({"bandwidth_gbs": float("nan")}, "bandwidth_gbs"),
        ({"op_overhead_us": -1}, "op_overhead_us"),
        ({"flops_gflops": {}}, "flops_gflops"),
        ({"flops_gflops": {"fp8": 1.0}}, "flops_gflops"),
        ({"flops_gflops": {"float32": 0.0}}, "flops_gflops"),
        ({"weight_stream_gbs": {"int3": 1.0}}, "weight_stream_gbs"),
        ({"source": ""}, "source"),
        ({"device": "tpu"}, "device"),
        ({"threads": 0}, "threads"),
        ({"name": ""}, "name"),
    ],
)
def test_ceilings_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ceilings(**overrides)


def test_roofline_is_the_larger_of_compute_and_memory():
    c = ceilings()
    memory_bound = OpCost(flops=1e6, bytes=1e8)  # 0.02 ms compute, 10 ms memory
    assert op_time_s(memory_bound, c, "float32") == pytest.approx(1e8 / 10e9)
    compute_bound = OpCost(flops=1e10, bytes=1e3)
    assert op_time_s(compute_bound, c, "float32") == pytest.approx(1e10 / 50e9)
    assert op_time_s(compute_bound, c, "bfloat16") == pytest.approx(1e10 / 100e9)
    with pytest.raises(ValueError, match="int8"):
        op_time_s(compute_bound, c, "int8")
    # fallbacks: unmeasured formats stream at the copy bandwidth and cost one op's fixed cost
    assert c.stream_gbs("int4") == 10.0 and c.linear_fixed_us("int4") == 2.0 and c.layer_op_us("int4") == 2.0


def test_datasheet_hardware_is_sane():
    assert HARDWARE["h100"].bandwidth_gbs == 3350 and HARDWARE["h100"].flops_gflops["bfloat16"] == 989_000
    assert HARDWARE["h200"].bandwidth_gbs == 4800 and HARDWARE["a100"].flops_gflops["bfloat16"] == 312_000
    bw = [HARDWARE[n].bandwidth_gbs for n in ("h200", "h100", "a100", "l4")]
    assert bw == sorted(bw, reverse=True)
    for name, h in HARDWARE.items():
        assert h.name == name and h.device == "cuda" and h.source.startswith("datasheet: ")
        assert h.flops_gflops["int8"] >= h.flops_gflops["bfloat16"] > h.flops_gflops["float32"]
        assert 10 < h.memory_gib <= 141 and h.link_gbs > 0 and 0 < h.op_overhead_us < 20
        # ridge point (FLOP per byte where compute catches up with memory): tens to hundreds for these GPUs
        assert 50 < h.flops_gflops["bfloat16"] / h.bandwidth_gbs < 500
        assert Ceilings.from_json(json.loads(json.dumps(h.to_json()))) == h


def test_unknown_hardware_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v9'.*cpu-here.*h100.*a100"):
        get_hardware("tpu-v9")


def test_cache_is_written_read_and_remeasured(tmp_path, monkeypatch):
    calls = []

    def fake_measure(threads=None):  # noqa: ANN001, ANN202
        calls.append(1)
        return ceilings(name="cpu-here", bandwidth_gbs=10.0 + len(calls), threads=torch.get_num_threads())

    monkeypatch.setattr(roofline, "measure_ceilings", fake_measure)
    first = load_ceilings(cache_dir=tmp_path)
    path = roofline.cache_path(tmp_path)
    assert len(calls) == 1 and path.is_file() and first.bandwidth_gbs == 11.0
    assert str(torch.get_num_threads()) + "t.json" in path.name and path.parent == tmp_path
    assert load_ceilings(cache_dir=tmp_path) == first and len(calls) == 1  # read back, not measured
    again = load_ceilings(remeasure=True, cache_dir=tmp_path)
    assert len(calls) == 2 and again.bandwidth_gbs == 12.0
    assert load_ceilings(cache_dir=tmp_path).bandwidth_gbs == 12.0  # the re-measurement replaced the cache
    path.write_text("{not json")
    assert load_ceilings(cache_dir=tmp_path).bandwidth_gbs == 13.0 and len(calls) == 3  # unreadable: measured
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "cache_version": -1}))
    assert load_ceilings(cache_dir=tmp_path).bandwidth_gbs == 14.0  # an older format: measured again
    # another thread count is another machine as far as the cache is concerned
    assert roofline.cache_path(tmp_path, threads=1) != roofline.cache_path(tmp_path, threads=7)


def _top_level_ops(fmt: str, layers: int, batch: int = 1) -> Counter:
    from torch.profiler import ProfilerActivity, profile

    runner = roofline.tiny_layer_runner(fmt, layers)
    cache = runner.allocate(batch, 16)
    for row in range(batch):
        runner.prefill(cache, row, [1, 2, 3])
    tokens, positions = torch.ones(batch, dtype=torch.long), torch.full((batch,), 3)
    runner.decode(cache, tokens, positions, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.decode(cache, tokens, positions, 4)
    return Counter(e.name for e in prof.events() if e.cpu_parent is None)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int4"])
def test_op_counts_match_the_eager_decode_step(fmt):
    """CPU_LAYER_OPS / CPU_STEP_OPS are what the PyTorch profiler counts at one decode step of rapidlm's model
    (the sampler's argmax, counted with the head, runs in the engine)."""
    if fmt == "int4":
        from rapidlm.compress.kernels.int4_cpu import int4_kernel_available

        if not int4_kernel_available():
            pytest.skip("no int4 kernel")
    one, two = _top_level_ops(fmt, 1), _top_level_ops(fmt, 2)
    per_layer = sum(two.values()) - sum(one.values())
    assert per_layer == CPU_OPS_PER_LAYER == sum(CPU_LAYER_OPS.values())
    assert sum(one.values()) - per_layer + 1 == sum(CPU_STEP_OPS.values())  # + 1: the engine's argmax


def test_measurements_run_and_are_positive(monkeypatch):
    monkeypatch.setattr(roofline, "QUIET_WAIT_S", 0.0)  # take disturbed timings as they are: only the plumbing counts
    monkeypatch.setattr(roofline, "_default_tokenizer", lambda: None)  # parsing the GGUF's vocabulary takes seconds
    assert roofline.measure_bandwidth(mib=16, repeats=2) > 0
    assert roofline.measure_gemm(torch.float32, n=128, repeats=2) > 0
    assert roofline.measure_gemm(torch.int8, n=128, repeats=2) > 0
    assert roofline.measure_linear_overhead("float32") > 0
    assert roofline.measure_weight_stream("int8", n=256, k=256, total_mib=4) > 0
    assert roofline.measure_layer_op_overhead("float32", rounds=1) >= 0
    assert roofline.measure_linear_us("int4", 64, 64, 2, total_mib=1) > 0
    assert roofline.measure_attention_us(2, 4, 2, 16, 24, layers=2) > 0
    assert roofline.measure_step_fixed_us("float32", 2, batch=2, steps=4) >= 0
    with pytest.raises(ValueError, match="unknown weight format"):
        roofline.measure_linear_overhead("int3")


@pytest.mark.slow
def test_measure_ceilings_on_this_machine():
    c = roofline.measure_ceilings()
    assert c.name == "cpu-here" and c.source.startswith("measured on ") and c.threads == torch.get_num_threads()
    assert c.bandwidth_gbs > 0.5 and c.flops_gflops["float32"] > 1 and c.op_overhead_us > 0
    assert {"float32", "bfloat16"} <= set(c.weight_stream_gbs) and Ceilings.from_json(c.to_json()) == c

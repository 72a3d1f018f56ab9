"""A tiny random model profiled once per session: the profiler and report tests read the same run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from rapidlm import LLM
from tests.helpers import save_hf_folder, tiny_hf_model

# Small enough to run in seconds, big enough for every part to show: 2 prompts decode together, 11 steps.
TINY_CONFIG = dict(batch=2, prompt_len=16, gen_len=12, rounds=2, warmup_tokens=2)


@contextlib.contextmanager
def one_thread():
    """The tiny model's ops take microseconds; on 2 threads of a busy 2-core machine each one can wait
    milliseconds at an OpenMP barrier. One thread keeps these tests fast; the profiler does not care."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return save_hf_folder(tiny_hf_model("LlamaForCausalLM"), tmp_path_factory.mktemp("profile") / "tiny")


@pytest.fixture(scope="session")
def tiny_llm(tiny_folder) -> LLM:
    return LLM(tiny_folder, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def ceilings():
    """Fixed ceilings: the tests check the profiler's arithmetic, not this machine's speed."""
    from rapidlm.profile.roofline import Ceilings

    return Ceilings(
        name="test", bandwidth_gbs=10.0, flops_gflops={"float32": 50.0, "bfloat16": 100.0}, op_overhead_us=2.0,
        source="fixed in tests/profile/conftest.py",
    )


@pytest.fixture(scope="session")
def tiny_profile(tiny_llm, ceilings):
    from rapidlm.profile.profiler import ProfileConfig, profile

    with one_thread():
        return profile(tiny_llm, ProfileConfig(**TINY_CONFIG), ceilings)

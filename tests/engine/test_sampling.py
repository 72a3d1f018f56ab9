"""SamplingParams validation and the sampler's transforms against straightforward references."""

from __future__ import annotations

import pytest
import torch

from rapidlm import InvalidSamplingParamsError, SamplingParams
from rapidlm.engine.sampling import SequenceSampler, sample_batch

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0.0),
        ("seed", "7"),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(InvalidSamplingParamsError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    samplers = [SequenceSampler(SamplingParams(temperature=0), [1], 50, CPU) for _ in range(3)]
    assert torch.equal(sample_batch(logits, samplers), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(50)
    for params in (SamplingParams(temperature=1.0, top_k=1, seed=0), SamplingParams(top_p=1e-6, seed=0)):
        s = SequenceSampler(params, [1], 50, CPU)
        assert all(int(s.sample(logits)) == int(logits.argmax()) for _ in range(20))


def test_top_k_only_samples_the_k_best():
    logits = torch.randn(100)
    allowed = set(torch.topk(logits, 5).indices.tolist())
    s = SequenceSampler(SamplingParams(top_k=5, temperature=2.0, seed=3), [1], 100, CPU)
    assert {int(s.sample(logits)) for _ in range(300)} <= allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = SequenceSampler(SamplingParams(top_p=0.7, seed=0), [0], 4, CPU)
    assert {int(s.sample(logits)) for _ in range(300)} == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1000)
    draws = []
    for _ in range(2):
        s = SequenceSampler(SamplingParams(temperature=1.0, seed=1234), [1], 1000, CPU)
        draws.append([int(s.sample(logits)) for _ in range(20)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, 30)
    prompt = [3, 7, 7, 12]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt]), logits.clone())[0]
    s = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=1.3), prompt, 30, CPU)
    assert int(s.sample(logits[0])) == int(expected.argmax())
    penalised = torch.where(s.seen, torch.where(logits[0] < 0, logits[0] * 1.3, logits[0] / 1.3), logits[0])
    torch.testing.assert_close(penalised, expected)

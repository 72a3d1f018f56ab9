"""Distillation: the KD loss against a reference, the schedule, and interrupt + resume == uninterrupted."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rapidlm.compress.configs import Calibration, Structured
from rapidlm.compress.distill import DistillConfig, kd_loss, lr_at, run_distillation
from rapidlm.errors import ConfigError
from rapidlm.loading.loader import load_model
from tests.conftest import WIKITEXT
from tests.helpers import save_hf_folder, tiny_hf_model


def test_kd_loss_matches_a_reference_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 5), generator=g)
    alpha, temp = 0.7, 2.5
    loss, kd, ce = kd_loss(s, t, y, alpha, temp)
    # float64 by hand: KL(p || q) = sum p (log p - log q), p = softmax(t / T), q = softmax(s / T), mean over tokens
    p = torch.softmax(t.double() / temp, -1)
    q = torch.softmax(s.double() / temp, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    nll = -torch.log_softmax(s.double(), -1).gather(-1, y[..., None]).mean()
    assert kd.item() == pytest.approx(kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(nll.item(), rel=1e-5)
    assert loss.item() == pytest.approx(alpha * temp**2 * kl.item() + (1 - alpha) * nll.item(), rel=1e-5)
    # and torch's own KL
    ref = F.kl_div(
        F.log_softmax(s / temp, -1).view(-1, 11),
        F.log_softmax(t / temp, -1).view(-1, 11),
        log_target=True,
        reduction="batchmean",
    )
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5)
    only_ce, zero, ce2 = kd_loss(s, None, y, 0.0, temp)
    assert only_ce.item() == ce2.item() == ce.item() and zero.item() == 0


def test_schedule_warms_up_then_follows_a_cosine():
    cfg = DistillConfig(tokens=8 * 256 * 50, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert cfg.steps == 50
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(49, cfg) == pytest.approx(1e-4)
    mid = 10 + (49 - 10) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(1e-4 + 0.45e-3 * (1 + math.cos(math.pi * (int(mid) - 10) / 39)))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"alpha": 1.5}, "alpha"),
        ({"tokens": 10}, "tokens"),
        ({"train_region": (0.4, 1.0)}, "overlaps"),
        ({"batch_size": 0}, "batch_size"),
        ({"autocast": "fp8"}, "autocast"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DistillConfig(**kwargs)


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.configs import Recipe
    from rapidlm.compress.saved import save_compressed

    root = tmp_path_factory.mktemp("kd")
    teacher = save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=7, num_hidden_layers=3), root / "teacher")
    recipe = Recipe((Structured(layers=1, ffn_channels=32),), Calibration(data=WIKITEXT, samples=2, seq_len=32))
    loaded, recipe, report = load_with_recipe(teacher, recipe, torch.float32, torch.device("cpu"), keep_weights=True)
    student = save_compressed(loaded, recipe, report, root / "student")
    return teacher, student


CFG = DistillConfig(
    tokens=6 * 2 * 32, seq_len=32, batch_size=2, warmup_steps=2, eval_every=3, eval_windows=2, save_every=2, lr=1e-3
)


def test_interrupt_and_resume_give_the_same_weights(teacher_and_student, tmp_path):
    teacher, student = teacher_and_student
    whole, straight = run_distillation(teacher, student, WIKITEXT, tmp_path / "whole", CFG, show_progress=False)

    def interrupt(step: int) -> None:
        if step == 3:  # mid-run, between checkpoints (save_every=2): nothing done may be lost
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    _, first = run_distillation(teacher, student, WIKITEXT, out, CFG, show_progress=False, on_step=interrupt)
    assert first.interrupted and len(first.history) == 3 and not (out / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="resume"):
        run_distillation(teacher, student, WIKITEXT, out, CFG, show_progress=False)
    _, second = run_distillation(teacher, student, WIKITEXT, out, CFG, resume=True, show_progress=False)
    assert not second.interrupted and [h["step"] for h in second.history] == list(range(1, 7))
    a = load_file(str(whole / "checkpoint" / "student.safetensors"))
    b = load_file(str(out / "checkpoint" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical fp32 weights
    assert second.evals == straight.evals and [h["loss"] for h in second.history] == [
        h["loss"] for h in straight.history
    ]
    reloaded = load_model(out, torch.float32)  # the student folder loads like any model
    assert reloaded.config.num_layers == 2


def test_plain_fine_tuning_needs_no_teacher_forward(teacher_and_student, tmp_path):
    teacher, student = teacher_and_student
    cfg = DistillConfig(tokens=2 * 2 * 32, seq_len=32, batch_size=2, warmup_steps=1, eval_windows=2, alpha=0.0)
    _, result = run_distillation(teacher, student, WIKITEXT, tmp_path / "ft", cfg, show_progress=False)
    assert all(h["kd"] == 0 for h in result.history) and len(result.evals) == 2

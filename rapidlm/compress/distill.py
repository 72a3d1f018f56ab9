"""Knowledge distillation: train a smaller student (a structurally pruned teacher) to match the teacher.

loss = alpha * T^2 * KL(p_teacher,T || p_student,T) + (1 - alpha) * CE(student, next tokens)
(Hinton et al., 2015: the T^2 keeps the soft term's gradients on the scale of the hard one). alpha = 0 is plain
next-token fine-tuning of the same student, the baseline distillation has to beat.

Training text comes from one region of a text file and held-out perplexity from another, disjoint one. Batches
are a pure function of (seed, step), and a checkpoint holds the student's weights, AdamW's moments and the step,
all as safetensors plus JSON (never pickles), so an interrupted run resumed from its last checkpoint ends with
the same weights, bit for bit on the CPU, as one that never stopped. Ctrl-C or SIGTERM writes that checkpoint
(at the last completed step) before exiting.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rapidlm.errors import ConfigError
from rapidlm.runtime.kv_cache import NoCacheKV

CHECKPOINT = "checkpoint"
AUTOCAST_MODES = ("auto", "bf16", "off")


@dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of one distillation (or, with alpha = 0, fine-tuning) run."""

    tokens: int = 200_000  # training tokens: steps = tokens // (batch_size * seq_len * grad_accum)
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr: float = 3e-5  # the cosine schedule's floor, reached at the last step
    warmup_steps: int = 10
    weight_decay: float = 0.0
    alpha: float = 0.5  # weight of the distillation term
    temperature: float = 2.0
    clip_norm: float = 1.0
    eval_every: int = 25  # steps between held-out perplexity evaluations (0: only at the end)
    eval_windows: int = 16  # windows of seq_len tokens from eval_region
    save_every: int = 25  # steps between checkpoints (0: only at the end or on interrupt)
    seed: int = 0
    train_region: tuple[float, float] = (0.5, 1.0)  # fractions of the file's tokens
    eval_region: tuple[float, float] = (0.0, 0.5)
    autocast: str = "auto"  # bf16 autocast: "auto" (where the CPU has bf16 instructions, or CUDA), "bf16", "off"

    def __post_init__(self) -> None:
        for name in ("tokens", "seq_len", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"DistillConfig.{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_windows", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"DistillConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "clip_norm", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"DistillConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ConfigError("DistillConfig.temperature and DistillConfig.lr must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"DistillConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if self.steps < 1:
            raise ConfigError(
                f"DistillConfig.tokens={self.tokens} is less than one step of "
                f"{self.batch_size * self.seq_len * self.grad_accum} tokens"
            )
        for name in ("train_region", "eval_region"):
            r = tuple(getattr(self, name))
            if len(r) != 2 or not 0 <= r[0] < r[1] <= 1:
                raise ConfigError(f"DistillConfig.{name} must be [start, end] with 0 <= start < end <= 1, got {r}")
            object.__setattr__(self, name, (float(r[0]), float(r[1])))
        a, b = self.train_region, self.eval_region
        if a[0] < b[1] and b[0] < a[1]:
            raise ConfigError(f"DistillConfig.train_region {list(a)} overlaps eval_region {list(b)}")
        if self.autocast not in AUTOCAST_MODES:
            raise ConfigError(f"DistillConfig.autocast must be one of {list(AUTOCAST_MODES)}, got {self.autocast!r}")

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.seq_len * self.grad_accum)


def kd_loss(
    student_logits: torch.Tensor,  # (..., V)
    teacher_logits: torch.Tensor | None,  # (..., V), None when alpha == 0
    targets: torch.Tensor,  # (...) next-token ids
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce): kd = KL(softmax(t / T) || softmax(s / T)) per token (mean), ce = next-token cross entropy."""
    s = student_logits.float().reshape(-1, student_logits.shape[-1])
    ce = F.cross_entropy(s, targets.reshape(-1))
    if alpha == 0 or teacher_logits is None:
        return ce, torch.zeros((), dtype=ce.dtype), ce
    t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
    log_p = F.log_softmax(t / temperature, dim=-1)  # teacher
    log_q = F.log_softmax(s / temperature, dim=-1)  # student
    kd = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr down to min_lr at the last step (step is 0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _region(ids: list[int], region: tuple[float, float]) -> list[int]:
    return ids[int(region[0] * len(ids)) : int(region[1] * len(ids))]


def batch_at(train_ids: torch.Tensor, cfg: DistillConfig, step: int, micro: int) -> torch.Tensor:
    """(batch_size, seq_len + 1) token windows for one micro-batch: a pure function of (seed, step, micro)."""
    rng = random.Random(f"{cfg.seed}/{step}/{micro}")
    hi = len(train_ids) - cfg.seq_len - 1
    starts = [rng.randint(0, hi) for _ in range(cfg.batch_size)]
    return torch.stack([train_ids[s : s + cfg.seq_len + 1] for s in starts])


def forward_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of whole sequences, no KV cache (training and held-out scoring)."""
    B, T = tokens.shape
    dtype = next(model.parameters()).dtype
    positions = torch.arange(T, device=tokens.device)[None].expand(B, T)
    return model(tokens, positions, [NoCacheKV(dtype)] * len(model.layers), T)


def _autocast(cfg: DistillConfig, device: torch.device):  # noqa: ANN202
    from rapidlm.runtime.cpu_linear import mkldnn_bf16_available

    on = cfg.autocast == "bf16" or (cfg.autocast == "auto" and (device.type == "cuda" or mkldnn_bf16_available()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


@torch.inference_mode()
def heldout_perplexity(model: nn.Module, windows: torch.Tensor, cfg: DistillConfig) -> float:
    """exp(mean next-token NLL) over windows (N, seq_len + 1), in the training precision."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), cfg.batch_size):
        w = windows[i : i + cfg.batch_size]
        with _autocast(cfg, w.device):
            logits = forward_logits(model, w[:, :-1])
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        count += w[:, 1:].numel()
    model.train(was_training)
    return math.exp(float(nll) / count)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON only


def _student_tensors(student: nn.Module) -> dict[str, torch.Tensor]:
    sd = student.state_dict()
    if student.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as embed.weight
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(out: Path, student: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Write out/checkpoint atomically (a temporary folder renamed over the old one)."""
    tmp, final = out / (CHECKPOINT + ".tmp"), out / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_student_tensors(student), str(tmp / "student.safetensors"))
    osd = opt.state_dict()
    moments = {f"{i}.{k}": v.contiguous() for i, s in osd["state"].items() for k, v in s.items()}
    save_file(moments, str(tmp / "optimizer.safetensors"))
    state = {**state, "param_groups": osd["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        old = out / (CHECKPOINT + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


def load_checkpoint(out: Path, student: nn.Module, opt: torch.optim.Optimizer) -> dict:
    folder = out / CHECKPOINT
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    weights = load_file(str(folder / "student.safetensors"))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and student.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(
            f"{folder}: checkpoint does not fit the student (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    moments = load_file(str(folder / "optimizer.safetensors"))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        i, name = key.split(".", 1)
        per_param.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    steps: int
    tokens: int
    history: list[dict] = field(default_factory=list)  # per step: loss, kd, ce, lr, tok/s
    evals: list[dict] = field(default_factory=list)  # per evaluation: step, tokens, perplexity
    interrupted: bool = False


class _StopFlag:
    """SIGINT/SIGTERM set it: the loop finishes the step in flight, checkpoints and stops, so weights and
    optimizer state are never caught half-updated. A second Ctrl-C stops at once, without that checkpoint."""

    def __init__(self) -> None:
        self.set = False
        self.forced = False

    def __call__(self, signum, frame) -> None:  # noqa: ANN001
        if self.set and signum == signal.SIGINT:
            self.forced = True
            raise KeyboardInterrupt
        self.set = True
        sys.stderr.write("\nstopping after this step (Ctrl-C again to stop now, losing the step in flight)\n")


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    token_ids: list[int],
    out: str | os.PathLike,
    cfg: DistillConfig,
    resume: bool = False,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> DistillResult:
    """Train `student` in place (fp32 master weights) on windows of `token_ids` (the whole tokenized file), with
    checkpoints in out/checkpoint. teacher may be None when cfg.alpha == 0. on_step(step) runs before each step
    (tests use it to simulate an interrupt)."""
    out = Path(out)
    if cfg.alpha > 0 and teacher is None:
        raise ConfigError("DistillConfig.alpha > 0 needs a teacher")
    if teacher is not None and teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise ConfigError(
            f"teacher and student vocabularies differ ({teacher.cfg.vocab_size} vs {student.cfg.vocab_size})"
        )
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(f"{out / CHECKPOINT} exists: pass resume=True (--resume) or choose a new output folder")
    train_ids = torch.tensor(_region(token_ids, cfg.train_region))
    eval_ids = torch.tensor(_region(token_ids, cfg.eval_region))
    need = cfg.seq_len + 1
    if len(train_ids) <= need or len(eval_ids) < need * max(cfg.eval_windows, 1):
        raise ConfigError(
            f"the training text is too short: {len(train_ids)} training and {len(eval_ids)} held-out tokens for "
            f"seq_len {cfg.seq_len} and {cfg.eval_windows} evaluation windows"
        )
    eval_windows = eval_ids[: need * cfg.eval_windows].view(cfg.eval_windows, need) if cfg.eval_windows else None
    device = next(student.parameters()).device
    student.float().train()
    for p in student.parameters():  # loaders hand out frozen (possibly inference-mode) tensors: make them trainable
        p.data = p.data.clone()
        p.requires_grad_(True)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    decay = [p for n, p in student.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,  # one fixed update order: the same arithmetic before and after a resume
    )
    result = DistillResult(steps=cfg.steps, tokens=0)
    start = 0
    if resume and (out / CHECKPOINT).exists():
        state = load_checkpoint(out, student, opt)
        if state["config"] != json.loads(json.dumps(asdict(cfg))):
            raise ConfigError(f"{out / CHECKPOINT} was made with other settings; resume with the same ones")
        start, result.history, result.evals = state["step"], state["history"], state["evals"]
        result.tokens = start * cfg.batch_size * cfg.seq_len * cfg.grad_accum
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(step: int) -> None:
        state = {"step": step, "config": asdict(cfg), "history": result.history, "evals": result.evals}
        save_checkpoint(out, student, opt, state)

    def evaluate(step: int) -> None:
        if eval_windows is not None:
            ppl = heldout_perplexity(student, eval_windows.to(device), cfg)
            result.evals.append({"step": step, "tokens": result.tokens, "perplexity": ppl})
            if show_progress:
                sys.stderr.write(f"\n  step {step}: held-out perplexity {ppl:.3f}\n")

    if start == 0 and not result.evals:
        evaluate(0)
    stop = _StopFlag()
    previous = {}
    if _main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    step = start
    try:
        for step in range(start, cfg.steps):
            if on_step is not None:
                on_step(step)
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
            for micro in range(cfg.grad_accum):
                batch = batch_at(train_ids, cfg, step, micro).to(device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                teacher_logits = None
                if cfg.alpha > 0:
                    with torch.no_grad(), _autocast(cfg, device):
                        teacher_logits = forward_logits(teacher, inputs)
                with _autocast(cfg, device):
                    logits = forward_logits(student, inputs)
                loss, kd, ce = kd_loss(logits, teacher_logits, targets, cfg.alpha, cfg.temperature)
                (loss / cfg.grad_accum).backward()
                for k, v in (("loss", loss), ("kd", kd), ("ce", ce)):
                    sums[k] += float(v.detach()) / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_norm)
            opt.step()
            done = step + 1
            result.tokens = done * cfg.batch_size * cfg.seq_len * cfg.grad_accum
            rate = cfg.batch_size * cfg.seq_len * cfg.grad_accum / (time.perf_counter() - t0)
            result.history.append({"step": done, **sums, "lr": opt.param_groups[0]["lr"], "tok_s": rate})
            if show_progress:
                sys.stderr.write(
                    f"\rdistill step {done}/{cfg.steps} loss {sums['loss']:.4f} (kd {sums['kd']:.4f} "
                    f"ce {sums['ce']:.4f}) lr {opt.param_groups[0]['lr']:.2e} {rate:,.0f} tok/s"
                )
                sys.stderr.flush()
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                evaluate(done)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                checkpoint(done)
            if stop.set:
                raise KeyboardInterrupt
        evaluate(cfg.steps)
        checkpoint(cfg.steps)
    except KeyboardInterrupt:
        # The step in flight (if any) is dropped; the student and optimizer hold the last completed step.
        completed = len(result.history)
        student.zero_grad(set_to_none=True)
        if not stop.forced and (completed > start or not (out / CHECKPOINT).exists()):
            checkpoint(completed)
        result.interrupted = True
        if show_progress:
            sys.stderr.write(f"\ninterrupted: {out / CHECKPOINT} holds the last saved step; rerun with --resume\n")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if show_progress and not result.interrupted:
        sys.stderr.write("\n")
    return result


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------------------------
# The whole job, as `rapidlm distill` runs it


def run_distillation(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: DistillConfig,
    resume: bool = False,
    save_dtype: torch.dtype = torch.bfloat16,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Path, DistillResult]:
    """Load the teacher, build or load the student (a saved float model folder, or a pruning recipe applied to
    the teacher), train, and save the student to `out` (loadable anywhere a model is) next to out/checkpoint."""
    from rapidlm.compress.apply import cast_float_modules, load_with_recipe
    from rapidlm.compress.configs import Dequantized, Recipe
    from rapidlm.compress.quantize import QuantizeReport, block_linears
    from rapidlm.compress.recipe import resolve_recipe
    from rapidlm.compress.saved import is_compressed_folder, manifest_recipe, save_compressed
    from rapidlm.loading.loader import LoadedModel, load_model

    device = torch.device("cpu")
    out = Path(out)
    data = Path(data)
    if not data.is_file():
        raise ConfigError(f"--data {data} does not exist")
    if (out / "model.safetensors").exists():
        raise FileExistsError(f"{out} already holds a finished model; choose a new --out")
    t = load_model(teacher, torch.float32, device, native=False)
    pruning = []
    spath = Path(student)
    if spath.is_dir():
        s = load_model(spath, torch.float32, device, native=False)
        s_recipe = manifest_recipe(spath) if is_compressed_folder(spath) else None
        if len(block_linears(s.model)) != 4 * s.config.num_layers:
            raise ConfigError(f"the student {spath} has quantized layers: distil a float (pruned) student")
    else:
        s_recipe = resolve_recipe(str(student))
        if s_recipe.weight_step is not None or not s_recipe.prune_steps:
            raise ConfigError(f"--student {student!r} must be a folder or a recipe that only prunes (e.g. structured)")
        s, s_recipe, report = load_with_recipe(teacher, s_recipe, torch.float32, device, show_progress=show_progress)
        pruning = report.pruning
    if s.config.vocab_size != t.config.vocab_size:
        raise ConfigError(f"teacher and student vocabularies differ ({t.config.vocab_size} vs {s.config.vocab_size})")
    ids = t.tokenizer.encode(data.read_text(encoding="utf-8"), add_special_tokens=False)
    result = distill(t.model if cfg.alpha > 0 else None, s.model, ids, out, cfg, resume, show_progress, on_step=on_step)
    if result.interrupted:
        return out, result
    cast_float_modules(s.model, save_dtype)
    saved = LoadedModel(s.model.cfg, s.model, t.tokenizer, t.path, "rapidlm")
    report = QuantizeReport("distilled" if cfg.alpha > 0 else "fine-tuned", keep_weights=True)
    report.pruning = pruning
    recipe = s_recipe or Recipe((Dequantized(),), name="student")
    extra = {
        "training": {
            "teacher": str(t.path),
            "student": str(student),
            "data": str(data),
            "config": asdict(cfg),
            "steps": result.steps,
            "tokens": result.tokens,
            "evals": result.evals,
        }
    }
    return save_compressed(saved, recipe, report, out, extra=extra, ignore=(CHECKPOINT,)), result

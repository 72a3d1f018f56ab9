"""SamplingParams (validated) and the sampler that turns a batch of logits into next tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rapidlm.errors import InvalidSamplingParamsError

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Mirrors vLLM's names; `temperature=0` means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in prompt or output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            raise bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", "must be an int >= 0 (0 disables it)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.01 <= self.repetition_penalty <= 100:
            # outside this range dividing a logit by it can overflow to inf (found by fuzzing the server)
            raise bad("repetition_penalty", "must be between 0.01 and 100")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", "must be an int or None")
        if not isinstance(self.stop, Sequence) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a list of non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids (ints >= 0)")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        # Below 1e-5 a temperature only overflows logits / temperature; it means greedy (as in vLLM).
        return self.temperature < GREEDY_BELOW


class SequenceSampler:
    """Per-sequence sampling state: its own seeded generator and the set of tokens seen so far."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int, device: torch.device):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) fp32 -> a 0-dim token id tensor."""
        p = self.params
        if self.seen is not None:
            # CTRL-style penalty as HF applies it: shrink positive logits, push negative ones further down.
            penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if p.greedy:
            return logits.argmax()
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the mass before it already reaches top_p; the top token always stays.
            drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
            drop_sorted[0] = False  # explicitly: a top_p under fp32's smallest value rounds to 0 (fuzzing found it)
            drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)  # back to vocab order
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def sample_batch(logits: torch.Tensor, samplers: Sequence[SequenceSampler]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Plain greedy batches take one argmax, no per-row work."""
    if all(s.params.greedy and s.seen is None for s in samplers):
        return logits.argmax(dim=-1)
    return torch.stack([s.sample(row) for s, row in zip(samplers, logits)])

"""Perplexity: the standard harness. Tokenize the whole text, cut it into non-overlapping windows of `ctx`
tokens, and score every token after the first of each window given the ones before it in that window.

perplexity = exp(mean negative log-likelihood over all scored tokens)
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rapidlm.errors import ConfigError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int  # tokens predicted: windows * (ctx - 1)
    text_tokens: int  # tokens in the whole text
    windows: int
    ctx: int


def perplexity(
    llm,  # noqa: ANN001 - rapidlm.LLM (imported lazily: eval sits on top of the API)
    token_ids: list[int],
    ctx: int = 512,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of `token_ids` under `llm` with non-overlapping `ctx`-token windows (a partial last
    window is dropped, as in the usual harness)."""
    if not isinstance(ctx, int) or ctx < 2:
        raise ConfigError(f"ctx must be an int >= 2, got {ctx!r}")
    if ctx > llm.max_model_len:
        raise ConfigError(f"ctx={ctx} exceeds the model's context of {llm.max_model_len} tokens")
    windows = len(token_ids) // ctx
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ConfigError(f"the text has {len(token_ids)} tokens: fewer than one window of ctx={ctx}")
    total = 0.0
    for w in range(windows):
        ids = token_ids[w * ctx : (w + 1) * ctx]
        logits = llm.runner.score(ids)  # (ctx, V) fp32
        # Sum in float64: hundreds of thousands of per-token terms would lose digits in fp32.
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:], device=logits.device), reduction="sum")
        total += float(nll.double())
        if progress is not None:
            progress(w + 1, windows)
    scored = windows * (ctx - 1)
    return PerplexityResult(math.exp(total / scored), total / scored, scored, len(token_ids), windows, ctx)


def perplexity_of_file(
    llm,  # noqa: ANN001
    path: str | os.PathLike,
    ctx: int = 512,
    max_windows: int | None = None,
    show_progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a UTF-8 text file, tokenized whole with the model's tokenizer (no BOS added)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    ids = llm.tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    return perplexity(llm, ids, ctx, max_windows, _progress_bar if show_progress else None)


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\rperplexity [{'#' * filled}{'.' * (width - filled)}] {done}/{total} windows")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()

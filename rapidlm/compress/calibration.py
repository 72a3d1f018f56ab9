"""Calibration: token windows drawn from a text file, and the input statistics of each linear on them.

One forward pass of the float model over the samples collects, for every linear that will be quantized,
whatever the chosen methods need: X^T X (GPTQ's Hessian), per-channel mean/max |x| (AWQ, SmoothQuant), sum of
x^2 (Wanda) and a row sample of X (AWQ's search objective). All statistics come from the unquantized model
("one shot"), which keeps a single pass and a simple memory bound.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rapidlm.compress.configs import Calibration
from rapidlm.errors import ConfigError
from rapidlm.runtime.kv_cache import StaticKVCache


def calibration_samples(tokenizer, cal: Calibration) -> list[list[int]]:  # noqa: ANN001
    """`cal.samples` windows of `cal.seq_len` token ids at seeded random offsets inside `cal.region`."""
    if not str(cal.data):
        raise ConfigError("Calibration.data is not set: give a text file to calibrate on")
    path = Path(cal.data)
    if not path.is_file():
        raise ConfigError(f"Calibration.data: {path} does not exist")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    lo, hi = int(cal.region[0] * len(ids)), int(cal.region[1] * len(ids))
    region = ids[lo:hi]
    if len(region) < cal.seq_len:
        raise ConfigError(
            f"Calibration: the region {list(cal.region)} of {path} has {len(region)} tokens, "
            f"fewer than seq_len={cal.seq_len}"
        )
    rng = random.Random(cal.seed)
    starts = [rng.randrange(0, len(region) - cal.seq_len + 1) for _ in range(cal.samples)]
    return [region[s : s + cal.seq_len] for s in starts]


@dataclass
class InputStats:
    """Statistics of one linear's inputs x (rows of K features) over the calibration tokens."""

    k: int
    want_hessian: bool = False
    sample_rows: int = 0  # keep up to this many input rows (evenly spread over batches)
    tokens: int = 0
    hessian: torch.Tensor | None = None  # (K, K) fp32 sum of x x^T
    abs_mean: torch.Tensor | None = None  # (K,) mean |x|
    abs_max: torch.Tensor | None = None  # (K,) max |x|
    sq_sum: torch.Tensor | None = None  # (K,) sum of x^2 (Wanda's ||X_j||^2)
    samples: list[torch.Tensor] = field(default_factory=list)
    _abs_sum: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.k).float()  # (T, K)
        if self.want_hessian:
            h = x.T @ x
            self.hessian = h if self.hessian is None else self.hessian.add_(h)
        a = x.abs()
        s, m = a.sum(0), a.amax(0)
        self._abs_sum = s if self._abs_sum is None else self._abs_sum.add_(s)
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        q = x.square().sum(0)
        self.sq_sum = q if self.sq_sum is None else self.sq_sum.add_(q)
        self.tokens += x.shape[0]
        self.abs_mean = self._abs_sum / self.tokens
        if self.sample_rows:
            self.samples.append(x[:: max(1, x.shape[0] // 64)][:64].clone())  # up to 64 rows per batch

    def sample(self) -> torch.Tensor:
        """(rows, K) of kept inputs, at most `sample_rows`."""
        return torch.cat(self.samples)[: self.sample_rows]


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module,
    names: list[str],
    samples: list[list[int]],
    want_hessian: bool = False,
    sample_rows: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, InputStats]:
    """Run `samples` through `model` (a rapidlm Transformer) and gather InputStats for the named linears."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        st = InputStats(module.in_features, want_hessian, sample_rows)
        stats[name] = st
        handles.append(module.register_forward_pre_hook(lambda _m, args, st=st: st.add(args[0])))
    device = next(model.parameters()).device
    try:
        for i, ids in enumerate(samples):
            cache = StaticKVCache(model.cfg, 1, len(ids), torch.float32, device)
            tokens = torch.tensor([ids], device=device)
            model(tokens, torch.arange(len(ids), device=device)[None], cache.layers(), len(ids), last_only=True)
            if progress is not None:
                progress(i + 1, len(samples))
    finally:
        for h in handles:
            h.remove()
    return stats


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A one-line stderr progress bar: `label [#####.....] done/total`."""

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show

"""One forward pass at a time: prefill a prompt into a cache row, or decode one token for every live row."""

from __future__ import annotations

import torch
from torch import nn

from rapidlm.config import ModelConfig
from rapidlm.errors import ConfigError
from rapidlm.runtime.cpu_linear import (
    DenseCopyLinear,
    add_dense_copies,
    dense_copy_bytes,
    mkldnn_bf16_available,
    pack_linears,
    row_groups,
)
from rapidlm.runtime.kv_cache import StaticKVCache
from rapidlm.runtime.paged_kv import PagedKVCache

DENSE_PREFILL = ("auto", "on", "off")
DENSE_PREFILL_AUTO_BYTES = 1 << 30


class ModelRunner:
    """Owns the model on its device and dtype; hands out KV caches and runs prefill/decode steps.

    Logits come back in fp32 whatever the model dtype, so sampling behaves the same for every dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        compile: bool = False,
        kv_int8: bool = False,
        dense_prefill: str = "off",
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        # On the CPU, attention and the cache run in fp32 even for bf16 weights: PyTorch's bf16 attention
        # kernels are ~3x slower at decode sizes, and fp32 keys/values hold the bf16 values exactly.
        self.kv_dtype = torch.float32 if device.type == "cpu" else dtype
        self.kv_int8 = kv_int8  # store K/V as int8 + per-(token, head) scales, read back in kv_dtype
        if device.type == "cpu" and dtype == torch.bfloat16 and mkldnn_bf16_available():
            pack_linears(model)
        self.dense_copies = 0
        if dense_prefill not in DENSE_PREFILL:
            raise ConfigError(f"dense_prefill must be one of {sorted(DENSE_PREFILL)}, got {dense_prefill!r}")
        if device.type == "cpu" and dtype == torch.bfloat16 and dense_prefill != "off":
            # Prefill chunks run a bf16 copy of the 4-/8-bit projections (runtime/cpu_linear.DenseCopyLinear):
            # compute-bound work at the bf16 GEMM's rate, for 2 bytes a weight. "auto": when that is <= 1 GiB.
            if dense_prefill == "on" or dense_copy_bytes(model) <= DENSE_PREFILL_AUTO_BYTES:
                self.dense_copies = add_dense_copies(model)
        # torch.compile fuses the ~40 small ops per layer between the matmuls into a few generated kernels and
        # drops Python's per-op cost: measured 19 -> 11 ms per decode step on SmolLM2-135M (2 CPU cores). It
        # only serves single-sequence decode steps (one graph; dynamic kv_len), and is compiled at start-up by
        # warmup() because a cold compile takes minutes on 2 cores (~1.5 min with Inductor's disk cache warm).
        # Options that halve what is left around the kernels (measured on SmolLM2-135M, 2 cores, native Q4_1/Q8_0:
        # 95 -> 131 tok/s at batch 1): guards skip the model's modules and parameters (1.7 -> 0.6 ms of guard
        # checks per step; the runner never mutates the model after this point), and Inductor's C++ wrapper calls
        # the generated kernels and ops from C++ instead of a Python function per step; intermediate values are
        # rounded to the model dtype where eager rounds them.
        options = {
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
            "cpp_wrapper": True,
            "emulate_precision_casts": True,
        }
        self.compiled_decode = torch.compile(model, dynamic=True, options=options) if compile else None
        # CUDA (issue 7): decode steps run as CUDA graphs over rapidlm's fused Triton forward (runtime/cuda_graphs.py)
        self.cuda_graphs = None
        if device.type == "cuda":
            from rapidlm.runtime.cuda_graphs import DecodeGraphs, cuda_graphs_enabled, model_supported

            if cuda_graphs_enabled() and model_supported(model):
                self.cuda_graphs = DecodeGraphs(model)
        if compile:
            self.warmup()

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def allocate(self, batch_size: int, max_len: int) -> StaticKVCache:
        return StaticKVCache(self.cfg, batch_size, max_len, self.kv_dtype, self.device, int8=self.kv_int8)

    @torch.inference_mode()
    def prefill(self, cache: StaticKVCache, row: int, token_ids: list[int], start: int = 0) -> torch.Tensor:
        """Run `token_ids` (at positions start, start+1, ...) into cache row `row`; last logits (vocab,)."""
        T = len(token_ids)
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(start, start + T, device=self.device)[None, :]  # (1, T)
        logits = self.model(tokens, positions, cache.layers(slice(row, row + 1)), start + T, last_only=True)
        return logits[0, -1].float()

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one sequence, (T, vocab) fp32: for perplexity, not for generation."""
        T = len(token_ids)
        cache = self.allocate(1, T)
        tokens = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(T, device=self.device)[None, :]
        return self.model(tokens, positions, cache.layers(), T)[0].float()

    @torch.inference_mode()
    def decode(self, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token per live row: tokens and positions (B,), kv_len = max(positions) + 1. Logits (B, vocab)."""
        if self.cuda_graphs is not None and self.cuda_graphs.supports(cache):
            return self.cuda_graphs.decode(cache, tokens, positions)
        forward = self.compiled_decode if self.compiled_decode is not None and len(tokens) == 1 else self.model
        logits = forward(tokens[:, None], positions[:, None], cache.layers(), kv_len)
        return logits[:, 0].float()

    def allocate_paged(
        self, num_blocks: int, block_size: int, storage_dtype: torch.dtype | None = None
    ) -> PagedKVCache:  # storage_dtype: what the pools hold (None: kv_dtype); attention still runs in kv_dtype
        if self.kv_int8:
            raise ConfigError("kv-int8 is not supported by the paged KV cache (serving engine) yet; drop kv-int8")
        return PagedKVCache(self.cfg, num_blocks, block_size, self.kv_dtype, self.device, storage_dtype=storage_dtype)

    @torch.inference_mode()
    def forward_paged(
        self,
        cache: PagedKVCache,
        tokens: list[list[int]],  # per row, this step's tokens (all rows the same length T)
        start: list[int],  # per row, the position of its first token
        block_tables: list[list[int]],  # per row, blocks covering positions [0, start + T)
        all_logits: bool = False,  # logits at every position (prompt logprobs), else only the last
    ) -> torch.Tensor:  # (B, T or 1, vocab) fp32
        T = len(tokens[0])
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (B, T)
        pos = torch.tensor(start, dtype=torch.long, device=self.device)[:, None] + torch.arange(T, device=self.device)
        seq_lens = [s + T for s in start]
        layers = cache.layers(block_tables, pos, seq_lens)
        return self.model(ids, pos, layers, max(seq_lens), last_only=not all_logits).float()

    def flat_ok(self, cache: PagedKVCache) -> bool:
        """forward_flat can serve this cache and model: the cache runs every token as a kernel row, and every
        weight-only quantized linear is wrapped in a DenseCopyLinear (which keeps each segment's rows on the path
        its own forward would take; bare kernels switch paths with the size of the whole batch)."""
        if not cache.flat_ok:
            return False
        wrapped = {id(m.quantized) for m in self.model.modules() if isinstance(m, DenseCopyLinear)}
        return not any(
            type(m).__module__.startswith("rapidlm.compress") and id(m) not in wrapped for m in self.model.modules()
        )

    @torch.inference_mode()
    def forward_flat(
        self,
        cache: PagedKVCache,
        tokens: list[list[int]],  # per segment, this step's tokens: n_decode one-token segments, then prompt chunks
        start: list[int],  # per segment, the position of its first token
        block_tables: list[list[int]],  # per segment, blocks covering positions [0, start + len)
        n_decode: int,  # the first n_decode segments are decode rows (one token each)
        want_logits: list[bool],  # per prompt chunk: return the logits of its last token
    ) -> torch.Tensor:  # (n_decode + sum(want_logits), vocab) fp32: decode rows, then the chunks that want logits
        """One forward for a whole engine step: every segment's tokens laid end to end (see layers_flat). Each
        segment's rows get the bits forward_paged would give them (a batch of the n_decode decode rows, each chunk
        alone): row_groups keeps every segment's linears on the path its own forward would take."""
        counts = [len(t) for t in tokens]
        ids = torch.tensor([t for seg in tokens for t in seg], dtype=torch.long, device=self.device)  # (N,)
        pos = torch.tensor([p for s, n in zip(start, counts) for p in range(s, s + n)], device=self.device)
        ends = torch.tensor(counts, device=self.device).cumsum(0) - 1  # each segment's last token
        chunks = [i for i, want in enumerate(want_logits) if want]
        logit_rows = torch.cat([ends[:n_decode], ends[n_decode:][chunks]])  # (R,)
        layers = cache.layers_flat(block_tables, counts, pos)
        body = ((n_decode,) if n_decode else ()) + tuple(counts[n_decode:])
        head = ((n_decode,) if n_decode else ()) + (1,) * len(chunks)
        with row_groups({len(ids): body, len(logit_rows): head}):
            logits = self.model(ids[None], pos[None], layers, int(pos.max()) + 1, logit_rows=logit_rows)
        return logits[0].float()

    def warmup(self) -> None:
        """Run a prefill and two decode steps so one-time work (compilation, allocator growth) happens now."""
        cache = self.allocate(1, 8)
        self.prefill(cache, 0, [0, 0, 0])
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        for pos in (3, 4):
            self.decode(cache, token, torch.tensor([pos], device=self.device), pos + 1)

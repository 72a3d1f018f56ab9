"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) as one pure torch module.

No file I/O, no quantization, no sampling: weights arrive through `load_state_dict`, the KV cache is passed in
by the caller (rapidlm.runtime), and forward returns logits.

Weight layout differs from Hugging Face in one way that pays on the CPU: q/k/v are one `wqkv` linear and
gate/up are one `w_gate_up` linear, so a decode step makes 4 matmul calls per layer instead of 7.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidlm.config import ModelConfig
from rapidlm.models.layers import RMSNorm, apply_rope, rope_tables

KVCaches = list  # per layer, an object with .dtype and .attend(q, k, v, write_at, mask, kv_len) (rapidlm.runtime)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.q_size
        self.wqkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,  # (B, T, 1, hd)
        sin: torch.Tensor,
        cache,  # noqa: ANN001 - this layer's KV cache (rapidlm.runtime.kv_cache.LayerKV or alike)
        write_at: tuple[torch.Tensor, torch.Tensor],  # batch index (B, T), position (B, T)
        mask: torch.Tensor | None,  # (B, 1, T, L) bool, True = may attend; None = attend to all L slots
        kv_len: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, self.head_dim)  # (B, T, heads of q|k|v, hd)
        # Attention runs in the cache's dtype, which may be wider than the activations (fp32 on CPU, where
        # bf16 attention kernels are slow): q and k are widened once, before RoPE, which then runs in it too.
        qk = apply_rope(qkv[:, :, : nh + nkv].to(cache.dtype), cos, sin)  # q and k rotated in one pass
        q, k, v = qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + nkv :]

        # The cache writes this step's keys/values at each sequence's own positions and attends over the first
        # kv_len slots it holds (dense caches: write, read back, SDPA; the paged cache: its own kernel).
        y = cache.attend(q, k, v, write_at, mask, kv_len)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.q_size).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.intermediate_size
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.hidden, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, write_at, mask, kv_len) -> torch.Tensor:  # noqa: ANN001
        h = x + self.attn(self.attn_norm(x), cos, sin, cache, write_at, mask, kv_len)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """Decoder-only LM. `max_seq_len` bounds positions (sizes the RoPE tables), not the config's context."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables, e.g. after building on the meta device and loading real weights."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.max_seq_len)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)  # (S_max, hd) fp32
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor,  # (B, T) int64, each sequence's own positions
        caches: KVCaches,
        kv_len: int,  # attend over cache slots [0, kv_len): 1 + the largest position in `positions`
        last_only: bool = False,  # return logits of the last position only: prefill needs no more
        logit_rows: torch.Tensor | None = None,  # (R,) int64: only these of the B*T flattened positions' logits
    ) -> torch.Tensor:  # (B, T or 1, vocab) logits; (1, R, vocab) with logit_rows
        B, T = tokens.shape
        x = self.embed(tokens)  # (B, T, C)
        rope_dtype = caches[0].dtype  # RoPE runs in the attention dtype (see Attention.forward)
        cos = self.rope_cos[positions].to(rope_dtype).unsqueeze(2)  # (B, T, 1, hd)
        sin = self.rope_sin[positions].to(rope_dtype).unsqueeze(2)
        mask = None
        if T > 1 or B > 1 or self.cfg.sliding_window is not None:
            # One token of one sequence at position kv_len-1 may see every slot: no mask needed. Otherwise
            # each query sees the slots up to its own position (and within the window, if any).
            slots = torch.arange(kv_len, device=tokens.device)
            allowed = slots[None, None, :] <= positions[:, :, None]  # (B, T, L)
            if self.cfg.sliding_window is not None:
                allowed &= slots[None, None, :] > positions[:, :, None] - self.cfg.sliding_window
            mask = allowed.unsqueeze(1)  # (B, 1, T, L)
        b_idx = torch.arange(B, device=tokens.device)[:, None].expand(B, T)
        write_at = (b_idx, positions)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cos, sin, cache, write_at, mask, kv_len)
        if last_only:
            x = x[:, -1:]
        elif logit_rows is not None:
            x = x.reshape(B * T, -1)[logit_rows].unsqueeze(0)  # (1, R, C)
        return self.lm_head(self.norm(x))

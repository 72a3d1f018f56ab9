"""Pruning transforms: unstructured (magnitude, Wanda), semi-structured N:M, and structured (KV groups, MLP
channels, whole layers).

Unstructured and N:M pruning zero weights in place; the model keeps its shape (dense kernels gain nothing from
the zeros, and the report says so). Structured pruning ranks heads, channels and layers by measured importance
on calibration text and returns a physically smaller model with a new ModelConfig, which saves, loads and runs
like any other.

Importance measures (all from one calibration pass over the unpruned model, "one shot"):
* Wanda (Sun et al., 2023): score_ij = |W_ij| * ||X_j||_2, compared within each output row.
* KV group g of a layer: ||X_g W_o[:, g]^T||_F, the energy the group's heads write into the residual stream.
* MLP channel j: ||h_j||_2 * ||W_down[:, j]||_2, h = silu(gate) * up (the input of w_down).
* Layer (ShortGPT's block influence, Men et al., 2024): 1 - mean cos(x_in, x_out) over tokens; a block whose
  output barely changes its input matters least.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rapidlm.compress.calibration import collect_input_stats
from rapidlm.compress.configs import Magnitude, SemiStructured, Structured, Wanda
from rapidlm.compress.quantize import block_linears
from rapidlm.errors import ConfigError
from rapidlm.runtime.kv_cache import StaticKVCache

PruneConfig = Magnitude | Wanda | SemiStructured | Structured


@dataclass
class PruneReport:
    """What a pruning step did: per-linear sparsity (unstructured) or the removed units (structured)."""

    method: str
    sparsity: dict[str, float] = field(default_factory=dict)  # linear name -> fraction of zero weights
    sizes: dict[str, int] = field(default_factory=dict)  # linear name -> number of weights
    removed_layers: list[int] = field(default_factory=list)
    removed_kv_groups: dict[int, list[int]] = field(default_factory=dict)  # new layer index -> removed groups
    removed_channels: int = 0  # MLP channels removed per layer
    params_before: int = 0
    params_after: int = 0

    @property
    def overall_sparsity(self) -> float:
        """Zero fraction over the pruned linears, weighted by size (unstructured methods)."""
        total = sum(self.sizes.values())
        return sum(self.sparsity[n] * self.sizes[n] for n in self.sparsity) / total if total else 0.0


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask over `score` (any shape) that is False at exactly its k lowest entries (ties: lowest index
    first), True elsewhere. Exact even when many scores tie, as dequantized GGUF weights do."""
    flat = score.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep.view(score.shape)
    if k >= flat.numel():
        return torch.zeros_like(keep).view(score.shape)
    threshold = flat.kthvalue(k).values  # the k-th smallest value
    below = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(below.sum())]
    keep &= ~below
    keep[ties] = False
    return keep.view(score.shape)


def projection_rows(model: nn.Module, name: str) -> list[slice]:
    """Row ranges of a linear that are separate projections in the checkpoint (q|k|v, gate|up): layer-scope
    pruning treats each as its own layer, as it would be in the Hugging Face model."""
    cfg = model.cfg
    if name.endswith(".attn.wqkv"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)]
    if name.endswith(".mlp.w_gate_up"):
        i = cfg.intermediate_size
        return [slice(0, i), slice(i, 2 * i)]
    return [slice(0, model.get_submodule(name).out_features)]


def _check_linears(names: list[str]) -> None:
    if not names:
        raise ConfigError("pruning needs a float model: this one has no float nn.Linear projections left")


def _row_lowest_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row of score (N, K): False at the round(fraction * K) lowest entries (stable sort: ties by index)."""
    n, k = score.shape
    drop = round(fraction * k)
    keep = torch.ones_like(score, dtype=torch.bool)
    if drop:
        idx = score.argsort(dim=1, stable=True)[:, :drop]
        keep.scatter_(1, idx, False)
    return keep


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive inputs of each row (N, K), K divisible by m."""
    rows, k = score.shape
    if k % m:
        raise ConfigError(f"SemiStructured: {m} does not divide the layer's {k} inputs")
    groups = score.view(rows, k // m, m)
    idx = groups.argsort(dim=-1, stable=True)[..., : m - n]  # the m - n lowest of each group
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, idx, False)
    return keep.view(rows, k)


def _input_norms(
    model: nn.Module, names: list[str], calibration: list[list[int]] | None, method: str, progress
) -> dict[str, torch.Tensor]:  # noqa: ANN001
    if not calibration:
        raise ConfigError(f"{method} needs calibration text (activation norms); give the recipe calibration data")
    stats = collect_input_stats(model, names, calibration, progress=progress)
    return {n: stats[n].sq_sum.sqrt() for n in names}  # ||X_j||_2 over every calibration token


@torch.no_grad()
def prune_unstructured(
    model: nn.Module,
    config: Magnitude | Wanda | SemiStructured,
    calibration: list[list[int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PruneReport:
    """Zero weights of every block projection in place (embedding and head stay dense)."""
    names = block_linears(model)
    _check_linears(names)
    weights = {n: model.get_submodule(n).weight for n in names}
    needs_norms = isinstance(config, Wanda) or (isinstance(config, SemiStructured) and config.score == "wanda")
    norms = _input_norms(model, names, calibration, type(config).__name__, progress) if needs_norms else {}

    def score(n: str) -> torch.Tensor:
        w = weights[n].detach().float().abs()
        return w * norms[n][None, :] if needs_norms else w

    if isinstance(config, Magnitude):
        label = f"magnitude/{config.scope}/{config.sparsity:g}"
        if config.scope == "global":
            scores = [score(n) for n in names]
            flat = torch.cat([s.reshape(-1) for s in scores])
            keep = lowest_k_mask(flat, round(config.sparsity * flat.numel())).split([s.numel() for s in scores])
            masks = {n: k.view(s.shape) for n, k, s in zip(names, keep, scores)}
        else:
            masks = {}
            for n in names:
                s = score(n)
                m = torch.ones_like(s, dtype=torch.bool)
                for rows in projection_rows(model, n):
                    m[rows] = lowest_k_mask(s[rows], round(config.sparsity * s[rows].numel()))
                masks[n] = m
    elif isinstance(config, Wanda):
        label = f"wanda/{config.sparsity:g}"
        masks = {n: _row_lowest_mask(score(n), config.sparsity) for n in names}
    else:
        label = f"{config.n}:{config.m}/{config.score}"
        masks = {n: _nm_mask(score(n), config.n, config.m) for n in names}
    report = PruneReport(label)
    for n in names:
        weights[n].mul_(masks[n].to(weights[n].dtype))
        report.sparsity[n] = 1.0 - float(masks[n].float().mean())
        report.sizes[n] = masks[n].numel()
    report.params_before = report.params_after = sum(p.numel() for p in model.parameters())
    return report


# ----------------------------------------------------------------------------------------------------------------
# Structured pruning


@dataclass
class Importance:
    """Measured importance of each prunable unit of a model (higher = keep)."""

    layers: torch.Tensor  # (L,) block influence
    kv_groups: torch.Tensor  # (L, n_kv) output energy of each KV group's heads
    channels: torch.Tensor  # (L, I) ||h_j|| * ||W_down[:, j]||


@torch.inference_mode()
def measure_importance(
    model: nn.Module, calibration: list[list[int]], progress: Callable[[int, int], None] | None = None
) -> Importance:
    """One calibration pass over `model`, collecting the statistics of every structured unit."""
    cfg = model.cfg
    L, nkv, hd, group = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    kv_energy = torch.zeros(L, nkv, dtype=torch.float64)
    h_sq = torch.zeros(L, cfg.intermediate_size, dtype=torch.float64)
    cos_sum = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    handles = []
    block_in: dict[int, torch.Tensor] = {}

    def wo_hook(i: int, attn: nn.Module) -> Callable:
        def hook(_m, args) -> None:  # noqa: ANN001
            x = args[0].reshape(-1, nkv, group * hd).float()  # (T, n_kv, heads per group * hd)
            w = attn.wo.weight.float().view(-1, nkv, group * hd)  # (C, n_kv, group * hd)
            for g in range(nkv):
                kv_energy[i, g] += (x[:, g] @ w[:, g].T).square().sum().double()

        return hook

    def down_hook(i: int) -> Callable:
        def hook(_m, args) -> None:  # noqa: ANN001
            h_sq[i] += args[0].reshape(-1, cfg.intermediate_size).float().square().sum(0).double()

        return hook

    def block_pre(i: int) -> Callable:
        def hook(_m, args) -> None:  # noqa: ANN001
            block_in[i] = args[0]

        return hook

    def block_post(i: int) -> Callable:
        def hook(_m, _args, out) -> None:  # noqa: ANN001
            a, b = block_in.pop(i).reshape(-1, cfg.hidden_size).float(), out.reshape(-1, cfg.hidden_size).float()
            cos_sum[i] += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum().double()

        return hook

    for i, layer in enumerate(model.layers):
        handles += [
            layer.attn.wo.register_forward_pre_hook(wo_hook(i, layer.attn)),
            layer.mlp.w_down.register_forward_pre_hook(down_hook(i)),
            layer.register_forward_pre_hook(block_pre(i)),
            layer.register_forward_hook(block_post(i)),
        ]
    device = next(model.parameters()).device
    try:
        for n, ids in enumerate(calibration):
            cache = StaticKVCache(cfg, 1, len(ids), torch.float32, device)
            model(
                torch.tensor([ids], device=device),
                torch.arange(len(ids), device=device)[None],
                cache.layers(),
                len(ids),
            )
            tokens += len(ids)
            if progress is not None:
                progress(n + 1, len(calibration))
    finally:
        for h in handles:
            h.remove()
    down_norms = torch.stack([layer.mlp.w_down.weight.float().norm(dim=0) for layer in model.layers]).double()
    return Importance(
        layers=1.0 - cos_sum / max(tokens, 1),
        kv_groups=kv_energy.sqrt(),
        channels=h_sq.sqrt() * down_norms,
    )


def _check_counts(config: Structured, cfg) -> None:  # noqa: ANN001
    if config.layers >= cfg.num_layers:
        raise ConfigError(f"Structured.layers={config.layers} must be below the model's {cfg.num_layers} layers")
    if config.heads >= cfg.num_kv_heads:
        raise ConfigError(
            f"Structured.heads={config.heads} (KV groups removed per layer) must be below the model's "
            f"{cfg.num_kv_heads} KV heads"
        )
    if config.ffn_channels >= cfg.intermediate_size:
        raise ConfigError(
            f"Structured.ffn_channels={config.ffn_channels} must be below the model's {cfg.intermediate_size} "
            "MLP channels"
        )


def _lowest(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest values (stable: ties by index), sorted."""
    return sorted(values.argsort(stable=True)[:k].tolist())


@torch.no_grad()
def prune_structured(
    model: nn.Module,
    config: Structured,
    calibration: list[list[int]] | None,
    progress: Callable[[int, int], None] | None = None,
    importance: Importance | None = None,
) -> tuple[nn.Module, PruneReport]:
    """A new, smaller model: `config.layers` layers, `config.heads` KV groups per layer and `config.ffn_channels`
    MLP channels per layer removed, the least important first. The input model is left unchanged."""
    from rapidlm.loading.registry import model_class

    cfg = model.cfg
    _check_counts(config, cfg)
    _check_linears(block_linears(model))
    if importance is None:
        if not calibration:
            raise ConfigError("Structured pruning needs calibration text to rank heads, channels and layers")
        importance = measure_importance(model, calibration, progress)
    report = PruneReport(f"structured/layers{config.layers}/heads{config.heads}/channels{config.ffn_channels}")
    report.removed_layers = _lowest(importance.layers, config.layers)
    kept_layers = [i for i in range(cfg.num_layers) if i not in report.removed_layers]
    hd, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    new_cfg = dataclasses.replace(
        cfg,
        num_layers=len(kept_layers),
        num_heads=(cfg.num_kv_heads - config.heads) * group,
        num_kv_heads=cfg.num_kv_heads - config.heads,
        head_dim=hd,  # explicit: hidden_size / num_heads no longer gives it
        intermediate_size=cfg.intermediate_size - config.ffn_channels,
    )
    old = model.state_dict()
    new: dict[str, torch.Tensor] = {
        k: v for k, v in old.items() if not k.startswith("layers.") and not k.startswith("rope_")
    }
    for j, i in enumerate(kept_layers):
        p = f"layers.{i}."
        report.removed_kv_groups[j] = _lowest(importance.kv_groups[i], config.heads)
        groups = [g for g in range(cfg.num_kv_heads) if g not in report.removed_kv_groups[j]]
        # wqkv rows: q heads (group g owns q heads g*group .. g*group+group-1), then k heads, then v heads.
        q_rows = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in groups])
        kv_off = cfg.num_heads * hd
        k_rows = torch.cat([torch.arange(kv_off + g * hd, kv_off + (g + 1) * hd) for g in groups])
        v_rows = k_rows + cfg.num_kv_heads * hd
        qkv_rows = torch.cat([q_rows, k_rows, v_rows])
        dropped = set(_lowest(importance.channels[i], config.ffn_channels))
        channels = torch.tensor([c for c in range(cfg.intermediate_size) if c not in dropped])
        gate_up_rows = torch.cat([channels, channels + cfg.intermediate_size])
        q = f"layers.{j}."
        for key, value in old.items():
            if not key.startswith(p):
                continue
            name = q + key[len(p) :]
            if key == p + "attn.wqkv.weight" or key == p + "attn.wqkv.bias":
                new[name] = value[qkv_rows].clone()
            elif key == p + "attn.wo.weight":
                new[name] = value[:, q_rows].clone()
            elif key == p + "mlp.w_gate_up.weight":
                new[name] = value[gate_up_rows].clone()
            elif key == p + "mlp.w_down.weight":
                new[name] = value[:, channels].clone()
            else:
                new[name] = value.clone()
    report.removed_channels = config.ffn_channels
    with torch.device("meta"):
        small = model_class(new_cfg.architecture)(new_cfg, max_seq_len=model.max_seq_len)
    small.load_state_dict(new, strict=False, assign=True)
    if new_cfg.tie_word_embeddings:
        small.lm_head.weight = small.embed.weight
    small.reset_rope(next(model.parameters()).device)
    report.params_before = sum(p.numel() for p in model.parameters())
    report.params_after = sum(p.numel() for p in small.parameters())
    return small, report


def prune(
    model: nn.Module,
    config: PruneConfig,
    calibration: list[list[int]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Apply one pruning step; returns the model (a new one for Structured, the same one otherwise)."""
    if isinstance(config, Structured):
        return prune_structured(model, config, calibration, progress)
    if isinstance(config, (Magnitude, Wanda, SemiStructured)):
        return model, prune_unstructured(model, config, calibration, progress)
    raise ConfigError(f"prune() does not apply {type(config).__name__}")

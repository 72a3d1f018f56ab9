"""Load a model and apply a recipe to it: what `LLM(quantization=...)`, `rapidlm compress` and `compare` share.

Weight transforms start from the dequantized fp32 weights (the reference the issue measures against), run
calibration if a method needs it, prune (structured pruning replaces the model with a smaller one), swap the
linears, then cast what stayed float (embedding, norms, any
unquantized linear) to the run dtype. `native` instead loads the GGUF blocks as stored.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rapidlm.compress.calibration import calibration_samples, progress_bar
from rapidlm.compress.configs import Dequantized, KVCacheInt8, Native, Recipe
from rapidlm.compress.prune import prune
from rapidlm.compress.quantize import QuantizeReport, quantize
from rapidlm.compress.recipe import resolve_recipe
from rapidlm.errors import ConfigError
from rapidlm.loading.loader import LoadedModel, load_model
from rapidlm.models.layers import RMSNorm

FLOAT_MODULES = (nn.Linear, nn.Embedding, RMSNorm)


def cast_float_modules(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters of plain float modules to `dtype`; quantized modules keep their own formats."""
    for m in model.modules():
        if type(m) in FLOAT_MODULES:
            m.to(dtype)
    if type(model.lm_head) is nn.Linear and model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight


def load_with_recipe(
    model: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None,
    dtype: torch.dtype,
    device: torch.device,
    max_seq_len: int | None = None,
    show_progress: bool = False,
    keep_weights: bool = False,
) -> tuple[LoadedModel, Recipe | None, QuantizeReport | None]:
    """Load `model` and apply `recipe` (a Recipe, a recipe file or a shorthand); the recipe is returned resolved."""
    recipe = resolve_recipe(recipe)
    step = recipe.weight_step if recipe is not None else None
    prunes = recipe.prune_steps if recipe is not None else ()
    if not prunes and (step is None or isinstance(step, (Native, KVCacheInt8, Dequantized))):
        # None: run a GGUF's blocks natively where the kernels are fast (the default)
        native = {Native: True, Dequantized: False}.get(type(step))
        return load_model(model, dtype, device, max_seq_len, native=native), recipe, None
    if device.type not in ("cpu", "cuda"):  # CUDA: int8/int4 weight-only modules (issue 7, kernels/cuda_linear.py)
        raise ConfigError(f"compression recipes run on the CPU or CUDA; device {device} is not supported yet")
    loaded = load_model(model, torch.float32, device, max_seq_len, native=False)
    samples = None
    if recipe.needs_calibration:
        context = loaded.model.max_seq_len
        if recipe.calibration.seq_len > context:
            # the rotary tables and the cache stop at the model's context: a longer window cannot run
            raise ConfigError(
                f"Calibration.seq_len={recipe.calibration.seq_len} is longer than the model's context of "
                f"{context} tokens (max_seq_len): lower calibration.seq_len in the recipe or raise max_seq_len"
            )
        samples = calibration_samples(loaded.tokenizer, recipe.calibration)
    pruning = []
    for p in prunes:
        progress = progress_bar(f"prune {type(p).__name__}") if show_progress else None
        loaded.model, prune_report = prune(loaded.model, p, samples, progress)
        loaded.config = loaded.model.cfg  # structured pruning makes a smaller model with its own config
        pruning.append(prune_report)
    if step is None or isinstance(step, (KVCacheInt8, Dequantized)):
        report = QuantizeReport("none", keep_weights=keep_weights)
    else:
        progress = progress_bar(f"quantize {recipe.name or type(step).__name__}") if show_progress else None
        report = quantize(loaded.model, step, samples, progress, keep_weights=keep_weights)
    report.pruning = pruning
    if pruning:
        report.method = "+".join([p.method for p in pruning] + ([report.method] if report.method != "none" else []))
    cast_float_modules(loaded.model, dtype)
    return loaded, recipe, report

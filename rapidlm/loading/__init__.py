"""Loading checkpoints: resolve a name to a file, read its config, weights and tokenizer."""

from rapidlm.loading.loader import (
    DEFAULT_MODEL,
    MODEL_ALIASES,
    LoadedModel,
    ModelInfo,
    describe_model,
    load_model,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_ALIASES",
    "LoadedModel",
    "ModelInfo",
    "describe_model",
    "load_model",
    "resolve_model",
]

"""Loading checkpoints: resolve a name to a file, read its config, weights and tokenizer."""

from rapidlm.loading.loader import MODEL_ALIASES, LoadedModel, load_model, resolve_model

__all__ = ["MODEL_ALIASES", "LoadedModel", "load_model", "resolve_model"]

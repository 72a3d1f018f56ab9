"""Evaluation over the public API: perplexity on text files."""

from rapidlm.eval.perplexity import PerplexityResult, perplexity, perplexity_of_file

__all__ = ["PerplexityResult", "perplexity", "perplexity_of_file"]

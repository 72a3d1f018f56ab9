"""The perplexity harness against a direct transformers computation on the same windows."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from rapidlm import ConfigError
from rapidlm.cli import main
from rapidlm.eval import perplexity, perplexity_of_file


@pytest.mark.slow
def test_matches_transformers_on_wikitext(llm_fp32, hf_reference, wikitext_lines):
    ids = llm_fp32.tokenizer.encode(" ".join(wikitext_lines[:40]), add_special_tokens=False)
    ctx, windows = 128, 3
    result = perplexity(llm_fp32, ids, ctx=ctx, max_windows=windows)
    total = 0.0
    with torch.inference_mode():
        for w in range(windows):
            window = torch.tensor([ids[w * ctx : (w + 1) * ctx]])
            logits = hf_reference(window).logits[0]
            total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
    expected = math.exp(total / (windows * (ctx - 1)))
    assert result.windows == windows and result.scored_tokens == windows * (ctx - 1)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert 1 < result.perplexity < 200  # a real model on real text, not noise (vocab 49152)


def test_bad_windows_are_clear_errors(llm_auto, tmp_path):
    with pytest.raises(ConfigError, match="ctx must be an int >= 2"):
        perplexity(llm_auto, [1, 2, 3], ctx=1)
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(llm_auto, [1, 2, 3], ctx=8)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        perplexity(llm_auto, [1] * 10, ctx=10_000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        perplexity_of_file(llm_auto, tmp_path / "missing.txt")


def test_cli_eval_ppl(tmp_path, wikitext_lines):
    data = tmp_path / "text.txt"
    data.write_text("\n".join(wikitext_lines[:20]), encoding="utf-8")
    out = io.StringIO()
    rc = main(["eval", "ppl", "--data", str(data), "--ctx", "64", "--max-windows", "2", "--quiet"], out=out)
    assert rc == 0
    text = out.getvalue()
    assert text.startswith("perplexity ") and "126 tokens scored in 2 windows of 64" in text

"""`rapidlm compare` on a tiny model: rows, deltas, table, JSON and plot."""

from __future__ import annotations

import json

import pytest

from rapidlm.cli import main
from rapidlm.errors import ConfigError
from rapidlm.eval.compare import Variant, compare, pareto_front, table
from tests.conftest import WIKITEXT
from tests.helpers import save_hf_folder, tiny_hf_model


def test_variant_parsing_and_pareto_front():
    assert Variant.parse("int4-g32@bfloat16#compile") == Variant(
        "int4-g32@bfloat16#compile", "int4-g32", "bfloat16", True
    )
    assert Variant.parse("int8") == Variant("int8", "int8")
    with pytest.raises(ConfigError, match="flag"):
        Variant.parse("int8#fast")
    # (speed, ppl): the slow-and-worse point is dominated, the others trade off
    assert pareto_front([(10, 20.0), (20, 21.0), (5, 25.0), (20, 20.5)]) == [0, 3]


def test_compare_runs_each_variant_and_writes_outputs(tmp_path):
    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=5), tmp_path / "tiny")
    result = compare(
        str(folder),
        ["dequantized@float32", "int8"],
        WIKITEXT,
        ctx=64,
        windows=2,
        gen_tokens=4,
        batches=(1, 2),
        repeats=1,
        threads=2,
    )
    rows = {r["label"]: r for r in result["rows"]}
    assert set(rows) == {"dequantized@float32", "int8"}
    ref, q = rows["dequantized@float32"], rows["int8"]
    assert ref["delta_ppl_pct"] == 0 and ref["scored_tokens"] == q["scored_tokens"] == 2 * 63
    assert q["disk_bytes"] < ref["disk_bytes"] and q["memory_bytes"] < ref["memory_bytes"]
    assert q["decode_tok_s"]["1"] > 0 and q["decode_tok_s"]["2"] > 0
    assert abs(q["delta_ppl_pct"]) < 5
    assert "| int8 |" in table(result)

    out = tmp_path / "cli.txt"
    with open(out, "w") as fh:
        code = main(
            [
                "compare",
                "--model",
                str(folder),
                "--recipes",
                "dequantized",
                "--data",
                WIKITEXT,
                "--ctx",
                "64",
                "--windows",
                "1",
                "--gen-tokens",
                "3",
                "--batch",
                "1",
                "--repeats",
                "1",
                "--llama-cpp-python",
                "",
                "--json",
                str(tmp_path / "r.json"),
                "--plot",
                str(tmp_path / "r.png"),
            ],
            out=fh,
        )
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["label"] == "dequantized"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

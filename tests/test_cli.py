"""The CLI is a thin layer: check each command end to end through main()."""

from __future__ import annotations

import io

from rapidlm.cli import main


def run(argv, stdin: str = "") -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, out=out, inp=io.StringIO(stdin)), out.getvalue()


def test_info_reads_headers_only():
    rc, text = run(["info", "smollm2-135m"])
    assert rc == 0
    assert "LlamaForCausalLM" in text and "134,515,008" in text and "8,192" in text
    assert "stored as Q4_1" in text and "stored as Q8_0" in text


def test_generate_greedy_is_deterministic_and_matches_api(llm_auto):
    argv = ["generate", "The capital of France is", "-n", "12", "--temperature", "0", "--threads", "2"]
    rc, text = run(argv)
    assert rc == 0
    from rapidlm import SamplingParams

    expected = llm_auto.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0].text
    assert text == expected + "\n"


def test_chat_keeps_history_and_resets():
    rc, text = run(["chat", "-n", "16", "--temperature", "0"], stdin="Hi!\n/reset\nMy name is Ada.\n/exit\n")
    assert rc == 0
    assert "(history cleared)" in text
    assert len(text.splitlines()) >= 4


def test_errors_exit_2_with_a_message(capsys):
    rc, _ = run(["generate", "x", "--model", "/no/such/file.gguf"])
    assert rc == 2
    assert "neither an existing path nor a known alias" in capsys.readouterr().err
    rc, _ = run(["generate", "x", "--top-p", "2"])
    assert rc == 2
    assert "SamplingParams.top_p" in capsys.readouterr().err


def test_compress_then_run_the_saved_folder_and_eval_with_quant(tmp_path, capsys):
    from tests.conftest import WIKITEXT
    from tests.helpers import save_hf_folder, tiny_hf_model

    folder = save_hf_folder(tiny_hf_model("LlamaForCausalLM", seed=7, tie_word_embeddings=True), tmp_path / "tiny")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - type: int4_weight_only\n    group_size: 32\n")
    out = tmp_path / "q"
    rc, text = run(["compress", "--model", str(folder), "--recipe", str(recipe), "--out", str(out), "--threads", "2"])
    assert rc == 0 and "wrote" in text and (out / "rapidlm.json").is_file()
    rc, text = run(["info", str(out)])
    assert rc == 0 and "format           rapidlm" in text and "stored as U8" in text  # 4-bit codes, two per byte
    argv = ["-n", "6", "--temperature", "0", "--ignore-eos", "--threads", "2"]
    rc1, saved = run(["generate", "Hello", "--model", str(out), *argv])
    rc2, direct = run(["generate", "Hello", "--model", str(folder), "--quant", str(recipe), *argv])
    assert rc1 == rc2 == 0 and saved == direct  # the saved model gives the same tokens as quantizing in place
    rc, text = run(
        [
            "eval",
            "ppl",
            "--model",
            str(folder),
            "--quant",
            "int8",
            "--data",
            WIKITEXT,
            "--ctx",
            "64",
            "--max-windows",
            "2",
            "--quiet",
        ]
    )
    assert rc == 0 and "126 tokens scored in 2 windows of 64" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - type: int4_weight_only\n    group: 32\n")
    rc, _ = run(["compress", "--model", str(folder), "--recipe", str(bad), "--out", str(tmp_path / "x")])
    assert rc == 2 and "unknown key 'group'" in capsys.readouterr().err
    rc, _ = run(["generate", "x", "--model", str(folder), "--quant", "int4-g100"])
    assert rc == 2 and "shorthand" in capsys.readouterr().err

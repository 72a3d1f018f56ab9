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

"""lm-evaluation-harness against a spawned `rapidlm serve`: its `local-completions` model scores a small
multiple-choice task (a YAML over a JSON file, both written here) through /v1/completions, and the accuracy it
reports equals the one computed from `LLM` log-probabilities directly.

lm_eval scores each choice with one request per (context, continuation): the token ids of context +
continuation, `echo=True, logprobs=1, max_tokens=1`, summing `token_logprobs[ctxlen:-1]`. Its tokenizer is a
transformers one read from a local folder (the GGUF's tokenizer saved as tokenizer.json), so nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.serve.spawn import SpawnedServer

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")
pytest.importorskip("tenacity", reason="lm_eval's API models need lm-eval[api] (tenacity, aiohttp)")

MODEL = "smollm2-135m"
TASK = "rapidlm_mc"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# Simple facts; the small model gets some right and some wrong (tuned so that accuracy is strictly between 0 and 1,
# and so that acc and acc_norm differ: the comparison then means something).
QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "Berlin"], 0),
    ("The capital of Japan is", ["Beijing", "Tokyo", "Seoul"], 1),
    ("Water freezes at a temperature of", ["100 degrees", "0 degrees", "50 degrees"], 1),
    ("The largest planet in the solar system is", ["Mars", "Venus", "Jupiter", "Mercury"], 2),
    ("A week has", ["five days", "seven days", "ten days"], 1),
    ("The chemical symbol for gold is", ["Au", "Ag", "Fe", "Gd"], 0),
    ("The author of Hamlet is", ["Charles Dickens", "William Shakespeare", "Jane Austen"], 1),
    ("The square root of 81 is", ["7", "8", "9"], 2),
    ("The first man to walk on the Moon was", ["Buzz Aldrin", "Yuri Gagarin", "Neil Armstrong"], 2),
    ("The currency of Switzerland is the", ["euro", "franc", "krone"], 1),
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_tokenizer_folder(folder: Path) -> Path:
    """The GGUF's tokenizer as a transformers folder (what tests.helpers.save_hf_folder writes beside weights)."""
    from rapidlm.loading import resolve_model
    from rapidlm.loading.gguf import open_gguf
    from rapidlm.loading.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(open_gguf(resolve_model(MODEL)).metadata)
    folder.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": tok.bos_token, "eos_token": tok.eos_token}))
    return folder


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's TemplateLM._encode_pair for causal models: trailing spaces of the context move to the
    continuation, the whole is encoded, and the continuation is what follows the context's own encoding."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids) :]


def continuation_logprob(llm, context_ids: list[int], continuation_ids: list[int]) -> float:
    logprobs = torch.log_softmax(llm.runner.score(context_ids + continuation_ids).double(), dim=-1)
    n = len(context_ids)
    return sum(logprobs[n - 1 + i, t].item() for i, t in enumerate(continuation_ids))


@pytest.fixture(scope="module")
def server():
    # Started without waiting: the model loads there while the test computes the direct scores here. One thread
    # each: two processes of 2 threads on 2 cores spin against each other (measured ~5x slower forwards).
    srv = SpawnedServer(["--model", MODEL, "--dtype", "float32", "--threads", "1"])
    try:
        yield srv
    finally:
        srv.stop()


def test_lm_eval_accuracy_equals_direct_llm_scores(server, llm_fp32, tmp_path, monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # the server has no key; lm_eval then sends an empty one

    # The task: a JSON-lines file and a YAML beside it, found through TaskManager(include_path=...).
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, cache=tmp_path / "hf_datasets"))
    tok_dir = write_tokenizer_folder(tmp_path / "tokenizer")

    # lm_eval's tokenizer (transformers, from the folder) must be rapidlm's: same ids, and no BOS added.
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    hf_encode = lambda s: hf_tok(s, add_special_tokens=False).input_ids  # noqa: E731 - as lm_eval's tok_encode
    for question, choices, _ in QUESTIONS:
        for text in (question, *(f"{question} {c}" for c in choices)):
            assert hf_encode(text) == hf_tok(text).input_ids == llm_fp32.tokenizer.encode(text), text

    # Expected: each choice's log-likelihood from LLM's fp32 full forward, tokenized as lm_eval does.
    direct_lls, direct_acc, direct_acc_norm = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for question, choices, _ in QUESTIONS:
            pairs = [encode_pair(llm_fp32.tokenizer.encode, question, " " + c) for c in choices]
            direct_lls.append([continuation_logprob(llm_fp32, ctx, cont) for ctx, cont in pairs])
    finally:
        torch.set_num_threads(threads)
    for (_, choices, answer), lls in zip(QUESTIONS, direct_lls):
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(choices[i]))  # lm_eval: per character
        direct_acc.append(pred == answer)
        direct_acc_norm.append(pred_norm == answer)
    n_right = sum(direct_acc)
    assert 0 < n_right < len(QUESTIONS), f"the question set is trivial for this model: {n_right}/{len(QUESTIONS)}"

    from lm_eval.tasks import TaskManager

    server.wait_ready()
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": f"{server.url}/v1/completions",
            "tokenizer": str(tok_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
            "timeout": 120,
        },
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        num_fewshot=0,
        bootstrap_iters=0,
        log_samples=True,
        random_seed=0,
    )
    assert out is not None
    metrics = out["results"][TASK]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)

    for s, (question, choices, answer), lls in zip(samples, QUESTIONS, direct_lls, strict=True):
        assert s["doc"]["question"] == question and s["target"] == answer
        assert [tuple(a) for a in s["arguments"]] == [(question, " " + c) for c in choices]  # what was scored
        got = [float(r[0]) for r in s["filtered_resps"]]
        assert got == pytest.approx(lls, abs=1e-3), question

    assert [bool(s["acc"]) for s in samples] == direct_acc
    assert metrics["acc,none"] == n_right / len(QUESTIONS)
    assert metrics["acc_norm,none"] == sum(direct_acc_norm) / len(QUESTIONS)

"""llama.cpp's perplexity and decode speed on given token ids, for `rapidlm compare`.

Runs as a script under the Python that has llama-cpp-python (the benchmark environment), so it imports
nothing from rapidlm:  python llama_cpp_worker.py SPEC.json OUT.json
SPEC: {"model_path", "threads", "ctx", "windows": [[ids...], ...], "prompt": [ids], "gen_tokens", "repeats"}
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    spec = json.loads(open(spec_path).read())
    t = spec["threads"]
    start = time.perf_counter()
    llm = Llama(
        model_path=spec["model_path"],
        n_threads=t,
        n_threads_batch=t,
        n_ctx=max(spec["ctx"], len(spec["prompt"]) + spec["gen_tokens"] + 8),
        n_batch=spec["ctx"],
        logits_all=True,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    nll, scored = 0.0, 0
    for ids in spec["windows"]:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V): predictions of ids[1:]
        m = logits.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
        nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        scored += len(ids) - 1
    rates = []
    greedy = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
    for _ in range(spec["repeats"] + 1):  # the first run warms up
        llm.reset()
        times = []
        for _token in llm.generate(spec["prompt"], reset=True, **greedy):
            times.append(time.perf_counter())
            if len(times) >= spec["gen_tokens"]:
                break
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    out = {
        "label": "llama.cpp",
        "recipe": "llama.cpp (GGUF as stored)",
        "perplexity": math.exp(nll / scored),
        "scored_tokens": scored,
        "decode_tok_s": {"1": statistics.median(rates[1:])},
        "load_s": load_s,
    }
    open(out_path, "w").write(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

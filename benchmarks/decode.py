"""Prefill and decode speed of rapidlm against `transformers` and llama.cpp, on one GGUF file and thread count.

    python benchmarks/decode.py --threads 2 --write docs/benchmarks.md

Method
------
* Every engine runs in its own subprocess (this script re-invoked with a hidden `--worker ENGINE`), so each one's
  peak resident memory (VmHWM: the high-water mark of that process alone, loading included) is its own and no
  engine's allocations or threads disturb another's timings. Engines run one after the other, never together.
* All engines get the same token ids: the first 16 and 512 tokens of wikitext-2's validation text, tokenized
  once here with the model's own tokenizer. Decoding is greedy and never stops at EOS.
* Same threads everywhere: `torch.set_num_threads` for rapidlm and transformers, `n_threads` and
  `n_threads_batch` for llama.cpp (and OMP_NUM_THREADS in every worker's environment).
* Each engine generates once per prompt length to warm up, then `--repeats` times: the short prompt with
  `--decode-tokens` new tokens, the long prompt with one. Figures are medians over the repeats.
  - time to first token (TTFT): from the generate call to the first sampled token (prompt forward + sampling);
    prefill tokens/s = prompt tokens / TTFT.
  - decode tokens/s = (new tokens - 1) / time from the first token to the last.
  The clocks: rapidlm's own RequestMetrics; a `transformers` streamer that timestamps each token as generate
  hands it over; llama-cpp-python's `Llama.generate` iterator, timed as each token is yielded.
* Bandwidth limit: this process times `t.sum()` over a 512 MiB fp32 tensor (one streaming read) with the same
  threads, 15 times before the engines run and 15 times after, and takes the best run as the machine's read
  bandwidth (a shared VM's bandwidth drifts by minutes). An engine's decode speed as a fraction of the
  limit is tokens/s x weight bytes read per token / bandwidth. Weight bytes per token count every projection
  and the output head at the size the engine holds them (rapidlm: packed 4-bit codes + bf16 scales/zeros, bf16
  or fp32 matrices; transformers: its Linear weights; llama.cpp: the GGUF tensors as stored, the tied Q8_0
  embedding counted once as the head). Embedding lookups, norms and the KV cache are left out (small here).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
ENGINES = ("rapidlm", "rapidlm-compiled", "rapidlm-fp32", "transformers-fp32", "transformers-bf16", "llama.cpp")
BASELINE = "rapidlm"
MIB = 1 << 20
SHORT_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}

# generate(prompt_ids, new_tokens) -> (time to first token s, time from first to last token s, new token ids)
Generate = Callable[[list[int], int], tuple[float, float, list[int]]]


# ---- workers: one engine each, in its own process --------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the current address space, so it is not inherited."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_rapidlm(
    spec: dict[str, Any], dtype: str, compile: bool = False
) -> tuple[Generate, Callable[[], tuple[int, str]]]:
    from rapidlm import LLM, SamplingParams

    llm = LLM(spec["model_path"], device="cpu", dtype=dtype, threads=spec["threads"], compile=compile)

    def generate(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        out = llm.generate([ids], params)[0]
        m = out.metrics
        return m.time_to_first_token_s, m.decode_time_s, list(out.token_ids)

    return generate, lambda: rapidlm_weight_bytes(llm)


def rapidlm_weight_bytes(llm: Any) -> tuple[int, str]:
    """Bytes of projection and head weights one decode step reads, and which formats they are held in."""
    from torch import nn

    from rapidlm.compress.kernels.int4_cpu import Int4Linear
    from rapidlm.runtime.cpu_linear import PackedLinear

    total, kinds = 0, []
    for mod in llm.runner.model.modules():
        bias = getattr(mod, "bias", None)
        if isinstance(mod, Int4Linear):
            sz = mod.scales_zeros
            total += mod.in_features * mod.out_features // 2 + sz.numel() * sz.element_size()
            kinds.append("int4")
        elif isinstance(mod, PackedLinear):
            total += mod.in_features * mod.out_features * 2  # bf16, in oneDNN's blocked layout
            kinds.append("bf16")
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
            kinds.append(SHORT_DTYPE[str(mod.weight.dtype)])
        else:
            continue
        if bias is not None:
            total += bias.numel() * bias.element_size()
    return total, f"{' + '.join(dict.fromkeys(kinds))} / {SHORT_DTYPE[str(llm.dtype)]}"


class TokenClock:
    """A `transformers` streamer that timestamps every new token (generate's first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []
        self._saw_prompt = False

    def put(self, value: Any) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(t) for t in value.flatten().tolist())

    def end(self) -> None:
        pass


def load_transformers(spec: dict[str, Any], dtype: str) -> tuple[Generate, Callable[[], tuple[int, str]]]:
    import torch
    import transformers
    from torch import nn

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    path = Path(spec["model_path"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=getattr(torch, dtype)
    ).eval()
    eos = model.generation_config.eos_token_id

    @torch.inference_mode()
    def generate(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        x = torch.tensor([ids])
        clock = TokenClock()
        start = time.perf_counter()
        # min_new_tokens keeps EOS from ending the run early (rapidlm: ignore_eos; llama.cpp never stops).
        model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=eos[0] if isinstance(eos, list) else eos,
            streamer=clock,
        )
        return clock.times[0] - start, clock.times[-1] - clock.times[0], clock.ids

    def weight_bytes() -> tuple[int, str]:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # includes the (tied) lm_head
        total = sum(p.numel() * p.element_size() for m in linears for p in (m.weight, m.bias) if p is not None)
        name = SHORT_DTYPE[str(model.dtype)]
        return total, f"{name} / {name}"

    return generate, weight_bytes


def load_llama_cpp(spec: dict[str, Any]) -> tuple[Generate, Callable[[], tuple[int, str]]]:
    from llama_cpp import Llama

    t = spec["threads"]
    llm = Llama(
        model_path=spec["model_path"],
        n_threads=t,
        n_threads_batch=t,
        n_ctx=spec["n_ctx"],
        n_batch=512,
        verbose=False,
    )

    def generate(ids: list[int], n: int) -> tuple[float, float, list[int]]:
        llm.reset()  # forget the previous run, so generate() finds no cached prefix to reuse
        out: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        greedy = {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
        for token in llm.generate(ids, reset=True, **greedy):  # yields after each sample; never stops at EOS
            times.append(time.perf_counter())
            out.append(int(token))
            if len(out) >= n:
                break
        return times[0] - start, times[-1] - times[0], out

    return generate, lambda: gguf_weight_bytes(spec["model_path"])


def gguf_weight_bytes(path: str) -> tuple[int, str]:
    """GGUF matrix bytes as stored (norm vectors left out); a tied token_embd is read once per token as the head."""
    import gguf

    matrices = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1]
    kinds = sorted({t.tensor_type.name for t in matrices})
    return sum(int(t.n_bytes) for t in matrices), f"{' + '.join(kinds)} (GGUF) / fp32"


LOADERS: dict[str, Callable[[dict[str, Any]], tuple[Generate, Callable[[], tuple[int, str]]]]] = {
    "rapidlm": lambda spec: load_rapidlm(spec, "auto"),
    "rapidlm-compiled": lambda spec: load_rapidlm(spec, "auto", compile=True),
    "rapidlm-fp32": lambda spec: load_rapidlm(spec, "float32"),
    "transformers-fp32": lambda spec: load_transformers(spec, "float32"),
    "transformers-bf16": lambda spec: load_transformers(spec, "bfloat16"),
    "llama.cpp": load_llama_cpp,
}


def measure(generate: Generate, prompts: list[list[int]], decode_tokens: int, repeats: int) -> dict[str, Any]:
    """Warm up once, then time every prompt `repeats` times; the first (shortest) prompt also decodes."""
    for ids in prompts:
        generate(ids, 2)
    ttft: dict[int, list[float]] = {len(ids): [] for ids in prompts}
    decode: list[float] = []
    tokens: list[int] = []
    for _ in range(repeats):
        for i, ids in enumerate(prompts):
            first, rest, tokens_i = generate(ids, decode_tokens if i == 0 else 1)
            ttft[len(ids)].append(first)
            if i == 0:
                decode.append((len(tokens_i) - 1) / rest)
                tokens = tokens_i
    return {
        "ttft_s": {str(n): statistics.median(v) for n, v in ttft.items()},
        "prefill_tok_s": {str(n): statistics.median(n / t for t in v) for n, v in ttft.items()},
        "decode_tok_s": statistics.median(decode),
        "raw": {"ttft_s": {str(n): v for n, v in ttft.items()}, "decode_tok_s": decode},
        "tokens": tokens,
    }


def run_worker(engine: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    start = time.perf_counter()
    generate, weight_bytes = LOADERS[engine](spec)
    load_s = time.perf_counter() - start
    result = measure(generate, spec["prompts"], spec["decode_tokens"], spec["repeats"])
    result["peak_rss_mib"] = peak_rss_mib()  # before anything else is loaded to count weight bytes
    result["weight_bytes_per_token"], result["format"] = weight_bytes()
    result.update(engine=engine, load_s=load_s)
    out_path.write_text(json.dumps(result))


# ---- the parent: prompts, bandwidth, workers, report ----------------------------------------------------


def build_prompts(model_path: Path, text_path: Path, lengths: list[int]) -> list[list[int]]:
    """The first `n` token ids of the text for each n, with the model's own tokenizer (no BOS is added)."""
    from rapidlm.loading.gguf import open_gguf
    from rapidlm.loading.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(open_gguf(model_path).metadata, str(model_path))
    text = text_path.read_text(encoding="utf-8").lstrip()
    ids = tokenizer.encode(text[: 16 * max(lengths)], add_special_tokens=False)
    if len(ids) < max(lengths):
        raise SystemExit(f"{text_path} gives only {len(ids)} tokens; need {max(lengths)}")
    return [ids[:n] for n in sorted(lengths)]


def measure_bandwidth(threads: int, size_mib: int = 512, runs: int = 15) -> dict[str, float]:
    """Read bandwidth in GB/s: `t.sum()` streams a `size_mib` fp32 tensor once; best and median of `runs`."""
    import torch

    torch.set_num_threads(threads)
    t = torch.ones(size_mib * MIB // 4, dtype=torch.float32)
    t.sum()  # fault the pages in and warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - start)
    nbytes = t.numel() * t.element_size()
    return {"best_gb_s": nbytes / min(times) / 1e9, "median_gb_s": nbytes / statistics.median(times) / 1e9}


def run_engine(engine: str, spec_path: Path, threads: int, timeout: float) -> dict[str, Any]:
    """Run one engine's worker process; returns its result, or {'engine', 'error'} if it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--spec", str(spec_path)]
        try:
            proc = subprocess.run(
                [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return {"engine": engine, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            return {"engine": engine, "error": f"exit {proc.returncode}: {tail[0]}"}
        return json.loads(out.read_text())


def machine_info(threads: int, bandwidth: dict[str, float]) -> list[tuple[str, str]]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    packages = ("rapidlm", "torch", "transformers", "llama_cpp_python")
    return [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("CPU", f"{cpu}, {os.cpu_count()} logical cores ({platform.machine()}, {platform.system()})"),
        ("threads", f"{threads} for every engine"),
        ("software", f"Python {platform.python_version()}, " + ", ".join(f"{p} {version(p)}" for p in packages)),
        (
            "memory bandwidth",
            f"{bandwidth['best_gb_s']:.1f} GB/s read: the best of 15 `t.sum()` over 512 MiB fp32 with {threads} "
            f"threads before the engines and 15 after (best/median before {bandwidth['before_gb_s']:.1f}/"
            f"{bandwidth['before_median_gb_s']:.1f}, after {bandwidth['after_gb_s']:.1f}/"
            f"{bandwidth['after_median_gb_s']:.1f} GB/s)",
        ),
        ("command", f"`{shlex.join(sys.orig_argv)}`"),
    ]


def md_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table; the first `text_columns` columns are left-aligned, the numbers right-aligned."""
    rule = "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(row) + " |" for row in rows])


def agreement_table(results: list[dict[str, Any]]) -> str:
    """For each pair of engines, how many leading greedy decode tokens they share before their first difference."""
    ok = [r for r in results if "error" not in r]

    def shared(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    rows = [[r["engine"]] + [str(shared(r["tokens"], o["tokens"])) for o in ok] for r in ok]
    return md_table(["engine"] + [r["engine"] for r in ok], rows)


def results_table(results: list[dict[str, Any]], lengths: list[int], bandwidth_gb_s: float) -> str:
    header = ["engine", "weights / activations"]
    for n in lengths:
        header += [f"TTFT {n} (ms)", f"prefill {n} (tok/s)"]
    header += [
        "decode (tok/s)",
        "load (s)",
        "peak RSS (MiB)",
        "weights read/token (MB)",
        "% of BW limit",
        "background load",
    ]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["engine"], f"failed: {r['error']}"] + [""] * (len(header) - 2))
            continue
        row = [r["engine"], r["format"]]
        for n in lengths:
            row += [f"{r['ttft_s'][str(n)] * 1e3:.1f}", f"{r['prefill_tok_s'][str(n)]:.0f}"]
        bytes_per_token = r["weight_bytes_per_token"]
        fraction = r["decode_tok_s"] * bytes_per_token / (bandwidth_gb_s * 1e9)
        row += [f"{r['decode_tok_s']:.1f}", f"{r['load_s']:.1f}", f"{r['peak_rss_mib']:.0f}"]
        row += [f"{bytes_per_token / 1e6:.1f}"]
        row += [f"{fraction:.0%}"]
        row += [f"{r['background_cores']:.2f} cores"]
        rows.append(row)
    return md_table(header, rows, text_columns=2)


def ratio_table(results: list[dict[str, Any]], lengths: list[int]) -> str:
    """Every figure divided by rapidlm's: above 1.00x is faster for tok/s, slower for TTFT, bigger for memory."""
    base = next((r for r in results if r["engine"] == BASELINE and "error" not in r), None)
    if base is None:
        return f"(no ratios: {BASELINE} was not measured)"
    figures: list[tuple[str, Callable[[dict[str, Any]], float]]] = []
    for n in lengths:
        figures.append((f"TTFT {n}", lambda r, n=n: r["ttft_s"][str(n)]))
        figures.append((f"prefill {n} tok/s", lambda r, n=n: r["prefill_tok_s"][str(n)]))
    figures += [("decode tok/s", lambda r: r["decode_tok_s"]), ("peak RSS", lambda r: r["peak_rss_mib"])]
    rows = [[r["engine"]] + [f"{get(r) / get(base):.2f}x" for _, get in figures] for r in results if "error" not in r]
    return md_table(["engine"] + [name for name, _ in figures], rows)


def render_report(
    args: argparse.Namespace,
    model_path: Path,
    lengths: list[int],
    bandwidth: dict[str, float],
    results: list[dict[str, Any]],
) -> str:
    lines = [
        "## Prefill and decode: rapidlm, transformers, llama.cpp",
        "",
        f"Model `{args.model}` (`{model_path.name}`), read by every engine from that one file. Prompts: the first "
        f"{' and '.join(map(str, lengths))} tokens of wikitext-2 `valid.txt`, the same ids for every engine. Decode: "
        f"{args.decode_tokens} greedy tokens after the {lengths[0]}-token prompt, EOS ignored. Median of "
        f"{args.repeats} repeats after one warm-up; each engine runs alone in its own process.",
        "",
        *[f"- **{key}**: {value}" for key, value in machine_info(args.threads, bandwidth)],
        "",
        results_table(results, lengths, bandwidth["best_gb_s"]),
        "",
        "TTFT: from the generate call to the first new token; prefill tok/s = prompt tokens / TTFT. Decode tok/s = "
        "(new tokens - 1) / time from the first to the last token. Peak RSS: the engine process's high-water mark, "
        "loading included. Load: building the engine (rapidlm-compiled includes torch.compile at start-up; "
        "Inductor's disk cache makes later starts shorter). Weights read/token: projection and output-head bytes "
        "as the engine holds them (embedding "
        "lookups, norms and the KV cache left out). % of BW limit = decode tok/s x weights read/token / measured "
        "bandwidth. Background load: CPU time other processes used while the engine ran, in cores on average; "
        "well above 0 means the figures were disturbed.",
        "",
        *noise_warning(results, os.cpu_count() or 1),
        *headline(results),
        f"Relative to {BASELINE} (engine / {BASELINE}: above 1.00x is faster for tok/s, slower for TTFT, more "
        "memory for RSS):",
        "",
        ratio_table(results, lengths),
        "",
        f"Greedy agreement: how many of the {args.decode_tokens} decode tokens two engines share before their first "
        "difference (the same weights at different precisions may part at a near-tie):",
        "",
        agreement_table(results),
        "",
    ]
    return "\n".join(lines)


def headline(results: list[dict[str, Any]]) -> list[str]:
    """rapidlm's batch-1 decode speed over the peers', the figures the foundation issue sets targets for."""
    ok = {r["engine"]: r["decode_tok_s"] for r in results if "error" not in r}
    lines = []
    for ours in ("rapidlm", "rapidlm-compiled"):
        if ours not in ok:
            continue
        parts = [f"{ok[ours] / ok[peer]:.2f}x {peer}" for peer in ("transformers-fp32", "llama.cpp") if peer in ok]
        if parts:
            lines.append(f"- **{ours} decode** = {', '.join(parts)}")
    return [*lines, ""] if lines else []


def noise_warning(results: list[dict[str, Any]], cores: int, threshold: float = 0.1) -> list[str]:
    """A warning paragraph naming the engines that shared the machine with other work, if any did."""
    noisy = [f"{r['engine']} ({r['background_cores']:.2f})" for r in results if r["background_cores"] > threshold]
    if not noisy:
        return []
    return [
        f"**Warning**: other processes used CPU time while these engines ran (cores of {cores}): {', '.join(noisy)}. "
        "Their figures are slower than this machine can do; rerun on a quiet machine before comparing.",
        "",
    ]


def log(message: str) -> None:
    print(f"[decode.py {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine has used, incl. steal; those this process's children have used)."""
    import resource

    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, children.ru_utime + children.ru_stime


def run_all(
    args: argparse.Namespace, engines: list[str], model_path: Path, prompts: list[list[int]]
) -> list[dict[str, Any]]:
    spec = {
        "model_path": str(model_path),
        "threads": args.threads,
        "prompts": prompts,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "n_ctx": -(-(len(prompts[-1]) + args.decode_tokens + 8) // 256) * 256,
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for engine in engines:
            log(f"{engine}: running")
            start, (busy, ours) = time.perf_counter(), cpu_seconds()
            result = run_engine(engine, spec_path, args.threads, args.timeout)
            wall, (busy_end, ours_end) = time.perf_counter() - start, cpu_seconds()
            # CPU time that neither the worker nor this idle parent used: the noise other processes added.
            result["background_cores"] = max(0.0, (busy_end - busy) - (ours_end - ours)) / wall
            status = result.get("error") or f"decode {result['decode_tok_s']:.1f} tok/s"
            log(f"{engine}: {status} ({wall:.0f} s, background load {result['background_cores']:.2f} cores)")
            results.append(result)
    return results


SECTION_START = "<!-- benchmarks/decode.py: start -->"
SECTION_END = "<!-- benchmarks/decode.py: end -->"


def write_section(path: Path, report: str, start: str = SECTION_START, end: str = SECTION_END) -> None:
    """Replace a script's section of the file (between its markers), keeping what other benchmarks wrote."""
    block = f"{start}\n{report.rstrip()}\n{end}\n\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    elif start == SECTION_START and text.startswith("# Benchmarks\n") and "## Prefill and decode" in text:
        text = "# Benchmarks\n\n" + block  # a report from before the markers: replace it whole
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="rapidlm model alias or .gguf path (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default: %(default)s)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure; medians (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens to decode (default: %(default)s)")
    p.add_argument("--prompt-lengths", default="16,512", help="prompt lengths in tokens; the shortest also decodes")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text the prompts are cut from")
    p.add_argument("--write", type=Path, help="write the report to this markdown file, replacing it")
    p.add_argument("--json", type=Path, help="also save the raw results (every repeat, token ids) as JSON")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per engine (default: %(default)s)")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        p.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    if args.threads < 1 or args.repeats < 1 or args.decode_tokens < 2:
        p.error("--threads and --repeats must be >= 1 and --decode-tokens >= 2")
    args.engine_list = engines
    args.lengths = sorted({int(n) for n in args.prompt_lengths.split(",")})
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.spec, args.out)
        return
    from rapidlm.loading import resolve_model

    model_path = resolve_model(args.model)
    if model_path.suffix != ".gguf":
        raise SystemExit(f"{model_path} is not a .gguf file: llama.cpp and the comparison need one GGUF")
    prompts = build_prompts(model_path, args.text, args.lengths)
    before = measure_bandwidth(args.threads)
    log(f"read bandwidth {before['best_gb_s']:.1f} GB/s (median {before['median_gb_s']:.1f})")
    results = run_all(args, args.engine_list, model_path, prompts)
    after = measure_bandwidth(args.threads)
    log(f"read bandwidth after the engines {after['best_gb_s']:.1f} GB/s (median {after['median_gb_s']:.1f})")
    bandwidth = {
        "best_gb_s": max(before["best_gb_s"], after["best_gb_s"]),
        "before_gb_s": before["best_gb_s"],
        "before_median_gb_s": before["median_gb_s"],
        "after_gb_s": after["best_gb_s"],
        "after_median_gb_s": after["median_gb_s"],
    }
    report = render_report(args, model_path, args.lengths, bandwidth, results)
    print(report)
    if args.write:
        write_section(args.write, report)
        log(f"wrote {args.write}")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "prompts": prompts, "results": results}, indent=1))


if __name__ == "__main__":
    main()

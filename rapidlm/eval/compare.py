"""`rapidlm compare`: every variant of a model measured in one run, side by side.

For each variant (a recipe, shorthand, `dequantized` or a saved model folder, optionally `@dtype` and `#compile`):
shape (layers, heads, MLP width), size on disk and
in memory, WikiText-style perplexity on the same token windows and its change against the first variant (the
reference), decode tokens/s at batch 1 and 8. Optionally llama.cpp on the same GGUF and the same windows.
Each variant runs in its own process, so memory and speed of one never leak into the next.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rapidlm.errors import ConfigError


@dataclass(frozen=True)
class Variant:
    label: str  # as given, e.g. "int4-g128-gptq@bfloat16#compile"
    recipe: str  # shorthand or recipe file
    dtype: str = "auto"
    compile: bool = False

    @staticmethod
    def parse(text: str) -> Variant:
        body, _, flag = text.partition("#")
        if flag not in ("", "compile"):
            raise ConfigError(f"variant {text!r}: unknown flag #{flag} (known: #compile)")
        recipe, _, dtype = body.partition("@")
        return Variant(text, recipe, dtype or "auto", flag == "compile")


def weight_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (packed kernels' layouts included), shared storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        try:
            key = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # opaque tensors (e.g. oneDNN packed weights)
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def decode_rate(llm: Any, prompt: list[int], batch: int, gen_tokens: int, repeats: int) -> float:
    """Median over `repeats` of generated tokens / decode seconds for `batch` copies of `prompt` (greedy)."""
    from rapidlm.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=gen_tokens, ignore_eos=True)
    llm.generate([prompt] * batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    rates = []
    for _ in range(repeats):
        outs = llm.generate([prompt] * batch, params)
        decode_s = max(o.metrics.decode_time_s for o in outs)
        rates.append(sum(o.metrics.output_tokens - 1 for o in outs) / decode_s)  # the first token is prefill's
    return statistics.median(rates)


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one variant in this process (the worker side of `compare`)."""
    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.calibration import progress_bar
    from rapidlm.compress.configs import Dequantized, KVCacheInt8, Native
    from rapidlm.compress.recipe import resolve_recipe
    from rapidlm.compress.saved import is_compressed_folder, manifest_recipe, save_compressed
    from rapidlm.eval.perplexity import perplexity
    from rapidlm.llm import LLM
    from rapidlm.loading.loader import describe_model, resolve_model
    from rapidlm.runtime.device import resolve_device, resolve_dtype, set_threads

    v = Variant.parse(spec["variant"])
    set_threads(spec["threads"])
    device = resolve_device("cpu")
    dtype = resolve_dtype(v.dtype, device)
    folder = Path(v.recipe)
    saved_folder = folder.is_dir()  # a model folder made earlier (e.g. a pruned or distilled student), run as is
    if saved_folder:
        recipe = manifest_recipe(folder) if is_compressed_folder(folder) else None
    else:
        recipe = resolve_recipe(v.recipe)
    step = recipe.weight_step if recipe is not None else None
    start = time.perf_counter()
    source = resolve_model(spec["model"])
    with tempfile.TemporaryDirectory() as tmp:
        if saved_folder:
            llm = LLM(folder, device="cpu", dtype=v.dtype, compile=v.compile)
            weights = folder / "model.safetensors"
            disk = folder_bytes(weights if weights.is_file() else folder)
            disk_note = "saved model folder"
        elif not recipe.prune_steps and (step is None or isinstance(step, (Native, KVCacheInt8, Dequantized))):
            llm = LLM(spec["model"], device="cpu", dtype=v.dtype, quantization=recipe, compile=v.compile)
            if isinstance(step, Dequantized):  # an unquantized checkpoint stores 2 bytes per parameter (bf16)
                disk = 2 * describe_model(spec["model"]).num_params
                disk_note = "as bf16 safetensors"
            else:
                disk, disk_note = folder_bytes(source), "source file"
        else:  # quantize once, save, and run the saved folder: sizes and speed are those of what ships
            loaded, recipe, report = load_with_recipe(
                spec["model"], recipe, dtype, device, show_progress=True, keep_weights=True
            )
            out = save_compressed(loaded, recipe, report, Path(tmp) / "model")
            del loaded, report
            disk, disk_note = folder_bytes(out / "model.safetensors"), "rapidlm compress output"
            llm = LLM(out, device="cpu", dtype=v.dtype, compile=v.compile)
        load_s = time.perf_counter() - start
        mem = weight_memory_bytes(llm.runner.model)
        ids = [t for w in spec["windows"] for t in w]
        ppl = perplexity(llm, ids, spec["ctx"], len(spec["windows"]), progress_bar(f"{v.label}: perplexity"))
        rates = {
            str(b): decode_rate(llm, spec["prompt"], b, spec["gen_tokens"], spec["repeats"]) for b in spec["batches"]
        }
    return {
        "label": v.label,
        "recipe": recipe.to_dict() if recipe else None,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": v.compile,
        "kv_cache": "int8" if llm.runner.kv_int8 else str(llm.runner.kv_dtype).removeprefix("torch."),
        "shape": _shape(llm.runner.model.cfg),
        "sparsity": _block_sparsity(llm.runner.model),
        "disk_bytes": disk,
        "disk_note": disk_note,
        "memory_bytes": mem,
        "perplexity": ppl.perplexity,
        "scored_tokens": ppl.scored_tokens,
        "decode_tok_s": rates,
        "load_s": load_s,
    }


def _shape(cfg) -> str:  # noqa: ANN001
    """Layers / heads (KV heads) / MLP width: what structured pruning changes."""
    return f"L{cfg.num_layers} H{cfg.num_heads}/{cfg.num_kv_heads} I{cfg.intermediate_size}"


def _block_sparsity(model: torch.nn.Module) -> float | None:
    """Fraction of zero weights in the blocks' float linears (None when they are all quantized)."""
    zeros = total = 0
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if name.startswith("layers.") and isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point():
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else None


def _subprocess(cmd: list[str], spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([*cmd, str(spec_path), str(out_path)], timeout=timeout, stdout=sys.stderr)
        if proc.returncode != 0 or not out_path.is_file():
            return {"label": spec.get("variant", "llama.cpp"), "error": f"worker exited with {proc.returncode}"}
        return json.loads(out_path.read_text())


def compare(
    model: str,
    variants: list[str],
    data: str,
    ctx: int = 512,
    windows: int = 64,
    gen_tokens: int = 128,
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    threads: int | None = None,
    llama_cpp_python: str | None = None,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run every variant (first = reference) and, if a Python with llama-cpp-python is given, llama.cpp."""
    from rapidlm.loading.loader import load_tokenizer, resolve_model

    parsed = [Variant.parse(v) for v in variants]  # fail fast on a bad flag
    if not parsed:
        raise ConfigError("compare needs at least one variant")
    threads = threads or torch.get_num_threads()
    tok = load_tokenizer(model)
    ids = tok.encode(Path(data).read_text(encoding="utf-8"), add_special_tokens=False)
    n = min(windows, len(ids) // ctx)
    if n == 0:
        raise ConfigError(f"{data} has {len(ids)} tokens: fewer than one window of ctx={ctx}")
    win = [ids[i * ctx : (i + 1) * ctx] for i in range(n)]
    prompt = ids[-64:]  # a fixed 64-token prompt from the end of the text
    base = {"model": str(model), "threads": threads, "ctx": ctx, "windows": win, "prompt": prompt}
    base.update(gen_tokens=gen_tokens, batches=list(batches), repeats=repeats)
    rows = []
    for v in parsed:
        print(f"compare: {v.label} ...", file=sys.stderr, flush=True)
        rows.append(_subprocess([sys.executable, "-m", "rapidlm.eval.compare"], {**base, "variant": v.label}, timeout))
    path = resolve_model(model)
    if llama_cpp_python and path.suffix == ".gguf":
        print("compare: llama.cpp ...", file=sys.stderr, flush=True)
        worker = str(Path(__file__).with_name("llama_cpp_worker.py"))
        spec = {**base, "model_path": str(path)}
        row = _subprocess([llama_cpp_python, worker], spec, timeout)
        row["disk_bytes"] = path.stat().st_size
        rows.append(row)
    ref = next((r for r in rows if "perplexity" in r), None)
    for r in rows:
        if ref is not None and "perplexity" in r:
            r["delta_ppl_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
    return {
        "model": str(path),
        "data": str(data),
        "ctx": ctx,
        "windows": n,
        "scored_tokens": n * (ctx - 1),
        "threads": threads,
        "gen_tokens": gen_tokens,
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "rows": rows,
    }


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (speed, ppl) points no other point beats on both (faster or equal and lower or equal)."""
    front = []
    for i, (s, p) in enumerate(points):
        if not any((s2 >= s and p2 <= p) and (s2, p2) != (s, p) for s2, p2 in points):
            front.append(i)
    return front


def table(result: dict[str, Any]) -> str:
    batches = sorted({b for r in result["rows"] for b in r.get("decode_tok_s", {})}, key=int)
    rows = [r for r in result["rows"] if "error" not in r]
    shapes = len({r.get("shape") for r in rows if r.get("shape")}) > 1  # structured pruning changed a shape
    sparse = any((r.get("sparsity") or 0) > 0.01 for r in rows)
    extra = (["shape"] if shapes else []) + (["sparsity"] if sparse else [])
    head = ["variant", *extra, "disk MiB", "mem MiB", "ppl", "Δppl %"] + [f"tok/s b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | " + " | ".join(["error"] * (len(head) - 1)) + " |")
            continue
        cells = [r["label"]]
        if shapes:
            cells.append(r.get("shape") or "—")
        if sparse:
            cells.append(f"{100 * r['sparsity']:.1f}%" if r.get("sparsity") is not None else "—")
        cells += [
            f"{r['disk_bytes'] / 2**20:.1f}" if r.get("disk_bytes") else "—",
            f"{r['memory_bytes'] / 2**20:.1f}" if r.get("memory_bytes") else "—",
            f"{r['perplexity']:.4f}",
            f"{r.get('delta_ppl_pct', 0):+.2f}",
        ] + [f"{r['decode_tok_s'][b]:.1f}" if b in r["decode_tok_s"] else "—" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG: perplexity against batch-1 decode tokens/s, the Pareto front joined and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "perplexity" in r and "1" in r.get("decode_tok_s", {})]
    pts = [(r["decode_tok_s"]["1"], r["perplexity"]) for r in rows]
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (r, (s, p)) in enumerate(zip(rows, pts)):
        ax.scatter([s], [p], color="tab:red" if i in front else "tab:blue", zorder=3)
        ax.annotate(r["label"], (s, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fp = sorted(pts[i] for i in front)
    if len(fp) > 1:
        ax.plot([s for s, _ in fp], [p for _, p in fp], color="tab:red", linestyle="--", label="Pareto front")
        ax.legend()
    ax.set_xlabel("decode tokens/s, batch 1")
    ax.set_ylabel(f"perplexity ({result['scored_tokens']:,} tokens, ctx {result['ctx']})")
    ax.set_title(f"{Path(result['model']).name}: quality vs speed ({result['threads']} threads)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # worker: python -m rapidlm.eval.compare SPEC.json OUT.json
    spec_file, out_file = sys.argv[1], sys.argv[2]
    result = run_variant(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))

"""Quantization report: every rapidlm variant and llama.cpp on the same text, in one run.

    .venv/bin/python benchmarks/quantization.py --write docs/benchmarks.md

Runs `rapidlm.eval.compare` (each variant in its own process, same threads) over the standard variants:
the dequantized fp32 reference, dequantized bf16 (rapidlm's best unquantized path), native GGUF execution,
int8 weight-only, int4 at group 32 / 128 with RTN, GPTQ and AWQ, W8A8 dynamic, KV-cache int8, and the best
int4 variant with its batch-1 decode step compiled; then llama.cpp (llama-cpp-python from .bench-venv, the
same GGUF) on the same perplexity windows. Prints a markdown table with the acceptance checks and writes
JSON and a PNG plot (perplexity vs batch-1 tokens/s, Pareto front marked).
Perplexity windows are the first N of the text; calibration draws from its second half, so they are disjoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode import write_section  # noqa: E402 - same marker convention, this script's markers
from rapidlm.eval.compare import compare, plot, table  # noqa: E402

DEFAULT_VARIANTS = [
    "dequantized@float32",
    "dequantized",
    "native",
    "int8",
    "int4-g32",
    "int4-g128",
    "int4-g128-gptq",
    "int4-g128-awq",
    "w8a8",
    "native+kv-int8",
    "native#compile",
]
SECTION_START = "<!-- benchmarks/quantization.py: start -->"
SECTION_END = "<!-- benchmarks/quantization.py: end -->"


def checks(result: dict) -> list[str]:
    """The issue's acceptance checks, evaluated on this run's rows."""
    rows = {r["label"]: r for r in result["rows"] if "perplexity" in r}
    out = []

    def rate(label: str, b: str = "1") -> float:
        return rows[label]["decode_tok_s"].get(b, float("nan"))

    def dppl(label: str) -> float:
        return rows[label]["delta_ppl_pct"]

    if {"int8", "dequantized"} <= rows.keys():
        out.append(
            f"int8 weight-only: Δppl {dppl('int8'):+.2f}% (≤ +0.5%), decode {rate('int8'):.1f} vs "
            f"{rate('dequantized'):.1f} tok/s dequantized bf16 = {rate('int8') / rate('dequantized'):.2f}x"
        )
    if {"int4-g128", "int4-g128-gptq", "int4-g128-awq"} <= rows.keys():
        rtn = dppl("int4-g128")
        for m in ("gptq", "awq"):
            d = dppl(f"int4-g128-{m}")
            out.append(f"int4 g128 {m}: Δppl {d:+.2f}% vs RTN {rtn:+.2f}%: removes {100 * (1 - d / rtn):.0f}% (≥ 33%)")
    if {"native+kv-int8", "native"} <= rows.keys():
        kv = 100 * (rows["native+kv-int8"]["perplexity"] / rows["native"]["perplexity"] - 1)
        out.append(f"KV-cache int8: Δppl {kv:+.3f}% against the same weights with an fp32 cache (≤ +0.5%)")
    if {"w8a8", "int8"} <= rows.keys():
        speed = ", ".join(
            f"batch {b}: {rate('w8a8', b):.1f} vs {rate('int8', b):.1f} tok/s = "
            f"{rate('w8a8', b) / rate('int8', b):.2f}x"
            for b in rows["w8a8"]["decode_tok_s"]
            if b != "1"
        )
        out.append(f"W8A8 dynamic: Δppl {dppl('w8a8'):+.2f}% (≤ +2%); against int8 weight-only, {speed}")
    if "llama.cpp" in rows:
        ll = rows["llama.cpp"]
        int4 = [lbl for lbl in rows if lbl.startswith(("native", "int4")) and "kv-int8" not in lbl]
        best = max(int4, key=rate) if int4 else None
        if best:
            out.append(
                f"best int4 ({best}): {rate(best):.1f} tok/s vs llama.cpp {ll['decode_tok_s']['1']:.1f} = "
                f"{rate(best) / ll['decode_tok_s']['1']:.2f}x; ppl {rows[best]['perplexity']:.4f} vs "
                f"llama.cpp {ll['perplexity']:.4f}"
            )
    return out


def render(result: dict, command: str, wall_s: float) -> str:
    lines = [
        "## Quantization: size, quality and speed",
        "",
        f"Machine: {result['cpu']}, {result['threads']} threads, torch {result['torch']}. "
        f"Model: `{Path(result['model']).name}`. Perplexity: first {result['windows']} windows of {result['ctx']} "
        f"tokens of `{Path(result['data']).name}` ({result['scored_tokens']:,} tokens scored); calibration "
        "(GPTQ, AWQ, SmoothQuant: 64 x 512 tokens) from the second half of the same file. Decode: greedy, "
        f"{result['gen_tokens']} tokens after a 64-token prompt, median of 3. Run time {wall_s / 60:.0f} min.",
        "",
        f"Command: `{command}`",
        "",
        table(result),
        "",
        "Checks:",
        "",
    ]
    lines += [f"- {c}" for c in checks(result)]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext-2/valid.txt"))
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    p.add_argument("--llama-cpp-python", default=str(ROOT / ".bench-venv/bin/python"))
    p.add_argument("--json", type=Path, default=ROOT / "docs/quantization.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs/quantization.png")
    p.add_argument("--write", type=Path, help="replace this script's section of a markdown file")
    args = p.parse_args()
    llama = args.llama_cpp_python if Path(args.llama_cpp_python).is_file() else None
    if llama is None:
        print("llama-cpp-python not found (run `make bench-setup`): llama.cpp row skipped", file=sys.stderr)
    start = time.perf_counter()
    result = compare(
        args.model,
        args.variants,
        args.data,
        windows=args.windows,
        batches=tuple(args.batch),
        threads=args.threads,
        llama_cpp_python=llama,
    )
    wall = time.perf_counter() - start
    command = "python benchmarks/quantization.py " + " ".join(sys.argv[1:])
    report = render(result, command.strip(), wall)
    print(report)
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    report += f"\n![perplexity vs decode speed]({args.plot.name})\n"
    if args.write:
        write_section(args.write, report, SECTION_START, SECTION_END)
    print(f"wrote {args.json}, {args.plot}" + (f", {args.write}" if args.write else ""), file=sys.stderr)


if __name__ == "__main__":
    main()

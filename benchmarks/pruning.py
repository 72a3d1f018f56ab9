"""Pruning and distillation report: what each method costs in perplexity and buys in speed, in one run.

    .venv/bin/python benchmarks/pruning.py --write docs/benchmarks.md

1. Builds a structurally pruned student of SmolLM2-135M-Instruct (`--student-recipe`, default: remove the 14
   least important layers by block influence), saved like any compressed model.
2. Trains it twice for the same tokens and steps on the second half of WikiText-2 validation: knowledge
   distillation (alpha 0.5, T 2) and plain next-token fine-tuning (alpha 0), then quantizes the distilled student
   to int4 (prune -> distill -> int4).
3. Runs `rapidlm.eval.compare` over the teacher (dequantized bf16, the reference), magnitude and Wanda pruning
   at 50%, 2:4 (Wanda and magnitude scores), the pruned student and the three trained students: perplexity on
   the first windows of the same file (disjoint from the training half), size, decode tokens/s.
Students are kept in --work and reused when present (delete the folder to retrain).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode import write_section  # noqa: E402
from rapidlm.eval.compare import compare, table  # noqa: E402

SECTION_START = "<!-- benchmarks/pruning.py: start -->"
SECTION_END = "<!-- benchmarks/pruning.py: end -->"
UNSTRUCTURED = ["magnitude-50", "wanda-50", "2:4-magnitude", "2:4"]


def build_students(args: argparse.Namespace) -> dict[str, Path]:
    import torch

    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.distill import DistillConfig, run_distillation
    from rapidlm.compress.saved import save_compressed
    from rapidlm.runtime.device import set_threads

    set_threads(args.threads)
    work = args.work
    folders = {
        "pruned": work / "student-pruned",
        "distilled": work / "student-kd",
        "fine-tuned": work / "student-ce",
        "distilled+int4": work / "student-kd-int4",
    }
    cpu = torch.device("cpu")
    if not (folders["pruned"] / "model.safetensors").exists():
        loaded, recipe, report = load_with_recipe(
            args.model, args.student_recipe, torch.float32, cpu, show_progress=True, keep_weights=True
        )
        save_compressed(loaded, recipe, report, folders["pruned"])
    base = dict(
        tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every
    )
    for name, alpha in (("distilled", 0.5), ("fine-tuned", 0.0)):
        if not (folders[name] / "model.safetensors").exists():
            cfg = DistillConfig(**base, alpha=alpha)
            print(f"pruning.py: training {name} ({cfg.steps} steps, {cfg.tokens:,} tokens)", file=sys.stderr)
            run_distillation(args.model, folders["pruned"], args.data, folders[name], cfg, resume=True)
    if not (folders["distilled+int4"] / "model.safetensors").exists():
        loaded, recipe, report = load_with_recipe(
            folders["distilled"], args.int4_recipe, torch.bfloat16, cpu, show_progress=True, keep_weights=True
        )
        save_compressed(loaded, recipe, report, folders["distilled+int4"])
    return folders


def training_curves(folders: dict[str, Path]) -> dict[str, list[dict]]:
    out = {}
    for name in ("distilled", "fine-tuned"):
        manifest = json.loads((folders[name] / "rapidlm.json").read_text())
        out[name] = manifest["training"]["evals"]
    return out


def interleaved_speed(model: str, student: Path, batches: tuple[int, ...], threads: int, rounds: int = 5) -> dict:
    """Teacher (dequantized bf16) and student decode in one process, round after round, medians: on a shared VM
    a variant measured minutes after another can be 15-25% off; alternating them makes drifts hit both alike."""
    import statistics

    from rapidlm.eval.compare import decode_rate
    from rapidlm.llm import LLM
    from rapidlm.runtime.device import set_threads

    set_threads(threads)
    teacher = LLM(model, device="cpu", quantization="dequantized")
    small = LLM(student, device="cpu")
    prompt = list(range(1000, 1064))
    out = {}
    for b in batches:
        t, s = [], []
        for _ in range(rounds):
            t.append(decode_rate(teacher, prompt, b, 64, 1))
            s.append(decode_rate(small, prompt, b, 64, 1))
        out[str(b)] = {"teacher": statistics.median(t), "student": statistics.median(s), "rounds": [t, s]}
    return out


def checks(result: dict, folders: dict[str, Path]) -> list[str]:
    rows = {r["label"]: r for r in result["rows"] if "perplexity" in r}
    label = {name: str(path) for name, path in folders.items()}
    ppl = {k: rows[v]["perplexity"] for k, v in label.items() if v in rows}
    teacher = rows["dequantized"]
    out = []
    if {"magnitude-50", "wanda-50"} <= rows.keys():
        m, w = rows["magnitude-50"]["perplexity"], rows["wanda-50"]["perplexity"]
        out.append(f"50% unstructured: Wanda ppl {w:.3f} vs magnitude {m:.3f} ({'lower' if w < m else 'NOT lower'})")
    for b, r in result.get("speed", {}).items():
        s, t = r["student"], r["teacher"]
        out.append(
            f"student vs teacher decode at batch {b}, interleaved in one process: {s:.1f} vs {t:.1f} tok/s = "
            f"{s / t:.2f}x (≥ 1.4x)"
        )
    if {"pruned", "distilled"} <= ppl.keys():
        lost = ppl["pruned"] - teacher["perplexity"]
        rec = (ppl["pruned"] - ppl["distilled"]) / lost
        out.append(
            f"distillation: ppl {teacher['perplexity']:.3f} (teacher) -> {ppl['pruned']:.3f} (pruned) -> "
            f"{ppl['distilled']:.3f} (distilled): recovers {100 * rec:.0f}% of the loss (≥ 50%)"
        )
    if {"distilled", "fine-tuned"} <= ppl.keys():
        d, f = ppl["distilled"], ppl["fine-tuned"]
        out.append(
            f"distillation ppl {d:.3f} vs plain fine-tuning {f:.3f}, same tokens and steps "
            f"({'better' if d < f else 'NOT better'})"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext-2/valid.txt"))
    p.add_argument("--work", type=Path, default=ROOT / ".bench-work/pruning")
    p.add_argument("--student-recipe", default="prune-layers-14")
    p.add_argument("--int4-recipe", default="int4-g32")
    p.add_argument("--tokens", type=int, default=120_000, help="training tokens per student")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    p.add_argument("--json", type=Path, default=ROOT / "docs/pruning.json")
    p.add_argument("--write", type=Path, help="replace this script's section of a markdown file")
    args = p.parse_args()
    start = time.perf_counter()
    folders = build_students(args)
    train_s = time.perf_counter() - start
    variants = ["dequantized", *UNSTRUCTURED, *(str(f) for f in folders.values())]
    result = compare(
        args.model, variants, args.data, windows=args.windows, batches=tuple(args.batch), threads=args.threads
    )
    result["training"] = training_curves(folders)
    result["speed"] = interleaved_speed(args.model, folders["distilled"], tuple(args.batch), args.threads)
    wall = time.perf_counter() - start
    found = checks(result, folders)  # on the rows labelled by folder
    names = {str(path): f"student: {name}" for name, path in folders.items()}
    for r in result["rows"]:
        r["label"] = names.get(r["label"], r["label"])
    lines = [
        "## Pruning and distillation",
        "",
        f"Machine: {result['cpu']}, {result['threads']} threads, torch {result['torch']}. Teacher: "
        f"`{Path(result['model']).name}` dequantized to bf16. Perplexity: first {result['windows']} windows of "
        f"{result['ctx']} tokens of `{Path(result['data']).name}` ({result['scored_tokens']:,} tokens); "
        f"calibration and training text from its second half (disjoint). Student: `{args.student_recipe}`; "
        f"training {args.tokens:,} tokens per student (seq {args.seq_len}, batch {args.batch_size}, lr {args.lr}, "
        f"AdamW, cosine, bf16 autocast). Run time {wall / 60:.0f} min ({train_s / 60:.0f} min building students).",
        "",
        f"Command: `{' '.join(['python benchmarks/pruning.py', *sys.argv[1:]])}`",
        "",
        table(result),
        "",
        "Unstructured and 2:4 sparsity leave the model dense on the CPU: same bytes, same kernels, so no speed-up "
        "(the tok/s columns show it); only structured pruning makes the model smaller and faster here. The three "
        "student rows have the same shape and format, so their tok/s differ only by this VM's drift between "
        "processes; the speed check uses the interleaved measurement below.",
        "",
        "Decode speed, teacher (dequantized bf16) and the distilled student alternating in one process, 5 rounds "
        "of 64 tokens, medians:",
        "",
        "| batch | teacher tok/s | student tok/s | ratio |",
        "|---|---|---|---|",
        *(
            f"| {b} | {r['teacher']:.1f} | {r['student']:.1f} | {r['student'] / r['teacher']:.2f}x |"
            for b, r in result["speed"].items()
        ),
        "",
        "Held-out perplexity during training (the trainer's own 16 windows of 256 tokens):",
        "",
        "| step | tokens | distilled | fine-tuned |",
        "|---|---|---|---|",
    ]
    kd, ce = result["training"]["distilled"], result["training"]["fine-tuned"]
    for a, b in zip(kd, ce):
        lines.append(f"| {a['step']} | {a['tokens']:,} | {a['perplexity']:.3f} | {b['perplexity']:.3f} |")
    lines += ["", "Checks:", ""] + [f"- {c}" for c in found]
    report = "\n".join(lines) + "\n"
    print(report)
    args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        write_section(args.write, report, SECTION_START, SECTION_END)


if __name__ == "__main__":
    main()

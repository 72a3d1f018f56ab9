"""`rapidlm` command line: a thin layer over rapidlm.LLM.

rapidlm generate "The capital of France is" --max-tokens 32 --temperature 0
rapidlm chat
rapidlm info smollm2-135m
rapidlm eval ppl --data ../shared/data/wikitext-2/valid.txt --ctx 512 --quant int4-g128-awq
rapidlm compress --recipe int4-g32 --out smollm2-int4
rapidlm compare --recipes dequantized@float32 native int8 int4-g128-gptq --data valid.txt
rapidlm serve --model smollm2-135m --port 8000 --api-key-file key.txt
rapidlm profile --model smollm2-135m --gen-len 64 --out prof
rapidlm estimate --model smollm2-135m --hardware h100 --batch 8 --quant int4-g128
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import ConfigError, RapidLMError
from rapidlm.loading.loader import DEFAULT_MODEL, describe_model


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, help="alias, .gguf file or HF folder (default: %(default)s)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step at start-up (slow start)")
    g.add_argument(
        "--dense-prefill",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 copy of 4-/8-bit weights for prompt chunks (2 bytes/weight; auto: when <= 1 GiB)",
    )
    g.add_argument(
        "--quant",
        default=None,
        help="quantization: a recipe file or a shorthand (native, int8, int4-g32, int4-g128, int4-g128-gptq, "
        "int4-g128-awq, w8a8, kv-int8, dequantized; join with '+')",
    )


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _load(args: argparse.Namespace):  # noqa: ANN202
    from rapidlm.llm import LLM  # imported late: `rapidlm info` needs no torch model

    return LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        threads=args.threads,
        compile=args.compile,
        quantization=args.quant,
        show_progress=True,
        dense_prefill=args.dense_prefill,
    )


def cmd_generate(args: argparse.Namespace, out: TextIO) -> int:
    prompts = args.prompt or [sys.stdin.read()]
    params = _sampling(args)
    llm = _load(args)
    if args.chat:
        prompts = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    if len(prompts) == 1 and not args.no_stream:
        final = None
        for chunk in llm.stream(prompts, params):
            out.write(chunk.text)
            out.flush()
            final = chunk.output or final
        out.write("\n")
        outputs = [final] if final is not None else []
    else:
        outputs = llm.generate(prompts, params)
        for o in outputs:
            out.write(o.text + "\n")
    if args.stats:
        for o in outputs:
            m = o.metrics
            print(
                f"[{o.request_id}] prompt {m.prompt_tokens} tok, output {m.output_tokens} tok ({o.finish_reason}); "
                f"ttft {m.time_to_first_token_s * 1e3:.1f} ms, prefill {m.prefill_tokens_per_s:.1f} tok/s, "
                f"decode {m.decode_tokens_per_s:.1f} tok/s  "
                f"[{llm.device.type}, {str(llm.dtype).removeprefix('torch.')}]",
                file=sys.stderr,
            )
    return 0


def cmd_chat(args: argparse.Namespace, out: TextIO, inp: TextIO) -> int:
    llm = _load(args)
    params = _sampling(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = inp.isatty()
    out.write(f"rapidlm chat with {llm.model_path.name} — /reset clears history, /exit or Ctrl-D quits\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del history[int(bool(args.system)) :]
            out.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        reply = []
        for chunk in llm.stream_chat(history, params):
            out.write(chunk.text)
            out.flush()
            reply.append(chunk.text)
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    info = describe_model(args.model_pos or args.model)
    c = info.config
    rows = [
        ("path", str(info.path)),
        ("format", info.format),
        ("architecture", c.architecture),
        ("parameters", f"{info.num_params:,}"),
        ("context length", f"{c.max_position_embeddings:,}"),
        ("layers", str(c.num_layers)),
        ("hidden size", str(c.hidden_size)),
        ("attention heads", f"{c.num_heads} (kv {c.num_kv_heads}, head dim {c.head_dim})"),
        ("vocab size", f"{c.vocab_size:,}"),
        ("tied embeddings", str(c.tie_word_embeddings)),
        ("rope", f"theta {c.rope_theta:g}, scaling {c.rope_scaling.rope_type}"),
    ]
    for dtype in sorted(info.params_by_dtype, key=lambda k: -info.params_by_dtype[k]):
        n, b = info.params_by_dtype[dtype], info.bytes_by_dtype[dtype]
        rows.append((f"stored as {dtype}", f"{n:,} params, {b / 2**20:.1f} MiB ({8 * b / n:.2f} bits/param)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(f"{k:<{width}}  {v}\n")
    return 0


def cmd_eval_ppl(args: argparse.Namespace, out: TextIO) -> int:
    from rapidlm.eval.perplexity import perplexity_of_file

    llm = _load(args)
    r = perplexity_of_file(llm, args.data, args.ctx, args.max_windows, show_progress=not args.quiet)
    out.write(
        f"perplexity {r.perplexity:.4f} (nll {r.nll:.5f}) on {args.data}: {r.scored_tokens:,} tokens scored in "
        f"{r.windows} windows of {r.ctx} (text: {r.text_tokens:,} tokens) "
        f"[{llm.model_path.name}, {llm.device.type}, {str(llm.dtype).removeprefix('torch.')}]\n"
    )
    return 0


def cmd_compress(args: argparse.Namespace, out: TextIO) -> int:
    import torch

    from rapidlm.compress.apply import load_with_recipe
    from rapidlm.compress.recipe import resolve_recipe
    from rapidlm.compress.saved import save_compressed
    from rapidlm.runtime.device import resolve_dtype, set_threads

    set_threads(args.threads)
    recipe = resolve_recipe(args.recipe)
    quantizes = recipe.weight_step is not None and type(recipe.weight_step).__name__ not in ("Native", "Dequantized")
    if not quantizes and not recipe.prune_steps:
        raise ValueError(f"recipe {args.recipe!r} neither prunes nor quantizes: there is nothing to compress")
    device = torch.device("cpu")
    loaded, recipe, report = load_with_recipe(
        args.model, recipe, resolve_dtype(args.dtype, device), device, show_progress=True, keep_weights=True
    )
    folder = save_compressed(loaded, recipe, report, args.out)
    size = (folder / "model.safetensors").stat().st_size
    out.write(f"wrote {folder} ({report.method}, {len(report.swapped)} linears quantized, {size / 2**20:.1f} MiB)\n")
    for p in report.pruning:
        out.write(
            f"  pruned {p.method}: {p.params_before / 1e6:.1f}M -> {p.params_after / 1e6:.1f}M parameters"
            + (f", sparsity {100 * p.overall_sparsity:.1f}%" if p.sparsity else "")
            + (f", layers removed {p.removed_layers}" if p.removed_layers else "")
            + "\n"
        )
    return 0


def cmd_distill(args: argparse.Namespace, out: TextIO) -> int:
    from rapidlm.compress.distill import DistillConfig, run_distillation
    from rapidlm.runtime.device import set_threads

    set_threads(args.threads)
    cfg = DistillConfig(
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup,
        weight_decay=args.weight_decay,
        alpha=args.alpha,
        temperature=args.temperature,
        clip_norm=args.clip,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        save_every=args.save_every,
        seed=args.seed,
        autocast=args.autocast,
    )
    folder, result = run_distillation(args.teacher, args.student, args.data, args.out, cfg, resume=args.resume)
    if result.interrupted:
        out.write(f"interrupted after step {len(result.history)} of {cfg.steps}; continue with --resume\n")
        return 130
    first, last = result.evals[0], result.evals[-1]
    out.write(
        f"wrote {folder}: {result.steps} steps, {result.tokens:,} tokens; held-out perplexity "
        f"{first['perplexity']:.3f} -> {last['perplexity']:.3f}\n"
    )
    return 0


def cmd_compare(args: argparse.Namespace, out: TextIO) -> int:
    from rapidlm.eval.compare import compare, plot, table

    llama_py = args.llama_cpp_python
    if llama_py == "auto":
        candidate = Path(".bench-venv/bin/python")
        llama_py = str(candidate) if candidate.is_file() else None
    result = compare(
        args.model,
        args.recipes,
        args.data,
        ctx=args.ctx,
        windows=args.windows,
        gen_tokens=args.gen_tokens,
        batches=tuple(args.batch),
        repeats=args.repeats,
        threads=args.threads,
        llama_cpp_python=llama_py or None,
    )
    out.write(table(result) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        out.write(f"wrote {args.json}\n")
    if args.plot:
        plot(result, args.plot)
        out.write(f"wrote {args.plot}\n")
    return 0


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from rapidlm.engine.async_engine import EngineConfig
    from rapidlm.serve.auth import load_api_key
    from rapidlm.serve.config import ServerConfig
    from rapidlm.serve.server import serve

    # Every setting is checked before the model loads, so a typo fails in a second, not after a load.
    if args.compile:
        raise ConfigError("--compile: the serving engine's paged decode runs eager; drop --compile for `serve`")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=load_api_key(args.api_key_file) if args.api_key_file else None,
        max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
    )
    given = {
        "max_running": args.max_running,
        "max_queued": args.max_queued,
        "kv_blocks": args.kv_blocks,
        "max_batched_tokens": args.max_batched_tokens,
    }
    engine_config = EngineConfig(**{k: v for k, v in given.items() if v is not None})
    llm = _load(args)
    return serve(llm, args.served_model_name or args.model, config, engine_config)


def cmd_profile(args: argparse.Namespace, out: TextIO) -> int:
    from rapidlm.profile.profiler import ProfileConfig, ceilings_for, profile
    from rapidlm.profile.report import table, write_report

    # The config is checked before the model loads, so a bad number fails in a second, not after a load.
    config = ProfileConfig(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, rounds=args.rounds)
    llm = _load(args)
    result = profile(llm, config, ceilings_for(llm.device, args.hardware, args.remeasure))
    out.write(table(result) + "\n")
    if args.out:
        paths = write_report(result, args.out)
        out.write(f"wrote {paths['html']} (open it in a browser) and {paths['json']}\n")
    return 0


def cmd_estimate(args: argparse.Namespace, out: TextIO) -> int:
    from rapidlm.profile.estimate import estimate
    from rapidlm.runtime.device import set_threads

    set_threads(args.threads)  # cpu-here's ceilings are measured (and cached) for this thread count
    result = estimate(
        args.model if args.config is None else None,
        args.hardware,
        dtype=args.dtype,
        quant=args.quant,
        batch=args.batch,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        tensor_parallel=args.tensor_parallel,
        config_json=args.config,
        remeasure=args.remeasure,
    )
    out.write(result.render() + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
        out.write(f"wrote {args.json}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapidlm", description="Fast LLM inference on the hardware you have.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts")
    gen.add_argument("prompt", nargs="*", help="prompt text (several = one batch); default: read stdin")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print only when done")
    gen.add_argument("--stats", action="store_true", help="print timings to stderr")
    _add_model_args(gen)
    _add_sampling_args(gen, temperature=0.0)

    chat = sub.add_parser("chat", help="interactive chat that keeps its history")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_model_args(chat)
    _add_sampling_args(chat, temperature=0.7)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_command", required=True)
    ppl = ev.add_parser("ppl", help="perplexity of a text file, non-overlapping windows")
    ppl.add_argument("--data", required=True, help="UTF-8 text file, e.g. ../shared/data/wikitext-2/valid.txt")
    ppl.add_argument("--ctx", type=int, default=512, help="window length in tokens (default: %(default)s)")
    ppl.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ppl.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(ppl)

    comp = sub.add_parser(
        "compress", help="quantize or prune a model with a recipe and save it (safetensors + manifest)"
    )
    comp.add_argument("--recipe", required=True, help="recipe file (YAML/JSON) or shorthand, e.g. int4-g128-gptq")
    comp.add_argument("--out", required=True, help="new folder to write; load it back with --model FOLDER")
    comp.add_argument("--model", "-m", default=DEFAULT_MODEL, help="alias, .gguf file or HF folder")
    comp.add_argument("--dtype", default="auto", help="activation dtype it will run in (default: %(default)s)")
    comp.add_argument("--threads", type=int, default=None)

    dist = sub.add_parser("distill", help="train a pruned student to match its teacher (knowledge distillation)")
    dist.add_argument("--teacher", default=DEFAULT_MODEL, help="alias, .gguf file or model folder")
    dist.add_argument("--student", required=True, help="saved float model folder, or a pruning recipe/shorthand")
    dist.add_argument("--data", required=True, help="text: trains on its second half, evaluates on its first")
    dist.add_argument("--out", required=True, help="folder for the student and out/checkpoint")
    dist.add_argument("--resume", action="store_true", help="continue from out/checkpoint")
    dist.add_argument("--tokens", type=int, default=200_000, help="training tokens (default: %(default)s)")
    dist.add_argument("--seq-len", type=int, default=256)
    dist.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    dist.add_argument("--grad-accum", type=int, default=1)
    dist.add_argument("--lr", type=float, default=3e-4)
    dist.add_argument("--min-lr", type=float, default=3e-5)
    dist.add_argument("--warmup", type=int, default=10, help="warm-up steps")
    dist.add_argument("--weight-decay", type=float, default=0.0)
    dist.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term; 0 = plain fine-tuning")
    dist.add_argument("--temperature", type=float, default=2.0)
    dist.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    dist.add_argument("--eval-every", type=int, default=25)
    dist.add_argument("--eval-windows", type=int, default=16)
    dist.add_argument("--save-every", type=int, default=25)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"])
    dist.add_argument("--threads", type=int, default=None)

    cmp_ = sub.add_parser("compare", help="size, perplexity and speed of several variants, side by side")
    cmp_.add_argument(
        "--recipes", nargs="+", required=True, help="variants: RECIPE[@DTYPE][#compile]; first = reference"
    )
    cmp_.add_argument("--model", "-m", default=DEFAULT_MODEL)
    cmp_.add_argument(
        "--data", required=True, help="text for perplexity (first windows; calibration uses its 2nd half)"
    )
    cmp_.add_argument("--ctx", type=int, default=512)
    cmp_.add_argument("--windows", type=int, default=64, help="perplexity windows (default: %(default)s)")
    cmp_.add_argument("--gen-tokens", type=int, default=128, help="tokens decoded per speed run")
    cmp_.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default: 1 8)")
    cmp_.add_argument("--repeats", type=int, default=3)
    cmp_.add_argument("--threads", type=int, default=None)
    cmp_.add_argument(
        "--llama-cpp-python", default="auto", help="Python with llama-cpp-python ('auto': .bench-venv if present; '')"
    )
    cmp_.add_argument("--json", default=None, help="write the full results here")
    cmp_.add_argument("--plot", default=None, help="write a PNG plot (perplexity vs tokens/s, Pareto front)")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics, playground)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="0 = any free port, printed at start-up")
    srv.add_argument("--api-key-file", default=None, help="file holding the API key clients must send as Bearer")
    srv.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    srv.add_argument("--max-running", type=int, default=None, help="requests generating at once (engine default)")
    srv.add_argument("--max-queued", type=int, default=None, help="requests waiting; beyond them: 429")
    srv.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized by the engine)")
    srv.add_argument("--max-batched-tokens", type=int, default=None,
                     help="tokens per engine step, decode tokens plus prompt chunks (engine default: 256)")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM lets requests finish")
    srv.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    srv.add_argument("--log-level", default="info", help="uvicorn log level (default: %(default)s)")
    _add_model_args(srv)

    prof = sub.add_parser("profile", help="where generation time goes: step times, parts, roofline (docs/profiling.md)")
    prof.add_argument("--batch", type=int, default=1, help="prompts decoded together (default: %(default)s)")
    prof.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt (default: %(default)s)")
    prof.add_argument("--gen-len", type=int, default=64, help="tokens generated per prompt (default: %(default)s)")
    prof.add_argument("--rounds", type=int, default=3, help="plain/instrumented run pairs (default: %(default)s)")
    prof.add_argument("--hardware", default="auto", help="roofline ceilings: auto (this CPU measured, or the GPU's "
                      "datasheet), cpu-here, h100, h200, a100, ... (default: %(default)s)")
    prof.add_argument("--remeasure", action="store_true", help="measure this CPU's ceilings again (else cached)")
    prof.add_argument("--out", default=None, help="folder for report.html, its PNGs and profile.json")
    _add_model_args(prof)

    est = sub.add_parser("estimate", help="predict TTFT, decode tok/s and memory from the architecture alone")
    est.add_argument("--model", "-m", default=DEFAULT_MODEL, help="alias, .gguf file or model folder (headers only)")
    est.add_argument("--config", default=None, help="a config JSON (HF config.json or ModelConfig fields) instead")
    est.add_argument("--hardware", default="cpu-here", help="cpu-here (measured, cached), h100, h200, a100, l4, ...")
    est.add_argument("--dtype", default="auto", help="activations: auto, float32, bfloat16, float16")
    est.add_argument("--quant", default=None, help="native, int8, int4-g32, int4-g128, w8a8, kv-int8, a recipe file...")
    est.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: %(default)s)")
    est.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default: %(default)s)")
    est.add_argument("--gen-len", type=int, default=128, help="generated tokens per sequence (default: %(default)s)")
    est.add_argument("--tensor-parallel", type=int, default=1, help="GPUs the weights are split over (GPU hardware)")
    est.add_argument("--threads", type=int, default=None, help="CPU threads (cpu-here is measured per thread count)")
    est.add_argument("--remeasure", action="store_true", help="measure cpu-here's ceilings again (else cached)")
    est.add_argument("--json", default=None, help="also write the estimate as JSON here")

    info = sub.add_parser("info", help="describe a model without loading its weights")
    info.add_argument("model_pos", nargs="?", metavar="MODEL", help="alias, .gguf file or HF folder")
    info.add_argument("--model", "-m", default=DEFAULT_MODEL, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, inp: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        if args.command == "generate":
            return cmd_generate(args, out)
        if args.command == "chat":
            return cmd_chat(args, out, inp or sys.stdin)
        if args.command == "eval":
            return cmd_eval_ppl(args, out)
        if args.command == "compress":
            return cmd_compress(args, out)
        if args.command == "distill":
            return cmd_distill(args, out)
        if args.command == "compare":
            return cmd_compare(args, out)
        if args.command == "serve":
            return cmd_serve(args, out)
        if args.command == "profile":
            return cmd_profile(args, out)
        if args.command == "estimate":
            return cmd_estimate(args, out)
        return cmd_info(args, out)
    except (RapidLMError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"rapidlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

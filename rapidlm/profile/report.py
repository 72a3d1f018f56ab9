"""Render a Profile: a terminal table, JSON, and an HTML page with PNG plots written next to it.

The HTML is one static file that references its PNGs by relative name (step_times.png, shares.png, layers.png,
roofline.png), so the folder can be opened, copied or attached as it is: no server, no scripts, no network.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from rapidlm.profile.profiler import ACCOUNTING_LIMIT, KIND_LABELS, KINDS, LAYER_KINDS, Profile

# One colour per part, the same in every plot. Overhead parts in greys: they are not kernels.
KIND_COLORS: dict[str, str] = {
    "embedding": "#8c564b",
    "norms": "#bcbd22",
    "qkv_proj": "#1f77b4",
    "rotary": "#17becf",
    "attention": "#d62728",
    "o_proj": "#aec7e8",
    "mlp": "#2ca02c",
    "head": "#9467bd",
    "sampling": "#e377c2",
    "engine": "#7f7f7f",
    "framework": "#c7c7c7",
    "unattributed": "#ffffff",
}
PLOTS: dict[str, str] = {  # file -> what it shows (the HTML's captions)
    "step_times.png": "Decode step times: histogram (left) and each step in order (right)",
    "shares.png": "Where a step goes, per part (hooks' calibrated cost removed)",
    "layers.png": "Time per layer and part, per decode step",
    "roofline.png": "Roofline: each op kind's achieved GFLOP/s against its arithmetic intensity, under this "
                    "machine's measured ceilings",
}


def _ms(s: float) -> str:
    return f"{1e3 * s:.3f}" if abs(s) < 0.01 else f"{1e3 * s:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _header(p: Profile) -> list[str]:
    m, c, cfg = p.model, p.ceilings, p.config
    quant = f", {m['quantization']}" if m.get("quantization") else ""
    peak = ", ".join(f"{k} {v:,.0f}" for k, v in c.flops_gflops.items())
    return [
        f"rapidlm profile: {m['name']} ({m['architecture']}, {m['layers']} layers, {m['parameters'] / 1e6:.1f}M params"
        f"{quant}; linears {', '.join(m['linears'])})",
        f"{m['device']} {m['dtype']} (KV {m['kv_dtype']}), {m['threads']} threads; batch {cfg.batch}, prompt "
        f"{cfg.prompt_len}, {cfg.gen_len} generated ({cfg.gen_len - 1} decode steps x {cfg.rounds} rounds)",
        f"ceilings ({c.name}, {c.source}): bandwidth {c.bandwidth_gbs:,.1f} GB/s; GFLOP/s {peak}; "
        f"op overhead {c.op_overhead_us:.1f} us",
    ]


def _stats_rows(p: Profile) -> list[tuple[str, Any]]:
    return [("plain", p.decode_stats(plain=True)), ("instrumented", p.decode_stats(plain=False))]


def _part_rows(p: Profile, phase: str) -> list[dict[str, Any]]:
    """Per part: ms per step (corrected), share, and, for op kinds, the roofline figures."""
    ph = p.decode if phase == "decode" else p.prefill
    shares = p.shares(phase)
    ops = {o["kind"]: o for o in p.ops(phase)}
    rows = []
    for k in KINDS:
        rows.append({"kind": k, "label": KIND_LABELS[k], "time_s": ph.mean_part(k, corrected=True),
                     "share": shares[k], "op": ops.get(k)})
    rest = ph.mean_wall - sum(ph.mean_part(k) for k in KINDS)
    rows.append({"kind": "unattributed", "label": "unattributed", "time_s": rest, "share": shares["unattributed"],
                 "op": None})
    return rows


def table(p: Profile) -> str:
    """The terminal report."""
    lines = _header(p) + ["", p.bottleneck(), ""]
    lines.append(f"{'decode step (ms)':<18}{'n':>6}{'mean':>9}{'std':>8}{'p50':>9}{'p90':>9}{'p99':>9}"
                 f"{'min':>9}{'max':>9}")
    for name, s in _stats_rows(p):
        lines.append(f"  {name:<16}{s.n:>6}{1e3 * s.mean:>9.2f}{1e3 * s.std:>8.2f}{1e3 * s.p50:>9.2f}"
                     f"{1e3 * s.p90:>9.2f}{1e3 * s.p99:>9.2f}{1e3 * s.min:>9.2f}{1e3 * s.max:>9.2f}")
    tokens = p.config.batch * p.config.prompt_len
    lines.append(f"prefill: {p.config.batch} x {p.config.prompt_len} tokens in {1e3 * p.prefill_time_s:.1f} ms "
                 f"({tokens / p.prefill_time_s:,.0f} tok/s), apart from the decode steps above")
    lines.append("")
    head = (f"{'part of a decode step':<24}{'ms/step':>9}{'share':>8}{'MFLOP':>9}{'MB':>8}{'GFLOP/s':>9}"
            f"{'GB/s':>8}{'FLOP/B':>8}{'of roof':>9}{'roof ms':>9}")
    lines.append(head)
    for r in _part_rows(p, "decode"):
        o = r["op"]
        cells = f"  {r['label']:<22}{1e3 * r['time_s']:>9.3f}{_pct(r['share']):>8}"
        if o is not None:
            cells += (f"{o['flops'] / 1e6:>9.2f}{o['bytes'] / 1e6:>8.2f}{o['gflops']:>9.1f}{o['gbs']:>8.1f}"
                      f"{o['intensity']:>8.2f}{_pct(o['roof_share']):>9}{1e3 * o['roofline_time_s']:>9.3f}")
        lines.append(cells)
    acc = p.accounting("decode")
    lines.append("")
    lines.append(_accounting_sentence(p, acc))
    lines.append("")
    lines.append("per layer, ms per decode step: " + "  ".join(f"{KIND_LABELS[k]}" for k in LAYER_KINDS))
    lines.append(f"{'layer':>7}{'total':>8}" + "".join(f"{_short(k):>9}" for k in LAYER_KINDS))
    steps = max(1, p.decode.steps)
    for i, lp in enumerate(p.decode.layers_s):
        lines.append(f"{i:>7}{1e3 * sum(lp.values()) / steps:>8.3f}"
                     + "".join(f"{1e3 * lp[k] / steps:>9.3f}" for k in LAYER_KINDS))
    lines.extend(f"note: {n}" for n in p.notes)
    return "\n".join(lines)


def _short(kind: str) -> str:
    return {"qkv_proj": "qkv", "rotary": "rope", "attention": "attn", "o_proj": "o", "framework": "glue"}.get(kind,
                                                                                                             kind)


def _accounting_sentence(p: Profile, acc: dict[str, float]) -> str:
    ok = "within" if abs(acc["unattributed_share"]) < ACCOUNTING_LIMIT else "OUTSIDE"
    plain = acc["plain_step_p50_s"]
    diff = acc["corrected_parts_step_p50_s"] / plain - 1 if plain > 0 else 0.0
    return (
        f"accounting: the parts, each timed by its own clocks, sum to {_ms(acc['parts_s'] / max(1, acc['steps']))} "
        f"ms of the {_ms(acc['instrumented_step_s'])} ms instrumented step: unattributed "
        f"{_pct(acc['unattributed_share'])} ({ok} the {ACCOUNTING_LIMIT:.0%} limit). Less the hooks' calibrated cost "
        f"({1e6 * p.hook_cost.module_s:.2f} us per hooked module call), the median step's parts make "
        f"{_ms(acc['corrected_parts_step_p50_s'])} ms against {_ms(plain)} ms for the median un-instrumented step "
        f"({100 * diff:+.1f}%)"
        + (f"; that step ran as one graph ({_graph_mode(p)}) and the instrumented one eagerly, so the gap is the "
           "graph's gain more than the hooks' cost." if _graph_mode(p) else
           f"; the hooks slow the median step by {_pct(p.hook_overhead())}.")
    )


def _graph_mode(p: Profile) -> str | None:
    return "torch.compile" if p.model.get("compiled") else "CUDA graphs" if p.model.get("cuda_graphs") else None


# ---- JSON -------------------------------------------------------------------------------------------------------


def _finite(x: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_json(p: Profile) -> dict[str, Any]:
    return _finite(p.to_dict())


def write_json(p: Profile, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_json(p), indent=1, allow_nan=False))
    return path


# ---- plots ------------------------------------------------------------------------------------------------------


def write_plots(p: Profile, out_dir: str | Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, draw in (("step_times.png", _plot_steps), ("shares.png", _plot_shares), ("layers.png", _plot_layers),
                       ("roofline.png", _plot_roofline)):
        fig = draw(p, plt)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths[name] = out / name
    return paths


def _plot_steps(p: Profile, plt: Any) -> Any:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    s = p.decode_stats(plain=True)
    inst = p.decode_stats(plain=False)
    # Both passes over common bins (the plain pass's count, the union's range), so their shapes compare.
    lo, hi = min(s.min, inst.min), max(s.max, inst.max)
    bins = max(len(s.histogram.counts), min(40, s.n // 4))  # finer than the JSON's Sturges bins: it is a picture
    edges = [1e3 * (lo + (hi - lo) * i / bins) for i in range(bins + 1)] if hi > lo else 1
    ax.hist([1e3 * t for t in p.plain_decode_s], bins=edges, color="#1f77b4", alpha=0.7, label="plain")
    ax.hist([1e3 * t for t in p.decode.wall_s], bins=edges, histtype="step", color="#d62728", linewidth=1.5,
            label="instrumented")
    for value, name, style in ((s.mean, "mean", "-"), (s.p50, "p50", "--"), (s.p90, "p90", "-."),
                               (s.p99, "p99", ":")):
        ax.axvline(1e3 * value, color="black", linestyle=style, linewidth=1, label=f"{name} {1e3 * value:.2f} ms")
    ax.set_xlabel("decode step time (ms)")
    ax.set_ylabel("steps")
    ax.set_title(f"{s.n} plain steps: mean {1e3 * s.mean:.2f} ± {1e3 * s.std:.2f} ms "
                 f"(instrumented {1e3 * inst.mean:.2f})", fontsize=10)
    ax.legend(fontsize=8)
    per_round = p.config.gen_len - 1
    for r in range(p.config.rounds):
        times = p.plain_decode_s[r * per_round : (r + 1) * per_round]
        ax2.plot(range(1, len(times) + 1), [1e3 * t for t in times], linewidth=1, label=f"round {r + 1}")
    ax2.set_xlabel("decode step (KV cache grows by one token each)")
    ax2.set_ylabel("ms")
    ax2.set_title("plain steps in order", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return fig


def _plot_shares(p: Profile, plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(11, 2.8))
    phases = [("decode step", "decode"), (f"prefill ({p.config.batch} x {p.config.prompt_len} tok)", "prefill")]
    for y, (_, phase) in enumerate(phases):
        left = 0.0
        for k, share in p.shares(phase).items():
            if share <= 0:
                continue
            ax.barh(y, 100 * share, left=100 * left, color=KIND_COLORS[k], edgecolor="black", linewidth=0.3,
                    label=(KIND_LABELS.get(k, k) if y == 0 else None))
            if share >= 0.04:
                ax.text(100 * (left + share / 2), y, f"{100 * share:.0f}%", ha="center", va="center", fontsize=8)
            left += share
    ax.set_yticks(range(len(phases)), [label for label, _ in phases])
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the step")
    ax.invert_yaxis()
    ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    return fig


def _plot_layers(p: Profile, plt: Any) -> Any:
    layers = p.decode.layers_s
    fig, ax = plt.subplots(figsize=(11, 4))
    steps = max(1, p.decode.steps)
    bottom = [0.0] * len(layers)
    x = list(range(len(layers)))
    for k in LAYER_KINDS:
        heights = [1e3 * lp[k] / steps for lp in layers]
        ax.bar(x, heights, bottom=bottom, color=KIND_COLORS[k], edgecolor="black", linewidth=0.2,
               label=KIND_LABELS[k])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("layer")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{len(layers)} layers: {sum(bottom):.2f} ms of the {1e3 * p.decode.mean_wall:.2f} ms "
                 "instrumented step", fontsize=10)
    ax.legend(ncol=4, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_roofline(p: Profile, plt: Any) -> Any:
    c = p.ceilings
    fig, ax = plt.subplots(figsize=(11, 6))
    points = [(o, "decode", "o") for o in p.ops("decode")] + [(o, "prefill", "^") for o in p.ops("prefill")]
    plotted = [(o, ph, mk) for o, ph, mk in points if o["flops"] > 0 and o["gflops"] > 0]
    xs = [o["intensity"] for o, _, _ in plotted] or [1.0]
    lo, hi = min(xs) / 4, max(max(xs) * 4, 4 * max(c.flops_gflops.values()) / c.bandwidth_gbs)
    dtypes = sorted({o["dtype"] for o, _, _ in points} & set(c.flops_gflops)) or list(c.flops_gflops)
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dt in dtypes:
        peak = c.flops_gflops[dt]
        ax.plot(grid, [min(peak, x * c.bandwidth_gbs) for x in grid], linewidth=2,
                label=f"roof: {c.bandwidth_gbs:,.1f} GB/s, {dt} {peak:,.0f} GFLOP/s")
    for o, _, marker in plotted:
        ax.scatter([o["intensity"]], [o["gflops"]], marker=marker, s=70, color=KIND_COLORS[o["kind"]],
                   edgecolor="black", zorder=3)
    # Colour = op kind, marker = phase, both in the legend: labels beside the points would pile up where
    # several projections share an intensity.
    for kind in dict.fromkeys(o["kind"] for o, _, _ in plotted):
        ax.scatter([], [], marker="s", s=50, color=KIND_COLORS[kind], edgecolor="black", label=KIND_LABELS[kind])
    ax.scatter([], [], marker="o", color="white", edgecolor="black", label="decode (per step)")
    ax.scatter([], [], marker="^", color="white", edgecolor="black", label="prefill")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"roofline ({c.name}; ceilings {c.source})", fontsize=10)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ---- HTML -------------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.bottleneck { font-size: 1.15em; background: #fff6d5; border-left: 4px solid #e0b000; padding: .6em 1em; }
table { border-collapse: collapse; margin: .5em 0; font-variant-numeric: tabular-nums; }
th, td { padding: .2em .7em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9em; } .muted { color: #666; } .swatch { display: inline-block;
width: .9em; height: .9em; border: 1px solid #999; vertical-align: middle; margin-right: .4em; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(p: Profile, out_dir: str | Path, name: str = "report.html") -> Path:
    """The HTML report and its PNGs (written next to it); returns the HTML's path."""
    out = Path(out_dir)
    write_plots(p, out)
    e = html.escape
    acc = p.accounting("decode")
    parts = []
    parts.append(f"<h1>rapidlm profile: {e(p.model['name'])}</h1>")
    parts.append("".join(f"<p class='muted'>{e(line)}</p>" for line in _header(p)[1:]))
    parts.append(f"<p class='bottleneck'>{e(p.bottleneck())}</p>")

    parts.append("<h2>Decode step times</h2>")
    rows = [[e(n), str(s.n)] + [f"{1e3 * v:.3f}" for v in (s.mean, s.std, s.p50, s.p90, s.p99, s.min, s.max)]
            for n, s in _stats_rows(p)]
    parts.append(_html_table(["ms", "n", "mean", "std", "p50", "p90", "p99", "min", "max"], rows))
    tokens = p.config.batch * p.config.prompt_len
    parts.append(f"<p>Prefill, apart: {p.config.batch} × {p.config.prompt_len} tokens in "
                 f"{1e3 * p.prefill_time_s:.1f} ms ({tokens / p.prefill_time_s:,.0f} tokens/s).</p>")
    parts.append(_figure("step_times.png"))

    parts.append("<h2>Where a decode step goes</h2>")
    parts.append(_figure("shares.png"))
    rows = []
    for r in _part_rows(p, "decode"):
        o = r["op"]
        swatch = f"<span class='swatch' style='background:{KIND_COLORS[r['kind']]}'></span>"
        cells = [swatch + e(r["label"]), f"{1e3 * r['time_s']:.3f}", _pct(r["share"])]
        if o is not None:
            cells += [f"{o['flops'] / 1e6:.2f}", f"{o['bytes'] / 1e6:.3f}", f"{o['gflops']:.2f}", f"{o['gbs']:.2f}",
                      f"{o['intensity']:.2f}", e(o["bound"]), _pct(o["roof_share"]),
                      f"{1e3 * o['roofline_time_s']:.3f}"]
        else:
            cells += [""] * 8
        rows.append(cells)
    parts.append(_html_table(["part", "ms/step", "share", "MFLOP", "MB", "GFLOP/s", "GB/s", "FLOP/B", "bound",
                              "of roof", "roofline ms"], rows))
    parts.append(f"<p>{e(_accounting_sentence(p, acc))}</p>")
    parts.append("<p class='muted'>attention core = Attention minus its wqkv, wo and RoPE (reshapes and casts "
                 "included); framework = the runner's and model's own code between the timed modules (RoPE table "
                 "gather, mask, layer loop, residual adds, module dispatch); engine = detokenization and stop "
                 "checks; unattributed = step wall time no timer saw.</p>")

    parts.append("<h2>Roofline</h2>")
    parts.append(_figure("roofline.png"))
    rows = [[e(KIND_LABELS[o["kind"]]), f"{o['flops'] / 1e6:.1f}", f"{o['bytes'] / 1e6:.2f}",
             f"{1e3 * o['time_s']:.3f}", f"{o['gflops']:.1f}", f"{o['gbs']:.1f}", f"{o['intensity']:.1f}",
             _pct(o["roof_share"])] for o in p.ops("prefill")]
    parts.append("<p>Prefill (all prompts), per op kind:</p>")
    parts.append(_html_table(["op", "MFLOP", "MB", "ms", "GFLOP/s", "GB/s", "FLOP/B", "of roof"], rows))

    parts.append("<h2>Per layer</h2>")
    parts.append(_figure("layers.png"))
    steps = max(1, p.decode.steps)
    rows = [[str(i), f"{1e3 * sum(lp.values()) / steps:.3f}"] + [f"{1e3 * lp[k] / steps:.3f}" for k in LAYER_KINDS]
            for i, lp in enumerate(p.decode.layers_s)]
    parts.append(_html_table(["layer", "ms/step"] + [KIND_LABELS[k] for k in LAYER_KINDS], rows))

    c = p.ceilings
    parts.append("<h2>Machine ceilings and instrumentation</h2>")
    parts.append(f"<p>{e(c.name)}: streaming-copy bandwidth {c.bandwidth_gbs:,.1f} GB/s; GEMM peak "
                 + ", ".join(f"{e(k)} {v:,.1f} GFLOP/s" for k, v in c.flops_gflops.items())
                 + f"; per-op overhead {c.op_overhead_us:.2f} us ({e(c.source)}).</p>")
    parts.append(f"<p>Hooks: {1e6 * p.hook_cost.module_s:.2f} us per hooked module call, "
                 f"{1e6 * p.hook_cost.function_s:.2f} us per wrapped function call (calibrated on no-ops); "
                 f"instrumented decode steps were {_pct(p.hook_overhead())} slower than plain ones.</p>")
    parts.extend(f"<p class='muted'>Note: {e(n)}</p>" for n in p.notes)
    parts.append("<p class='muted'>Data: <a href='profile.json'>profile.json</a></p>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>rapidlm profile: "
            f"{e(p.model['name'])}</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / name
    path.write_text(page, encoding="utf-8")
    return path


def _figure(name: str) -> str:
    return (f"<figure><img src='{html.escape(name)}' alt='{html.escape(PLOTS[name])}'>"
            f"<figcaption>{html.escape(PLOTS[name])}</figcaption></figure>")


def write_report(p: Profile, out_dir: str | Path) -> dict[str, Path]:
    """profile.json, report.html and its PNGs in out_dir (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(p, out / "profile.json"), "html": write_html(p, out)}
    paths.update({name: out / name for name in PLOTS})
    return paths

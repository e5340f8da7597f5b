"""Console tables, results.json and results.md.

On a CPU (interpreter) run no throughput, speedup or %-of-peak figure is shown or stored: the ms column
is labelled "cpu-interpreter (not a performance figure)" — interpreted kernels against native eager
say nothing about speed, only that the harness and the kernels run and agree.
"""
import dataclasses
import json
import math

from .plan import CPU_TIMING_NOTE, DTYPE_NAMES, IMPL_LABELS, Plan

#: Meaning of every row field, stored in results.json.
FIELDS = {
    "suite": "modes | layers | memory",
    "case": "shape or model", "M, K, N": "x (M, K) · Wᵀ (K, N)",
    "dtype": "bf16 | fp16 | fp32", "activation": "none | relu | gelu | gelu_tanh | silu",
    "phase": "fwd (no_grad) | bwd | fwd+bwd | fwd+bwd-frozenW | jvp (primal + tangent)",
    "mode": "default | no_grad | inference_mode | fwd+bwd (modes suite)",
    "impl": "eager | fusedad | compile (torch.compile of the eager module) | cublaslt (torch._addmm_activation)",
    "status": "ok | FAIL (rel_err > tol: not timed) | ERROR: <message>",
    "rel_err": "max over outputs and gradients of ||out - eager|| / ||eager||", "tol": "per-dtype tolerance",
    "ms": "median of the per-round medians (rounds interleave the implementations)",
    "ms_min, ms_max, spread_pct": "range of the round medians; (max - min) / median in %",
    "round_ms": "each round's median",
    "tflops": "model FLOPs / ms", "gbps": "minimum bytes moved / ms",
    "bound": "compute | memory: arithmetic intensity vs the measured ridge point",
    "pct_peak": "% of the measured same-dtype GEMM peak (compute) or copy bandwidth (memory)",
    "speedup": "eager ms / ms", "peak_mb": "torch.cuda.max_memory_allocated during one step, MiB",
    "step_mb": "peak minus memory allocated before the step, MiB", "mem_vs_eager": "step_mb / eager step_mb",
}


def _num(v, fmt):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _status(row, width=None):
    s = row.get("status", "")
    return s if width is None or len(s) <= width else s[: width - 1] + "…"


def _columns(suite, performance):
    """(header, cell(row)) pairs for one suite's table."""
    ms_head = "ms" if performance else "ms*"
    common_tail = [("status", _status), ("rel err", lambda r: _num(r.get("rel_err"), ".1e")),
                   (ms_head, lambda r: _num(r.get("ms"), ".4g"))]
    perf = [("spread", lambda r: _num(r.get("spread_pct"), ".1f") + ("%" if r.get("spread_pct") is not None else "")),
            ("TFLOP/s", lambda r: _num(r.get("tflops"), ".1f")),
            ("GB/s", lambda r: _num(r.get("gbps"), ".0f") if r.get("bound") == "memory" else ""),
            ("% peak", lambda r: (_num(r.get("pct_peak"), ".0f") + ("% bw" if r.get("bound") == "memory" else "% mm"))
             if r.get("pct_peak") is not None else ""),
            ("× eager", lambda r: _num(r.get("speedup"), ".2f"))]
    impl = ("impl", lambda r: IMPL_LABELS.get(r["impl"], r["impl"]))
    if suite == "modes":
        cols = [("dtype", lambda r: r["dtype"]), ("mode", lambda r: r["mode"]), impl, *common_tail]
        return cols + ([perf[0], perf[1], perf[4]] if performance else [])
    if suite == "layers":
        cols = [("shape", lambda r: r["case"]), ("dtype", lambda r: r["dtype"]),
                ("act", lambda r: r["activation"]), ("phase", lambda r: r["phase"]), impl, *common_tail]
        return cols + (perf if performance else [])
    return [("case", lambda r: r["case"]), ("dtype", lambda r: r["dtype"]), ("act", lambda r: r.get("activation", "")),
            ("phase", lambda r: r.get("phase", "")), impl, ("status", _status),
            ("rel err", lambda r: _num(r.get("rel_err"), ".1e")),
            ("peak MiB", lambda r: _num(r.get("peak_mb"), ".0f") if r.get("peak_mb") is not None else r.get("note", "")),
            ("step MiB", lambda r: _num(r.get("step_mb"), ".0f")),
            ("step × eager", lambda r: _num(r.get("mem_vs_eager"), ".2f"))]


def _cells(rows, cols, status_width=None):
    out = []
    for r in rows:
        out.append([(_status(r, status_width) if head == "status" else str(cell(r))) for head, cell in cols])
    return out


def text_table(rows, suite, performance, status_width=48):
    """Aligned plain-text table for the console."""
    cols = _columns(suite, performance)
    body = _cells(rows, cols, status_width)
    heads = [h for h, _ in cols]
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(c) for c in body)])


def markdown_table(rows, suite, performance):
    cols = _columns(suite, performance)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in _cells(rows, cols)]
    return "\n".join(lines)


SUITE_TITLES = {
    "modes": "modes — the seed's Net3 in each grad mode",
    "layers": "layers — one linear layer (+ activation)",
    "memory": "memory — peak CUDA memory of a training step",
}


def suite_rows(results):
    """[(suite, its rows)] in run order, for the suites that have rows (so far)."""
    pairs = [(s, [r for r in results["rows"] if r["suite"] == s]) for s in results["plan"]["suites"]]
    return [(s, rows) for s, rows in pairs if rows]


def console_report(results):
    """The tables printed at the end of a run."""
    perf = results["env"]["performance_figures"]
    out = [f"\n== fusedad benchmark — {results['env']['run_label']} — {results['env']['device_name']}"]
    if not perf:
        out.append(f"   * ms: {CPU_TIMING_NOTE}")
    out.append(peaks_line(results.get("peaks")))
    for suite, rows in suite_rows(results):
        out += [f"\n-- {SUITE_TITLES[suite]}", text_table(rows, suite, perf)]
    return "\n".join(out)


def peaks_line(peaks):
    if not peaks:
        return "   measured peaks: none (no CUDA device)"
    mm = ", ".join(f"{k} {v:.0f}" for k, v in peaks["gemm_tflops"].items())
    return f"   measured peaks: GEMM {peaks['gemm_shape']} TFLOP/s: {mm}; device copy {peaks['copy_gbps']:.0f} GB/s"


def markdown_report(results):
    env, perf = results["env"], results["env"]["performance_figures"]
    lines = [f"# fusedad benchmark — {env['run_label']}", "",
             f"`{env['command']}`", "",
             "| | |", "|---|---|"]
    for key in ("date", "device_name", "driver", "cuda", "torch", "triton", "python", "fusedad",
                "fusedad_backend", "git_commit", "git_dirty", "allow_tf32"):
        lines.append(f"| {key} | {env.get(key)} |")
    lines += ["", peaks_line(results.get("peaks")).strip(), ""]
    if not perf:
        lines += [f"**ms\\*: {CPU_TIMING_NOTE}.** Interpreted Triton kernels against native eager: these runs "
                  "show that every implementation runs and agrees with eager, nothing about speed.", ""]
    skipped = results["plan"].get("skipped_impls") or {}
    if skipped:
        lines += ["Not run: " + "; ".join(f"{IMPL_LABELS.get(k, k)} ({v})" for k, v in skipped.items()), ""]
    lines += ["Each implementation is checked against eager (‖out − eager‖ / ‖eager‖ over outputs and "
              "gradients, tolerance per dtype) before it is timed; FAIL rows are never timed. "
              "ms: median of per-round medians, rounds interleave the implementations; spread: "
              "(max − min) / median of the round medians.", ""]
    for suite, rows in suite_rows(results):
        lines += [f"## {SUITE_TITLES[suite]}", "", markdown_table(rows, suite, perf), ""]
    plots = results.get("plots") or []
    if plots:
        lines += ["## plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plan_record(plan: Plan):
    """The plan as JSON-able data."""
    d = dataclasses.asdict(plan)
    d["dtypes"] = [DTYPE_NAMES[t] for t in plan.dtypes]
    d["net3_dtypes"] = [DTYPE_NAMES[t] for t in plan.net3_dtypes]
    d["shapes"] = [dataclasses.asdict(s) for s in plan.shapes]
    d["memory_layers"] = [dict(dataclasses.asdict(s), activation=a, phase=p) for s, a, p in plan.memory_layers]
    return d


def _finite(obj):
    """NaN / inf -> None, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(_finite(dict(results, fields=FIELDS)), f, indent=1, allow_nan=False)
        f.write("\n")


def write_markdown(results, path):
    with open(path, "w") as f:
        f.write(markdown_report(results))

"""Console tables, results.json and results.md: for every suite that has rows, its title and its table
(the columns the suite declares; the common ones are defined here).

On a CPU (interpreter) run no throughput, speedup or %-of-peak figure is shown or stored: the ms column
is labelled "cpu-interpreter (not a performance figure)" — interpreted kernels against native eager
say nothing about speed, only that the harness and the kernels run and agree.
"""
import dataclasses
import json
import math

import torch

from .plan import CPU_TIMING_NOTE, DTYPE_NAMES, IMPL_LABELS, IMPLS

#: Meaning of the row fields every suite has, and of those ``runner.run_timed`` adds (stored in
#: results.json with the fields of the suites that ran).
FIELDS = {
    "case": "shape or model", "dtype": "bf16 | fp16 | fp32",
    "impl": "; ".join(f"{k}: {v}" for k, v in IMPLS.items()),
    "status": "ok | FAIL (rel_err > tol: not timed) | ERROR: <message>",
    "rel_err": "max over outputs and gradients of ||out - eager|| / ||eager||", "tol": "per-dtype tolerance",
    "ms": "median of the per-round medians (rounds interleave the implementations)",
    "ms_min, ms_max, spread_pct": "range of the round medians; (max - min) / median in %",
    "round_ms": "each round's median",
    "tflops": "model FLOPs / ms", "gbps": "minimum bytes moved / ms",
    "bound": "compute | memory: arithmetic intensity vs the measured ridge point",
    "pct_peak": "% of the measured same-dtype GEMM peak (compute) or copy bandwidth (memory)",
    "speedup": "eager ms / ms",
    "note": "how a reference row is checked (e.g. on part of eager's outputs)",
    "graph_status": "CUDA-graph replay (cases with M <= graph_max_m): ok | FAIL | ERROR: <message> | "
                    "skipped (no GPU); checked like the plain call, on new input values, outputs NaN-filled first",
    "graph_rel_err": "the replay's rel_err vs eager",
    "ms_graph, ms_graph_min, ms_graph_max, round_ms_graph": "the replay's timing, as ms",
    "launch_ms": "ms - ms_graph: the host-side cost (Python, autograd, launches) the graph removes",
}


def num(key, fmt, suffix=""):
    """cell(row): ``row[key]`` formatted (and ``suffix``); empty where missing or NaN."""
    def cell(r):
        v = r.get(key)
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt) + suffix
    return cell


def _status(row, width=None):
    s = row.get("status", "")
    return s if width is None or len(s) <= width else s[: width - 1] + "…"


# Columns for Suite.columns: (header, row key or cell(row)).
IMPL = ("impl", lambda r: IMPL_LABELS.get(r["impl"], r["impl"]))
STATUS = ("status", "status")
REL_ERR = ("rel err", num("rel_err", ".1e"))
SPREAD = ("spread", num("spread_pct", ".1f", "%"))
TFLOPS = ("TFLOP/s", num("tflops", ".1f"))
GBPS = ("GB/s", lambda r: num("gbps", ".0f")(r) if r.get("bound") == "memory" else "")
PCT_PEAK = ("% peak", lambda r: num("pct_peak", ".0f", "% bw" if r.get("bound") == "memory" else "% mm")(r))
SPEEDUP = ("× eager", num("speedup", ".2f"))
# CUDA-graph columns (rows of ``Case.graph`` cases) and a reference row's note. Optional: a table drops
# them when they are empty in every row, so suites and runs without graphs show none of them.
GRAPH_MS = ("graph ms", num("ms_graph", ".4g"))
LAUNCH_MS = ("launch ms", num("launch_ms", ".3g"))
GRAPH = ("graph", lambda r: _short(r.get("graph_status", ""), 40))
NOTE = ("note", lambda r: r.get("note", ""))
OPTIONAL = {GRAPH_MS[0], LAUNCH_MS[0], GRAPH[0], NOTE[0]}


def _short(s, width):
    return s if len(s) <= width else s[: width - 1] + "…"


def timed_columns(performance, perf=(SPREAD, TFLOPS, GBPS, PCT_PEAK, SPEEDUP)):
    """impl, status, rel err, ms (ms* where it is not a performance figure), the CUDA-graph columns
    (graph ms, launch ms = ms − graph ms, graph status: shown only where a row has them), then ``perf`` on
    a performance run: the columns of a suite run by ``runner.run_timed``."""
    ms = ("ms" if performance else "ms*", num("ms", ".4g"))
    return [IMPL, STATUS, REL_ERR, ms, GRAPH_MS, LAUNCH_MS, GRAPH, *(perf if performance else ())]


def _visible(rows, cols):
    """``cols`` without the OPTIONAL ones that are empty in every row."""
    def empty(head, cell):
        return all(not (r.get(cell) if isinstance(cell, str) else cell(r)) for r in rows)
    return [(head, cell) for head, cell in cols if head not in OPTIONAL or not empty(head, cell)]


def _cells(rows, cols, status_width=None):
    return [[_status(r, status_width) if head == "status" else str(r.get(cell, "")) if isinstance(cell, str)
             else cell(r) for head, cell in cols] for r in rows]


def text_table(rows, cols, status_width=48):
    """Aligned plain-text table for the console."""
    cols = _visible(rows, cols)
    body = _cells(rows, cols, status_width)
    heads = [h for h, _ in cols]
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(heads)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line(c) for c in body)])


def markdown_table(rows, cols):
    cols = _visible(rows, cols)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(c) for c in cells) + " |" for cells in _cells(rows, cols)]
    return "\n".join(lines)


def suite_rows(results):
    """[(Suite, its rows)] in run order, for the suites that have rows (so far)."""
    from .suites import SUITES  # not at import: the suite modules import this one

    pairs = [(SUITES[s], [r for r in results["rows"] if r["suite"] == s]) for s in results["plan"]["suites"]]
    return [(s, rows) for s, rows in pairs if rows]


def console_report(results):
    """The tables printed at the end of a run."""
    perf = results["env"]["performance_figures"]
    out = [f"\n== fusedad benchmark — {results['env']['run_label']} — {results['env']['device_name']}"]
    if not perf:
        out.append(f"   * ms: {CPU_TIMING_NOTE}")
    out.append(peaks_line(results.get("peaks")))
    for suite, rows in suite_rows(results):
        out += [f"\n-- {suite.title}", text_table(rows, suite.columns(perf))]
    tuned = results.get("tuning")
    if tuned is not None:
        from .tuning import table_rows

        out.append("\n-- tuner choices (which row of the variant table ran, per key)")
        if tuned["note"] or not tuned["rows"]:
            out.append("   " + (tuned["note"] or "no key was tuned in this run"))
        else:
            cells = table_rows(tuned["rows"])
            cols = [(h, h) for h in cells[0]]
            out.append(text_table(cells, cols))
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
        lines += [f"## {suite.title}", "", markdown_table(rows, suite.columns(perf)), ""]
    tuned = results.get("tuning")
    if tuned is not None:
        from .tuning import markdown as tuning_markdown

        lines += tuning_markdown(tuned["rows"], tuned["note"])
    plots = results.get("plots") or []
    if plots:
        lines += ["## plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plan_record(plan):
    """The plan as JSON-able data."""
    return _json(dict(dataclasses.asdict(plan), suites=plan.suites))


def fields(results):
    """Meaning of every row field of ``results``: the common ones and those of the suites that ran."""
    from .suites import SUITES

    names = results["plan"]["suites"]
    return {"suite": " | ".join(names), **FIELDS, **{k: v for n in names for k, v in SUITES[n].fields.items()}}


def _json(obj):
    """JSON-able data: NaN / inf -> None (so the file is strict JSON), dtypes -> names, dataclasses ->
    dicts, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, torch.dtype):
        return DTYPE_NAMES.get(obj, str(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json(v) for v in obj]
    return obj


def write(results, out_dir):
    """results.json (strict JSON, with the meaning of every field) and results.md in ``out_dir``."""
    with open(out_dir / "results.json", "w", encoding="utf-8") as f:
        json.dump(_json(dict(results, fields=fields(results))), f, indent=1, allow_nan=False)
        f.write("\n")
    (out_dir / "results.md").write_text(markdown_report(results), encoding="utf-8")

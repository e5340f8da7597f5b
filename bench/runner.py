"""How a suite's case becomes rows: every implementation is checked against eager, then the ones that
agree are measured — timed in interleaved rounds (``run_timed``, the default) or by a measurement the
suite supplies (``run_case(case, plan, measure)``). One row per implementation: status "ok" (measured),
"FAIL" (rel. error above the dtype's tolerance: never measured), or "ERROR: <message>" (build, run or
measurement raised).

Interleaved timing: GPU clocks drift by several percent over a run (cuBLAS bf16 8192³ on an H200:
785 TFLOP/s fresh, 672–693 under sustained load), so implementations of one case are never timed back
to back in blocks: each round times every implementation once (A B C, then B C A, …: the order rotates
so none always runs first), and the figure is the median of the per-round medians with the min–max of
those round medians as the spread.

CUDA graphs (``Case.graph``, CUDA only): every implementation that passed its check is also captured in a
``torch.cuda.CUDAGraph`` (after warm-up calls, so compiling and autotuning never happen inside the
capture) and the replay is timed in the same interleaved rounds, as ``<impl>@graph``. The plain time
minus the replay time is the host-side cost (Python, autograd, launches) that the graph removes. Such a
case runs on a side stream (capture cannot use the legacy default stream, and a backward runs on the
stream of its forward, so the forward made while building the case must already be on that stream).
Each replay is checked before it is timed: the case's inputs get new values (``Builders.refresh``),
the graph's static outputs are filled with NaN, the graph is replayed, and its outputs are compared with
eager's plain call on the new values. Without CUDA the rows say ``graph_status: skipped (no GPU)``.
"""
import contextlib
import dataclasses
import math
import statistics
import time

import torch
from tqdm.auto import tqdm

from . import checks


@dataclasses.dataclass
class Case:
    """One case of a suite. ``make_builders()`` allocates its tensors (only when the case runs) and
    returns {impl: build}, eager first (see ``impls.builders``). ``meta`` starts every row of the case."""

    meta: dict
    dtype: torch.dtype
    make_builders: callable
    flops: float = None              # model FLOPs per call (timed cases: TFLOP/s)
    nbytes: float = None             # minimum bytes moved per call (timed cases: GB/s)
    graph: bool = False              # also time a CUDA-graph replay of each implementation (CUDA)


#: graph_status of a graph case on a machine without CUDA.
GRAPH_NO_GPU = "skipped (no GPU)"


class Builders(dict):
    """``{impl: build}`` as ``Case.make_builders`` returns it (a plain dict does too), optionally with
    ``refresh()``: draw new values into the case's input tensors in place (the graph check uses it to
    show that a replay computes from its inputs' current values)."""

    def __init__(self, builds=(), refresh=None):
        super().__init__(builds)
        self.refresh = refresh


def reference_build(build, compare, note):
    """Mark ``build`` as a reference implementation that is checked on part of eager's outputs only:
    ``compare(eager outputs) -> the outputs it is compared with``; ``note`` is shown in its row. (E.g.
    a GEMM floor that is given dZ and returns dX and dW but no db.)"""
    build.compare, build.note = compare, note
    return build


def _compared(build, ref):
    compare = getattr(build, "compare", None)
    return ref if compare is None else compare(ref)


def error_text(exc):
    """'ERROR: <Type>: <first line>' (≤ 160 characters) for the table."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"ERROR: {type(exc).__name__}: {first}"[:160]


def check(builders, dtype):
    """Build and run every implementation once (eager first); compare each with eager.

    Returns (fns of the implementations that passed, {impl: (status, rel_err)}). If eager itself fails,
    every implementation gets its error.
    """
    fns, results, ref = {}, {}, None
    for name, build in builders.items():
        try:
            fn = build()
            out = fn()
        except Exception as exc:  # noqa: BLE001 - e.g. a torch.compile failure: a row, not a crash
            if ref is None:
                return {}, {name: (error_text(exc), None) for name in builders}
            results[name] = (error_text(exc), None)
            continue
        err = 0.0 if ref is None else checks.max_rel_err(out, _compared(build, ref))
        ref = out if ref is None else ref
        if checks.passes(err, dtype):
            fns[name], results[name] = fn, ("ok", err)
        else:
            results[name] = ("FAIL", None if math.isnan(err) else err)
    return fns, results


def run_case(case, plan, measure, graphs=False):
    """Check every implementation of ``case``, then ``measure(fns)`` -> {impl: fields or Exception} the
    ones that passed -> rows (one per implementation). With ``graphs``, the passing ones are also
    captured in CUDA graphs and checked (``capture_graphs``), and ``measure(fns, graph_runs)`` is called.
    A build or a fn may carry ``note`` / ``row_fields`` (a dict): they are added to its row."""
    torch.manual_seed(plan.seed)
    stream = torch.cuda.Stream() if graphs and plan.device == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        try:
            builders = case.make_builders()
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating the weights
            return [dict(case.meta, impl="eager", status=error_text(exc))]
        fns, results = check(builders, case.dtype)
        if not fns:
            measured = {}
        elif graphs:
            graph_runs = capture_graphs(fns, builders, case.dtype, plan.device, stream)
            measured = measure(fns, graph_runs)
            del graph_runs  # the graphs and their static outputs
        else:
            measured = measure(fns)
        rows = []
        for name, build in builders.items():
            status, err = results[name]
            row = dict(case.meta, impl=name, status=status, rel_err=err, tol=checks.tolerance(case.dtype))
            if getattr(build, "note", None):
                row["note"] = build.note
            row.update(getattr(fns.get(name), "row_fields", None) or {})
            m = measured.get(name)
            if isinstance(m, Exception):
                row["status"] = error_text(m)
            elif m:
                row.update(m)
            rows.append(row)
        del builders, fns
    if plan.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows


@dataclasses.dataclass
class GraphRun:
    """One implementation's CUDA graph: ``replay`` (None unless usable), ``status`` (ok | FAIL | ERROR:
    … | skipped (no GPU)), the replay's rel. error vs eager, and the graph and its static outputs (kept
    alive while the replay is timed)."""

    replay: object = None
    status: str = GRAPH_NO_GPU
    rel_err: float = None
    keep: tuple = ()


def capture_graph(fn, stream, warmup=2):
    """``fn``'s launches captured in one CUDA graph on ``stream`` (the current one) after ``warmup``
    plain calls there -> (graph, the tensors fn returned during the capture: the graph's static outputs)."""
    for _ in range(warmup):
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outs = fn()
    return graph, outs


def _synchronize():
    torch.cuda.synchronize()


def capture_graphs(fns, builders, dtype, device, stream):
    """{impl: GraphRun} for the implementations that passed their check (``fns``, eager first).

    CUDA: capture each; then refresh the inputs (``builders.refresh``, if any), fill every static output
    with NaN, replay, and compare with eager's plain call on the new values (the same tolerance as the
    plain check; a reference build compares its part only). Status ok, FAIL or ERROR: <exception>. An
    unwritten output, a stale input pointer or a value baked in at capture time cannot pass. Without CUDA:
    every status is ``skipped (no GPU)``. (The tests run this logic on the CPU with a fake
    ``capture_graph`` and ``_synchronize``.)
    """
    if device != "cuda":
        return {name: GraphRun() for name in fns}
    runs = {}
    for name, fn in fns.items():
        try:
            graph, outs = capture_graph(fn, stream)
            runs[name] = GraphRun(graph.replay, "captured", keep=(graph, outs))
        except Exception as exc:  # noqa: BLE001 - e.g. an operation not permitted while capturing
            runs[name] = GraphRun(None, error_text(exc))
    refresh = getattr(builders, "refresh", None)
    try:
        if refresh is not None:
            refresh()
        ref = next(iter(fns.values()))()  # eager's plain call (on the new values)
    except Exception as exc:  # noqa: BLE001
        for run in runs.values():
            if run.replay is not None:
                run.replay, run.status = None, error_text(exc)
        return runs
    for name, run in runs.items():
        if run.replay is None:
            continue
        outs = [t for t in run.keep[1] if isinstance(t, torch.Tensor)]
        try:
            for t in outs:
                t.fill_(math.nan)
            run.replay()
            _synchronize()
            err = checks.max_rel_err(outs, _compared(builders[name], ref))
        except Exception as exc:  # noqa: BLE001
            run.replay, run.status = None, error_text(exc)
            continue
        run.rel_err = None if math.isnan(err) else err
        if checks.passes(err, dtype):
            run.status = "ok"
        else:
            run.replay, run.status = None, "FAIL"
    return runs


def graph_fields(run, timing, plain):
    """Row fields of one implementation's graph: graph_status, graph_rel_err and, where the replay was
    timed, ms_graph (median of the round medians), its range and rounds, and launch_ms = ms − ms_graph."""
    out = {"graph_status": run.status, "graph_rel_err": run.rel_err}
    if isinstance(timing, Exception):
        out["graph_status"] = error_text(timing)
    elif timing:
        out.update(ms_graph=timing["ms"], ms_graph_min=timing["ms_min"], ms_graph_max=timing["ms_max"],
                   round_ms_graph=timing["round_ms"])
        if isinstance(plain, dict):
            out["launch_ms"] = plain["ms"] - timing["ms"]
    return out


def round_ms(fn, device, rep_ms):
    """One round's ms per call of ``fn``. CUDA: ``triton.testing.do_bench``'s median (CUDA events, an L2
    flush before every call, warmup then ~rep_ms of timed calls); CPU: the wall time of one call."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def _summary(ms):
    med = statistics.median(ms)
    return {"ms": med, "ms_min": min(ms), "ms_max": max(ms),
            "spread_pct": 100.0 * (max(ms) - min(ms)) / med if med > 0 else 0.0, "round_ms": ms}


def time_interleaved(fns, device, rounds, rep_ms):
    """Time zero-argument callables ``{name: fn}`` in interleaved rounds.

    Returns ``{name: {ms (median of the round medians), ms_min, ms_max, spread_pct ((max − min) /
    median, in %), round_ms (each round's)} or Exception}``; an implementation that raises is dropped
    from later rounds. Every fn has already run once (the check): compiling and autotuning are not timed.
    """
    names = list(fns)
    per_round = {name: [] for name in names}
    failed = {}
    for r in range(rounds):
        shift = r % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                per_round[name].append(round_ms(fns[name], device, rep_ms))
            except Exception as exc:  # noqa: BLE001 - reported as ERROR in the table
                failed[name] = exc
    return {name: failed[name] if name in failed else _summary(ms) for name, ms in per_round.items()}


def throughput(flops, nbytes, ms, peaks, dtype_name):
    """Figures derived from one timing (``flops``, ``nbytes``: the case's models, None if it has none).

    Returns dict: tflops, gbps, bound ("compute" | "memory" | None without peaks), pct_peak (% of the
    device's measured GEMM peak in this dtype when compute-bound — arithmetic intensity at or above the
    ridge point, peak FLOP/s ÷ copy bytes/s — of its copy bandwidth when memory-bound; None without
    peaks).
    """
    tflops = flops / ms / 1e9 if flops else None
    gbps = nbytes / ms / 1e6 if nbytes else None
    out = {"tflops": tflops, "gbps": gbps, "bound": None, "pct_peak": None}
    gemm_peak = (peaks or {}).get("gemm_tflops", {}).get(dtype_name)
    copy_peak = (peaks or {}).get("copy_gbps")
    if tflops is None or not gemm_peak or not copy_peak:
        return out
    ridge = gemm_peak * 1e3 / copy_peak                   # FLOP per byte where the two roofs meet
    if gbps is not None and flops / nbytes < ridge:
        out.update(bound="memory", pct_peak=100.0 * gbps / copy_peak)
    else:
        out.update(bound="compute", pct_peak=100.0 * tflops / gemm_peak)
    return out


def vs_eager(rows, key, name, invert=False):
    """``row[name]`` = row[key] / eager's (eager's / row's if ``invert``), where both are there."""
    base = next((r.get(key) for r in rows if r["impl"] == "eager"), None)
    for r in rows:
        if base and r.get(key):
            r[name] = base / r[key] if invert else r[key] / base
    return rows


GRAPH_SUFFIX = "@graph"


def run_timed(case, plan, peaks):
    """Check, then time the passing implementations interleaved (``time_interleaved``) — with
    ``case.graph``, their CUDA-graph replays in the same rounds; on a performance run add TFLOP/s, GB/s,
    % of peak and speedup (eager ms / ms)."""
    def measure(fns, graph_runs=None):
        timed = dict(fns)
        for name, run in (graph_runs or {}).items():
            if run.replay is not None:
                timed[name + GRAPH_SUFFIX] = run.replay
        t = time_interleaved(timed, plan.device, plan.rounds, plan.rep_ms)
        out = {name: t[name] for name in fns}
        for name, m in out.items():
            if plan.is_performance_run and isinstance(m, dict):
                m.update(throughput(case.flops, case.nbytes, m["ms"], peaks, case.meta["dtype"]))
            if graph_runs is not None and isinstance(m, dict):
                m.update(graph_fields(graph_runs[name], t.get(name + GRAPH_SUFFIX), m))
        return out
    rows = run_case(case, plan, measure, graphs=case.graph)
    return vs_eager(rows, "ms", "speedup", invert=True) if plan.is_performance_run else rows


def run_suite(suite, plan, peaks, progress=True, after_case=None):
    """All cases of one suite, with a progress bar; FAIL / ERROR rows (and graph replays that are FAIL /
    ERROR) are also printed as they happen. ``after_case(rows so far)`` is called after every case (the
    CLI writes its results files then: a run cut short keeps every finished case)."""
    cases = list(suite.cases(plan.settings[suite.name], plan))
    rows = []
    with tqdm(cases, desc=f"{suite.name:6s}", unit="case", disable=not progress, dynamic_ncols=True) as bar:
        for case in bar:
            what = " ".join(str(v) for k, v in case.meta.items() if k not in ("M", "K", "N"))
            bar.set_postfix_str(what, refresh=False)
            for r in suite.run(case, plan, peaks):
                if r["status"] != "ok":
                    bar.write(f"  {suite.name} | {what} | {r['impl']}: {r['status']}")
                if graph_failed(r):
                    bar.write(f"  {suite.name} | {what} | {r['impl']} CUDA graph: {r['graph_status']}")
                rows.append({"suite": suite.name, **r})
            if after_case is not None:
                after_case(rows)
    return rows


def graph_failed(row):
    """True if the row's CUDA-graph replay is FAIL or ERROR (not when skipped or absent)."""
    return str(row.get("graph_status", "")).startswith(("FAIL", "ERROR"))

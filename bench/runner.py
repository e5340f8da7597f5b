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
"""
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
        err = 0.0 if ref is None else checks.max_rel_err(out, ref)
        ref = out if ref is None else ref
        if checks.passes(err, dtype):
            fns[name], results[name] = fn, ("ok", err)
        else:
            results[name] = ("FAIL", None if math.isnan(err) else err)
    return fns, results


def run_case(case, plan, measure):
    """Check every implementation of ``case``, then ``measure(fns)`` -> {impl: fields or Exception} the
    ones that passed -> rows (one per implementation)."""
    torch.manual_seed(plan.seed)
    try:
        builders = case.make_builders()
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating the weights
        return [dict(case.meta, impl="eager", status=error_text(exc))]
    fns, results = check(builders, case.dtype)
    measured = measure(fns) if fns else {}
    rows = []
    for name in builders:
        status, err = results[name]
        row = dict(case.meta, impl=name, status=status, rel_err=err, tol=checks.tolerance(case.dtype))
        m = measured.get(name)
        if isinstance(m, Exception):
            row["status"] = error_text(m)
        elif m:
            row.update(m)
        rows.append(row)
    del builders, fns
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return rows


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


def run_timed(case, plan, peaks):
    """Check, then time the passing implementations interleaved (``time_interleaved``); on a
    performance run add TFLOP/s, GB/s, % of peak and speedup (eager ms / ms)."""
    def measure(fns):
        out = time_interleaved(fns, plan.device, plan.rounds, plan.rep_ms)
        for m in out.values():
            if plan.is_performance_run and isinstance(m, dict):
                m.update(throughput(case.flops, case.nbytes, m["ms"], peaks, case.meta["dtype"]))
        return out
    rows = run_case(case, plan, measure)
    return vs_eager(rows, "ms", "speedup", invert=True) if plan.is_performance_run else rows


def run_suite(suite, plan, peaks, progress=True):
    """All cases of one suite, with a progress bar; FAIL / ERROR rows are also printed as they happen."""
    cases = list(suite.cases(plan.settings[suite.name], plan))
    rows = []
    with tqdm(cases, desc=f"{suite.name:6s}", unit="case", disable=not progress, dynamic_ncols=True) as bar:
        for case in bar:
            what = " ".join(str(v) for k, v in case.meta.items() if k not in ("M", "K", "N"))
            bar.set_postfix_str(what, refresh=False)
            for r in suite.run(case, plan, peaks):
                if r["status"] != "ok":
                    bar.write(f"  {suite.name} | {what} | {r['impl']}: {r['status']}")
                rows.append({"suite": suite.name, **r})
    return rows

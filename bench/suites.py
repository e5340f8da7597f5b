"""The suites: each is a list of cases; each case is checked against eager, then timed (or measured).

    modes   the seed's Net3 in default / no_grad / inference_mode forward and a fwd+bwd step
    layers  one nn.Linear (+ activation) per shape × dtype × activation × phase
    memory  peak CUDA memory of a training step (Net3, and large layers) per implementation

A case yields one row per implementation: status "ok" (timed), "FAIL" (rel. error above the dtype's
tolerance: never timed), or "ERROR: <message>" (build, run or timing raised).
"""
import dataclasses
import functools
import itertools
import math

import torch
from tqdm.auto import tqdm

from . import checks, figures, impls, timing
from .plan import DTYPE_NAMES, MODES, Plan


@dataclasses.dataclass
class Case:
    """One case of a suite. ``make_builders()`` allocates its tensors (only when the case runs)."""

    suite: str
    meta: dict
    dtype: torch.dtype
    make_builders: callable
    flops: float = None
    nbytes: float = None
    measure: str = "time"            # "time" | "memory"


def modes_cases(plan: Plan):
    net3 = plan.net3
    for dtype, mode in itertools.product(plan.net3_dtypes, MODES):
        yield Case("modes", {"case": net3.label, "dtype": DTYPE_NAMES[dtype], "mode": mode}, dtype,
                   functools.partial(impls.net3_builders, net3, dtype, mode, plan.impls, plan.device,
                                     plan.plant_mismatch),
                   flops=figures.net3_flops(net3, mode))


def layers_cases(plan: Plan):
    for shape, dtype, act, phase in itertools.product(plan.shapes, plan.dtypes, plan.activations, plan.phases):
        meta = {"case": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "dtype": DTYPE_NAMES[dtype],
                "activation": act, "phase": phase}
        yield Case("layers", meta, dtype,
                   functools.partial(impls.layer_builders, shape, dtype, act, phase, plan.impls, plan.device,
                                     plan.plant_mismatch),
                   flops=figures.layer_flops(shape.M, shape.K, shape.N, phase),
                   nbytes=figures.layer_bytes(shape.M, shape.K, shape.N, phase, dtype.itemsize, act))


def memory_cases(plan: Plan):
    # Memory does not depend on torch.compile's grad-mode or shape guards the way time does, but a
    # compiled step does save different tensors, so every implementation is measured.
    for dtype in plan.net3_dtypes:
        net3 = plan.net3
        yield Case("memory", {"case": net3.label + " training step", "dtype": DTYPE_NAMES[dtype],
                              "activation": "relu", "phase": "fwd+bwd"}, dtype,
                   functools.partial(impls.net3_builders, net3, dtype, "fwd+bwd", plan.impls, plan.device,
                                     plan.plant_mismatch), measure="memory")
        for shape, act, phase in plan.memory_layers:
            meta = {"case": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "dtype": DTYPE_NAMES[dtype],
                    "activation": act, "phase": phase}
            yield Case("memory", meta, dtype,
                       functools.partial(impls.layer_builders, shape, dtype, act, phase, plan.impls, plan.device,
                                         plan.plant_mismatch), measure="memory")


SUITE_CASES = {"modes": modes_cases, "layers": layers_cases, "memory": memory_cases}


def error_text(exc):
    """'ERROR: <Type>: <first line>' (≤ 160 characters) for the table."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"ERROR: {type(exc).__name__}: {first}"[:160]


def _check(builders, dtype):
    """Build and run every implementation once; compare with eager.

    Returns (fns of the implementations that passed, {impl: (status, rel_err)}). If eager itself fails,
    every implementation gets its error.
    """
    results, fns = {}, {}
    try:
        eager_fn = builders["eager"]()
        ref = eager_fn()
    except Exception as exc:  # noqa: BLE001
        return {}, {name: (error_text(exc), None) for name in builders}
    fns["eager"], results["eager"] = eager_fn, ("ok", 0.0)
    for name, build in builders.items():
        if name == "eager":
            continue
        try:
            fn = build()
            out = fn()
        except Exception as exc:  # noqa: BLE001 - e.g. a torch.compile failure: a row, not a crash
            results[name] = (error_text(exc), None)
            continue
        err = checks.max_rel_err(out, ref)
        del out
        if checks.passes(err, dtype):
            fns[name], results[name] = fn, ("ok", err)
        else:
            results[name] = ("FAIL", None if math.isnan(err) else err)
    del ref
    return fns, results


def run_case(case: Case, plan: Plan, peaks):
    """Check, then time or measure, one case -> list of row dicts (one per implementation)."""
    torch.manual_seed(plan.seed)
    try:
        builders = case.make_builders()
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating the weights
        return [dict(suite=case.suite, **case.meta, impl="eager", status=error_text(exc))]
    fns, results = _check(builders, case.dtype)
    measured = {}
    if case.measure == "time" and fns:
        measured = timing.time_interleaved(fns, plan.device, plan.rounds, plan.rep_ms)
    elif case.measure == "memory":
        for name, fn in fns.items():
            try:
                measured[name] = timing.peak_memory_mb(fn, plan.device)
            except Exception as exc:  # noqa: BLE001
                measured[name] = exc

    rows = []
    for name in builders:
        status, err = results[name]
        row = dict(suite=case.suite, **case.meta, impl=name, status=status, rel_err=err,
                   tol=checks.tolerance(case.dtype))
        m = measured.get(name)
        if isinstance(m, Exception):
            row["status"] = error_text(m)
        elif isinstance(m, timing.Timing):
            row.update(ms=m.median, ms_min=m.lo, ms_max=m.hi, spread_pct=m.spread_pct, round_ms=m.rounds)
            if plan.is_performance_run:
                row.update(figures.throughput(case.flops, case.nbytes, m.median, peaks, case.meta["dtype"]))
        elif m is not None:
            row["peak_mb"], row["step_mb"] = m
            if row["peak_mb"] is None:
                row["note"] = "n/a on CPU"
        rows.append(row)
    _relative_to_eager(rows, plan.is_performance_run)
    del builders, fns
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _relative_to_eager(rows, performance):
    """speedup = eager ms / ms (performance runs only); mem_vs_eager = step MiB / eager's step MiB."""
    eager = next((r for r in rows if r["impl"] == "eager"), {})
    for r in rows:
        if performance and eager.get("ms") and r.get("ms"):
            r["speedup"] = eager["ms"] / r["ms"]
        if eager.get("step_mb") and r.get("step_mb"):
            r["mem_vs_eager"] = r["step_mb"] / eager["step_mb"]


def run_suite(name, plan: Plan, peaks, progress=True):
    """All cases of one suite, with a progress bar; FAIL / ERROR rows are also printed as they happen."""
    cases = list(SUITE_CASES[name](plan))
    rows = []
    with tqdm(cases, desc=f"{name:6s}", unit="case", disable=not progress, dynamic_ncols=True) as bar:
        for case in bar:
            what = " ".join(str(v) for k, v in case.meta.items() if k not in ("M", "K", "N"))
            bar.set_postfix_str(what, refresh=False)
            case_rows = run_case(case, plan, peaks)
            for r in case_rows:
                if r["status"] != "ok":
                    bar.write(f"  {name} | {what} | {r['impl']}: {r['status']}")
            rows.extend(case_rows)
    return rows

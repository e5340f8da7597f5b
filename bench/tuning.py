"""Which row of the kernel-variant table the autotuner kept, per key, and by how much it beat the others.

Read from ``fusedad.kernels.configs.tuning_report()`` after a run: one row per tuned key (device, launch
direction or forced variant, constexpr flags, M bucket, N, K, dtype) with the pair it kept, the fastest
pair of another variant (the runner-up), and torch's row against the fastest Triton pair where both were
timed. ``margin`` = runner-up ms / picked ms (above 1: the pick was that much faster).
"""
import os

#: Flags worth showing in a key (the rest follow from dtype and the launch)
SHOWN_FLAGS = ("ACT", "HAS_BIAS", "STORE_Z", "COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB")


def status(device):
    """Why there are no tuner rows, or "" when the tuner may have run."""
    from fusedad.kernels import configs
    from fusedad.kernels import linear as launcher

    if device != "cuda" or launcher.INTERPRETER:
        return ("no tuning on CPU: the Triton interpreter runs one small tile per launch and the tuner times "
                "only on CUDA (torch's rows run there only when forced with variants.use)")
    if not configs.autotune_enabled():
        return f"autotuning off (FUSEDAD_AUTOTUNE={os.environ.get('FUSEDAD_AUTOTUNE')}): the heuristic rows ran"
    return ""


def _label(item):
    name, cfg = item if isinstance(item, tuple) else (None, item)
    if name and name.endswith("_torch"):
        return name
    tile = f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}/w{cfg.num_warps}s{cfg.num_stages}"
    return f"{name} {tile}" if name else tile


def _variant(item):
    return item[0] if isinstance(item, tuple) else None


def rows(report=None):
    """[dict] — one per tuned key; ``report`` defaults to this process's ``configs.tuning_report()``."""
    from fusedad.kernels import configs

    out = []
    for key, timings in (configs.tuning_report() if report is None else report):
        device, kernel, flags, bucket, N, K, dtype = key
        flags = dict(flags)
        ok = [(item, ms) for item, ms in timings if ms is not None]
        if not ok:
            continue
        picked, picked_ms = min(ok, key=lambda p: p[1])
        others = [(i, ms) for i, ms in ok if _variant(i) != _variant(picked)]
        runner = min(others, key=lambda p: p[1]) if others else None
        torch_ms = min((ms for i, ms in ok if (_variant(i) or "").endswith("_torch")), default=None)
        triton_ms = min((ms for i, ms in ok if not (_variant(i) or "").endswith("_torch")), default=None)
        out.append({
            "device": device, "launch": kernel, "M bucket": bucket, "N": N, "K": K,
            "dtype": str(dtype).replace("torch.", ""),
            "flags": " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in flags.items()
                              if k in SHOWN_FLAGS),
            "picked": _label(picked), "picked_ms": picked_ms,
            "runner_up": _label(runner[0]) if runner else "", "runner_up_ms": runner[1] if runner else None,
            "margin": runner[1] / picked_ms if runner and picked_ms > 0 else None,
            "torch_ms": torch_ms, "best_triton_ms": triton_ms,
            "triton_over_torch": triton_ms / torch_ms if torch_ms and triton_ms else None,
            "timed": len(timings), "failed": len(timings) - len(ok),
        })
    return out


def table_rows(tuning):
    """String cells for the console and markdown tables."""
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    return [{"launch": r["launch"], "flags": r["flags"], "M≤": str(r["M bucket"]), "N": str(r["N"]), "K": str(r["K"]),
             "dtype": r["dtype"], "picked": r["picked"], "ms": f(r["picked_ms"], ".4g"),
             "runner-up": r["runner_up"], "its ms": f(r["runner_up_ms"], ".4g"), "margin": f(r["margin"], ".2f") + "×",
             "best Triton ÷ torch": f(r["triton_over_torch"], ".2f")} for r in tuning]


def markdown(tuning, note):
    """The "tuner choices" section of a results.md / summary.md."""
    lines = ["## tuner choices (which row of the variant table ran, per key)", ""]
    if note:
        return lines + [note + ".", ""]
    if not tuning:
        return lines + ["no key was tuned in this run (every launch was a cache hit or forced).", ""]
    cells = table_rows(tuning)
    head = list(cells[0])
    lines += ["margin = runner-up ms / picked ms (the fastest pair of another variant; above 1: the pick was "
              "faster); best Triton ÷ torch above 1: torch's GEMM was faster than every Triton pair timed.", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c[h] for h in head) + " |" for c in cells]
    return lines + [""]

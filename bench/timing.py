"""Interleaved timing and peak memory.

GPU clocks drift by several percent over a run (GUIDE §5: cuBLAS bf16 8192³ at 785 TFLOP/s fresh,
672–693 under sustained load), so implementations of one case are never timed back to back in blocks:
each round times every implementation once (A B C, then B C A, …: the order rotates so none always
runs first), and the figure is the median of the per-round medians with the min–max of those round
medians as the spread.
"""
import dataclasses
import statistics
import time

import torch


@dataclasses.dataclass
class Timing:
    """Milliseconds per call: ``median`` of the round medians, ``lo``–``hi`` their range."""

    median: float
    lo: float
    hi: float
    rounds: list

    @property
    def spread_pct(self):
        """(hi − lo) / median, in percent."""
        return 100.0 * (self.hi - self.lo) / self.median if self.median > 0 else 0.0


def _cuda_round_ms(fn, rep_ms):
    import triton.testing

    # do_bench: CUDA events, an L2 flush before every call, warmup then ~rep_ms of timed calls.
    return float(triton.testing.do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def _cpu_round_ms(fn):
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def time_interleaved(fns, device, rounds, rep_ms):
    """Time zero-argument callables ``{name: fn}`` in interleaved rounds.

    Returns ``{name: Timing or Exception}``; an implementation that raises is dropped from later rounds
    and its exception returned in place of a Timing. Every fn must already have run once (the
    correctness check), so compilation and autotuning are not timed.
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
                ms = _cuda_round_ms(fns[name], rep_ms) if device == "cuda" else _cpu_round_ms(fns[name])
            except Exception as exc:  # noqa: BLE001 - reported as ERROR in the table
                failed[name] = exc
                continue
            per_round[name].append(ms)
    out = {}
    for name in names:
        if name in failed:
            out[name] = failed[name]
        else:
            ms = per_round[name]
            out[name] = Timing(statistics.median(ms), min(ms), max(ms), ms)
    return out


def peak_memory_mb(fn, device):
    """(peak MiB allocated during one call of fn, peak minus what was allocated before the call).

    CUDA only (``torch.cuda.max_memory_allocated``); (None, None) on CPU. fn should have run once before
    (autotuning and cuBLAS workspaces are first-call allocations, not the step's cost).
    """
    if device != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    mib = 2.0**20
    return peak / mib, (peak - before) / mib

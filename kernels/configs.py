"""Tile configurations: one fixed small config under the interpreter, a shape heuristic on CUDA, and a
bounded per-bucket autotuner whose results are cached per device and shape.

Autotuning rules:
* never under the interpreter (one small config: interpreted cost grows with the program count and the
  tile size, ~0.4 ms per launch on this project's 2-core CPU machines);
* ``FUSEDAD_AUTOTUNE=0`` turns it off: the heuristic config is used as is;
* at most ``len(candidates(...))`` (≤ 6) configs are timed per (device, kernel, flags, M bucket, N, K,
  dtype), each for a few milliseconds, once per process; compiled kernels are reused across shapes, so
  a new shape in a known bucket costs timing only.
"""
import dataclasses
import os
import threading

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def launch_kwargs(self):
        return dataclasses.asdict(self)


def _pow2_clamp(n, lo, hi):
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def interpreter_config(M, N, K):
    """Small power-of-two tiles (16 … 64) that cover tiny shapes in one or few programs."""
    return TileConfig(BLOCK_M=_pow2_clamp(M, 16, 64), BLOCK_N=_pow2_clamp(N, 16, 64), BLOCK_K=_pow2_clamp(K, 16, 64),
                      GROUP_M=8, num_warps=4, num_stages=1)


def m_bucket(M):
    """Autotune bucket for the row count: powers of two from 16 up to 8192 (M ≤ 16 is one bucket)."""
    return _pow2_clamp(M, 16, 8192)


def _scale_k(cfgs, dtype):
    # The same shared-memory budget holds half the K depth at 4-byte and a quarter at 8-byte elements.
    if dtype == torch.float32:
        return [dataclasses.replace(c, BLOCK_K=max(16, c.BLOCK_K // 2)) for c in cfgs]
    return cfgs


def candidates(M, N, K, dtype):
    """The bounded config set timed for this shape bucket (first entry = the heuristic's pick).

    Every 16-bit entry compiles for sm_90 without register spills in both kernels (with the costliest
    epilogue/prologue, gelu_tanh), and fits in shared memory — checked with Triton 3.9 + ptxas and
    cuobjdump, see bench/NOTES.md; tests/test_sm90_compile.py keeps the heuristic picks spill-free.
    Dropped for spilling: 256×128 and 128×256 tiles with 8 warps, 32×64×128 and 16×·×256 backward.
    """
    if dtype == torch.float64:
        return [TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
                TileConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
                TileConfig(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)]
    if M <= 16:
        # Decode: the weight read dominates; narrow-M tiles, deep K, many N tiles to fill the SMs.
        cfgs = [TileConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=4),
                TileConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=4)]
    elif M <= 128:
        cfgs = [TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
                TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
                TileConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4)]
    else:
        cfgs = [TileConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                TileConfig(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
                TileConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
                TileConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)]
    return _scale_k(cfgs, dtype)


def tangent_candidates(M, N, K, dtype):
    """``candidates`` for the forward-mode kernel: it holds two accumulators (primal and tangent), so a
    tile keeps at most 32 fp32 accumulator values per thread each (BLOCK_M·BLOCK_N ≤ 1024·num_warps).

    Measured (sm_90 lowering, Triton 3.9 + ptxas/cuobjdump, bf16, gelu_tanh; ``python
    tests/sm90_compile.py --sweep-candidates``): 128×128 with 8 warps spills 224 B per thread, 64×128
    and 128×64 with 4 warps spill 24 / 192 B, and 64×256 needs 244 KiB of shared memory (four operand
    tiles per stage); the tiles kept here use 178–180 registers and no stack.
    """
    return [c for c in candidates(M, N, K, dtype) if c.BLOCK_M * c.BLOCK_N <= 1024 * c.num_warps]


def elementwise_candidates(M, N, K, dtype):
    """The tile of the dZ pass (elementwise over M×N, no reduction dimension: BLOCK_K is unused), used
    as is (never timed: its BLOCK_M also fixes how many db partial sums there are). 32×128 with 4 warps:
    32 elements per thread, contiguous 128-wide rows for coalesced 16-bit loads. A guess, to be checked
    against copy bandwidth on a GPU."""
    return [TileConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)]


def autotune_enabled():
    return os.environ.get("FUSEDAD_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


_CACHE = {}
# Held while a key is tuned: threads asking for the same new key wait for one timing search instead of
# running their own at once (their launches would also skew each other's timings). Hits skip it.
_TUNE_LOCK = threading.Lock()


def tuned_config(key, M, N, K, dtype, run, bench, tune=True, space=None):
    """Best of ``space(M, N, K, dtype)`` (default ``candidates``) for ``key``, timed once and cached.

    key:   hashable (device, kernel, constexpr flags, m_bucket(M), N, K, dtype)
    run:   run(cfg) launches the kernel with that config (must be idempotent: it is called repeatedly)
    bench: bench(fn) -> milliseconds (``triton.testing.do_bench`` on CUDA)
    tune:  False where nothing may be timed (inside torch.compile tracing): cache hit or heuristic.
    A config that fails to compile or launch (e.g. out of shared memory) is skipped.
    """
    cfg = _CACHE.get(key)
    if cfg is not None:
        return cfg
    cands = (space or candidates)(M, N, K, dtype)
    if not (tune and autotune_enabled()):
        return cands[0]
    with _TUNE_LOCK:
        if key in _CACHE:  # tuned by another thread while this one waited
            return _CACHE[key]
        best, best_ms = cands[0], float("inf")
        for cfg in cands:
            try:
                ms = bench(lambda cfg=cfg: run(cfg))
            except Exception:  # noqa: BLE001 - OutOfResources / compile errors: not a usable config
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _CACHE[key] = best
    return best


def launch_config(device_name, kernel_name, flags, M, N, K, dtype, run, bench, traced=False, space=None):
    """The config for one CUDA launch: ``tuned_config`` under the launch rules.

    * the key holds the device model, kernel, constexpr flags, M bucket, N, K and dtype;
    * an accumulating launch (``ACCUMULATE_DW``) is never timed — each timed run would add into the
      output again — and takes the config tuned for the same launch without accumulation, or the heuristic;
    * ``traced`` (inside a torch.compile trace) times nothing either: a cache hit or the heuristic.
    """
    accumulating = bool(flags.get("ACCUMULATE_DW", False))
    key_flags = dict(flags, ACCUMULATE_DW=False) if accumulating else flags
    key = (device_name, kernel_name, tuple(sorted(key_flags.items())), m_bucket(M), N, K, dtype)
    return tuned_config(key, M, N, K, dtype, run, bench, tune=not traced and not accumulating, space=space)


def clear_cache():
    _CACHE.clear()

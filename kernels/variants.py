"""The kernel-variant table: which kernel runs a launch, its grid, its config space and where it applies.

A launcher (``linear.py``) describes its call as a ``Problem`` and asks ``select(direction, problem)``
for the first row of that direction whose ``applies`` predicate holds. A new variant (a TMA-descriptor
forward, a persistent grid, a split-K decode path, …) is one kernel in ``gemm.py``, one row here (with a
predicate such as "contiguous, 16-byte aligned") and its tests; ``tests/sm90_compile.py`` lowers every
row for sm_90.
"""
import contextlib
import dataclasses
from typing import Callable

import triton

from . import configs
from .gemm import _dz_kernel, _linear_bwd_kernel, _linear_fwd_kernel, _linear_fwd_tangent_kernel


@dataclasses.dataclass(frozen=True)
class Problem:
    """One launch as the selector sees it. M×N is the forward's output, K its reduction length."""

    M: int
    N: int
    K: int
    dtype: object
    tensors: tuple  #: every operand and output, for layout predicates
    flags: dict  #: the launch's constexpr flags (the grid of the backward depends on them)


def _any_layout(problem):
    return True


def _forward_grid(p, cfg):
    return (triton.cdiv(p.M, cfg.BLOCK_M) * triton.cdiv(p.N, cfg.BLOCK_N),)


def _backward_grid(p, cfg):
    """dX tiles (M×K), then dW tiles (N×K) — or, for the bias alone, one row-sum program per BLOCK_M of N."""
    f = p.flags
    tiles_dx = triton.cdiv(p.M, cfg.BLOCK_M) * triton.cdiv(p.K, cfg.BLOCK_N) if f["COMPUTE_DX"] else 0
    if f["COMPUTE_DW"]:
        tiles_dw = triton.cdiv(p.N, cfg.BLOCK_M) * triton.cdiv(p.K, cfg.BLOCK_N)
    else:
        tiles_dw = triton.cdiv(p.N, cfg.BLOCK_M) if f["COMPUTE_DB"] else 0
    return (tiles_dx + tiles_dw,)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  #: recorded in each Launch and part of the autotune key
    direction: str  #: "fwd", "fwd_tangent" or "bwd"
    kernel: object  #: the ``@triton.jit`` kernel
    grid: Callable  #: grid(problem, cfg) -> (programs,)
    config_space: Callable  #: config_space(M, N, K, dtype) -> [TileConfig, ...], the heuristic's pick first
    applies: Callable  #: applies(problem) -> bool
    #: strides the JIT specialises to the constant 1 for contiguous operands (what sm90_compile mirrors)
    unit_strides: frozenset = frozenset()
    #: chosen by ``select`` when it applies; False: only when asked for with ``use`` (kept to be measured
    #: against the default, e.g. by the benchmark's backward suite)
    default: bool = True
    #: backward only: dZ (and db) come from a "dz" pass first, and this kernel runs with no activation
    dz_pass: bool = False


_BWD_UNIT_STRIDES = frozenset({"stride_dyn", "stride_xk", "stride_wk", "stride_sn", "stride_dxk", "stride_dwk",
                               "stride_db"})

VARIANTS = (
    Variant("linear_fwd", "fwd", _linear_fwd_kernel, _forward_grid, configs.candidates, _any_layout,
            frozenset({"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn"})),
    Variant("linear_fwd_tangent", "fwd_tangent", _linear_fwd_tangent_kernel, _forward_grid, configs.tangent_candidates,
            _any_layout, frozenset({"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn", "stride_xtk",
                                    "stride_wtk", "stride_bt", "stride_ytn", "stride_ztn"})),
    # The backward's default: a dZ pass, then plain GEMMs (dX and dW tiles in one grid).
    Variant("linear_bwd", "bwd", _linear_bwd_kernel, _backward_grid, configs.candidates, _any_layout,
            _BWD_UNIT_STRIDES, dz_pass=True),
    # The first design: dZ = dY ⊙ act'(Z) in every tile's operand prologue, db from the dW tiles, one
    # launch. Predicted issue-bound for the smooth activations (bench/NOTES.md): kept to be measured.
    Variant("linear_bwd_prologue", "bwd", _linear_bwd_kernel, _backward_grid, configs.candidates, _any_layout,
            _BWD_UNIT_STRIDES, default=False),
    Variant("linear_dz", "dz", _dz_kernel, _forward_grid, configs.elementwise_candidates, _any_layout,
            frozenset({"stride_dyn", "stride_sn", "stride_dzn"})),
)


_FORCED = {}  # direction -> variant name, set by ``use``


@contextlib.contextmanager
def use(name):
    """Inside the block, launches of that variant's direction run it (when it applies) instead of the
    default: for benchmarks and tests that compare variants. Not thread-local."""
    variant = by_name(name)
    before = _FORCED.get(variant.direction)
    _FORCED[variant.direction] = name
    try:
        yield variant
    finally:
        if before is None:
            _FORCED.pop(variant.direction, None)
        else:
            _FORCED[variant.direction] = before


def by_name(name):
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"fusedad: no kernel variant named {name!r}; the table has {[v.name for v in VARIANTS]}")


def select(direction, problem):
    """The variant forced by ``use`` if it applies, else the first default variant of ``direction``
    that applies to ``problem``."""
    forced = _FORCED.get(direction)
    if forced is not None:
        variant = by_name(forced)
        if variant.applies(problem):
            return variant
    for variant in VARIANTS:
        if variant.direction == direction and variant.default and variant.applies(problem):
            return variant
    raise LookupError(f"fusedad: no {direction} kernel variant applies to {problem}")

"""The kernel-variant table: which kernel runs a launch, its grid, its config space and where it applies.

A launcher (``linear.py``) describes its call as a ``Problem`` and asks ``select(direction, problem)``
for the first row of that direction whose ``applies`` predicate holds. A new variant (a TMA-descriptor
forward, a persistent grid, a split-K decode path, …) is one kernel in ``gemm.py``, one row here (with a
predicate such as "contiguous, 16-byte aligned") and its tests; ``tests/sm90_compile.py`` lowers every
row for sm_90.
"""
import dataclasses
from typing import Callable

import triton

from . import configs
from .gemm import _linear_bwd_kernel, _linear_fwd_kernel, _linear_fwd_tangent_kernel


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


VARIANTS = (
    Variant("linear_fwd", "fwd", _linear_fwd_kernel, _forward_grid, configs.candidates, _any_layout,
            frozenset({"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn"})),
    Variant("linear_fwd_tangent", "fwd_tangent", _linear_fwd_tangent_kernel, _forward_grid, configs.tangent_candidates,
            _any_layout, frozenset({"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn", "stride_xtk",
                                    "stride_wtk", "stride_bt", "stride_ytn", "stride_ztn"})),
    Variant("linear_bwd", "bwd", _linear_bwd_kernel, _backward_grid, configs.candidates, _any_layout,
            frozenset({"stride_dyn", "stride_xk", "stride_wk", "stride_sn", "stride_dxk", "stride_dwk", "stride_db"})),
)


def select(direction, problem):
    """The first variant of ``direction`` that applies to ``problem``."""
    for variant in VARIANTS:
        if variant.direction == direction and variant.applies(problem):
            return variant
    raise LookupError(f"fusedad: no {direction} kernel variant applies to {problem}")

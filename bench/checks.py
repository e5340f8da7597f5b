"""Correctness against eager, before anything is timed.

    rel_err(out, ref) = ‖out − ref‖₂ / ‖ref‖₂      (in float64; the max over all compared tensors)

Compared in the same dtype as eager. A fused kernel rounds once where eager rounds after
the GEMM and again after the activation, so the two differ by a few units of the dtype's precision:

    fp32 1e-4  — both IEEE by default (TF32 off: torch.backends.cuda.matmul.allow_tf32 = False)
    fp16 5e-3  — 2⁻¹¹ ≈ 4.9e-4 per rounding, plus K-long fp32 accumulations in a different order
    bf16 2e-2  — 2⁻⁸ ≈ 3.9e-3 per rounding; same argument
"""
import math

import torch

from fusedad.testing import rel_err  # noqa: F401 - the one definition, re-exported for the harness

TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def tolerance(dtype):
    return TOLERANCES[dtype]


def max_rel_err(outs, refs):
    """Largest ``rel_err`` over paired outputs (forward outputs, tangents, gradients)."""
    if len(outs) != len(refs):
        return math.nan
    errs = [rel_err(o, r) for o, r in zip(outs, refs)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs, default=0.0)


def passes(err, dtype):
    return not math.isnan(err) and err <= tolerance(dtype)

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

TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def tolerance(dtype):
    return TOLERANCES[dtype]


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (absolute norm when ref is all zeros); NaN if shapes differ or
    any value is not finite (so NaN never passes)."""
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else math.nan
    if out.shape != ref.shape:
        return math.nan
    o, r = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        return math.nan
    ref_norm = torch.linalg.vector_norm(r).item()
    diff = torch.linalg.vector_norm(o - r).item()
    return diff / ref_norm if ref_norm > 0 else diff


def max_rel_err(outs, refs):
    """Largest ``rel_err`` over paired outputs (forward outputs, tangents, gradients)."""
    if len(outs) != len(refs):
        return math.nan
    errs = [rel_err(o, r) for o, r in zip(outs, refs)]
    return math.nan if any(math.isnan(e) for e in errs) else max(errs, default=0.0)


def passes(err, dtype):
    return not math.isnan(err) and err <= tolerance(dtype)

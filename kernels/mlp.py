"""Launch wrappers for the MLP-block kernels (``mlp_gemm.py``): check, allocate, launch. No autograd.

Shapes (nn.Linear layout): x (M, K); w_gate, w_up, w1 (I, K); w_down (N, I); pre-activations G, U, Z₁
and H (M, I); grad_y (M, N). Any strides; outputs are fresh and contiguous unless passed in. ``act`` is
an activation-table row (``fusedad.activations.lookup``).

A packed (2I, K) gate_up weight is passed as its row halves ``w[:I]``, ``w[I:]`` (views: the kernel
reads the same storage I rows apart); its gradient is written into the halves of one (2I, K) buffer
the caller passes as ``dwg_out``/``dwu_out``.
"""
import torch
import triton

from . import configs, variants
from .linear import INTERPRETER, _alloc, _common_flags, _launch, _or, _strides


def gated_up_forward(x, w_gate, w_up, b_gate, b_up, act, store_preact, wrap=None):
    """H = act(x·w_gateᵀ + b_gate) ⊙ (x·w_upᵀ + b_up) in one kernel.

    Returns (h, g, u): h (M, I); g, u (M, I) if ``store_preact`` (what a backward reads), else None.
    """
    M, K = x.shape
    I = w_gate.shape[0]
    h = _alloc((M, I), x)
    g = _alloc((M, I), x) if store_preact else None
    u = _alloc((M, I), x) if store_preact else None
    if M == 0 or I == 0:
        return h, g, u
    tensors = (x, w_gate, w_up, b_gate, b_up, h, g, u)
    flags = dict(ACT=act.kernel_id, HAS_BG=b_gate is not None, HAS_BU=b_up is not None, STORE_PRE=store_preact,
                 **_common_flags(x.dtype, *tensors))
    args = (x, w_gate, w_up, _or(b_gate, h), _or(b_up, h), h, _or(g, h), _or(u, h), M, I, K,
            *x.stride(), *w_gate.stride(), *w_up.stride(), *_strides(b_gate, 1)[:1], *_strides(b_up, 1)[:1],
            *h.stride(), *_strides(g, 2), *_strides(u, 2))
    _launch("mlp_up", args, flags, M, I, K, x.dtype, x.device, tensors, wrap)
    return h, g, u


def _fixed_config(variant, M, N, K, dtype):
    """The down kernel's tile is fixed before launch (never timed): its BLOCK_M sets how many rows of
    bias partial sums are allocated."""
    if INTERPRETER:
        return configs.interpreter_config(M, N, K)
    return variants.heuristic_config(variant, M, N, K, dtype)


def down_backward(grad_y, w_down, g, u, act, need_pre=True, need_h=True, need_bias_pre=False,
                  need_bias_down=False, wrap=None):
    """The down projection's dX GEMM with the activation backward in its epilogue.

    grad_y: (M, N); w_down: (N, I); g: G (gated) or Z₁ (plain), (M, I); u: U (M, I) or None (plain).
    Returns (dg, du, h, db_pre, db_up, db_down): dG or dZ₁ and dU (M, I) if ``need_pre``; H (M, I) if
    ``need_h``; db_pre = Σ_m dG (dZ₁), db_up = Σ_m dU (I,) if ``need_bias_pre``; db_down = Σ_m dY (N,)
    if ``need_bias_down``. Bias sums: fp32 (fp64) partials per row block, added here in a fixed order.
    """
    M, N = grad_y.shape
    I = g.shape[1]
    gated = u is not None
    need_bias_pre = need_bias_pre and need_pre
    dg = _alloc((M, I), g) if need_pre else None
    du = _alloc((M, I), g) if need_pre and gated else None
    h = _alloc((M, I), g) if need_h else None
    db_pre = _alloc((I,), g) if need_bias_pre else None
    db_up = _alloc((I,), g) if need_bias_pre and gated else None
    db_down = _alloc((N,), g) if need_bias_down else None
    if M == 0 or (I == 0 and not need_bias_down):
        for t in (db_pre, db_up, db_down):
            if t is not None:
                t.zero_()
        return dg, du, h, db_pre, db_up, db_down
    flags = dict(ACT=act.kernel_id, GATED=gated, COMPUTE_DPRE=need_pre and N > 0, STORE_H=need_h,
                 BIAS_PRE=need_bias_pre, BIAS_DOWN=need_bias_down)
    if need_pre and N == 0:  # an empty reduction: dH = 0
        dg.zero_()
        if du is not None:
            du.zero_()
    tensors = (grad_y, w_down, g, u, dg, du, h)
    flags.update(_common_flags(g.dtype, *tensors))
    problem = variants.Problem(M, I, N, g.dtype, tensors, flags)
    variant = variants.select("mlp_down_bwd", problem)
    cfg = _fixed_config(variant, M, I, N, g.dtype)
    acc_dtype = torch.float64 if flags["FP64"] else torch.float32
    rows = triton.cdiv(M, cfg.BLOCK_M)
    # One row stride serves every partial buffer (the kernel takes one): each is max(I, N) wide.
    width = max(I, N)
    parts = [torch.empty((rows, width), dtype=acc_dtype, device=g.device) if want else None
             for want in (need_bias_pre, need_bias_pre and gated, need_bias_down)]
    ref = g
    args = (grad_y, _or(w_down, ref), g, _or(u, g), _or(dg, ref), _or(du, ref), _or(h, ref),
            _or(parts[0], ref), _or(parts[1], ref), _or(parts[2], ref), M, I, N,
            *grad_y.stride(), *_strides(w_down, 2), *g.stride(), *_strides(u, 2), *_strides(dg, 2), *_strides(du, 2),
            *_strides(h, 2), width)
    _launch("mlp_down_bwd", args, flags, M, I, N, g.dtype, g.device, tensors, wrap, variant, cfg)
    # Fixed-order sums of the partials (row blocks 0, 1, …): deterministic, no atomics.
    for out, part, n in ((db_pre, parts[0], I), (db_up, parts[1], I), (db_down, parts[2], N)):
        if out is not None:
            out.copy_(part[:, :n].sum(0))
    return dg, du, h, db_pre, db_up, db_down


def gated_dual_backward(dg, du, x, w_gate, w_up, need_x=True, need_gate=True, need_up=True,
                        dwg_out=None, dwu_out=None, accumulate=False, wrap=None):
    """dX = dG·W_g + dU·W_u,  dW_g = dGᵀ·X,  dW_u = dUᵀ·X in one launch.

    dg, du: (M, I); x: (M, K) (None if no weight gradient); w_gate, w_up: (I, K) (None if not need_x).
    dwg_out / dwu_out: (I, K) buffers to write (or, with ``accumulate``, add: fp32 ``main_grad``) the
    weight gradients into. Returns (dx | None, dwg | None, dwu | None).
    """
    M, I = dg.shape
    ref = x if x is not None else w_gate
    K = ref.shape[1]
    dx = _alloc((M, K), dg) if need_x else None
    dwg = (dwg_out if dwg_out is not None else _alloc((I, K), dg)) if need_gate else None
    dwu = (dwu_out if dwu_out is not None else _alloc((I, K), dg)) if need_up else None
    compute_dx = need_x and M > 0 and K > 0
    compute_dwg = need_gate and I > 0 and K > 0
    compute_dwu = need_up and I > 0 and K > 0
    if I == 0 or M == 0:  # an empty reduction: zero gradients (nothing to add into main_grad)
        for t in (dx, *(() if accumulate else (dwg, dwu))):
            if t is not None:
                t.zero_()
        return dx, dwg, dwu
    if not (compute_dx or compute_dwg or compute_dwu):
        return dx, dwg, dwu
    tensors = (dg, du, x, w_gate, w_up, dx, dwg, dwu)
    flags = dict(COMPUTE_DX=compute_dx, COMPUTE_DWG=compute_dwg, COMPUTE_DWU=compute_dwu,
                 ACCUMULATE_DW=accumulate and (compute_dwg or compute_dwu), **_common_flags(dg.dtype, *tensors))
    args = (dg, du, _or(x, dg), _or(w_gate, dg), _or(w_up, dg), _or(dx, dg), _or(dwg, dg), _or(dwu, dg), M, I, K,
            *dg.stride(), *du.stride(), *_strides(x, 2), *_strides(w_gate, 2), *_strides(w_up, 2),
            *_strides(dx, 2), *_strides(dwg, 2), *_strides(dwu, 2))
    _launch("mlp_dual_bwd", args, flags, M, I, K, dg.dtype, dg.device, tensors, wrap)
    return dx, dwg, dwu

"""Fused linear + cross-entropy (the LM head) on the shared GEMM tile body: the logits never exist in memory.

Shapes: x (M, K), weight (V, K) (nn.Linear layout), bias (V,), target (M,) int, class_weight (V,).

Forward, ``_lce_fwd_kernel`` — one program per BLOCK_M rows, looping over the V blocks: each logits tile
``Z = X·Wᵀ + b`` (optionally soft-capped, ``z ← c·tanh(z/c)``) comes from ``_gemm_tile`` in fp32 (fp64 for
fp64) registers and is folded into per-row statistics, written as three O(M) vectors:

    lse[m]  = log Σ_v exp(z[m, v])               (online max / sum of exponentials)
    zt[m]   = z[m, target[m]]                    (0 when target[m] is no class: an ignored row)
    zsum[m] = Σ_v cw[v]·z[m, v]                  (only when label smoothing needs it; cw = 1 without weights)

Every loss fusedad builds (class weights, ignore_index, label smoothing, z-loss, any reduction) is an O(M)
function of these three, computed with ordinary torch ops in ``fusedad/cross_entropy.py``; its autograd
gives per-row coefficients (g_lse, g_zt, g_zsum) = ∂loss/∂(lse, zt, zsum), and the backward kernels form

    dZ[m, v] = (g_lse[m]·softmax(z)[m, v] + g_zt[m]·[v = target[m]] + g_zsum[m]·cw[v]) · cap'(z)

in registers (cap'(z) = 1 − tanh² with a softcap, else 1), from a recomputed logits tile:

* ``_lce_dx_kernel``: one program per (BLOCK_M rows, BLOCK_KO columns of dX), looping over the V blocks:
  dX[rows, cols] = Σ_v dZ[rows, v]·W[v, cols] in an fp32 accumulator, fixed order.
* ``_lce_dw_kernel``: one program per (BLOCK_N classes, BLOCK_KO columns of dW), looping over the M blocks:
  dW[classes, cols] = Σ_m dZ[m, classes]ᵀ·X[m, cols]; the programs of the first column block also sum dZ
  over the rows for db. Fixed order, no atomics: the result is bit-for-bit reproducible.

Recompute cost: every dX program recomputes its full-K logits tiles, so the dX pass costs ⌈K/BLOCK_KO⌉
forward GEMMs (2·M·V·K flops each) plus one GEMM for dX itself, and the dW pass the same again:
at K=4096, BLOCK_KO=128 that is 32 + 32 logits recomputations (≈ 66× the forward's flops in all). This
is the price of O(M) extra memory with no atomics and no dZ buffer; see README ("LM head") for the cheaper
designs not built yet. The target is never used as an address (only compared with class indices), so an
out-of-range target cannot make a kernel read or write out of bounds; the launchers reject it anyway.
"""
import torch
import triton
import triton.language as tl

from . import linear as _linear
from .activations import ACT_NONE, _tanh
from .gemm import _cast, _gemm_tile, _tile_offsets
from .linear import INTERPRETER, Launch, dot_precision, needs_int64


@triton.jit
def _lce_logits(acc, b_ptr, pid_n, V, stride_b, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                INT64: tl.constexpr, BLOCK_N: tl.constexpr):
    """The logits tile from the GEMM accumulator: (z, tanh(raw/c) or z, offs_n, mask_n)."""
    _unused, offs_n = _tile_offsets(pid_n, pid_n, 1, BLOCK_N, INT64)
    mask_n = offs_n < V
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    th = z
    if SOFTCAP:
        th = _tanh(z / softcap)
        z = softcap * th
    return z, th, offs_n, mask_n


@triton.jit
def _lce_fwd_kernel(
    x_ptr, w_ptr, b_ptr, cw_ptr, t_ptr, lse_ptr, zt_ptr, zs_ptr,
    M, V, K, softcap,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw, stride_t,
    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SUM_Z: tl.constexpr, SOFTCAP: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """lse, zt, zsum (M,) for BLOCK_M rows, over all V classes."""
    pid_m = tl.program_id(0)
    offs_m, _unused = _tile_offsets(pid_m, pid_m, BLOCK_M, 1, INT64)
    mask_m = offs_m < M
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1)
    if FP64:
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float64)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_i = tl.zeros((BLOCK_M,), m_i.dtype)
    zt = tl.zeros((BLOCK_M,), m_i.dtype)
    zs = tl.zeros((BLOCK_M,), m_i.dtype)
    for n in range(0, tl.cdiv(V, BLOCK_N)):
        pid_n = pid_m * 0 + n  # a tensor under the interpreter as on the GPU (_tile_offsets casts it)
        acc, _unused_t, _unused_rowsum = _gemm_tile(
            x_ptr, w_ptr, x_ptr, x_ptr, w_ptr,
            pid_m, pid_n, M, V, K,
            stride_xm, stride_xk, stride_wk, stride_wn, 0, 0, 0, 0, 0, 0,
            PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
            FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        z, _th, offs_n, mask_n = _lce_logits(acc, b_ptr, pid_n, V, stride_b, softcap, HAS_BIAS=HAS_BIAS,
                                             SOFTCAP=SOFTCAP, INT64=INT64, BLOCK_N=BLOCK_N)
        zm = tl.where(mask_n[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(zm, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m_i = m_new
        zt += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z, 0.0), axis=1)
        if SUM_Z:
            if HAS_CW:
                cw = tl.load(cw_ptr + offs_n * stride_cw, mask=mask_n, other=0.0).to(z.dtype)
                zs += tl.sum(tl.where(mask_n[None, :], z * cw[None, :], 0.0), axis=1)
            else:
                zs += tl.sum(tl.where(mask_n[None, :], z, 0.0), axis=1)
    tl.store(lse_ptr + offs_m, m_i + tl.log(s_i), mask=mask_m)
    tl.store(zt_ptr + offs_m, zt, mask=mask_m)
    if SUM_Z:
        tl.store(zs_ptr + offs_m, zs, mask=mask_m)


@triton.jit
def _lce_dz(x_ptr, w_ptr, b_ptr, cw_ptr, pid_m, pid_n, M, V, K, softcap,
            tgt, lse, g_lse, g_zt, g_zs,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw,
            HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_GZS: tl.constexpr, SOFTCAP: tl.constexpr,
            FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute one logits tile and form dZ in registers (zero outside the matrix): (dz, offs_n, mask_n)."""
    acc, _unused_t, _unused_rowsum = _gemm_tile(
        x_ptr, w_ptr, x_ptr, x_ptr, w_ptr,
        pid_m, pid_n, M, V, K,
        stride_xm, stride_xk, stride_wk, stride_wn, 0, 0, 0, 0, 0, 0,
        PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
        FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    z, th, offs_n, mask_n = _lce_logits(acc, b_ptr, pid_n, V, stride_b, softcap, HAS_BIAS=HAS_BIAS,
                                        SOFTCAP=SOFTCAP, INT64=INT64, BLOCK_N=BLOCK_N)
    p = tl.exp(z - lse[:, None])
    dz = g_lse[:, None] * p + tl.where(offs_n[None, :] == tgt[:, None], g_zt[:, None], 0.0)
    if HAS_GZS:
        if HAS_CW:
            cw = tl.load(cw_ptr + offs_n * stride_cw, mask=mask_n, other=0.0).to(z.dtype)
            dz += g_zs[:, None] * cw[None, :]
        else:
            dz += g_zs[:, None]
    if SOFTCAP:
        dz = dz * (1.0 - th * th)
    offs_m, _unused = _tile_offsets(pid_m, pid_m, BLOCK_M, 1, INT64)
    dz = tl.where((offs_m < M)[:, None] & mask_n[None, :], dz, 0.0)
    return dz, offs_n, mask_n


@triton.jit
def _load_rows(t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, offs_m, mask_m, stride_t, dtype: tl.constexpr,
               HAS_GZS: tl.constexpr):
    tgt = tl.load(t_ptr + offs_m * stride_t, mask=mask_m, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0).to(dtype)
    g_lse = tl.load(glse_ptr + offs_m, mask=mask_m, other=0.0).to(dtype)
    g_zt = tl.load(gzt_ptr + offs_m, mask=mask_m, other=0.0).to(dtype)
    if HAS_GZS:
        g_zs = tl.load(gzs_ptr + offs_m, mask=mask_m, other=0.0).to(dtype)
    else:
        g_zs = g_zt
    return tgt, lse, g_lse, g_zt, g_zs


@triton.jit
def _lce_dx_kernel(
    x_ptr, w_ptr, b_ptr, cw_ptr, t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, dx_ptr,
    M, V, K, softcap,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw, stride_t, stride_dxm, stride_dxk,
    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_GZS: tl.constexpr, SOFTCAP: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr,
):
    """dX[rows, cols] = Σ over V blocks of dZ·W[:, cols] (dZ recomputed per V block)."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_KO)
    pid_m = pid // num_k
    pid_k = pid % num_k
    offs_m, offs_ko = _tile_offsets(pid_m, pid_k, BLOCK_M, BLOCK_KO, INT64)
    mask_m = offs_m < M
    mask_ko = offs_ko < K
    if FP64:
        acc_dx = tl.zeros((BLOCK_M, BLOCK_KO), tl.float64)
    else:
        acc_dx = tl.zeros((BLOCK_M, BLOCK_KO), tl.float32)
    tgt, lse, g_lse, g_zt, g_zs = _load_rows(t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, offs_m, mask_m, stride_t,
                                             acc_dx.dtype, HAS_GZS)
    for n in range(0, tl.cdiv(V, BLOCK_N)):
        pid_n = pid * 0 + n
        dz, offs_n, mask_n = _lce_dz(
            x_ptr, w_ptr, b_ptr, cw_ptr, pid_m, pid_n, M, V, K, softcap, tgt, lse, g_lse, g_zt, g_zs,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw,
            HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW, HAS_GZS=HAS_GZS, SOFTCAP=SOFTCAP, FP64=FP64,
            EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_ko[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_ko[None, :], other=0.0)
        # dZ enters the product in the operand dtype, as eager's dZ tensor would.
        a = _cast(dz, w.dtype, EMULATE_BF16)
        if EMULATE_BF16:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc_dx = tl.dot(a, w, acc_dx, input_precision=PRECISION, out_dtype=acc_dx.dtype)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_ko[None, :] * stride_dxk,
             _cast(acc_dx, dx_ptr.dtype.element_ty, EMULATE_BF16), mask=mask_m[:, None] & mask_ko[None, :])


@triton.jit
def _lce_dw_kernel(
    x_ptr, w_ptr, b_ptr, cw_ptr, t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, dw_ptr, db_ptr,
    M, V, K, softcap,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw, stride_t, stride_dwn, stride_dwk,
    stride_db,
    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_GZS: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KO: tl.constexpr,
):
    """dW[classes, cols] = Σ over M blocks of dZᵀ·X[:, cols]; db[classes] = Σ_m dZ (first column block).

    Without COMPUTE_DW there is one program per class block, computing db only."""
    pid = tl.program_id(0)
    if COMPUTE_DW:
        num_k = tl.cdiv(K, BLOCK_KO)
    else:
        num_k = 1
    pid_n = pid // num_k
    pid_k = pid % num_k
    _unused, offs_ko = _tile_offsets(pid_n, pid_k, 1, BLOCK_KO, INT64)
    mask_ko = offs_ko < K
    if FP64:
        acc_dw = tl.zeros((BLOCK_N, BLOCK_KO), tl.float64)
    else:
        acc_dw = tl.zeros((BLOCK_N, BLOCK_KO), tl.float32)
    acc_db = tl.zeros((BLOCK_N,), acc_dw.dtype)
    for mb in range(0, tl.cdiv(M, BLOCK_M)):
        pid_m = pid * 0 + mb
        offs_m, _unused = _tile_offsets(pid_m, pid_m, BLOCK_M, 1, INT64)
        mask_m = offs_m < M
        tgt, lse, g_lse, g_zt, g_zs = _load_rows(t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, offs_m, mask_m,
                                                 stride_t, acc_dw.dtype, HAS_GZS)
        dz, offs_n, mask_n = _lce_dz(
            x_ptr, w_ptr, b_ptr, cw_ptr, pid_m, pid_n, M, V, K, softcap, tgt, lse, g_lse, g_zt, g_zs,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw,
            HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW, HAS_GZS=HAS_GZS, SOFTCAP=SOFTCAP, FP64=FP64,
            EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        if COMPUTE_DB:
            acc_db += tl.sum(dz, axis=0)
        if COMPUTE_DW:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_ko[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_ko[None, :], other=0.0)
            a = _cast(dz, x.dtype, EMULATE_BF16)
            if EMULATE_BF16:
                a = a.to(tl.float32)
                x = x.to(tl.float32)
            acc_dw = tl.dot(tl.trans(a), x, acc_dw, input_precision=PRECISION, out_dtype=acc_dw.dtype)
    _unused2, offs_n = _tile_offsets(pid_n, pid_n, 1, BLOCK_N, INT64)
    mask_n = offs_n < V
    if COMPUTE_DW:
        tl.store(dw_ptr + offs_n[:, None] * stride_dwn + offs_ko[None, :] * stride_dwk,
                 _cast(acc_dw, dw_ptr.dtype.element_ty, EMULATE_BF16), mask=mask_n[:, None] & mask_ko[None, :])
    if COMPUTE_DB:
        tl.store(db_ptr + offs_n * stride_db, _cast(acc_db, db_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=mask_n & ((offs_n * 0 + pid_k) == 0))


# --------------------------------------------------------------------------------------------- launchers

def _config(dtype):
    """Tiles: small ones under the interpreter (tests: V spans several tiles); untuned guesses on a GPU."""
    if INTERPRETER:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_KO=16, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, BLOCK_KO=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_KO=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_KO=128, num_warps=8, num_stages=3)


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(name, kernel, grid, args, flags, device, wrap):
    """Record the launch (``record_launches``) and run it (serialised under the interpreter)."""
    for log in _linear._RECORDERS:
        log.append(Launch(name, grid, dict(flags), args))
    if grid[0] == 0:
        return
    launcher = kernel if wrap is None else wrap(kernel)
    if INTERPRETER:
        with _linear._INTERPRETER_LOCK:
            launcher[grid](*args, **flags)
    else:
        with torch.cuda.device(device):
            launcher[grid](*args, **flags)


def check_target(target, num_classes, ignore_index):
    """Raise IndexError for a target that is neither a class index in [0, V) nor ``ignore_index``.

    Reads the target on the host (a device sync on CUDA): skipped while torch.compile traces (the kernels
    never use a target as an address, so a bad one gives a wrong loss there, never an illegal access)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"fusedad.linear_cross_entropy: target {value} is out of bounds for {num_classes} classes "
                         f"(targets must be in [0, {num_classes - 1}] or equal ignore_index={ignore_index})")


def _common(x, *tensors):
    return dict(FP64=x.dtype == torch.float64, EMULATE_BF16=INTERPRETER and x.dtype == torch.bfloat16,
                PRECISION=dot_precision(x.dtype), INT64=needs_int64(x, *tensors))


def lce_forward(x, weight, bias, target, class_weight, softcap, sum_logits, wrap=None):
    """Per-row (lse, zt, zsum) of the logits ``softcap(x·weightᵀ + bias)`` without materialising them.

    x (M, K), weight (V, K), bias (V,) | None, target (M,) integer, class_weight (V,) | None, softcap: float
    (0 = none), sum_logits: also return zsum = Σ_v class_weight[v]·z[:, v] (else None). Outputs are float32
    (float64 for float64 inputs), (M,).
    """
    M, K = x.shape
    V = weight.shape[0]
    sd = _stat_dtype(x.dtype)
    lse = _linear._alloc((M,), x, sd)
    zt = _linear._alloc((M,), x, sd)
    zs = _linear._alloc((M,), x, sd) if sum_logits else None
    if M == 0:
        return lse, zt, zs
    cfg = _config(x.dtype)
    flags = dict(HAS_BIAS=bias is not None, HAS_CW=class_weight is not None, SUM_Z=sum_logits,
                 SOFTCAP=bool(softcap), **_common(x, weight),
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    args = (x, weight, _or(bias, x), _or(class_weight, x), target, lse, zt, _or(zs, lse),
            M, V, K, float(softcap or 1.0),
            *x.stride(), *weight.stride(), _stride(bias), _stride(class_weight), target.stride(0))
    _run("lce_fwd", _lce_fwd_kernel, (triton.cdiv(M, cfg["BLOCK_M"]),), args, flags, x.device, wrap)
    return lse, zt, zs


def lce_backward(x, weight, bias, target, class_weight, softcap, lse, g_lse, g_zt, g_zsum,
                 need_x, need_weight, need_bias, wrap=None):
    """(dx (M, K) | None, dw (V, K) | None, db (V,) | None) of Σ_m g_lse·lse + g_zt·zt + g_zsum·zsum.

    g_lse, g_zt (M,), g_zsum (M,) | None: the per-row gradients of the loss (stat dtype). Only the requested
    gradients are launched: need_x → the dX kernel; need_weight or need_bias → the dW kernel (db only when
    the weight is frozen). Deterministic: fixed-order reductions, no atomics.
    """
    M, K = x.shape
    V = weight.shape[0]
    dx = _linear._alloc((M, K), x) if need_x else None
    dw = _linear._alloc((V, K), weight) if need_weight else None
    db = _linear._alloc((V,), bias) if need_bias else None
    if M == 0:  # nothing flows back (K == 0 needs no special case: the tiles' K loop is empty)
        for t in (dx, dw, db):
            if t is not None:
                t.zero_()
        return dx, dw, db
    cfg = _config(x.dtype)
    common = _common(x, weight, dx, dw)
    rows = (target, lse, g_lse, g_zt, _or(g_zsum, g_zt))
    shared = dict(HAS_BIAS=bias is not None, HAS_CW=class_weight is not None, HAS_GZS=g_zsum is not None,
                  SOFTCAP=bool(softcap), **common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], BLOCK_KO=cfg["BLOCK_KO"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    head = (x, weight, _or(bias, x), _or(class_weight, x), *rows)
    strides = (*x.stride(), *weight.stride(), _stride(bias), _stride(class_weight), target.stride(0))
    cap = float(softcap or 1.0)
    if need_x and K > 0:
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_KO"]),)
        _run("lce_dx", _lce_dx_kernel, grid, (*head, dx, M, V, K, cap, *strides, *dx.stride()), shared,
             x.device, wrap)
    if (need_weight and K > 0) or need_bias:
        compute_dw = need_weight and K > 0
        grid = (triton.cdiv(V, cfg["BLOCK_N"]) * (triton.cdiv(K, cfg["BLOCK_KO"]) if compute_dw else 1),)
        flags = dict(shared, COMPUTE_DW=compute_dw, COMPUTE_DB=need_bias)
        _run("lce_dw", _lce_dw_kernel, grid,
             (*head, _or(dw, x), _or(db, x), M, V, K, cap, *strides, *(_strides2(dw)), _stride(db)), flags,
             x.device, wrap)
    return dx, dw, db


def _or(t, default):
    return t if t is not None else default


def _stride(t):
    return t.stride(0) if t is not None else 0


def _strides2(t):
    return tuple(t.stride()) if t is not None else (0, 0)


__all__ = ["lce_forward", "lce_backward", "check_target"]

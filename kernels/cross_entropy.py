"""Fused linear + cross-entropy (the LM head) on the shared GEMM tile body: the logits never exist in memory.

Shapes: x (M, K), weight (V, K) (nn.Linear layout), bias (V,), target (M,) int, class_weight (V,).

Forward, ``_lce_fwd_kernel`` — one program per (BLOCK_M rows, split of the class tiles), looping over its
class tiles (``split_count`` splits: two waves of programs even when M is small): each logits tile
``Z = X·Wᵀ + b`` (optionally soft-capped, ``z ← c·tanh(z/c)``) comes from ``_gemm_tile`` in fp32 (fp64 for
fp64) registers and is folded into per-row statistics, written as three O(M) vectors:

    lse[m]  = log Σ_v exp(z[m, v])               (online max / sum of exponentials)
    zt[m]   = z[m, target[m]]                    (0 when target[m] is no class: an ignored row)
    zsum[m] = Σ_v cw[v]·z[m, v]                  (only when label smoothing needs it; cw = 1 without weights)

(per split; the launcher combines the splits' values with logsumexp / sum, in a fixed order).

Every loss fusedad builds (class weights, ignore_index, label smoothing, z-loss, any reduction) is an O(M)
function of these three, computed with ordinary torch ops in ``fusedad/cross_entropy.py``; its autograd
gives per-row coefficients (g_lse, g_zt, g_zsum) = ∂loss/∂(lse, zt, zsum), and the backward kernels form

    dZ[m, v] = (g_lse[m]·softmax(z)[m, v] + g_zt[m]·[v = target[m]] + g_zsum[m]·cw[v]) · cap'(z)

in registers (cap'(z) = 1 − tanh² with a softcap, else 1), from a recomputed logits tile. The backward
runs over chunks of C classes (``chunk_classes``: C·M·2 bytes ≈ 128 MiB, at least 4096 classes), in order:

* ``_lce_dz_kernel``: each logits tile of the chunk is recomputed once (full K) and dZ[:, chunk] is written
  in the operand dtype into one (M, C) buffer that every chunk reuses; db's per-row-tile partial sums too.
* ``linear_backward``'s GEMM launch (the linear layer's own backward, no activation): dW[chunk] = dZᵀ·X,
  complete, and dX += dZ·W[chunk] into an fp32 accumulator (the GEMM's accumulate epilogue).

Work: one recomputed logits GEMM + dX + dW, 3 × 2·M·V·K flops, as eager's backward plus its forward; extra
memory O(M): the (M, C) dZ chunk and dX's fp32 accumulator (besides the O(M) statistics). Every sum has a
fixed order and there are no atomics: the gradients are bit-for-bit reproducible.
The target is never used as an address (only compared with class indices), so an
out-of-range target cannot make a kernel read or write out of bounds; the launchers reject it anyway.
"""
import torch
import triton
import triton.language as tl

from . import linear as _linear
from .activations import ACT_NONE, _tanh, _tanh_accurate
from .gemm import _gemm_tile, _store_tile, _tile_coords, _tile_offsets
from .linear import INTERPRETER, Launch, dot_precision, linear_backward, needs_int64


@triton.jit
def _lce_logits(x_ptr, w_ptr, b_ptr, pid_m, pid_n, M, V, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_b,
                softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FP64: tl.constexpr,
                EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One logits tile, Z = X·Wᵀ + b over the full K with the shared tile body, then soft-capped:
    (z, tanh(raw/c) (z without a softcap), offs_n, mask_n), z in fp32 (fp64 for fp64)."""
    acc, _unused_t, _unused_rowsum = _gemm_tile(
        x_ptr, w_ptr, x_ptr, x_ptr, w_ptr,
        pid_m, pid_n, M, V, K,
        stride_xm, stride_xk, stride_wk, stride_wn, 0, 0, 0, 0, 0, 0,
        PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
        FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    _unused, offs_n = _tile_offsets(pid_n, pid_n, 1, BLOCK_N, INT64)
    mask_n = offs_n < V
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    th = z
    if SOFTCAP:
        if x_ptr.dtype.element_ty == tl.bfloat16 or x_ptr.dtype.element_ty == tl.float16:
            # 16-bit operands: the short tanh. Its absolute error, ~c·2⁻²⁴ on an fp32 logit, is far below
            # the operands' own rounding, and the accurate one makes the bf16 forward spill on sm_90
            # (tests/lce_sm90_compile.py: 255 registers + 8 B of stack, 120 B with int64 offsets; 243 / 250
            # registers and no stack with this one).
            th = _tanh(z / softcap)
        else:
            th = _tanh_accurate(z / softcap)
        z = softcap * th
    return z, th, offs_n, mask_n


@triton.jit
def _lce_fwd_kernel(
    x_ptr, w_ptr, b_ptr, cw_ptr, t_ptr, lse_ptr, zt_ptr, zs_ptr,
    M, V, K, softcap, blocks_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw, stride_t, stride_split,
    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SUM_Z: tl.constexpr, SOFTCAP: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """lse, zt, zsum of BLOCK_M rows over the class tiles [s·blocks_per_split, (s+1)·blocks_per_split) of
    split s = program_id(1), stored at row s of (splits, M) outputs (row stride ``stride_split``)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
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
    first = split * blocks_per_split
    for n in range(first, tl.minimum(first + blocks_per_split, tl.cdiv(V, BLOCK_N))):
        pid_n = pid_m * 0 + n  # a tensor under the interpreter as on the GPU (_tile_offsets casts it)
        z, _th, offs_n, mask_n = _lce_logits(
            x_ptr, w_ptr, b_ptr, pid_m, pid_n, M, V, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_b, softcap,
            HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP, FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION,
            INT64=INT64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
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
    out = split * stride_split + offs_m
    tl.store(lse_ptr + out, m_i + tl.log(s_i), mask=mask_m)
    tl.store(zt_ptr + out, zt, mask=mask_m)
    if SUM_Z:
        tl.store(zs_ptr + out, zs, mask=mask_m)


@triton.jit
def _lce_dz(x_ptr, w_ptr, b_ptr, cw_ptr, pid_m, pid_n, M, V, K, softcap,
            tgt, lse, g_lse, g_zt, g_zs,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw,
            HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_GZS: tl.constexpr, SOFTCAP: tl.constexpr,
            FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute one logits tile and form dZ in registers (zero outside the matrix): (dz, offs_n, mask_n)."""
    z, th, offs_n, mask_n = _lce_logits(
        x_ptr, w_ptr, b_ptr, pid_m, pid_n, M, V, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_b, softcap,
        HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP, FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION,
        INT64=INT64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
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
def _lce_dz_kernel(
    x_ptr, w_ptr, b_ptr, cw_ptr, t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, dz_ptr, dbp_ptr,
    M, V, K, col0, softcap,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw, stride_t, stride_dzm, stride_dzn, stride_dbpm,
    HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_GZS: tl.constexpr, SOFTCAP: tl.constexpr,
    WRITE_DZ: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dZ for one chunk of V classes (columns col0 … col0 + V of the logits; w, b, cw point at the chunk):
    each (BLOCK_M × BLOCK_N) logits tile is recomputed once, over the full K, in grouped tile order.

    dz: (M, V) in the operand dtype (WRITE_DZ);  dbp: (cdiv(M, BLOCK_M), V) fp32 (fp64 for fp64) partial
    column sums of dZ per row tile (COMPUTE_DB), which the launcher adds in a fixed order.
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, V, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, _unused = _tile_offsets(pid_m, pid_m, BLOCK_M, 1, INT64)
    mask_m = offs_m < M
    if FP64:
        stat = tl.zeros((1,), tl.float64)
    else:
        stat = tl.zeros((1,), tl.float32)
    tgt, lse, g_lse, g_zt, g_zs = _load_rows(t_ptr, lse_ptr, glse_ptr, gzt_ptr, gzs_ptr, offs_m, mask_m, stride_t,
                                             stat.dtype, HAS_GZS)
    # The chunk's class v is class col0 + v of the full head: shift the target into the chunk's frame
    # (an ignored row's target then matches no column, as before).
    dz, offs_n, mask_n = _lce_dz(
        x_ptr, w_ptr, b_ptr, cw_ptr, pid_m, pid_n, M, V, K, softcap, tgt - col0, lse, g_lse, g_zt, g_zs,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_cw,
        HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW, HAS_GZS=HAS_GZS, SOFTCAP=SOFTCAP, FP64=FP64,
        EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if WRITE_DZ:
        # dZ enters the dX/dW products in the operand dtype, as eager's dZ tensor would.
        _store_tile(dz_ptr, offs_m, offs_n, stride_dzm, stride_dzn, dz, mask_m[:, None] & mask_n[None, :],
                    EMULATE_BF16)
    if COMPUTE_DB:
        # dz is zero outside the matrix: padded rows add nothing.
        tl.store(dbp_ptr + pid_m * stride_dbpm + offs_n, tl.sum(dz, axis=0), mask=mask_n)


# --------------------------------------------------------------------------------------------- launchers

def _config(dtype):
    """Tiles: small ones under the interpreter (tests: V spans several tiles); untuned guesses on a GPU
    (the forward's and the dZ pass's logits tiles; dX and dW are ``linear_backward``'s GEMMs)."""
    if INTERPRETER:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


#: The dZ chunk of the backward holds at most this many bytes, or MIN_CHUNK_CLASSES columns if that is more:
#: extra memory O(M), independent of V (module attributes, so tests can force many chunks).
CHUNK_BYTES = 1 << 27
MIN_CHUNK_CLASSES = 4096


def chunk_classes(M, V, itemsize, block_n):
    """Classes per backward chunk: max(MIN_CHUNK_CLASSES, CHUNK_BYTES / (M·itemsize)), a multiple of block_n,
    at most V. Each chunk's dX product adds an fp32 (M, K) read-modify-write, so a chunk should be wide:
    at K=4096, 8192 classes make that traffic ≈ 10% of the chunk's dX GEMM time on an H100 (bench/NOTES.md)."""
    cols = max(MIN_CHUNK_CLASSES, CHUNK_BYTES // max(M * itemsize, 1))
    return min(V, max(block_n, cols // block_n * block_n))


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
    cfg = _config(x.dtype)
    row_tiles, class_tiles = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_N"])
    per_split = triton.cdiv(class_tiles, split_count(row_tiles, class_tiles, x.device))
    splits = max(1, triton.cdiv(class_tiles, max(per_split, 1)))
    parts = [_linear._alloc((splits, M), x, sd) for _ in range(3 if sum_logits else 2)]
    if M > 0:
        flags = dict(HAS_BIAS=bias is not None, HAS_CW=class_weight is not None, SUM_Z=sum_logits,
                     SOFTCAP=bool(softcap), **_common(x, weight, bias, class_weight, target, *parts),
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        args = (x, weight, _or(bias, x), _or(class_weight, x), target, parts[0], parts[1], parts[-1],
                M, V, K, float(softcap or 1.0), per_split,
                *x.stride(), *weight.stride(), _stride(bias), _stride(class_weight), target.stride(0), M)
        _run("lce_fwd", _lce_fwd_kernel, (row_tiles, splits), args, flags, x.device, wrap)
    if splits == 1:
        return parts[0][0], parts[1][0], parts[2][0] if sum_logits else None
    # The splits' statistics combine in a fixed order (torch's reductions use no atomics).
    return (torch.logsumexp(parts[0], 0), parts[1].sum(0), parts[2].sum(0) if sum_logits else None)


def split_count(row_tiles, class_tiles, device):
    """Class splits of the forward: enough programs for two waves (row tiles × splits ≥ 2 × SMs; 132 SMs,
    an H100's, off CUDA), at most one per class tile. bf16 on an H100 (128-row tiles): M=8192 gives 5 splits,
    M=256 gives 132."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(class_tiles, triton.cdiv(2 * sms, max(row_tiles, 1))))


def lce_backward(x, weight, bias, target, class_weight, softcap, lse, g_lse, g_zt, g_zsum,
                 need_x, need_weight, need_bias, wrap=None):
    """(dx (M, K) | None, dw (V, K) | None, db (V,) | None) of Σ_m g_lse·lse + g_zt·zt + g_zsum·zsum.

    g_lse, g_zt (M,), g_zsum (M,) | None: the per-row gradients of the loss (stat dtype).

    Over chunks of ``chunk_classes`` classes [v0, v1), in order: ``_lce_dz_kernel`` recomputes each logits
    tile of the chunk once and writes dZ[:, v0:v1] (M × chunk, operand dtype) and db's partial sums; then
    ``linear_backward``'s GEMMs (one launch) give dW[v0:v1] = dZᵀ·X, complete, and add dZ·W[v0:v1] into an
    fp32 dX (dX's own buffer when it is fp32/fp64). The dZ buffer is reused by every chunk. Work: one logits
    GEMM plus the two gradient GEMMs, each 2·M·V·K flops; only the requested gradients are launched (a frozen
    weight: no dW product; an input without grad: no dX product; db alone: the dZ pass without writing dZ).
    Deterministic: every sum has a fixed order, no atomics.
    """
    M, K = x.shape
    V = weight.shape[0]
    want_x, want_w = need_x and K > 0, need_weight and K > 0
    sd = _stat_dtype(x.dtype)
    # Both products add into their outputs (the GEMM's accumulate epilogue), so these start at zero:
    # dX is summed over the chunks in fp32 (fp64 for fp64), each chunk's rows of dW are written once.
    dx_acc = torch.zeros((M, K), dtype=sd, device=x.device) if need_x else None
    dw = torch.zeros((V, K), dtype=weight.dtype, device=weight.device) if need_weight else None
    db = _linear._alloc((V,), bias) if need_bias else None
    if M == 0 or V == 0 or not (want_x or want_w or need_bias):
        if db is not None:
            db.zero_()
        return _finish(dx_acc, x), dw, db
    cfg = _config(x.dtype)
    write_dz = want_x or want_w
    step = chunk_classes(M, V, x.element_size(), cfg["BLOCK_N"]) if write_dz else V
    dz = _linear._alloc((M, step), x) if write_dz else None
    rows = (target, lse, g_lse, g_zt, _or(g_zsum, g_zt))
    flags = dict(HAS_BIAS=bias is not None, HAS_CW=class_weight is not None, HAS_GZS=g_zsum is not None,
                 SOFTCAP=bool(softcap), WRITE_DZ=write_dz, COMPUTE_DB=need_bias,
                 **_common(x, weight, bias, class_weight, *rows, dz, dx_acc, dw), **cfg)
    cap = float(softcap or 1.0)
    for v0 in range(0, V, step):
        v1 = min(V, v0 + step)
        w_c = weight[v0:v1]
        b_c = bias[v0:v1] if bias is not None else None
        cw_c = class_weight[v0:v1] if class_weight is not None else None
        dz_c = dz[:, :v1 - v0] if dz is not None else None
        dbp = (torch.empty((triton.cdiv(M, cfg["BLOCK_M"]), v1 - v0), dtype=sd, device=x.device)
               if need_bias else None)
        args = (x, w_c, _or(b_c, x), _or(cw_c, x), *rows, _or(dz_c, x), _or(dbp, x),
                M, v1 - v0, K, v0, cap,
                *x.stride(), *w_c.stride(), _stride(b_c), _stride(cw_c), target.stride(0),
                *_strides2(dz_c), _stride(dbp))
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(v1 - v0, cfg["BLOCK_N"]),)
        _run("lce_dz", _lce_dz_kernel, grid, args, flags, x.device, wrap)
        if dbp is not None:
            db[v0:v1] = dbp.sum(0)
        if write_dz:
            linear_backward(dz_c, x, w_c, None, None, need_x=want_x, need_weight=want_w, wrap=wrap,
                            weight_grad_out=dw[v0:v1] if want_w else None,
                            input_grad_out=dx_acc if want_x else None)
    return _finish(dx_acc, x), dw, db


def _finish(dx_acc, x):
    """dX in x's dtype from its fp32 accumulator (rounded once, at the end)."""
    return dx_acc if dx_acc is None or dx_acc.dtype == x.dtype else dx_acc.to(x.dtype)


def _or(t, default):
    return t if t is not None else default


def _stride(t):
    return t.stride(0) if t is not None else 0


def _strides2(t):
    return tuple(t.stride()) if t is not None else (0, 0)


__all__ = ["lce_forward", "lce_backward", "check_target"]

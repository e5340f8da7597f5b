"""The one GEMM tile body, and the kernels built on it.

Everything is a tile of ``C[M, N] = Σ_k A[m, k]·B[k, n]`` over arbitrary strides (so transposed, sliced
or expanded operands need no copy), specialised by ``tl.constexpr`` flags (passed by name):

* forward ``_linear_fwd_kernel``: A = X (M×K), B = Wᵀ (the nn.Linear weight (N, K) read with swapped
  strides). Epilogue on the fp32/fp64 accumulator: ``Z = acc + b``, optionally store Z (only when a
  backward will need it), ``Y = act(Z)``.
* forward mode ``_linear_fwd_tangent_kernel``: the same tiles, and in lockstep (the same X and W tiles
  feed both products) ``Ż = Ẋ·Wᵀ + X·Ẇᵀ + ḃ`` and ``Ẏ = act'(Z) ⊙ Ż`` written beside Y.
* backward, in two launches (the default): ``_dz_kernel``, one elementwise pass over (M, N) that
  writes ``dZ = dY ⊙ act'(Z)`` in the operand dtype and per-row-block partial sums of ``db = Σ_m dZ``;
  then ``_linear_bwd_kernel`` with no activation, one grid covering the tiles of both products,
      dX = dZ·W      (M×K, reduce over N)        dW = dZᵀ·X      (N×K, reduce over M)
  act' is then computed once per element, not once per tile that reads it (K/BLOCK_N times for dX and
  again for dW), and the GEMM main loop is the bare product (see bench/NOTES.md for the instruction
  counts). ``_linear_bwd_kernel`` can still form dZ in its A-operand prologue and db from the dW tiles of
  the first K column (one launch, the first design): kept as a variant to measure against.

Offsets are int32 unless the launcher sets ``INT64``: it does so whenever any operand's largest element
offset reaches 2³¹ (a >2³¹-element tensor, or a view with a huge stride), where int32 would wrap.
Which kernel runs for a call is chosen in ``variants.py``.
"""
import triton
import triton.language as tl

from .activations import ACT_NONE, apply_activation, chain_activation


@triton.jit
def _cast(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest-even.

    With EMULATE_BF16 (set under the interpreter only) fp32→bf16 is rounded by hand: Triton 3.9's
    interpreter truncates (measured: 1024/1024 random values matched truncation, 51% matched
    round-to-nearest) and flushes subnormals, which would double bf16 errors on CPU against what the
    GPU computes. tests/test_kernels.py checks this bit for bit against torch's conversion.
    """
    if EMULATE_BF16 and dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        # Add half an ulp of bf16 (minus one, plus the kept lsb: ties go to even), then drop the low half.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # NaNs: rounding could carry a full payload into the sign, and cutting a payload that lives only
        # in the low half would leave inf; set the quiet bit (bit 22) so the cut keeps a NaN.
        quiet_nan = (bits | 0x00400000) & 0xFFFF0000
        # The kept high half is the bf16 bit pattern: reinterpret it rather than convert (the
        # interpreter's own conversion also flushes subnormals to zero).
        return (tl.where(x32 != x32, quiet_nan, rounded) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-grouping") tile order: GROUP_M row-tiles share each B column panel in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_offsets(pid_m, pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INT64: tl.constexpr):
    if INT64:
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def _gemm_tile(
    # pointers: A (M×K), B (K×N), S = what the forward saved for act' (indexed like A), tangents Ȧ, Ḃ
    a_ptr, b_ptr, s_ptr, at_ptr, bt_ptr,
    # tile and problem sizes (K is the reduction length)
    pid_m, pid_n, M, N, K,
    # strides, in the A / B frames
    stride_am, stride_ak, stride_bk, stride_bn, stride_sm, stride_sk,
    stride_atm, stride_atk, stride_btk, stride_btn,
    # constexprs
    PROLOGUE_ACT: tl.constexpr,  # A ← A ⊙ act'(S): dZ from dY on the fly (ACT_NONE: A used as loaded)
    ROWSUM_A: tl.constexpr,  # also return Σ_k A[m, k] in the accumulator dtype (the bias gradient)
    WITH_DOT: tl.constexpr,  # False: only the row sum (bias gradient of a frozen weight)
    HAS_AT: tl.constexpr, HAS_BT: tl.constexpr,  # forward mode: acc_t = Ȧ·B + A·Ḃ, sharing A and B
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M × BLOCK_N) tile: returns (acc, acc_t, rowsum) in float32 (float64 if FP64)."""
    offs_m, offs_n = _tile_offsets(pid_m, pid_n, BLOCK_M, BLOCK_N, INT64)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        offs_k = offs_k.to(tl.int64)
        # The pointer steps below are BLOCK_K·stride: an int32 stride times BLOCK_K can wrap too.
        stride_ak = tl.cast(stride_ak, tl.int64)
        stride_bk = tl.cast(stride_bk, tl.int64)
        stride_sk = tl.cast(stride_sk, tl.int64)
        stride_atk = tl.cast(stride_atk, tl.int64)
        stride_btk = tl.cast(stride_btk, tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # Pointer blocks only for the streams this specialisation reads (the interpreter would otherwise
    # evaluate the dead index math: each block op costs it ~0.1 ms).
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    if WITH_DOT:
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if PROLOGUE_ACT != ACT_NONE:
        s_ptrs = s_ptr + offs_m[:, None] * stride_sm + offs_k[None, :] * stride_sk
    if HAS_AT:
        at_ptrs = at_ptr + offs_m[:, None] * stride_atm + offs_k[None, :] * stride_atk
    if HAS_BT:
        bt_ptrs = bt_ptr + offs_k[:, None] * stride_btk + offs_n[None, :] * stride_btn

    # The accumulator dtype is chosen by a bool, not passed as a tl.dtype: constexprs stay plain Python
    # values, which torch.compile's wrap_triton can put into generated code.
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
    rowsum = tl.zeros((BLOCK_M,), dtype=acc.dtype)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        mask_a = mask_m[:, None] & (offs_k[None, :] < k_left)
        a = tl.load(a_ptrs, mask=mask_a, other=0.0)
        if PROLOGUE_ACT != ACT_NONE:
            s = tl.load(s_ptrs, mask=mask_a, other=0.0)
            dz = chain_activation(a.to(acc.dtype), s.to(acc.dtype), PROLOGUE_ACT)
            if ROWSUM_A:
                rowsum += tl.sum(dz, axis=1)
            # dZ enters the tensor-core product in the operand dtype, as eager's dZ tensor would.
            a = _cast(dz, a.dtype, EMULATE_BF16)
            s_ptrs += BLOCK_K * stride_sk
        elif ROWSUM_A:
            rowsum += tl.sum(a.to(acc.dtype), axis=1)
        if WITH_DOT:
            mask_b = (offs_k[:, None] < k_left) & mask_n[None, :]
            b = tl.load(b_ptrs, mask=mask_b, other=0.0)
            if EMULATE_BF16:
                # Interpreter: its bf16 tl.dot is wrong (measured on Triton 3.9: rel. error ~1e10);
                # bf16→fp32 conversion is exact, so the fp32 product equals the bf16 tensor-core one.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
            if HAS_AT:
                at = tl.load(at_ptrs, mask=mask_a, other=0.0)
                if EMULATE_BF16:
                    at = at.to(tl.float32)
                acc_t = tl.dot(at, b, acc_t, input_precision=PRECISION, out_dtype=acc_t.dtype)
                at_ptrs += BLOCK_K * stride_atk
            if HAS_BT:
                bt = tl.load(bt_ptrs, mask=mask_b, other=0.0)
                if EMULATE_BF16:
                    bt = bt.to(tl.float32)
                acc_t = tl.dot(a, bt, acc_t, input_precision=PRECISION, out_dtype=acc_t.dtype)
                bt_ptrs += BLOCK_K * stride_btk
            b_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
    return acc, acc_t, rowsum


@triton.jit
def _store_tile(ptr, offs_m, offs_n, stride_m, stride_n, value, mask, EMULATE_BF16: tl.constexpr):
    tl.store(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n,
             _cast(value, ptr.dtype.element_ty, EMULATE_BF16), mask=mask)


@triton.jit
def _primal_epilogue(acc, b_ptr, y_ptr, z_ptr, pid_m, pid_n, M, N,
                     stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
                     EMULATE_BF16: tl.constexpr, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Z = acc + b (stored if STORE_Z), Y = act(Z) stored; returns (Z, Y, offs_m, offs_n, mask)."""
    offs_m, offs_n = _tile_offsets(pid_m, pid_n, BLOCK_M, BLOCK_N, INT64)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    z = acc
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    if STORE_Z:
        _store_tile(z_ptr, offs_m, offs_n, stride_zm, stride_zn, z, mask, EMULATE_BF16)
    y = apply_activation(z, ACT)
    _store_tile(y_ptr, offs_m, offs_n, stride_ym, stride_yn, y, mask, EMULATE_BF16)
    return z, y, offs_m, offs_n, mask


@triton.jit
def _linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = act(X·Wᵀ + b)  [Z stored if STORE_Z].   x: (M, K)  w: (N, K)  b: (N,)  y, z: (M, N)"""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, _unused_t, _unused_rowsum = _gemm_tile(
        x_ptr, w_ptr, x_ptr, x_ptr, w_ptr,
        pid_m, pid_n, M, N, K,
        stride_xm, stride_xk, stride_wk, stride_wn, 0, 0, 0, 0, 0, 0,
        PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
        FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    _primal_epilogue(acc, b_ptr, y_ptr, z_ptr, pid_m, pid_n, M, N, stride_b, stride_ym, stride_yn, stride_zm,
                     stride_zn, ACT=ACT, HAS_BIAS=HAS_BIAS, STORE_Z=STORE_Z, EMULATE_BF16=EMULATE_BF16,
                     INT64=INT64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)


@triton.jit
def _linear_fwd_tangent_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, xt_ptr, wt_ptr, bt_ptr, yt_ptr, zt_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
    stride_xtm, stride_xtk, stride_wtn, stride_wtk, stride_bt, stride_ytm, stride_ytn, stride_ztm, stride_ztn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_XT: tl.constexpr, HAS_WT: tl.constexpr, HAS_BT: tl.constexpr, STORE_ZT: tl.constexpr,
    DACT_FROM_Y: tl.constexpr,  # act' reads the output y (relu), else the pre-activation z
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The forward, plus forward-mode tangents in the same pass: Ẏ = act'(Z) ⊙ (Ẋ·Wᵀ + X·Ẇᵀ + ḃ).

    x, ẋ: (M, K)  w, ẇ: (N, K)  b, ḃ: (N,)  y, z, ẏ, ż: (M, N)
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc, acc_t, _unused_rowsum = _gemm_tile(
        x_ptr, w_ptr, x_ptr, xt_ptr, wt_ptr,
        pid_m, pid_n, M, N, K,
        stride_xm, stride_xk, stride_wk, stride_wn, 0, 0, stride_xtm, stride_xtk, stride_wtk, stride_wtn,
        PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=HAS_XT, HAS_BT=HAS_WT,
        FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    z, y, offs_m, offs_n, mask = _primal_epilogue(
        acc, b_ptr, y_ptr, z_ptr, pid_m, pid_n, M, N, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
        ACT=ACT, HAS_BIAS=HAS_BIAS, STORE_Z=STORE_Z, EMULATE_BF16=EMULATE_BF16, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    zt = acc_t
    if HAS_BT:
        zt += tl.load(bt_ptr + offs_n * stride_bt, mask=offs_n < N, other=0.0).to(acc.dtype)[None, :]
    if STORE_ZT:
        _store_tile(zt_ptr, offs_m, offs_n, stride_ztm, stride_ztn, zt, mask, EMULATE_BF16)
    if DACT_FROM_Y:
        yt = chain_activation(zt, y, ACT)
    else:
        yt = chain_activation(zt, z, ACT)
    _store_tile(yt_ptr, offs_m, offs_n, stride_ytm, stride_ytn, yt, mask, EMULATE_BF16)


@triton.jit
def _linear_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, s_ptr, dx_ptr, dw_ptr, db_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sn,
    stride_dxm, stride_dxk, stride_dwn, stride_dwk, stride_db,
    ACT: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ACCUMULATE_DX: tl.constexpr, ACCUMULATE_DW: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dZ = dY ⊙ act'(S);  dX = dZ·W,  dW = dZᵀ·X,  db = Σ_m dZ — one grid for all requested.

    dy, s: (M, N)  x: (M, K)  w: (N, K)  dx: (M, K)  dw: (N, K)  db: (N,)
    Program ids [0, tiles(dX)) compute dX tiles, the rest dW tiles (or, with COMPUTE_DW off, only
    the db row sums, one program per BLOCK_M slice of N). ACCUMULATE_DW: dw += dZᵀ·X (dw is then an
    fp32 ``main_grad`` buffer: gradient accumulation over micro-batches without a separate add pass).
    ACCUMULATE_DX: dx += dZ·W (the LM head sums dX over chunks of classes in an fp32 buffer).
    """
    pid = tl.program_id(0)
    if COMPUTE_DX:
        tiles_dx = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    else:
        tiles_dx = 0
    if pid < tiles_dx:
        # dX[m, k] = Σ_n dZ[m, n]·W[n, k]: A = dZ (M×N), B = W (N×K).
        pid_m, pid_k = _tile_coords(pid, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        # (Names assigned in both branches must agree in type for the compiler: no shared "_".)
        acc_dx, _unused_t, _unused_rowsum = _gemm_tile(
            dy_ptr, w_ptr, s_ptr, dy_ptr, w_ptr,
            pid_m, pid_k, M, K, N,
            stride_dym, stride_dyn, stride_wn, stride_wk, stride_sm, stride_sn, 0, 0, 0, 0,
            PROLOGUE_ACT=ACT, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
            FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        offs_m, offs_k = _tile_offsets(pid_m, pid_k, BLOCK_M, BLOCK_N, INT64)
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        if ACCUMULATE_DX:
            # Each dX element belongs to exactly one tile: a plain read-add-write, no atomics.
            acc_dx += tl.load(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, mask=mask,
                              other=0.0).to(acc_dx.dtype)
        _store_tile(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk, acc_dx, mask, EMULATE_BF16)
    else:
        # dW[n, k] = Σ_m dZ[m, n]·X[m, k]: A = dZᵀ (N×M, dY and S read with swapped strides), B = X.
        if COMPUTE_DW:
            pid_n, pid_k = _tile_coords(pid - tiles_dx, N, K, BLOCK_M, BLOCK_N, GROUP_M)
        else:
            pid_n = pid - tiles_dx
            pid_k = 0
        acc_dw, _unused_dw_t, rowsum = _gemm_tile(
            dy_ptr, x_ptr, s_ptr, dy_ptr, x_ptr,
            pid_n, pid_k, N, K, M,
            stride_dyn, stride_dym, stride_xm, stride_xk, stride_sn, stride_sm, 0, 0, 0, 0,
            # a frozen weight's programs only sum dZ rows for db: no product
            PROLOGUE_ACT=ACT, ROWSUM_A=COMPUTE_DB, WITH_DOT=COMPUTE_DW, HAS_AT=False, HAS_BT=False,
            FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        offs_n, offs_k = _tile_offsets(pid_n, pid_k, BLOCK_M, BLOCK_N, INT64)
        mask_n = offs_n < N
        if COMPUTE_DW:
            mask = mask_n[:, None] & (offs_k < K)[None, :]
            if ACCUMULATE_DW:
                # Each dW element belongs to exactly one tile: a plain read-add-write, no atomics.
                acc_dw += tl.load(dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk, mask=mask,
                                  other=0.0).to(acc_dw.dtype)
            _store_tile(dw_ptr, offs_n, offs_k, stride_dwn, stride_dwk, acc_dw, mask, EMULATE_BF16)
        if COMPUTE_DB:
            # Every K column of tiles sees the same dZ rows; the first one writes db (no atomics).
            if pid_k == 0:
                tl.store(db_ptr + offs_n * stride_db, _cast(rowsum, db_ptr.dtype.element_ty, EMULATE_BF16), mask=mask_n)


@triton.jit
def _dz_kernel(
    dy_ptr, s_ptr, dz_ptr, dbp_ptr,
    M, N,
    stride_dym, stride_dyn, stride_sm, stride_sn, stride_dzm, stride_dzn, stride_dbpm,
    ACT: tl.constexpr, WRITE_DZ: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,  # unused: every launch passes a whole TileConfig
):
    """dZ = dY ⊙ act'(S) written in the operand dtype (WRITE_DZ), and dbp[i, n] = Σ_{m in row block i} dZ[m, n]
    in fp32 (fp64 for fp64) (COMPUTE_DB): the launcher sums dbp over its rows, in a fixed order.

    dy, s, dz: (M, N)  dbp: (cdiv(M, BLOCK_M), N)
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, 1)
    offs_m, offs_n = _tile_offsets(pid_m, pid_n, BLOCK_M, BLOCK_N, INT64)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    if FP64:
        g = dy.to(tl.float64)
    else:
        g = dy.to(tl.float32)
    if ACT != ACT_NONE:
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
        g = chain_activation(g, s.to(g.dtype), ACT)
    if WRITE_DZ:
        _store_tile(dz_ptr, offs_m, offs_n, stride_dzm, stride_dzn, g, mask, EMULATE_BF16)
    if COMPUTE_DB:
        # Masked elements load as 0 and every chain rule maps (0, 0) to 0: they add nothing.
        tl.store(dbp_ptr + pid_m * stride_dbpm + offs_n, tl.sum(g, axis=0), mask=mask_n)


# ---------------------------------------------------------------------------------------------------
# Forward v2: TMA-descriptor operands, a persistent grid, and a split-K decode path.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _tma_tile(x_desc, w_desc, pid_m, pid_n, K,
              FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = X[tile m, :]·W[tile n, :]ᵀ from two tensor descriptors: the (N, K) weight is loaded as a
    [BLOCK_N, BLOCK_K] block (rows of W, K contiguous: what the copy engine reads best) and fed to the
    product as its transpose. Blocks past the edges read as zeros (the descriptor clips), so no masks."""
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k0 * BLOCK_K])
        b = w_desc.load([off_n, k0 * BLOCK_K])
        if EMULATE_BF16:  # the interpreter's bf16 dot is wrong; bf16→fp32 is exact (see _gemm_tile)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b.T, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _tma_store_subtiled(desc, off_m, off_n, value, EMULATE_BF16: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """A TMA store of a (BLOCK_M, BLOCK_N) tile, in EPILOGUE_SPLIT (1 or 2) column halves: half the
    staging buffer in shared memory, and the first half's copy overlaps the second's conversion."""
    if EPILOGUE_SPLIT == 2:
        v = tl.reshape(value, (BLOCK_M, 2, BLOCK_N // 2))
        v = tl.permute(v, (0, 2, 1))
        v0, v1 = tl.split(v)
        desc.store([off_m, off_n], _cast(v0, desc.dtype, EMULATE_BF16))
        desc.store([off_m, off_n + BLOCK_N // 2], _cast(v1, desc.dtype, EMULATE_BF16))
    else:
        desc.store([off_m, off_n], _cast(value, desc.dtype, EMULATE_BF16))


@triton.jit
def _linear_fwd_tma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # a flag of the variant-table row (``Variant.flags``), not of the call
):
    """``_linear_fwd_kernel``'s contract on tensor descriptors (K-contiguous, 16-byte aligned operands;
    unit last strides are assumed, the *_k / *_n strides are not read).

    x: (M, K)  w: (N, K)  b: (N,)  y, z: (M, N)

    Every program loops over tiles pid, pid + programs, … in grouped order: with one program per tile
    (the plain grid) it runs one tile; with one per SM (the persistent grid) the next tile's loads start
    while this one's epilogue runs, and no CTA launch/teardown sits between tiles. WARP_SPECIALIZE:
    the tile loop is warp-specialised (producer warps issue the copies, consumer warpgroups the
    products and the epilogue; Triton does it with 4 warps, see ``configs.tma_ws_candidates``).

    Z = acc + b and Y = act(Z) as in ``_primal_epilogue`` (the same activation table); stored with TMA
    in two column halves (epilogue subtiling) unless warp-specialised."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    # Two column halves from 128 wide, except when warp-specialised: Triton 3.6's warp-specialisation pass
    # cannot partition the split (tt.reshape/trans/split: "unsupported op type" at 128×128), so that
    # kernel would not compile on 3.6; whole-tile stores cost it 16 KiB more shared memory.
    EPILOGUE_SPLIT: tl.constexpr = 2 if BLOCK_N >= 128 and not WARP_SPECIALIZE else 1
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1],
                                       block_shape=[BLOCK_M, BLOCK_N // EPILOGUE_SPLIT])
    if STORE_Z:
        z_desc = tl.make_tensor_descriptor(z_ptr, shape=[M, N], strides=[stride_zm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // EPILOGUE_SPLIT])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=False,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _tma_tile(x_desc, w_desc, pid_m, pid_n, K, FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        z = acc
        if HAS_BIAS:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            z += tl.load(b_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0).to(acc.dtype)[None, :]
        if STORE_Z:
            _tma_store_subtiled(z_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, z, EMULATE_BF16, BLOCK_M, BLOCK_N,
                                EPILOGUE_SPLIT)
        y = apply_activation(z, ACT)
        _tma_store_subtiled(y_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, y, EMULATE_BF16, BLOCK_M, BLOCK_N,
                            EPILOGUE_SPLIT)


@triton.jit
def _linear_fwd_splitk_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
    part_ptr, K_SPLIT,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Decode (M ≤ BLOCK_M), stage 1: program (n, s) computes the fp32 (fp64) partial product of the
    K range [s·K_SPLIT, (s+1)·K_SPLIT) for output columns tile n, with the shared tile body, into
    part[s] (a contiguous (splits, M, N) scratch buffer). No epilogue here (see the reduce kernel)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    if INT64:
        k_start = split.to(tl.int64) * K_SPLIT
        part_off = split.to(tl.int64) * M * N
    else:
        k_start = split * K_SPLIT
        part_off = split * M * N
    acc, _unused_t, _unused_rowsum = _gemm_tile(
        x_ptr + k_start * stride_xk, w_ptr + k_start * stride_wk, x_ptr, x_ptr, w_ptr,
        pid_n * 0, pid_n, M, N, tl.minimum(K_SPLIT, K - k_start),
        stride_xm, stride_xk, stride_wk, stride_wn, 0, 0, 0, 0, 0, 0,
        PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
        FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    offs_m, offs_n = _tile_offsets(pid_n * 0, pid_n, BLOCK_M, BLOCK_N, INT64)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    _store_tile(part_ptr + part_off, offs_m, offs_n, N, 1, acc, mask, EMULATE_BF16)


@triton.jit
def _linear_fwd_splitk_reduce_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn, stride_zm, stride_zn,
    part_ptr, SPLITS,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Decode, stage 2: acc = Σ_s part[s] in split order 0, 1, … (fixed: the result is bitwise
    reproducible, no atomics), then the forward's own epilogue (bias, Z, activation)."""
    pid_n = tl.program_id(0)
    pid_m = pid_n * 0  # one row tile: M ≤ BLOCK_M
    offs_m, offs_n = _tile_offsets(pid_m, pid_n, BLOCK_M, BLOCK_N, INT64)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
    step = M * N
    if INT64:
        step = tl.cast(M, tl.int64) * N
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.range(0, SPLITS, num_stages=3):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(acc.dtype)
        ptrs += step
    _primal_epilogue(acc, b_ptr, y_ptr, z_ptr, pid_m, pid_n, M, N, stride_b, stride_ym, stride_yn, stride_zm,
                     stride_zn, ACT=ACT, HAS_BIAS=HAS_BIAS, STORE_Z=STORE_Z, EMULATE_BF16=EMULATE_BF16,
                     INT64=INT64, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)

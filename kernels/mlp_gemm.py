"""The MLP-block kernels, on the shared GEMM tile body of ``gemm.py``.

A block is ``y = H·W_dᵀ + b_d`` with

    gated:  G = X·W_gᵀ + b_g,  U = X·W_uᵀ + b_u,  H = act(G) ⊙ U       (SwiGLU, GeGLU, ReGLU, …)
    plain:  Z₁ = X·W₁ᵀ + b₁,                       H = act(Z₁)

Shapes: X (M, K), W_g / W_u / W₁ (I, K), W_d (N, I), H, G, U, Z₁ (M, I), Y (M, N).

* ``_gated_up_fwd_kernel``: one program per (M, I) tile computes the gate tile and the up tile from
  the same loaded X tile — the tile body's second product (``HAS_BT``: acc_t = A·Ḃ, the forward-mode
  tangent's X·Ẇᵀ) with Ḃ = W_uᵀ — and its epilogue writes H = act(G) ⊙ U; G and U only when a backward
  will read them (``STORE_PRE``). The plain block's up projection is ``linear_fwd`` with the activation
  in its epilogue.
* ``_mlp_down_bwd_kernel``: dH = dY·W_d tile by tile (A = dY (M×N), B = W_d (N×I)), and in the
  epilogue, from the saved pre-activations,

      gated:  dG = dH ⊙ U ⊙ act'(G),  dU = dH ⊙ act(G),  H = act(G) ⊙ U
      plain:  dZ₁ = dH ⊙ act'(Z₁),                        H = act(Z₁)

  so dH never reaches memory and no elementwise dZ pass runs; H (for dW_d = dYᵀ·H) is written only if
  W_d needs a gradient. Bias gradients are per-row-block fp32 (fp64) partial sums of dG, dU (dZ₁) written
  by the same programs, and of dY (for b_d) by extra programs of the same grid; the launcher adds the
  partials in a fixed order (deterministic, no atomics).
* ``_gated_dual_bwd_kernel``: one grid of dX tiles, dW_g tiles and dW_u tiles:
      dX = dG·W_g + dU·W_u   (both products summed in fp32 before the one store)
      dW_g = dGᵀ·X,  dW_u = dUᵀ·X
  (the plain block's fc1 backward is ``linear_bwd`` on dZ₁, with no activation.)
"""
import triton
import triton.language as tl

from .activations import ACT_NONE, apply_activation, chain_activation
from .gemm import _gemm_tile, _store_tile, _tile_coords, _tile_offsets


@triton.jit
def _load_tile(ptr, offs_m, offs_n, stride_m, stride_n, mask, dtype: tl.constexpr):
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0).to(dtype)


@triton.jit
def _gated_up_fwd_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, h_ptr, g_ptr, u_ptr,
    M, I, K,
    stride_xm, stride_xk, stride_wgi, stride_wgk, stride_wui, stride_wuk, stride_bg, stride_bu,
    stride_hm, stride_hi, stride_gm, stride_gi, stride_um, stride_ui,
    ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, STORE_PRE: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """H = act(X·W_gᵀ + b_g) ⊙ (X·W_uᵀ + b_u)  [G, U stored if STORE_PRE].

    x: (M, K)  wg, wu: (I, K)  bg, bu: (I,)  h, g, u: (M, I). A packed (2I, K) gate_up weight is passed
    as its two row halves (the same storage, W_u's pointer I rows further): no copy.
    """
    pid_m, pid_i = _tile_coords(tl.program_id(0), M, I, BLOCK_M, BLOCK_N, GROUP_M)
    # acc = X·W_gᵀ and acc_u = X·W_uᵀ: the B operands are the weights read with swapped strides.
    acc_g, acc_u, _unused_rowsum = _gemm_tile(
        x_ptr, wg_ptr, x_ptr, x_ptr, wu_ptr,
        pid_m, pid_i, M, I, K,
        stride_xm, stride_xk, stride_wgk, stride_wgi, 0, 0, 0, 0, stride_wuk, stride_wui,
        PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=True,
        FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    offs_m, offs_i = _tile_offsets(pid_m, pid_i, BLOCK_M, BLOCK_N, INT64)
    mask_i = offs_i < I
    mask = (offs_m < M)[:, None] & mask_i[None, :]
    g = acc_g
    u = acc_u
    if HAS_BG:
        g += tl.load(bg_ptr + offs_i * stride_bg, mask=mask_i, other=0.0).to(acc_g.dtype)[None, :]
    if HAS_BU:
        u += tl.load(bu_ptr + offs_i * stride_bu, mask=mask_i, other=0.0).to(acc_g.dtype)[None, :]
    if STORE_PRE:
        _store_tile(g_ptr, offs_m, offs_i, stride_gm, stride_gi, g, mask, EMULATE_BF16)
        _store_tile(u_ptr, offs_m, offs_i, stride_um, stride_ui, u, mask, EMULATE_BF16)
    h = apply_activation(g, ACT) * u
    _store_tile(h_ptr, offs_m, offs_i, stride_hm, stride_hi, h, mask, EMULATE_BF16)


@triton.jit
def _mlp_down_bwd_kernel(
    dy_ptr, wd_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, h_ptr, dbg_ptr, dbu_ptr, dbd_ptr,
    M, I, N,
    stride_dym, stride_dyn, stride_wdn, stride_wdi, stride_gm, stride_gi, stride_um, stride_ui,
    stride_dgm, stride_dgi, stride_dum, stride_dui, stride_hm, stride_hi, stride_dbp,
    ACT: tl.constexpr, GATED: tl.constexpr, COMPUTE_DPRE: tl.constexpr, STORE_H: tl.constexpr,
    BIAS_PRE: tl.constexpr, BIAS_DOWN: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The down projection's dX GEMM with the activation's backward in its epilogue.

    dy: (M, N)  wd: (N, I)  g (G or Z₁), u (U; gated only), dg (dG or dZ₁), du, h: (M, I)
    dbg, dbu: (cdiv(M, BLOCK_M), I) partial sums of dG (dZ₁), dU over each row block (BIAS_PRE);
    dbd: (cdiv(M, BLOCK_M), N) partial sums of dY (BIAS_DOWN), from the programs after the dH tiles.
    COMPUTE_DPRE False (nothing before the down projection needs a gradient): no product, only H.
    """
    pid = tl.program_id(0)
    tiles_dh = tl.cdiv(M, BLOCK_M) * tl.cdiv(I, BLOCK_N)
    if pid < tiles_dh:
        pid_m, pid_i = _tile_coords(pid, M, I, BLOCK_M, BLOCK_N, GROUP_M)
        if COMPUTE_DPRE:
            # dH[m, i] = Σ_n dY[m, n]·W_d[n, i]: A = dY (M×N), B = W_d (N×I) as stored. The pre-activations
            # are loaded after the loop: held across it they would cost registers the main loop needs.
            dh, _unused_t, _unused_rowsum = _gemm_tile(
                dy_ptr, wd_ptr, dy_ptr, dy_ptr, wd_ptr,
                pid_m, pid_i, M, I, N,
                stride_dym, stride_dyn, stride_wdn, stride_wdi, 0, 0, 0, 0, 0, 0,
                PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
                FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            )
        offs_m, offs_i = _tile_offsets(pid_m, pid_i, BLOCK_M, BLOCK_N, INT64)
        mask_i = offs_i < I
        mask = (offs_m < M)[:, None] & mask_i[None, :]
        if FP64:
            g = _load_tile(g_ptr, offs_m, offs_i, stride_gm, stride_gi, mask, tl.float64)
        else:
            g = _load_tile(g_ptr, offs_m, offs_i, stride_gm, stride_gi, mask, tl.float32)
        a = apply_activation(g, ACT)
        if GATED:
            u = _load_tile(u_ptr, offs_m, offs_i, stride_um, stride_ui, mask, g.dtype)
            h = a * u
        else:
            h = a
        if STORE_H:
            _store_tile(h_ptr, offs_m, offs_i, stride_hm, stride_hi, h, mask, EMULATE_BF16)
        if COMPUTE_DPRE:
            if GATED:
                # ∂H/∂G = U ⊙ act'(G), ∂H/∂U = act(G)
                dg = chain_activation(dh * u, g, ACT)
                du = dh * a
                _store_tile(du_ptr, offs_m, offs_i, stride_dum, stride_dui, du, mask, EMULATE_BF16)
                if BIAS_PRE:
                    # Masked rows load G = U = 0 and dY = 0: they add 0 to the sums.
                    tl.store(dbu_ptr + pid_m * stride_dbp + offs_i, tl.sum(du, axis=0), mask=mask_i)
            else:
                dg = chain_activation(dh, g, ACT)
            _store_tile(dg_ptr, offs_m, offs_i, stride_dgm, stride_dgi, dg, mask, EMULATE_BF16)
            if BIAS_PRE:
                tl.store(dbg_ptr + pid_m * stride_dbp + offs_i, tl.sum(dg, axis=0), mask=mask_i)
    else:
        # db_d = Σ_m dY[m, :]: one program per (BLOCK_M × BLOCK_N) tile of dY writes its column sums.
        pid_m, pid_n = _tile_coords(pid - tiles_dh, M, N, BLOCK_M, BLOCK_N, 1)
        offs_m2, offs_n = _tile_offsets(pid_m, pid_n, BLOCK_M, BLOCK_N, INT64)
        mask_n = offs_n < N
        mask_y = (offs_m2 < M)[:, None] & mask_n[None, :]
        if FP64:
            dy = _load_tile(dy_ptr, offs_m2, offs_n, stride_dym, stride_dyn, mask_y, tl.float64)
        else:
            dy = _load_tile(dy_ptr, offs_m2, offs_n, stride_dym, stride_dyn, mask_y, tl.float32)
        tl.store(dbd_ptr + pid_m * stride_dbp + offs_n, tl.sum(dy, axis=0), mask=mask_n)


@triton.jit
def _gated_dual_bwd_kernel(
    dg_ptr, du_ptr, x_ptr, wg_ptr, wu_ptr, dx_ptr, dwg_ptr, dwu_ptr,
    M, I, K,
    stride_dgm, stride_dgi, stride_dum, stride_dui, stride_xm, stride_xk,
    stride_wgi, stride_wgk, stride_wui, stride_wuk,
    stride_dxm, stride_dxk, stride_dwgi, stride_dwgk, stride_dwui, stride_dwuk,
    COMPUTE_DX: tl.constexpr, COMPUTE_DWG: tl.constexpr, COMPUTE_DWU: tl.constexpr, ACCUMULATE_DW: tl.constexpr,
    FP64: tl.constexpr, EMULATE_BF16: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dG·W_g + dU·W_u,  dW_g = dGᵀ·X,  dW_u = dUᵀ·X — one grid for all requested.

    dg, du: (M, I)  x: (M, K)  wg, wu: (I, K)  dx: (M, K)  dwg, dwu: (I, K)
    Program ids: [0, tiles(dX)) dX tiles, then the dW_g tiles, then the dW_u tiles (each segment only
    if requested). ACCUMULATE_DW: dW += … into fp32 ``main_grad`` buffers.
    """
    pid = tl.program_id(0)
    tiles_w = tl.cdiv(I, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    if COMPUTE_DX:
        tiles_dx = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    else:
        tiles_dx = 0
    if COMPUTE_DWG:
        tiles_dwg = tiles_w
    else:
        tiles_dwg = 0
    if pid < tiles_dx:
        # dX[m, k] = Σ_i dG[m, i]·W_g[i, k] + Σ_i dU[m, i]·W_u[i, k]
        pid_m, pid_k = _tile_coords(pid, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        acc_g, _unused_tg, _unused_rg = _gemm_tile(
            dg_ptr, wg_ptr, dg_ptr, dg_ptr, wg_ptr,
            pid_m, pid_k, M, K, I,
            stride_dgm, stride_dgi, stride_wgi, stride_wgk, 0, 0, 0, 0, 0, 0,
            PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
            FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        acc_u, _unused_tu, _unused_ru = _gemm_tile(
            du_ptr, wu_ptr, du_ptr, du_ptr, wu_ptr,
            pid_m, pid_k, M, K, I,
            stride_dum, stride_dui, stride_wui, stride_wuk, 0, 0, 0, 0, 0, 0,
            PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
            FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        offs_m, offs_k = _tile_offsets(pid_m, pid_k, BLOCK_M, BLOCK_N, INT64)
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        _store_tile(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk, acc_g + acc_u, mask, EMULATE_BF16)
    else:
        # dW[i, k] = Σ_m dP[m, i]·X[m, k]: A = dPᵀ (I×M: dG or dU read with swapped strides), B = X.
        local = pid - tiles_dx
        if local < tiles_dwg:
            p_ptr = dg_ptr
            stride_pm = stride_dgm
            stride_pi = stride_dgi
            w_out = dwg_ptr
            stride_oi = stride_dwgi
            stride_ok = stride_dwgk
        else:
            local = local - tiles_dwg
            p_ptr = du_ptr
            stride_pm = stride_dum
            stride_pi = stride_dui
            w_out = dwu_ptr
            stride_oi = stride_dwui
            stride_ok = stride_dwuk
        pid_i, pid_k = _tile_coords(local, I, K, BLOCK_M, BLOCK_N, GROUP_M)
        acc_w, _unused_tw, _unused_rw = _gemm_tile(
            p_ptr, x_ptr, p_ptr, p_ptr, x_ptr,
            pid_i, pid_k, I, K, M,
            stride_pi, stride_pm, stride_xm, stride_xk, 0, 0, 0, 0, 0, 0,
            PROLOGUE_ACT=ACT_NONE, ROWSUM_A=False, WITH_DOT=True, HAS_AT=False, HAS_BT=False,
            FP64=FP64, EMULATE_BF16=EMULATE_BF16, PRECISION=PRECISION, INT64=INT64,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
        offs_i, offs_k2 = _tile_offsets(pid_i, pid_k, BLOCK_M, BLOCK_N, INT64)
        mask_w = (offs_i < I)[:, None] & (offs_k2 < K)[None, :]
        if ACCUMULATE_DW:
            # Each dW element belongs to exactly one tile: a plain read-add-write, no atomics.
            acc_w += tl.load(w_out + offs_i[:, None] * stride_oi + offs_k2[None, :] * stride_ok, mask=mask_w,
                             other=0.0).to(acc_w.dtype)
        _store_tile(w_out, offs_i, offs_k2, stride_oi, stride_ok, acc_w, mask_w, EMULATE_BF16)

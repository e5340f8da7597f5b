"""The launch wrappers in ``kernels/linear.py`` against fp64 and eager references.

On a CPU-only machine these run the kernels through Triton's interpreter, never the eager fallback.
"""
import pytest
import torch
import triton
import triton.language as tl

from conftest import ACTS, DEVICES, DTYPES, assert_matches, randn, reference_linear, run_isolated, runs_kernels
from fusedad.kernels import (force_int64, linear_backward, linear_forward, needs_int64,
                             record_launches)
from fusedad.kernels.gemm import _cast
from fusedad.kernels import variants
from fusedad.kernels.linear import INTERPRETER

pytestmark = pytest.mark.parametrize("device", DEVICES)

#: Every backward variant of the kernel-variant table: the default (a dZ pass, then plain GEMMs) and the
#: first design (dZ in the GEMM prologue, one launch), which stays to be measured against it. (torch's
#: row launches no kernel: tests/test_torch_rows.py checks it against these.)
BWD_VARIANTS = [v.name for v in variants.VARIANTS if v.direction == "bwd" and not v.is_torch]


@pytest.fixture(params=BWD_VARIANTS)
def bwd_variant(request):
    """Runs the test's backward launches with each backward variant in turn."""
    with variants.use(request.param) as variant:
        yield variant


def _gemm(log):
    """The backward GEMM launch of a recorded backward (after the dZ pass, if any)."""
    (launch,) = [l for l in log if l.kernel.startswith("linear_bwd")]
    return launch


def _needs_kernels(device):
    if not runs_kernels(device):
        pytest.skip(f"fusedad runs the eager path on {device} here (no interpreter, no GPU kernels)")


def _references(x, w, b, act, dy):
    """(y, dx, dw, db) in float64 and in the test dtype, by eager autograd."""
    out = []
    for dtype in (torch.float64, x.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        y = reference_linear(*leaves, act)
        out.append((y, *torch.autograd.grad(y, leaves, dy.to(dtype))))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_forward_backward_every_activation_and_dtype(device, dtype, act, bwd_variant):
    _needs_kernels(device)
    M, K, N = 19, 23, 13  # primes: every tile edge is masked
    x, w, b, dy = (randn(*s, dtype=dtype, device=device) for s in ((M, K), (N, K), (N,), (M, N)))
    y, z, _, _ = linear_forward(x, w, b, act, store_preact=True)
    saved = y if act == "relu" else z
    dx, dw, db = linear_backward(dy, x, w, saved, act, True, True, True)
    ref64, ref = _references(x, w, b, act, dy)
    for name, got, r64, r in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), ref64, ref):
        assert got.dtype == dtype
        assert_matches(got, r64, r, f"{name} {act} {dtype}")
    z64 = torch.nn.functional.linear(*(t.double() for t in (x, w, b)))
    assert_matches(z, z64, torch.nn.functional.linear(x, w, b), "z")


@pytest.mark.parametrize("act", [None, "gelu"])
def test_no_bias(device, act):
    _needs_kernels(device)
    x, w, dy = randn(7, 33, device=device), randn(40, 33, device=device), randn(7, 40, device=device)
    y, z, _, _ = linear_forward(x, w, None, act, store_preact=act is not None)
    dx, dw, db = linear_backward(dy, x, w, z, act, True, True, False)
    assert db is None
    ref64, ref = _references(x, w, torch.zeros(40, device=device), act, dy)
    for got, r64, r in zip((y, dx, dw), ref64, ref):
        assert_matches(got, r64, r)


def _strided_operands(device, how):
    """x (M, K), w (N, K), b (N,), dy (M, N) as transposed / sliced / stride-0 views."""
    M, K, N = 11, 20, 9
    if how == "transposed":
        return (randn(K, M, device=device).t(), randn(K, N, device=device).t(), randn(N, device=device),
                randn(N, M, device=device).t())
    if how == "sliced":
        return (randn(2 * M, 3 * K, device=device)[::2, 1::3], randn(N, 2 * K, device=device)[:, K:],
                randn(3 * N, device=device)[::3], randn(M, 2 * N, device=device)[:, ::2])
    # expanded: a stride-0 grad (what y.sum() sends back) and a broadcast bias
    return (randn(M, K, device=device), randn(N, K, device=device), randn(1, device=device).expand(N),
            randn(1, N, device=device).expand(M, N))


@pytest.mark.parametrize("how", ["transposed", "sliced", "expanded"])
def test_any_strides_without_copies(device, how, bwd_variant):
    _needs_kernels(device)
    x, w, b, dy = _strided_operands(device, how)
    with record_launches() as log:
        y, z, _, _ = linear_forward(x, w, b, "silu", store_preact=True)
        dx, dw, db = linear_backward(dy, x, w, z, "silu", True, True, True)
    fwd, bwd = log[0], log[1:]
    # The kernels got the views themselves (no .contiguous() copy on the way), with their strides.
    assert all(any(a is t for a in fwd.args) for t in (x, w, b))
    assert all(any(a is t for launch in bwd for a in launch.args) for t in (dy, x, w))
    assert set(x.stride()) <= set(a for a in fwd.args if isinstance(a, int))
    ref64, ref = _references(x, w, b, "silu", dy)
    for got, r64, r in zip((y, dx, dw, db), ref64, ref):
        assert_matches(got, r64, r, how)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True), (False, True, True)])
def test_only_requested_gradients_are_computed(device, need, bwd_variant):
    """Frozen weight ⇒ no dW tiles; input without grad ⇒ no dX tiles; bias only ⇒ only row sums (in the
    dZ pass, or in bias-only programs of the one-launch design)."""
    _needs_kernels(device)
    M, K, N = 40, 24, 36
    x, w, dy = randn(M, K, device=device), randn(N, K, device=device), randn(M, N, device=device)
    y, _, _, _ = linear_forward(x, w, None, "relu")
    with record_launches() as log:
        dx, dw, db = linear_backward(dy, x, w, y, "relu", *need)
    gemms = need[0] or need[1]
    if bwd_variant.dz_pass:
        assert [l.kernel for l in log] == ["linear_dz"] + (["linear_bwd"] if gemms else [])
        assert log[0].flags["COMPUTE_DB"] == need[2] and log[0].flags["WRITE_DZ"]
    else:
        assert [l.kernel for l in log] == ["linear_bwd_prologue"]
    if gemms or not bwd_variant.dz_pass:
        flags = _gemm(log).flags
        assert (flags["COMPUTE_DX"], flags["COMPUTE_DW"]) == need[:2]
        assert flags["COMPUTE_DB"] == (need[2] and not bwd_variant.dz_pass)
        bm, bn = flags["BLOCK_M"], flags["BLOCK_N"]
        tiles_dx = -(-M // bm) * -(-K // bn) if need[0] else 0
        tiles_dw = -(-N // bm) * (-(-K // bn) if need[1] else (1 if flags["COMPUTE_DB"] else 0))
        assert _gemm(log).grid == (tiles_dx + tiles_dw,)
    assert (dx is not None, dw is not None, db is not None) == need
    ref64, ref = _references(x, w, torch.zeros(N, device=device), "relu", dy)
    for got, r64, r in zip((dx, dw, db), ref64[1:], ref[1:]):
        if got is not None:
            assert_matches(got, r64, r)


@pytest.mark.parametrize("act, bias", [(None, False), (None, True), ("gelu", False), ("gelu", True)])
def test_backward_launches(device, act, bias):
    """The default backward: a dZ pass only where there is something to do elementwise (act' or db),
    then one GEMM launch for dX and dW tiles with no activation; the first design is one launch."""
    _needs_kernels(device)
    x, w, dy = randn(33, 17, device=device), randn(21, 17, device=device), randn(33, 21, device=device)
    z = randn(33, 21, device=device)
    with record_launches() as log:
        linear_backward(dy, x, w, z if act else None, act, True, True, bias)
    kernels = [l.kernel for l in log]
    assert kernels == (["linear_dz", "linear_bwd"] if act or bias else ["linear_bwd"])
    if act or bias:
        assert (log[0].flags["WRITE_DZ"], log[0].flags["COMPUTE_DB"]) == (act is not None, bias)
    gemm = _gemm(log).flags
    assert gemm["ACT"] == 0 and not gemm["COMPUTE_DB"] and gemm["COMPUTE_DX"] and gemm["COMPUTE_DW"]
    with variants.use("linear_bwd_prologue"), record_launches() as log:
        linear_backward(dy, x, w, z if act else None, act, True, True, bias)
    assert [l.kernel for l in log] == ["linear_bwd_prologue"] and log[0].flags["COMPUTE_DB"] == bias


@pytest.mark.parametrize("shape", [(0, 8, 5), (6, 0, 5), (6, 8, 0)], ids=["M=0", "K=0", "N=0"])
def test_empty_dimensions(device, shape):
    _needs_kernels(device)
    M, K, N = shape
    x, w, b, dy = randn(M, K, device=device), randn(N, K, device=device), randn(N, device=device), randn(
        M, N, device=device)
    y, z, _, _ = linear_forward(x, w, b, "gelu", store_preact=True)
    dx, dw, db = linear_backward(dy, x, w, z, "gelu", True, True, True)
    ref64, ref = _references(x, w, b, "gelu", dy)
    for got, r in zip((y, dx, dw, db), ref64):
        assert got.shape == r.shape
        torch.testing.assert_close(got.double(), r, atol=1e-6, rtol=1e-5)


def test_fp32_precision_follows_torch(device):
    """Triton's default fp32 dot is TF32; ours follows torch.backends.cuda.matmul.allow_tf32."""
    _needs_kernels(device)
    x, w = randn(8, 16, device=device), randn(8, 16, device=device)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, expect in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            with record_launches() as log:
                linear_forward(x, w)
            assert log[0].flags["PRECISION"] == expect
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    with record_launches() as log:
        linear_forward(x.double(), w.double())
    assert log[0].flags["PRECISION"] == "ieee"
    old_precision = torch.get_float32_matmul_precision()
    try:
        for setting, expect in (("high", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)  # the other switch users reach for
            with record_launches() as log:
                linear_forward(x, w)
            assert log[0].flags["PRECISION"] == expect, setting
    finally:
        torch.set_float32_matmul_precision(old_precision)


@pytest.mark.parametrize("K", [14, 150], ids=["one_k_block", "three_k_blocks"])
def test_forward_mode_tangents_in_the_same_launch(device, K):
    """Ẏ = act'(Z) ⊙ (Ẋ·Wᵀ + X·Ẇᵀ + ḃ) from one launch that also writes Y (K = 150: the tangent
    pointers must advance with the primal ones through the K loop)."""
    _needs_kernels(device)
    x, w, b = (randn(*s, dtype=torch.float64, device=device) for s in ((9, K), (6, K), (6,)))
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    for act in ACTS:
        with record_launches() as log:
            y, z, yt, zt = linear_forward(x, w, b, act, store_preact=True, x_tangent=xt,
                                          weight_tangent=wt, bias_tangent=bt, store_preact_tangent=True)
        assert len(log) == 1
        y_ref, yt_ref = torch.func.jvp(lambda x, w, b: reference_linear(x, w, b, act), (x, w, b), (xt, wt, bt))
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(yt, yt_ref)
        torch.testing.assert_close(zt, xt @ w.t() + x @ wt.t() + bt)


def test_int64_offsets_are_chosen_for_huge_strides(device):
    """The decision uses the largest element offset, so a small view over a huge stride needs int64."""
    assert not needs_int64(torch.empty(4, 4, device=device))
    # meta tensors: the strides of a huge tensor without its memory
    assert needs_int64(torch.empty_strided((2, 4), (2**31, 1), device="meta"))
    assert needs_int64(torch.empty_strided((2, 4), (1, 2**31), device="meta"))
    assert needs_int64(torch.empty((2**16, 2**15 + 1), device="meta"))
    assert not needs_int64(torch.empty((2**16, 2**15 - 1), device="meta"))


def _huge_view(shape, strides, dtype, device):
    """A view with the given (huge) strides over a buffer that is only reserved: just the elements of
    the view are written, so only their pages become resident."""
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    view = torch.empty(span, dtype=dtype, device=device).as_strided(shape, strides)
    view.copy_(randn(*shape, dtype=dtype, device=device))
    return view


def huge_stride_case(device, layout):
    """Run in a subprocess by the test below (a wrapped int32 offset can crash the process).

    rows:     x (3, 16) with row stride 2³⁰+8: row 2 starts past 2³¹.
    k_cols:   x (4, 80), w (8, 80) with column stride 2²⁵+8. 80 > BLOCK_K, so the forward's K loop
              steps the pointers by BLOCK_K·stride ≈ 2³¹: the K-direction strides must be widened too.
    m_rows:   x (80, 64), dy (80, 8) with row stride 2²⁵+8: the dW product reduces over those rows,
              so its K loop steps by BLOCK_K·(2²⁵+8) (BLOCK_K = 64 for in_features = 64).
    n_cols:   w (80, 64) with row stride 2²⁵+8 and dy (4, 80) with column stride 2²⁵+8: the dX product
              reduces over N, so its K loop steps by BLOCK_K·(2²⁵+8).
    """
    f16, big = torch.float16, 2**25 + 8
    M, K, N = {"rows": (3, 16, 8), "k_cols": (4, 80, 8), "m_rows": (80, 64, 8), "n_cols": (4, 64, 80)}[layout]
    x = _huge_view((M, K), {"rows": (2**30 + 8, 1), "k_cols": (1, big), "m_rows": (big, 1)}.get(layout, (K, 1)),
                   f16, device)
    w = _huge_view((N, K), {"k_cols": (1, big), "n_cols": (big, 1)}.get(layout, (K, 1)), f16, device)
    dy = _huge_view((M, N), {"m_rows": (big, 1), "n_cols": (1, big)}.get(layout, (N, 1)), f16, device)
    with record_launches() as log:
        y, _, _, _ = linear_forward(x, w)
        dx, dw, _ = linear_backward(dy, x, w, None, None, True, True, False)
    assert all(l.flags["INT64"] for l in log)
    if layout != "rows":  # each K-loop step moves BLOCK_K·(2²⁵+8) ≥ 2³¹ elements
        assert all(l.flags["BLOCK_K"] * big >= 2**31 for l in log)
    ref64, ref = _references(x, w, torch.zeros(N, dtype=f16, device=device), None, dy)
    for name, got, r64, r in zip(("y", "dx", "dw"), (y, dx, dw), ref64, ref):
        assert_matches(got, r64, r, f"{name} ({layout})")


@pytest.mark.parametrize("layout", ["rows", "k_cols", "m_rows", "n_cols"])
def test_huge_strides_are_read_correctly(device, layout):
    """Views whose largest offset passes 2³¹, in every direction a K loop steps through."""
    _needs_kernels(device)
    run_isolated("test_kernels", "huge_stride_case", device, layout)


def test_int64_path_on_small_tensors(device):
    """The INT64 specialisation itself (forced on small operands), every kernel path, against references."""
    _needs_kernels(device)
    x, w, b, dy = (randn(*s, device=device) for s in ((70, 130), (72, 130), (72,), (70, 72)))
    with force_int64(), record_launches() as log:
        y, z, _, _ = linear_forward(x, w, b, "gelu", store_preact=True)
        dx, dw, db = linear_backward(dy, x, w, z, "gelu", True, True, True)
    assert len(log) >= 2 and all(l.flags["INT64"] for l in log)
    ref64, ref = _references(x, w, b, "gelu", dy)
    for name, got, r64, r in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), ref64, ref):
        assert_matches(got, r64, r, name)


def test_weight_grad_accumulates_into_fp32_main_grad(device, bwd_variant):
    """bf16 weight, fp32 main_grad: dW is added in the kernel epilogue (ACCUMULATE_DW), no dW buffer."""
    _needs_kernels(device)
    M, K, N = 21, 18, 12
    x, w, dy = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K), (M, N)))
    y, z, _, _ = linear_forward(x, w, None, "gelu", store_preact=True)
    start = randn(N, K, device=device)
    main_grad = start.clone()
    with record_launches() as log:
        dx, dw, _ = linear_backward(dy, x, w, z, "gelu", True, True, False,
                                    weight_grad_out=main_grad)
    assert dw is main_grad and _gemm(log).flags["ACCUMULATE_DW"]
    ref64, ref = _references(x, w, torch.zeros(N, dtype=torch.bfloat16, device=device), "gelu", dy)
    assert_matches(main_grad - start, ref64[2], ref[2].float(), "main_grad increment")
    assert_matches(dx, ref64[1], ref[1], "dx")


def test_input_grad_accumulates_into_fp32_buffer(device, bwd_variant):
    """input_grad_out (the LM head's fp32 dX over class chunks): dX is added in the epilogue (ACCUMULATE_DX),
    in the same launch as a plain dW."""
    _needs_kernels(device)
    M, K, N = 21, 18, 12
    x, w, dy = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K), (M, N)))
    start = randn(M, K, device=device)
    acc = start.clone()
    with record_launches() as log:
        dx, dw, _ = linear_backward(dy, x, w, None, None, True, True, False, input_grad_out=acc)
    assert dx is acc and _gemm(log).flags["ACCUMULATE_DX"] and not _gemm(log).flags["ACCUMULATE_DW"]
    ref64, ref = _references(x, w, torch.zeros(N, dtype=torch.bfloat16, device=device), None, dy)
    assert_matches(acc - start, ref64[1], ref[1].float(), "dx increment")
    assert_matches(dw, ref64[2], ref[2], "dw")


def test_every_kernel_path_over_several_k_blocks(device, bwd_variant):
    """Every loop of every kernel runs more than one K block: M, N > 64 and K > 128, the interpreter's
    tiles being at most 64 deep. Forward (+Z), forward with all three tangents, backward dX (reduces over
    N), dW (reduces over M) and db, and the accumulating dW."""
    _needs_kernels(device)
    M, K, N = 70, 130, 72
    x, w, b, dy = (randn(*s, device=device) for s in ((M, K), (N, K), (N,), (M, N)))
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    act = "gelu_tanh"
    with record_launches() as log:
        y, z, _, _ = linear_forward(x, w, b, act, store_preact=True)
        y2, _, yt, _ = linear_forward(x, w, b, act, x_tangent=xt, weight_tangent=wt,
                                      bias_tangent=bt)
        dx, dw, db = linear_backward(dy, x, w, z, act, True, True, True)
        start = randn(N, K, device=device)
        main_grad = start.clone()
        linear_backward(dy, x, w, z, act, False, True, False, weight_grad_out=main_grad)
    for l in log:
        if l.kernel != "linear_dz":  # (elementwise: no K loop)
            assert l.flags["BLOCK_K"] < min(M, N, K), l  # at least two K blocks in every product
    ref64, ref = _references(x, w, b, act, dy)
    for name, got, r64, r in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), ref64, ref):
        assert_matches(got, r64, r, name)
    assert_matches(main_grad - start, ref64[2], ref[2], "accumulated dw")
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    with torch.no_grad():
        dual64 = torch.func.jvp(lambda *a: reference_linear(*a, act), tuple(t.double() for t in (x, w, b)),
                                tuple(t.double() for t in (xt, wt, bt)))[1]
        dual = torch.func.jvp(lambda *a: reference_linear(*a, act), (x, w, b), (xt, wt, bt))[1]
    assert_matches(yt, dual64, dual, "tangent")


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, _cast(x, tl.bfloat16, EMULATE_BF16), mask=offs < n)


def test_bf16_store_rounds_to_nearest_even_bit_for_bit(device):
    """The kernels' fp32 → bf16 store against torch's own conversion (round to nearest, ties to even):
    exact ties with an even and with an odd kept half, just below and above a tie, the largest finite
    value (rounds to inf), subnormals, ±0, ±inf, NaNs (any payload stays NaN), and random values."""
    _needs_kernels(device)
    upper = torch.tensor([0x3F80, 0x3F81, 0x4049, 0x404A, 0xC2F7, 0xC2F8, 0x0001, 0x0002, 0x7F7E, 0x7F7F],
                         dtype=torch.int64)
    low = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)
    crafted = ((upper[:, None] << 16) | low[None, :]).flatten()
    specials = torch.tensor([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF,
                             0xFFFFFFFF, 0x7F80FFFF, 0x7F7FFFFF, 0x00008000, 0x00018000], dtype=torch.int64)
    random = torch.randint(0, 2**32, (4096,), dtype=torch.int64)
    bits = torch.cat([crafted, specials, random])
    x = (bits - (bits >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32).to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), EMULATE_BF16=INTERPRETER, BLOCK=1024)
    expect = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), expect.isnan()), "a NaN was not kept (or one was made)"
    keep = ~expect.isnan()
    got_bits, expect_bits = y[keep].view(torch.int16), expect[keep].view(torch.int16)
    wrong = (got_bits != expect_bits).nonzero().flatten()
    assert wrong.numel() == 0, [(hex(int(b) & 0xFFFFFFFF), hex(int(g) & 0xFFFF), hex(int(e) & 0xFFFF))
                                for b, g, e in zip(bits[keep.cpu()][wrong.cpu()][:5], got_bits[wrong][:5],
                                                   expect_bits[wrong][:5])]


def _count_dots(monkeypatch):
    """Count the tl.dot calls the interpreter executes (each is one BLOCK_M×BLOCK_K @ BLOCK_K×BLOCK_N)."""
    from triton.runtime.interpreter import InterpreterBuilder

    calls = []
    original = InterpreterBuilder.create_dot

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", counting)
    return calls


@pytest.mark.parametrize("need", [(False, False, True), (True, False, True), (False, True, False)],
                         ids=["bias_only", "input_and_bias", "weight_only"])
def test_frozen_weight_programs_run_no_dot(device, need, monkeypatch, bwd_variant):
    """The bias-only programs of a frozen weight sum dZ rows and run no product: the interpreter's dot
    count is exactly that of the requested products' K loops (zero for the bias alone, which the
    default backward leaves to its dZ pass)."""
    if not (device == "cpu" and INTERPRETER):
        pytest.skip("counts the dot calls of Triton's interpreter (CPU); the launch flags are tested on CUDA")
    M, K, N = 40, 24, 36
    x, w, dy = randn(M, K, device=device), randn(N, K, device=device), randn(M, N, device=device)
    calls = _count_dots(monkeypatch)
    with record_launches() as log:
        linear_backward(dy, x, w, None, None, *need)
    gemms = [l for l in log if l.kernel.startswith("linear_bwd")]
    if not gemms:
        assert bwd_variant.dz_pass and need == (False, False, True) and not calls
        return
    f = gemms[0].flags
    bm, bn, bk = f["BLOCK_M"], f["BLOCK_N"], f["BLOCK_K"]
    dots_dx = -(-M // bm) * -(-K // bn) * -(-N // bk) if need[0] else 0  # tiles × K-loop steps (over N)
    dots_dw = -(-N // bm) * -(-K // bn) * -(-M // bk) if need[1] else 0  # tiles × K-loop steps (over M)
    assert len(calls) == dots_dx + dots_dw


def test_tangents_laid_out_unlike_their_primals(device):
    """A direct ``linear_forward`` call may pass each tangent with strides of its own: Ẋ and Ẇ transposed,
    ḃ sliced, beside contiguous X, W and b (torch.func copies a tangent into its primal's layout, so only
    this call can mix them). K = 150: the tangent pointers step through several K blocks."""
    _needs_kernels(device)
    M, K, N = 9, 150, 6
    x, w, b = (randn(*s, dtype=torch.float64, device=device) for s in ((M, K), (N, K), (N,)))
    xt = randn(K, M, dtype=torch.float64, device=device).t()
    wt = randn(K, N, dtype=torch.float64, device=device).t()
    bt = randn(2 * N, dtype=torch.float64, device=device)[::2]
    for act in ACTS:
        y, z, yt, zt = linear_forward(x, w, b, act, store_preact=True, x_tangent=xt, weight_tangent=wt,
                                      bias_tangent=bt, store_preact_tangent=True)
        y_ref, yt_ref = torch.func.jvp(lambda x, w, b: reference_linear(x, w, b, act), (x, w, b),
                                       (xt.contiguous(), wt.contiguous(), bt.contiguous()))
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(zt, xt @ w.t() + x @ wt.t() + bt)
        torch.testing.assert_close(yt, yt_ref, msg=lambda m: f"{act}: {m}")


@pytest.mark.parametrize("store", [(False, False), (True, False), (False, True)],
                         ids=["neither", "z_only", "zt_only"])
def test_tangent_kernel_writes_exactly_the_outputs_asked_for(device, store):
    """store_preact and store_preact_tangent are independent: each asked-for output is written (and
    right), the others are None and nothing is written in their place (y stays y)."""
    _needs_kernels(device)
    x, w, b = (randn(*s, dtype=torch.float64, device=device) for s in ((11, 20), (7, 20), (7,)))
    xt, wt = torch.randn_like(x), torch.randn_like(w)
    with record_launches() as log:
        y, z, yt, zt = linear_forward(x, w, b, "gelu", store_preact=store[0], x_tangent=xt, weight_tangent=wt,
                                      store_preact_tangent=store[1])
    assert (log[0].flags["STORE_Z"], log[0].flags["STORE_ZT"]) == store
    assert (z is not None, zt is not None) == store
    y_ref, yt_ref = torch.func.jvp(lambda x, w: reference_linear(x, w, b, "gelu"), (x, w), (xt, wt))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(yt, yt_ref)
    if z is not None:
        torch.testing.assert_close(z, x @ w.t() + b)
    if zt is not None:
        torch.testing.assert_close(zt, xt @ w.t() + x @ wt.t())


def huge_tangent_case(device):
    """Run in a subprocess by the test below: tangents whose own largest offset passes 2³¹ beside small
    primals, so only the tangents can ask for 64-bit offsets.

    Ẋ (3, 16) with row stride 2³⁰+8 (row 2 starts past 2³¹); Ẇ (8, 80) with column stride 2²⁵+8 (80 > BLOCK_K:
    the K loop steps the Ẇ pointers by BLOCK_K·stride ≈ 2³¹).
    """
    f16 = torch.float16
    for M, K, N, xt_strides, wt_strides in ((3, 16, 8, (2**30 + 8, 1), None), (4, 80, 8, None, (1, 2**25 + 8))):
        x, w = randn(M, K, dtype=f16, device=device), randn(N, K, dtype=f16, device=device, scale=K ** -0.5)
        xt = _huge_view((M, K), xt_strides, f16, device) if xt_strides else randn(M, K, dtype=f16, device=device)
        wt = _huge_view((N, K), wt_strides, f16, device) if wt_strides else randn(N, K, dtype=f16, device=device)
        with record_launches() as log:
            y, _, yt, _ = linear_forward(x, w, None, "gelu", x_tangent=xt, weight_tangent=wt)
        assert log[0].flags["INT64"], (xt_strides, wt_strides)
        primals, tangents = (x, w), (xt.contiguous(), wt.contiguous())
        y64, yt64 = torch.func.jvp(lambda x, w: reference_linear(x, w, None, "gelu"),
                                   tuple(t.double() for t in primals), tuple(t.double() for t in tangents))
        ye, yte = torch.func.jvp(lambda x, w: reference_linear(x, w, None, "gelu"), primals, tangents)
        assert_matches(y, y64, ye, f"y {xt_strides} {wt_strides}")
        assert_matches(yt, yt64, yte, f"tangent {xt_strides} {wt_strides}")


def test_huge_strided_tangents_are_read_correctly(device):
    """The 64-bit decision covers the tangents, and their K-direction steps are widened too."""
    _needs_kernels(device)
    run_isolated("test_kernels", "huge_tangent_case", device)


def offset_2_31_case(device):
    """Run in a subprocess by the test below: x (3, 1) with row stride 2³⁰, so its last element sits at
    offset exactly 2³¹ (one past int32) and the kernels' index product row·stride = 2·2³⁰ wraps in int32
    (measured: a segfault); forward and both gradients (dW reads x as its B operand)."""
    f16 = torch.float16
    x = _huge_view((3, 1), (2**30, 1), f16, device)
    w, dy = randn(8, 1, dtype=f16, device=device), randn(3, 8, dtype=f16, device=device)
    with record_launches() as log:
        y, _, _, _ = linear_forward(x, w)
        dx, dw, _ = linear_backward(dy, x, w, None, None, True, True, False)
    assert all(l.flags["INT64"] for l in log)
    ref64, ref = _references(x, w, torch.zeros(8, dtype=f16, device=device), None, dy)
    for name, got, r64, r in zip(("y", "dx", "dw"), (y, dx, dw), ref64, ref):
        assert_matches(got, r64, r, name)


def test_int64_from_a_largest_offset_of_exactly_2_31(device):
    """The threshold itself: an operand whose largest element offset is 2³¹ (int32's max + 1) needs int64,
    decided from meta tensors and checked end to end (in a subprocess) on a view that ends there."""
    for shape, strides in (((3, 1), (2**30, 1)), ((2, 16), (2**31 - 15, 1)), ((16, 2), (1, 2**31 - 15))):
        assert needs_int64(torch.empty_strided(shape, strides, device="meta")), (shape, strides)
    assert not needs_int64(torch.empty_strided((2, 16), (2**31 - 64, 1), device="meta"))
    _needs_kernels(device)
    run_isolated("test_kernels", "offset_2_31_case", device)


@pytest.mark.parametrize("act", ACTS)
def test_eager_backend_meets_the_kernel_contract(device, act):
    """``fusedad/eager.py`` (CPU without the interpreter, other devices, custom-op bodies that Inductor
    compiles) takes and returns what the kernel launchers do, checked against the same references: y,
    z, dX, dW, db, dW added into a non-zero main_grad, and forward-mode tangents. The interpreter suite
    routes nothing through it, so it is called here directly."""
    from fusedad.activations import lookup
    from fusedad.backend import _BACKENDS

    eager, row = _BACKENDS["eager"], lookup(act)
    M, K, N = 19, 23, 13
    x, w, b, dy = (randn(*s, device=device) for s in ((M, K), (N, K), (N,), (M, N)))
    y, z, yt, zt = eager.forward(x, w, b, row, store_preact=True)
    assert yt is None and zt is None
    saved = row.saved(y, z)
    dx, dw, db = eager.backward(dy, x, w, saved, row, True, True, True)
    ref64, ref = _references(x, w, b, act, dy)
    for name, got, r64, r in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), ref64, ref):
        assert got.dtype == x.dtype
        assert_matches(got, r64, r, f"eager backend {name} ({act})")
    assert_matches(z, torch.nn.functional.linear(*(t.double() for t in (x, w, b))), torch.nn.functional.linear(x, w, b))
    start = randn(N, K, device=device)
    main_grad = start.clone()
    dx2, dw2, db2 = eager.backward(dy, x, w, saved, row, False, True, False, weight_grad_out=main_grad)
    assert dx2 is None and db2 is None and dw2 is main_grad
    assert_matches(main_grad - start, ref64[2], ref[2], f"eager backend main_grad increment ({act})")
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    _, _, yt, zt = eager.forward(x, w, b, row, x_tangent=xt, weight_tangent=wt, bias_tangent=bt,
                                 store_preact_tangent=True)
    yt64, yte = (torch.func.jvp(lambda *a: reference_linear(*a, act), tuple(t.to(dt) for t in (x, w, b)),
                                tuple(t.to(dt) for t in (xt, wt, bt)))[1] for dt in (torch.float64, x.dtype))
    assert_matches(yt, yt64, yte, f"eager backend tangent ({act})")
    assert_matches(zt, (xt @ w.t() + x @ wt.t() + bt).double(), xt @ w.t() + x @ wt.t() + bt)

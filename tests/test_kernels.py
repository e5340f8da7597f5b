"""The launch wrappers in ``kernels/linear.py`` against fp64 and eager references.

On a CPU-only machine these run the kernels through Triton's interpreter, never the eager fallback.
"""
import pytest
import torch

from conftest import ACTS, DEVICES, DTYPES, assert_matches, randn, reference_linear, runs_kernels
from fusedad.kernels import ACTIVATION_IDS, linear_backward, linear_forward, needs_int64, record_launches

pytestmark = pytest.mark.parametrize("device", DEVICES)


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
def test_forward_backward_every_activation_and_dtype(device, dtype, act):
    _needs_kernels(device)
    M, K, N = 19, 23, 13  # primes: every tile edge is masked
    x, w, b, dy = (randn(*s, dtype=dtype, device=device) for s in ((M, K), (N, K), (N,), (M, N)))
    y, z, _, _ = linear_forward(x, w, b, ACTIVATION_IDS[act], store_preact=True)
    saved = y if act == "relu" else z
    dx, dw, db = linear_backward(dy, x, w, saved, ACTIVATION_IDS[act], True, True, True)
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
    y, z, _, _ = linear_forward(x, w, None, ACTIVATION_IDS[act], store_preact=act is not None)
    dx, dw, db = linear_backward(dy, x, w, z, ACTIVATION_IDS[act], True, True, False)
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
def test_any_strides_without_copies(device, how):
    _needs_kernels(device)
    x, w, b, dy = _strided_operands(device, how)
    y, z, _, _ = linear_forward(x, w, b, ACTIVATION_IDS["silu"], store_preact=True)
    dx, dw, db = linear_backward(dy, x, w, z, ACTIVATION_IDS["silu"], True, True, True)
    ref64, ref = _references(x, w, b, "silu", dy)
    for got, r64, r in zip((y, dx, dw, db), ref64, ref):
        assert_matches(got, r64, r, how)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True), (False, True, True)])
def test_only_requested_gradients_are_computed(device, need):
    """Frozen weight ⇒ no dW tiles; input without grad ⇒ no dX tiles; bias only ⇒ only row sums."""
    _needs_kernels(device)
    M, K, N = 40, 24, 36
    x, w, dy = randn(M, K, device=device), randn(N, K, device=device), randn(M, N, device=device)
    y, _, _, _ = linear_forward(x, w, None, ACTIVATION_IDS["relu"])
    with record_launches() as log:
        dx, dw, db = linear_backward(dy, x, w, y, ACTIVATION_IDS["relu"], *need)
    assert [l.kernel for l in log] == ["linear_bwd"]
    flags = log[0].flags
    assert (flags["COMPUTE_DX"], flags["COMPUTE_DW"], flags["COMPUTE_DB"]) == need
    bm, bn = flags["BLOCK_M"], flags["BLOCK_N"]
    tiles_dx = -(-M // bm) * -(-K // bn) if need[0] else 0
    tiles_dw = -(-N // bm) * (-(-K // bn) if need[1] else (1 if need[2] else 0))
    assert log[0].grid == (tiles_dx + tiles_dw,)
    assert (dx is not None, dw is not None, db is not None) == need
    ref64, ref = _references(x, w, torch.zeros(N, device=device), "relu", dy)
    for got, r64, r in zip((dx, dw, db), ref64[1:], ref[1:]):
        if got is not None:
            assert_matches(got, r64, r)


def test_one_launch_for_dx_dw_db(device):
    _needs_kernels(device)
    x, w, dy = randn(33, 17, device=device), randn(21, 17, device=device), randn(33, 21, device=device)
    with record_launches() as log:
        linear_backward(dy, x, w, None, 0, True, True, True)
    assert len(log) == 1 and log[0].flags["COMPUTE_DX"] and log[0].flags["COMPUTE_DW"]


@pytest.mark.parametrize("shape", [(0, 8, 5), (6, 0, 5), (6, 8, 0)], ids=["M=0", "K=0", "N=0"])
def test_empty_dimensions(device, shape):
    _needs_kernels(device)
    M, K, N = shape
    x, w, b, dy = randn(M, K, device=device), randn(N, K, device=device), randn(N, device=device), randn(
        M, N, device=device)
    y, z, _, _ = linear_forward(x, w, b, ACTIVATION_IDS["gelu"], store_preact=True)
    dx, dw, db = linear_backward(dy, x, w, z, ACTIVATION_IDS["gelu"], True, True, True)
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


def test_forward_mode_tangents_in_the_same_launch(device):
    """Ẏ = act'(Z) ⊙ (Ẋ·Wᵀ + X·Ẇᵀ + ḃ) from one launch that also writes Y."""
    _needs_kernels(device)
    x, w, b = randn(9, 14, dtype=torch.float64, device=device), randn(6, 14, dtype=torch.float64,
                                                                          device=device), randn(6, dtype=torch.float64, device=device)
    xt, wt, bt = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    for act in ACTS:
        with record_launches() as log:
            y, z, yt, zt = linear_forward(x, w, b, ACTIVATION_IDS[act], store_preact=True, x_tangent=xt,
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


def test_huge_stride_view_is_read_correctly(device):
    """A (3, 16) view with row stride 2³⁰+8: row 2 starts past 2³¹, where int32 offsets wrap.

    (Checked by hand: forcing int32 here segfaults the interpreter.) The 6 GiB fp16 buffer is only
    reserved; the three rows written are the only resident pages.
    """
    _needs_kernels(device)
    stride = 2**30 + 8
    base = torch.empty(2 * stride + 16, dtype=torch.float16, device=device)
    x = base.as_strided((3, 16), (stride, 1))
    x.copy_(randn(3, 16, dtype=torch.float16, device=device))
    w, dy = randn(8, 16, dtype=torch.float16, device=device), randn(3, 8, dtype=torch.float16, device=device)
    with record_launches() as log:
        y, _, _, _ = linear_forward(x, w)
        dx, dw, _ = linear_backward(dy, x, w, None, 0, True, True, False)
    assert all(l.flags["INT64"] for l in log)
    ref64, ref = _references(x, w, torch.zeros(8, dtype=torch.float16, device=device), None, dy)
    for got, r64, r in zip((y, dx, dw), ref64, ref):
        assert_matches(got, r64, r)


def test_weight_grad_accumulates_into_fp32_main_grad(device):
    """bf16 weight, fp32 main_grad: dW is added in the kernel epilogue (ACCUMULATE_DW), no dW buffer."""
    _needs_kernels(device)
    M, K, N = 21, 18, 12
    x, w, dy = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K), (M, N)))
    y, z, _, _ = linear_forward(x, w, None, ACTIVATION_IDS["gelu"], store_preact=True)
    start = randn(N, K, device=device)
    main_grad = start.clone()
    with record_launches() as log:
        dx, dw, _ = linear_backward(dy, x, w, z, ACTIVATION_IDS["gelu"], True, True, False,
                                    weight_grad_out=main_grad)
    assert dw is main_grad and log[0].flags["ACCUMULATE_DW"]
    ref64, ref = _references(x, w, torch.zeros(N, dtype=torch.bfloat16, device=device), "gelu", dy)
    assert_matches(main_grad - start, ref64[2], ref[2].float(), "main_grad increment")
    assert_matches(dx, ref64[1], ref[1], "dx")

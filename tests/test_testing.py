"""``fusedad.testing`` as a user would run it on their own linear: it passes a correct one and fails
wrong ones (a tolerance check that cannot fail would prove nothing)."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.gradcheck import GradcheckError

import fusedad
import fusedad.testing as ft
from conftest import randn


class _OffByScale(torch.autograd.Function):
    """A linear whose weight gradient is 0.2% off: the kind of bug a loose tolerance would hide."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        return dy @ w, 1.002 * (dy.t() @ x)


def _wrong_weight_grad(x, w, b=None, activation=None):
    return ft.reference_linear(_OffByScale.apply(x, w), torch.eye(w.shape[0], dtype=x.dtype), b, activation)


def _forgot_bias(x, w, b=None, activation=None):
    return ft.reference_linear(x, w, None, activation)


def test_passes_fusedad_and_eager_linear():
    x = randn(7, 12, dtype=torch.bfloat16, requires_grad=True)
    w = randn(5, 12, dtype=torch.bfloat16, requires_grad=True)
    b = randn(5, dtype=torch.bfloat16, requires_grad=True)
    dy = randn(7, 5, dtype=torch.bfloat16)
    for linear in (fusedad.linear, lambda x, w, b, act: F.gelu(F.linear(x, w, b)) if act else F.linear(x, w, b)):
        ft.check_against_references(x, w, b, "gelu", dy, fused=linear)
    assert ft.gradcheck(fusedad.linear, "relu2") and ft.gradgradcheck(fusedad.linear, "gelu")
    assert ft.forward_ad_check(fusedad.linear, "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fails_a_gradient_that_is_slightly_off(dtype):
    x, w = randn(9, 6, dtype=dtype, requires_grad=True), randn(4, 6, dtype=dtype, requires_grad=True)
    with pytest.raises(AssertionError, match="grad of weight"):
        ft.check_against_references(x, w, None, None, randn(9, 4, dtype=dtype), fused=_wrong_weight_grad)


def test_fails_a_missing_bias_and_gradcheck_fails_a_wrong_backward():
    x, w, b = randn(3, 4), randn(2, 4), randn(2)
    with pytest.raises(AssertionError, match="forward"):
        ft.check_against_references(x, w, b, "relu", fused=_forgot_bias)
    with pytest.raises(GradcheckError):
        ft.gradcheck(lambda x, w, b, act: _wrong_weight_grad(x, w, b, act), None)


def test_poison_outputs_fills_kernel_outputs_with_nan():
    from fusedad.kernels import linear as launchers

    before = launchers.POISON_OUTPUTS
    launchers.POISON_OUTPUTS = False
    try:
        with ft.poison_outputs():
            assert launchers._alloc((2, 2), torch.empty(1)).isnan().all()
        assert launchers.POISON_OUTPUTS is False
    finally:
        launchers.POISON_OUTPUTS = before


def test_nan_positions_must_match_the_reference():
    ref = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    ft.assert_matches(ref.float(), ref, ref.float(), "same NaNs", nan_as_reference=True)
    with pytest.raises(AssertionError, match="NaN positions"):
        ft.assert_matches(torch.tensor([1.0, 2.0, 3.0]), ref, ref.float(), "lost NaN", nan_as_reference=True)

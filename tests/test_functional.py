"""``fusedad.functional.linear`` and its autograd Function: F.linear semantics, every gradient,
gradcheck, grad modes, saved tensors, and errors for bad input."""
import pytest
import torch
import torch.nn.functional as F

import fusedad
from conftest import ACTS, DEVICES, DTYPES, check_against_references, kernel_kinds, randn, runs_kernels
from fusedad.kernels import record_launches

pytestmark = pytest.mark.parametrize("device", DEVICES)


def test_cpu_tests_run_the_kernels_not_the_fallback(device):
    """CI has no GPU: its CPU tests must exercise the Triton kernels through the interpreter."""
    if device == "cpu" and not torch.cuda.is_available():
        assert fusedad.backend(torch.zeros(1)) == "triton-interpreter"
    x, w = randn(3, 4, device=device), randn(5, 4, device=device)
    with record_launches() as log:
        fusedad.linear(x, w)
    assert kernel_kinds(log) == (["linear_fwd"] if runs_kernels(device) else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_gradients(device, dtype, act, bias):
    x = randn(2, 9, 31, dtype=dtype, device=device, requires_grad=True)  # batch dims
    w = randn(17, 31, dtype=dtype, device=device, requires_grad=True, scale=0.3)
    b = randn(17, dtype=dtype, device=device, requires_grad=True) if bias else None
    dy = randn(2, 9, 17, dtype=dtype, device=device)
    check_against_references(x, w, b, act, dy)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 3), (5, 1, 2), (3, 2, 1), (13, 11, 29)],
                         ids=lambda s: "x".join(map(str, s)))
def test_awkward_shapes(device, shape):
    M, K, N = shape
    x = randn(M, K, device=device, requires_grad=True)
    w = randn(N, K, device=device, requires_grad=True)
    b = randn(N, device=device, requires_grad=True)
    check_against_references(x, w, b, "gelu", randn(M, N, device=device))


def test_one_dimensional_input(device):
    x = randn(6, device=device, requires_grad=True)
    w, b = randn(4, 6, device=device, requires_grad=True), randn(4, device=device, requires_grad=True)
    y = check_against_references(x, w, b, "relu", randn(4, device=device))
    assert y.shape == (4,)


def test_one_dimensional_weight(device):
    """F.linear with a (K,) weight gives (*,) — same here."""
    x, w = randn(3, 5, device=device), randn(5, device=device)
    y = fusedad.linear(x, w)
    assert y.shape == (3,)
    torch.testing.assert_close(y, F.linear(x, w))


@pytest.mark.parametrize("lead", [(0,), (4, 0), (0, 3)], ids=str)
def test_empty_batch(device, lead):
    x = randn(*lead, 6, device=device, requires_grad=True)
    w, b = randn(5, 6, device=device, requires_grad=True), randn(5, device=device, requires_grad=True)
    y = fusedad.linear(x, w, b, "silu")
    assert y.shape == (*lead, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w.grad, torch.zeros_like(w))
    torch.testing.assert_close(b.grad, torch.zeros_like(b))


def test_zero_in_features(device):
    """K = 0: y = act(b), dW is empty, db = dY ⊙ act'(b) summed."""
    x = randn(4, 0, device=device, requires_grad=True)
    w, b = randn(3, 0, device=device, requires_grad=True), randn(3, device=device, requires_grad=True)
    check_against_references(x, w, b, "gelu", randn(4, 3, device=device))


@pytest.mark.parametrize("bias_shape", [(), (1,)], ids=["0d", "1"])
def test_broadcast_bias(device, bias_shape):
    x, w = randn(3, 4, device=device), randn(5, 4, device=device)
    b = randn(*bias_shape, device=device, requires_grad=True)
    y = fusedad.linear(x, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b))
    y.sum().backward()
    torch.testing.assert_close(b.grad, torch.full(bias_shape, 15.0, device=device))


@pytest.mark.parametrize("which", ["input_t", "weight_t", "sliced", "grad_t", "grad_expanded"])
def test_non_contiguous_operands(device, which):
    M, K, N = 7, 12, 10
    x = randn(K, M, device=device).t() if which == "input_t" else randn(M, 2 * K, device=device)[:, ::2]
    w = randn(K, N, device=device).t() if which == "weight_t" else randn(N, K, device=device)
    if which != "sliced" and which != "input_t":
        x = randn(M, K, device=device)
    x.requires_grad_()
    w.requires_grad_()
    b = randn(N, device=device, requires_grad=True)
    dy = {"grad_t": randn(N, M, device=device).t(),
          "grad_expanded": randn(1, 1, device=device).expand(M, N)}.get(which, randn(M, N, device=device))
    check_against_references(x, w, b, "gelu_tanh", dy)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(device, act):
    """Finite differences vs our analytical backward, every activation (fusedad.testing keeps the
    inputs of relu-like activations off the kink at 0)."""
    assert fusedad.testing.gradcheck(fusedad.linear, act, device=device)


def test_needs_input_grad_frozen_weight(device):
    """Frozen weight ⇒ the backward launch computes no dW tiles; input without grad ⇒ no dX tiles."""
    if not runs_kernels(device):
        pytest.skip("launch flags exist only where the kernels run")
    x = randn(8, 6, device=device, requires_grad=True)
    w = randn(5, 6, device=device)  # frozen
    b = randn(5, device=device, requires_grad=True)
    y = fusedad.linear(x, w, b, "relu")
    with record_launches() as log:
        y.sum().backward()
    # The dZ pass (act' and db), then the GEMM launch with dX tiles only.
    assert [l.kernel for l in log] == ["linear_dz", "linear_bwd"] and log[0].flags["COMPUTE_DB"]
    assert [(log[1].flags["COMPUTE_DX"], log[1].flags["COMPUTE_DW"])] == [(True, False)]
    assert w.grad is None and x.grad is not None and b.grad is not None

    x2 = randn(8, 6, device=device)
    w2 = randn(5, 6, device=device, requires_grad=True)
    y2 = fusedad.linear(x2, w2, None, "gelu")
    with record_launches() as log:
        y2.sum().backward()
    assert [l.kernel for l in log] == ["linear_dz", "linear_bwd"] and not log[0].flags["COMPUTE_DB"]
    assert [(log[1].flags["COMPUTE_DX"], log[1].flags["COMPUTE_DW"])] == [(False, True)]


def test_saves_only_what_backward_needs(device):
    """Frozen weight: the graph keeps the weight (for dX) and z (for gelu'), never the input."""
    x = randn(4, 3, device=device, requires_grad=True)
    w = randn(2, 3, device=device)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fusedad.linear(x, w, None, "gelu")
    storages = {t.untyped_storage().data_ptr() for t in kept}
    assert len(storages) == 2 and w.untyped_storage().data_ptr() in storages
    assert x.untyped_storage().data_ptr() not in storages


def test_grad_modes_record_nothing_outside_default(device):
    x = randn(4, 6, device=device, requires_grad=True)
    w, b = randn(3, 6, device=device, requires_grad=True), randn(3, device=device, requires_grad=True)
    y_default = fusedad.linear(x, w, b, "gelu")
    with torch.no_grad():
        y_nograd = fusedad.linear(x, w, b, "gelu")
    with torch.inference_mode():
        y_inf = fusedad.linear(x, w, b, "gelu")
    assert y_default.grad_fn is not None and y_default.requires_grad
    assert y_nograd.grad_fn is None and not y_nograd.requires_grad
    assert y_inf.grad_fn is None and torch.is_inference(y_inf)
    torch.testing.assert_close(y_nograd, y_default.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_inf, y_default.detach(), rtol=0, atol=0)


def test_no_preactivation_written_without_grad(device):
    if not runs_kernels(device):
        pytest.skip("launch flags exist only where the kernels run")
    x, w = randn(4, 6, device=device, requires_grad=True), randn(3, 6, device=device, requires_grad=True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), record_launches() as log:
            fusedad.linear(x, w, None, "silu")
        assert log[0].flags["STORE_Z"] is False
    with record_launches() as log:
        fusedad.linear(x, w, None, "silu")
    assert log[0].flags["STORE_Z"] is True
    with record_launches() as log:
        fusedad.linear(x, w, None, "relu")  # relu's derivative is read from y: no z
    assert log[0].flags["STORE_Z"] is False
    # the same under torch.func (the setup_context Function): z only where the derivative reads it
    for act, stored in (("relu", False), ("silu", True)):
        with record_launches() as log:
            torch.func.vjp(lambda a: fusedad.linear(a, w.detach(), None, act), x.detach())
        assert log[0].flags["STORE_Z"] is stored, act


@pytest.mark.parametrize("which", ["input", "weight"])
def test_inplace_change_of_saved_tensor_raises(device, which):
    x = randn(4, 6, device=device, requires_grad=True)
    w = randn(3, 6, device=device, requires_grad=True)
    xi, wi = x * 1, w * 1  # non-leaf copies we may modify in place
    y = fusedad.linear(xi, wi, None, "gelu")
    with torch.no_grad():
        (xi if which == "input" else wi).mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inplace_change_of_relu_output_raises(device):
    x, w = randn(4, 6, device=device, requires_grad=True), randn(3, 6, device=device, requires_grad=True)
    y = fusedad.linear(x, w, None, "relu")
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- errors -----------------------------------------------------------------------------------------

def test_error_shape_mismatch(device):
    with pytest.raises(RuntimeError, match=r"input of shape \(2, 3\).*weight of shape \(4, 5\)"):
        fusedad.linear(randn(2, 3, device=device), randn(4, 5, device=device))


def test_error_bias_shape(device):
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4,\).*got \(5,\)"):
        fusedad.linear(randn(2, 3, device=device), randn(4, 3, device=device), randn(5, device=device))
    with pytest.raises(RuntimeError, match=r"bias must have shape"):
        fusedad.linear(randn(2, 3, device=device), randn(4, 3, device=device), randn(2, 4, device=device))


def test_error_dims(device):
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        fusedad.linear(torch.tensor(1.0, device=device), randn(4, 3, device=device))
    with pytest.raises(RuntimeError, match=r"weight must be 2-D.*\(2, 4, 3\)"):
        fusedad.linear(randn(2, 3, device=device), randn(2, 4, 3, device=device))


def test_error_dtype_mismatch(device):
    with pytest.raises(RuntimeError, match="same dtype.*input: torch.float32, weight: torch.float16"):
        fusedad.linear(randn(2, 3, device=device), randn(4, 3, device=device, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="bias: torch.float64"):
        fusedad.linear(randn(2, 3, device=device), randn(4, 3, device=device),
                       randn(4, device=device, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64], ids=str)
def test_error_unsupported_dtype(device, dtype):
    with pytest.raises(TypeError, match=f"input has dtype {dtype}"):
        fusedad.linear(torch.ones(2, 3, device=device, dtype=dtype), torch.ones(4, 3, device=device, dtype=dtype))


def test_error_unknown_activation(device):
    with pytest.raises(ValueError, match="unknown activation 'tanh'.*relu, gelu, gelu_tanh, silu"):
        fusedad.linear(randn(2, 3, device=device), randn(4, 3, device=device), activation="tanh")


def test_error_device_mismatch(device):
    w = randn(4, 3, device=device)
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match=f"same device.*input on {other}.*weight on {device}"):
        fusedad.linear(torch.empty(2, 3, device=other), w)


def test_error_not_a_tensor(device):
    with pytest.raises(TypeError, match="weight must be a Tensor, got list"):
        fusedad.linear(randn(2, 3, device=device), [[1.0, 2.0, 3.0]])

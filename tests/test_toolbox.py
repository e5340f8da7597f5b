"""fusedad inside PyTorch's toolbox: torch.compile + custom ops (opcheck), autocast, forward-mode AD
(lockstep kernel), torch.func transforms, double backward. (DDP, FSDP2 and DTensor: test_distributed.py.)"""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import fusedad
from conftest import ACTS, DEVICES, randn, reference_linear, rel_err, runs_kernels
from fusedad.kernels import record_launches

pytestmark = pytest.mark.parametrize("device", DEVICES)


def _f64(*shapes, device, requires_grad=True):
    return [randn(*s, dtype=torch.float64, device=device, requires_grad=requires_grad) for s in shapes]


def _off_kink(x, w, b, act):
    """Shift b so that |x·wᵀ + b| ≥ 0.1 for relu-like activations: finite differences then never
    straddle the kink at 0."""
    if act in ("relu", "relu2"):
        with torch.no_grad():
            b += torch.where(F.linear(x, w, b).abs().min(0).values < 0.1, 0.5, 0.0)
    return b


# ---- torch.compile and the custom ops ---------------------------------------------------------------

def _mlp(device):
    return nn.Sequential(fusedad.nn.Linear(8, 16, activation="gelu_tanh"), fusedad.nn.Linear(16, 12, activation="relu"),
                         fusedad.nn.Linear(12, 12, activation="silu"), fusedad.nn.Linear(12, 3)).to(device)


def test_compile_fullgraph_forward_and_backward(device):
    torch._dynamo.reset()
    model = _mlp(device)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    x = randn(5, 8, device=device, requires_grad=True)
    y_c = compiled(x)
    y_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    for p in model.parameters():
        p.grad = None
    x.grad = None
    y = model(x)
    y.square().sum().backward()
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    for g_c, g in zip(grads_c, [p.grad for p in model.parameters()] + [x.grad]):
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-6)


def test_compile_under_autocast_and_batch_dims(device):
    torch._dynamo.reset()
    model = _mlp(device)
    compiled = torch.compile(model, fullgraph=True)
    x = randn(2, 3, 8, device=device)
    dtype = torch.bfloat16
    eager = copy.deepcopy(model)  # the same layers run by eager PyTorch ops (F.linear + activation)

    def run_eager(h):
        for layer in eager:
            h = reference_linear(h, layer.weight, layer.bias, layer.activation)
        return h

    with torch.autocast(device, dtype=dtype):
        y_c, y, y_e = compiled(x), model(x), run_eager(x)
    assert y_c.dtype == y.dtype == y_e.dtype == dtype and y_c.shape == (2, 3, 3)
    torch.testing.assert_close(y_c, y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_c, y_e, rtol=2e-2, atol=2e-2)
    y_c.float().square().sum().backward()
    y_e.float().square().sum().backward()
    for (name, p), p_e in zip(model.named_parameters(), eager.parameters()):
        assert p.grad.dtype == p_e.grad.dtype == torch.float32
        # bf16 products: compare as a whole (‖Δ‖/‖ref‖), a few bf16 roundings deep
        assert rel_err(p.grad, p_e.grad.double()) < 3e-2, name


def test_compiled_graph_calls_our_ops(device):
    """The compiled graph holds fusedad::linear_fwd / linear_bwd, not a decomposition into aten.mm."""
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    x = randn(4, 6, device=device, requires_grad=True)
    w = randn(5, 6, device=device, requires_grad=True)
    torch.compile(lambda x, w: fusedad.linear(x, w, None, "gelu"), backend=backend, fullgraph=True)(x, w)
    assert any(t.startswith("fusedad.linear_fwd") for t in seen), seen


@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh"])
def test_opcheck_custom_ops(device, act):
    x, w, b = _f64((3, 5), (4, 5), (4,), device=device)
    torch.library.opcheck(torch.ops.fusedad.linear_fwd.default, (x, w, b, act, True))
    torch.library.opcheck(torch.ops.fusedad.linear_fwd.default, (x, w, None, act, False))
    gy, z = _f64((3, 4), (3, 4), device=device, requires_grad=False)
    torch.library.opcheck(torch.ops.fusedad.linear_bwd.default,
                          (gy, x.detach(), w.detach(), z if act != "none" else None, act, True, True, True))
    torch.library.opcheck(torch.ops.fusedad.linear_bwd.default, (gy, None, w.detach(), z, act, True, False, False))


def test_eager_calls_do_not_use_the_custom_ops(device):
    """Outside torch.compile the Function launches the kernels directly (no dispatcher boundary); on the
    eager backend torch's own ops are recorded."""
    x, w = randn(3, 4, device=device, requires_grad=True), randn(2, 4, device=device, requires_grad=True)
    y = fusedad.linear(x, w, None, "relu")
    expected = "FusedLinear" if fusedad.backend(x) != "eager" else "ReluBackward"
    assert type(y.grad_fn).__name__.startswith(expected)


# ---- autocast -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_behaves_like_nn_linear(device, dtype):
    ref = nn.Linear(12, 7).to(device)
    ours = fusedad.nn.Linear(12, 7, device=device)
    ours.load_state_dict(ref.state_dict())
    x = randn(5, 12, device=device)
    with torch.autocast(device, dtype=dtype):
        y_ref, y = ref(x), ours(x)
    assert y.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    y_ref.float().sum().backward()
    for p, p_ref in zip(ours.parameters(), ref.parameters()):
        assert p.grad.dtype == p_ref.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=2e-2, atol=5e-2)


# ---- forward-mode AD --------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_forward_ad(device, act):
    assert fusedad.testing.forward_ad_check(fusedad.linear, act, device=device)


def test_forward_ad_primal_and_tangent_in_one_launch(device):
    """forward_ad dual tensors: y and ẏ come from a single lockstep kernel launch."""
    x, w, b = _f64((6, 5), (4, 5), (4,), device=device, requires_grad=False)
    xt, wt = torch.randn_like(x), torch.randn_like(w)
    with fwAD.dual_level(), record_launches() as log:
        y = fusedad.linear(fwAD.make_dual(x, xt), fwAD.make_dual(w, wt), b, "gelu")
        primal, tangent = fwAD.unpack_dual(y)
    if runs_kernels(device):
        assert [(l.kernel, l.flags["HAS_XT"], l.flags["HAS_WT"], l.flags["HAS_BT"]) for l in log] == [
            ("linear_fwd_tangent", True, True, False)]
    y_ref, yt_ref = torch.func.jvp(lambda x, w: reference_linear(x, w, b, "gelu"), (x, w), (xt, wt))
    torch.testing.assert_close(primal, y_ref)
    torch.testing.assert_close(tangent, yt_ref)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_func_jvp(device, act):
    x, w, b = _f64((2, 3, 5), (4, 5), (4,), device=device, requires_grad=False)
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    with record_launches() as log:
        y, yt = torch.func.jvp(lambda *a: fusedad.linear(*a, act), (x, w, b), tangents)
    if runs_kernels(device):
        assert len(log) == 1 and log[0].flags["HAS_XT"]
    y_ref, yt_ref = torch.func.jvp(lambda *a: reference_linear(*a, act), (x, w, b), tangents)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(yt, yt_ref)


# ---- torch.func -------------------------------------------------------------------------------------

def _both(fn_name, act, *args, **kwargs):
    transform = getattr(torch.func, fn_name)
    ours = transform(lambda *a: fusedad.linear(*a, act), **kwargs)(*args)
    ref = transform(lambda *a: reference_linear(*a, act), **kwargs)(*args)
    return ours, ref


def test_func_grad_and_vjp(device):
    x, w, b = _f64((4, 5), (3, 5), (3,), device=device, requires_grad=False)
    ours = torch.func.grad(lambda x, w, b: fusedad.linear(x, w, b, "gelu").square().sum(), argnums=(0, 1, 2))(x, w, b)
    ref = torch.func.grad(lambda x, w, b: reference_linear(x, w, b, "gelu").square().sum(), argnums=(0, 1, 2))(x, w, b)
    torch.testing.assert_close(ours, ref)
    dy = torch.randn(4, 3, dtype=torch.float64, device=device)
    (y, vjp), (y_ref, vjp_ref) = (torch.func.vjp(lambda *a: f(*a, "silu"), x, w, b)
                                  for f in (fusedad.linear, reference_linear))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(vjp(dy), vjp_ref(dy))


@pytest.mark.parametrize("transform", ["jacrev", "jacfwd"])
def test_func_jacobians(device, transform):
    x, w, b = _f64((5,), (3, 5), (3,), device=device, requires_grad=False)
    ours, ref = _both(transform, "gelu_tanh", x, w, b, argnums=(0, 1, 2))
    torch.testing.assert_close(ours, ref)


def test_func_vmap_over_inputs_and_over_weights(device):
    xs, w, b = _f64((6, 4, 5), (3, 5), (3,), device=device, requires_grad=False)
    with record_launches() as log:
        ours, ref = _both("vmap", "relu", xs, w, b, in_dims=(0, None, None))
    torch.testing.assert_close(ours, ref)
    if runs_kernels(device):
        assert len(log) == 1  # a batch of inputs is one launch over 6·4 rows
    ws, bs = _f64((6, 3, 5), (6, 3), device=device, requires_grad=False)
    ours, ref = _both("vmap", "silu", xs, ws, bs, in_dims=(0, 0, 0))
    torch.testing.assert_close(ours, ref)
    ours, ref = _both("vmap", None, xs[0], ws, None, in_dims=(None, 0, None))
    torch.testing.assert_close(ours, ref)


# ---- double backward --------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ACTS)
def test_gradgradcheck(device, act):
    assert fusedad.testing.gradgradcheck(fusedad.linear, act, device=device)


@pytest.mark.parametrize("act", ["gelu", "silu", "relu", "relu2"])
def test_double_backward_with_gradients_into_y_and_z(device, act):
    """loss = ‖y‖² + ‖∂(Σy)/∂x‖²: the second backward sends gradients into y (from ‖y‖²) and into the
    saved pre-activation z (through the first backward's act'(z)) of the same node, in one pass."""
    x, w, b = _f64((4, 5), (3, 5), (3,), device=device)
    _off_kink(x, w, b, act)
    results = []
    for f in (fusedad.linear, reference_linear):
        y = f(x, w, b, act)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        results.append(torch.autograd.grad(y.square().sum() + gx.square().sum(), (x, w, b)))
    for ours, ref, name in zip(*results, ("x", "w", "b")):
        torch.testing.assert_close(ours, ref, msg=lambda m: f"grad of {name}: {m}")


def test_create_graph_gradient_penalty(device):
    """A WGAN-GP-style penalty ‖∂L/∂x‖² differentiated again matches eager."""
    x, w, b = _f64((4, 5), (3, 5), (3,), device=device)
    results = []
    for f in (fusedad.linear, reference_linear):
        (gx,) = torch.autograd.grad(f(x, w, b, "silu").sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (w, b)))
    torch.testing.assert_close(results[0], results[1])
@pytest.mark.parametrize("act", ACTS)
def test_custom_ops_keep_z_exactly_when_the_backward_reads_it(device, act):
    """fusedad::linear_fwd for every activation of the table: y, and z (M, N) only when asked for *and* the
    activation's derivative reads it (else an empty (0,) tensor), the same shapes as its fake kernel gives
    a compiled graph; its registered backward, with z kept or recomputed (store_preact=False, as a
    trace runs it), gives eager's gradients."""
    from fusedad import activations, ops

    row = activations.lookup(act)
    x, w, b = _f64((5, 4), (3, 4), (3,), device=device)
    _off_kink(x, w, b, act)
    dy = torch.randn(5, 3, dtype=torch.float64, device=device)
    y_ref = reference_linear(x, w, b, act)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), dy)
    for store in (True, False):
        y, z = torch.ops.fusedad.linear_fwd(x, w, b, row.op_name, store)
        fake_y, fake_z = ops._linear_fwd_fake(x, w, b, row.op_name, store)
        assert z.shape == ((5, 3) if store and row.needs_z else (0,)), (store, tuple(z.shape))
        assert (y.shape, z.shape) == (fake_y.shape, fake_z.shape)
        torch.testing.assert_close(y, y_ref)
        if z.numel():
            torch.testing.assert_close(z, F.linear(x, w, b))
        grads = torch.autograd.grad(y, (x, w, b), dy)
        for g, g_ref, name in zip(grads, grads_ref, ("x", "w", "b")):
            torch.testing.assert_close(g, g_ref, msg=lambda m: f"grad of {name} (store_preact={store}): {m}")

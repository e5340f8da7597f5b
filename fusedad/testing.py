"""Check a linear kernel the way fusedad's own suite checks its kernels.

Everything here takes any ``linear(x, w, b)``-like callable (``fusedad.linear`` by default), so you can
verify your own fused linear against float64 and eager PyTorch references:

    import torch, fusedad.testing as ft

    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, 128, dtype=torch.bfloat16, requires_grad=True)
    ft.check_against_references(x, w, None, "gelu", dy=torch.randn(64, 96, dtype=torch.bfloat16),
                                fused=my_linear)            # my_linear(x, w, b, activation)
    ft.gradcheck(my_linear, activation="silu")              # finite differences, float64
    ft.gradgradcheck(my_linear, activation="silu")          # second order
    ft.forward_ad_check(my_linear, activation="silu")       # forward mode (jvp)
    # MLP blocks: any callable with gated_mlp's (or mlp's) signature
    ft.check_block_against_references(my_block, *ft.block_inputs(True, (64, 128, 256, 128), torch.bfloat16),
                                      activation="silu", gated=True)
    ft.block_gradcheck(my_block, gated=True, activation="silu")
    with ft.poison_outputs():                               # fusedad's kernels fill outputs with NaN first
        ...

The tolerance rule (``assert_matches``): measured against a float64 reference, the result's relative
error ‖out − ref‖/‖ref‖ may be at most twice eager PyTorch's error in the same dtype plus a small floor
per dtype. A fused kernel may be more accurate than eager (it rounds once), never much less.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from . import activations
from .functional import linear as _fused_linear
from .kernels import linear as _kernel_launchers

#: The floor of the rule, per dtype: ~4 units of rounding for fp16 (2⁻¹¹) and ~2.5 for bf16 (2⁻⁸). The
#: floor matters for tiny outputs (a 1-element db after cancelling sums), where which of two correct
#: roundings is closer is luck: with fp16 5e-4 a fuzz run found db = Σ dZ over 102 rows at 3.3e-3
#: against eager's lucky 8e-4, while in 20 fresh draws of that case ours was never worse than eager
#: (1e-4…1.6e-3 vs 1e-4…2.4e-2). Measured 2026-11-26 on the CPU interpreter (torch 2.13, triton 3.9)
#: with FUSEDAD_HYPOTHESIS_EXAMPLES=600 pytest tests/test_hardening.py.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (the absolute norm when ref is all zeros); NaN if the shapes differ
    or any value is not finite, so NaN never passes a ``<=`` test."""
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else math.nan
    if out.shape != ref.shape:
        return math.nan
    o, r = out.detach().double(), ref.detach().double()
    if not (torch.isfinite(o).all() and torch.isfinite(r).all()):
        return math.nan
    ref_norm = torch.linalg.vector_norm(r).item()
    diff = torch.linalg.vector_norm(o - r).item()
    return diff / ref_norm if ref_norm > 0 else diff


def assert_matches(out, ref64, eager, what="", nan_as_reference=False, floor_dtype=None):
    """Assert rel_err(out, ref64) ≤ 2·rel_err(eager, ref64) + FLOOR[floor_dtype or out.dtype].

    out: the result under test; ref64: the same computed in float64; eager: eager PyTorch in out's dtype.
    nan_as_reference: the inputs held NaNs on purpose: out and eager must have NaN exactly where ref64
    has, and the rule applies to the other elements.
    floor_dtype: the dtype whose rounding the result carries, where it differs from out's own: an fp32
    main_grad that adds bf16 products carries bf16's rounding (its floor), not fp32's.
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    if nan_as_reference:
        nan = ref64.isnan()
        assert torch.equal(out.isnan(), nan), f"{what}: NaN positions differ from the fp64 reference"
        assert torch.equal(eager.isnan(), nan), f"{what}: eager's NaN positions differ (bad reference)"
        out, ref64, eager = out[~nan], ref64[~nan], eager[~nan]
    assert torch.isfinite(out.detach()).all(), f"{what}: non-finite values (an unwritten output, or overflow)"
    err, eager_err = rel_err(out, ref64), rel_err(eager, ref64)
    floor_dtype = out.dtype if floor_dtype is None else floor_dtype
    bound = 2 * eager_err + FLOOR[floor_dtype]
    assert err <= bound, (f"{what}: rel. error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e}, {out.dtype}"
                          f"{'' if floor_dtype == out.dtype else f', floor of {floor_dtype}'})")


def reference_linear(x, w, b, activation=None):
    """act(x·wᵀ + b) with PyTorch's own ops, in the tensors' dtype (autograd-capable)."""
    return activations.lookup(activation).apply(F.linear(x, w, b))


def check_against_references(x, w, b, activation=None, dy=None, fused=_fused_linear, context="",
                             nan_as_reference=False):
    """Forward (and, with dy, every gradient that is required) of ``fused`` vs float64 and eager references.

    x: (*, K), w: (N, K), b: (N,) or None, in the dtype under test; their ``requires_grad`` chooses
    the gradients checked. dy: (*, N). fused(x, w, b, activation) -> (*, N). Returns fused's output.
    """
    leaves = [t for t in (x, w, b) if t is not None]
    y = fused(x, w, b, activation)
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ase = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    x64, w64, b64 = as64 + [None] * (3 - len(as64))
    xe, we, be = ase + [None] * (3 - len(ase))
    y64 = reference_linear(x64, w64, b64, activation)
    ye = reference_linear(xe, we, be, activation)
    assert y.dtype == x.dtype and y.shape == ye.shape, f"{context}: {y.dtype} {tuple(y.shape)}"
    assert_matches(y, y64, ye, f"forward ({activation}) {context}", nan_as_reference)
    wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
    if dy is None or not wanted:
        return y
    grads = torch.autograd.grad(y, [leaves[i] for i in wanted], dy)
    grads64 = torch.autograd.grad(y64, [as64[i] for i in wanted], dy.double())
    grads_e = torch.autograd.grad(ye, [ase[i] for i in wanted], dy)
    for i, g, g64, ge in zip(wanted, grads, grads64, grads_e):
        assert g.dtype == leaves[i].dtype
        assert_matches(g, g64, ge, f"grad of {['input', 'weight', 'bias'][i]} ({activation}) {context}",
                       nan_as_reference)
    return y


@contextlib.contextmanager
def poison_outputs():
    """Inside the block, fusedad's kernel launchers fill every output with NaN before the kernel writes
    it, so an element a kernel forgot reads NaN (and fails ``assert_matches``). The test suite keeps this
    on throughout (``FUSEDAD_POISON_OUTPUTS=1``)."""
    before = _kernel_launchers.POISON_OUTPUTS
    _kernel_launchers.POISON_OUTPUTS = True
    try:
        yield
    finally:
        _kernel_launchers.POISON_OUTPUTS = before


def _float64_inputs(activation, shape, device):
    """x (M, K), w (N, K), b (N,) in float64 requiring grad; for relu-like activations |x·wᵀ + b| ≥ 0.1,
    so a finite-difference step never crosses the kink at 0."""
    M, K, N = shape
    x, w, b = (torch.randn(*s, dtype=torch.float64, device=device, requires_grad=True) for s in ((M, K), (N, K), (N,)))
    act = activations.lookup(activation)
    if act.name is not None and act.apply(torch.tensor(-1.0, dtype=torch.float64)) == 0:  # flat for z < 0
        with torch.no_grad():
            b += torch.where(F.linear(x, w, b).abs().min(0).values < 0.1, 0.5, 0.0)
    return x, w, b


def gradcheck(linear=_fused_linear, activation=None, shape=(3, 5, 4), device="cpu", **kwargs):
    """``torch.autograd.gradcheck`` of linear(x, w, b, activation) on fresh float64 inputs.

    shape: (M, K, N). kwargs go to torch.autograd.gradcheck. Returns True or raises its GradcheckError.
    """
    inputs = _float64_inputs(activation, shape, device)
    return torch.autograd.gradcheck(lambda x, w, b: linear(x, w, b, activation), inputs, **kwargs)


def gradgradcheck(linear=_fused_linear, activation=None, shape=(2, 3, 3), device="cpu", **kwargs):
    """``torch.autograd.gradgradcheck`` (second derivatives) of linear(x, w, b, activation), float64."""
    inputs = _float64_inputs(activation, shape, device)
    return torch.autograd.gradgradcheck(lambda x, w, b: linear(x, w, b, activation), inputs, **kwargs)


def forward_ad_check(linear=_fused_linear, activation=None, shape=(3, 5, 4), device="cpu", **kwargs):
    """Forward-mode AD (jvp) of linear(x, w, b, activation) against finite differences, float64."""
    inputs = _float64_inputs(activation, shape, device)
    kwargs = dict(dict(check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False,
                       check_batched_grad=False), **kwargs)
    return torch.autograd.gradcheck(lambda x, w, b: linear(x, w, b, activation), inputs, **kwargs)


# ---- MLP blocks -------------------------------------------------------------------------------------


def reference_block(x, w_in, w_up, w_out, b_in=None, b_up=None, b_out=None, activation="silu", gated=True):
    """The MLP block with PyTorch's own ops, in the tensors' dtype (autograd-capable).

    gated: ``(act(x·w_inᵀ + b_in) ⊙ (x·w_upᵀ + b_up))·w_outᵀ + b_out`` (w_up None: w_in is a packed
    (2I, K) gate_up weight, gate rows first, b_in its packed bias); plain: ``act(x·w_inᵀ + b_in)·w_outᵀ
    + b_out`` (w_up, b_up unused).
    """
    act = activations.lookup(activation)
    if not gated:
        return F.linear(act.apply(F.linear(x, w_in, b_in)), w_out, b_out)
    if w_up is None:
        g, u = F.linear(x, w_in, b_in).chunk(2, dim=-1)
    else:
        g, u = F.linear(x, w_in, b_in), F.linear(x, w_up, b_up)
    return F.linear(act.apply(g) * u, w_out, b_out)


def call_block(block, gated, tensors, activation, **kwargs):
    """block(…) with the functional signature of ``fusedad.functional.gated_mlp`` (gated) or ``mlp``.

    tensors: (x, w_in, w_up, w_out, b_in, b_up, b_out) as in ``reference_block``."""
    x, w_in, w_up, w_out, b_in, b_up, b_out = tensors
    if gated:
        return block(x, w_in, w_up, w_out, activation, b_in, b_up, b_out, **kwargs)
    return block(x, w_in, b_in, w_out, b_out, activation, **kwargs)


def block_inputs(gated, shape, dtype=torch.float32, device="cpu", bias=True, packed=False, requires_grad=True):
    """Fresh random (x, w_in, w_up, w_out, b_in, b_up, b_out) for a block of shape (M, K, I, N), scaled so
    that the pre-activations are O(1) (weights ~ 1/√fan_in). packed: w_in is (2I, K), w_up None."""
    M, K, I, N = shape

    def make(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    x = make(M, K)
    w_in = make(2 * I if (gated and packed) else I, K, scale=K ** -0.5)
    w_up = make(I, K, scale=K ** -0.5) if gated and not packed else None
    w_out = make(N, I, scale=I ** -0.5)
    b_in = make(w_in.shape[0], scale=0.5) if bias else None
    b_up = make(I, scale=0.5) if bias and gated and not packed else None
    b_out = make(N, scale=0.5) if bias else None
    return x, w_in, w_up, w_out, b_in, b_up, b_out


def check_block_against_references(block, x, w_in, w_up, w_out, b_in=None, b_up=None, b_out=None, activation="silu",
                                   gated=True, dy=None, context="", **kwargs):
    """Forward and every required gradient of ``block`` vs float64 and eager references (``assert_matches``).

    block: a callable with ``fusedad.functional.gated_mlp``'s signature (gated) or ``mlp``'s (plain);
    kwargs go to it (e.g. recompute=True). dy: (*, N), drawn fresh if None. Returns block's output.
    """
    tensors = (x, w_in, w_up, w_out, b_in, b_up, b_out)
    names = ("input", "w_in", "w_up", "w_out", "b_in", "b_up", "b_out")
    y = call_block(block, gated, tensors, activation, **kwargs)
    as64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    ase = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    y64 = reference_block(*as64, activation=activation, gated=gated)
    ye = reference_block(*ase, activation=activation, gated=gated)
    assert y.dtype == x.dtype and y.shape == ye.shape, f"{context}: {y.dtype} {tuple(y.shape)} vs {tuple(ye.shape)}"
    assert_matches(y, y64, ye, f"block forward ({activation}) {context}")
    wanted = [i for i, t in enumerate(tensors) if t is not None and t.requires_grad]
    if not wanted:
        return y
    if dy is None:
        dy = torch.randn(y.shape, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, [tensors[i] for i in wanted], dy)
    grads64 = torch.autograd.grad(y64, [as64[i] for i in wanted], dy.double())
    grads_e = torch.autograd.grad(ye, [ase[i] for i in wanted], dy)
    for i, g, g64, ge in zip(wanted, grads, grads64, grads_e):
        assert g.dtype == tensors[i].dtype and g.shape == tensors[i].shape, f"grad of {names[i]} {context}"
        assert_matches(g, g64, ge, f"block grad of {names[i]} ({activation}) {context}")
    return y


def _float64_block_inputs(gated, activation, shape, device, bias, packed):
    """block_inputs in float64; for activations flat below 0 (relu, relu2) the gate (fc1) pre-activation is
    kept ≥ 0.1 away from the kink, so a finite-difference step never crosses it."""
    t = list(block_inputs(gated, shape, torch.float64, device, bias=True, packed=packed))
    act = activations.lookup(activation)
    if act.name is not None and act.apply(torch.tensor(-1.0, dtype=torch.float64)) == 0:
        with torch.no_grad():
            i = shape[2]
            z = F.linear(t[0], t[1], t[4])[:, :i]
            t[4][:i] += torch.where(z.abs().min(0).values < 0.1, 0.5, 0.0)
    if not bias:
        if act.name is not None and act.apply(torch.tensor(-1.0, dtype=torch.float64)) == 0:
            raise ValueError("a block gradcheck of a relu-like activation needs bias=True (the first bias keeps the "
                             "pre-activation away from the kink)")
        t[4] = t[5] = t[6] = None
    return tuple(t)


def _check_block_derivatives(check, block, gated, activation, shape, device, bias, packed, **kwargs):
    """``check`` (gradcheck or gradgradcheck) of the block over its present float64 inputs."""
    block = block or _default_block(gated)
    inputs = _float64_block_inputs(gated, activation, shape, device, bias, packed)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def fn(*args):
        full = list(inputs)
        for i, a in zip(present, args):
            full[i] = a
        return call_block(block, gated, full, activation)

    return check(fn, [inputs[i] for i in present], **kwargs)


def block_gradcheck(block=None, gated=True, activation="silu", shape=(3, 4, 5, 4), device="cpu", bias=True,
                    packed=False, **kwargs):
    """``torch.autograd.gradcheck`` of an MLP block on fresh float64 inputs. shape: (M, K, I, N).

    block: default ``fusedad.functional.gated_mlp`` (gated) or ``mlp``; kwargs go to gradcheck.
    """
    return _check_block_derivatives(torch.autograd.gradcheck, block, gated, activation, shape, device, bias, packed,
                                    **kwargs)


def block_gradgradcheck(block=None, gated=True, activation="silu", shape=(2, 3, 3, 2), device="cpu", bias=True,
                        packed=False, **kwargs):
    """``torch.autograd.gradgradcheck`` (second derivatives) of an MLP block, float64."""
    return _check_block_derivatives(torch.autograd.gradgradcheck, block, gated, activation, shape, device, bias,
                                    packed, **kwargs)


def block_forward_ad_check(block=None, gated=True, activation="silu", shape=(3, 4, 5, 4), device="cpu", bias=True,
                           packed=False, **kwargs):
    """Forward-mode AD (jvp) of an MLP block against finite differences, float64."""
    kwargs = dict(dict(check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False,
                       check_batched_grad=False), **kwargs)
    return block_gradcheck(block, gated, activation, shape, device, bias, packed, **kwargs)


def _default_block(gated):
    from . import functional

    return functional.gated_mlp if gated else functional.mlp

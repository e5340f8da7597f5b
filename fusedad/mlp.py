"""The MLP blocks' autograd: ``FusedMLPFunction`` around the block kernels, and ``block``, which picks
how a 2-D call runs.

    gated:  y = (act(x·W_gᵀ + b_g) ⊙ (x·W_uᵀ + b_u))·W_dᵀ + b_d
    plain:  y = act(x·W₁ᵀ + b₁)·W₂ᵀ + b₂

x (M, K); W_g, W_u, W₁ (I, K) — or one packed (2I, K) gate_up weight, gate rows first; W_d, W₂ (N, I).

What is saved for backward: x and the pre-activations (G and U, or Z₁) — with ``recompute=True`` only
x (the backward replays the up projection). The weights are saved as references to the parameters,
not copies. H = act(G) ⊙ U is never saved: the down projection's backward recomputes it in its
epilogue. The first-order backward, for plain tensors:

    1. ``mlp_down_bwd``: dH = dY·W_d with dG, dU (dZ₁), H and the bias partial sums in its epilogue
    2. ``linear_bwd``: dW_d = dYᵀ·H (if W_d needs a gradient)
    3. gated: ``mlp_gated_dual_bwd``: dX = dG·W_g + dU·W_u, dW_g, dW_u in one grid;
       plain: ``linear_bwd`` on dZ₁: dX = dZ₁·W₁, dW₁ = dZ₁ᵀ·X in one grid
    (a recomputing backward first runs the up projection again)

Under torch.compile / torch.export the block is the custom ops of ``mlp_ops.py`` (the same forward and
backward as bodies). Composite paths (per-layer ``fusedad.linear`` calls and torch ops, which the
autograd engine differentiates): double backward (``create_graph=True``, recomputed from the saved
inputs), forward-mode AD, torch.func transforms, torch.jit.trace, and tensor subclasses (DTensor): each
runs the block as fused linear layers (the plain block's activation still in fc1's epilogue), the gated
product by torch ops.
"""
import dataclasses

import torch
import torch.autograd.forward_ad as fwAD

from . import activations, backend, eager_mlp
from .kernels import mlp as kernel_mlp

_NONE = activations.lookup(None)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What kind of block: its activation row, gated or plain, a packed (2I, K) gate_up weight, and
    whether the backward recomputes the up projection instead of reading saved pre-activations."""

    act: activations.Activation
    gated: bool
    packed: bool = False
    recompute: bool = False


@dataclasses.dataclass(frozen=True)
class Impl:
    """Who runs a block: the block kernels (or their eager mirror), the single-layer Backend, and the
    extra launch arguments (``wrap``: ``torch.library.wrap_triton`` inside a custom op's body)."""

    blocks: object
    single: backend.Backend
    extra: dict = dataclasses.field(default_factory=dict, hash=False)


def _impl(device, chosen=None, extra=None):
    """The Impl for tensors on ``device`` (or for the Backend ``chosen``)."""
    chosen = chosen or backend.select(device)
    return Impl(kernel_mlp if chosen.runs_kernels else eager_mlp, chosen, extra or {})


def _halves(w_in, w_up, b_in, b_up, spec):
    """(W_g, W_u, b_g, b_u): a packed gate_up weight (and bias) split into row-half views (no copy)."""
    if not spec.packed:
        return w_in, w_up, b_in, b_up
    i = w_in.shape[0] // 2
    return w_in[:i], w_in[i:], (b_in[:i] if b_in is not None else None), (b_in[i:] if b_in is not None else None)


def _up(x, w_in, w_up, b_in, b_up, spec, store_preact, impl=None):
    """-> (H, G or Z₁ or None, U or None) by the up-projection kernel."""
    impl = impl or _impl(x.device)
    if spec.gated:
        wg, wu, bg, bu = _halves(w_in, w_up, b_in, b_up, spec)
        return impl.blocks.gated_up_forward(x, wg, wu, bg, bu, spec.act, store_preact, **impl.extra)
    h, z, _, _ = impl.single.forward(x, w_in, b_in, spec.act, store_preact=store_preact, **impl.extra)
    return h, z, None


def forward(x, w_in, w_up, w_out, b_in, b_up, b_out, spec, store_preact, impl=None):
    """-> (y (M, N), G or Z₁ (M, I) or None, U or None): the up projection, then the down projection."""
    impl = impl or _impl(x.device)
    h, g, u = _up(x, w_in, w_up, b_in, b_up, spec, store_preact, impl)
    y = impl.single.forward(h, w_out, b_out, _NONE, **impl.extra)[0]
    return y, g, u


def forward_no_grad(x, w_in, w_up, w_out, b_in, b_up, b_out, spec):
    """The block with nothing saved and no pre-activation written: y (M, N)."""
    return forward(x, w_in, w_up, w_out, b_in, b_up, b_out, spec, store_preact=False)[0]


class FusedMLPFunction(torch.autograd.Function):
    """(x, w_in, w_up, w_out, b_in, b_up, b_out, spec, main_grads) -> y (M, N).

    w_in: W_g, W₁ or the packed (2I, K) gate_up weight; w_up: W_u or None; b_in / b_up likewise.
    main_grads: None, or (for w_in, w_up, w_out) fp32 buffers the backward adds dW into (that weight's
    ``.grad`` then stays untouched), None entries for weights without one.
    """

    @staticmethod
    def forward(ctx, x, w_in, w_up, w_out, b_in, b_up, b_out, spec, main_grads):
        y, g, u = forward(x, w_in, w_up, w_out, b_in, b_up, b_out, spec, store_preact=not spec.recompute)
        ctx.spec = spec
        ctx.main_grads = main_grads or (None, None, None)
        ctx.has_b_out = b_out is not None
        # The biases are saved for the recomputing backward and the composite (double) backward.
        ctx.save_for_backward(x, w_in, w_up, w_out, b_in, b_up, g, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return (None,) * 9
        if torch.is_grad_enabled():
            return _composite_backward(ctx, grad_y) + (None, None)
        return _fused_backward(ctx, grad_y) + (None, None)


def _fused_backward(ctx, grad_y):
    x, w_in, w_up, w_out, b_in, b_up, g, u = ctx.saved_tensors
    return backward(grad_y, x, w_in, w_up, w_out, b_in, b_up, g, u, ctx.spec, ctx.needs_input_grad[:7],
                    ctx.main_grads)


def backward(grad_y, x, w_in, w_up, w_out, b_in, b_up, g, u, spec, needs, main_grads=(None, None, None), impl=None):
    """The block's first-order backward -> (dx, dw_in, dw_up, dw_out, db_in, db_up, db_out), None where
    ``needs`` (7 bools, in that order) is False or the weight's gradient went into its main_grad buffer.
    g, u: the saved pre-activations (None with ``spec.recompute``: the up projection runs again)."""
    impl = impl or _impl(grad_y.device)
    single, extra = impl.single, impl.extra
    nx, nwi, nwu, nwo, nbi, nbu, nbo = needs
    mg_in, mg_up, mg_out = main_grads
    if spec.recompute:
        _, g, u = _up(x, w_in, w_up, b_in, b_up, spec, store_preact=True, impl=impl)
    need_pre = nx or nwi or nwu or nbi or nbu
    dg, du, h, db_in, db_up, db_out = impl.blocks.down_backward(
        grad_y, w_out, g, u, spec.act, need_pre=need_pre, need_h=nwo, need_bias_pre=nbi or nbu, need_bias_down=nbo,
        **extra)
    del g, u
    dw_out = None
    if nwo:  # dW_d = dYᵀ·H, added into main_grad if there is one
        _, dw_out, _ = single.backward(grad_y, h, None, None, _NONE, False, True, False, weight_grad_out=mg_out,
                                       **extra)
    del h
    dx = dw_in = dw_up = None
    if spec.gated and need_pre:
        wg, wu, _, _ = _halves(w_in, w_up, None, None, spec)
        outs = (None, None)
        if spec.packed and nwi:
            # The packed weight's gradient: the kernel writes its two row halves of one (2I, K) buffer.
            buf = mg_in if mg_in is not None else torch.empty_like(w_in)
            outs = (buf[:wg.shape[0]], buf[wg.shape[0]:])
        elif mg_in is not None or mg_up is not None:
            outs = (mg_in, mg_up)
        accumulate = (mg_in is not None) if spec.packed else (mg_in is not None or mg_up is not None)
        if accumulate and not spec.packed and (mg_in is None) != (mg_up is None) and nwi and nwu:
            raise RuntimeError("fusedad: main_grad buffers for the gate and up weights must be given for both or "
                               "neither")
        dx, dw_g, dw_u = impl.blocks.gated_dual_backward(
            dg, du, x if (nwi or nwu) else None, wg if nx else None, wu if nx else None, need_x=nx,
            need_gate=nwi, need_up=nwu if not spec.packed else nwi, dwg_out=outs[0], dwu_out=outs[1],
            accumulate=accumulate, **extra)
        if spec.packed:
            dw_in = buf if nwi else None
            if nbi:
                db_in = torch.cat([db_in, db_up])
            db_up = None
        else:
            dw_in, dw_up = dw_g, dw_u
    elif need_pre and (nx or nwi):
        dx, dw_in, _ = single.backward(dg, x if nwi else None, w_in if nx else None, None, _NONE, nx, nwi, False,
                                       weight_grad_out=mg_in, **extra)
    return (dx, None if mg_in is not None else dw_in, None if mg_up is not None else dw_up,
            None if mg_out is not None else dw_out, db_in if nbi else None, db_up if nbu else None,
            db_out if nbo else None)


def _composite_backward(ctx, grad_y):
    """create_graph=True: the block recomputed from the saved inputs with differentiable per-layer ops,
    and differentiated by the autograd engine (so the gradients are differentiable again)."""
    x, w_in, w_up, w_out, b_in, b_up, _, _ = ctx.saved_tensors
    if any(m is not None for m in ctx.main_grads):
        raise NotImplementedError("fusedad: main_grad accumulation with create_graph=True")
    needs = ctx.needs_input_grad[:7]
    with torch.enable_grad():
        # b_out only shifts y: the gradients of the others do not depend on it, and db_out = Σ_m dY.
        inputs = [t.detach().requires_grad_() if (t is not None and not t.requires_grad and n) else t
                  for t, n in zip((x, w_in, w_up, w_out, b_in, b_up), needs[:6])]
        y = composite(*inputs, None, ctx.spec)
        wanted = [i for i in range(6) if needs[i] and inputs[i] is not None]
        grads = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, create_graph=True, allow_unused=True)
    out = [None] * 7
    for i, gr in zip(wanted, grads):
        out[i] = gr if gr is not None else torch.zeros_like(inputs[i])
    if needs[6]:
        out[6] = grad_y.sum(0)
    return tuple(out)


def composite(x, w_in, w_up, w_out, b_in, b_up, b_out, spec):
    """The block as per-layer ``fusedad.linear`` calls and torch ops (differentiable in every mode)."""
    from .functional import linear

    if spec.gated:
        if spec.packed:
            gu = linear(x, w_in, b_in)
            i = w_in.shape[0] // 2
            g, u = gu[:, :i], gu[:, i:]
        else:
            g, u = linear(x, w_in, b_in), linear(x, w_up, b_up)
        h = spec.act.apply(g) * u
    else:
        h = linear(x, w_in, b_in, activation=spec.act)
    return linear(h, w_out, b_out)


def _needs_composite(tensors):
    """Graph capture, tensor subclasses (DTensor), torch.func wrappers or forward-mode tangents."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    for t in tensors:
        if t is None:
            continue
        if type(t) not in backend.PLAIN_TYPES or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None:
            return True
    return False


def block(x, w_in, w_up, w_out, b_in, b_up, b_out, spec, main_grads=None):
    """The block for validated 2-D arguments, on the path the context calls for. -> y (M, N)"""
    tensors = (x, w_in, w_up, w_out, b_in, b_up, b_out)
    if (torch.compiler.is_compiling() and not any(t is not None and backend.is_dtensor(t) for t in tensors)
            and not (main_grads and any(m is not None for m in main_grads))):
        # torch.compile / torch.export (whose non-strict tracing hands us fake tensors): the block's custom
        # ops (the block kernels on CUDA). DTensors take the composite path below.
        return mlp_ops.block(*tensors, spec)
    if _needs_composite(tensors):
        if main_grads is not None and any(m is not None for m in main_grads):
            raise NotImplementedError("fusedad: main_grad accumulation in an MLP block under torch.compile, "
                                      "torch.func, forward-mode AD or with tensor subclasses")
        return composite(*tensors, spec)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return FusedMLPFunction.apply(*tensors, spec, main_grads)
    # no_grad / inference_mode / nothing requires grad: no graph, nothing saved, no pre-activation written.
    return forward_no_grad(*tensors, spec)


from . import mlp_ops  # noqa: E402  (registers the block's custom ops; it imports this module)

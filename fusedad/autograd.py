"""``FusedLinearFunction``: the autograd Function around the fused kernels.

    (x: (M, K), weight: (N, K), bias: (N,) | None) -> (y = act(z): (M, N), z = x·Wᵀ + b: (M, N) | None)

z is returned (for gelu/gelu_tanh/silu; None for relu and no activation) as a *differentiable*
output: the backward keeps it for act'(z), and in a double backward the gradient that flows into z
comes back to this Function as ``grad_z``, so second derivatives need no extra saved tensor.

Backward paths:
* first order, plain tensors: one fused launch for all requested of dX, dW, db
  (``ctx.needs_input_grad`` decides; nothing is computed for an input that needs no gradient);
* ``create_graph=True``, a gradient into z, or functorch transforms (jacrev, vmap of grad …):
  the same math from differentiable pieces — dZ by torch ops, dX and dW by fusedad linear calls
  (which go through this Function again), db by a sum.
Forward mode: ``jvp`` returns the tangents computed in lockstep with the primal when
``fusedad.functional`` saw them before the forward (``precomputed``), else builds them from
fusedad linear calls (Ż = Ẋ·Wᵀ + X·Ẇᵀ + ḃ, Ẏ = act'(Z) ⊙ Ż).
"""
import torch

from . import activations, backend


def is_functorch_tensor(t):
    """True for tensors wrapped by a torch.func transform (vmap's BatchedTensor, grad/jvp wrappers)."""
    return t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)


def _linear(x, weight, bias=None):
    from .functional import linear  # functional imports this module

    return linear(x, weight, bias)


class FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, activation, precomputed, weight_main_grad):
        """precomputed: None, or (y, z, y_tangent, z_tangent) from the lockstep forward-mode kernel.
        weight_main_grad: None, or an fp32 (N, K) buffer the backward adds dW into (weight.grad stays
        untouched: the Function returns no weight gradient then)."""
        if precomputed is not None:
            return precomputed[0], precomputed[1]
        y, z, _, _ = backend.forward(x, weight, bias, activation, store_preact=activation in activations.SMOOTH)
        return y, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, precomputed, weight_main_grad = inputs
        y, z = output
        ctx.weight_main_grad = weight_main_grad
        need_x, need_w, _ = ctx.needs_input_grad[:3]
        saved = y if activation == "relu" else z
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        # Only what the backward needs: x for dW, weight for dX, y (relu) or z (smooth) for act'.
        ctx.save_for_backward(x if need_w else None, weight if need_x else None, saved)
        if precomputed is not None:
            ctx.tangents = precomputed[2:]
        else:
            ctx.tangents = None
            ctx.save_for_forward(x, weight, saved)

    @staticmethod
    def backward(ctx, grad_y, grad_z):
        x, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        act = ctx.activation
        main_grad = ctx.weight_main_grad if need_w else None
        if grad_y is None and grad_z is None:
            return None, None, None, None, None, None
        composite = (torch.is_grad_enabled() or grad_z is not None or grad_y is None
                     or any(is_functorch_tensor(t) for t in (grad_y, x, weight, saved)))
        if not composite:
            dx, dw, db = backend.backward(grad_y, x, weight, saved, act, need_x, need_w, need_b,
                                          weight_grad_out=main_grad)
            return dx, (None if main_grad is not None else dw), db, None, None, None
        dz = activations.chain(grad_y, saved, act) if grad_y is not None else None
        if grad_z is not None:
            dz = grad_z if dz is None else dz + grad_z
        dx = _linear(dz, weight.t()) if need_x else None  # dX = dZ·W
        dw = _linear(dz.t(), x.t()) if need_w else None  # dW = dZᵀ·X
        db = dz.sum(0) if need_b else None
        if main_grad is not None:
            main_grad.add_(dw.detach())
            dw = None
        return dx, dw, db, None, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _activation_t, _precomputed_t, _main_grad_t):
        if ctx.tangents is not None:
            return ctx.tangents
        x, weight, saved = ctx.saved_tensors
        parts = []
        if x_t is not None:
            parts.append(_linear(x_t, weight))
        if weight_t is not None:
            parts.append(_linear(x, weight_t))
        if bias_t is not None:
            parts.append(bias_t.expand(x.shape[0], weight.shape[0]))
        if not parts:
            return None, None
        z_t = sum(parts[1:], parts[0])
        y_t = activations.chain(z_t, saved, ctx.activation)
        return y_t, (z_t if ctx.activation in activations.SMOOTH else None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, activation, precomputed, weight_main_grad):
        x_dim, w_dim, b_dim = in_dims[:3]
        smooth = activation in activations.SMOOTH
        out_dims = (0, 0 if smooth else None)
        if w_dim is None and b_dim is None:
            # A batch of inputs is just more rows: one launch over (B·M, K).
            xb = x.movedim(x_dim, 0)
            batch, rows = xb.shape[0], xb.shape[1]
            y, z = FusedLinearFunction.apply(xb.reshape(batch * rows, xb.shape[2]), weight, bias, activation, None,
                                             weight_main_grad)
            return (y.view(batch, rows, -1), z.view(batch, rows, -1) if smooth else None), out_dims

        # A batch of weights (ensembles): one fused call per member.
        def pick(t, dim, i):
            return t if t is None or dim is None else t.select(dim, i)

        if weight_main_grad is not None:
            raise NotImplementedError("fusedad: weight_main_grad with a vmapped weight")
        outs = [FusedLinearFunction.apply(pick(x, x_dim, i), pick(weight, w_dim, i), pick(bias, b_dim, i),
                                          activation, None, None) for i in range(info.batch_size)]
        y = torch.stack([o[0] for o in outs])
        z = torch.stack([o[1] for o in outs]) if smooth else None
        return (y, z), out_dims


class FusedLinearEagerFunction(torch.autograd.Function):
    """The same Function for the plain eager hot path, in the ``forward(ctx, ...)`` style.

    ``Function.apply`` re-binds the forward's signature with ``inspect`` on every call when a
    ``setup_context`` is defined. Measured with `python -m bench.overhead` (tiny layer, eager backend,
    this project's 2-core CPU machine): fusedad's added cost per recorded forward fell from +67.7 µs
    to +30.9 µs with this class. torch.func needs the setup_context style, so functional.py sends
    wrapped tensors and forward-mode AD to FusedLinearFunction and everything else here.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, activation, precomputed, weight_main_grad):
        inputs = (x, weight, bias, activation, precomputed, weight_main_grad)
        output = FusedLinearFunction.forward(*inputs)
        FusedLinearFunction.setup_context(ctx, inputs, output)
        return output

    backward = FusedLinearFunction.backward

"""The MLP blocks as ``torch.library`` custom ops, for ``torch.compile`` and ``torch.export`` (and opcheck).

    fusedad::mlp_fwd(x (M,K), w_in, w_up?, w_out (N,I), b_in?, b_up?, b_out?, activation, gated, packed,
                     store_preact) -> (y (M,N), g, u)
    fusedad::mlp_bwd(grad_y (M,N), x, w_in, w_up?, w_out, b_in?, b_up?, g?, u?, activation, gated, packed,
                     recompute, needs (7 bools)) -> (dx, dw_in, dw_up, dw_out, db_in, db_up, db_out)

w_in: W_g, W₁ or the packed (2I, K) gate_up weight; w_up: W_u or None. g, u: the pre-activations
(G, U or Z₁ and an empty (0,) tensor) when ``store_preact`` (a backward will read them), else empty
(0,) tensors. A gradient not asked for comes back as an empty (0,) tensor (custom-op outputs cannot be
None). Their bodies are ``fusedad.mlp.forward`` / ``backward``: on CUDA the block kernels through
``wrap_triton``, on real CPU tensors under Triton's interpreter the same kernels, on torch.compile's
fake tensors under the interpreter (and other devices) the eager mirror, which Inductor compiles as
ordinary ops (``backend.select_for_op`` decides, as for the single-layer ops).

``fusedad.functional.mlp`` / ``gated_mlp`` route here only inside torch.compile / torch.export; eager
calls use the autograd Function directly (no dispatcher boundary). Double backward and forward-mode AD
are not registered: in a compiled or exported model use first-order reverse mode.
"""
from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from . import activations
from . import mlp as _mlp
from .backend import select_for_op


def _impl(*tensors):
    chosen = select_for_op(*tensors)
    return _mlp._impl(tensors[0].device, chosen, {"wrap": wrap_triton} if chosen.runs_kernels else None)


def _spec(activation, gated, packed, recompute=False):
    return _mlp.BlockSpec(activations.lookup(activation), gated=gated, packed=packed, recompute=recompute)


def _or_empty(t, like):
    return t if t is not None else like.new_empty(0)


def _none_if_empty(t):
    return None if t is None or (t.dim() == 1 and t.shape[0] == 0) else t


@triton_op("fusedad::mlp_fwd", mutates_args=())
def mlp_fwd(x: torch.Tensor, w_in: torch.Tensor, w_up: Optional[torch.Tensor], w_out: torch.Tensor,
            b_in: Optional[torch.Tensor], b_up: Optional[torch.Tensor], b_out: Optional[torch.Tensor],
            activation: str, gated: bool, packed: bool, store_preact: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(activation, gated, packed)
    impl = _impl(x, w_in, w_up, w_out, b_in, b_up, b_out)
    y, g, u = _mlp.forward(x, w_in, w_up, w_out, b_in, b_up, b_out, spec, store_preact, impl)
    return y, _or_empty(g, x), _or_empty(u, x)


@mlp_fwd.register_fake
def _mlp_fwd_fake(x, w_in, w_up, w_out, b_in, b_up, b_out, activation, gated, packed, store_preact):
    inter = w_in.shape[0] // 2 if (gated and packed) else w_in.shape[0]
    y = x.new_empty(x.shape[0], w_out.shape[0])
    g = x.new_empty(x.shape[0], inter) if store_preact else x.new_empty(0)
    u = x.new_empty(x.shape[0], inter) if store_preact and gated else x.new_empty(0)
    return y, g, u


@triton_op("fusedad::mlp_bwd", mutates_args=())
def mlp_bwd(grad_y: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, w_up: Optional[torch.Tensor],
            w_out: torch.Tensor, b_in: Optional[torch.Tensor], b_up: Optional[torch.Tensor],
            g: Optional[torch.Tensor], u: Optional[torch.Tensor], activation: str, gated: bool, packed: bool,
            recompute: bool, needs: List[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(activation, gated, packed, recompute)
    impl = _impl(grad_y, x, w_in, w_up, w_out)
    grads = _mlp.backward(grad_y, x, w_in, w_up, w_out, b_in, b_up, _none_if_empty(g), _none_if_empty(u), spec,
                          tuple(needs), impl=impl)
    # Outputs must not alias inputs or each other (the eager mirror's gradients never do; a packed bias's
    # gradient is a fresh cat).
    return tuple(_or_empty(t, grad_y) if t is None else t for t in grads)


@mlp_bwd.register_fake
def _mlp_bwd_fake(grad_y, x, w_in, w_up, w_out, b_in, b_up, g, u, activation, gated, packed, recompute, needs):
    shapes = (x.shape, w_in.shape, None if w_up is None else w_up.shape, w_out.shape,
              None if b_in is None else b_in.shape, None if b_up is None else b_up.shape, (w_out.shape[0],))
    return tuple(grad_y.new_empty(s) if n and s is not None else grad_y.new_empty(0) for n, s in zip(needs, shapes))


def _setup(ctx, inputs, output):
    x, w_in, w_up, w_out, b_in, b_up, b_out, activation, gated, packed, store_preact = inputs
    _, g, u = output
    ctx.args = (activation, gated, packed, not store_preact)
    ctx.has = (w_up is not None, b_in is not None, b_up is not None, b_out is not None)
    ctx.save_for_backward(x, w_in, w_up, w_out, b_in, b_up, g if store_preact else None,
                          u if store_preact and gated else None)
    ctx.mark_non_differentiable(g, u)


def _backward(ctx, grad_y, _grad_g, _grad_u):
    x, w_in, w_up, w_out, b_in, b_up, g, u = ctx.saved_tensors
    present = (True, True, ctx.has[0], True, ctx.has[1], ctx.has[2], ctx.has[3])
    needs = [bool(n and p) for n, p in zip(ctx.needs_input_grad[:7], present)]
    grads = torch.ops.fusedad.mlp_bwd(grad_y, x, w_in, w_up, w_out, b_in, b_up, g, u, *ctx.args, needs)
    return (*(gr if n else None for gr, n in zip(grads, needs)), None, None, None, None)


mlp_fwd.register_autograd(_backward, setup_context=_setup)


def block(x, w_in, w_up, w_out, b_in, b_up, b_out, spec):
    """The block through the custom ops: y (M, N). Pre-activations are kept exactly when grad mode is on
    (``spec.recompute``: never; the backward recomputes them)."""
    store = torch.is_grad_enabled() and not spec.recompute
    y, _, _ = torch.ops.fusedad.mlp_fwd(x, w_in, w_up, w_out, b_in, b_up, b_out, spec.act.op_name, spec.gated,
                                        spec.packed, store)
    return y

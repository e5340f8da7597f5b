"""The kernels as ``torch.library`` custom ops, for ``torch.compile`` (and ``torch.export``/opcheck).

    fusedad::linear_fwd(x (M,K), weight (N,K), bias (N,)?, activation, store_preact) -> (y (M,N), z)
    fusedad::linear_bwd(grad_y (M,N), x?, weight?, saved?, activation, need_x, need_weight, need_bias)
        -> (grad_x (M,K), grad_w (N,K), grad_b (N,))

z is (M, N) when ``store_preact`` else an empty (0,) tensor; a gradient not asked for comes back as
an empty (0,) tensor (custom-op outputs cannot be None). ``activation`` is an activation table name,
"none" for no activation.

They are ``triton_op``s: on CUDA the body launches our kernels through ``wrap_triton``, so Inductor sees
(and schedules) the real Triton kernels; on other devices the body is the eager path, which Inductor
compiles as ordinary ops (``backend.select(..., in_graph=True)`` decides). ``fusedad.functional.linear``
routes here only while torch.compile traces: in eager mode the autograd Function launches the kernels
directly, because crossing the custom-op dispatcher costs tens of µs per call (measured elsewhere at
~85 µs per call for a comparable op; ``python -m bench.overhead`` measures what fusedad adds).

Double backward and forward-mode AD are not registered for these ops: under torch.compile use first
order reverse mode (eager mode has all three).
"""
import torch
from torch.library import triton_op, wrap_triton

from . import activations, backend, derivatives


def _in_graph(device):
    """The backend for a custom op's body, and the extra launch arguments it takes there."""
    chosen = backend.select(device, in_graph=True)
    return chosen, ({"wrap": wrap_triton} if chosen.runs_kernels else {})


@triton_op("fusedad::linear_fwd", mutates_args=())
def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
               store_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, extra = _in_graph(x.device)
    y, z, _, _ = chosen.forward(x, weight, bias, activations.lookup(activation), store_preact=store_preact, **extra)
    y = y.clone() if y is z else y  # outputs must not alias (no activation, eager path)
    return y, (z if z is not None else x.new_empty(0))


@triton_op("fusedad::linear_bwd", mutates_args=())
def linear_bwd(grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
               saved: torch.Tensor | None, activation: str, need_x: bool, need_weight: bool,
               need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen, extra = _in_graph(grad_y.device)
    dx, dw, db = chosen.backward(grad_y, x, weight, saved, activations.lookup(activation), need_x, need_weight,
                                 need_bias, **extra)
    empty = grad_y.new_empty(0)
    return (dx if dx is not None else empty.clone(), dw if dw is not None else empty.clone(),
            db if db is not None else empty)


def _setup_fwd(ctx, inputs, output):
    x, weight, bias, activation, store_preact = inputs
    y, z = output
    act = activations.lookup(activation)
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.activation = act.op_name
    # The op was told no backward would come (store_preact False) but one does: recompute z = x·Wᵀ + b.
    ctx.recompute_preact = act.needs_z and not store_preact
    if ctx.recompute_preact:
        ctx.save_for_backward(x, weight, bias, None)
    else:
        ctx.save_for_backward(*derivatives.saved_for_backward(act, need_x, need_w, x, weight, y, z), None)
    ctx.mark_non_differentiable(z)


def _backward_fwd(ctx, grad_y, grad_z):
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.recompute_preact:
        x, weight, bias, _ = ctx.saved_tensors
        saved, _ = torch.ops.fusedad.linear_fwd(x, weight, bias, "none", False)
    else:
        x, weight, saved, _ = ctx.saved_tensors
    dx, dw, db = torch.ops.fusedad.linear_bwd(grad_y, x if need_w else None, weight if need_x else None, saved,
                                              ctx.activation, need_x, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None


linear_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


def linear(x, weight, bias, act):
    """act(x·weightᵀ + bias) through the custom ops: x (M, K), weight (N, K), bias (N,) | None -> (M, N)."""
    y, _ = torch.ops.fusedad.linear_fwd(x, weight, bias, act.op_name, act.needs_z and torch.is_grad_enabled())
    return y

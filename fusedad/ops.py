"""The kernels as ``torch.library`` custom ops, for ``torch.compile``, ``torch.export``,
``torch.jit.trace`` / ``torch.jit.script`` (and opcheck).

    fusedad::linear_fwd(x (M,K), weight (N,K), bias (N,)?, activation, store_preact) -> (y (M,N), z)
    fusedad::linear_bwd(grad_y (M,N), x?, weight?, saved?, activation, need_x, need_weight, need_bias)
        -> (grad_x (M,K), grad_w (N,K), grad_b (N,))

z is (M, N) when ``store_preact`` else an empty (0,) tensor; a gradient not asked for comes back as
an empty (0,) tensor (custom-op outputs cannot be None). ``activation`` is "none", "relu", "gelu",
"gelu_tanh" or "silu".

They are ``triton_op``s: on CUDA the body launches our kernels through ``wrap_triton``, so Inductor sees
(and schedules) the real Triton kernels; under Triton's interpreter a call on real CPU tensors runs the
same kernels; otherwise (other devices, and the interpreter while torch.compile traces) the body is the
eager path, which Inductor compiles as ordinary ops. ``fusedad.functional.linear`` routes here only
while a graph is captured — torch.compile / torch.export (``torch.compiler.is_compiling()``),
``torch.jit.trace`` (``torch.jit.is_tracing()``) and a scripted ``fusedad.nn.Linear``
(``scripted_linear``): in eager mode the autograd Function launches the kernels directly, because a
custom-op call costs tens of µs of dispatcher overhead.

Double backward and forward-mode AD are not registered for these ops: in a compiled, exported, traced
or scripted model use first-order reverse mode (eager mode has all three).
"""
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from . import activations, backend, eager
from ._validate import check_linear_args
from .kernels import linear as kernels


def _act(name):
    return None if name == "none" else name


def _runs_kernels(*tensors):
    """Whether an op body launches our kernels (else it runs the eager path).

    CUDA: always; ``wrap_triton`` makes the launch visible to torch.compile's tracing. Triton's
    interpreter: only on real tensors (a plain call, the replay of a traced, scripted or exported
    model). torch.compile also runs the body on functional (fake) tensors to trace it, and an
    interpreted kernel cannot run on those (``wrap_triton`` passes it through unwrapped).
    """
    kind = backend.backend(tensors[0])
    if kind == backend.TRITON:
        return True
    return kind == backend.INTERPRETER and all(type(t) in _PLAIN for t in tensors if t is not None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


@triton_op("fusedad::linear_fwd", mutates_args=())
def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
               store_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    act = _act(activation)
    if _runs_kernels(x, weight, bias):
        # A traced module replays this op with whatever it is given, and the kernels do no bounds
        # checks of their own: the same argument checks as fusedad.linear (cheap, Python ints here).
        check_linear_args(x, weight, bias)
        y, z, _, _ = kernels.linear_forward(x, weight, bias, activations.check_activation(act),
                                            store_preact=store_preact, wrap=wrap_triton)
    else:
        y, z, _, _ = eager.linear_forward(x, weight, bias, act, store_preact=store_preact)
        y = y.clone() if y is z else y  # outputs must not alias (activation "none")
    return y, (z if z is not None else x.new_empty(0))


@linear_fwd.register_fake
def _linear_fwd_fake(x, weight, bias, activation, store_preact):
    # Shapes only. triton_op registers the body itself as the fake kernel, but on CUDA the body's
    # launcher branches on the row count (tile bucket, int64 offsets): run on torch.export's symbolic
    # sizes, that would add guards contradicting a dynamic batch dimension. torch.compile still traces
    # the body itself (its decomposition into the kernel launches).
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, (torch.empty_like(y) if store_preact else x.new_empty(0))


@triton_op("fusedad::linear_bwd", mutates_args=())
def linear_bwd(grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
               saved: torch.Tensor | None, activation: str, need_x: bool, need_weight: bool,
               need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    act = _act(activation)
    if _runs_kernels(grad_y, x, weight, saved):
        dx, dw, db = kernels.linear_backward(grad_y, x, weight, saved, activations.check_activation(act),
                                             need_x, need_weight, need_bias, wrap=wrap_triton)
    else:
        dx, dw, db = eager.linear_backward(grad_y, x, weight, saved, act, need_x, need_weight, need_bias)
    empty = grad_y.new_empty(0)
    return (dx if dx is not None else empty.clone(), dw if dw is not None else empty.clone(),
            db if db is not None else empty)


def _setup_fwd(ctx, inputs, output):
    x, weight, bias, activation, store_preact = inputs
    y, z = output
    ctx.activation = activation
    ctx.recompute_preact = activation in activations.SMOOTH and not store_preact
    saved = y if activation == "relu" else (z if activation in activations.SMOOTH else None)
    ctx.save_for_backward(x, weight, bias if ctx.recompute_preact else None, saved)
    ctx.mark_non_differentiable(z)


def _backward_fwd(ctx, grad_y, grad_z):
    x, weight, bias, saved = ctx.saved_tensors
    if ctx.recompute_preact:  # the forward was told no backward would come: z = x·Wᵀ + b again
        saved, _ = torch.ops.fusedad.linear_fwd(x, weight, bias, "none", False)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.fusedad.linear_bwd(grad_y, x if need_w else None, weight if need_x else None, saved,
                                              ctx.activation, need_x, need_w, need_b)
    return dx if need_x else None, dw if need_w else None, db if need_b else None, None, None


linear_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


def linear(x, weight, bias, activation, store_preact=None):
    """act(x·weightᵀ + bias) through the custom ops: x (M, K), weight (N, K), bias (N,) | None -> (M, N).

    store_preact: None = keep z for the backward exactly when grad mode is on; False = never (the
    backward then recomputes it).
    """
    if store_preact is None:
        store_preact = torch.is_grad_enabled()
    y, _ = torch.ops.fusedad.linear_fwd(x, weight, bias, activation or "none",
                                        activation in activations.SMOOTH and store_preact)
    return y


def scripted_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    activation: Optional[str], accumulate_main_grad: bool) -> torch.Tensor:
    """``fusedad.nn.Linear.forward`` as TorchScript compiles it: input (*, K) -> (*, N) by one op call.

    A scripted model cannot run the Python layers (autograd Function, direct launches); it calls
    ``fusedad::linear_fwd`` as an op, which keeps the kernels and the registered backward.
    """
    if accumulate_main_grad and weight.requires_grad:
        raise RuntimeError("fusedad: accumulate_main_grad=True cannot be scripted: the script's backward is the "
                           "custom op's, which returns dW instead of adding it into main_grad. Script with "
                           "accumulate_main_grad=False (the model then fills weight.grad)")
    act = "none" if activation is None else activation
    store_preact = act in ["gelu", "gelu_tanh", "silu"] and torch.is_grad_enabled()
    lead = input.shape[:-1]
    rows = 1
    for size in lead:
        rows *= size
    y, _ = torch.ops.fusedad.linear_fwd(input.reshape(rows, input.shape[-1]), weight, bias, act, store_preact)
    return y.reshape(lead + [weight.shape[0]])

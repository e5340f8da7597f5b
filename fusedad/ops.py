"""The kernels as ``torch.library`` custom ops, for ``torch.compile``, ``torch.export``,
``torch.jit.trace`` / ``torch.jit.script`` (and opcheck).

    fusedad::linear_fwd(x (M,K), weight (N,K), bias (N,)?, activation, store_preact) -> (y (M,N), z)
    fusedad::linear_bwd(grad_y (M,N), x?, weight?, saved?, activation, need_x, need_weight, need_bias)
        -> (grad_x (M,K), grad_w (N,K), grad_b (N,))

``store_preact``: a backward may follow, so keep z when the activation's derivative reads it; z is then
(M, N), else an empty (0,) tensor. A gradient not asked for comes back as an empty (0,) tensor
(custom-op outputs cannot be None). ``activation`` is an activation table name, "none" for none.

They are ``triton_op``s: on CUDA the body launches our kernels through ``wrap_triton``, so Inductor sees
(and schedules) the real Triton kernels; under Triton's interpreter a call on real CPU tensors runs the
same kernels; otherwise (other devices, and torch.compile's fake tensors under the interpreter) the body
is the eager path, which Inductor compiles as ordinary ops (``backend.select_for_op`` decides).
``fusedad.functional.linear`` routes here only while a graph is captured — torch.compile /
torch.export (``torch.compiler.is_compiling()``), ``torch.jit.trace`` (``torch.jit.is_tracing()``) and
a scripted ``fusedad.nn.Linear`` (``scripted_linear``): in eager mode the autograd Function launches the
kernels directly, because crossing the custom-op dispatcher costs tens of µs per call
(``python -m bench.overhead`` measures what fusedad adds).

Double backward and forward-mode AD are not registered for these ops: in a compiled, exported, traced
or scripted model use first-order reverse mode (eager mode has all three).
"""
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from . import activations, backend, derivatives
from ._validate import check_linear_args


def _body_backend(*tensors):
    """The backend for an op's body, and the extra launch arguments it takes there."""
    chosen = backend.select_for_op(*tensors)
    return chosen, ({"wrap": wrap_triton} if chosen.runs_kernels else {})


@triton_op("fusedad::linear_fwd", mutates_args=())
def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
               store_preact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    act = activations.lookup(activation)
    chosen, extra = _body_backend(x, weight, bias)
    if chosen.runs_kernels:
        # A traced module replays this op with whatever it is given, and the kernels do no bounds
        # checks of their own: the same argument checks as fusedad.linear (cheap, Python ints here).
        check_linear_args(x, weight, bias)
    y, z, _, _ = chosen.forward(x, weight, bias, act, store_preact=store_preact and act.needs_z, **extra)
    y = y.clone() if y is z else y  # outputs must not alias (no activation, eager path)
    return y, (z if z is not None else x.new_empty(0))


@linear_fwd.register_fake
def _linear_fwd_fake(x, weight, bias, activation, store_preact):
    # Shapes only. triton_op registers the body itself as the fake kernel, but on CUDA the body's
    # launcher branches on the row count (tile bucket, int64 offsets): run on torch.export's symbolic
    # sizes, that would add guards contradicting a dynamic batch dimension. torch.compile still traces
    # the body itself (its decomposition into the kernel launches).
    y = x.new_empty(x.shape[0], weight.shape[0])
    keep_z = store_preact and activations.lookup(activation).needs_z
    return y, (torch.empty_like(y) if keep_z else x.new_empty(0))


@triton_op("fusedad::linear_bwd", mutates_args=())
def linear_bwd(grad_y: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor | None,
               saved: torch.Tensor | None, activation: str, need_x: bool, need_weight: bool,
               need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen, extra = _body_backend(grad_y, x, weight, saved)
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


#: The error for main_grad accumulation inside a captured graph (torch.compile, torch.export).
MAIN_GRAD_UNDER_COMPILE = (
    "fusedad: weight_main_grad is not supported under torch.compile or torch.export "
    "(accumulate_main_grad=True): the captured graph's backward is the custom op's, which returns dW instead "
    "of adding it into main_grad. Run this layer uncompiled, or set accumulate_main_grad=False (the "
    "compiled model then fills weight.grad)")


@torch.library.custom_op("fusedad::refuse_main_grad", mutates_args=())
def refuse_main_grad(x: torch.Tensor) -> torch.Tensor:
    """Raises MAIN_GRAD_UNDER_COMPILE when the compiled graph runs; its fake kernel passes x's shape on.

    Why an op in the graph and not a plain ``raise`` while tracing: Dynamo treats an exception raised by
    traced Python code as a reason to give up on the frame and run it eagerly, where
    ``torch.compiler.is_compiling()`` is False. A plain raise therefore fired only under
    ``fullgraph=True``; without it the eager backend silently trained into main_grad and the interpreter
    failed inside Triton. As a node of the graph (its output feeds the linear op, so it is never dead
    code) it raises the same error on every backend, with or without ``fullgraph``.
    """
    raise NotImplementedError(MAIN_GRAD_UNDER_COMPILE)


@refuse_main_grad.register_fake
def _refuse_main_grad_fake(x):
    return torch.empty_like(x)


# An identity for autograd, so AOTAutograd can trace a graph whose input requires grad (never reached:
# the forward raises first).
refuse_main_grad.register_autograd(lambda ctx, grad: grad)


def _exporting():
    """True while torch.export traces. Read from torch's flag, not ``torch.compiler.is_exporting()``: torch
    2.11's Dynamo (the GPU image's) folds that call to True under plain torch.compile as well (2.13 reads
    the flag), which turned the refusal below into a raise while tracing, i.e. a graph break and a silent
    eager run."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def refuse_main_grad_in_graph(x):
    """Under torch.export: raise now (export runs this Python once and never falls back). Under
    torch.compile: x through ``refuse_main_grad``, which raises when the graph runs."""
    if _exporting():
        raise NotImplementedError(MAIN_GRAD_UNDER_COMPILE)
    return refuse_main_grad(x)


def linear(x, weight, bias, act, store_preact=None):
    """act(x·weightᵀ + bias) through the custom ops: x (M, K), weight (N, K), bias (N,) | None -> (M, N).

    act: an activation table row. store_preact: None = keep z for the backward exactly when grad mode
    is on; False = never (a backward then recomputes it).
    """
    if store_preact is None:
        store_preact = torch.is_grad_enabled()
    y, _ = torch.ops.fusedad.linear_fwd(x, weight, bias, act.op_name, store_preact)
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
    lead = input.shape[:-1]
    rows = 1
    for size in lead:
        rows *= size
    y, _ = torch.ops.fusedad.linear_fwd(input.reshape(rows, input.shape[-1]), weight, bias, act,
                                        torch.is_grad_enabled())
    return y.reshape(lead + [weight.shape[0]])

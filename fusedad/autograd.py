"""The autograd core: ``FusedLinearFunction`` around the fused kernels, and ``route``, which picks how a
2-D call runs (compiled graph, forward-mode lockstep kernel, torch.func, recorded or not; on the eager
backend, torch ops that torch's own autograd records).

    (x: (M, K), weight: (N, K), bias: (N,) | None) -> (y = act(z): (M, N), z = x·Wᵀ + b: (M, N) | None)

z is returned (for the activations whose derivative reads it; None otherwise) as a *differentiable*
output: the backward keeps it for act'(z), and in a double backward the gradient that flows into z
comes back to this Function as ``grad_z``, so second derivatives need no extra saved tensor.

Backward paths:
* first order, plain tensors: one fused launch for all requested of dX, dW, db
  (``ctx.needs_input_grad`` decides; nothing is computed for an input that needs no gradient);
* ``create_graph=True``, a gradient into z, or functorch transforms (jacrev, vmap of grad …):
  ``derivatives.gradients`` with this Function as the matrix product — dZ by torch ops, dX and dW by
  two more fused launches (differentiable again), db by a sum.
Forward mode: ``jvp`` returns the tangents computed in lockstep with the primal when ``route`` saw
them before the forward (``precomputed``), else ``derivatives.tangents`` with this Function.
"""
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from . import activations, backend, derivatives, distributed, ops
from ._validate import _SUPPORTED, check_linear_args

_NO_ACTIVATION = activations.lookup(None)
_PLAIN = backend.PLAIN_TYPES
_EAGER = backend.eager_backend()


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def is_functorch_tensor(t):
    """True for tensors wrapped by a torch.func transform (vmap's BatchedTensor, grad/jvp wrappers)."""
    return t is not None and _is_wrapped(t)


def _fused_linear(a, w):
    """a·wᵀ through this Function (no bias, no activation): differentiable, and it runs the kernels."""
    return FusedLinearFunction.apply(a, w, None, _NO_ACTIVATION, None, None)[0]


def _fused_matmul(a, b):
    return _fused_linear(a, b.t())


def _save_for_backward(ctx, x, weight, act, weight_main_grad, y, z):
    """What the reverse-mode backward reads, kept on ctx (both Functions' forwards)."""
    ctx.weight_main_grad = weight_main_grad
    ctx.act = act
    ctx.set_materialize_grads(False)
    need_x, need_w = ctx.needs_input_grad[:2]
    ctx.save_for_backward(*derivatives.saved_for_backward(act, need_x, need_w, x, weight, y, z))


class FusedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, act, precomputed, weight_main_grad):
        """act: an activation table row. precomputed: None, or (y, z, y_tangent, z_tangent) from the
        lockstep forward-mode kernel. weight_main_grad: None, or an fp32 (N, K) buffer the backward adds
        dW into (weight.grad stays untouched: the Function returns no weight gradient then)."""
        if precomputed is not None:
            return precomputed[0], precomputed[1]
        y, z, _, _ = backend.for_tensor(x).forward(x, weight, bias, act, store_preact=act.needs_z)
        return y, z

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, act, precomputed, weight_main_grad = inputs
        y, z = output
        _save_for_backward(ctx, x, weight, act, weight_main_grad, y, z)
        if precomputed is not None:
            ctx.tangents = precomputed[2:]
        else:
            ctx.tangents = None
            ctx.save_for_forward(x, weight, act.saved(y, z))

    @staticmethod
    def backward(ctx, grad_y, grad_z):
        x, weight, saved = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        main_grad = ctx.weight_main_grad if need_w else None
        if grad_y is None and grad_z is None:
            return None, None, None, None, None, None
        composite = (torch.is_grad_enabled() or grad_z is not None or grad_y is None
                     or is_functorch_tensor(grad_y) or is_functorch_tensor(x) or is_functorch_tensor(weight)
                     or is_functorch_tensor(saved))
        if composite:
            dx, dw, db = derivatives.gradients(grad_y, grad_z, x, weight, saved, ctx.act, need_x, need_w, need_b,
                                               _fused_matmul)
            if main_grad is not None:
                main_grad.add_(dw.detach())
        else:
            dx, dw, db = backend.for_tensor(grad_y).backward(grad_y, x, weight, saved, ctx.act, need_x, need_w,
                                                                need_b, weight_grad_out=main_grad)
        return dx, (None if main_grad is not None else dw), db, None, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, _act_t, _precomputed_t, _main_grad_t):
        if ctx.tangents is not None:
            return ctx.tangents
        x, weight, saved = ctx.saved_tensors
        y_t, z_t = derivatives.tangents(x, weight, x_t, weight_t, bias_t, saved, ctx.act, _fused_linear)
        return y_t, (z_t if z_t is not None and ctx.act.needs_z else None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, act, precomputed, weight_main_grad):
        x_dim, w_dim, b_dim = in_dims[:3]
        out_dims = (0, 0 if act.needs_z else None)
        if w_dim is None and b_dim is None:
            # A batch of inputs is just more rows: one launch over (B·M, K).
            xb = x.movedim(x_dim, 0)
            batch, rows = xb.shape[0], xb.shape[1]
            y, z = FusedLinearFunction.apply(xb.reshape(batch * rows, xb.shape[2]), weight, bias, act, None,
                                             weight_main_grad)
            return (y.view(batch, rows, -1), z.view(batch, rows, -1) if act.needs_z else None), out_dims

        # A batch of weights (ensembles): one fused call per member.
        def pick(t, dim, i):
            return t if t is None or dim is None else t.select(dim, i)

        if weight_main_grad is not None:
            raise NotImplementedError("fusedad: weight_main_grad with a vmapped weight")
        outs = [FusedLinearFunction.apply(pick(x, x_dim, i), pick(weight, w_dim, i), pick(bias, b_dim, i),
                                          act, None, None) for i in range(info.batch_size)]
        y = torch.stack([o[0] for o in outs])
        z = torch.stack([o[1] for o in outs]) if act.needs_z else None
        return (y, z), out_dims


class FusedLinearEagerFunction(torch.autograd.Function):
    """The same Function for the plain eager hot path, in the ``forward(ctx, ...)`` style.

    ``Function.apply`` re-binds the forward's signature with ``inspect`` on every call when a
    ``setup_context`` is defined. Measured with `python -m bench.overhead` (tiny layer, eager backend,
    this project's 2-core CPU machine): fusedad's added cost per recorded forward fell from +67.7 µs
    to +30.9 µs with this class. torch.func needs the setup_context style, so ``route`` sends wrapped
    tensors and forward-mode AD to FusedLinearFunction and every other recorded call here — on the eager
    backend only those with ``main_grad`` (the others are torch ops there, recorded by torch).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act, precomputed, weight_main_grad):
        # (``route`` never sends precomputed tangents here)
        y, z, _, _ = backend.for_tensor(x).forward(x, weight, bias, act, store_preact=act.needs_z)
        # Reverse mode only: ``route`` sends every call with forward-mode tangents to FusedLinearFunction,
        # so nothing is kept for a jvp here (save_for_forward is skipped: measured per recorded call in
        # docs/torch-rows-and-host-path.md).
        _save_for_backward(ctx, x, weight, act, weight_main_grad, y, z)
        return y, z

    backward = FusedLinearFunction.backward


#: ``Function.apply`` without its Python preamble (torch/autograd/function.py: a check for functorch
#: transforms and a pass over the arguments unwrapping dead functorch wrappers), i.e. the C
#: implementation it ends in. Used by ``route`` only where that preamble has nothing to do: no transform
#: active and no argument a functorch tensor (checked there). Saves about a fifth of the recorded call's
#: added host time (docs/torch-rows-and-host-path.md).
_EAGER_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, FusedLinearEagerFunction)


def _forward_tangents(x, weight, bias, wrapped):
    """Forward-mode (primal, tangent) pairs of the arguments as plain tensors, or None.

    ``wrapped``: whether any argument is a functorch tensor. None when no argument carries a tangent.
    Under ``torch.func.jvp`` the dual tensors are functorch wrappers of one level; they are unwrapped
    here (a primal computed from the unwrapped values is what functorch expects from the Function's
    forward and jvp). The caller falls back to the Function's own jvp (tangents from fused calls)
    when a value is still wrapped after that (jacfwd's batched tangents, nested transforms).
    """
    if fwAD._current_level < 0 and not wrapped:
        return None
    pairs = []
    for t in (x, weight, bias):
        if t is None:
            pairs.append((None, None))
            continue
        primal, tangent = fwAD.unpack_dual(t)
        pairs.append((_unwrap_grad_level(primal), _unwrap_grad_level(tangent)))
    if all(tangent is None for _, tangent in pairs):
        return None
    return pairs


def _unwrap_grad_level(t):
    if t is not None and torch._C._functorch.is_gradtrackingtensor(t):
        return torch._C._functorch.get_unwrapped(t)
    return t


_is_compiling = torch.compiler.is_compiling
_tracing_state = torch._C._get_tracing_state


def eager_cpu_linear(x, weight, bias, act):
    """``act(F.linear(x, weight, bias))`` for a call on CPU tensors where CPU runs the eager backend (no
    ``TRITON_INTERPRET``), recorded by torch's own autograd; None for every other call, which the caller
    sends down its checked path: another device, CPU running the kernels, a tensor subclass, a 1-D weight,
    a 0-D or 2-D bias, a compile or ``torch.jit.trace``.

    x: (*, K), weight: (N, K), bias: (N,) | (1,) | None -> (*, N).

    No argument check of fusedad's own runs first: F.linear checks the shapes and dtypes itself and, on
    CPU tensors, computes exactly what the checked path would (the same op, the same autocast cast as
    nn.Linear). Where it refuses the arguments, ``check_linear_args`` runs and raises fusedad's error naming
    the problem (torch's own error where that check finds none). What F.linear would accept and fusedad does
    not is excluded before it runs: integer, bool and complex weights (an integer input against a floating
    weight, or a bias of another dtype, F.linear refuses), a bias of more than one dimension (F.linear
    broadcasts it), a meta tensor beside CPU ones (F.linear computes on the input's device). Measured
    (callgrind, 2-core VM, torch 2.13.0+cpu, 2026-12-07; docs/torch-rows-and-host-path.md): the checked
    path's common_2d_call alone was 16 000 of nn.Linear+GELU's 141 000 instructions per no_grad call at
    Linear(64, 64), batch 8; fusedad's call went from 165 000 to 151 000.
    """
    if (backend._CPU is not _EAGER or type(x) not in _PLAIN or type(weight) not in _PLAIN or not x.is_cpu
            or not weight.is_cpu or weight.dtype not in _SUPPORTED or weight.dim() != 2
            or (bias is not None and (type(bias) not in _PLAIN or not bias.is_cpu or bias.dim() != 1))
            or _is_compiling() or _tracing_state() is not None):
        return None
    try:
        z = F.linear(x, weight, bias)
    except (RuntimeError, TypeError):
        check_linear_args(x, weight, bias)  # raises fusedad's own error where it names the problem
        raise
    return act.apply(z)


def route(x, weight, bias, act, weight_main_grad=None):
    """act(x·weightᵀ + bias) for validated 2-D arguments, on the path the context calls for.

    x: (M, K), weight: (N, K), bias: (N,) | None -> (M, N).
    """
    if torch.compiler.is_compiling():
        if weight_main_grad is not None:
            x = ops.refuse_main_grad_in_graph(x)  # raises; see ops.refuse_main_grad for why not a plain raise
        # Dynamo: an opaque custom op with registered autograd; its CUDA body is our Triton kernels.
        return ops.linear(x, weight, bias, act)
    if torch._C._get_tracing_state() is not None:  # torch.jit.is_tracing() (route is never scripted)
        return _traced(x, weight, bias, act, weight_main_grad)
    if not (type(x) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)):
        # DTensor: the custom ops on the local shards; any other subclass: torch ops (the kernels read raw
        # storage, which a __torch_dispatch__ wrapper does not have).
        return distributed.subclass_linear(x, weight, bias, act, weight_main_grad)
    if weight_main_grad is None and backend.for_tensor(x) is _EAGER:
        # The eager backend computes with torch ops either way (fusedad/eager.py): torch's own autograd
        # (reverse and forward mode, torch.func transforms) records them with no Python Function — the
        # same ops, the same saved tensors (tested), a quarter (Linear(64, 64), batch 8) to two fifths
        # (a 1×1 layer) less host time per recorded call (docs/torch-rows-and-host-path.md). main_grad
        # accumulation, which torch's nodes cannot do, takes the Function below on this backend too.
        return act.apply(F.linear(x, weight, bias))
    wrapped = _is_wrapped(x) or _is_wrapped(weight) or (bias is not None and _is_wrapped(bias))
    if weight_main_grad is not None and is_functorch_tensor(weight):
        # Inside the transform the backward would add a wrapped dW into a captured buffer, which functorch
        # refuses with an error that does not name the cause.
        raise RuntimeError(
            "fusedad: weight_main_grad (accumulate_main_grad=True) with a weight that a torch.func transform "
            "differentiates or batches: torch.func returns the weight's gradient instead of accumulating it. "
            "Call without weight_main_grad inside the transform and add the returned gradient yourself.")
    duals = _forward_tangents(x, weight, bias, wrapped) if wrapped or fwAD._current_level >= 0 else None
    if duals is not None and not any(is_functorch_tensor(t) for pair in duals for t in pair):
        # Forward mode in lockstep: one kernel emits y, z, ẏ and ż from shared X/W tiles.
        (px, tx), (pw, tw), (pb, tb) = duals
        # Below the transforms: new tensors (the kernel's outputs) must be plain, not jvp-level wrappers.
        with torch.no_grad(), torch._C._DisableFuncTorch():
            pre = backend.for_tensor(px).forward(px, pw, pb, act, store_preact=act.needs_z, x_tangent=tx,
                                                 weight_tangent=tw, bias_tangent=tb, store_preact_tangent=act.needs_z)
        return FusedLinearFunction.apply(x, weight, bias, act, pre, weight_main_grad)[0]
    if wrapped or duals is not None:  # torch.func transforms and forward AD need setup_context style
        return FusedLinearFunction.apply(x, weight, bias, act, None, weight_main_grad)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        if torch._C._are_functorch_transforms_active() or is_functorch_tensor(weight_main_grad):
            return FusedLinearEagerFunction.apply(x, weight, bias, act, None, weight_main_grad)[0]
        return _EAGER_APPLY(x, weight, bias, act, None, weight_main_grad)[0]
    # Nothing to differentiate (no_grad, inference_mode, or no input requires grad): no graph,
    # nothing saved, no pre-activation written.
    return backend.for_tensor(x).forward(x, weight, bias, act)[0]


def _traced(x, weight, bias, act, weight_main_grad):
    """Under ``torch.jit.trace``: one ``fusedad::linear_fwd`` call, which the tracer records as an op.

    The tracer cannot see a Triton launch (nor an autograd Function's body as anything it can replay):
    on the direct path a trace would keep only the output's allocation and replay stale memory. The
    custom op is recorded as one node and re-run, with its registered backward, on every call of the
    traced module. z is never stored: the trace is replayed under any grad mode (its own check re-runs
    it under no_grad), so the flag must not depend on the mode at trace time; a backward through the
    traced module recomputes z.
    """
    if weight_main_grad is not None:
        raise NotImplementedError(
            "fusedad: weight_main_grad (accumulate_main_grad=True) cannot be traced: the trace's backward is the "
            "custom op's, which returns dW instead of adding it into main_grad. Trace with "
            "accumulate_main_grad=False (the traced model then fills weight.grad)")
    return ops.linear(x, weight, bias, act, store_preact=False)

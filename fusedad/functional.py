"""``fusedad.functional.linear``: ``torch.nn.functional.linear`` plus a fused activation."""
import math

import torch
import torch.autograd.forward_ad as fwAD

from . import activations, backend, ops
from ._validate import check_linear_args
from .autograd import FusedLinearEagerFunction, FusedLinearFunction, is_functorch_tensor


def linear(input, weight, bias=None, activation=None, *, weight_main_grad=None):
    """``act(input · weightᵀ + bias)`` with the bias and activation fused into the GEMM epilogue.

    Same semantics as ``torch.nn.functional.linear`` for ``activation=None``.

    Args:
        input: (*, in_features) — any number of leading dims, including none (1-D input).
        weight: (out_features, in_features), or (in_features,) for a single output without bias.
        bias: (out_features,) or None ((1,) and () broadcast as in F.linear).
        activation: None, "relu", "gelu" (erf), "gelu_tanh" or "silu".
        weight_main_grad: None, or an (out_features, in_features) buffer (typically float32 for a
            bf16 weight, as Megatron's ``main_grad``): the backward kernel *adds* dW into it and leaves
            ``weight.grad`` untouched — gradient accumulation over micro-batches with no extra pass.
    Returns:
        (*, out_features); (*) for a 1-D weight.

    Runs the Triton kernels on CUDA, the same kernels through Triton's interpreter on CPU when
    ``TRITON_INTERPRET=1`` was set before import, else an eager path (``fusedad.backend(tensor)`` says
    which). Under autocast it casts like ``nn.Linear`` (to the autocast dtype) and gradients flow back
    in the original dtypes.
    """
    activations.check_activation(activation)  # raises on an unknown name
    if isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor):
        input, weight, bias = _autocast(input, weight, bias)
    check_linear_args(input, weight, bias)

    vector_weight = weight.dim() == 1
    if vector_weight:
        weight = weight.unsqueeze(0)
    out_features, in_features = weight.shape
    if bias is not None and bias.shape != (out_features,):
        bias = bias.expand(out_features)  # () or (1,): a stride-0 view, read as is by the kernels
    lead = input.shape[:-1]
    # 2-D inputs reach the kernels with their own strides; leading dims are folded into rows (a view
    # whenever they can be, as F.linear does).
    x = input if input.dim() == 2 else input.reshape(math.prod(lead), in_features)
    if weight_main_grad is not None:
        _check_main_grad(weight_main_grad, weight)
    y = _linear_2d(x, weight, bias, activation, weight_main_grad)
    y = y if input.dim() == 2 else y.reshape(*lead, out_features)
    return y.squeeze(-1) if vector_weight else y


def _autocast(input, weight, bias):
    """Cast to the autocast dtype exactly when nn.Linear would (linear is an autocast-to-low-precision op)."""
    device_type = input.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    return cast(input), cast(weight), cast(bias)


def _forward_tangents(x, weight, bias, wrapped):
    """Forward-mode (primal, tangent) pairs of the arguments as plain tensors, or None.

    ``wrapped``: whether any argument is a functorch tensor. None when no argument carries a tangent.
    Under ``torch.func.jvp`` the dual tensors are functorch wrappers of one level; they are unwrapped
    here (a primal computed from the unwrapped values is what functorch expects from the Function's
    forward and jvp). The caller falls back to the Function's own jvp (tangents from fusedad calls)
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


def _check_main_grad(main_grad, weight):
    if main_grad.shape != weight.shape or main_grad.device != weight.device or not main_grad.is_floating_point():
        raise RuntimeError(f"fusedad.linear: weight_main_grad must be a floating tensor of the weight's shape "
                           f"{tuple(weight.shape)} on {weight.device}, got {main_grad.dtype} of shape "
                           f"{tuple(main_grad.shape)} on {main_grad.device}")


def _linear_2d(x, weight, bias, activation, weight_main_grad=None):
    """x: (M, K), weight: (N, K), bias: (N,) | None -> (M, N)."""
    if torch.compiler.is_compiling():
        if weight_main_grad is not None:
            raise NotImplementedError("fusedad: weight_main_grad is not supported under torch.compile")
        # Dynamo: an opaque custom op with registered autograd; its CUDA body is our Triton kernels.
        return ops.linear(x, weight, bias, activation)
    if torch.jit.is_tracing():
        return _traced_linear_2d(x, weight, bias, activation, weight_main_grad)
    wrapped = any(is_functorch_tensor(t) for t in (x, weight, bias))
    duals = _forward_tangents(x, weight, bias, wrapped)
    if duals is not None and not any(is_functorch_tensor(t) for pair in duals for t in pair):
        # The seed's forward mode in lockstep: one kernel emits y, z, ẏ and ż from shared X/W tiles.
        (px, tx), (pw, tw), (pb, tb) = duals
        smooth = activation in activations.SMOOTH
        # Below the transforms: new tensors (the kernel's outputs) must be plain, not jvp-level wrappers.
        with torch.no_grad(), torch._C._DisableFuncTorch():
            pre = backend.forward(px, pw, pb, activation, store_preact=smooth, x_tangent=tx, weight_tangent=tw,
                                  bias_tangent=tb, store_preact_tangent=smooth)
        return FusedLinearFunction.apply(x, weight, bias, activation, pre, weight_main_grad)[0]
    if wrapped or duals is not None:  # torch.func transforms and forward AD need setup_context style
        return FusedLinearFunction.apply(x, weight, bias, activation, None, weight_main_grad)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return FusedLinearEagerFunction.apply(x, weight, bias, activation, None, weight_main_grad)[0]
    # Nothing to differentiate (no_grad, inference_mode, or no input requires grad): no graph,
    # nothing saved, no pre-activation written.
    return backend.forward(x, weight, bias, activation)[0]


def _traced_linear_2d(x, weight, bias, activation, weight_main_grad):
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
    return ops.linear(x, weight, bias, activation, store_preact=False)

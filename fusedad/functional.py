"""``fusedad.functional.linear``: ``torch.nn.functional.linear`` plus a fused activation."""
import math

import torch
import torch.autograd.forward_ad as fwAD

from . import activations, backend
from ._validate import check_linear_args
from .autograd import FusedLinearFunction, is_functorch_tensor


def linear(input, weight, bias=None, activation=None):
    """``act(input · weightᵀ + bias)`` with the bias and activation fused into the GEMM epilogue.

    Same semantics as ``torch.nn.functional.linear`` for ``activation=None``.

    Args:
        input: (*, in_features) — any number of leading dims, including none (1-D input).
        weight: (out_features, in_features), or (in_features,) for a single output without bias.
        bias: (out_features,) or None ((1,) and () broadcast as in F.linear).
        activation: None, "relu", "gelu" (erf), "gelu_tanh" or "silu".
    Returns:
        (*, out_features); (*) for a 1-D weight.

    Runs the Triton kernels on CUDA, the same kernels through Triton's interpreter on CPU when
    ``TRITON_INTERPRET=1`` was set before import, else an eager path (``fusedad.backend(tensor)`` says
    which). Under autocast it casts like ``nn.Linear`` (to the autocast dtype) and gradients flow back
    in the original dtypes.
    """
    check_activation = activations.check_activation(activation)  # noqa: F841 - raises on a bad name
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
    x = input if input.dim() == 2 else input.reshape(math.prod(lead), in_features)
    y = _linear_2d(x, weight, bias, activation)
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


def _forward_tangents(x, weight, bias):
    """Forward-mode tangents of the arguments, if some are visible as dual tensors here, else None."""
    if fwAD._current_level < 0 and not any(is_functorch_tensor(t) for t in (x, weight, bias)):
        return None
    unpacked = [fwAD.unpack_dual(t) if t is not None else None for t in (x, weight, bias)]
    if all(u is None or u.tangent is None for u in unpacked):
        return None
    return unpacked


def _linear_2d(x, weight, bias, activation):
    """x: (M, K), weight: (N, K), bias: (N,) | None -> (M, N)."""
    wrapped = any(is_functorch_tensor(t) for t in (x, weight, bias))
    duals = _forward_tangents(x, weight, bias)
    if duals is not None:
        plain = [u for u in duals if u is not None]
        if not any(is_functorch_tensor(u.primal) or is_functorch_tensor(u.tangent) for u in plain):
            # The seed's forward mode in lockstep: one kernel emits y, z, ẏ and ż from shared tiles.
            px, pw, pb = (u.primal if u is not None else None for u in duals)
            tx, tw, tb = (u.tangent if u is not None else None for u in duals)
            smooth = activation in activations.SMOOTH
            with torch.no_grad():
                pre = backend.forward(px, pw, pb, activation, store_preact=smooth, x_tangent=tx,
                                      weight_tangent=tw, bias_tangent=tb, store_preact_tangent=smooth)
            return FusedLinearFunction.apply(x, weight, bias, activation, pre)[0]
    if wrapped or duals is not None or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        return FusedLinearFunction.apply(x, weight, bias, activation, None)[0]
    # Nothing to differentiate (no_grad, inference_mode, or no input requires grad): no graph,
    # nothing saved, no pre-activation written.
    return backend.forward(x, weight, bias, activation)[0]

"""Argument preparation for ``fusedad.functional.linear``: the autocast cast, then checks that raise a
clear error naming shapes, dtypes and devices before any kernel sees the tensors (never a wrong answer
or an illegal memory access)."""
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)

#: One C call that says whether autocast is on for any device (torch ≥ 2.4); else ask per device type.
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def _shape(t):
    return tuple(t.shape)


def check_linear_args(input, weight, bias):
    """Raise TypeError / RuntimeError for arguments ``F.linear`` semantics (and our kernels) reject.

    input: (*, K)   weight: (N, K) or (K,)   bias: (N,), (1,), () or None
    """
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"fusedad.linear: {name} must be a Tensor, got {type(t).__name__}")
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"fusedad.linear: {name} has dtype {t.dtype}; supported dtypes are float16, "
                            f"bfloat16, float32 and float64")
    if input.dim() < 1 or weight.dim() < 1:
        raise RuntimeError(f"fusedad.linear: input and weight need at least 1 dimension, got input of shape "
                           f"{_shape(input)} and weight of shape {_shape(weight)}")
    if weight.dim() > 2:
        raise RuntimeError(f"fusedad.linear: weight must be 2-D (out_features, in_features) or 1-D, got shape "
                           f"{_shape(weight)}")
    if input.shape[-1] != weight.shape[-1]:
        raise RuntimeError(
            f"fusedad.linear: input of shape {_shape(input)} has {input.shape[-1]} features but weight of shape "
            f"{_shape(weight)} expects in_features={weight.shape[-1]} (input.shape[-1] must equal "
            f"weight.shape[-1])")
    out_features = weight.shape[0] if weight.dim() == 2 else None
    if bias is not None:
        if out_features is None:
            raise RuntimeError(f"fusedad.linear: a 1-D weight (shape {_shape(weight)}) takes no bias, got bias of "
                               f"shape {_shape(bias)}")
        if bias.dim() > 1 or (bias.dim() == 1 and bias.shape[0] not in (out_features, 1)):
            raise RuntimeError(f"fusedad.linear: bias must have shape ({out_features},) to match weight of shape "
                               f"{_shape(weight)}, got {_shape(bias)}")
    tensors = [("input", input), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    if len({t.dtype for _, t in tensors}) > 1:
        got = ", ".join(f"{n}: {t.dtype}" for n, t in tensors)
        raise RuntimeError(f"fusedad.linear: expected input, weight and bias to have the same dtype, got {got}")
    if len({t.device for _, t in tensors}) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise RuntimeError(f"fusedad.linear: expected all tensors on the same device, got {got}")


def _common_call(input, weight, bias):
    """True for the call nothing needs to be said about: one supported dtype, one device, a 2-D weight
    whose in_features match, a bias of shape (out_features,) or None. The per-call fast path (attribute
    reads only); anything else — including every error — takes ``check_linear_args``."""
    try:
        dtype = weight.dtype
        if not (dtype in _SUPPORTED and input.dtype == dtype and weight.dim() == 2 and input.dim() >= 1
                and input.shape[-1] == weight.shape[1] and input.device == weight.device):
            return False
        return bias is None or (bias.dtype == dtype and bias.dim() == 1 and bias.shape[0] == weight.shape[0]
                                and bias.device == weight.device)
    except (AttributeError, TypeError):  # not tensors: the full check names what is wrong
        return False


def _autocast_maybe_on(input):
    if _ANY_AUTOCAST is not None:
        return _ANY_AUTOCAST()
    return True  # (older torch) let _autocast ask for the input's device type


def common_2d_call(input, weight, bias):
    """True for a 2-D input that ``cast_and_check`` would return unchanged and without error (autocast
    off, ``_common_call``): the caller may skip it, and the reshapes of ``linear``."""
    return not _autocast_maybe_on(input) and _common_call(input, weight, bias) and input.dim() == 2


def cast_and_check(input, weight, bias, weight_main_grad=None):
    """Autocast's cast (as ``nn.Linear`` gets it), then ``check_linear_args``. -> (input, weight, bias)"""
    if weight_main_grad is None and not _autocast_maybe_on(input) and _common_call(input, weight, bias):
        return input, weight, bias
    if isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor):
        input, weight, bias = _autocast(input, weight, bias)
    check_linear_args(input, weight, bias)
    if weight_main_grad is not None:
        _check_main_grad(weight_main_grad, weight)
    return input, weight, bias


def _autocast(input, weight, bias):
    """Cast to the autocast dtype exactly when nn.Linear would (linear is an autocast-to-low-precision op)."""
    device_type = input.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    return cast(input), cast(weight), cast(bias)


def _check_main_grad(main_grad, weight):
    if main_grad.shape != weight.shape or main_grad.device != weight.device or not main_grad.is_floating_point():
        raise RuntimeError(f"fusedad.linear: weight_main_grad must be a floating tensor of the weight's shape "
                           f"{_shape(weight)} on {weight.device}, got {main_grad.dtype} of shape "
                           f"{_shape(main_grad)} on {main_grad.device}")


def check_block_args(where, x, weights, biases):
    """Checks for an MLP block: floating tensors of one supported dtype on one device, shapes chained.

    weights: [(name, tensor, (rows, cols) expected, None for "any")]; biases: [(name, tensor | None, size)].
    """
    named = [(n, t) for n, t, _ in weights] + [(n, t) for n, t, _ in biases if t is not None]
    for name, t in [("input", x)] + named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32 "
                            "and float64")
    if x.dim() < 1:
        raise RuntimeError(f"{where}: input must have at least 1 dimension (*, in_features), got shape {_shape(x)}")
    for name, t, expected in weights:
        if t.dim() != 2 or any(e is not None and s != e for s, e in zip(t.shape, expected)):
            want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
            raise RuntimeError(f"{where}: {name} must have shape {want} to match input of shape {_shape(x)} and the "
                               f"other weights, got {_shape(t)}")
    for name, t, size in biases:
        if t is not None and (t.dim() != 1 or t.shape[0] != size):
            raise RuntimeError(f"{where}: {name} must have shape ({size},), got {_shape(t)}")
    everything = [("input", x)] + named
    if len({t.dtype for _, t in everything}) > 1:
        got = ", ".join(f"{n}: {t.dtype}" for n, t in everything)
        raise RuntimeError(f"{where}: expected every tensor to have the same dtype, got {got}")
    if len({t.device for _, t in everything}) > 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in everything)
        raise RuntimeError(f"{where}: expected all tensors on the same device, got {got}")


def autocast_all(*tensors):
    """Autocast's cast for a block's tensors (None entries kept), as nn.Linear would get it."""
    x = tensors[0]
    if not isinstance(x, torch.Tensor):
        return tensors
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)

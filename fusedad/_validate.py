"""Argument checks for ``fusedad.functional.linear``: a clear error naming shapes, dtypes and devices,
raised before any kernel sees the tensors (never a wrong answer or an illegal memory access)."""
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

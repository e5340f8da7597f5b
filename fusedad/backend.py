"""Which implementation runs for a tensor, and the dispatch to it.

    "triton"             CUDA tensors: the compiled Triton kernels
    "triton-interpreter" CPU tensors when the kernels were defined under TRITON_INTERPRET=1: the same
                         kernels, run by Triton's interpreter (numpy) — how CI tests the real kernels
    "eager"              anything else (CPU without the interpreter, other devices): torch ops with the
                         same semantics (``fusedad/eager.py``)
"""
import torch

from . import eager
from .activations import check_activation
from .kernels import linear as kernels

TRITON = "triton"
INTERPRETER = "triton-interpreter"
EAGER = "eager"


def backend(tensor_or_device):
    """Name of the implementation that runs fusedad ops for this tensor (or device)."""
    device = tensor_or_device.device if isinstance(tensor_or_device, torch.Tensor) else torch.device(
        tensor_or_device)
    if kernels.INTERPRETER and device.type in ("cpu", "cuda"):
        return INTERPRETER
    if device.type == "cuda" and not kernels.INTERPRETER:
        return TRITON
    return EAGER


def forward(x, weight, bias, activation, **kwargs):
    """Dispatch of ``linear_forward`` (activation by name); kwargs as ``kernels.linear.linear_forward``."""
    if backend(x) == EAGER:
        return eager.linear_forward(x, weight, bias, activation, **kwargs)
    return kernels.linear_forward(x, weight, bias, check_activation(activation), **kwargs)


def backward(grad_y, x, weight, saved, activation, need_x, need_weight, need_bias, weight_grad_out=None):
    """Dispatch of ``linear_backward`` (activation by name)."""
    if backend(grad_y) == EAGER:
        return eager.linear_backward(grad_y, x, weight, saved, activation, need_x, need_weight, need_bias,
                                     weight_grad_out)
    return kernels.linear_backward(grad_y, x, weight, saved, check_activation(activation),
                                   need_x, need_weight, need_bias, weight_grad_out=weight_grad_out)

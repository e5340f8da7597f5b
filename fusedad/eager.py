"""The eager backend: the kernels' contract (``kernels/linear.py``) with torch ops.

Used for tensors no Triton kernel runs on here (CPU without ``TRITON_INTERPRET=1``, other devices), and
inside the custom ops where Inductor compiles ordinary ops. Shapes as in ``kernels/linear.py``.
"""
import torch
import torch.nn.functional as F

from . import derivatives
from .activations import lookup

_IDENTITY = lookup(None)  # dZ is already formed: the gradients' chain is the identity


def linear_forward(x, weight, bias, act, store_preact=False,
                   x_tangent=None, weight_tangent=None, bias_tangent=None, store_preact_tangent=False):
    """-> (y, z or None, y_tangent or None, z_tangent or None); ``act`` is an activation table row."""
    z = F.linear(x, weight, bias)
    y = act.apply(z)
    if x_tangent is None and weight_tangent is None and bias_tangent is None:
        return y, (z if store_preact else None), None, None
    yt, zt = derivatives.tangents(x, weight, x_tangent, weight_tangent, bias_tangent, act.saved(y, z), act, F.linear)
    return y, (z if store_preact else None), yt, (zt if store_preact_tangent else None)


def linear_backward(grad_y, x, weight, saved, act, need_x=True, need_weight=True, need_bias=False,
                    weight_grad_out=None):
    """-> (grad_x or None, grad_w or None, grad_b or None); see ``kernels.linear.linear_backward``.

    First order only (the autograd Function calls it with grad mode off, a custom op's body below
    autograd): dZ by PyTorch's own fused activation backward (``Activation.first_order_chain``), then
    ``derivatives.gradients``' products and sum."""
    dz = act.first_order_chain(grad_y, saved) if act.saves is not None else grad_y
    dx, dw, db = derivatives.gradients(dz, None, x, weight, None, _IDENTITY, need_x, need_weight, need_bias,
                                       torch.mm)
    if dw is not None and weight_grad_out is not None:
        dw = weight_grad_out.add_(dw)
    return dx, dw, db

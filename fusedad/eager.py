"""The eager PyTorch path: the same contract as ``kernels.linear`` with torch ops.

Used for tensors no Triton kernel runs on here (CPU without ``TRITON_INTERPRET=1``, other devices)
and as the reference semantics the kernels are tested against. Shapes as in ``kernels/linear.py``.
"""
import torch.nn.functional as F

from . import activations


def linear_forward(x, weight, bias, activation, store_preact=False,
                   x_tangent=None, weight_tangent=None, bias_tangent=None, store_preact_tangent=False):
    """-> (y, z or None, y_tangent or None, z_tangent or None); see ``kernels.linear.linear_forward``."""
    z = F.linear(x, weight, bias)
    y = activations.apply(z, activation)
    yt = zt = None
    if x_tangent is not None or weight_tangent is not None or bias_tangent is not None:
        parts = []
        if x_tangent is not None:
            parts.append(F.linear(x_tangent, weight))
        if weight_tangent is not None:
            parts.append(F.linear(x, weight_tangent))
        if bias_tangent is not None:
            parts.append(bias_tangent.expand(z.shape))
        zt = sum(parts[1:], parts[0])
        yt = activations.chain(zt, y if activation == "relu" else z, activation)
    return y, (z if store_preact else None), yt, (zt if store_preact_tangent else None)


def linear_backward(grad_y, x, weight, saved, activation, need_x=True, need_weight=True, need_bias=False,
                    weight_grad_out=None):
    """-> (grad_x or None, grad_w or None, grad_b or None); see ``kernels.linear.linear_backward``."""
    dz = activations.chain(grad_y, saved, activation)
    dx = dz @ weight if need_x else None
    dw = dz.t() @ x if need_weight else None
    if dw is not None and weight_grad_out is not None:
        dw = weight_grad_out.add_(dw)
    db = dz.sum(0) if need_bias else None
    return dx, dw, db

"""The linear layer's derivatives, written once, from a matrix product passed in.

    dZ = dY ⊙ act'(Z) (+ a gradient that arrives for Z itself)
    dX = dZ·W   (M×K)      dW = dZᵀ·X   (N×K)      db = Σ_rows dZ   (N)
    Ż  = Ẋ·Wᵀ + X·Ẇᵀ + ḃ   Ẏ = act'(Z) ⊙ Ż

The eager backend passes torch's own products; the autograd Function's composite backward (double
backward, torch.func) and its forward-mode fallback pass the fused linear itself, so those pieces run
the kernels and stay differentiable. The fused kernels compute the same formulas in one launch.
"""


def saved_for_backward(act, need_x, need_weight, x, weight, y, z):
    """What a backward needs, and nothing else: x only for dW, weight only for dX, and y or z as the
    activation table says act' reads. -> (x | None, weight | None, saved | None)"""
    return (x if need_weight else None), (weight if need_x else None), act.saved(y, z)


def gradients(grad_y, grad_z, x, weight, saved, act, need_x, need_weight, need_bias, matmul):
    """(dX, dW, db), each None where not needed.

    grad_y, grad_z: (M, N) or None; x: (M, K); weight: (N, K); saved: as ``saved_for_backward``.
    matmul(a, b) -> a·b.
    """
    dz = act.chain(grad_y, saved) if grad_y is not None else None
    if grad_z is not None:
        dz = grad_z if dz is None else dz + grad_z
    dx = matmul(dz, weight) if need_x else None  # dX = dZ·W
    dw = matmul(dz.t(), x) if need_weight else None  # dW = dZᵀ·X
    db = dz.sum(0) if need_bias else None
    return dx, dw, db


def tangents(x, weight, x_t, weight_t, bias_t, saved, act, linear):
    """(Ẏ, Ż) for the tangents given (None for an argument without one), or (None, None) if none is.

    x: (M, K); weight: (N, K); saved: as ``saved_for_backward``; linear(a, w) -> a·wᵀ.
    """
    parts = []
    if x_t is not None:
        parts.append(linear(x_t, weight))
    if weight_t is not None:
        parts.append(linear(x, weight_t))
    if bias_t is not None:
        parts.append(bias_t.expand(x.shape[0], weight.shape[0]))
    if not parts:
        return None, None
    z_t = sum(parts[1:], parts[0])
    return act.chain(z_t, saved), z_t

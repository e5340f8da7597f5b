"""Eager PyTorch mirrors of ``kernels/activations.py``: the reference formulas, the eager fallback, and
the differentiable pieces of the double-backward path. Names and ids are shared with the kernels.

    relu'(z) = [z > 0]          gelu'(z) = Φ(z) + z·φ(z)          silu'(z) = σ(z)(1 + z(1 − σ(z)))
    gelu_tanh'(z) = ½(1 + t) + ½ z (1 − t²)·√(2/π)(1 + 3·0.044715 z²),  t = tanh(√(2/π)(z + 0.044715 z³))
"""
import math

import torch
import torch.nn.functional as F

from .kernels.activations import ACTIVATION_IDS

#: Activation names accepted by ``fusedad.functional.linear`` / ``fusedad.nn.Linear``.
ACTIVATIONS = tuple(name for name in ACTIVATION_IDS if name is not None)

#: Activations whose derivative needs the pre-activation z (relu reads it from the output y).
SMOOTH = frozenset({"gelu", "gelu_tanh", "silu"})


def check_activation(activation):
    """Return the activation's kernel id, or raise a ValueError naming the valid choices."""
    if activation not in ACTIVATION_IDS:
        raise ValueError(
            f"fusedad: unknown activation {activation!r}; expected None or one of {', '.join(ACTIVATIONS)}")
    return ACTIVATION_IDS[activation]


def apply(z, activation):
    """act(z) with PyTorch's own functions (exactly what eager nn code computes)."""
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    return F.silu(z)


def derivative(z, activation):
    """act'(z) for the smooth activations, from differentiable torch ops (so it has a derivative too)."""
    if activation == "gelu":
        return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
            2.0 * math.pi)
    if activation == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"derivative() is for {sorted(SMOOTH)}, got {activation!r}")


def chain(g, saved, activation):
    """g ⊙ act'(z) — a cotangent dY or a tangent Ż through the activation.

    ``saved`` is y for relu (a select exactly as PyTorch's threshold_backward: g where y > 0, else 0),
    z for the smooth activations, unused for None.
    """
    if activation is None:
        return g
    if activation == "relu":
        return torch.where(saved <= 0, torch.zeros((), dtype=g.dtype, device=g.device), g)
    return g * derivative(saved, activation)


def from_module(module):
    """The activation name for an activation ``nn.Module`` we can fuse, else None."""
    if type(module) is torch.nn.ReLU:
        return "relu"
    if type(module) is torch.nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if type(module) is torch.nn.SiLU:
        return "silu"
    return None

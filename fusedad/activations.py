"""The activation table: the one place that knows each fused activation.

Per activation: its public name, the kernel id (``kernels/activations.py`` turns the ids into named
``tl.constexpr`` globals), the PyTorch function (reference and eager path), ``chain`` = g ⊙ act'(saved)
from differentiable torch ops (eager backward, double backward, forward-mode fallback), which forward
output act' reads (``saves``: "y", "z" or None), and the ``nn.Module`` types ``fusedad.convert`` fuses.
Torch only: importing it defines no kernel.

    relu(z)      = max(z, 0)                     relu'(z)      = [z > 0]          (read from y: y > 0 ⇔ z > 0)
    relu2(z)     = max(z, 0)²                    relu2'(z)     = 2·max(z, 0)
    gelu(z)      = z·Φ(z)                        gelu'(z)      = Φ(z) + z·φ(z)
    gelu_tanh(z) = z/2·(1 + tanh(u)), u = √(2/π)(z + 0.044715 z³)
                   gelu_tanh'(z) = ½(1 + t) + ½ z (1 − t²)·√(2/π)(1 + 3·0.044715 z²),  t = tanh(u)
    silu(z)      = z·σ(z)                        silu'(z)      = σ(z)(1 + z(1 − σ(z)))

relu and relu2 chain by a select, exactly as PyTorch's threshold_backward (g where the input was > 0,
else 0): an infinite g where z ≤ 0 gives 0, not inf·0 = NaN, and a NaN passes through.

Adding an activation: one ``Activation`` row below, and its two branches (``apply_activation``,
``chain_activation``) in ``kernels/activations.py``.
"""
import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Activation:
    name: Optional[str]  #: public name; None for no activation
    kernel_id: int  #: the ``ACT`` constexpr of the kernels
    apply: Callable  #: act(z) with PyTorch's own functions
    chain: Callable  #: chain(g, saved) = g ⊙ act'(z), differentiable
    saves: Optional[str]  #: what act' reads: "y" (the output), "z" (the pre-activation) or None
    #: (module type, attributes it must have) pairs that ``convert`` fuses into the preceding Linear
    modules: tuple = ()
    #: g ⊙ act'(saved) by PyTorch's own fused backward op (what autograd runs for nn.GELU etc.): one
    #: kernel instead of ``chain``'s half dozen, for the eager backend's first-order backward, which is
    #: never differentiated again. None: ``chain`` is used.
    native_chain: Optional[Callable] = None

    def first_order_chain(self, g, saved):
        """g ⊙ act'(saved) for a backward that is not differentiated again."""
        return (self.native_chain or self.chain)(g, saved)

    @property
    def op_name(self):
        """The name in the custom ops' schema (a str there, so no activation is "none")."""
        return self.name or "none"

    @property
    def needs_z(self):
        """True if the backward needs the pre-activation z stored by the forward."""
        return self.saves == "z"

    def saved(self, y, z):
        """What the forward keeps for act': y, z or None."""
        return y if self.saves == "y" else z if self.saves == "z" else None


def _select(where_positive):
    """chain for relu-like activations: where(saved ≤ 0, 0, where_positive(g, saved))."""
    return lambda g, saved: torch.where(saved <= 0, torch.zeros((), dtype=g.dtype, device=g.device),
                                        where_positive(g, saved))


def _times(derivative):
    return lambda g, saved: g * derivative(saved)


def _gelu_grad(z):
    return 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _gelu_tanh_grad(z):
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (z + 0.044715 * z * z * z))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


_aten = torch.ops.aten

TABLE = (
    Activation(None, 0, lambda z: z, lambda g, saved: g, None),
    # threshold_backward(g, y, 0) = where(y <= 0, 0, g): the same select as ``_select`` (NaN passes)
    Activation("relu", 1, F.relu, _select(lambda g, y: g), "y", ((torch.nn.ReLU, {}),),
               native_chain=lambda g, y: _aten.threshold_backward.default(g, y, 0)),
    Activation("gelu", 2, F.gelu, _times(_gelu_grad), "z", ((torch.nn.GELU, {"approximate": "none"}),),
               native_chain=lambda g, z: _aten.gelu_backward.default(g, z, approximate="none")),
    Activation("gelu_tanh", 3, lambda z: F.gelu(z, approximate="tanh"), _times(_gelu_tanh_grad), "z",
               ((torch.nn.GELU, {"approximate": "tanh"}),),
               native_chain=lambda g, z: _aten.gelu_backward.default(g, z, approximate="tanh")),
    Activation("silu", 4, F.silu, _times(_silu_grad), "z", ((torch.nn.SiLU, {}),),
               native_chain=lambda g, z: _aten.silu_backward.default(g, z)),
    Activation("relu2", 5, lambda z: torch.square(F.relu(z)), _select(lambda g, z: g * (2.0 * z)), "z"),
)

_BY_NAME = {a.name: a for a in TABLE}
_BY_NAME["none"] = _BY_NAME[None]  # the custom ops' spelling
_BY_ID = {a.kernel_id: a for a in TABLE}
assert len(_BY_ID) == len(TABLE), "kernel ids must be unique"

#: Activation names accepted by ``fusedad.functional.linear`` / ``fusedad.nn.Linear`` (besides None).
ACTIVATIONS = tuple(a.name for a in TABLE if a.name is not None)


def lookup(activation):
    """The table row for a name (None, "none" or one of ``ACTIVATIONS``), an ``Activation``, or a kernel
    id; a ValueError naming the valid choices for anything else."""
    if isinstance(activation, Activation):
        return activation
    if activation is None or type(activation) is str:  # the hot path: one dict lookup
        row = _BY_NAME.get(activation)
    else:
        row = _BY_ID.get(activation) if isinstance(activation, int) and not isinstance(activation, bool) else None
    if row is None:
        raise ValueError(
            f"fusedad: unknown activation {activation!r}; expected None or one of {', '.join(ACTIVATIONS)}")
    return row


def from_module(module):
    """The table row whose ``modules`` match this ``nn.Module`` (exact type and attributes), else None."""
    for act in TABLE:
        for cls, attrs in act.modules:
            if type(module) is cls and all(getattr(module, k, None) == v for k, v in attrs.items()):
                return act
    return None

"""fusedad.kernels — pure Triton: the fused linear kernels and their thin launch wrappers.

No autograd and no nn here (that is ``fusedad``). Installed as ``fusedad.kernels`` from the top-level
``kernels/`` directory (the bare name ``kernels`` is taken on PyPI).
"""
from .activations import ACTIVATION_IDS, ACT_GELU, ACT_GELU_TANH, ACT_NONE, ACT_RELU, ACT_SILU
from .linear import (INTERPRETER, Launch, dot_precision, force_int64, linear_backward, linear_forward,
                     needs_int64, record_launches)

__all__ = [
    "ACTIVATION_IDS", "ACT_NONE", "ACT_RELU", "ACT_GELU", "ACT_GELU_TANH", "ACT_SILU",
    "INTERPRETER", "Launch", "dot_precision", "force_int64", "linear_forward", "linear_backward", "needs_int64",
    "record_launches",
]

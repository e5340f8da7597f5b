"""fusedad.kernels — pure Triton: the fused linear kernels, their variant table and thin launch wrappers.

No autograd and no nn here (that is ``fusedad``). Installed as ``fusedad.kernels`` from the top-level
``kernels/`` directory (the bare name ``kernels`` is taken on PyPI).
"""
from .linear import (INTERPRETER, Launch, dot_precision, force_int64, linear_backward, linear_forward,
                     needs_int64, record_launches)

__all__ = ["INTERPRETER", "Launch", "dot_precision", "force_int64", "linear_forward", "linear_backward",
           "needs_int64", "record_launches"]

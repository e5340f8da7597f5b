"""torch's own product as rows of the kernel-variant table: the same contract as a Triton launch (the
``Problem``'s operands in, its preallocated outputs written), computed by ATen (cuBLAS on CUDA).

Where a fused kernel has nothing to win — no activation, no bias, the layout cuBLAS is best at — a
Triton GEMM can at best tie torch's. These rows let the tuner measure that instead of assuming it: they
are never the heuristic default (``default=False`` in the table), so they run only when the tuner timed
them faster for a launch's key, or when a test or benchmark forces one with ``variants.use``.

    forward:   z = x·Wᵀ + b  (addmm into z, or into y when z is not stored),  y = act(z)
    backward:  dZ = dY ⊙ act'(saved)  (PyTorch's fused activation backward: ``first_order_chain``),
               dX = dZ·W,  dW = dZᵀ·X  (mm into the outputs),  db = Σ_rows dZ  (a sum into db)

Rounding: the kernels apply the activation to the fp32 accumulator and round once; this row rounds z to
the output dtype first, then applies the activation in that dtype — exactly what ``nn.Linear`` followed
by the activation module computes. Accumulating launches (dW added into an fp32 ``main_grad``, dX into
the LM head's fp32 buffer) are not offered here: torch's mm of 16-bit operands writes a 16-bit product,
so the sum would be rounded before it is accumulated; the fused epilogue adds the fp32 accumulator.
"""
import torch

from ..activations import lookup


def applies_forward(problem):
    """Any layout, any supported dtype; not a tangent launch (that direction has its own rows)."""
    return len(problem.tensors) >= 5 and problem.tensors[0] is not None


def applies_backward(problem):
    """Any backward that writes fresh outputs (never one that accumulates into a caller's buffer)."""
    f = problem.flags
    return not (f.get("ACCUMULATE_DW") or f.get("ACCUMULATE_DX"))


def forward(problem):
    """y = act(x·Wᵀ + b) (and z) into the launch's outputs ``problem.tensors[3:5]``."""
    x, weight, bias, y, z = problem.tensors[:5]
    act = lookup(problem.flags["ACT"])
    pre = z if z is not None else y
    if bias is None:
        torch.mm(x, weight.t(), out=pre)
    else:
        torch.addmm(bias, x, weight.t(), out=pre)
    if act.name is not None:
        y.copy_(act.apply(pre))
    elif z is not None:
        y.copy_(z)


def backward(problem):
    """dX, dW, db (those the launch's COMPUTE_* flags ask for) into ``problem.tensors[4:7]``."""
    grad_y, x, weight, saved, dx, dw, db = problem.tensors[:7]
    f = problem.flags
    act = lookup(f["ACT"])
    # first order (a backward launch is never differentiated again): PyTorch's fused activation backward
    dz = act.first_order_chain(grad_y, saved) if act.saves is not None else grad_y
    if f["COMPUTE_DX"]:
        torch.mm(dz, weight, out=dx)  # dX = dZ·W
    if f["COMPUTE_DW"]:
        torch.mm(dz.t(), x, out=dw)  # dW = dZᵀ·X
    if f["COMPUTE_DB"]:
        # fp32 accumulation for 16-bit dZ (as the dZ pass's fp32 partial sums), then one rounding
        acc = torch.float64 if dz.dtype == torch.float64 else torch.float32
        db.copy_(dz.sum(0, dtype=acc))

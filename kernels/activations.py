"""Activations and their derivatives as small ``@triton.jit`` functions.

Each activation has an integer id (a ``tl.constexpr`` in the kernels) so one GEMM body can be
specialised per activation at compile time. The eager PyTorch mirrors of these formulas live in
``fusedad/activations.py``; the two are tested against each other.

All functions take and return the accumulator dtype (float32, or float64 for float64 inputs), so the
epilogue and prologue math never rounds to 16 bits in between.

    relu(z)      = max(z, 0)                        relu'(z)      = [z > 0]   (PyTorch: 0 at z == 0)
    gelu(z)      = z·Φ(z) = z/2·(1 + erf(z/√2))      gelu'(z)      = Φ(z) + z·φ(z)
    gelu_tanh(z) = z/2·(1 + tanh(u)),  u = √(2/π)(z + 0.044715 z³)
                   gelu_tanh'(z) = ½(1 + t) + ½ z (1 − t²) √(2/π)(1 + 3·0.044715 z²),  t = tanh(u)
    silu(z)      = z·σ(z)                           silu'(z)      = σ(z)(1 + z(1 − σ(z)))
"""
import triton
import triton.language as tl

ACT_NONE = 0
ACT_RELU = 1
ACT_GELU = 2
ACT_GELU_TANH = 3
ACT_SILU = 4

#: Public activation names (as accepted by ``fusedad.functional.linear``) -> kernel ids.
ACTIVATION_IDS = {
    None: ACT_NONE,
    "relu": ACT_RELU,
    "gelu": ACT_GELU,
    "gelu_tanh": ACT_GELU_TANH,
    "silu": ACT_SILU,
}

# Literals in the jit functions below (module floats would need tl.constexpr globals):
# 0.7071067811865476 = 1/√2, 0.3989422804014327 = 1/√(2π), 0.7978845608028654 = √(2/π), 0.044715 = GELU's c.


@triton.jit
def _tanh(u):
    # tanh(u) = 2·σ(2u) − 1: tl.sigmoid exists on every supported Triton (3.2 … 3.9) and in the
    # interpreter, unlike libdevice's tanh, and stays accurate in float64.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    """act(z), elementwise; ``ACT`` is one of the ``ACT_*`` ids."""
    if ACT == 1:
        # z < 0 (not z > 0) so that relu(NaN) = NaN, as torch.relu.
        return tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + _tanh(u))
    elif ACT == 4:
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def activation_grad(saved, ACT: tl.constexpr):
    """act'(z), elementwise, for the smooth activations (gelu, gelu_tanh, silu) from the saved z."""
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(saved * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * saved * saved)
        return cdf + saved * pdf
    elif ACT == 3:
        z2 = saved * saved
        t = _tanh(0.7978845608028654 * saved * (1.0 + 0.044715 * z2))
        return 0.5 * (1.0 + t) + 0.5 * saved * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z2)
    else:
        s = tl.sigmoid(saved)
        return s * (1.0 + saved * (1.0 - s))


@triton.jit
def chain_activation(g, saved, ACT: tl.constexpr):
    """g ⊙ act'(z): the chain rule through the activation, for a cotangent dY or a tangent Ż.

    ``saved`` is what the forward kept for this activation: relu keeps its output y (relu'(z) = [z > 0]
    = [y > 0], so no pre-activation is stored); gelu, gelu_tanh and silu keep the pre-activation z.
    relu is a select, not a product, exactly as PyTorch's threshold_backward (g where y > 0, else 0):
    an infinite g at y ≤ 0 gives 0, not inf·0 = NaN, and a NaN y passes g through.
    """
    if ACT == 0:
        return g
    elif ACT == 1:
        return tl.where(saved <= 0, 0.0, g)
    else:
        return g * activation_grad(saved, ACT)

"""Activations as small ``@triton.jit`` functions: ``apply_activation`` (act) and ``chain_activation``
(g ⊙ act'), one branch per row of the activation table in ``fusedad/activations.py`` — which holds the
formulas, the kernel ids and the eager mirrors the two are tested against.

Every id is a named ``tl.constexpr`` global taken from the table; an id with no branch here fails to
compile (``tl.static_assert``), so an unknown id can never silently become another activation.

All functions take and return the accumulator dtype (float32, or float64 for float64 inputs), so the
epilogue and prologue math never rounds to 16 bits in between.
"""
import triton
import triton.language as tl

from ..activations import TABLE

# ACT_NONE, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_RELU2, …: one named constexpr per table row
# (``ACT_`` + the upper-cased op name), so a new row needs no edit here besides its two branches.
globals().update({f"ACT_{a.op_name.upper()}": tl.constexpr(a.kernel_id) for a in TABLE})

# Literals in the jit functions below (module floats would need tl.constexpr globals):
# 0.7071067811865476 = 1/√2, 0.3989422804014327 = 1/√(2π), 0.7978845608028654 = √(2/π), 0.044715 = GELU's c.


@triton.jit
def _tanh(u):
    # tanh(u) = 2·σ(2u) − 1: tl.sigmoid exists on every supported Triton (3.2 … 3.9) and in the
    # interpreter, unlike libdevice's tanh, and stays accurate in float64.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _expm1_nonpositive(x):
    """exp(x) − 1 for x ≤ 0 without cancellation near 0 (Kahan's trick: u = exp(x), then (u − 1)·x / log(u);
    the rounding errors of u − 1 and log(u) cancel). Exact −1 where exp underflows."""
    u = tl.exp(x)
    um1 = u - 1.0
    degenerate = (um1 == 0.0) | (u == 0.0)
    r = um1 * x / tl.log(tl.where(degenerate, 0.5, u))
    return tl.where(um1 == 0.0, x, tl.where(u == 0.0, -1.0, r))


@triton.jit
def _tanh_accurate(v):
    """tanh(v) to a few units of rounding in relative terms everywhere, small |v| included:
    tanh(|v|) = −m / (2 + m), m = expm1(−2|v|). ``_tanh``'s 2σ(2v) − 1 cancels for small |v| (absolute error
    ~ one unit of 1, so relative error ~ eps/|v|); the LM head's softcap c·tanh(z/c) multiplies that by c,
    which made a softcapped logit's error grow with c instead of with the logit (measured: logits near 290
    under c = 1000 in fp32, dX error 5.6× eager's, tests/test_cross_entropy.py)."""
    m = _expm1_nonpositive(-2.0 * tl.abs(v))
    t = -m / (2.0 + m)
    return tl.where(v < 0, -t, t)


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    """act(z), elementwise."""
    if ACT == ACT_NONE:
        return z
    elif ACT == ACT_RELU:
        # z < 0 (not z > 0) so that relu(NaN) = NaN, as torch.relu.
        return tl.where(z < 0, 0.0, z)
    elif ACT == ACT_RELU2:
        r = tl.where(z < 0, 0.0, z)
        return r * r
    elif ACT == ACT_GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + _tanh(u))
    elif ACT == ACT_SILU:
        return z * tl.sigmoid(z)
    else:
        tl.static_assert(False, "unknown activation id")


@triton.jit
def chain_activation(g, saved, ACT: tl.constexpr):
    """g ⊙ act'(z): the chain rule through the activation, for a cotangent dY or a tangent Ż.

    ``saved`` is what the forward kept for this activation (the table's ``saves``): y for relu, z for
    the others. relu and relu2 select exactly as PyTorch's threshold_backward (g where the input was
    > 0, else 0): an infinite g there gives 0, not inf·0 = NaN, and a NaN passes g through.
    """
    if ACT == ACT_NONE:
        return g
    elif ACT == ACT_RELU:
        return tl.where(saved <= 0, 0.0, g)
    elif ACT == ACT_RELU2:
        return tl.where(saved <= 0, 0.0, g * (2.0 * saved))
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(saved * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * saved * saved)
        return g * (cdf + saved * pdf)
    elif ACT == ACT_GELU_TANH:
        z2 = saved * saved
        t = _tanh(0.7978845608028654 * saved * (1.0 + 0.044715 * z2))
        return g * (0.5 * (1.0 + t) + 0.5 * saved * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z2))
    elif ACT == ACT_SILU:
        s = tl.sigmoid(saved)
        return g * (s * (1.0 + saved * (1.0 - s)))
    else:
        tl.static_assert(False, "unknown activation id")

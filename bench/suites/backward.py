"""The ``backward`` suite: fusedad's backward kernel variants side by side (``SUITE.help``).

One Linear(+activation) with bias, the backward of a forward done once outside the timing: dX, dW and db
of the loss Σ dY ⊙ act(X·Wᵀ + b), for

* ``fusedad:<variant>`` — every ``direction == "bwd"`` row of the kernel-variant table
  (``fusedad.kernels.variants``), each run through ``variants.use(name)``. Today ``linear_bwd`` (the
  default: a dZ pass, then plain GEMMs) and ``linear_bwd_prologue`` (dZ in the GEMM prologue, one
  launch). The launches of one call are recorded (``kernels`` field): a variant whose predicate does
  not apply to the case (``select`` would fall back to the default) is an ERROR row, never a time
  under the wrong name. All variants share one fusedad forward (what it saves does not depend on the
  backward variant).
* ``eager`` — ``F.linear`` + the activation module, autograd's backward of the same loss (the reference).
* ``floor`` — the GEMM floor: dX = dZ·W and dW = dZᵀ·X by two ``torch.mm`` (cuBLAS on CUDA) on a
  *given* dZ (eager's, computed once outside the timing): no act' pass, no db. A reference row, not
  checked like the others: it is compared with eager's dX and dW only (its ``note`` says so).

FLOP per call 4·M·N·K (two GEMMs; the floor does the same GEMMs). Cases with M <= ``graph_max_m`` also
time a CUDA-graph replay of every implementation (``runner``): ms − graph ms is the host-side cost.
"""
import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn

import fusedad
from fusedad.kernels import variants

from .. import report
from ..impls import ACTIVATION_MODULES, ACTIVATIONS, PLANTED_SCALE, forced_variant_build
from ..plan import DTYPE_NAMES, VARIANT_IMPL, Shape
from ..runner import Builders, Case, reference_build
from . import Suite
from .layers import layer_bytes, layer_flops

#: The seed's Net3 first layer (M=256: launch and host overhead show) and an LLM MLP up-projection (M=8192:
#: compute-bound). CPU: tiny stand-ins for the same two roles (the interpreter runs the same kernels).
CUDA_SHAPES = (Shape(256, 4096, 8192, "net3-l0"), Shape(8192, 4096, 14336, "llm-up"))
CPU_SHAPES = (Shape(8, 32, 64, "net3-l0 tiny"), Shape(64, 64, 128, "llm-up tiny"))
ACTS = ("gelu", "gelu_tanh", "silu", "relu", "none")

FLOOR_NOTE = "dZ given (eager's); dX, dW vs eager, no db"


def bwd_variants():
    """The backward rows of the kernel-variant table, in table order (the default first among equals)."""
    return tuple(v for v in variants.VARIANTS if v.direction == "bwd")


def preset(device, quick):
    """CUDA: M=256 (4096→8192) and M=8192 (4096→14336), gelu gelu_tanh silu relu none, bf16, graphs at M ≤ 256;
    quick: M=256 with gelu_tanh and none. CPU: tiny shapes, graphs flagged at the small one (reported as
    skipped (no GPU))."""
    cuda = device == "cuda"
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    return {"shapes": shapes[:1] if quick else shapes, "dtypes": (torch.bfloat16,),
            "activations": ("gelu_tanh", "none") if quick else ACTS, "graph_max_m": shapes[0].M}


def backward_builders(shape, dtype, activation, plan):
    """{impl: build} (eager first) for one case, with ``refresh`` (new dY, and the floor's dZ from it)."""
    M, K, N = shape.M, shape.K, shape.N
    device = plan.device
    lin = nn.Linear(K, N, device=device, dtype=dtype)  # nn.Linear's init: activations stay O(1)
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, lin.weight, lin.bias)]
    w = leaves[1].detach()
    act = ACTIVATION_MODULES[activation]() if activation != "none" else nn.Identity()

    # Each forward once, outside the timing; every timed call is a backward with retain_graph.
    z_eager = F.linear(*leaves)
    y_eager = act(z_eager)
    y_fused = fusedad.linear(*leaves, activation=activation)

    def dz_of_dy():
        return torch.autograd.grad(y_eager, z_eager, dy, retain_graph=True)[0].detach().clone()

    dz = dz_of_dy()

    def refresh():
        with torch.no_grad():
            dy.normal_()
            dz.copy_(dz_of_dy())

    def grads(y):
        return torch.autograd.grad(y, leaves, dy, retain_graph=True)

    def variant_build(name):
        return forced_variant_build(name, lambda: grads(y_fused))

    default = next(v.name for v in bwd_variants() if v.default)

    def planted():  # test hook (--plant-mismatch): the default variant's result, scaled
        fn = variant_build(default)()
        return lambda: tuple(t * PLANTED_SCALE for t in fn())

    out = Builders({"eager": lambda: functools.partial(grads, y_eager)}, refresh)
    if "fusedad" in plan.impls:
        for v in bwd_variants():
            out[VARIANT_IMPL.format(v.name)] = variant_build(v.name)
    if "floor" in plan.impls:
        out["floor"] = reference_build(lambda: lambda: (torch.mm(dz, w), torch.mm(dz.t(), x)),
                                       compare=lambda ref: ref[:2], note=FLOOR_NOTE)
    if plan.plant_mismatch:
        out["planted-mismatch"] = planted
    return out


def cases(settings, plan):
    for shape, dtype, act in itertools.product(settings["shapes"], settings["dtypes"], settings["activations"]):
        M, K, N = shape.M, shape.K, shape.N
        meta = {"case": shape.label, "M": M, "K": K, "N": N, "dtype": DTYPE_NAMES[dtype], "activation": act,
                "phase": "bwd"}
        yield Case(meta, dtype, functools.partial(backward_builders, shape, dtype, act, plan),
                   flops=layer_flops(M, K, N, "bwd"), nbytes=layer_bytes(M, K, N, "bwd", dtype.itemsize, act),
                   graph=M <= settings.get("graph_max_m", 0))


def plot(rows, results, out_dir):
    """Performance runs: backward-<dtype>.png, ms per activation and implementation, one panel per shape."""
    from .. import plots

    return plots.per_shape_bar_charts(rows, results, out_dir, "backward", "backward (dX, dW, db) per variant", "ms per backward")


SUITE = Suite(
    name="backward", title="backward — fusedad's backward variants, eager autograd and the GEMM floor",
    help="the backward (dX, dW, db) of one linear layer + activation: every backward kernel variant of "
         "fusedad's variant table (variants.use), eager autograd and the GEMM floor (two torch.mm on a given dZ); "
         "M=256 (4096->8192, with CUDA-graph replays) and M=8192 (4096->14336), gelu gelu_tanh silu relu none, bf16",
    preset=preset, cases=cases, plot=plot,
    columns=lambda perf: [("shape", "case"), ("dtype", "dtype"), ("act", "activation"), ("kernels", "kernels"),
                          *report.timed_columns(perf), report.NOTE],
    fields={"activation": " | ".join(ACTIVATIONS), "variant": "the kernel variant run (variants.use)",
            "default_variant": "whether select() picks that variant by default",
            "kernels": "the launches of one backward call, in order (recorded)"})

"""The ``forward`` suite: fusedad's forward kernel variants side by side (``SUITE.help``).

One Linear(+activation) with bias, the inference forward ``y = act(x·Wᵀ + b)`` under ``no_grad`` (no Z
stored), for

* ``fusedad:<variant>`` — every ``direction == "fwd"`` row of the kernel-variant table
  (``fusedad.kernels.variants``) whose predicate holds for the case's tensors (the split-K reduce row
  is the second launch of ``linear_fwd_splitk``, not a variant of its own), each run through
  ``variants.use(name)``. The launches of the first call are recorded (``kernels`` field): a variant
  that did not run is an ERROR row, never a time under the wrong name. Which variants apply is in
  every row of the case (``variants`` field; the others are not run: "n/a" in the protocol's summary).
* ``eager`` — ``F.linear`` + the activation module (the reference; with no activation, F.linear).
* ``F.linear`` — the bare GEMM with bias, no activation: what the ratio ``× F.linear`` is against. A
  reference row: its output is Z, not act(Z), so it is checked against F.linear in fp64 instead of eager.
* ``copy`` — decode cases (M ≤ ``variants.DECODE_M``): ``torch.empty_like(w).copy_(w)``, a device copy
  of the weight's bytes timed in the same rounds (checked to equal W). On a performance run every row
  of the case gets ``pct_copy``: its GB/s (x + W + b + y once, ≈ the weight) as % of this copy's GB/s
  (2 × the weight's bytes moved). Decode is a read of the weight, so that is its figure of merit.

FLOP per call 2·M·N·K; bytes the minimum traffic (``layers.layer_bytes``).
"""
import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn

import fusedad
from fusedad.kernels import variants

from .. import report
from ..impls import ACTIVATION_MODULES, forced_variant_build
from ..plan import DTYPE_NAMES, VARIANT_IMPL, Shape
from ..runner import Builders, Case, reference_build, run_timed
from . import Suite
from .layers import layer_bytes, layer_flops

#: The LLM MLP GEMMs at M=8192 (compute-bound), the seed's Net3 first layer at M=256 (near the ridge:
#: launch overhead shows) and decode M=1, 16 on an 8192×8192 weight (a read of the weight). CPU: tiny
#: stand-ins for the same roles, 16-byte aligned rows so that the TMA variants apply (and decode K of two
#: interpreter K blocks, so that the split-K row, which needs a plan of ≥ 2 splits, applies).
CUDA_SHAPES = (Shape(8192, 4096, 4096, "llm-qkv"), Shape(8192, 4096, 14336, "llm-up"),
               Shape(8192, 14336, 4096, "llm-down"), Shape(256, 4096, 8192, "net3-l0"),
               Shape(1, 8192, 8192, "decode"), Shape(16, 8192, 8192, "decode"))
CPU_SHAPES = (Shape(64, 64, 128, "llm tiny"), Shape(32, 32, 64, "net3-l0 tiny"), Shape(1, 128, 64, "decode tiny"),
              Shape(16, 128, 64, "decode tiny"))
ACTS = ("gelu_tanh", "none")

LINEAR_NOTE = "bare F.linear (no activation), checked against F.linear in fp64"
COPY_NOTE = "device copy of the weight (2 × its bytes moved), checked to equal W"


def fwd_variants():
    """The forward rows of the kernel-variant table that are variants of their own, in table order
    (``linear_fwd_splitk_reduce`` is the second launch of ``linear_fwd_splitk``: its predicate never holds)."""
    return tuple(v for v in variants.VARIANTS if v.direction == "fwd" and v.applies is not variants._never)


def applicable(shape, dtype, device, x, w, b):
    """Names of the forward variants whose predicate holds for this call: the case's own x, w, b and an
    output laid out as fusedad allocates it (contiguous), no Z (a no_grad forward), int32 offsets."""
    y = torch.empty(shape.M, shape.N, device=device, dtype=dtype)
    problem = variants.Problem(shape.M, shape.N, shape.K, dtype, (x, w, b, y, None), {"INT64": False})
    return tuple(v.name for v in fwd_variants() if v.applies(problem))


def is_decode(shape):
    return shape.M <= variants.DECODE_M


def preset(device, quick):
    """CUDA: M=8192 (4096→4096, 4096→14336, 14336→4096), M=256 (4096→8192), decode M=1 and 16 (8192→8192),
    gelu_tanh and none, bf16; quick: M=256 and M=1, gelu_tanh. CPU: tiny shapes in the same roles (quick:
    the M=1 one)."""
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    if quick:
        shapes = tuple(s for s in shapes if s.M == 1 or (device == "cuda" and s.tag == "net3-l0"))
    return {"shapes": shapes, "dtypes": (torch.bfloat16,), "activations": ("gelu_tanh",) if quick else ACTS}


def forward_builders(shape, dtype, activation, plan):
    """{impl: build} (eager first) for one case."""
    M, K, N = shape.M, shape.K, shape.N
    device = plan.device
    lin = nn.Linear(K, N, device=device, dtype=dtype)  # nn.Linear's init: activations stay O(1)
    w, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(M, K, device=device, dtype=dtype)
    act = ACTIVATION_MODULES[activation]() if activation != "none" else nn.Identity()
    names = applicable(shape, dtype, device, x, w, b)

    def eager():
        def fn():
            with torch.no_grad():
                return (act(F.linear(x, w, b)),)
        return fn

    def variant_build(name):
        def call():
            with torch.no_grad():
                return (fusedad.linear(x, w, b, activation=activation),)
        return forced_variant_build(name, call)

    out = Builders({"eager": eager})
    if "fusedad" in plan.impls:
        for name in names:
            out[VARIANT_IMPL.format(name)] = variant_build(name)
    if "F.linear" in plan.impls:
        z64 = F.linear(x.double(), w.double(), b.double())
        out["F.linear"] = reference_build(lambda: lambda: (F.linear(x, w, b),), compare=lambda ref: (z64,),
                                          note=LINEAR_NOTE)
    if "copy" in plan.impls and is_decode(shape):
        dst = torch.empty_like(w)
        out["copy"] = reference_build(lambda: lambda: (dst.copy_(w),), compare=lambda ref: (w,), note=COPY_NOTE)
    if plan.plant_mismatch and names:  # test hook: the first variant's result, scaled
        from ..impls import PLANTED_SCALE

        def planted():
            fn = variant_build(names[0])()
            return lambda: tuple(t * PLANTED_SCALE for t in fn())
        out["planted-mismatch"] = planted
    return out


def cases(settings, plan):
    for shape, dtype, act in itertools.product(settings["shapes"], settings["dtypes"], settings["activations"]):
        M, K, N = shape.M, shape.K, shape.N
        # Which variants apply, from stand-ins with the case's layout (fresh contiguous CPU allocations:
        # aligned, as the case's own tensors are; the predicates read layout, dtype and shape only).
        stand_ins = (torch.empty(M, K, dtype=dtype), torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype))
        meta = {"case": shape.label, "M": M, "K": K, "N": N, "dtype": DTYPE_NAMES[dtype], "activation": act,
                "phase": "fwd", "variants": "+".join(applicable(shape, dtype, "cpu", *stand_ins))}
        yield Case(meta, dtype, functools.partial(forward_builders, shape, dtype, act, plan),
                   flops=layer_flops(M, K, N, "fwd"), nbytes=layer_bytes(M, K, N, "fwd", dtype.itemsize, act))


def with_copy_fraction(rows, weight_bytes):
    """The copy row's GB/s is 2 × the weight's bytes per call (read + write; no FLOP); every timed row
    of the case gets pct_copy = its GB/s as % of the copy's. Rows without a copy row are unchanged."""
    copy = next((r for r in rows if r["impl"] == "copy" and r.get("ms")), None)
    if copy is None:
        return rows
    copy.update(gbps=2.0 * weight_bytes / copy["ms"] / 1e6, tflops=None, bound=None, pct_peak=None)
    for r in rows:
        if r.get("gbps") and r["status"] == "ok":
            r["pct_copy"] = 100.0 * r["gbps"] / copy["gbps"]
    return rows


def run(case, plan, peaks):
    """``runner.run_timed``; then, on a performance run, every row of a decode case as % of the copy's
    bandwidth."""
    rows = run_timed(case, plan, peaks)
    if plan.is_performance_run:
        with_copy_fraction(rows, case.meta["N"] * case.meta["K"] * case.dtype.itemsize)
    return rows


def plot(rows, results, out_dir):
    """Performance runs: forward-<dtype>.png, ms per activation and implementation, one panel per shape."""
    from .. import plots

    return plots.per_shape_bar_charts(rows, results, out_dir, "forward", "no_grad forward per variant", "ms per forward")


def _pct_copy(row):
    return "" if row.get("pct_copy") is None else f"{row['pct_copy']:.0f}%"


SUITE = Suite(
    name="forward", title="forward — fusedad's forward variants, F.linear and eager Linear+act",
    help="the no_grad forward of one linear layer + activation: every applicable forward kernel variant of "
         "fusedad's variant table (variants.use), F.linear, eager F.linear + activation, and at decode a device "
         "copy of the weight (bandwidth as % of it); M=8192 (4096->4096, 4096->14336, 14336->4096), M=256 "
         "(4096->8192), decode M=1 and 16 (8192->8192), gelu_tanh and none, bf16",
    preset=preset, cases=cases, run=run, plot=plot,
    columns=lambda perf: [("shape", "case"), ("dtype", "dtype"), ("act", "activation"), ("kernels", "kernels"),
                          *report.timed_columns(perf), *([("% copy", _pct_copy)] if perf else []), report.NOTE],
    fields={"variant": "the kernel variant run (variants.use)",
            "default_variant": "whether select() picks that variant by default",
            "kernels": "the launches of one forward call, in order (recorded)",
            "variants": "the forward variants whose predicate holds for the case (the ones run)",
            "pct_copy": "decode: GB/s as % of the device copy of the weight timed in the same rounds"})

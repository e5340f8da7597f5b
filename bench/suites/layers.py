"""The ``layers`` suite: one Linear(+activation) per shape × dtype × activation × phase (``SUITE.help``).

FLOP and byte models, for x (M, K), W (N, K), b (N), y (M, N). One GEMM is 2·M·N·K FLOP:

    fwd              z = x·Wᵀ + b                          1 GEMM
    bwd              dX = dZ·W, dW = dZᵀ·X                 2 GEMMs
    fwd+bwd                                                3 GEMMs
    fwd+bwd-frozenW  no dW                                 2 GEMMs
    jvp              y = act(x·Wᵀ + b), ẏ = act'(z)⊙(ẋ·Wᵀ)  2 GEMMs

Bytes are the minimum traffic (every operand read once, every result written once), so GB/s is a
lower bound on what the kernel moved; it is the figure of merit where a case is memory-bound
(arithmetic intensity below the device's measured ridge point, peak FLOP/s ÷ copy bytes/s).
"""
import functools
import itertools

import numpy as np
import torch

from .. import report
from ..impls import ACTIVATIONS, PHASES, layer_builders
from ..plan import DTYPE_NAMES, IMPL_LABELS, Shape
from ..runner import Case
from . import Suite

# The seed's Net3 layers at M=256, LLM-style MLP GEMMs at M=8192, and decode (M=1, 16) on an 8192×8192
# weight: memory-bound, the weight read is the whole cost (eager: ~3.0 TB/s effective on an H200).
CUDA_SHAPES = (
    Shape(256, 4096, 8192, "net3-l0"), Shape(256, 8192, 8192, "net3-l1"), Shape(256, 8192, 1, "net3-l3"),
    Shape(8192, 4096, 4096, "llm-qkv"), Shape(8192, 4096, 14336, "llm-up"), Shape(8192, 14336, 4096, "llm-down"),
    Shape(1, 8192, 8192, "decode"), Shape(16, 8192, 8192, "decode"),
)
CPU_SHAPES = (
    Shape(8, 32, 64, "net3-l0 tiny"), Shape(8, 64, 1, "net3-l3 tiny"), Shape(64, 64, 128, "llm-up tiny"),
    Shape(64, 128, 64, "llm-down tiny"), Shape(1, 64, 64, "decode tiny"), Shape(16, 64, 64, "decode tiny"),
)

#: Meaning of the row fields of a layer case (the memory suite's layer cases have them too).
FIELDS = {"M, K, N": "x (M, K) · Wᵀ (K, N)", "activation": " | ".join(ACTIVATIONS),
          "phase": "; ".join(f"{k}: {v}" for k, v in PHASES.items())}


def preset(device, quick):
    """CUDA: one Net3 layer, bf16, gelu_tanh (quick) or every shape, dtype and none/gelu_tanh/relu;
    CPU: tiny shapes (one quick), fp32 + bf16 (+ fp16 full), none/gelu_tanh (+ relu full)."""
    bf16, fp16, fp32, cuda = torch.bfloat16, torch.float16, torch.float32, device == "cuda"
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    dtypes = ((bf16,) if quick else (bf16, fp16, fp32)) if cuda else ((fp32, bf16) if quick else (fp32, bf16, fp16))
    acts = (("gelu_tanh",) if cuda else ("none", "gelu_tanh")) if quick else ("none", "gelu_tanh", "relu")
    # graph_max_m: cases with M <= this also time a CUDA-graph replay (--graph-max-m; 0: none).
    return {"shapes": shapes[:1] if quick else shapes, "dtypes": dtypes, "activations": acts, "phases": tuple(PHASES),
            "graph_max_m": 0}


def layer_flops(M, K, N, phase):
    return 2.0 * M * N * K * {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "fwd+bwd-frozenW": 2, "jvp": 2}[phase]


def layer_bytes(M, K, N, phase, elem, activation):
    """Minimum bytes moved; ``elem`` = bytes per element. Backward reads y (relu) or z (smooth) for act'."""
    x, w, y, b = M * K, N * K, M * N, N
    saved = y if activation != "none" else 0
    fwd = x + w + b + y
    dx_part = y + saved + w + x          # read dY, saved, W; write dX
    dw_part = x + w + b                  # read X (dY counted above); write dW, db
    counts = {
        "fwd": fwd,
        "bwd": dx_part + dw_part,
        "fwd+bwd": fwd + saved + dx_part + dw_part,   # the training forward also writes `saved`
        "fwd+bwd-frozenW": fwd + saved + dx_part + b,
        "jvp": fwd + x + y,                           # + read ẋ, write ẏ
    }
    return float(elem * counts[phase])


def layer_case(shape, dtype, activation, phase, plan, **kw):
    """A Case for one Linear(+activation) of ``shape`` in one phase (``kw``: Case's flops, nbytes)."""
    meta = {"case": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "dtype": DTYPE_NAMES[dtype],
            "activation": activation, "phase": phase}
    return Case(meta, dtype, functools.partial(layer_builders, shape, dtype, activation, phase, plan), **kw)


def cases(settings, plan):
    for shape, dtype, act, phase in itertools.product(settings["shapes"], settings["dtypes"],
                                                      settings["activations"], settings["phases"]):
        M, K, N = shape.M, shape.K, shape.N
        yield layer_case(shape, dtype, act, phase, plan, flops=layer_flops(M, K, N, phase),
                         nbytes=layer_bytes(M, K, N, phase, dtype.itemsize, act),
                         graph=M <= settings.get("graph_max_m", 0))


def plot(rows, results, out_dir):
    """Performance runs: per dtype, speedup-<dtype>.png (× eager per case, one panel per phase) and
    roofline-<dtype>.png (TFLOP/s vs arithmetic intensity under the measured roofline, right axis in %
    of the measured GEMM peak)."""
    from .. import plots

    env, written = results["env"], []
    if not env["performance_figures"]:
        return written
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype and r["impl"] != "eager"]
        panels = [(p, [r for r in sub if r["phase"] == p]) for p in PHASES if any(r["phase"] == p for r in sub)]
        if panels:
            name = f"speedup-{dtype}.png"
            plots.bar_chart(out_dir / name, env, f"speedup vs eager (eager ms / ms), {dtype}; above 1 is faster",
                            panels, lambda r: f"{r['case']} · {r['activation']}", lambda r: r.get("speedup"),
                            "× eager", fmt="{:.2f}×", stacked=True, hline=1.0)
            written.append(name)
        if plot_roofline(plots, [r for r in rows if r["dtype"] == dtype], env, results.get("peaks"), dtype,
                         out_dir / f"roofline-{dtype}.png"):
            written.append(f"roofline-{dtype}.png")
    return written


def plot_roofline(plots, rows, env, peaks, dtype, path):
    rows = [r for r in rows if r.get("tflops") and r.get("gbps")]
    peak = (peaks or {}).get("gemm_tflops", {}).get(dtype)
    if not rows or not peak:
        return False
    bw = peaks["copy_gbps"]
    fig, ax = plots.plt.subplots(figsize=(8, 5))
    ai = lambda r: r["tflops"] * 1e3 / r["gbps"]  # FLOP/byte = tflops·1e12 / (gbps·1e9)  # noqa: E731
    xs = np.logspace(np.log10(min(ai(r) for r in rows) / 2), np.log10(max(ai(r) for r in rows) * 2), 200)
    ax.plot(xs, np.minimum(peak, bw * xs / 1e3), color="black", lw=1,
            label=f"measured roof: {peak:.0f} TFLOP/s, {bw:.0f} GB/s")
    markers = {"eager": "o", "fusedad": "*", "compile": "s", "cublaslt": "^", "planted-mismatch": "x"}
    for impl in plots.impls_in(rows):
        sub = [r for r in rows if r["impl"] == impl]
        ax.scatter([ai(r) for r in sub], [r["tflops"] for r in sub], marker=markers.get(impl, "o"),
                   color=plots.COLORS.get(impl), label=IMPL_LABELS.get(impl, impl), s=40, alpha=0.8)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity, FLOP / minimum byte", ylabel="TFLOP/s")
    sec = ax.secondary_yaxis("right", functions=(lambda t: 100 * t / peak, lambda p: p * peak / 100))
    sec.set_ylabel(f"% of measured {dtype} GEMM peak")
    ax.legend(fontsize=8)
    ax.set_title(plots.title(env, f"layers, {dtype}: TFLOP/s and % of peak, all phases"), fontsize=9)
    plots.save(fig, path)
    return True


SUITE = Suite(
    name="layers", title="layers — one linear layer (+ activation)",
    help="one linear layer over shapes (the seed's Net3 layers at M=256; LLM MLP GEMMs at M=8192; decode M=1, "
         f"16), dtypes, activations and phases ({', '.join(PHASES)})",
    preset=preset, cases=cases, plot=plot, fields=FIELDS,
    columns=lambda perf: [("shape", "case"), ("dtype", "dtype"), ("act", "activation"), ("phase", "phase"),
                          *report.timed_columns(perf)])

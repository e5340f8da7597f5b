"""The ``lm-head`` suite: the loss of a language model's head, cross_entropy(x·Wᵀ, t), per implementation.

x (M, K) hidden states, W (V, K) the head's weight, t (M,) targets. Implementations:

    eager          F.cross_entropy(F.linear(x, W), t): materialises the logits
    torch-chunked  F.linear_cross_entropy(..., options=LinearCrossEntropyOptions()) (PyTorch ≥ 2.13 only)
    compile        torch.compile of the eager loss
    fusedad        fusedad.linear_cross_entropy: logits tile by tile in registers, O(M) extra memory

Phases: "fwd" (the loss under no_grad) and "fwd+bwd" (loss, dX and dW). Model FLOPs: 2·M·V·K per GEMM, one
forward, three for fwd+bwd (fusedad recomputes the logits once in its backward: it executes four, see
kernels/cross_entropy.py). Memory columns: ``torch.cuda.max_memory_allocated`` during one call (CUDA only),
and the formula for what each keeps beyond its inputs (e = element size; C = the backward's class chunk,
``kernels.cross_entropy.chunk_classes``):

    eager fwd+bwd ≈ 4 · M·V·e bytes (logits, log-softmax, and the two gradients of those) + dX, dW
    fusedad       ≈ 3 · M · 4 bytes of statistics (per class split of the forward: a few, kilobytes; the
                    formula counts one), + in the backward the dZ chunk M·C·e and dX's fp32 accumulator
                    M·K·4, + the gradients dX (M·K·e), dW (V·K·e)

At M=8192, K=4096, V=128256, bf16: M·V·e = 2.10 GB, so eager's formula is ≈ 8.4 GB (+ 1.1 GB of gradients)
against fusedad's 134 MB (dZ chunk, C = 8192) + 134 MB (fp32 dX) (+ the same gradients).
"""
import functools

import torch
import torch.nn.functional as F

from .. import report
from ..plan import DTYPE_NAMES, Shape
from ..runner import Case, run_case, throughput, time_interleaved, vs_eager
from . import Suite
from .memory import peak_memory_mb

#: (M, K, V): the Llama-3 head at 8192 tokens; a tiny one for the CPU interpreter.
CUDA_SHAPES = (Shape(8192, 4096, 128256, "llama3 head"),)
CPU_SHAPES = (Shape(16, 16, 64, "head tiny"),)
PHASES = {"fwd": "the loss under no_grad", "fwd+bwd": "loss, then dX and dW"}
HAS_CHUNKED = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def preset(device, quick):
    cuda = device == "cuda"
    return {"shapes": CUDA_SHAPES if cuda else CPU_SHAPES,
            "dtypes": (torch.bfloat16,) if cuda else (torch.float32,),
            "phases": ("fwd+bwd",) if quick else tuple(PHASES)}


def formula_mb(M, K, V, elem, impl, phase):
    """Predicted memory beyond inputs (MiB): what the implementation keeps that scales with M×V."""
    grads = 0 if phase == "fwd" else (M * K + V * K) * elem
    if impl == "fusedad":
        from fusedad.kernels.cross_entropy import chunk_classes

        scratch = 0 if phase == "fwd" else M * chunk_classes(M, V, elem, 128) * elem + M * K * 4
        return (3 * M * 4 + scratch + grads) / 2**20
    if impl == "torch-chunked":
        return None  # depends on its chunk policy
    return ((1 if phase == "fwd" else 4) * M * V * elem + grads) / 2**20


def lm_builders(shape, dtype, phase, plan):
    """{impl: build}: build() -> fn, fn() -> (loss,) or (loss, dX, dW)."""
    import fusedad

    M, K, V = shape.M, shape.K, shape.N
    x = torch.randn(M, K, device=plan.device, dtype=dtype)
    w = (torch.randn(V, K, device=plan.device) * K ** -0.5).to(dtype)
    t = torch.randint(0, V, (M,), device=plan.device)

    def runner(loss_fn):
        def fn():
            if phase == "fwd":
                with torch.no_grad():
                    return (loss_fn(x, w, t),)
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
            loss = loss_fn(xg, wg, t)
            return (loss.detach(), *torch.autograd.grad(loss, (xg, wg)))
        return fn

    def eager(x, w, t):
        return F.cross_entropy(F.linear(x, w), t)

    every = {"eager": lambda: runner(eager),
             "fusedad": lambda: runner(fusedad.linear_cross_entropy),
             "compile": lambda: runner(torch.compile(eager))}
    out = {name: build for name, build in every.items() if name == "eager" or name in plan.impls}
    if HAS_CHUNKED:
        chunked = functools.partial(F.linear_cross_entropy, options=torch.nn.LinearCrossEntropyOptions())
        out["torch-chunked"] = lambda: runner(chunked)
    if plan.plant_mismatch:
        out["planted-mismatch"] = lambda: runner(lambda x, w, t: 1.5 * eager(x, w, t))
    return out


def cases(settings, plan):
    for shape in settings["shapes"]:
        for dtype in settings["dtypes"]:
            for phase in settings["phases"]:
                meta = {"case": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "dtype": DTYPE_NAMES[dtype],
                        "phase": phase}
                yield Case(meta, dtype, functools.partial(lm_builders, shape, dtype, phase, plan),
                           flops=2.0 * shape.M * shape.N * shape.K * (1 if phase == "fwd" else 3))


def run(case, plan, peaks):
    """Check, time interleaved, then one call of each under ``peak_memory_mb``; × eager for both."""
    elem = torch.tensor([], dtype=case.dtype).element_size()

    def measure(fns):
        out = time_interleaved(fns, plan.device, plan.rounds, plan.rep_ms)
        for name, m in out.items():
            if isinstance(m, dict):
                if plan.is_performance_run:
                    m.update(throughput(case.flops, None, m["ms"], peaks, case.meta["dtype"]))
                m.update(peak_memory_mb(fns[name], plan.device))
                m["formula_mb"] = formula_mb(case.meta["M"], case.meta["K"], case.meta["N"], elem, name,
                                             case.meta["phase"])
        return out

    rows = run_case(case, plan, measure)
    if plan.is_performance_run:
        vs_eager(rows, "ms", "speedup", invert=True)
        vs_eager(rows, "step_mb", "mem_vs_eager")
    return rows


SUITE = Suite(
    name="lm-head", title="lm-head — fused linear + cross-entropy (the LM head's loss)",
    help="cross_entropy(x·Wᵀ, t) of an LM head (V=128256 on CUDA): time and peak memory of eager, torch's "
         "chunked linear_cross_entropy (torch ≥ 2.13), torch.compile and fusedad",
    preset=preset, cases=cases, run=run,
    columns=lambda perf: [
        ("case", "case"), ("dtype", "dtype"), ("phase", "phase"), *report.timed_columns(perf),
        ("peak MiB", lambda r: report.num("peak_mb", ".0f")(r) if r.get("peak_mb") is not None else r.get("note", "")),
        ("step MiB", report.num("step_mb", ".0f")), ("formula MiB", report.num("formula_mb", ".4g")),
        *((("mem × eager", report.num("mem_vs_eager", ".2f")),) if perf else ())],
    fields={"phase": "; ".join(f"{k}: {v}" for k, v in PHASES.items()),
            "formula_mb": "predicted memory that scales with the logits, MiB (see bench/suites/lm_head.py)",
            "peak_mb": "torch.cuda.max_memory_allocated during one call, MiB",
            "step_mb": "peak minus memory allocated before the call, MiB", "mem_vs_eager": "step_mb / eager step_mb"})

"""The ``memory`` suite: peak CUDA memory of a training step per implementation (``SUITE.help``).

Memory does not depend on torch.compile's grad-mode or shape guards the way time does, but a compiled
step does save different tensors, so every implementation is measured. On CPU the implementations are
checked and the memory columns read "n/a on CPU".
"""
import functools

import torch

from .. import report
from ..impls import net3_builders, net3_preset
from ..plan import DTYPE_NAMES, Shape
from ..runner import Case, run_case, vs_eager
from . import Suite
from .layers import FIELDS as LAYER_FIELDS
from .layers import layer_case

#: Training steps measured besides Net3's: (shape, activation, phase); none in a quick run.
CUDA_LAYERS = ((Shape(8192, 4096, 14336, "llm-up"), "gelu_tanh", "fwd+bwd"),
               (Shape(8192, 4096, 14336, "llm-up"), "gelu_tanh", "fwd+bwd-frozenW"))
CPU_LAYERS = ((Shape(64, 64, 128, "llm-up tiny"), "gelu_tanh", "fwd+bwd"),)


def preset(device, quick):
    return {**net3_preset(device, quick), "layers": () if quick else CUDA_LAYERS if device == "cuda" else CPU_LAYERS}


def cases(settings, plan):
    net3 = settings["net3"]
    for dtype in settings["dtypes"]:
        yield Case({"case": net3.label + " training step", "dtype": DTYPE_NAMES[dtype], "activation": "relu",
                    "phase": "fwd+bwd"}, dtype, functools.partial(net3_builders, net3, dtype, "fwd+bwd", plan))
        for shape, act, phase in settings["layers"]:
            yield layer_case(shape, dtype, act, phase, plan)


def peak_memory_mb(fn, device):
    """peak_mb: ``torch.cuda.max_memory_allocated`` during one call of fn, in MiB; step_mb: that minus
    what was allocated before the call. fn has run once before (the check), so first-call allocations
    (autotuning, cuBLAS workspaces) are not counted. CUDA only."""
    if device != "cuda":
        return {"peak_mb": None, "step_mb": None, "note": "n/a on CPU"}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20}


def run(case, plan, peaks):
    """Check, then one step of each passing implementation under ``peak_memory_mb``; step × eager."""
    def measure(fns):
        out = {}
        for name, fn in fns.items():
            try:
                out[name] = peak_memory_mb(fn, plan.device)
            except Exception as exc:  # noqa: BLE001 - an ERROR row
                out[name] = exc
        return out

    return vs_eager(run_case(case, plan, measure), "step_mb", "mem_vs_eager")


def plot(rows, results, out_dir):
    """memory.png (CUDA runs): MiB a training step allocates at its peak, per implementation."""
    from .. import plots

    if not results["env"]["performance_figures"] or not any(r.get("step_mb") for r in rows):
        return []
    label = lambda r: f"{r['case']} {r['dtype']} {r.get('activation', '')} {r.get('phase', '')}"  # noqa: E731
    plots.bar_chart(out_dir / "memory.png", results["env"], "peak memory of one training step", [("", rows)], label,
                    lambda r: r.get("step_mb"), "MiB: peak allocated during the step\nminus allocated before it "
                    "(weights, inputs)", fmt="{:.0f}", figsize=(max(6, 2.2 * len(set(map(label, rows)))), 4.5))
    return ["memory.png"]


SUITE = Suite(
    name="memory", title="memory — peak CUDA memory of a training step",
    help="peak CUDA memory of a training step (the seed's Net3; on full CUDA runs also an LLM MLP layer with "
         "and without a weight gradient) per implementation (n/a on CPU)",
    preset=preset, cases=cases, run=run, plot=plot,
    columns=lambda perf: [
        ("case", "case"), ("dtype", "dtype"), ("act", "activation"), ("phase", "phase"), report.IMPL, report.STATUS,
        report.REL_ERR, ("peak MiB", lambda r: report.num("peak_mb", ".0f")(r) if r.get("peak_mb") is not None
                         else r.get("note", "")),
        ("step MiB", report.num("step_mb", ".0f")), ("step × eager", report.num("mem_vs_eager", ".2f"))],
    fields={**LAYER_FIELDS, "peak_mb": "torch.cuda.max_memory_allocated during one step, MiB",
            "step_mb": "peak minus memory allocated before the step, MiB", "mem_vs_eager": "step_mb / eager step_mb"})

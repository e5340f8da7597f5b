"""The ``modes`` suite: the seed's Net3 in each grad mode, and a training step (``SUITE.help``)."""
import functools
import itertools

from .. import report
from ..impls import MODES, net3_builders, net3_preset
from ..plan import DTYPE_NAMES
from ..runner import Case
from . import Suite


def net3_flops(net3, mode):
    """FLOPs of Net3 at its batch: forward GEMMs (2·M·K·N each), plus dW for every layer and dX for all
    but the first (the input needs no gradient) in a training step."""
    gemms = [2.0 * net3.batch * K * N for K, N in net3.layers]
    return sum(gemms) + (sum(gemms) + sum(gemms[1:]) if mode == "fwd+bwd" else 0)


def cases(settings, plan):
    net3 = settings["net3"]
    for dtype, mode in itertools.product(settings["dtypes"], MODES):
        yield Case({"case": net3.label, "dtype": DTYPE_NAMES[dtype], "mode": mode}, dtype,
                   functools.partial(net3_builders, net3, dtype, mode, plan), flops=net3_flops(net3, mode))


def plot(rows, results, out_dir):
    """modes.png: ms per grad mode and implementation, one panel per dtype (CPU runs too, labelled)."""
    from .. import plots

    env = results["env"]
    by_dtype = {}
    for r in rows:
        by_dtype.setdefault(r["dtype"], []).append(r)
    plots.bar_chart(out_dir / "modes.png", env, "Net3: forward per grad mode, and a training step",
                    [(f"{sub[0]['case']}, {dtype}", sub) for dtype, sub in by_dtype.items()], lambda r: r["mode"],
                    lambda r: r.get("ms"), "ms per call" + ("" if env["performance_figures"] else "*"))
    return ["modes.png"]


SUITE = Suite(
    name="modes", title="modes — the seed's Net3 in each grad mode",
    help="the seed's Net3 (batch 256, 4096->8192->8192->8192->1, ReLU, no bias; a tiny one on CPU) forward in "
         "default, no_grad and inference_mode, and a forward+backward step",
    preset=net3_preset, cases=cases, plot=plot,
    columns=lambda perf: [("dtype", "dtype"), ("mode", "mode"),
                          *report.timed_columns(perf, (report.SPREAD, report.TFLOPS, report.SPEEDUP))],
    fields={"mode": " | ".join(MODES) + " (modes suite)"})

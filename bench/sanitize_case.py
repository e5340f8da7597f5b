"""A small fusedad forward + backward + jvp for ``compute-sanitizer --tool memcheck`` (bench/gpu_run.sh).

    python bench/sanitize_case.py                           # CUDA if available, else the CPU interpreter
    python bench/sanitize_case.py --bwd-variant others      # every non-default backward variant of the table
    python bench/sanitize_case.py --bwd-variant default others --smoke --device cpu   # the dry run's smoke run

Shapes are deliberately not multiples of any tile size (M=67, K=101, N=83) so every kernel's masked
edge tiles run: an out-of-bounds load or store there is what memcheck is for. Autotuning is off (one
config per kernel) to keep the run short under the sanitizer, which slows every launch ~10–100×.
The backward runs under ``variants.use(name)`` for each ``--bwd-variant`` (``default``: the table's
default backward; ``others``: every non-default backward row; or a variant name); the launches are
recorded and printed, and a variant that did not run is a failure. ``--smoke``: bf16 gelu_tanh only.
Exits 1 if any result differs from eager beyond the dtype tolerance of bench/checks.py.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--bwd-variant", nargs="+", default=["default"], metavar="NAME",
                   help="default | others | a backward variant name (several allowed)")
    p.add_argument("--smoke", action="store_true", help="bf16 with gelu_tanh only")
    return p.parse_args(argv)


ARGS = parse_args(None if __name__ == "__main__" else [])  # imported: the defaults

import torch  # noqa: E402

DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if ARGS.device == "auto" else ARGS.device
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fusedad is imported
os.environ.setdefault("FUSEDAD_AUTOTUNE", "0")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedad  # noqa: E402
from bench.checks import max_rel_err, tolerance  # noqa: E402
from fusedad.kernels import record_launches, variants  # noqa: E402

M, K, N = 67, 101, 83


def eager(x, w, b, act):
    z = F.linear(x, w, b)
    return {"relu": F.relu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](z)


def one_case(device, dtype, act, variant):
    """fwd, then dX/dW/db under ``variants.use(variant)``, then (y, ẏ) by torch.func.jvp; returns the max
    rel. error vs eager and the kernels the backward launched."""
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    xt = torch.randn(M, K, device=device, dtype=dtype)
    outs, refs, ran = [], [], []
    for fn, sink in ((fusedad.functional.linear, outs), (eager, refs)):
        y = fn(x, w, b, act)
        with variants.use(variant), record_launches() as log:
            sink += [y.detach(), *torch.autograd.grad(y, (x, w, b), dy)]
        if fn is not eager:
            ran = [launch.kernel for launch in log]
        with torch.no_grad():
            sink += list(torch.func.jvp(lambda a: fn(a, w.detach(), b.detach(), act), (x.detach(),), (xt,)))
    if device == "cuda":
        torch.cuda.synchronize()
    return max_rel_err(outs, refs), ran


def variant_names(choices):
    rows = [v for v in variants.VARIANTS if v.direction == "bwd"]
    names = []
    for c in choices:
        if c == "default":
            names += [v.name for v in rows if v.default][:1]
        elif c == "others":
            names += [v.name for v in rows if not v.default]
        else:
            names.append(variants.by_name(c).name)  # KeyError for an unknown name
    return list(dict.fromkeys(names))


def main():
    names = variant_names(ARGS.bwd_variant)
    print(f"sanitize_case: device {DEVICE}, fusedad backend {fusedad.backend(torch.device(DEVICE))}, "
          f"M={M} K={K} N={N}, backward variant(s) {' '.join(names)}", flush=True)
    cases = ((torch.bfloat16, "gelu_tanh"),) if ARGS.smoke else tuple(
        (dtype, act) for dtype in (torch.float32, torch.bfloat16) for act in ("relu", "gelu_tanh"))
    ok = True
    for variant in names:
        print(f"-- backward variant {variant}", flush=True)
        for dtype, act in cases:
            err, ran = one_case(DEVICE, dtype, act, variant)
            good = err <= tolerance(dtype) and variant in ran
            ok &= good
            print(f"  {str(dtype):15s} {act:10s} fwd+bwd+jvp rel.err {err:.2e}  bwd kernels {'+'.join(ran)}  "
                  f"{'ok' if good else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

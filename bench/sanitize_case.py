"""A small fusedad forward + backward + jvp for ``compute-sanitizer --tool memcheck`` (bench/gpu_check.sh).

    python bench/sanitize_case.py            # CUDA if available, else the CPU interpreter (a smoke run)

Shapes are deliberately not multiples of any tile size (M=67, K=101, N=83) so every kernel's masked
edge tiles run: an out-of-bounds load or store there is what memcheck is for. Autotuning is off (one
config per kernel) to keep the run short under the sanitizer, which slows every launch ~10–100×.
Exits 1 if any result differs from eager beyond the dtype tolerance of bench/checks.py.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fusedad is imported
os.environ.setdefault("FUSEDAD_AUTOTUNE", "0")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedad  # noqa: E402
from bench.checks import max_rel_err, tolerance  # noqa: E402

M, K, N = 67, 101, 83


def eager(x, w, b, act):
    z = F.linear(x, w, b)
    return {"relu": F.relu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act](z)


def one_case(device, dtype, act):
    """fwd, then dX/dW/db, then (y, ẏ) by torch.func.jvp; returns the max rel. error vs eager."""
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    b = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    xt = torch.randn(M, K, device=device, dtype=dtype)
    outs, refs = [], []
    for fn, sink in ((fusedad.functional.linear, outs), (eager, refs)):
        y = fn(x, w, b, act)
        sink += [y.detach(), *torch.autograd.grad(y, (x, w, b), dy)]
        with torch.no_grad():
            sink += list(torch.func.jvp(lambda a: fn(a, w.detach(), b.detach(), act), (x.detach(),), (xt,)))
    if device == "cuda":
        torch.cuda.synchronize()
    return max_rel_err(outs, refs)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"sanitize_case: device {device}, fusedad backend {fusedad.backend(torch.device(device))}, "
          f"M={M} K={K} N={N}")
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for act in ("relu", "gelu_tanh"):
            err = one_case(device, dtype, act)
            good = err <= tolerance(dtype)
            ok &= good
            print(f"  {str(dtype):15s} {act:10s} fwd+bwd+jvp rel.err {err:.2e}  {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

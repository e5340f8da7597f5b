"""Per-call overhead of fusedad's eager path against nn.Linear, on a tiny layer (the math is negligible).

    python -m bench.overhead            # CUDA: our Triton kernels vs cuBLAS; CPU: fusedad's eager backend
                                        # (TRITON_INTERPRET unset) vs nn.Linear — the Python/autograd cost

The two are interleaved (A B A B …) over many repetitions and the median per call is reported, for the
forward under no_grad, the forward with autograd recording, and forward+backward. What it isolates on
CPU: argument checks, dispatch, the autograd Function and its saved tensors — everything fusedad adds
around the arithmetic. Custom ops are never on this path (they are only used under torch.compile).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedad


def _per_call_us(fn, device, calls):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def measure(device, in_features=64, out_features=64, batch=8, rounds=30, calls=200):
    """{phase: (nn.Linear µs, fusedad µs)} medians over interleaved rounds; a GELU layer."""
    ref = torch.nn.Linear(in_features, out_features, device=device)
    ours = fusedad.nn.Linear(in_features, out_features, device=device, activation="gelu")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, in_features, device=device)
    xg = x.clone().requires_grad_()

    def eager_fwd():
        with torch.no_grad():
            F.gelu(ref(x))

    def fused_fwd():
        with torch.no_grad():
            ours(x)

    phases = {
        "forward (no_grad)": (eager_fwd, fused_fwd),
        "forward (recording)": (lambda: F.gelu(ref(xg)), lambda: ours(xg)),
        "forward+backward": (lambda: F.gelu(ref(xg)).sum().backward(), lambda: ours(xg).sum().backward()),
    }
    out = {}
    for name, (a, b) in phases.items():
        a(), b()  # warm-up (and, on CUDA, compile)
        ta, tb = [], []
        for _ in range(rounds):
            ta.append(_per_call_us(a, device, calls))
            tb.append(_per_call_us(b, device, calls))
        out[name] = (statistics.median(ta), statistics.median(tb))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(1)
    print(f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), fusedad backend "
          f"{fusedad.backend(torch.empty(0, device=device))}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; Linear(64, 64) + GELU, batch 8, median µs per call")
    print(f"{'phase':22s} {'nn.Linear':>10s} {'fusedad':>10s} {'added':>8s}")
    for name, (a, b) in measure(device).items():
        print(f"{name:22s} {a:10.1f} {b:10.1f} {b - a:+8.1f}")


if __name__ == "__main__":
    main()

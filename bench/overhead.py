"""Per-call overhead of fusedad's eager path against nn.Linear, on a tiny layer (the math is negligible).

    python -m bench.overhead            # CUDA: our Triton kernels vs cuBLAS; CPU: fusedad's eager backend
                                        # (TRITON_INTERPRET unset) vs nn.Linear — the Python/autograd cost
    python -m bench.overhead --device cpu --launcher
                                        # CPU: the launcher's own cost — the CUDA path of kernels/linear.py
                                        # (variant and config lookup in a tuned cache, int64 decision,
                                        # flags, allocation, launch log) with every Triton launch a no-op
    python -m bench.overhead --device cpu --launcher --shape 1 1 1
                                        # the same on a 1×1 layer: nn.Linear+GELU does next to no arithmetic
                                        # either, so the ratio is host time against host time (at the
                                        # default shape nn.Linear's CPU arithmetic, which the stub skips,
                                        # counts on its side)

The two are interleaved (A B A B …) over many repetitions and the median per call is reported, for the
forward under no_grad, the forward with autograd recording, and forward+backward. What it isolates on
CPU: argument checks, dispatch, the autograd Function and its saved tensors — everything fusedad adds
around the arithmetic. Custom ops are never on this path (they are only used under torch.compile).
"""
import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import fusedad


#: wall: elapsed time (what a user waits for); thread: this thread's CPU time, which other processes'
#: load disturbs far less (CPU only: a GPU's time is not this thread's) — for comparing two versions of
#: fusedad on a shared machine.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _per_call_us(fn, device, calls, clock=time.perf_counter):
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return 1e6 * (clock() - start) / calls


class _FloorFunction(torch.autograd.Function):
    """The least any Python ``torch.autograd.Function`` around Linear+GELU costs: F.linear and F.gelu in
    its forward, z saved, PyTorch's gelu_backward, two mm and a sum in its backward — no checks, no
    routing. The gap between it and nn.Linear+GELU is the price of a Python Function itself."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        z = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, z)
        return F.gelu(z)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, z = ctx.saved_tensors
        dz = torch.ops.aten.gelu_backward(grad_y, z)
        return dz.mm(weight), dz.t().mm(x), dz.sum(0)


#: ``Function.apply``'s C implementation, without its Python preamble (what fusedad's eager path calls
#: when no torch.func transform is active): the cheapest way into a Python Function.
_FLOOR_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _FloorFunction)


class _FloorLinear(torch.nn.Linear):
    def forward(self, input):
        if torch.is_grad_enabled():
            return _FLOOR_APPLY(input, self.weight, self.bias)
        return F.gelu(F.linear(input, self.weight, self.bias))


def measure(device, in_features=64, out_features=64, batch=8, rounds=30, calls=200, clock=time.perf_counter):
    """{phase: (nn.Linear µs, fusedad µs, Function floor µs)} medians over interleaved rounds; a GELU layer."""
    ref = torch.nn.Linear(in_features, out_features, device=device)
    floor = _FloorLinear(in_features, out_features, device=device)
    floor.load_state_dict(ref.state_dict())
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

    def floor_fwd():
        with torch.no_grad():
            floor(x)

    phases = {
        "forward (no_grad)": (eager_fwd, fused_fwd, floor_fwd),
        "forward (recording)": (lambda: F.gelu(ref(xg)), lambda: ours(xg), lambda: floor(xg)),
        "forward+backward": (lambda: F.gelu(ref(xg)).sum().backward(), lambda: ours(xg).sum().backward(),
                             lambda: floor(xg).sum().backward()),
    }
    out = {}
    for name, fns in phases.items():
        for fn in fns:
            fn()  # warm-up (and, on CUDA, compile)
        times = [[] for _ in fns]
        for _ in range(rounds):
            for fn, t in zip(fns, times):
                t.append(_per_call_us(fn, device, calls, clock))
        out[name] = tuple(statistics.median(t) for t in times)
    return out


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launcher(cache_dir):
    """fusedad's CUDA launch path on CPU tensors, every Triton launch a no-op: the kernels backend for CPU
    tensors, the launcher's CUDA branch (autotuning on: the first call of a key "tunes" with a timer that
    keeps the heuristic's pick, later calls are cache hits, as in a tuned process), a fixed device name.
    What remains is the host work the launcher adds around a launch."""
    import importlib

    backend = importlib.import_module("fusedad.backend")  # (fusedad.backend is also a function)
    from fusedad.kernels import configs, variants
    from fusedad.kernels import linear as launcher

    saved = dict(interp=launcher.INTERPRETER, name=launcher._device_name, bench=launcher._do_bench,
                 rows=variants.VARIANTS, sms=variants.num_sms, cpu=backend._CPU,
                 env=os.environ.get("FUSEDAD_CACHE_DIR"))
    os.environ["FUSEDAD_CACHE_DIR"] = cache_dir
    configs.clear_cache()
    launcher.clear_plans()  # (plans hold rows of the table swapped below)
    launcher.INTERPRETER = False
    launcher._device_name = lambda index: "stub"
    launcher._do_bench = lambda fn: 1.0  # every pair ties: the heuristic's (first) pair is kept
    variants.num_sms = lambda problem: 132  # an H100 SXM's / H200's count (the split-K decode plan reads it)
    variants.VARIANTS = tuple(dataclasses.replace(v, kernel=_NoLaunch()) if v.kernel is not None else v
                              for v in saved["rows"])
    backend._CPU = backend._BACKENDS[backend.TRITON]
    try:
        yield
    finally:
        launcher.INTERPRETER, launcher._device_name, launcher._do_bench = saved["interp"], saved["name"], saved["bench"]
        variants.VARIANTS, variants.num_sms, backend._CPU = saved["rows"], saved["sms"], saved["cpu"]
        configs.clear_cache()
        launcher.clear_plans()
        if saved["env"] is None:
            os.environ.pop("FUSEDAD_CACHE_DIR", None)
        else:
            os.environ["FUSEDAD_CACHE_DIR"] = saved["env"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    p.add_argument("--calls", type=int, default=200, help="calls per round and implementation (default 200)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON (bench/gpu_run.sh reads it)")
    p.add_argument("--launcher", action="store_true",
                   help="CPU only: fusedad through the launcher's CUDA path with every Triton launch a no-op "
                        "(the launcher's own host cost) instead of the eager backend")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall time (default) or this thread's CPU time (CPU only; steadier on a shared machine)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 8), metavar=("IN", "OUT", "BATCH"),
                   help="the layer's in_features, out_features and the batch (default 64 64 8). On CPU with "
                        "--launcher, 1 1 1 leaves nn.Linear+GELU almost no arithmetic: host time against host time")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.clock == "thread" and device == "cuda":
        p.error("--clock thread measures CPU time only: use it with --device cpu")
    if args.launcher and device != "cpu":
        p.error("--launcher stubs the launch on CPU tensors: use it with --device cpu")
    torch.set_num_threads(1)
    backend = fusedad.backend(torch.empty(0, device=device))
    if args.launcher:
        backend = "launcher (CUDA path, Triton launches stubbed out)"
    in_features, out_features, batch = args.shape
    head = (f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), fusedad backend "
            f"{backend}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; Linear({in_features}, "
            f"{out_features}) + GELU, batch {batch}, median µs per call ({args.clock} clock) over {args.rounds} "
            f"rounds of {args.calls} calls")
    print(head)
    print(f"{'phase':22s} {'nn.Linear':>10s} {'fusedad':>10s} {'added':>8s} {'ratio':>6s} {'Function floor':>15s}")
    with contextlib.ExitStack() as stack:
        if args.launcher:
            stack.enter_context(stubbed_launcher(stack.enter_context(tempfile.TemporaryDirectory())))
        result = measure(device, in_features, out_features, batch, rounds=args.rounds, calls=args.calls,
                         clock=CLOCKS[args.clock])
    for name, (a, b, c) in result.items():
        print(f"{name:22s} {a:10.1f} {b:10.1f} {b - a:+8.1f} {b / a:6.2f} {c:15.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"what": head, "device": device, "fusedad_backend": backend,
                       "phases": {k: {"nn_linear_us": a, "fusedad_us": b, "added_us": b - a, "ratio": b / a,
                                      "function_floor_us": c}
                                  for k, (a, b, c) in result.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

"""Shared test setup: run the real kernels through Triton's interpreter when there is no GPU, poison
every kernel output with NaN, and the tolerance rule of GUIDE §7.

On a CUDA machine the interpreter stays off: "cuda" tests run the compiled kernels and "cpu" tests run
the eager path (``fusedad.backend`` tells which ran; tests that need the kernels say so).
"""
import os
import signal
import subprocess
import sys
import textwrap
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of fusedad.kernels
os.environ.setdefault("FUSEDAD_POISON_OUTPUTS", "1")  # an element a kernel forgot to write reads NaN
# CUDA: test the heuristic configs, not a timing search per shape (each candidate is a compile; the
# autotuner's policy has its own tests in test_configs.py, and the benchmark runs it for real).
os.environ.setdefault("FUSEDAD_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedad  # noqa: E402
from bench import checks  # noqa: E402
from fusedad import activations  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ACTS = [None, "relu", "gelu", "gelu_tanh", "silu"]

# The floor of the rule "our error vs fp64 ≤ 2 × eager's error vs fp64 + floor" (GUIDE §7): ~4 units of
# rounding for fp16 (2⁻¹¹) and ~2.5 for bf16 (2⁻⁸). The floor matters for tiny outputs (a 1-element db
# after cancelling sums), where which of two correct roundings is closer is luck: with fp16 5e-4 the
# fuzz found db = Σ dZ over 102 rows at 3.3e-3 against eager's lucky 8e-4, while in 20 fresh draws of
# that case ours was never worse than eager (1e-4…1.6e-3 vs 1e-4…2.4e-2). Measured 2026-11-26 on the
# CPU interpreter (torch 2.13, triton 3.9): FUSEDAD_HYPOTHESIS_EXAMPLES=600 pytest tests/test_hardening.py.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def runs_kernels(device):
    """True where fusedad runs the Triton kernels (compiled or interpreted) for this device."""
    return fusedad.backend(torch.device(device)) != "eager"


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    """Fresh random data (never zeros), rounded to ``dtype``."""
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (bench/checks.py's); NaN/Inf in ``out`` fail loudly (NaN never passes)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out.detach()).all(), "non-finite values (a kernel left a poisoned element or overflowed)"
    return checks.rel_err(out, ref)


def assert_matches(out, ref64, eager, what="", nan_as_reference=False):
    """GUIDE §7: err(out) ≤ 2·err(eager) + floor(dtype), both measured against the fp64 reference.

    nan_as_reference: the inputs held NaNs on purpose: ours and eager must have NaN exactly where the
    fp64 reference has, and the rule applies to the other elements.
    """
    if nan_as_reference:
        nan = ref64.isnan()
        assert torch.equal(out.isnan(), nan), f"{what}: NaN positions differ from the fp64 reference"
        assert torch.equal(eager.isnan(), nan), f"{what}: eager's NaN positions differ (bad reference)"
        out, ref64, eager = out[~nan], ref64[~nan], eager[~nan]
    err, eager_err = rel_err(out, ref64), rel_err(eager, ref64)
    bound = 2 * eager_err + FLOOR[out.dtype]
    assert err <= bound, f"{what}: rel. error {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e}, {out.dtype})"


def reference_linear(x, w, b, activation):
    """act(x·wᵀ + b) with PyTorch ops, in the tensors' own dtype (autograd-capable)."""
    return activations.apply(F.linear(x, w, b), activation)


def check_against_references(x, w, b, activation, dy=None, fused=fusedad.linear, context="",
                             nan_as_reference=False):
    """Forward (and, with dy, every gradient that is required) of ``fused`` vs fp64 and eager references.

    x, w, b: tensors in the test dtype (their requires_grad chooses the gradients checked).
    context: appended to failure messages (e.g. the fuzz case).
    nan_as_reference: inputs hold NaNs on purpose (see ``assert_matches``).
    """
    leaves = [t for t in (x, w, b) if t is not None]
    y = fused(x, w, b, activation)
    as64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ase = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    x64, w64, b64 = as64 + [None] * (3 - len(as64))
    xe, we, be = ase + [None] * (3 - len(ase))
    y64 = reference_linear(x64, w64, b64, activation)
    ye = reference_linear(xe, we, be, activation)
    assert y.dtype == x.dtype and y.shape == ye.shape
    assert_matches(y, y64, ye, f"forward ({activation}) {context}", nan_as_reference)
    wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
    if dy is None or not wanted:
        return y
    grads = torch.autograd.grad(y, [leaves[i] for i in wanted], dy)
    grads64 = torch.autograd.grad(y64, [as64[i] for i in wanted], dy.double())
    grads_e = torch.autograd.grad(ye, [ase[i] for i in wanted], dy)
    for i, g, g64, ge in zip(wanted, grads, grads64, grads_e):
        assert g.dtype == leaves[i].dtype
        assert_matches(g, g64, ge, f"grad of {['input', 'weight', 'bias'][i]} ({activation}) {context}",
                       nan_as_reference)
    return y


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Different, but reproducible, random data per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_isolated(module, function, *args, timeout=300):
    """Run ``module.function(*args)`` (a test module in this folder) in a fresh Python process.

    For cases that could crash the interpreter rather than fail (int64 index math over >2³¹-element
    ranges: a wrapped offset reads or writes outside the buffer): a regression then fails this one
    test, with the child's signal and output, instead of killing the whole pytest session.
    """
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{TESTS_DIR!r}, {os.path.dirname(TESTS_DIR)!r}]
        import conftest  # the same environment as the suite (interpreter when there is no GPU)
        import {module}
        {module}.{function}(*{args!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        raise AssertionError(f"{module}.{function} failed in its subprocess ({how}):\n"
                             f"{(proc.stdout + proc.stderr)[-4000:]}")

"""Shared test setup: run the real kernels through Triton's interpreter when there is no GPU, poison
every kernel output with NaN; the reference checks and tolerance rule come from ``fusedad.testing``.

On a CUDA machine the interpreter stays off: "cuda" tests run the compiled kernels and "cpu" tests run
the eager path (``fusedad.backend`` tells which ran; tests that need the kernels say so).
"""
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of fusedad.kernels
os.environ.setdefault("FUSEDAD_POISON_OUTPUTS", "1")  # an element a kernel forgot to write reads NaN
# CUDA: test the heuristic configs, not a timing search per shape (each candidate is a compile; the
# autotuner's policy has its own tests in test_configs.py, and the benchmark runs it for real).
os.environ.setdefault("FUSEDAD_AUTOTUNE", "0")
# Whatever a test tunes goes to a throw-away on-disk cache, never the user's ~/.cache/fusedad.
if "FUSEDAD_CACHE_DIR" not in os.environ:
    os.environ["FUSEDAD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedad-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FUSEDAD_CACHE_DIR"], True)
# And a fresh torch.compile cache: Inductor's on-disk caches key a graph by its ops, not by the Python
# bodies of fusedad's custom ops, so a graph compiled before an edit to those bodies would be reused and
# the edited code never traced (a planted bug in backend.select_for_op went unseen so).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedad-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis: the same examples every run, and no example database (a saved failure replayed in a later run
# makes that run fail for an old reason, or look as if it caught a new bug). Random exploration is an
# explicit local run: FUSEDAD_HYPOTHESIS_PROFILE=explore (its failures are kept in .hypothesis/, ignored by git).
settings.register_profile("derandomized", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("FUSEDAD_HYPOTHESIS_PROFILE", "derandomized"))

import fusedad  # noqa: E402
from fusedad.testing import FLOOR, assert_matches, check_against_references, reference_linear, rel_err  # noqa: E402,F401

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ACTS = [None, *fusedad.ACTIVATIONS]  # every row of the activation table


def runs_kernels(device):
    """True where fusedad runs the Triton kernels (compiled or interpreted) for this device."""
    return fusedad.backend(torch.device(device)) != "eager"


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """The launcher as on CUDA (autotuning on), on CPU tensors: a fake device name, and a fake timer whose
    times come from ``speeds`` (variant name -> ms; a callable of (name, flags) may be set instead). The
    timed runs are skipped (nothing runs on a fake GPU); the launch that follows runs for real (the torch
    rows on CPU, the pointer kernels through the interpreter)."""
    if not runs_kernels("cpu"):
        pytest.skip("the launcher runs only with the kernels (TRITON_INTERPRET=1 or a GPU); here fusedad is eager")
    from fusedad.kernels import configs
    from fusedad.kernels import linear as launcher

    monkeypatch.setenv("FUSEDAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FUSEDAD_AUTOTUNE", "1")
    monkeypatch.setattr(launcher, "INTERPRETER", False)
    monkeypatch.setattr(launcher, "_device_name", lambda index: "FakeGPU")
    configs.clear_cache()
    state = type("Tuner", (), {})()
    state.timed = []  # (variant name, flags) per timed run
    state.speed = lambda name, flags: 1.0
    current = {}

    real_pick = launcher._pick

    def pick(direction, problem, device, traced, run, variant=None):
        current["flags"] = problem.flags
        return real_pick(direction, problem, device, traced, lambda v, c: None, variant)

    def bench(fn):
        name, _cfg = fn()
        state.timed.append((name, dict(current["flags"])))
        return state.speed(name, current["flags"])

    monkeypatch.setattr(launcher, "_pick", pick)
    monkeypatch.setattr(launcher, "_do_bench", bench)
    yield state
    configs.clear_cache()


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False, scale=1.0):
    """Fresh random data (never zeros), rounded to ``dtype``."""
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Different, but reproducible, random data per test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Every test chooses its launches afresh: a forward's plan (``kernels/linear.py``) assumes the variant
    table, the device and the interpreter mode fixed for the process, which tests patch."""
    from fusedad.kernels import linear as launcher

    launcher.clear_plans()
    yield
    launcher.clear_plans()


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


def kernel_kinds(log):
    """The kernels of recorded launches, every forward variant named "linear_fwd" (and a split-K decode
    forward's second, reducing launch left out): for tests about what runs, not which variant runs it
    (the variant choice depends on the shape and alignment; tests/test_forward_v2.py checks it)."""
    return [("linear_fwd" if l.kernel.startswith("linear_fwd") and not l.kernel.startswith("linear_fwd_tangent")
             else l.kernel) for l in log if l.kernel != "linear_fwd_splitk_reduce"]

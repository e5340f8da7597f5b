"""The machine a run is on: environment record, results-folder name, measured peaks."""
import datetime
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import triton

from .plan import CPU_TIMING_NOTE, DTYPE_NAMES

#: Peak GEMM size: 8192³ is large enough that cuBLAS runs at its best (785 TFLOP/s bf16 on an H200,
#: torch 2.11); the copy moves 1 GiB each way, far beyond L2, so it measures HBM bandwidth.
PEAK_GEMM_N = 8192
PEAK_COPY_BYTES = 2**30


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def nvidia_driver():
    """Driver version from nvidia-smi, or None where there is no nvidia-smi."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return names[0].strip() if names else platform.processor() or platform.machine()


def device_slug(device, fusedad_backend):
    """Folder-name part: the card ("NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"),
    or "cpu-<backend>"."""
    if device != "cuda":
        return "cpu-" + fusedad_backend.replace("triton-", "")
    name = re.sub(r"^nvidia\s+", "", torch.cuda.get_device_name().lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _git(*args):
    return _run(["git", "-C", str(Path(__file__).resolve().parent.parent), *args])


def environment(plan, argv, fusedad_backend):
    """Everything needed to reproduce or judge a run (stored in results.json and results.md)."""
    import fusedad

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", "bench", *argv]),
        "device": plan.device,
        "device_name": device_name(plan.device),
        "driver": nvidia_driver(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fusedad": fusedad.__version__,
        "fusedad_backend": fusedad_backend,
        "interpreter": fusedad_backend == "triton-interpreter",
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "run_label": plan.label,
        "performance_figures": plan.is_performance_run,
        "timing_note": None if plan.is_performance_run else CPU_TIMING_NOTE,
    }


def measure_peaks(device, dtypes):
    """Measured at start on CUDA (None on CPU):

    gemm_tflops[dtype]: torch.matmul of two 8192×8192 matrices, 2·8192³ FLOP / do_bench median
                        (fp32 follows torch's allow_tf32 setting, IEEE by default);
    copy_gbps:          dst.copy_(src) of 1 GiB, (read + write) bytes / do_bench median.
    """
    if device != "cuda":
        return None
    import triton.testing

    n = PEAK_GEMM_N
    gemm = {}
    for dtype in dtypes:
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        ms = triton.testing.do_bench(lambda: torch.matmul(a, b), warmup=25, rep=100, return_mode="median")
        gemm[DTYPE_NAMES[dtype]] = 2.0 * n**3 / ms / 1e9
        del a, b
    src = torch.empty(PEAK_COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return {"gemm_tflops": gemm, "copy_gbps": 2.0 * PEAK_COPY_BYTES / ms / 1e6,
            "gemm_shape": f"{n}x{n}x{n}", "copy_bytes": PEAK_COPY_BYTES}

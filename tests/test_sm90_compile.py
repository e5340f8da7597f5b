"""Every kernel variant lowers to an sm_90 cubin (Triton's real compiler + ptxas, no GPU needed), with
a pipelined main loop, wgmma where the tile allows it, and shared memory within an H100's limit."""
import json
import os
import subprocess
import sys

import pytest

from sm90_compile import rows

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py")], capture_output=True, text=True,
                          env=env, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["variant"]: r for r in rows}


@pytest.mark.parametrize("variant", [r[0] for r in rows()])
def test_variant_compiles_for_hopper(compiled, variant):
    row = compiled[variant]
    assert row["ok"], row["error"]
    assert row["cubin"], "ptxas produced no cubin"
    assert row["shared"] <= 227 * 1024, f"needs {row['shared']} B of shared memory; an H100 block has 227 KiB"
    if row["stack"] is not None and "fp64" not in variant:
        # A stack frame here means register spills to local memory (fp64 is for exactness, not speed).
        assert row["stack"] == 0, f"{row['regs']} registers and a {row['stack']}-byte stack: spills"
    if not row["gemm"]:
        return  # the elementwise dZ pass: no K loop to pipeline, no product
    # Software-pipelined main loop (async copies into a multi-stage shared-memory ring): without it a
    # Hopper GEMM stalls on every load.
    assert row["pipelined"], "the K loop is not software-pipelined"
    if "fp64" not in variant and row["block_m"] >= 64:
        # wgmma needs a 64-row warpgroup tile; narrower (decode) tiles and fp64 use mma.sync / FMA.
        assert row["wgmma"], "16/32-bit tiles of ≥ 64 rows should use Hopper's wgmma"

"""Every kernel variant lowers to an sm_90 cubin (Triton's real compiler + ptxas, no GPU needed), with
a pipelined main loop, wgmma where the tile allows it, and shared memory within an H100's limit; and
the static loop report: no default 16-bit variant's main loop (nor a TMA forward's, which the tuner
times beside them), at the heuristic tile of the compute-bound bucket (M > 128), issues more
instructions per iteration than its tensor-core time allows
(tests/sm90_compile.py explains the budget and why the bandwidth-bound buckets are reported, not gated).

One subprocess runs both (``sm90_compile.py --ci``): the report reuses the check's compiled kernels."""
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
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py"), "--ci"], capture_output=True,
                          text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    check = {r["variant"]: r for r in lines if "report" not in r}
    report = [r for r in lines if r.get("report") == "loop"]
    table = [line for line in proc.stdout.splitlines() if not line.startswith("{")]
    return check, report, table


@pytest.mark.parametrize("variant", [r[0] for r in rows()])
def test_variant_compiles_for_hopper(compiled, variant):
    row = compiled[0][variant]
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
    # The warp-specialised row (its WARP_SPECIALIZE flag comes from the variant table, not the call) splits
    # into partitions that trade registers (setmaxnreg) at wgmma tiles; no other row is warp-specialised.
    # (Triton does not specialise the 16-row mma.sync tile.)
    assert row["setmaxnreg"] == (variant.startswith("linear_fwd_tma_ws ") and row["block_m"] >= 64), row


def test_loop_report_default_variants_within_budget(compiled):
    _check, report, table = compiled
    assert table and table[-1] == (f"loop report: {len(report)} variants, "
                                   f"{sum(r['verdict'] in ('over', 'error') for r in report)} over budget"), table[-5:]
    assert all(r["verdict"] != "no cuobjdump" for r in report), "Triton ships no cuobjdump: no SASS to count"
    errors = [f"{r['variant']} {r['dtype']} {r['act']} {r['tile']}: {r['error']}" for r in report if r["error"]]
    assert not errors, errors
    for r in report:
        # Every GEMM variant has a tensor-core main loop (two in the backward: dX, dW; two in the
        # warp-specialised forward: its two consumer warpgroups); the elementwise passes (dZ, the split-K
        # reduction) none.
        # The MLP dual backward: the dX programs' two products (gate, up), then one loop for dW_g and dW_u.
        expected = {"linear_dz": 0, "linear_fwd_splitk_reduce": 0, "linear_bwd": 2, "linear_bwd_prologue": 2,
                    "linear_fwd_tma_ws": 2 if "cta" in r else 1, "mlp_gated_dual_bwd": 3}
        assert len(r["loops"]) == expected.get(r["variant"], 1), r
        # (the gated up projection: the gate and the up product share the X tile: two per iteration)
        per_loop = {"linear_fwd_tangent": 3, "mlp_gated_up": 2, "linear_fwd_tma_ws": 1 / len(r["loops"]) if r["loops"] else 1}
        for lp in r["loops"]:
            # The MMA work counted from the SASS is the tile's product (three of them in forward mode; split
            # between the consumers of the warp-specialised kernel).
            assert lp["steps"] == per_loop.get(r["variant"], 1), (r["variant"], lp)
        if "cta" in r:  # warp-specialised: one load loop (the producer) beside the MMA loops
            assert len(r["producer_loops"]) == 1 and r["producer_loops"][0]["opcodes"].get("UTMALDG"), r
    # The warp-specialised forward is attributed at its compute-bound tile (partitions, producer, CTA line).
    assert any("cta" in r and r["gated"] for r in report if r["variant"] == "linear_fwd_tma_ws")
    assert {r["variant"] for r in report if r["gated"]} >= {"linear_fwd", "linear_bwd", "linear_fwd_tma",
                                                            "linear_fwd_tma_persistent", "linear_fwd_tma_ws",
                                                            "mlp_gated_up", "mlp_down_bwd", "mlp_gated_dual_bwd"}
    def why(r):
        parts = [f"{lp['instructions']} instructions > budget {lp['budget']}" for lp in r["loops"]
                 if lp["verdict"] == "over"]
        if r.get("cta", {}).get("verdict") == "over":
            parts.append(f"CTA issue {r['cta']['issue_clocks']} > MMA {r['cta']['tensor_clocks']} clocks")
        return ", ".join(parts)

    over = [f"{r['variant']} {r['dtype']} act={r['act']} {r['tile']} w{r['warps']}: {why(r)}"
            for r in report if r["gated"] and r["verdict"] == "over"]
    assert not over, ("main loop issue-bound (instructions per thread per iteration over the tensor-core budget) "
                      "in a default variant at its compute-bound heuristic tile:\n" + "\n".join(over))

"""Compile the kernels for sm_90 (H100/H200) ahead of time, on any machine — no GPU needed.

The interpreter accepts code the GPU compiler rejects (e.g. branches that assign one name with two
types), so CI also lowers every kernel variant through Triton's real pipeline down to a cubin with
ptxas. Run as a script (the interpreter must be off while the kernels are defined); prints one JSON
line per variant: {"variant", "ok", "block_m", "shared", "regs", "stack", "wgmma", "pipelined", "cubin",
"error"} (regs/stack from cuobjdump -res-usage, None where Triton ships no cuobjdump).
"""
import json
import os
import sys
from collections import namedtuple

# Importable by the test for the variant list without defining (or interpreting) any kernel.
Tile = namedtuple("Tile", "BLOCK_M BLOCK_N BLOCK_K GROUP_M num_warps num_stages")

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}

FWD = dict(HAS_BIAS=True, STORE_Z=True, HAS_XT=False, HAS_WT=False, HAS_BT=False, STORE_ZT=False)
BWD = dict(COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True, ACCUMULATE_DW=False)
TANGENTS = dict(HAS_XT=True, HAS_WT=True, HAS_BT=True, STORE_ZT=True)

# (name, kernel, dtype, activation, flag overrides, tile config)
# The heuristic picks of kernels/configs.py (test_configs.py keeps these in sync) come first.
HEURISTIC_TILES = {"M<=16": Tile(16, 64, 128, 1, 8, 4), "M<=128": Tile(64, 64, 64, 8, 4, 4),
                   "M>128": Tile(128, 128, 64, 8, 8, 3)}
VARIANTS = [
    *((f"{kind} bf16 gelu_tanh heuristic {bucket}", kind, "bf16", 3, {}, tile)
      for bucket, tile in HEURISTIC_TILES.items() if bucket != "M>128" for kind in ("fwd", "bwd")),
    ("fwd bf16 gelu_tanh", "fwd", "bf16", 3, {}, Tile(128, 128, 64, 8, 8, 3)),
    ("fwd bf16 relu tangents", "fwd", "bf16", 1, TANGENTS, Tile(128, 128, 64, 8, 8, 3)),
    ("fwd fp16 silu decode", "fwd", "fp16", 4, {"HAS_BIAS": False}, Tile(16, 64, 128, 1, 8, 4)),
    ("fwd fp32 tf32 gelu int64", "fwd", "fp32", 2, {"PRECISION": "tf32", "INT64": True},
     Tile(128, 128, 32, 8, 8, 3)),
    ("fwd fp64 none", "fwd", "fp64", 0, {"STORE_Z": False}, Tile(64, 64, 16, 8, 4, 2)),
    ("bwd bf16 gelu_tanh dx+dw+db", "bwd", "bf16", 3, {}, Tile(128, 128, 64, 8, 8, 3)),
    ("bwd bf16 relu dx+db (frozen W)", "bwd", "bf16", 1, {"COMPUTE_DW": False},
     Tile(128, 128, 64, 8, 8, 3)),
    ("bwd bf16 silu dw into fp32 main_grad", "bwd", "bf16", 4, {"COMPUTE_DX": False, "ACCUMULATE_DW": True,
                                                                      "dw_ptr": "*fp32"},
     Tile(128, 128, 64, 8, 8, 3)),
    ("bwd fp64 silu dw int64", "bwd", "fp64", 4, {"COMPUTE_DX": False, "INT64": True},
     Tile(64, 64, 16, 8, 4, 2)),
]


# What Triton's JIT specialises for a typical call (contiguous operands, sizes and strides that are
# multiples of 16, 16-byte aligned pointers): unit strides become constexpr 1, every other int and
# every pointer gets divisibility 16. Without this the lowering would describe a worst case that the
# JIT never compiles (e.g. 16-bit loads then cannot be vectorised, so they are not software-pipelined).
UNIT_STRIDES = {
    "fwd": {"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn", "stride_xtk", "stride_wtk",
            "stride_bt", "stride_ytn", "stride_ztn"},
    "bwd": {"stride_dyn", "stride_xk", "stride_wk", "stride_sn", "stride_dxk", "stride_dwk", "stride_db"},
}


def compile_variant(kind, dtype, act, overrides, cfg):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedad.kernels import gemm

    kernel = gemm._linear_fwd_kernel if kind == "fwd" else gemm._linear_bwd_kernel
    flags = dict(FWD if kind == "fwd" else BWD)
    flags.update(ACT=act, FP64=dtype == "fp64", EMULATE_BF16=False, PRECISION="ieee", INT64=False)
    flags.update({k: v for k, v in overrides.items() if not k.endswith("_ptr")})
    flags.update(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
    signature, attrs = {}, {}
    for i, (name, p) in enumerate(zip(kernel.arg_names, kernel.params)):
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name in UNIT_STRIDES[kind]:
            signature[name] = "constexpr"
            flags[name] = 1
        else:
            signature[name] = overrides.get(name, PTR[dtype]) if name.endswith("_ptr") else (
                "i64" if flags["INT64"] else "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=flags, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def resource_usage(cubin):
    """(registers, stack bytes) per thread from the cuobjdump bundled with Triton, or (None, None)."""
    import glob
    import subprocess
    import tempfile

    import triton

    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not tools:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tools[0], "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(part.split(":") for line in out.splitlines() if "REG:" in line for part in line.split())
    return (int(fields["REG"]), int(fields["STACK"])) if fields else (None, None)


def main(names):
    for name, kernel, dtype, act, overrides, cfg in VARIANTS:
        if names and name not in names:
            continue
        try:
            k = compile_variant(kernel, dtype, act, overrides, cfg)
            ptx = k.asm["ptx"]
            regs, stack = resource_usage(k.asm["cubin"])
            row = dict(variant=name, ok=True, block_m=cfg.BLOCK_M, shared=k.metadata.shared, regs=regs, stack=stack,
                       wgmma="wgmma.mma_async" in ptx,
                       pipelined="async_copy_global_to_local" in k.asm["ttgir"] or "async_tma" in k.asm["ttgir"],
                       cubin=len(k.asm.get("cubin", b"")) > 0, error=None)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with the message
            row = dict(variant=name, ok=False, block_m=cfg.BLOCK_M, shared=None, regs=None, stack=None, pipelined=False, wgmma=False, cubin=False, error=f"{type(e).__name__}: {e}")
        print(json.dumps(row), flush=True)


def sweep_candidates():
    """Every bf16 autotune candidate of kernels/configs.py, fwd and bwd with gelu_tanh (the costliest
    epilogue/prologue): one JSON line each with shared memory, registers and stack (spill) bytes."""
    import torch

    from fusedad.kernels import configs

    seen = set()
    for M in (1, 64, 4096):
        for c in configs.candidates(M, 4096, 4096, torch.bfloat16):
            tile = Tile(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K, c.GROUP_M, c.num_warps, c.num_stages)
            for kind in ("fwd", "bwd"):
                if (kind, tile) in seen:
                    continue
                seen.add((kind, tile))
                k = compile_variant(kind, "bf16", 3, {}, tile)
                regs, stack = resource_usage(k.asm["cubin"])
                print(json.dumps(dict(kind=kind, tile=list(tile), shared=k.metadata.shared, regs=regs, stack=stack)),
                      flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before fusedad.kernels defines the kernels
    if sys.argv[1:] == ["--sweep-candidates"]:
        sweep_candidates()
    else:
        main(sys.argv[1:])

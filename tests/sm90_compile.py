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

import torch

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# Every flag on (bias, Z, all tangents, all gradients), per direction of the variant table; rows override.
ALL_ON = {
    "fwd": dict(HAS_BIAS=True, STORE_Z=True),
    "fwd_tangent": dict(HAS_BIAS=True, STORE_Z=True, HAS_XT=True, HAS_WT=True, HAS_BT=True, STORE_ZT=True,
                        DACT_FROM_Y=False),
    "bwd": dict(COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True, ACCUMULATE_DW=False),
    "dz": dict(WRITE_DZ=True, COMPUTE_DB=True),
}
# Row counts of the three M buckets of kernels/configs.py (decode, small batch, large batch).
BUCKETS = {"decode": 1, "M<=128": 100, "M>128": 4096}

# Special cases: (row name, variant name, dtype, activation, flag overrides, M whose heuristic tile is lowered).
SPECIAL = [
    ("linear_fwd_tangent bf16 relu (act' from y)", "linear_fwd_tangent", "bf16", "relu", {"DACT_FROM_Y": True}, 4096),
    ("linear_fwd fp16 silu decode no bias", "linear_fwd", "fp16", "silu", {"HAS_BIAS": False}, 1),
    ("linear_fwd fp32 tf32 gelu int64", "linear_fwd", "fp32", "gelu", {"PRECISION": "tf32", "INT64": True}, 4096),
    ("linear_fwd fp64 none", "linear_fwd", "fp64", None, {"STORE_Z": False}, 4096),
    ("linear_bwd bf16 relu2 dx+dw+db", "linear_bwd", "bf16", "relu2", {}, 4096),
    ("linear_bwd bf16 relu dx+db (frozen W)", "linear_bwd", "bf16", "relu", {"COMPUTE_DW": False}, 4096),
    ("linear_bwd bf16 silu dw into fp32 main_grad", "linear_bwd", "bf16", "silu",
     {"COMPUTE_DX": False, "ACCUMULATE_DW": True, "dw_ptr": "*fp32"}, 4096),
    ("linear_bwd fp64 silu dw int64", "linear_bwd", "fp64", "silu", {"COMPUTE_DX": False, "INT64": True}, 4096),
]


def rows():
    """Every variant of the kernel-variant table at every bucket's heuristic tile (gelu_tanh: the
    costliest epilogue/prologue), then the special cases. Imports the kernels: call it with the
    interpreter off when compiling."""
    from fusedad.kernels import variants

    return [*((f"{v.name} bf16 gelu_tanh heuristic {bucket}", v.name, "bf16", "gelu_tanh", {}, M)
              for v in variants.VARIANTS for bucket, M in BUCKETS.items()), *SPECIAL]


def heuristic_tile(variant_name, M, dtype):
    """The tile the heuristic picks for M rows at a large N = K (the first entry of the variant's
    config space)."""
    from fusedad.kernels import variants

    variant = next(v for v in variants.VARIANTS if v.name == variant_name)
    return variant.config_space(M, 4096, 4096, DTYPES[dtype])[0]


def compile_variant(name, dtype, act, overrides, cfg):
    """Lower the variant-table kernel ``name`` for sm_90 as the JIT would specialise a contiguous,
    16-aligned call. act: an activation name; cfg: a TileConfig."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedad.activations import lookup
    from fusedad.kernels import variants

    variant = next(v for v in variants.VARIANTS if v.name == name)
    kernel = variant.kernel
    flags = dict(ALL_ON[variant.direction])
    flags.update(ACT=lookup(act).kernel_id, FP64=dtype == "fp64", EMULATE_BF16=False, PRECISION="ieee", INT64=False)
    flags = {k: v for k, v in flags.items() if k in kernel.arg_names}  # e.g. the dZ pass has no PRECISION
    flags.update({k: v for k, v in overrides.items() if not k.endswith("_ptr")})
    flags.update(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
    signature, attrs = {}, {}
    for i, (name, p) in enumerate(zip(kernel.arg_names, kernel.params)):
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name in variant.unit_strides:
            # What Triton's JIT specialises for a typical call (contiguous operands, sizes and strides that
            # are multiples of 16, 16-byte aligned pointers): unit strides become constexpr 1, every other
            # int and every pointer gets divisibility 16. Without this the lowering would describe a worst
            # case the JIT never compiles (16-bit loads then cannot be vectorised, so not pipelined).
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
    for name, variant, dtype, act, overrides, M in rows():
        if names and name not in names:
            continue
        cfg = heuristic_tile(variant, M, dtype)
        try:
            k = compile_variant(variant, dtype, act, overrides, cfg)
            ptx = k.asm["ptx"]
            regs, stack = resource_usage(k.asm["cubin"])
            row = dict(variant=name, ok=True, block_m=cfg.BLOCK_M, k_loop=variant != "linear_dz", shared=k.metadata.shared, regs=regs, stack=stack,
                       wgmma="wgmma.mma_async" in ptx,
                       pipelined="async_copy_global_to_local" in k.asm["ttgir"] or "async_tma" in k.asm["ttgir"],
                       cubin=len(k.asm.get("cubin", b"")) > 0, error=None)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with the message
            row = dict(variant=name, ok=False, block_m=cfg.BLOCK_M, shared=None, regs=None, stack=None,
                       pipelined=False, wgmma=False, cubin=False, error=f"{type(e).__name__}: {e}")
        print(json.dumps(row), flush=True)


def sweep_candidates():
    """Every bf16 config of each variant's config space, for every variant of the variant table with
    gelu_tanh (the costliest epilogue/prologue): one JSON line each with shared memory, registers and
    stack (spill) bytes."""
    from fusedad.kernels import variants

    seen = set()
    for v in variants.VARIANTS:
        for M in BUCKETS.values():
            for c in v.config_space(M, 4096, 4096, torch.bfloat16):
                if (v.name, c) in seen:
                    continue
                seen.add((v.name, c))
                k = compile_variant(v.name, "bf16", "gelu_tanh", {}, c)
                regs, stack = resource_usage(k.asm["cubin"])
                print(json.dumps(dict(variant=v.name, tile=c.launch_kwargs(), shared=k.metadata.shared, regs=regs,
                                      stack=stack)), flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before fusedad.kernels defines the kernels
    if sys.argv[1:] == ["--sweep-candidates"]:
        sweep_candidates()
    else:
        main(sys.argv[1:])

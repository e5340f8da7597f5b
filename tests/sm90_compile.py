"""Compile the kernels for sm_90 (H100/H200) ahead of time, on any machine — no GPU needed.

The interpreter accepts code the GPU compiler rejects (e.g. branches that assign one name with two
types), so CI also lowers every kernel variant through Triton's real pipeline down to a cubin with
ptxas, specialised as the JIT and the launchers (``kernels/linear.py``) would specialise a contiguous,
16-aligned call. Run as a script (the interpreter must be off while the kernels are defined):

``python tests/sm90_compile.py [ROW ...]``
    the compile check: one JSON line per row of ``rows()`` — {"variant", "ok", "gemm", "block_m",
    "shared", "regs", "stack", "wgmma", "pipelined", "cubin", "error"} (regs/stack from cuobjdump
    -res-usage, None where Triton ships no cuobjdump; "gemm": False for the elementwise dZ pass, which
    has no K loop).
``python tests/sm90_compile.py --sweep-candidates``
    registers, stack and shared memory of every bf16 config of every variant's config space.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import torch

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

# Row counts of the three M buckets of kernels/configs.py (decode, small batch, large batch).
BUCKETS = {"decode": 1, "M<=128": 100, "M>128": 4096}

# Special cases: (row name, variant name, dtype, activation, flag overrides, M whose heuristic tile is lowered).
SPECIAL = [
    ("linear_fwd_tangent bf16 relu (act' from y)", "linear_fwd_tangent", "bf16", "relu", {}, 4096),
    ("linear_fwd fp16 silu decode no bias", "linear_fwd", "fp16", "silu", {"HAS_BIAS": False}, 1),
    ("linear_fwd fp32 tf32 gelu int64", "linear_fwd", "fp32", "gelu", {"PRECISION": "tf32", "INT64": True}, 4096),
    ("linear_fwd fp64 none", "linear_fwd", "fp64", None, {"STORE_Z": False}, 4096),
    ("linear_bwd_prologue bf16 relu2 dx+dw+db", "linear_bwd_prologue", "bf16", "relu2", {}, 4096),
    ("linear_bwd_prologue bf16 relu dx+db (frozen W)", "linear_bwd_prologue", "bf16", "relu", {"COMPUTE_DW": False},
     4096),
    ("linear_bwd bf16 dw into fp32 main_grad", "linear_bwd", "bf16", "silu",
     {"COMPUTE_DX": False, "ACCUMULATE_DW": True, "dw_ptr": "*fp32"}, 4096),
    ("linear_bwd fp64 dw int64", "linear_bwd", "fp64", "silu", {"COMPUTE_DX": False, "INT64": True}, 4096),
    ("linear_dz fp64 silu int64", "linear_dz", "fp64", "silu", {"INT64": True}, 4096),
]


def _variants():
    from fusedad.kernels import variants

    return variants.VARIANTS


def _variant(name):
    from fusedad.kernels import variants

    return variants.by_name(name)


def heuristic_tile(variant_name, M, dtype):
    """The tile the heuristic picks for M rows at a large N = K (the first entry of the variant's
    config space)."""
    return _variant(variant_name).config_space(M, 4096, 4096, DTYPES[dtype])[0]


def heuristic_tiles(variant_name, dtype="bf16"):
    """[(bucket names joined by ",", M of the first, tile)] — the buckets' heuristic tiles, equal
    tiles merged (the dZ pass has one tile for all)."""
    tiles = {}
    for bucket, M in BUCKETS.items():
        cfg = heuristic_tile(variant_name, M, dtype)
        tiles.setdefault(cfg, []).append((bucket, M))
    return [(",".join(b for b, _ in buckets), buckets[0][1], cfg) for cfg, buckets in tiles.items()]


def rows():
    """Every variant of the kernel-variant table at every bucket's heuristic tile (gelu_tanh: the
    costliest epilogue/prologue), then the special cases. Buckets that share a tile (the dZ pass has
    one) compile once. Imports the kernels: call it with the interpreter off when compiling."""
    return [*((f"{v.name} bf16 gelu_tanh heuristic {bucket}", v.name, "bf16", "gelu_tanh", {}, M)
              for v in _variants() for bucket, M in BUCKETS.items()), *SPECIAL]


def launch_flags(variant, dtype, act, overrides=None):
    """The constexpr flags ``kernels/linear.py`` passes to this variant's kernel for a call with every
    optional operand present (bias, Z, all tangents, all gradients), then ``overrides``. A ``dz_pass``
    backward runs its GEMMs after the dZ pass: no activation, no db."""
    from fusedad.activations import lookup

    a = lookup(act)
    flags = dict(ACT=a.kernel_id, FP64=dtype == "fp64", EMULATE_BF16=False, PRECISION="ieee", INT64=False)
    flags.update({
        "fwd": dict(HAS_BIAS=True, STORE_Z=True),
        "fwd_tangent": dict(HAS_BIAS=True, STORE_Z=True, HAS_XT=True, HAS_WT=True, HAS_BT=True, STORE_ZT=True,
                            DACT_FROM_Y=a.saves == "y"),
        "bwd": dict(COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True, ACCUMULATE_DW=False),
        "dz": dict(WRITE_DZ=a.saves is not None, COMPUTE_DB=True),
    }[variant.direction])
    flags.update({k: v for k, v in (overrides or {}).items() if not k.endswith("_ptr")})
    if variant.dz_pass:
        flags.update(ACT=lookup(None).kernel_id, COMPUTE_DB=False)
    return flags


_COMPILED = {}  # (kernel, signature, constexprs, options) -> compiled kernel: each specialisation compiles once


def compile_variant(name, dtype, act, overrides, cfg):
    """Lower the variant-table kernel ``name`` for sm_90 as the JIT would specialise a contiguous,
    16-aligned call of its launcher. act: an activation name; cfg: a TileConfig. Memoised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant = _variant(name)
    kernel = variant.kernel
    flags = launch_flags(variant, dtype, act, overrides)
    flags.update(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
    signature, attrs, constexprs = {}, {}, {}
    for i, (arg, p) in enumerate(zip(kernel.arg_names, kernel.params)):
        if p.is_constexpr:
            signature[arg] = "constexpr"
            constexprs[arg] = flags[arg]
        elif arg in variant.unit_strides:
            # What Triton's JIT specialises for a typical call (contiguous operands, sizes and strides that
            # are multiples of 16, 16-byte aligned pointers): unit strides become constexpr 1, every other
            # int and every pointer gets divisibility 16. Without this the lowering would describe a worst
            # case the JIT never compiles (16-bit loads then cannot be vectorised, so not pipelined).
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        else:
            signature[arg] = overrides.get(arg, PTR[dtype]) if arg.endswith("_ptr") else (
                "i64" if flags["INT64"] else "i32")
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    key = (kernel.fn.__qualname__, tuple(signature.items()), tuple(sorted(constexprs.items())),
           tuple(sorted(options.items())))
    if key not in _COMPILED:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        _COMPILED[key] = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return _COMPILED[key]


def _cuobjdump(cubin, *args):
    """cuobjdump (bundled with Triton) on a cubin: its stdout, or None where Triton ships none."""
    import triton

    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    if not tools:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tools[0], *args, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin):
    """(registers, stack bytes) per thread from the cuobjdump bundled with Triton, or (None, None)."""
    out = _cuobjdump(cubin, "-res-usage")
    if out is None:
        return None, None
    fields = dict(part.split(":") for line in out.splitlines() if "REG:" in line for part in line.split())
    return (int(fields["REG"]), int(fields["STACK"])) if fields else (None, None)


def check_row(name, variant, dtype, act, overrides, M):
    """One compile-check row (a dict, see the module docstring)."""
    cfg = heuristic_tile(variant, M, dtype)
    gemm = _variant(variant).direction != "dz"
    try:
        k = compile_variant(variant, dtype, act, overrides, cfg)
        ptx = k.asm["ptx"]
        regs, stack = resource_usage(k.asm["cubin"])
        return dict(variant=name, ok=True, gemm=gemm, block_m=cfg.BLOCK_M, shared=k.metadata.shared, regs=regs,
                    stack=stack, wgmma="wgmma.mma_async" in ptx,
                    pipelined="async_copy_global_to_local" in k.asm["ttgir"] or "async_tma" in k.asm["ttgir"],
                    cubin=len(k.asm.get("cubin", b"")) > 0, error=None)
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails with the message
        return dict(variant=name, ok=False, gemm=gemm, block_m=cfg.BLOCK_M, shared=None, regs=None, stack=None,
                    pipelined=False, wgmma=False, cubin=False, error=f"{type(e).__name__}: {e}")


def main(names):
    for name, variant, dtype, act, overrides, M in rows():
        if not names or name in names:
            print(json.dumps(check_row(name, variant, dtype, act, overrides, M)), flush=True)


def sweep_candidates():
    """Every bf16 config of each variant's config space, for every variant of the variant table with
    gelu_tanh (the costliest epilogue/prologue): one JSON line each with shared memory, registers and
    stack (spill) bytes."""
    seen = set()
    for v in _variants():
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

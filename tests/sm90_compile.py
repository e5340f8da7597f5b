"""Compile the kernels for sm_90 (H100/H200) ahead of time, on any machine — no GPU needed.

The interpreter accepts code the GPU compiler rejects (e.g. branches that assign one name with two
types), so CI also lowers every kernel variant through Triton's real pipeline down to a cubin with
ptxas, specialised as the JIT and the launchers (``kernels/linear.py``) would specialise a contiguous,
16-aligned call. Run as a script (the interpreter must be off while the kernels are defined):

``python tests/sm90_compile.py [ROW ...]``
    the compile check: one JSON line per row of ``rows()`` — {"variant", "ok", "gemm", "block_m",
    "shared", "regs", "stack", "wgmma", "pipelined", "setmaxnreg", "cubin", "error"} (regs/stack from cuobjdump
    -res-usage, None where Triton ships no cuobjdump; "gemm": False for the elementwise dZ pass, which
    has no K loop).
``python tests/sm90_compile.py --loop-report``
    the static cost of every variant's main loop (see "Loop report" below): a table, and last the line
    ``loop report: N variants, M over budget`` (N rows, M of them over budget or not compiling).
``python tests/sm90_compile.py --ci``
    both in one process, sharing the compiled kernels: the check's JSON lines, then the loop report's
    CI subset — every activation for the gated rows (below), gelu_tanh (the check's kernels) for the
    others — as one JSON line per row ({"report": "loop", ...}), then its table. What
    tests/test_sm90_compile.py runs.
``python tests/sm90_compile.py --sweep-candidates``
    registers, stack and shared memory of every bf16 config of every variant's config space.

Loop report
-----------
For every row of the kernel-variant table × activation (None and ``fusedad.ACTIVATIONS``) × heuristic
tile (the first config of the variant's space for M = 1, 100 and 4096, equal tiles merged) in bf16,
plus one fp16 row: the SASS of the cubin (``cuobjdump -sass``, shipped with Triton). A loop is the
address range from a backward branch's target up to that branch; the main loops are the innermost loops
that hold tensor-core instructions (HGMMA for wgmma tiles, HMMA for mma.sync tiles). The backward kernel
has two, numbered by address: its dX branch, then its dW branch (source order; in the prologue variant
only the second holds the db row sum's SHFL/FADD). The elementwise dZ pass has none: "no K loop", no
budget. Per loop: the instructions of its body counted by opcode (a static count, each instruction
once: what one thread — one warp — issues per iteration when no branch inside skips code; the JSON's
"inner_branches" counts such branches), the HGMMA/HMMA and MUFU counts, the budget and the verdict
("ok" ≤ budget < "over"). A backward variant
with ``dz_pass`` is lowered as it runs, with no activation and no db: its rows for every activation are
one kernel ("kernel_act" in the JSON).

Two kinds of SASS are not loops and are left out: the end-of-kernel trap (a branch to itself) and the
out-of-line retry of an mbarrier wait in the TMA kernels (``TRYWAIT P; @!P BRA stub`` in the loop; the
stub after EXIT spins and branches back to the instruction after the jump). Counted as a loop, such a
detour would span from inside the K loop to the end of the kernel and overlap it. The jump to it stays
in the K loop's body (``inner_branches``; not taken when the data has arrived).

Warp-specialised kernels (``linear_fwd_tma_ws``; Triton 3.9 at ≥ 64-row tiles): the TTGIR's
``ttg.warp_specialize`` regions say each partition's warps and whether it multiplies (a consumer) or only
loads (the producer). Triton splits the 128-row tile between two 4-warp consumer warpgroups, so there are
two MMA loops, each with half the tile's product ("steps" ½) and budgeted with its own warps; the
producer's load loop (UTMALDG, no MMA) is reported beside them. The CTA line adds them up: one CTA
iteration issues Σ instructions × warps / 4 clocks on the schedulers (every partition shares them)
against Σ FMA / 2048 clocks of MMA; the row is over if that sum is.

The budget — issue slots against tensor-core time, per iteration:
* an H100 SM's tensor cores do 2048 dense 16-bit FMA per clock: the dense bf16 peak of the H100 SXM,
  989.4 TFLOP/s at the 1830 MHz clock it is quoted for, over 132 SMs, is 989.4e12 / (132 · 1.83e9) =
  4096 FLOP = 2048 FMA per clock per SM (4 tensor cores × 512). (1024 per SM, 4 × 256, is A100's rate:
  312 TFLOP/s / (108 · 1.41e9) = 2048 FLOP per clock; using it for H100 would double every budget.)
* one CTA's iteration holds F FMA of MMA work, counted from the SASS: 64·N·16 per HGMMA.64xNx16 per
  warpgroup (W/4 warpgroups), 16·8·16 per HMMA.16816 per warp (W warps) — F = BLOCK_M·BLOCK_N·BLOCK_K
  per product (the forward-mode kernel has three: X·Wᵀ, Ẋ·Wᵀ, X·Ẇᵀ; "steps" in the JSON is F over one
  tile product, a check of the count). The tensor cores need F / 2048 clocks for it;
* its W warps share the SM's 4 schedulers, W/4 each, and a scheduler issues at most one instruction
  per clock: I instructions per thread cost I·W/4 clocks of issue. The loop is issue-bound when
  I·W/4 > F/2048, so the budget is I ≤ F / (512·W). For 128×128×64, 8 warps: 512 clocks, 256
  instructions — the "≈ 512 cycles, ~256 instructions" the project used before, now derived.
* occupancy: with C CTAs per SM (what registers and shared memory allow for the smaller tiles) both
  sides scale by C, so the budget holds for any C, provided the warps spread evenly over the
  schedulers (W is 4 or 8 here). It is a ceiling: "ok" says issue does not bind at tensor-core peak,
  not that the loop reaches it (latency, one warpgroup per CTA, memory). mma.sync tiles are held to the
  same peak (stricter than needed: HMMA does not reach wgmma's rate on H100).
* gated (CI fails when over): default 16-bit variants, and the descriptor (TMA) forwards that the
  tuner times beside them, at the heuristic tile of the M > 128 bucket.
  The decode and M ≤ 128 buckets serve bandwidth-bound shapes (an M-row linear does fewer than M FLOP
  per byte moved; an H100 needs 295 — 989 TFLOP/s over 3.35 TB/s — to be compute-bound), so an
  iteration there costs memory time, not tensor-core time: "over" on those rows means issue-bound *if*
  the shape were compute-bound. They are reported, not gated.
"""
import collections
import glob
import json
import os
import re
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

    return tuple(v for v in variants.VARIANTS if not v.is_torch)  # torch rows have no kernel to lower


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
    optional operand present (bias, Z, all tangents, all gradients) and the row's own ``Variant.flags``,
    then ``overrides``. A ``dz_pass``
    backward runs its GEMMs after the dZ pass: no activation, no db."""
    from fusedad.activations import lookup

    a = lookup(act)
    flags = dict(ACT=a.kernel_id, FP64=dtype == "fp64", EMULATE_BF16=False, PRECISION="ieee", INT64=False)
    flags.update({
        "fwd": dict(HAS_BIAS=True, STORE_Z=True),
        "fwd_tangent": dict(HAS_BIAS=True, STORE_Z=True, HAS_XT=True, HAS_WT=True, HAS_BT=True, STORE_ZT=True,
                            DACT_FROM_Y=a.saves == "y"),
        "bwd": dict(COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=True, ACCUMULATE_DX=False, ACCUMULATE_DW=False),
        "dz": dict(WRITE_DZ=a.saves is not None, COMPUTE_DB=True),
        "mlp_up": dict(HAS_BG=True, HAS_BU=True, STORE_PRE=True),
        "mlp_down_bwd": dict(GATED=True, COMPUTE_DPRE=True, STORE_H=True, BIAS_PRE=True, BIAS_DOWN=True),
        "mlp_dual_bwd": dict(COMPUTE_DX=True, COMPUTE_DWG=True, COMPUTE_DWU=True, ACCUMULATE_DW=False),
    }[variant.direction])
    flags.update(variant.flags)  # the row's own flags (WARP_SPECIALIZE)
    flags.update({k: v for k, v in (overrides or {}).items() if not k.endswith("_ptr")})
    if variant.dz_pass:
        flags.update(ACT=lookup(None).kernel_id, COMPUTE_DB=False)
    return flags


#: Pointers whose element type is not the operand dtype: the MLP down kernel's bias partial sums are fp32
#: (fp64 for fp64 operands), as ``kernels/mlp.py`` allocates them.
ACC_POINTERS = ("dbg_ptr", "dbu_ptr", "dbd_ptr")

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
            default_ptr = ("*fp64" if dtype == "fp64" else "*fp32") if arg in ACC_POINTERS else PTR[dtype]
            signature[arg] = overrides.get(arg, default_ptr) if arg.endswith("_ptr") else (
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
                    # warp specialisation with register reallocation between the partitions
                    setmaxnreg="setmaxnreg" in ptx, cubin=len(k.asm.get("cubin", b"")) > 0, error=None)
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails with the message
        return dict(variant=name, ok=False, gemm=gemm, block_m=cfg.BLOCK_M, shared=None, regs=None, stack=None,
                    pipelined=False, wgmma=False, setmaxnreg=False, cubin=False, error=f"{type(e).__name__}: {e}")


def main(names):
    for name, variant, dtype, act, overrides, M in rows():
        if not names or name in names:
            print(json.dumps(check_row(name, variant, dtype, act, overrides, M)), flush=True)


# ---------------------------------------------------------------------------------------------- loop report

#: dense 16-bit tensor-core FMA per clock per H100 SM (989.4 TFLOP/s / (132 SMs · 1.83 GHz) / 2)
FMA_PER_CLK_SM = 2048
SCHEDULERS_PER_SM = 4
REPORT_DTYPES = ("bf16",)
#: the fp16 row(s): (variant, activation, M)
FP16_ROWS = (("linear_fwd", "gelu_tanh", 4096),)

# "/*1e90*/   @P5 BRA 0x1640 ;" — address, optional predicate, opcode with modifiers, operands
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][\w.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_MMA = {"HGMMA", "HMMA", "DMMA"}


def parse_sass(text):
    """[(address, base opcode, full opcode, operands, predicate)] of the (single) kernel in cuobjdump -sass
    output; predicate is "" for an unconditional instruction, else e.g. "@!P2"."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            op = m.group(3)
            out.append((int(m.group(1), 16), op.split(".")[0], op, m.group(4).strip(), (m.group(2) or "").strip()))
    return out


def _mma_fma(op, warps):
    """FMA of one CTA issuing this tensor-core instruction (every warp of the CTA issues it once)."""
    base, _, mods = op.partition(".")
    shape = mods.split(".")[0]
    if base == "HGMMA":  # HGMMA.64x128x16.F32.BF16: one 64×N×16 product per warpgroup
        m, n, k = (int(x) for x in shape.split("x"))
        return m * n * k * (warps // 4)
    # HMMA.16816 = m16 n8 k16, HMMA.1688 = m16 n8 k8, DMMA.884 = m8 n8 k4: one product per warp
    dims = re.fullmatch(r"(16|8)(8)(\d+)", shape)
    if not dims:
        raise ValueError(f"unknown MMA shape in {op}")
    m, n, k = (int(x) for x in dims.groups())
    return m * n * k * warps


def _branches(instrs):
    """[(address, target, predicated)] of every branch with an address operand."""
    out = []
    for addr, base, _op, operands, pred in instrs:
        t = _BRANCH_TARGET.search(operands) if base == "BRA" else None
        if t:
            out.append((addr, int(t.group(1), 16), bool(pred)))
    return out


def _is_detour(instrs, branches, addr, target):
    """Whether the unconditional backward branch at ``addr`` to ``target`` closes an out-of-line detour
    rather than a loop. ptxas moves the retry of a failed mbarrier wait out of line, after the kernel's
    EXIT: ``TRYWAIT P, [bar]; @!P BRA stub`` in the loop, and at the stub ``TRYWAIT; @!P BRA stub; BRA
    <the instruction after the first BRA>``. Such a block cannot be reached by falling through (it follows an
    EXIT or an unconditional branch) and is entered only by branches from before ``target``: it runs
    when a wait fails and resumes where it left; taken as a loop it would span from inside the K loop to
    the end of the kernel (the TMA kernels' "overlapping loops" before this was recognised)."""
    addrs = [i[0] for i in instrs]
    n = addrs.index(addr) - 1
    while n >= 0 and not (instrs[n][1] in ("EXIT", "BRA") and not instrs[n][4]):
        n -= 1
    if n < 0 or addrs[n + 1] <= target:
        return False
    start = addrs[n + 1]
    entries = [a for a, t, _p in branches if start <= t <= addr and not start <= a <= addr]
    return bool(entries) and all(a < target for a in entries)


def _loops(instrs):
    """[(start, end)] of the loops: from a backward branch's target up to the last branch back to it
    (a branch to itself is the end-of-kernel trap; out-of-line detours are not loops)."""
    branches = _branches(instrs)
    ends = {}
    for addr, target, pred in branches:
        if target < addr and (pred or not _is_detour(instrs, branches, addr, target)):
            ends[target] = max(ends.get(target, 0), addr)
    return list(ends.items())


def _innermost(loops):
    return [lp for lp in loops
            if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)]


def _loop_fields(lp, warps):
    body = lp["body"]
    ops = collections.Counter(i[1] for i in body)
    return dict(start=hex(lp["start"]), end=hex(lp["end"]), instructions=len(body),
                # branches inside the body besides the loop's own: the forward jumps to the out-of-line
                # retry of an mbarrier wait (TMA kernels), taken only when a wait fails; otherwise none. The
                # static count is then what a warp issues per iteration.
                inner_branches=sum(i[1] == "BRA" for i in body[:-1]),
                opcodes=dict(ops.most_common()), mma=len(lp["mma"]), mma_op=sorted({i[2] for i in lp["mma"]}),
                mufu=ops.get("MUFU", 0), fma=sum(_mma_fma(i[2], warps) for i in lp["mma"]), warps=warps)


def main_loops(instrs, warps):
    """The innermost loops holding tensor-core instructions: [{start, end, instructions, inner_branches,
    opcodes, mma, mma_op, mufu, fma, warps}] by address. ``warps``: the warps that run each loop (the
    CTA's, or a warp-specialised kernel's consumer partition's)."""
    loops = []
    for start, end in _loops(instrs):
        body = [i for i in instrs if start <= i[0] <= end]
        mma = [i for i in body if i[1] in _MMA]
        if mma:
            loops.append(dict(start=start, end=end, body=body, mma=mma))
    return [_loop_fields(lp, warps) for lp in sorted(_innermost(loops), key=lambda lp: lp["start"])]


def producer_loops(instrs, warps):
    """A warp-specialised kernel's load loops: the innermost loops that issue TMA loads (UTMALDG) and
    hold no tensor-core instruction — the producer partition's K loop. Same fields as ``main_loops``."""
    loops = []
    for start, end in _loops(instrs):
        body = [i for i in instrs if start <= i[0] <= end]
        loops.append(dict(start=start, end=end, body=body, mma=[i for i in body if i[1] in _MMA]))
    inner = [lp for lp in _innermost(loops) if not lp["mma"] and any(i[1] == "UTMALDG" for i in lp["body"])]
    return [_loop_fields(lp, warps) for lp in sorted(inner, key=lambda lp: lp["start"])]


def partitions(ttgir, num_warps):
    """None for a kernel without warp specialisation; else {"consumer": warps of each partition that
    holds the products, "producer": warps of each that only loads} from the TTGIR's
    ``ttg.warp_specialize`` regions (the default region has the kernel's num_warps, a partitionN region
    its own ``num_warps(N)``)."""
    if "ttg.warp_specialize" not in ttgir:
        return None
    body = ttgir.split("ttg.warp_specialize", 1)[1]
    regions = re.split(r"\n\s*(?=default \{|partition\d+\()", body)[1:]
    out = {"consumer": [], "producer": []}
    for region in regions:
        m = re.search(r"\)\s*num_warps\((\d+)\)", region.split("\n", 1)[0])
        w = int(m.group(1)) if m else num_warps
        if "warp_group_dot" in region or "tt.dot" in region or "ttng.mma" in region:
            out["consumer"].append(w)
        elif "async_tma_copy_global_to_local" in region:
            out["producer"].append(w)
    return out


def budget(fma, warps):
    """Instructions per thread per iteration that one iteration's tensor-core time can issue (module
    docstring): fma / FMA_PER_CLK_SM clocks, W / 4 warps per scheduler."""
    return fma / FMA_PER_CLK_SM / (warps / SCHEDULERS_PER_SM)


def _gated(variant, dtype, buckets):
    """Whether CI holds this row to the budget: a default 16-bit variant — or a descriptor (TMA)
    forward, which the tuner times beside the default at every compute-bound shape it applies to — at
    the heuristic tile of the compute-bound bucket (M > 128). Decode and small-batch shapes are
    bandwidth-bound (an M-row linear does under M FLOP per byte, below the H100's 295 — 989 TFLOP/s over
    3.35 TB/s), so tensor-core time is not what their iterations cost: their rows are reported, not
    gated. (The prologue backward, also tunable, is kept to be measured against: over by design.)"""
    from fusedad.kernels import variants

    # A variant whose predicate admits only decode shapes (split-K) never runs a compute-bound M.
    decode_only = variant.applies is variants._decode_splits
    return ((variant.default or variant.descriptors) and not decode_only and dtype in ("bf16", "fp16")
            and "M>128" in buckets.split(","))


def loop_rows(full=True):
    """(variant, dtype, activation, buckets, tile) of the report: every variant × activation × heuristic
    tile in REPORT_DTYPES, then FP16_ROWS. ``full=False`` (CI): every activation where the row is gated,
    elsewhere only gelu_tanh, the activation the compile check lowers (its kernels are reused)."""
    import fusedad

    acts = (None, *fusedad.ACTIVATIONS)
    out = [(v.name, dtype, act, buckets, cfg) for v in _variants() for dtype in REPORT_DTYPES
           for buckets, _M, cfg in heuristic_tiles(v.name, dtype) for act in acts
           if full or act == "gelu_tanh" or _gated(v, dtype, buckets)]
    for name, act, M in FP16_ROWS:
        bucket = next(b for b, m in BUCKETS.items() if m == M)
        out.append((name, "fp16", act, bucket, heuristic_tile(name, M, "fp16")))
    return out


def loop_report_row(name, dtype, act, buckets, cfg):
    """One report row (a dict): its main loops, each with instructions, opcodes, MMA, MUFU, budget and
    verdict; the row's verdict ("ok", "over", "no K loop", "error", "no cuobjdump") and ``gated``."""
    variant = _variant(name)
    tile = cfg.BLOCK_M * cfg.BLOCK_N * cfg.BLOCK_K
    row = dict(report="loop", variant=name, default=variant.default, gated=_gated(variant, dtype, buckets),
               dtype=dtype, act=act or "none", kernel_act=_act_name(launch_flags(variant, dtype, act)["ACT"]),
               buckets=buckets, tile=f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K}", warps=cfg.num_warps,
               stages=cfg.num_stages, loops=[], verdict=None, error=None)
    try:
        k = compile_variant(name, dtype, act, {}, cfg)
        text = _cuobjdump(k.asm["cubin"], "-sass")
        if text is None:
            row.update(verdict="no cuobjdump")
            return row
        instrs = parse_sass(text)
        ws = partitions(k.asm["ttgir"], cfg.num_warps)
        if ws is None:
            loops, producers = main_loops(instrs, cfg.num_warps), []
        else:
            # Each partition's warps issue its own loop: the consumers' MMA loops, the producer's loads.
            if len(set(ws["consumer"])) != 1 or len(set(ws["producer"])) > 1:
                raise ValueError(f"warp-specialised partitions {ws}: loops of partitions with different warp "
                                 "counts cannot be told apart in the SASS")
            loops = main_loops(instrs, ws["consumer"][0])
            producers = producer_loops(instrs, ws["producer"][0]) if ws["producer"] else []
    except Exception as e:  # noqa: BLE001 - reported in the row; the test fails on it
        row.update(verdict="error", error=f"{type(e).__name__}: {e}")
        return row
    for lp in loops:
        lp["budget"] = round(budget(lp["fma"], lp["warps"]), 1)
        lp["steps"] = lp["fma"] / tile  # tile products per iteration (1; 3 in forward mode; ½ per consumer of 2)
        lp["verdict"] = "ok" if lp["instructions"] <= lp["budget"] else "over"
    row["loops"] = loops
    row["verdict"] = ("no K loop" if not loops else
                      "over" if any(lp["verdict"] == "over" for lp in loops) else "ok")
    if ws is not None:
        # The partitions share the SM's schedulers and tensor cores: one CTA iteration issues every
        # partition's loop once (each consumer its share of the tile, the producer the loads).
        issue = sum(lp["instructions"] * lp["warps"] / SCHEDULERS_PER_SM for lp in loops + producers)
        tensor = sum(lp["fma"] for lp in loops) / FMA_PER_CLK_SM
        row["partitions"] = ws
        row["producer_loops"] = producers
        row["cta"] = dict(issue_clocks=issue, tensor_clocks=tensor, verdict="ok" if issue <= tensor else "over")
        if loops and row["cta"]["verdict"] == "over":
            row["verdict"] = "over"
    return row


def _act_name(kernel_id):
    from fusedad.activations import lookup

    return lookup(kernel_id).op_name


def fails_ci(row):
    """A gated row (default 16-bit variant, compute-bound bucket's heuristic tile) over budget, or any
    row that did not compile."""
    return row["verdict"] == "error" or (row["gated"] and row["verdict"] == "over")


def print_table(report, title):
    import triton

    print(f"{title}: static main-loop report, sm_90, triton {triton.__version__}; budget = MMA FMA per "
          f"iteration / {FMA_PER_CLK_SM} per clock / (warps / {SCHEDULERS_PER_SM}) instructions per thread")
    head = (f"{'variant':<20} {'dtype':<5} {'act':<9} {'tile (BMxBNxBK w s)':<20} {'buckets':<22} {'loop':<4} "
            f"{'instr':>5} {'MMA':>8} {'MUFU':>4} {'budget':>6} {'verdict':<9} {'CI':<4} top opcodes")
    print(head)
    print("-" * len(head))
    for r in report:
        left = (f"{r['variant']:<20} {r['dtype']:<5} {r['act']:<9} "
                f"{r['tile'] + ' w' + str(r['warps']) + ' s' + str(r['stages']):<20} {r['buckets']:<22}")
        gate = "gate" if r["gated"] else "-"
        if not r["loops"]:
            print(f"{left} {'-':<4} {'-':>5} {'-':>8} {'-':>4} {'-':>6} {r['verdict']:<9} {gate:<4} {r['error'] or ''}")
        for i, lp in enumerate(r["loops"]):
            label = f"{i + 1}/{len(r['loops'])}" if len(r["loops"]) > 1 else "K"
            mma = f"{lp['mma']} {lp['mma_op'][0].split('.')[0]}"
            top = ", ".join(f"{op} {n}" for op, n in list(lp["opcodes"].items())[:6])
            print(f"{left} {label:<4} {lp['instructions']:>5} {mma:>8} {lp['mufu']:>4} {lp['budget']:>6g} "
                  f"{lp['verdict']:<9} {gate:<4} {top}")
        if r.get("cta"):  # warp-specialised: the producer's load loop, and the whole CTA's issue vs MMA time
            for lp in r["producer_loops"]:
                top = ", ".join(f"{op} {n}" for op, n in list(lp["opcodes"].items())[:6])
                print(f"{left} {'load':<4} {lp['instructions']:>5} {'-':>8} {lp['mufu']:>4} {'-':>6} {'-':<9} "
                      f"{gate:<4} {top} (producer, {lp['warps']} warps)")
            c = r["cta"]
            print(f"{left} {'CTA':<4} {'-':>5} {'-':>8} {'-':>4} {'-':>6} {c['verdict']:<9} {gate:<4} issue "
                  f"{c['issue_clocks']:g} clocks per iteration (every partition's loop) vs MMA {c['tensor_clocks']:g}; "
                  f"partitions {r['partitions']}")
    over = [r for r in report if r["verdict"] in ("over", "error")]
    ungated = sum(r["default"] and not r["gated"] for r in over)
    print(f"over budget: {len(over)} — non-default variants {sum(not r['default'] for r in over)}, "
          f"default variants at bandwidth-bound tiles (not gated) {ungated}, "
          f"gated (CI fails) {sum(fails_ci(r) for r in report)}")
    bad = sorted({f"{r['variant']} {r['dtype']} {r['act']} {r['tile']}" for r in report if fails_ci(r)})
    print(f"gated rows over budget: {', '.join(bad) or 'none'}")
    print(f"loop report: {len(report)} variants, {len(over)} over budget", flush=True)


def loop_report(full=True, as_json=False):
    """Print the report (one JSON line per row first if ``as_json``); returns its rows."""
    report = []
    for args in loop_rows(full):
        row = loop_report_row(*args)
        report.append(row)
        if as_json:
            print(json.dumps(row), flush=True)
    print_table(report, "full" if full else "CI subset (every activation where gated, else gelu_tanh)")
    return report


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
    elif sys.argv[1:] == ["--loop-report"]:
        loop_report()
    elif sys.argv[1:] == ["--ci"]:
        main([])
        loop_report(full=False, as_json=True)
    else:
        main(sys.argv[1:])

"""The kernel-variant table: which kernel runs a launch, its grid, its config space and where it applies.

A launcher (``linear.py``) describes its call as a ``Problem`` and asks ``select(direction, problem)``
for the first row of that direction whose ``applies`` predicate holds. A new variant (a TMA-descriptor
forward, a persistent grid, a split-K decode path, …) is one kernel in ``gemm.py``, one row here (with a
predicate such as "contiguous, 16-byte aligned") and its tests; ``tests/sm90_compile.py`` lowers every
row for sm_90.
"""
import contextlib
import dataclasses
import functools
import types
from typing import Callable, Mapping, Optional

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import configs, torch_rows
from .gemm import (_dz_kernel, _linear_bwd_kernel, _linear_fwd_kernel, _linear_fwd_splitk_kernel,
                   _linear_fwd_splitk_reduce_kernel, _linear_fwd_tangent_kernel, _linear_fwd_tma_kernel)
from .mlp_gemm import _gated_dual_bwd_kernel, _gated_up_fwd_kernel, _mlp_down_bwd_kernel

_INTERPRETER = isinstance(_linear_fwd_kernel, InterpretedFunction)
#: Programs of a persistent grid under the interpreter (a GPU gets one per SM): small, but more than one,
#: so that the tests see programs loop over several tiles.
INTERPRETER_SMS = 2
#: The decode path's M limit (one 16-row tile).
DECODE_M = 16


@dataclasses.dataclass(eq=False)
class Problem:
    """One launch as the selector sees it. M×N is the forward's output, K its reduction length.
    (Not frozen: built once per launch, and a frozen dataclass's __init__ sets each field through
    object.__setattr__ — measurable on the per-call path. Treat it as read-only.)"""

    M: int
    N: int
    K: int
    dtype: object
    tensors: tuple  #: every operand and output, for layout predicates
    flags: dict  #: the launch's constexpr flags (the grid of the backward depends on them)


def cdiv(a, b):
    """⌈a / b⌉ for the host's grid arithmetic. (``triton.cdiv`` is a JIT function: called from Python it
    goes through Triton's argument handling, which cost more than the rest of a forward launch's host
    work together — profiled with the launcher stubbed, docs/torch-rows-and-host-path.md.)"""
    return -(-a // b)


def _any_layout(problem):
    return True


def _forward_grid(p, cfg):
    return (cdiv(p.M, cfg.BLOCK_M) * cdiv(p.N, cfg.BLOCK_N),)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(p):
    """Streaming multiprocessors of the problem's device (``INTERPRETER_SMS`` under the interpreter)."""
    if _INTERPRETER:
        return INTERPRETER_SMS
    device = p.tensors[0].device
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _persistent_grid(p, cfg):
    """One program per SM (never more programs than tiles); each loops over tiles in grouped order."""
    return (min(_forward_grid(p, cfg)[0], num_sms(p)),)


def _tma_ok(t):
    """A tensor a TMA descriptor can address: unit last stride, 16-byte aligned base and other strides."""
    if t is None:
        return True
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for s in t.stride()[:-1]))


def _tma_layout(p):
    """x, weight, y (and z when stored) K-/N-contiguous and 16-byte aligned; 16-bit or fp32; int32
    offsets (descriptor coordinates are 32-bit)."""
    if p.dtype not in (torch.bfloat16, torch.float16, torch.float32) or p.flags.get("INT64") or len(p.tensors) < 5:
        return False
    x, w, _b, y, z = p.tensors[:5]
    return all(_tma_ok(t) for t in (x, w, y, z))


def _decode_splits(p):
    """M ≤ 16 and a split-K plan of at least two splits at the tile the launch takes unless tuned (the
    interpreter's under the interpreter, else the decode heuristic's). A single split — K within one
    BLOCK_K, or N so wide (≳ 17k columns at 64-wide tiles on 132 SMs: an LM head, a 70B model's MLP) that
    its tiles alone fill two waves — has nothing to add up: the pointer kernel, the next default row,
    computes the tile with its epilogue in one launch, without the scratch buffer and the reduce launch.
    (A tuned tile whose plan has one split still runs correctly here, as a plan of one split.)"""
    if not (0 < p.M <= DECODE_M and p.N > 0 and len(p.tensors) > 0):
        return False
    if _INTERPRETER:
        cfg = configs.interpreter_config(p.M, p.N, p.K)
    else:
        cfg = _first_config(configs.decode_candidates, p.M, p.N, p.K, p.dtype)
    return splitk_plan(p, cfg)[0] >= 2


def _never(p):
    return False


def splitk_plan(p, cfg):
    """(splits, K per split) of the decode path: enough K splits that the N tiles × splits keep ≥ 2 waves
    of CTAs streaming W (2 × SMs programs), each split a whole number of BLOCK_K blocks, none empty."""
    n_tiles = cdiv(p.N, cfg.BLOCK_N)
    k_blocks = max(1, cdiv(p.K, cfg.BLOCK_K))
    splits = max(1, min(k_blocks, cdiv(2 * num_sms(p), n_tiles)))
    blocks_per_split = cdiv(k_blocks, splits)
    splits = cdiv(k_blocks, blocks_per_split)
    return splits, blocks_per_split * cfg.BLOCK_K


def _splitk_grid(p, cfg):
    return (cdiv(p.N, cfg.BLOCK_N), splitk_plan(p, cfg)[0])


def _splitk_launch(p, cfg, args, launch_one):
    """Two launches: the split partial products into an fp32 (fp64) scratch buffer, then their sum in a
    fixed order with the epilogue. ``launch_one(variant, grid, args)`` records and runs one kernel."""
    splits, k_split = splitk_plan(p, cfg)
    acc_dtype = torch.float64 if p.flags.get("FP64") else torch.float32
    part = torch.empty((splits, p.M, p.N), dtype=acc_dtype, device=p.tensors[0].device)
    n_tiles = cdiv(p.N, cfg.BLOCK_N)
    launch_one(by_name("linear_fwd_splitk"), (n_tiles, splits), (*args, part, k_split))
    launch_one(by_name("linear_fwd_splitk_reduce"), (n_tiles,), (*args, part, splits))


def _backward_grid(p, cfg):
    """dX tiles (M×K), then dW tiles (N×K) — or, for the bias alone, one row-sum program per BLOCK_M of N."""
    f = p.flags
    tiles_dx = cdiv(p.M, cfg.BLOCK_M) * cdiv(p.K, cfg.BLOCK_N) if f["COMPUTE_DX"] else 0
    if f["COMPUTE_DW"]:
        tiles_dw = cdiv(p.N, cfg.BLOCK_M) * cdiv(p.K, cfg.BLOCK_N)
    else:
        tiles_dw = cdiv(p.N, cfg.BLOCK_M) if f["COMPUTE_DB"] else 0
    return (tiles_dx + tiles_dw,)


def _mlp_down_bwd_grid(p, cfg):
    """dH tiles over (M, I) (Problem N = I, K = the block's output width), then, for the output bias,
    one program per (BLOCK_M × BLOCK_N) tile of dY (M, K)."""
    tiles = triton.cdiv(p.M, cfg.BLOCK_M) * triton.cdiv(p.N, cfg.BLOCK_N)
    if p.flags["BIAS_DOWN"]:
        tiles += triton.cdiv(p.M, cfg.BLOCK_M) * triton.cdiv(p.K, cfg.BLOCK_N)
    return (tiles,)


def _gated_dual_bwd_grid(p, cfg):
    """dX tiles (M×K), then dW_g and dW_u tiles (I×K each), each segment only if requested (N = I)."""
    f = p.flags
    tiles_w = triton.cdiv(p.N, cfg.BLOCK_M) * triton.cdiv(p.K, cfg.BLOCK_N)
    tiles = triton.cdiv(p.M, cfg.BLOCK_M) * triton.cdiv(p.K, cfg.BLOCK_N) if f["COMPUTE_DX"] else 0
    return (tiles + tiles_w * (int(f["COMPUTE_DWG"]) + int(f["COMPUTE_DWU"])),)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str  #: recorded in each Launch and part of the autotune key
    direction: str  #: "fwd", "fwd_tangent" or "bwd"
    kernel: object  #: the ``@triton.jit`` kernel (None for a torch row)
    grid: Callable  #: grid(problem, cfg) -> (programs,)
    config_space: Callable  #: config_space(M, N, K, dtype) -> [TileConfig, ...], the heuristic's pick first
    #: applies(problem) -> bool. It may read the problem's shapes, dtype and flags and its tensors' strides,
    #: 16-byte alignment and device — nothing else: the launcher plans a repeated forward by exactly those
    #: (``kernels/linear.py``, ``_forward_signature``).
    applies: Callable
    #: strides the JIT specialises to the constant 1 for contiguous operands (what sm90_compile mirrors)
    unit_strides: frozenset = frozenset()
    #: chosen by ``select`` when it applies; False: only when asked for with ``use`` (kept to be measured
    #: against the default, e.g. by the benchmark's backward suite)
    default: bool = True
    #: backward only: dZ (and db) come from a "dz" pass first, and this kernel runs with no activation
    dz_pass: bool = False
    #: a variant of more than one launch: launch(problem, cfg, args, launch_one) runs them (else one
    #: launch of ``kernel`` on ``grid``)
    launch: Optional[Callable] = None
    #: builds tensor descriptors in the kernel (needs Triton's allocator; not used inside torch.compile)
    descriptors: bool = False
    #: constexpr flags fixed by this row (e.g. ``WARP_SPECIALIZE``: two rows, one kernel), passed by name
    #: beside the call's flags (and recorded with them in a ``Launch``).
    flags: Mapping = dataclasses.field(default_factory=dict, hash=False)
    #: a torch row: torch(problem) computes the launch with torch ops (``torch_rows.py``) instead of a kernel
    torch: Optional[Callable] = None

    @property
    def is_torch(self):
        return self.torch is not None

    def __post_init__(self):
        object.__setattr__(self, "flags", types.MappingProxyType(dict(self.flags)))


_BWD_UNIT_STRIDES = frozenset({"stride_dyn", "stride_xk", "stride_wk", "stride_sn", "stride_dxk", "stride_dwk",
                               "stride_db"})

_FWD_UNIT_STRIDES = frozenset({"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn"})

def _no_grid(p, cfg):
    return (1,)


VARIANTS = (
    # torch's own product (cuBLAS on CUDA): never the default; the tuner keeps it for a key only when it
    # timed it faster than every Triton row timed there (it is listed first among the non-default rows
    # so that the bounded tuning space always holds it). Not offered inside a torch.compile trace.
    Variant("linear_fwd_torch", "fwd", None, _no_grid, configs.torch_config, torch_rows.applies_forward,
            default=False, torch=torch_rows.forward),
    Variant("linear_bwd_torch", "bwd", None, _no_grid, configs.torch_config, torch_rows.applies_backward,
            default=False, torch=torch_rows.backward),
    # Decode (M ≤ 16): split-K so that ≥ 2 waves of CTAs stream the weight; a fixed-order reduction with
    # the epilogue follows (the row below). Any strides (pointer loads through the shared tile body).
    Variant("linear_fwd_splitk", "fwd", _linear_fwd_splitk_kernel, _splitk_grid, configs.decode_candidates,
            _decode_splits, _FWD_UNIT_STRIDES, launch=_splitk_launch),
    # The second launch of linear_fwd_splitk; a row only so that sm90_compile lowers it: never selected.
    Variant("linear_fwd_splitk_reduce", "fwd", _linear_fwd_splitk_reduce_kernel, _forward_grid,
            configs.decode_candidates, _never, _FWD_UNIT_STRIDES, default=False),
    # Tensor descriptors: X as [BLOCK_M, BLOCK_K] and the (N, K) weight as [BLOCK_N, BLOCK_K] blocks
    # (used transposed), TMA stores in column halves. One program per tile, grouped order.
    Variant("linear_fwd_tma", "fwd", _linear_fwd_tma_kernel, _forward_grid, configs.tma_candidates, _tma_layout,
            _FWD_UNIT_STRIDES, descriptors=True, default=False, flags={"WARP_SPECIALIZE": False}),
    # The same kernel on a persistent grid (one program per SM looping over tiles); and warp-specialised.
    # Not default: whether they beat one-program-per-tile is for a GPU (the tuner) to say.
    Variant("linear_fwd_tma_persistent", "fwd", _linear_fwd_tma_kernel, _persistent_grid, configs.tma_candidates,
            _tma_layout, _FWD_UNIT_STRIDES, default=False, descriptors=True, flags={"WARP_SPECIALIZE": False}),
    Variant("linear_fwd_tma_ws", "fwd", _linear_fwd_tma_kernel, _persistent_grid, configs.tma_ws_candidates,
            _tma_layout, _FWD_UNIT_STRIDES, default=False, descriptors=True, flags={"WARP_SPECIALIZE": True}),
    # v1: pointer loads over any strides (the weight read through swapped strides); the fallback.
    Variant("linear_fwd", "fwd", _linear_fwd_kernel, _forward_grid, configs.candidates, _any_layout,
            _FWD_UNIT_STRIDES),
    Variant("linear_fwd_tangent", "fwd_tangent", _linear_fwd_tangent_kernel, _forward_grid, configs.tangent_candidates,
            _any_layout, frozenset({"stride_xk", "stride_wk", "stride_b", "stride_yn", "stride_zn", "stride_xtk",
                                    "stride_wtk", "stride_bt", "stride_ytn", "stride_ztn"})),
    # The backward's default: a dZ pass, then plain GEMMs (dX and dW tiles in one grid).
    Variant("linear_bwd", "bwd", _linear_bwd_kernel, _backward_grid, configs.candidates, _any_layout,
            _BWD_UNIT_STRIDES, dz_pass=True),
    # The first design: dZ = dY ⊙ act'(Z) in every tile's operand prologue, db from the dW tiles, one
    # launch. Predicted issue-bound for the smooth activations (bench/NOTES.md): kept to be measured.
    Variant("linear_bwd_prologue", "bwd", _linear_bwd_kernel, _backward_grid, configs.candidates, _any_layout,
            _BWD_UNIT_STRIDES, default=False),
    Variant("linear_dz", "dz", _dz_kernel, _forward_grid, configs.elementwise_candidates, _any_layout,
            frozenset({"stride_dyn", "stride_sn", "stride_dzn"})),
    # MLP blocks (kernels/mlp_gemm.py). The gated up projection: gate and up tiles from one X tile (two
    # accumulators, so the forward-mode kernel's register-bounded tiles), H = act(G) ⊙ U in the epilogue.
    Variant("mlp_gated_up", "mlp_up", _gated_up_fwd_kernel, _forward_grid, configs.tangent_candidates, _any_layout,
            frozenset({"stride_xk", "stride_wgk", "stride_wuk", "stride_bg", "stride_bu", "stride_hi", "stride_gi",
                       "stride_ui"})),
    # The down projection's dX GEMM, the activation's backward in its epilogue (dG, dU / dZ₁, H, bias partials).
    # The epilogue holds ~6 fp32 tiles (dH, G, U, act(G), dG, dU): at 128×128 with 8 warps (64 values per
    # thread each) it spilled 976 B per thread (sm_90 lowering, Triton 3.9, gelu_tanh); the forward-mode
    # kernel's register-bounded tiles (≤ 32 accumulator values per thread) are used instead.
    Variant("mlp_down_bwd", "mlp_down_bwd", _mlp_down_bwd_kernel, _mlp_down_bwd_grid, configs.tangent_candidates,
            _any_layout, frozenset({"stride_dyn", "stride_wdi", "stride_gi", "stride_ui", "stride_dgi", "stride_dui",
                                    "stride_hi"})),
    # dX = dG·W_g + dU·W_u (two accumulators in the dX programs), dW_g and dW_u: one grid.
    Variant("mlp_gated_dual_bwd", "mlp_dual_bwd", _gated_dual_bwd_kernel, _gated_dual_bwd_grid,
            configs.tangent_candidates, _any_layout,
            frozenset({"stride_dgi", "stride_dui", "stride_xk", "stride_wgk", "stride_wuk", "stride_dxk", "stride_dwgk",
                       "stride_dwuk"})),
)


_FORCED = {}  # direction -> variant name, set by ``use``


@contextlib.contextmanager
def use(name):
    """Inside the block, launches of that variant's direction run it (when it applies) instead of the
    default: for benchmarks and tests that compare variants. Not thread-local."""
    variant = by_name(name)
    before = _FORCED.get(variant.direction)
    _FORCED[variant.direction] = name
    try:
        yield variant
    finally:
        if before is None:
            _FORCED.pop(variant.direction, None)
        else:
            _FORCED[variant.direction] = before


def forced(direction):
    """The variant name ``use`` forces for ``direction``, or None."""
    return _FORCED.get(direction)


_HEURISTIC = {}  # (config space, M, N, K, dtype) -> its first TileConfig
#: Shapes ``heuristic_config`` remembers before it starts over (a process that sees ever new M values —
#: variable sequence lengths — must not grow it without bound).
HEURISTIC_MEMO_SHAPES = 4096


def heuristic_config(variant, M, N, K, dtype):
    """The heuristic's pick for ``variant`` at this shape: its config space's first entry, memoised (the
    spaces are pure functions of the shape; building one — a few dataclass constructions, rescaled for
    fp32 — was the largest item of a forward launch's host work with autotuning off, profiled with
    ``python -m bench.overhead --launcher``). Bounded: cleared past ``HEURISTIC_MEMO_SHAPES`` shapes."""
    return _first_config(variant.config_space, M, N, K, dtype)


def _first_config(space, M, N, K, dtype):
    key = (space, M, N, K, dtype)
    cfg = _HEURISTIC.get(key)
    if cfg is None:
        if len(_HEURISTIC) >= HEURISTIC_MEMO_SHAPES:
            _HEURISTIC.clear()
        cfg = _HEURISTIC[key] = space(M, N, K, dtype)[0]
    return cfg


def by_name(name):
    for variant in VARIANTS:  # (a dozen rows: a scan, so that a patched VARIANTS is seen)
        if variant.name == name:
            return variant
    raise KeyError(f"fusedad: no kernel variant named {name!r}; the table has {[v.name for v in VARIANTS]}")


def offered(variant, descriptors):
    """descriptors=False (inside a torch.compile trace): neither a row that builds tensor descriptors
    nor a torch row (the compiled graph keeps the Triton launch it was traced with)."""
    return descriptors or not (variant.descriptors or variant.is_torch)


def select(direction, problem, descriptors=True):
    """The variant forced by ``use`` if it applies, else the first default variant of ``direction``
    that applies to ``problem``. descriptors=False: none that builds tensor descriptors, no torch row."""
    def ok(variant):
        # (the descriptor check first: inside a trace the tensors may be fake, without a data pointer)
        return offered(variant, descriptors) and variant.applies(problem)

    forced = _FORCED.get(direction)
    if forced is not None:
        variant = by_name(forced)
        if ok(variant):
            return variant
    for variant in VARIANTS:
        if variant.direction == direction and variant.default and ok(variant):
            return variant
    raise LookupError(f"fusedad: no {direction} kernel variant applies to {problem}")


#: At most this many (variant, config) pairs are timed per autotune key.
MAX_TUNING_PAIRS = 12
#: Configs of each non-heuristic variant that are timed (its config space's first entries).
OTHER_VARIANT_CONFIGS = 2


def tuning_space(direction, problem, descriptors=True):
    """The bounded list of (variant, config) pairs the autotuner times for one launch, heuristic first:
    the selected variant (``select``: forced by ``use``, else the first applicable default) with its
    whole config space, then — unless a variant is forced — every other applicable variant of the
    direction with its first ``OTHER_VARIANT_CONFIGS`` configs, in table order."""
    p = problem
    first = select(direction, p, descriptors)
    pairs = [(first, c) for c in first.config_space(p.M, p.N, p.K, p.dtype)]
    if _FORCED.get(direction) is None:
        for v in VARIANTS:
            if v.direction == direction and v is not first and offered(v, descriptors) and v.applies(p):
                pairs += [(v, c) for c in v.config_space(p.M, p.N, p.K, p.dtype)[:OTHER_VARIANT_CONFIGS]]
    return pairs[:MAX_TUNING_PAIRS]

"""Launch wrappers for the fused linear kernels: check, allocate, pick a config, launch.

No autograd here: these take plain tensors and return plain tensors. Shapes (nn.Linear layout):

    x: (M, K)   weight: (N, K)   bias: (N,)   y, z, grad_y: (M, N)
    grad_x: (M, K)   grad_w: (N, K)   grad_b: (N,)

Any strides are accepted (transposed, sliced, stride-0 expanded); outputs are freshly allocated and
contiguous.
"""
import contextlib
import dataclasses
import functools
import os
import threading
from typing import NamedTuple, Optional

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from . import configs, variants
from .variants import cdiv
from ..activations import lookup
from .gemm import _linear_fwd_kernel

#: True when the kernels were defined under TRITON_INTERPRET=1: they then run on CPU tensors through
#: Triton's interpreter (numpy) instead of being compiled for a GPU.
INTERPRETER = isinstance(_linear_fwd_kernel, InterpretedFunction)

#: Fill every output with NaN before the kernel writes it, so an element a kernel forgot shows up.
#: Off by default (costs a fill); the test suite turns it on with FUSEDAD_POISON_OUTPUTS=1.
POISON_OUTPUTS = os.environ.get("FUSEDAD_POISON_OUTPUTS", "0") == "1"

_INT32_LIMIT = 2**31
_NO_TANGENTS = (None,) * 5  # a forward's tangent slots in Problem.tensors, none given


@dataclasses.dataclass
class Launch:
    """One kernel launch, as recorded by :func:`record_launches`."""

    kernel: str
    grid: tuple
    flags: dict
    #: the kernel's positional arguments (tensors as passed: a test can check that a view was not copied)
    args: tuple = ()


# The open recorders: a tuple replaced (never mutated) under the lock, so a launch on another thread
# iterates a consistent snapshot while recorders open and close.
_RECORDERS = ()
_RECORDERS_LOCK = threading.Lock()

# Triton's interpreter patches module-level state of triton.language while a kernel runs: two
# interpreted launches at once (from two threads) corrupt each other. It is a test backend, so
# launches are simply serialised.
_INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def record_launches():
    """Collect a :class:`Launch` for every kernel launched inside the ``with`` block.

    Process-wide: the log also receives launches made meanwhile by other threads. A per-thread log
    would miss the backward on CUDA, whose kernels the autograd engine launches from its own worker
    thread for that device.
    """
    global _RECORDERS
    log = []
    with _RECORDERS_LOCK:
        _RECORDERS = _RECORDERS + (log,)
    try:
        yield log
    finally:
        with _RECORDERS_LOCK:
            _RECORDERS = tuple(r for r in _RECORDERS if r is not log)


def _alloc(shape, like, dtype=None):
    """An uninitialised output on ``like``'s device, in ``like``'s dtype unless ``dtype`` is given."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=like.dtype if dtype is None else dtype, device=like.device)
    # (new_empty: 2.2 µs against torch.empty's 3.1 µs with dtype and device given: timeit, 2-core CPU VM,
    # torch 2.13.0+cpu, 2026-12-07)
    return like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _device_name(index):
    """The card's name (the autotune cache is per device model); index None = the current device.

    Safe from several threads: lru_cache keeps its table consistent under concurrent calls; two threads
    missing at once may both ask CUDA for the name, which is harmless (same answer, no side effect).
    """
    return torch.cuda.get_device_name(index)


def _max_offset(t):
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


_FORCED_INT64 = []


@contextlib.contextmanager
def force_int64():
    """Run the 64-bit index path inside the ``with`` block even for small tensors.

    For tests: the INT64 specialisation can then be checked on any shape without reserving a >2³¹-element
    range (the huge-stride cases themselves run in a subprocess, where a wrapped offset can only crash
    that process).
    """
    _FORCED_INT64.append(True)
    try:
        yield
    finally:
        _FORCED_INT64.pop()


def _small(t):
    """Offsets of ``t`` fit in int32 for sure: contiguous and fewer than 2³¹ − 1 elements (its largest
    offset is then numel − 1). Two C calls instead of ``_max_offset``'s walk over the strides."""
    return t.numel() < _INT32_LIMIT - 1 and t.is_contiguous()


def needs_int64(*tensors):
    """True if any tensor has an element offset ≥ 2³¹ (int32 index math would wrap)."""
    if _FORCED_INT64:
        return True
    for t in tensors:
        if t is not None and not _small(t) and _max_offset(t) >= _INT32_LIMIT - 1:
            return True
    return False


#: What ``torch.backends.cuda.matmul.allow_tf32`` reads (its module ``__getattr__`` walks a chain of
#: names first), asked directly where this torch has it.
_cublas_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or (
    lambda: torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype):
    """tl.dot input precision for float32 that follows PyTorch's own matmul setting.

    Triton's default for fp32 is TF32, PyTorch's is IEEE (``torch.backends.cuda.matmul.allow_tf32`` is
    False unless ``torch.set_float32_matmul_precision("high"/"medium")`` or the flag is set).
    """
    if dtype == torch.float32 and _cublas_allow_tf32():
        return "tf32"
    return "ieee"


def _common_flags(dtype, *tensors):
    return dict(
        FP64=dtype == torch.float64,
        EMULATE_BF16=INTERPRETER and dtype == torch.bfloat16,
        PRECISION=dot_precision(dtype),
        INT64=needs_int64(*tensors),
    )


def _strides(t, ndim):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _descriptor_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """In-kernel tensor descriptors (``tl.make_tensor_descriptor``) need global scratch memory for the
    descriptors, which Triton asks for through its allocator — a context variable, so per thread: set a
    torch allocation (on the current device and stream) wherever none is set; a user's own is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)


_NO_DEVICE_SWITCH = contextlib.nullcontext()  # reusable: it holds no state


def _on_device(device):
    """The tensors' own CUDA device as the current one (a backward may run on another thread/device);
    nothing to switch for a CPU tensor."""
    return torch.cuda.device(device) if device.type == "cuda" else _NO_DEVICE_SWITCH


def _check_not_jit_tracing(variant):
    if torch.jit.is_tracing():
        # The tracer cannot record a Triton launch: the trace would keep the output's allocation and
        # replay uninitialised memory. fusedad.linear / fusedad.nn.Linear never get here while tracing
        # (they call the fusedad::linear_fwd op, inside which tracing is off); direct kernel calls do.
        raise RuntimeError(
            f"fusedad.kernels: a {variant.name} launch cannot be recorded by torch.jit.trace. Trace fusedad.linear "
            "or fusedad.nn.Linear (recorded as the fusedad::linear_fwd op), or capture the model with "
            "torch.export.export")


def _do_bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _pick(direction, problem, device, traced, run, variant=None):
    """(variant, config) for one launch: the interpreter's small tile; else the autotuner's choice over
    the applicable (variant, config) pairs (``variants.tuning_space``: Triton rows and torch rows alike),
    cached per key, or the heuristic's first pair when autotuning is off.

    run(variant, cfg) performs the whole launch once without recording it (what the tuner times: for the
    backward that includes its dZ pass). variant: fixed by the caller — only its tiles are tuned.
    traced: inside a torch.compile trace — nothing is timed, no torch row and no descriptor kernel is
    offered (``variants.select``).
    """
    M, N, K, dtype = problem.M, problem.N, problem.K, problem.dtype
    forced = variant is None and variants.forced(direction) is not None
    if not INTERPRETER and not forced and variant is None:
        # The per-call path once a key is tuned: the cached row, before any row is selected (no other
        # row's predicate, no config space, no tuning space). It must be one this launch may run (a key
        # does not hold the operands' layout, nor whether the launch accumulates); otherwise the full
        # path below decides.
        hit = configs.cached_choice(_device_name(device.index), direction, problem.flags, M, N, K, dtype)
        cached = variants.by_name(hit[0]) if isinstance(hit, tuple) else None
        if (cached is not None and cached.direction == direction and variants.offered(cached, not traced)
                and cached.applies(problem)):
            _check_not_jit_tracing(cached)
            return cached, hit[1]
    chosen = variant or variants.select(direction, problem, descriptors=not traced)
    _check_not_jit_tracing(chosen)
    if INTERPRETER:
        return chosen, configs.interpreter_config(M, N, K)
    # the fixed or forced variant's name keys the cache when only its tiles are tuned, else the direction
    key_name = chosen.name if variant is not None or forced else direction
    device_name = _device_name(device.index)
    if key_name != direction:
        hit = configs.cached_choice(device_name, key_name, problem.flags, M, N, K, dtype)
        if isinstance(hit, tuple) and variants.by_name(hit[0]) is chosen:
            return chosen, hit[1]
    if not configs.autotune_enabled():  # FUSEDAD_AUTOTUNE=0: the heuristic pair, the tuning space's first
        return chosen, variants.heuristic_config(chosen, M, N, K, dtype)
    if variant is not None:  # the caller fixed the variant: tune its tiles only
        pairs = [(variant, c) for c in variant.config_space(M, N, K, dtype)]
    else:  # tune over (variant, config)
        pairs = variants.tuning_space(direction, problem, descriptors=not traced)
    by_name = {v.name: v for v, _ in pairs}

    def timed(item):
        name, c = item
        run(by_name[name], c)
        return item  # (for a fake timer in the tests: which pair this run was)

    with _on_device(device):
        name, cfg = configs.launch_config(
            device_name, key_name, problem.flags, M, N, K, dtype, timed, _do_bench, traced=traced,
            space=lambda *_: [(v.name, c) for v, c in pairs])
    if name not in by_name:
        # A choice tuned for this key that this launch cannot run (an accumulating launch reuses the
        # plain launch's choice, which may be a torch row; a layout the cached row does not take): the
        # heuristic's pair.
        return pairs[0]
    return by_name[name], cfg


def _launch(direction, args, flags, M, N, K, dtype, device, tensors, wrap=None, variant=None, config=None,
            record=True, signature=None):
    """Pick the variant and config (unless ``config`` is given with ``variant``), record the launch(es)
    and run them.

    wrap: None for a plain launch, or ``torch.library.wrap_triton`` when called from a ``triton_op``
    body that torch.compile traces — then nothing may be timed, so the pair comes from the autotune
    cache if this shape was tuned eagerly (in this process or on disk), else from the heuristic.
    signature: the launch's plan key (``_forward_signature``), or None: the choice is kept under it.
    """
    problem = variants.Problem(M, N, K, dtype, tensors, flags)
    if config is not None:
        _check_not_jit_tracing(variant)
        chosen, cfg = variant, config
    else:
        chosen, cfg = _pick(direction, problem, device, wrap is not None,
                            lambda v, c: _run(v, c, problem, args, flags, None, device, record=False), variant)
    _run(chosen, cfg, problem, args, flags, wrap, device, record)
    if signature is not None:
        _remember(signature, chosen, cfg, problem, flags)


def _record(name, grid, flags, args):
    for log in _RECORDERS:
        log.append(Launch(name, grid, dict(flags), args))


def _run(variant, cfg, problem, args, flags, wrap, device, record):
    """Launch ``variant`` with ``cfg``: one kernel on its grid, its own ``launch`` (several kernels), or
    a torch row's torch ops."""
    if variant.is_torch:
        if record and _RECORDERS:
            _record(variant.name, variant.grid(problem, cfg), dict(flags, **variant.flags), problem.tensors)
        with _on_device(device):
            variant.torch(problem)
        return

    def launch_one(v, grid, a):
        _launch_kernel(v, grid, a, dict(flags, **v.flags, **_kwargs(cfg)), wrap, device, record)

    if variant.launch is not None:
        variant.launch(problem, cfg, args, launch_one)
    else:
        launch_one(variant, variant.grid(problem, cfg), args)


def _launch_kernel(v, grid, args, kwargs, wrap, device, record):
    """One launch of row ``v``'s kernel (recorded first when ``record`` and a recorder is open); kwargs:
    the launch's constexpr flags, the row's own and the tile's, merged."""
    if record and _RECORDERS:
        _record(v.name, grid, kwargs, args)
    if grid[0] == 0:
        return
    launcher = v.kernel if wrap is None else wrap(v.kernel)
    if INTERPRETER:
        with _INTERPRETER_LOCK:
            launcher[grid](*args, **kwargs)
    else:
        if v.descriptors:
            _ensure_allocator()
        # The tensors' own device, not the current one: a backward may run on another thread/device.
        with _on_device(device):
            launcher[grid](*args, **kwargs)


_KWARGS = {}  # TileConfig -> its launch keyword arguments (dataclasses.asdict is slow on a hot path)


def _kwargs(cfg):
    kw = _KWARGS.get(cfg)
    if kw is None:
        kw = _KWARGS[cfg] = cfg.launch_kwargs()
    return kw


# Plans: the per-call path of a repeated forward.
#
# A process repeats its launches — the same layer on the same batch shape, step after step — and what
# ``_pick`` decides for a forward launch (the row, its tile, the grid, the kernel's keyword arguments)
# depends only on the launch's *signature* (``_forward_signature``) and on the tuned results of the
# process. So it is decided once per signature and kept as a plan; a later launch of that signature goes
# from its arguments to the kernel. Measured on the 2-core CPU VM, 2026-12-07, torch 2.13.0+cpu, Triton
# 3.9.0, every Triton launch stubbed out as ``bench.overhead.stubbed_launcher`` does (``linear_forward``
# alone in a timed loop, Linear(64, 64) at batch 8): 50.6 µs → 27.0 µs per forward launch,
# the two output allocations (about 10 µs) included; the recorded forward in ``python -m bench.overhead
# --launcher`` went from 1.42–1.49× to 1.02–1.21× nn.Linear+GELU (docs/torch-rows-and-host-path.md).
# A plan is used only while it is what ``_pick`` would choose:
# made at the autotune cache's current ``configs.generation()`` (a key tuned, loaded or cleared since
# makes every plan stale), no forward row forced (``variants.use``), no ``force_int64``, not inside a
# compile trace (``wrap``), no forward-mode tangents. Fixed for the process, as the launcher assumes
# anyway: the variant table and its predicates (which read nothing but what the signature holds), each
# device's name and SM count. (Tests that patch those start from ``clear_plans``.)

#: signature -> _Plan; cleared when it reaches PLAN_MEMO_SIZE signatures (a process that sees ever new
#: batch shapes must not grow it without bound).
_PLANS = {}
PLAN_MEMO_SIZE = 4096


class _Plan(NamedTuple):
    generation: int  #: ``configs.generation()`` when it was made
    variant: object  #: the row ``_pick`` chose
    cfg: object  #: its tile
    grid: tuple
    kwargs: dict  #: the launch's flags, the row's and the tile's, merged: what the kernel is called with
    flags: dict  #: the launch's flags (a torch row and a row of several launches are run by ``_run``)
    one_kernel: bool  #: a single Triton launch (else ``_run`` runs it: torch ops, or split-K's two launches)


def clear_plans():
    """Forget every plan (the next launch of each signature chooses again)."""
    _PLANS.clear()


def _forward_signature(x, weight, bias, act, strides):
    """What a forward launch without tangents is planned by, as a dict key: x's shape (M, K), N, dtype,
    device, activation, every operand's and output's strides (``strides``, as the kernel receives them:
    z's are (0, 0) when z is not stored), the 16-byte alignment of x, weight and bias (None: no bias —
    a bias expanded from one value has stride 0 too; fresh outputs are always aligned), the fp32 matmul
    precision setting, the interpreter mode and FUSEDAD_AUTOTUNE. The INT64 flag follows from the shapes
    and strides. None where no plan may be used. (Under ``torch.jit.trace`` sizes read as tensors, so a
    traced call matches no plan; ``_run_plan`` refuses the tracer anyway.)"""
    if _FORCED_INT64 or variants.forced("fwd") is not None:
        return None
    return (x.shape, weight.shape[0], x.dtype, x.get_device(), act.kernel_id, strides,
            x.data_ptr() % 16, weight.data_ptr() % 16, None if bias is None else bias.data_ptr() % 16,
            dot_precision(x.dtype), INTERPRETER, configs.autotune_setting())


def _current_plan(signature):
    """The plan kept for ``signature`` if it was made at the autotune cache's current generation."""
    plan = _PLANS.get(signature)
    return plan if plan is not None and plan.generation == configs.generation() else None


def _keep(signature, plan):
    if len(_PLANS) >= PLAN_MEMO_SIZE:
        _PLANS.clear()
    _PLANS[signature] = plan


def _remember(signature, variant, cfg, problem, flags):
    _keep(signature, _Plan(configs.generation(), variant, cfg, variant.grid(problem, cfg),
                           dict(flags, **variant.flags, **_kwargs(cfg)), flags,
                           variant.launch is None and not variant.is_torch))


def _run_plan(plan, args, device, problem):
    """Launch what ``plan`` holds with this call's kernel arguments; problem: this call's Problem where
    ``_run`` runs the plan (not a single kernel), else None."""
    _check_not_jit_tracing(plan.variant)
    if plan.one_kernel:
        _launch_kernel(plan.variant, plan.grid, args, plan.kwargs, None, device, True)
    else:
        _run(plan.variant, plan.cfg, problem, args, plan.flags, None, device, True)


# Backward plans: the same for ``linear_backward`` — its dZ pass and GEMM launch (or torch's row) kept per
# backward signature (``_backward_signature``), under the same rules as the forward's plans. Measured on
# the 2-core CPU VM, 2026-12-07, torch 2.13.0+cpu, Triton 3.9.0, launches stubbed out (``linear_backward``
# alone in a timed loop, Linear(64, 64) at batch 8, gelu, dX, dW and db): 96–161 µs → 40–43 µs per call.


class _Step(NamedTuple):
    """One kernel launch of a planned backward: its row, grid and merged keyword arguments, and ``tail``:
    its positional arguments after the tensors (sizes and strides, fixed by the signature)."""
    variant: object
    grid: tuple
    kwargs: dict
    tail: tuple


class _BackwardPlan(NamedTuple):
    generation: int  #: ``configs.generation()`` when it was made
    variant: object  #: the backward row ``_pick`` chose
    cfg: object  #: its tile
    flags: dict  #: the launch's flags (a torch row is run by ``_backward_with`` from them)
    common: dict  #: FP64 / EMULATE_BF16 / PRECISION / INT64
    dz: Optional[_Step]  #: the dZ pass (None: none runs)
    db_rows: int  #: rows of db's partial sums written by the dZ pass (0: db is not summed there)
    gemm: Optional[_Step]  #: the GEMM launch (None: none runs — the dZ pass did all that was asked)
    gemm_reads_saved: bool  #: the GEMM's activation slot is ``saved`` (the prologue design), else its operand


def _backward_signature(grad_y, x, weight, saved, dx, dw, act, need, accumulate):
    """What a backward launch is planned by: every operand's and output's shape (through grad_y's and K),
    strides and 16-byte alignment (None: the tensor is not passed), dtype, device, activation, which
    gradients are asked for and which are added into the caller's buffers, the fp32 precision setting, the
    interpreter mode and FUSEDAD_AUTOTUNE. None where no plan may be used (a forced backward or dZ row,
    ``force_int64``)."""
    if _FORCED_INT64 or variants.forced("bwd") is not None or variants.forced("dz") is not None:
        return None
    ref = x if x is not None else weight
    return ("bwd", grad_y.shape, None if ref is None else ref.shape[1], grad_y.dtype, grad_y.get_device(),
            act.kernel_id, need, accumulate, _layout(grad_y), _layout(x), _layout(weight), _layout(saved),
            _layout(dx), _layout(dw), dot_precision(grad_y.dtype), INTERPRETER, configs.autotune_setting())


def _layout(t):
    return None if t is None else (t.stride(), t.data_ptr() % 16)


def _remember_backward(signature, variant, cfg, problem, common, steps):
    _keep(signature, _BackwardPlan(configs.generation(), variant, cfg, problem.flags, common, *steps))


def _run_backward_plan(plan, grad_y, x, weight, saved, act, dx, dw, db, ref, K):
    """The launches ``plan`` holds, on this call's tensors (outputs already allocated)."""
    _check_not_jit_tracing(plan.variant)
    device = grad_y.device
    if plan.variant.is_torch:  # (rows of several launches are never planned)
        M, N = grad_y.shape
        problem = variants.Problem(M, N, K, ref.dtype, (grad_y, x, weight, saved, dx, dw, db), plan.flags)
        _backward_with(plan.variant, plan.cfg, problem, act, plan.common, None, True)
        return
    operand = grad_y
    if plan.dz is not None:
        db_in_pass = db if plan.db_rows else None
        operand = _dz_out(grad_y, act)
        partial, tensors = _dz_operands(grad_y, saved, act, operand, db_in_pass, plan.db_rows, plan.common["FP64"])
        _launch_kernel(plan.dz.variant, plan.dz.grid, tensors + plan.dz.tail, plan.dz.kwargs, None, device, True)
        if db_in_pass is not None:
            _sum_partials(partial, db)
    step = plan.gemm
    if step is not None:
        s = saved if plan.gemm_reads_saved else operand
        _launch_kernel(step.variant, step.grid, _gemm_operands(operand, x, weight, s, dx, dw, db, ref) + step.tail,
                       step.kwargs, None, device, True)


def linear_forward(x, weight, bias=None, activation=None, store_preact=False,
                   x_tangent=None, weight_tangent=None, bias_tangent=None, store_preact_tangent=False, wrap=None):
    """``y = act(x·weightᵀ + bias)`` in one kernel; optionally forward-mode tangents in the same pass.

    Args:
        x: (M, K); weight: (N, K); bias: (N,) or None — one floating dtype, one device.
        activation: a name of the activation table (None, "relu", …) or its row.
        store_preact: also return ``z = x·weightᵀ + bias`` (what a backward of gelu/silu needs).
        x_tangent, weight_tangent, bias_tangent: Ẋ (M, K), Ẇ (N, K), ḃ (N,), each optional.
        store_preact_tangent: also return ``ż`` when tangents are given.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op`` (see ``_launch``).
    Returns:
        (y, z, y_tangent, z_tangent): y (M, N); the others (M, N) or None.
    """
    act = lookup(activation)
    M, K = x.shape
    N = weight.shape[0]
    tangent = x_tangent is not None or weight_tangent is not None or bias_tangent is not None
    y = _alloc((M, N), x)
    z = _alloc((M, N), x) if store_preact else None
    yt = _alloc((M, N), x) if tangent else None
    zt = _alloc((M, N), x) if tangent and store_preact_tangent else None
    if M == 0 or N == 0:
        return y, z, yt, zt
    # Unused pointer slots get a real tensor (never dereferenced: their constexpr flag is off).
    args = (x, weight, _or(bias, y), y, _or(z, y))
    strides = (*x.stride(), *weight.stride(), *_strides(bias, 1)[:1], *y.stride(), *_strides(z, 2))
    signature = None if tangent or wrap is not None else _forward_signature(x, weight, bias, act, strides)
    plan = _current_plan(signature)
    if plan is not None:
        problem = (None if plan.one_kernel else
                   variants.Problem(M, N, K, x.dtype, (x, weight, bias, y, z) + _NO_TANGENTS, plan.flags))
        _run_plan(plan, (*args, M, N, K, *strides), x.device, problem)
        return y, z, yt, zt
    tensors = (x, weight, bias, y, z, x_tangent, weight_tangent, bias_tangent, yt, zt)
    flags = dict(ACT=act.kernel_id, HAS_BIAS=bias is not None, STORE_Z=z is not None,
                 **_common_flags(x.dtype, *tensors))
    if tangent:
        flags.update(HAS_XT=x_tangent is not None, HAS_WT=weight_tangent is not None,
                     HAS_BT=bias_tangent is not None, STORE_ZT=zt is not None, DACT_FROM_Y=act.saves == "y")
        args += (_or(x_tangent, x), _or(weight_tangent, weight), _or(bias_tangent, y), yt, _or(zt, y))
        strides += (*_strides(x_tangent, 2), *_strides(weight_tangent, 2), *_strides(bias_tangent, 1)[:1],
                    *yt.stride(), *_strides(zt, 2))
    _launch("fwd_tangent" if tangent else "fwd", (*args, M, N, K, *strides), flags, M, N, K, x.dtype, x.device,
            tensors, wrap, signature=signature)
    return y, z, yt, zt


def linear_backward(grad_y, x, weight, saved, activation=None,
                    need_x=True, need_weight=True, need_bias=False, wrap=None, weight_grad_out=None,
                    input_grad_out=None):
    """dZ = dY ⊙ act'(saved);  dX = dZ·W,  dW = dZᵀ·X,  db = Σ_rows dZ — one launch for all requested.

    Args:
        grad_y: (M, N); x: (M, K) (None if not need_weight); weight: (N, K) (None if not need_x);
        saved: (M, N) — what the activation table says act' reads (y for relu, z for the others);
        None without activation.
        weight_grad_out: (N, K), e.g. an fp32 ``main_grad``: dW is *added* into it in the kernel's
        epilogue and it is returned as grad_w (no separate dW buffer, no extra pass).
        input_grad_out: (M, K), the same for dX (the LM head sums dX over class chunks in fp32).
    Returns:
        (grad_x (M, K) or None, grad_w (N, K) or None, grad_b (N,) or None)
    """
    act = lookup(activation)
    M, N = grad_y.shape
    # The tensor that gives K and the output dtype/device (neither x nor weight is kept for db alone).
    ref = x if x is not None else weight if weight is not None else grad_y
    K = ref.shape[1] if ref is not grad_y else 0
    accumulate = need_weight and weight_grad_out is not None
    accumulate_dx = need_x and input_grad_out is not None
    for name, out, shape in (("weight_grad_out", weight_grad_out if accumulate else None, (N, K)),
                             ("input_grad_out", input_grad_out if accumulate_dx else None, (M, K))):
        assert out is None or (out.shape == shape and out.device == ref.device), (
            f"{name} must be {shape} on {ref.device}, got {tuple(out.shape)} on {out.device}")
    dx = input_grad_out if accumulate_dx else (_alloc((M, K), ref) if need_x else None)
    dw = weight_grad_out if accumulate else (_alloc((N, K), ref) if need_weight else None)
    db = _alloc((N,), ref) if need_bias else None
    compute_dx = need_x and M > 0 and K > 0
    compute_dw = need_weight and N > 0 and K > 0
    compute_db = need_bias and N > 0
    if not (compute_dx or compute_dw or compute_db):
        return dx, dw, db
    if need_x and not compute_dx and not accumulate_dx:
        dx.zero_()
    if need_weight and not compute_dw and not accumulate:
        dw.zero_()
    signature = None if wrap is not None else _backward_signature(
        grad_y, x, weight, saved, dx, dw, act, (need_x, need_weight, need_bias), (accumulate, accumulate_dx))
    plan = _current_plan(signature)
    if plan is not None:
        _run_backward_plan(plan, grad_y, x, weight, saved, act, dx, dw, db, ref, K)
        return dx, dw, db
    tensors = (grad_y, x, weight, saved, dx, dw, db)
    common = _common_flags(ref.dtype, *tensors[:6])
    flags = dict(COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
                 ACCUMULATE_DX=accumulate_dx and compute_dx, ACCUMULATE_DW=accumulate and compute_dw,
                 ACT=act.kernel_id, **common)
    problem = variants.Problem(M, N, K, ref.dtype, tensors, flags)
    # The whole backward (a dZ pass and its GEMMs, or one prologue launch, or torch's mm) is what the
    # tuner compares: each candidate is timed end to end.
    variant, cfg = _pick("bwd", problem, ref.device, wrap is not None,
                         lambda v, c: _backward_with(v, c, problem, act, common, wrap=None, record=False))
    steps = _backward_with(variant, cfg, problem, act, common, wrap, record=True)
    if signature is not None and steps is not None:
        _remember_backward(signature, variant, cfg, problem, common, steps)
    return dx, dw, db


_TORCH_STEPS = (None, 0, None, False)  # torch's row: a plan runs it through _backward_with


def _backward_with(variant, cfg, problem, act, common, wrap, record):
    """Run the backward ``problem`` (outputs in its tensors) with one row of the table and its config.
    Returns what a plan replays: (dZ pass step or None, db partial rows, GEMM step or None, whether the
    GEMM's activation slot is ``saved``); _TORCH_STEPS for torch's row; None for a row of several
    launches (not planned)."""
    if variant.is_torch:
        _run(variant, cfg, problem, (), problem.flags, wrap, problem.tensors[0].device, record)
        return _TORCH_STEPS
    grad_y, x, weight, saved, dx, dw, db = problem.tensors
    M, N, K = problem.M, problem.N, problem.K
    ref = x if x is not None else weight if weight is not None else grad_y
    gradients = {k: problem.flags[k] for k in ("COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB", "ACCUMULATE_DX",
                                               "ACCUMULATE_DW")}
    compute_db = gradients["COMPUTE_DB"]
    operand, prologue_act, dz_step, db_rows = grad_y, act, None, 0
    if variant.dz_pass and (act.saves is not None or compute_db):
        # dZ (and db) once per element; the GEMMs below then read dZ as plain operands.
        operand, dz_step, db_rows = _dz_pass(grad_y, saved, act, db if compute_db else None, common, wrap, record)
        prologue_act, gradients["COMPUTE_DB"] = lookup(None), False
        if not (gradients["COMPUTE_DX"] or gradients["COMPUTE_DW"]):
            return dz_step, db_rows, None, False
    s = saved if prologue_act.saves is not None else operand
    args = (
        *_gemm_operands(operand, x, weight, s, dx, dw, db, ref),
        M, N, K,
        *operand.stride(), *_strides(x, 2), *_strides(weight, 2), *s.stride(),
        *_strides(dx, 2), *_strides(dw, 2), *_strides(db, 1)[:1],
    )
    # Both products share one config (one launch); the autotune key holds all of M, N, K.
    flags = dict(gradients, ACT=prologue_act.kernel_id, **common)
    if variant.launch is not None:
        _launch("bwd", args, flags, M, N, K, ref.dtype, ref.device, problem.tensors, wrap, variant, cfg, record)
        return None
    gemm = _launch_one_row(variant, cfg, variants.Problem(M, N, K, ref.dtype, problem.tensors, flags), args, flags,
                           7, wrap, ref.device, record)
    return dz_step, db_rows, gemm, prologue_act.saves is not None


def _launch_one_row(variant, cfg, problem, args, flags, n_tensors, wrap, device, record):
    """Launch a single-kernel row with its tile; -> the _Step a plan replays (args[n_tensors:] its tail)."""
    _check_not_jit_tracing(variant)
    step = _Step(variant, variant.grid(problem, cfg), dict(flags, **variant.flags, **_kwargs(cfg)), args[n_tensors:])
    _launch_kernel(variant, step.grid, args, step.kwargs, wrap, device, record)
    return step


def _dz_pass(grad_y, saved, act, db, common, wrap, record=True):
    """One elementwise launch: dZ = dY ⊙ act'(saved) in dY's dtype and, if ``db`` is given, db = Σ_rows dZ
    written into it. db's per-row-block partial sums are fp32 (fp64 for fp64) and added in a fixed order:
    deterministic, no atomics. -> (dZ (dY itself without an activation), its launch's _Step, the rows of
    db's partial sums (0: no db))."""
    M, N = grad_y.shape
    write_dz = act.saves is not None
    dz = _dz_out(grad_y, act)
    flags = dict(ACT=act.kernel_id, WRITE_DZ=write_dz, COMPUTE_DB=db is not None,
                 FP64=common["FP64"], EMULATE_BF16=common["EMULATE_BF16"], INT64=common["INT64"])
    problem = variants.Problem(M, N, 0, grad_y.dtype, (grad_y, saved, dz), flags)
    variant = variants.select("dz", problem)
    # One fixed tile (nothing to tune in an elementwise pass): it also sets the rows of db's partial sums.
    cfg = variants.heuristic_config(variant, M, N, 0, grad_y.dtype)
    partial, tensors = _dz_operands(grad_y, saved, act, dz, db, cdiv(M, cfg.BLOCK_M), common["FP64"])
    args = (*tensors, M, N, *grad_y.stride(), *tensors[1].stride(), *dz.stride(), partial.stride(0))
    step = _launch_one_row(variant, cfg, problem, args, flags, 4, wrap, grad_y.device, record)
    if db is not None:
        _sum_partials(partial, db)
    return dz, step, partial.shape[0] if db is not None else 0


def _dz_out(grad_y, act):
    """dZ's buffer: a fresh (M, N) in dY's dtype, or dY itself without an activation (nothing to write)."""
    return _alloc(grad_y.shape, grad_y) if act.saves is not None else grad_y


def _dz_operands(grad_y, saved, act, dz, db, rows, fp64):
    """-> (db's partial-sum buffer (dz's slot when no db), the dZ kernel's tensor arguments in order)."""
    partial = _db_partials(db, rows, fp64) if db is not None else dz
    return partial, (grad_y, saved if act.saves is not None else grad_y, dz, partial)


def _gemm_operands(operand, x, weight, s, dx, dw, db, ref):
    """The backward GEMM kernel's tensor arguments in order; ``ref`` fills the slots of absent tensors
    (never read: their COMPUTE_* flag is off)."""
    return operand, _or(x, ref), _or(weight, ref), s, _or(dx, ref), _or(dw, ref), _or(db, ref)


def _db_partials(db, rows, fp64):
    """The dZ pass's buffer for db's per-row-block partial sums: (rows, N) in fp32 (fp64 for fp64) — or db
    itself seen as one row, where one block covers every row and db has the sums' dtype (nothing to add:
    no buffer, no reduction launched after the pass)."""
    acc = torch.float64 if fp64 else torch.float32
    if rows == 1 and db.dtype == acc:
        return db.unsqueeze(0)
    return db.new_empty((rows, db.shape[0]), dtype=acc)


def _sum_partials(partial, db):
    """db = Σ_rows partial, in a fixed order, rounded once to db's dtype (one launch where it can be)."""
    if partial.data_ptr() == db.data_ptr():
        return  # the pass wrote db itself
    if partial.dtype == db.dtype:
        torch.sum(partial, 0, out=db)
    elif partial.shape[0] == 1:
        db.copy_(partial[0])
    else:  # (sum with out= of another dtype is not this: torch 2.13 CPU gave 1.1250 in bf16 for a 3-row
        # fp32 sum of 1.1324, i.e. it did not round once from fp32)
        db.copy_(partial.sum(0))


def _or(t, default):
    return t if t is not None else default


__all__ = ["linear_forward", "linear_backward", "record_launches", "Launch", "INTERPRETER",
           "needs_int64", "force_int64", "dot_precision"]

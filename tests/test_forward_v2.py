"""Forward v2: the TMA-descriptor, persistent, warp-specialised and split-K decode variants of the
kernel-variant table, each forced with ``variants.use`` against fp64 and eager references; which layouts
fall back to the pointer kernel; the decode path's split plan and determinism.

On a CPU-only machine these run through Triton's interpreter (which implements tensor descriptors), with
``variants.INTERPRETER_SMS`` programs standing in for the SMs of a persistent grid.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from conftest import ACTS, DEVICES, assert_matches, randn, runs_kernels
from fusedad.kernels import force_int64, linear_forward, record_launches, variants

pytestmark = pytest.mark.parametrize("device", DEVICES)

FWD_VARIANTS = [v.name for v in variants.VARIANTS if v.direction == "fwd" and v.applies is not variants._never]
TMA_VARIANTS = [n for n in FWD_VARIANTS if "tma" in n]


def _needs_kernels(device):
    if not runs_kernels(device):
        pytest.skip(f"fusedad runs the eager path on {device} here (no interpreter, no GPU kernels)")


def _shape(variant):
    """(M, N, K): none a multiple of the interpreter's 64-wide tiles, several K blocks, several tiles
    (so each persistent program loops over more than one), 16-byte-aligned rows for TMA; decode rows
    for the split-K path, whose K then spans several splits of several K blocks."""
    if variant == "linear_fwd_splitk":
        return 13, 72, 328
    return 70, 72, 136


def _run(variant, x, w, b, act, store_z=True):
    with variants.use(variant), record_launches() as log:
        y, z, _, _ = linear_forward(x, w, b, act, store_preact=store_z)
    return y, z, [launch.kernel for launch in log]


def _expected_kernels(variant):
    return ["linear_fwd_splitk", "linear_fwd_splitk_reduce"] if variant == "linear_fwd_splitk" else [variant]


def _check(x, w, b, act, y, z):
    z64 = F.linear(*(t.double() if t is not None else None for t in (x, w, b)))
    zref = F.linear(x, w, b)
    from fusedad.activations import lookup
    act_row = lookup(act)
    assert_matches(y, act_row.apply(z64), act_row.apply(zref), f"y {act}")
    if z is not None:
        assert_matches(z, z64, zref, "z")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", FWD_VARIANTS)
def test_every_variant_every_activation(device, variant, act):
    _needs_kernels(device)
    M, N, K = _shape(variant)
    x, w, b = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K), (N,)))
    y, z, kernels = _run(variant, x, w, b, act)
    assert kernels == _expected_kernels(variant)
    _check(x, w, b, act, y, z)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", FWD_VARIANTS)
def test_every_variant_dtypes_without_bias(device, variant, dtype):
    _needs_kernels(device)
    M, N, K = _shape(variant)
    x, w = (randn(*s, dtype=dtype, device=device) for s in ((M, K), (N, K)))
    y, z, kernels = _run(variant, x, w, None, "relu", store_z=False)
    assert kernels == _expected_kernels(variant) and z is None
    _check(x, w, None, "relu", y, None)


def _misaligned(device, how, dtype=torch.bfloat16):
    """x, w for which no tensor descriptor exists (K-strided, unaligned base or row stride)."""
    M, N, K = 20, 24, 40
    if how == "transposed":
        return randn(K, M, dtype=dtype, device=device).t(), randn(N, K, dtype=dtype, device=device)
    if how == "offset":  # base address 2 bytes past a 16-byte boundary
        return randn(M * K + 1, dtype=dtype, device=device)[1:].view(M, K), randn(N, K, dtype=dtype, device=device)
    if how == "row_stride":  # K = 36 bf16 elements: 72-byte rows
        return randn(M, 36, dtype=dtype, device=device), randn(N, 36, dtype=dtype, device=device)
    if how == "int64":
        return randn(M, K, dtype=dtype, device=device), randn(N, K, dtype=dtype, device=device)
    # fp64: no TMA variant for 8-byte elements
    return randn(M, K, dtype=torch.float64, device=device), randn(N, K, dtype=torch.float64, device=device)


@pytest.mark.parametrize("how", ["transposed", "offset", "row_stride", "int64", "fp64"])
@pytest.mark.parametrize("variant", TMA_VARIANTS + [None])
def test_layouts_tma_cannot_address_take_the_pointer_kernel(device, how, variant):
    """A forced TMA variant (or the default choice) on such operands runs the v1 pointer kernel, and
    right; the same operands made contiguous and aligned do run the TMA kernel."""
    _needs_kernels(device)
    x, w = _misaligned(device, how)
    b = randn(w.shape[0], dtype=x.dtype, device=device)
    forced = variants.use(variant) if variant else contextlib.nullcontext()
    with forced, record_launches() as log:
        if how == "int64":
            with force_int64():
                y, z, _, _ = linear_forward(x, w, b, "silu", store_preact=True)
        else:
            y, z, _, _ = linear_forward(x, w, b, "silu", store_preact=True)
    assert [launch.kernel for launch in log] == ["linear_fwd"]
    _check(x, w, b, "silu", y, z)
    if variant and how != "fp64" and how != "int64":
        x2, w2 = randn(20, 40, dtype=x.dtype, device=device), randn(24, 40, dtype=x.dtype, device=device)
        y, z, kernels = _run(variant, x2, w2, b, "silu")
        assert kernels == [variant]
        _check(x2, w2, b, "silu", y, z)


@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_rows_share_one_kernel_and_pass_their_warp_specialize_flag(device, variant):
    """The three TMA rows launch one kernel; the row's WARP_SPECIALIZE (on for linear_fwd_tma_ws only,
    ``Variant.flags``) is passed beside the call's flags. (Whether the flag specialises the compiled
    kernel is for tests/test_sm90_compile.py: setmaxnreg.)"""
    _needs_kernels(device)
    row = variants.by_name(variant)
    assert row.kernel is variants.by_name("linear_fwd_tma").kernel
    M, N, K = _shape(variant)
    x, w, b = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K), (N,)))
    with variants.use(variant), record_launches() as log:
        y, z, _, _ = linear_forward(x, w, b, "relu", store_preact=True)
    (launch,) = log
    assert launch.kernel == variant and launch.flags["WARP_SPECIALIZE"] is (variant == "linear_fwd_tma_ws")
    assert all(a is t for a, t in zip(launch.args, (x, w, b, y, z)))
    _check(x, w, b, "relu", y, z)


def test_default_choice(device):
    """Without ``use``: M ≤ 16 takes the split-K decode path (any layout) where its plan has at least
    two splits (K = 328: several K blocks; K = 40 is one), everything else the pointer kernel.
    (The TMA kernels are not a default: none has run on a GPU; the autotuner may still pick them by
    timing.)"""
    _needs_kernels(device)
    cases = [((16, 328), (24, 328), ["linear_fwd_splitk", "linear_fwd_splitk_reduce"]),
             ((16, 40), (24, 40), ["linear_fwd"]),
             ((17, 40), (24, 40), ["linear_fwd"]),
             ((17, 36), (24, 36), ["linear_fwd"])]
    for xs, ws, expected in cases:
        x, w = randn(*xs, dtype=torch.bfloat16, device=device), randn(*ws, dtype=torch.bfloat16, device=device)
        with record_launches() as log:
            y, _, _, _ = linear_forward(x, w, None, "gelu")
        assert [launch.kernel for launch in log] == expected, (xs, ws)
        _check(x, w, None, "gelu", y, None)


@pytest.mark.parametrize("M", [1, 16])
def test_decode_split_k_is_deterministic_and_spans_several_splits(device, M):
    _needs_kernels(device)
    N, K = 40, 328
    x = randn(M, K, dtype=torch.bfloat16, device=device)[:, :]
    w = randn(K, N, dtype=torch.bfloat16, device=device).t()  # a transposed weight: the pointer loads take any strides
    b = randn(N, dtype=torch.bfloat16, device=device)
    with record_launches() as log:
        y1, z1, _, _ = linear_forward(x, w, b, "gelu_tanh", store_preact=True)
    split, reduce = log
    assert (split.kernel, reduce.kernel) == ("linear_fwd_splitk", "linear_fwd_splitk_reduce")
    splits = split.grid[1]
    k_split = split.args[-1]
    block_k = split.flags["BLOCK_K"]
    assert splits >= 2 and k_split >= 2 * block_k and (splits - 1) * k_split < K <= splits * k_split
    assert reduce.args[-1] == splits
    _check(x, w, b, "gelu_tanh", y1, z1)
    y2, z2, _, _ = linear_forward(x, w, b, "gelu_tanh", store_preact=True)
    assert torch.equal(y1, y2) and torch.equal(z1, z2)  # bitwise: a fixed reduction order, no atomics


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_single_split_is_one_launch_without_scratch(device, forced, dtype):
    """Where the decode plan has one split (here: K within one BLOCK_K) the split-K row does not apply,
    even when forced: the pointer kernel runs once — no partial-sum buffer, no reduction launch — with
    the whole epilogue (bias, z, activation), on a 16-row tile."""
    _needs_kernels(device)
    M, N, K = 7, 72, 40
    x = randn(M, K, dtype=dtype, device=device)
    w = randn(K, N, dtype=dtype, device=device).t()  # any strides, as the split-K row takes
    b = randn(N, dtype=dtype, device=device)
    problem = variants.Problem(M, N, K, dtype, (x, w, b, torch.empty(M, N, dtype=dtype, device=device), None), {})
    assert not variants.by_name("linear_fwd_splitk").applies(problem)
    allocated = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        allocated.append(tuple(out.shape))
        return out

    import unittest.mock
    with (variants.use("linear_fwd_splitk") if forced else contextlib.nullcontext()), record_launches() as log, \
            unittest.mock.patch.object(torch, "empty", counting_empty):
        y, z, _, _ = linear_forward(x, w, b, "gelu", store_preact=True)
    (launch,) = log
    assert launch.kernel == "linear_fwd" and launch.grid == (-(-N // launch.flags["BLOCK_N"]),)
    assert launch.flags["BLOCK_M"] == 16
    assert all(a is t for a, t in zip(launch.args, (x, w, b, y, z)))
    assert not any(len(shape) == 3 for shape in allocated), allocated  # no (splits, M, N) scratch
    _check(x, w, b, "gelu", y, z)


def test_split_plan_keeps_two_waves(device):
    """On an H100-sized GPU (132 SMs) the decode shapes of the benchmark get ≥ 2 waves of CTAs, whole
    K blocks per split, and no empty split."""
    from fusedad.kernels import configs

    class P:  # what splitk_plan reads
        def __init__(self, M, N, K):
            self.M, self.N, self.K = M, N, K

    import unittest.mock
    with unittest.mock.patch.object(variants, "num_sms", lambda p: 132):
        for M, N, K in [(1, 8192, 8192), (16, 8192, 8192), (1, 4096, 14336), (16, 14336, 4096), (1, 64, 64)]:
            cfg = configs.decode_candidates(M, N, K, torch.bfloat16)[0]
            splits, k_split = variants.splitk_plan(P(M, N, K), cfg)
            n_tiles = -(-N // cfg.BLOCK_N)
            k_blocks = -(-K // cfg.BLOCK_K)
            assert k_split % cfg.BLOCK_K == 0 and (splits - 1) * k_split < K <= splits * k_split
            assert n_tiles * splits >= 2 * 132 or splits == k_blocks, (M, N, K, splits)


def test_inside_torch_compile_no_descriptor_kernel_is_chosen(device):
    """``wrap`` (set inside a torch.compile trace) leaves out the kernels that build descriptors in-kernel."""
    _needs_kernels(device)
    x, w = randn(20, 40, dtype=torch.bfloat16, device=device), randn(24, 40, dtype=torch.bfloat16, device=device)
    for forced in (contextlib.nullcontext(), variants.use("linear_fwd_tma_persistent")):
        with forced, record_launches() as log:
            y, _, _, _ = linear_forward(x, w, None, "relu", wrap=lambda kernel: kernel)
        assert [launch.kernel for launch in log] == ["linear_fwd"]
        _check(x, w, None, "relu", y, None)


def test_descriptor_allocator_is_set_per_context_and_a_users_is_kept(device):
    import contextvars

    import triton
    from triton.runtime import _allocation

    from fusedad.kernels import linear

    def fresh(fn):
        ctx = contextvars.Context()  # what a new thread starts with: no allocator
        return ctx.run(fn)

    def ours():
        linear._ensure_allocator()
        return _allocation._allocator.get()

    assert fresh(ours) is linear._descriptor_scratch

    def users():
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        linear._ensure_allocator()
        return _allocation._allocator.get() is mine

    assert fresh(users)


@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_subtiled_epilogue_at_a_128_wide_tile(device, variant, monkeypatch):
    """Tiles ≥ 128 columns wide store Y and Z in two TMA column halves (whole tiles when warp-specialised);
    the interpreter's own tiles are at most 64 wide, so this test runs a 128-wide one (the last N tile
    partly out of bounds)."""
    _needs_kernels(device)
    if device != "cpu":
        pytest.skip("the interpreter's tile is replaced here; on CUDA the tuned tiles include 128-wide ones")
    from fusedad.kernels import configs

    monkeypatch.setattr(configs, "interpreter_config", lambda M, N, K: configs.TileConfig(
        BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1))
    M, N, K = 40, 200, 72
    x, w, b = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K), (N,)))
    y, z, kernels = _run(variant, x, w, b, "gelu")
    assert kernels == [variant]
    _check(x, w, b, "gelu", y, z)


@pytest.mark.parametrize("bias", ["broadcast", "sliced"])
@pytest.mark.parametrize("variant", TMA_VARIANTS)
def test_tma_variants_read_the_bias_through_its_stride(device, variant, bias):
    """The descriptor kernels load the bias with its own stride, like the pointer kernel: a bias that
    F.linear broadcasts from () or (1,) (stride 0) and a sliced one (stride 2), beside aligned x and w, so
    the TMA kernel runs (forced; for the broadcast one also through fusedad.linear with a 0-d bias, as a
    user passes one)."""
    _needs_kernels(device)
    M, N, K = _shape("linear_fwd_tma")
    x, w = (randn(*s, dtype=torch.bfloat16, device=device) for s in ((M, K), (N, K)))
    if bias == "broadcast":
        b = randn(1, dtype=torch.bfloat16, device=device).expand(N)
    else:
        b = randn(2 * N, dtype=torch.bfloat16, device=device)[::2]
    with variants.use(variant), record_launches() as log:
        y, z, _, _ = linear_forward(x, w, b, "gelu", store_preact=True)
    assert [launch.kernel for launch in log] == [variant]
    _check(x, w, b, "gelu", y, z)
    if bias == "broadcast":
        import fusedad

        b0 = b[:1].reshape(())
        with variants.use(variant), record_launches() as log:
            y = fusedad.linear(x, w, b0, "gelu")
        assert [launch.kernel for launch in log] == [variant]
        _check(x, w, b0.expand(N), "gelu", y, None)

"""Fused linear + cross-entropy (the LM head): semantics against PyTorch, gradients, the kernels' launches.

Shapes are small (the Triton interpreter runs every block op in numpy); the interpreter tiles are 16 wide,
so V = 37 spans three class tiles, the last one partial. Every test here runs the backward over chunks of 32
classes (the ``chunks`` fixture): V = 37 takes two, the first of two class tiles, the second of one partial
tile, so the dX sum over chunks and the chunk offsets are exercised everywhere; ``test_one_chunk_by_default``
checks the default chunk size.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedad
from fusedad.kernels import cross_entropy as lce_kernels
from fusedad.kernels import force_int64, record_launches
from fusedad.testing import assert_matches

from conftest import randn, runs_kernels

lce = fusedad.functional.linear_cross_entropy
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch.nn.functional.linear_cross_entropy needs "
                                                                "PyTorch >= 2.13")
needs_kernels = pytest.mark.skipif(not runs_kernels("cpu") and not torch.cuda.is_available(),
                                   reason="no Triton kernels here (neither the interpreter nor a GPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, K, V = 13, 16, 37
CHUNK = 32


@pytest.fixture(autouse=True)
def chunks(monkeypatch):
    """Backward chunks of CHUNK classes (the default would put these small heads in one chunk)."""
    monkeypatch.setattr(lce_kernels, "CHUNK_BYTES", 0)
    monkeypatch.setattr(lce_kernels, "MIN_CHUNK_CLASSES", CHUNK)


def ref_loss(x, w, t, b=None, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0, softcap=None,
             z_loss=0.0):
    """cross_entropy(linear(...)) with PyTorch's own ops, plus the extensions written out."""
    z = F.linear(x, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t, weight=weight, reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)
    if z_loss:
        counted = t != ignore_index
        zl = torch.where(counted, z_loss * torch.logsumexp(z, -1) ** 2, 0)
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            den = weight[t[counted]].sum() if weight is not None else counted.sum()
            loss = loss + zl.sum() / den
    return loss


def make(dtype=torch.float32, m=M, k=K, v=V, bias=True, device=DEVICE, ignored=()):
    x = randn(m, k, dtype=dtype, device=device, requires_grad=True)
    w = randn(v, k, dtype=dtype, device=device, requires_grad=True, scale=0.5)
    b = randn(v, dtype=dtype, device=device, requires_grad=True) if bias else None
    t = torch.randint(0, v, (m,), device=device)
    for i in ignored:
        t[i] = -100
    return x, w, b, t


def check(x, w, b, t, what="", **kw):
    """Loss and every gradient vs float64 and eager references under the tolerance rule."""
    leaves = [u for u in (x, w, b) if u is not None]
    cw = kw.pop("weight", None)
    out = lce(x, w, t, linear_bias=b, weight=cw, **kw)
    dy = randn(*out.shape, dtype=out.dtype, device=out.device)
    as64 = [u.detach().double().requires_grad_() for u in leaves]
    ase = [u.detach().clone().requires_grad_() for u in leaves]
    r64 = ref_loss(*as64[:2], t, as64[2] if b is not None else None,
                   weight=None if cw is None else cw.double(), **kw)
    re = ref_loss(*ase[:2], t, ase[2] if b is not None else None, weight=cw, **kw)
    assert out.dtype == x.dtype and out.shape == re.shape
    assert_matches(out, r64, re, f"loss {what}")
    grads = torch.autograd.grad(out, leaves, dy)
    g64 = torch.autograd.grad(r64, as64, dy.double())
    ge = torch.autograd.grad(re, ase, dy)
    for name, g, r, e in zip(("input", "weight", "bias"), grads, g64, ge):
        assert g.dtype == x.dtype
        assert_matches(g, r, e, f"grad of {name} {what}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_eager_each_dtype(dtype):
    # 20 rows: two row tiles; K = 40: three K tiles of the GEMM and of dX/dW's columns, the last partial
    check(*make(dtype, m=20, k=40, ignored=(2,)), what=str(dtype))


@pytest.mark.parametrize("kw", [
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight="rand"),
    dict(weight="rand", reduction="none"),
    dict(label_smoothing=0.2),
    dict(label_smoothing=0.1, weight="rand"),
    dict(softcap=2.0),
    dict(z_loss=1e-2, weight="rand"),
    dict(softcap=3.0, z_loss=1e-3, label_smoothing=0.1, reduction="sum"),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_options(kw):
    kw = dict(kw)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(V, device=DEVICE) + 0.1
    check(*make(ignored=(0, 5)), what=str(kw), **kw)


def test_without_bias_and_tiny_v():
    check(*make(bias=False, v=5, m=3))


def test_non_contiguous_input_and_weight():
    xt = randn(K, M, requires_grad=True, device=DEVICE)
    wt = randn(K, V, requires_grad=True, device=DEVICE, scale=0.5)
    t = torch.randint(0, V, (M,), device=DEVICE)
    out = lce(xt.t(), wt.t(), t)
    ref = ref_loss(xt.t().double(), wt.t().double(), t)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(out, (xt, wt))
    gr = torch.autograd.grad(ref, (xt, wt))
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r.float(), rtol=1e-4, atol=1e-6)


def test_3d_input_and_1d_input():
    x = randn(2, 5, K, requires_grad=True, device=DEVICE)
    w = randn(V, K, device=DEVICE, scale=0.5)
    t = torch.randint(0, V, (2, 5), device=DEVICE)
    t[1, 3] = -100
    out = lce(x, w, t, reduction="none")
    assert out.shape == (2, 5)
    ref = ref_loss(x.reshape(10, K).double(), w.double(), t.reshape(10), reduction="none").reshape(2, 5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    one = lce(x[0, 0], w, t[0, 0], reduction="none")
    assert one.shape == ()
    torch.testing.assert_close(one, out[0, 0])


@needs_torch_lce
@pytest.mark.parametrize("kw", [dict(), dict(reduction="none", label_smoothing=0.1),
                                dict(weight="rand", ignore_index=3, reduction="sum")], ids=str)
def test_matches_torch_linear_cross_entropy(kw):
    kw = dict(kw)
    if kw.get("weight") == "rand":
        kw["weight"] = torch.rand(V, dtype=torch.float64, device=DEVICE) + 0.1
    x, w, b, t = make(torch.float64)
    t[4] = kw.get("ignore_index", -100)
    out = lce(x, w, t, linear_bias=b, **kw)
    ref = F.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(ref.sum(), (x, w, b))):
        torch.testing.assert_close(g, r)


@needs_torch_lce
def test_k_dimensional_weight_matches_torch():
    x = randn(4, K, dtype=torch.float64, requires_grad=True, device=DEVICE)
    w = randn(V, 3, K, dtype=torch.float64, requires_grad=True, device=DEVICE)
    b = randn(V, 3, dtype=torch.float64, requires_grad=True, device=DEVICE)
    t = torch.randint(0, V, (4, 3), device=DEVICE)
    t[0, 1] = -100
    for reduction in ("mean", "none"):
        out = lce(x, w, t, linear_bias=b, reduction=reduction)
        ref = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
        torch.testing.assert_close(out, ref)
        for g, r in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(ref.sum(), (x, w, b))):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction):
    x, w, b, t = make(m=4, ignored=range(4))
    out = lce(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(out, ref, equal_nan=True)  # mean: 0/0 = nan, as torch
    if reduction != "mean":
        for g in torch.autograd.grad(out.sum(), (x, w, b)):
            assert torch.equal(g, torch.zeros_like(g))


def test_custom_ignore_index_and_out_of_range_target():
    x, w, b, t = make()
    t[1] = 7
    out = lce(x, w, t, ignore_index=7, reduction="none")
    assert out[1] == 0 and torch.isfinite(out).all()
    for bad in (V, -1, 10**6):
        t2 = t.clone()
        t2[3] = bad
        with pytest.raises(IndexError, match="out of bounds"):
            lce(x, w, t2)
    with pytest.raises(RuntimeError, match="does not match"):
        lce(x, w, t[:-1])


def test_gradcheck_float64():
    x, w, b, t = make(torch.float64, m=3, k=4, v=5, ignored=(1,))
    cw = torch.rand(5, dtype=torch.float64, device=DEVICE) + 0.5
    for kw in (dict(), dict(weight=cw, label_smoothing=0.3, softcap=2.0, z_loss=0.1)):
        assert torch.autograd.gradcheck(lambda x, w, b: lce(x, w, t, linear_bias=b, **kw), (x, w, b))


def test_gradgradcheck_and_forward_ad():
    """Double backward and forward mode run the composite path (documented): correct, not fused."""
    x, w, b, t = make(torch.float64, m=3, k=4, v=5)
    fn = lambda x, w, b: lce(x, w, t, linear_bias=b, label_smoothing=0.1, softcap=3.0, z_loss=0.1)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    assert torch.autograd.gradcheck(fn, (x, w, b), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, check_batched_grad=False)


def test_torch_func_grad():
    x, w, b, t = make(torch.float64)
    g = torch.func.grad(lambda w: lce(x.detach(), w, t, linear_bias=b.detach()))(w.detach())
    r = torch.autograd.grad(ref_loss(x, w, t, b), w)[0]
    torch.testing.assert_close(g, r)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, t = make(torch.float64)
    fn = torch.compile(lambda x, w, b: lce(x, w, t, linear_bias=b, label_smoothing=0.1), fullgraph=True)
    out = fn(x, w, b)
    ref = ref_loss(x, w, t, b, label_smoothing=0.1)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(out, (x, w, b)), torch.autograd.grad(ref, (x, w, b))):
        torch.testing.assert_close(g, r)


def _kinds(log):
    return [(launch.kernel, launch.flags.get("COMPUTE_DX"), launch.flags.get("COMPUTE_DW")) for launch in log]


@needs_kernels
def test_launches_only_what_is_needed():
    """Per chunk of classes: the dZ pass, then one GEMM launch for the requested products only."""
    x, w, b, t = make(k=40)
    with record_launches() as log:
        loss = lce(x, w, t, linear_bias=b)
        torch.autograd.grad(loss, (x, w, b))
    both = [("lce_dz", None, None), ("linear_bwd", True, True)]
    assert _kinds(log) == [("lce_fwd", None, None)] + both * 2
    assert [launch.flags["WRITE_DZ"] and launch.flags["COMPUTE_DB"] for launch in log[1::2]] == [True, True]
    # frozen weight and bias: no dW product
    with record_launches() as log:
        torch.autograd.grad(lce(x, w.detach(), t, linear_bias=b.detach()), x)
    assert _kinds(log) == [("lce_fwd", None, None)] + [("lce_dz", None, None), ("linear_bwd", True, False)] * 2
    assert not any(launch.flags.get("COMPUTE_DB") for launch in log[1:])
    # an input without grad: no dX product
    with record_launches() as log:
        torch.autograd.grad(lce(x.detach(), w, t), w)
    assert _kinds(log) == [("lce_fwd", None, None)] + [("lce_dz", None, None), ("linear_bwd", False, True)] * 2
    # frozen weight, trainable bias: one dZ pass over all classes that writes no dZ, only db's partial sums
    with record_launches() as log:
        torch.autograd.grad(lce(x.detach(), w.detach(), t, linear_bias=b), b)
    assert _kinds(log) == [("lce_fwd", None, None), ("lce_dz", None, None)]
    assert not log[1].flags["WRITE_DZ"] and log[1].flags["COMPUTE_DB"]
    assert log[1].grid == (-(-M // 16) * -(-V // 16),)  # every logits tile once
    torch.testing.assert_close(torch.autograd.grad(lce(x.detach(), w.detach(), t, linear_bias=b), b)[0],
                               torch.autograd.grad(ref_loss(x.detach(), w.detach(), t, b), b)[0])
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), record_launches() as log:
            lce(x, w, t, linear_bias=b)
        assert [launch.kernel for launch in log] == ["lce_fwd"]


@needs_kernels
def test_each_logits_tile_is_recomputed_once():
    """The backward's logits work is one GEMM: the dZ programs of all chunks cover every (row tile, class tile)
    exactly once, and the dZ kernel's grid is all there is of it (dX and dW are plain GEMM launches)."""
    x, w, b, t = make(k=40)
    with record_launches() as log:
        torch.autograd.grad(lce(x, w, t, linear_bias=b), (x, w))
    dz = [launch for launch in log if launch.kernel == "lce_dz"]
    assert [launch.args[12] for launch in dz] == [CHUNK, V - CHUNK]  # the chunks' widths (V argument)
    assert sum(launch.grid[0] for launch in dz) == -(-M // 16) * (-(-CHUNK // 16) + -(-(V - CHUNK) // 16))
    assert all(launch.kernel in ("lce_fwd", "lce_dz", "linear_bwd") for launch in log)
    assert all(not launch.flags.get("ACT") for launch in log if launch.kernel == "linear_bwd")


@needs_kernels
def test_extra_memory_is_per_row():
    """No launch receives anything the size of the logits: besides the inputs and the gradients (and dX's fp32
    accumulator), every tensor is per row, per class, or the (M, CHUNK) dZ chunk."""
    k = 8  # so that the logits (M·V elements) outsize every input, gradient and the dZ chunk
    x, w, b, t = make(k=k, ignored=(1,))
    largest = max(M * k, V * k, M * CHUNK)
    assert largest < M * V
    with record_launches() as log:
        torch.autograd.grad(lce(x, w, t, linear_bias=b, label_smoothing=0.1), (x, w, b))
    for launch in log:
        for a in launch.args:
            if isinstance(a, torch.Tensor):
                assert a.untyped_storage().nbytes() // a.element_size() <= largest, (launch.kernel, tuple(a.shape))
                if a.dim() == 2 and a.shape[0] == M:
                    assert a.shape[1] in (k, CHUNK, V - CHUNK), (launch.kernel, tuple(a.shape))


def test_chunk_size_rule(monkeypatch):
    monkeypatch.undo()  # the module defaults, not the fixture's
    rule = lce_kernels.chunk_classes
    assert rule(8192, 128256, 2, 128) == 8192  # 128 MiB of bf16 dZ
    assert rule(65536, 128256, 2, 128) == 4096  # at least 4096 classes
    assert rule(16, 128256, 2, 128) == 128256  # small M: one chunk
    assert rule(8192, 50000, 4, 64) == 4096
    assert rule(100, 37, 4, 16) == 37


def test_forward_split_rule():
    rule = lce_kernels.split_count
    cpu = torch.device("cpu")
    assert rule(128, 1002, cpu) == 3  # M=8192 in 64-row tiles: 384 programs
    assert rule(4, 1002, cpu) == 66  # M=256: two waves of 132 SMs from 4 row tiles
    assert rule(1, 3, cpu) == 3  # at most one split per class tile
    assert rule(300, 1002, cpu) == 1


@needs_kernels
def test_forward_splits_the_classes():
    """V = 37 is three class tiles; one row tile: three splits, combined into the same statistics as one."""
    x, w, b, t = make(ignored=(2,))
    with torch.no_grad(), record_launches() as log:
        lse, zt, zs = lce_kernels.lce_forward(x, w, b, t, None, 0.0, True)
    assert log[0].grid == (1, 3)
    z = F.linear(x, w, b).double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)
    valid = t >= 0
    torch.testing.assert_close(zt.double()[valid], z[valid, t[valid]], rtol=1e-6, atol=1e-6)
    assert zt[2] == 0
    torch.testing.assert_close(zs.double(), z.sum(-1), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_forward_one_split_over_several_class_tiles(monkeypatch):
    """Off the interpreter's small shapes every split spans many class tiles: the online max/sum rescaling."""
    monkeypatch.setattr(lce_kernels, "split_count", lambda *_: 1)
    x, w, b, t = make(k=40, ignored=(2,))
    with record_launches() as log:
        check(x, w, b, t, what="one split", label_smoothing=0.1, softcap=3.0)
    assert log[0].kernel == "lce_fwd" and log[0].grid == (1, 1)


def _far_apart_logits(dtype, big_tile, gap):
    """Inputs whose logits in one class tile (``big_tile``: 0 = the first of V = 48's three 16-wide tiles,
    2 = the last) exceed every other logit by about ``gap``, far beyond exp's range (e^88 overflows fp32):
    a running max lost between class tiles or splits turns the sum of exponentials into inf.

    The other tiles sit at −gap, the big one near 0: logits of magnitude L cost p = exp(z − lse) a relative
    error of ≈ L·2⁻²⁴ in fp32 (lse is one rounded fp32 number; eager's log_softmax subtracts the max first),
    which at L = 300 is ≈ 3× eager's dX error — a known limit (docs), not what this test is about."""
    x, w, b, t = make(dtype=dtype, v=48, ignored=(2,))
    with torch.no_grad():
        b.fill_(-gap)
        b[16 * big_tile:16 * (big_tile + 1)] = 0.0
    t[0], t[1] = 16 * big_tile + 3, (16 * big_tile + 20) % 48  # one target in the big tile, one outside it
    return x, w, b, t


@needs_kernels
@pytest.mark.parametrize("softcap", [None, 1000.0])
@pytest.mark.parametrize("splits", ["one split", "a split per class tile"])
@pytest.mark.parametrize("big_tile", [0, 2], ids=["largest first", "largest last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logit_maxima_far_apart_across_class_tiles_and_splits(monkeypatch, dtype, big_tile, splits, softcap):
    """Maxima 300 apart (softcapped at 1000: still ≈ 290 apart), in both orders, within one program's online
    log-sum-exp (one split) and across the splits' logsumexp: loss and gradients as eager and fp64."""
    if splits == "one split":
        monkeypatch.setattr(lce_kernels, "split_count", lambda *_: 1)
    x, w, b, t = _far_apart_logits(dtype, big_tile, 300.0)
    with record_launches() as log:
        check(x, w, b, t, what=f"gap 300 {splits}", softcap=softcap)
    fwd = [launch for launch in log if launch.kernel == "lce_fwd"]
    assert fwd[0].grid[1] == (1 if splits == "one split" else 3)


@needs_kernels
def test_a_one_class_head():
    """V = 1: every logit is its row's maximum; the loss is 0 and every gradient 0, with label smoothing too."""
    x, w, b, t = make(v=1, ignored=(2,))
    t[t != -100] = 0
    out = check(x, w, b, t, what="one class", reduction="sum", label_smoothing=0.1)
    assert out.item() == 0


@needs_kernels
def test_one_chunk_by_default(monkeypatch):
    monkeypatch.undo()
    x, w, b, t = make(k=40)
    with record_launches() as log:
        check(x, w, b, t, what="one chunk")
    assert [launch.kernel for launch in log].count("lce_dz") == 1


@needs_kernels
def test_int64_offsets_and_determinism():
    x, w, b, t = make(ignored=(3,))
    args = dict(linear_bias=b, label_smoothing=0.1, softcap=4.0)
    first = [lce(x, w, t, **args), *torch.autograd.grad(lce(x, w, t, **args), (x, w, b))]
    again = [lce(x, w, t, **args), *torch.autograd.grad(lce(x, w, t, **args), (x, w, b))]
    for a, c in zip(first, again):
        assert torch.equal(a, c)  # fixed-order reductions: bit for bit
    with force_int64(), record_launches() as log:
        wide = [lce(x, w, t, **args), *torch.autograd.grad(lce(x, w, t, **args), (x, w, b))]
    assert log and all(launch.flags["INT64"] for launch in log)
    for a, c in zip(first, wide):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_soft_targets_use_reference_with_one_warning():
    import fusedad.cross_entropy as mod

    mod._warned_soft_targets = False
    x, w, b, _ = make(torch.float64)
    p = torch.softmax(torch.randn(M, V, dtype=torch.float64, device=DEVICE), -1)
    with pytest.warns(UserWarning, match="soft"):
        out = lce(x, w, p, linear_bias=b, label_smoothing=0.1)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(x, w, b), p, label_smoothing=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lce(x, w, p, linear_bias=b)


def test_module_mirrors_torch_and_convert():
    torch.manual_seed(0)
    ours = fusedad.nn.LinearCrossEntropyLoss(K, V, bias=True, weight=torch.rand(V) + 0.1, label_smoothing=0.1)
    assert set(ours.state_dict()) == {"weight", "linear.weight", "linear.bias"}
    x = randn(M, K)
    t = torch.randint(0, V, (M,))
    ref = ref_loss(x.double(), ours.linear.weight.double(), t, ours.linear.bias.double(),
                   weight=ours.weight.double(), label_smoothing=0.1)
    torch.testing.assert_close(ours(x, t).double(), ref, rtol=1e-5, atol=1e-6)
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("torch.nn.LinearCrossEntropyLoss needs PyTorch >= 2.13 (nothing for convert to swap)")
    theirs = torch.nn.LinearCrossEntropyLoss(K, V, bias=True, reduction="sum", ignore_index=2)
    model = torch.nn.ModuleDict({"head": theirs})
    expected = theirs(x, t)
    fusedad.convert(model)
    assert type(model["head"]) is fusedad.nn.LinearCrossEntropyLoss
    assert model["head"].linear.weight is theirs.linear.weight  # shared, not copied
    torch.testing.assert_close(model["head"](x, t), expected, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == {"head.linear.weight", "head.linear.bias"}


def test_kernels_lower_for_hopper():
    """The interpreter accepts code the GPU compiler rejects: lower every LM-head kernel (all flags on) to an
    sm_90 cubin with Triton's real pipeline and ptxas, bf16 (also with int64 offsets), fp32 and fp64."""
    here = os.path.dirname(__file__)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(here, "lce_sm90_compile.py")], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8  # (fwd, dz) x (bf16, bf16 int64, fp32, fp64)
    for row in rows:
        assert row["ok"], row
        assert row["shared"] <= 227 * 1024, row
        if row["name"].startswith(("lce_fwd bfloat16", "lce_dz bfloat16")):
            assert row["wgmma"], row  # bf16 tiles of 64 rows use Hopper's wgmma


@pytest.mark.parametrize("bias, softcap, smoothing", [(False, None, 0.0), (True, 2.0, 0.1)])
def test_eager_backend_backward_creates_no_logits(monkeypatch, bias, softcap, smoothing):
    """CPU without the interpreter (the eager backend): the backward, like the forward statistics, works
    on row chunks — no tensor of M×V elements is created in a training step (a TorchDispatchMode sees every
    op's outputs) — and the loss and gradients equal the fp64 reference."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import importlib

    backend = importlib.import_module("fusedad.backend")  # the module (fusedad.backend is also a function)
    ce = importlib.import_module("fusedad.cross_entropy")

    monkeypatch.setitem(backend._BY_DEVICE_TYPE, ("cpu", False), backend._BACKENDS[backend.EAGER])
    monkeypatch.setattr(ce, "EAGER_CHUNK_LOGITS", 3 * V)  # 3 rows per chunk: 5 chunks of M = 13 rows
    assert fusedad.backend(torch.device("cpu")) == "eager"
    x = randn(M, K, dtype=torch.float64, requires_grad=True)
    w = randn(V, K, dtype=torch.float64, requires_grad=True)
    b = randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, V, (M,))
    t[2] = -100

    sizes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not (func.is_view or func._schema.is_mutable):
                sizes.extend(o.numel() for o in (out if isinstance(out, (tuple, list)) else (out,))
                             if isinstance(o, torch.Tensor) and tuple(o.shape) != (V, K))
            return out

    with Record(), record_launches() as log:
        loss = fusedad.linear_cross_entropy(x, w, t, linear_bias=b, softcap=softcap, label_smoothing=smoothing)
        grads = torch.autograd.grad(loss, [x, w] + ([b] if bias else []))
    assert not log and max(sizes) < M * V
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    br = b.detach().requires_grad_() if bias else None
    z = F.linear(xr, wr, br)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want = F.cross_entropy(z, t, label_smoothing=smoothing)
    torch.testing.assert_close(loss, want)
    for g, r in zip(grads, torch.autograd.grad(want, [xr, wr] + ([br] if bias else []))):
        torch.testing.assert_close(g, r)

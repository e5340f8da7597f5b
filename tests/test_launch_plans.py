"""Launch plans: a repeated forward launch goes from its arguments to the kernel without choosing its
row and tile again (``kernels/linear.py``) — and only while that is what choosing again would give.

Each test runs a launch more than once and checks every run: the answer, the recorded launch (row, grid,
flags), and how often the launcher chose (``_pick``). A plan that outlives what it was made from — a
field missing from the signature, a tuned choice that changed, a forced row, a forced int64 path,
autotuning turned off — shows up as a wrong answer or a wrong row in the log.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import randn
from fusedad.activations import lookup
from fusedad.kernels import configs, force_int64, record_launches, variants
from fusedad.kernels import linear as launcher


@pytest.fixture
def picks(monkeypatch):
    """The directions the launcher chose a row for, in order (a planned launch chooses nothing)."""
    calls = []
    real = launcher._pick

    def spy(direction, *args, **kwargs):
        calls.append(direction)
        return real(direction, *args, **kwargs)

    monkeypatch.setattr(launcher, "_pick", spy)
    return calls


def _expected(x, w, b, act):
    z = F.linear(x.double(), w.double(), None if b is None else b.double())
    return lookup(act).apply(z).to(x.dtype), z.to(x.dtype)


def _forward(x, w, b=None, act=None, store_preact=False):
    """(y, z, [(kernel, grid, flags) per launch]) of one launcher forward, checked against float64."""
    with record_launches() as log:
        y, z, _, _ = launcher.linear_forward(x, w, b, act, store_preact=store_preact)
    ey, ez = _expected(x, w, b, act)
    torch.testing.assert_close(y, ey)
    if store_preact:
        torch.testing.assert_close(z, ez)
    assert log and all(launch.args[0] is x for launch in log if launch.kernel != "linear_fwd_splitk_reduce")
    return y, z, [(launch.kernel, launch.grid, launch.flags) for launch in log]


@pytest.mark.parametrize("M, K, kernels", [(40, 32, ["linear_fwd"]),
                                           (8, 328, ["linear_fwd_splitk", "linear_fwd_splitk_reduce"])],
                         ids=["pointer", "splitk-two-launches"])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_a_repeated_forward_chooses_once_and_launches_the_same(picks, M, K, kernels, act):
    x, w, b = randn(M, K), randn(24, K), randn(24)
    first = _forward(x, w, b, act, store_preact=True)[2]
    assert [kernel for kernel, _, _ in first] == kernels
    for _ in range(2):
        assert _forward(x, w, b, act, store_preact=True)[2] == first  # recorded like the first, and run
    x2 = randn(M, K)  # other values, the same signature: the plan, with this call's tensors
    assert _forward(x2, w, b, act, store_preact=True)[2] == first
    assert picks == ["fwd"]


def test_every_field_of_the_signature_has_its_own_plan(picks):
    """Launches of one (M, N, K) that differ in dtype, activation, bias (given, or expanded from one value),
    stored z, or an operand's layout: each runs its own flags and gives its own right answer, the first
    time and from its plan."""
    M, N, K = 40, 24, 32
    x, w, b = randn(M, K), randn(N, K), randn(N)
    calls = [
        dict(x=x, w=w, b=b, act="gelu", store_preact=True),
        dict(x=x.double(), w=w.double(), b=b.double(), act="gelu", store_preact=True),
        dict(x=x, w=w, b=b, act="relu", store_preact=True),
        dict(x=x, w=w, b=b, act=None, store_preact=True),
        dict(x=x, w=w, b=None, act="gelu", store_preact=True),
        dict(x=x, w=w, b=randn(1).expand(N), act="gelu", store_preact=True),  # bias stride 0, as None's slot
        dict(x=x, w=w, b=b, act="gelu", store_preact=False),
        dict(x=randn(K, M).t(), w=w, b=b, act="gelu", store_preact=True),
        dict(x=x, w=randn(K, N).t(), b=b, act="gelu", store_preact=True),
    ]
    runs = [[_forward(c["x"], c["w"], c["b"], c["act"], c["store_preact"])[2] for c in calls] for _ in range(2)]
    assert runs[1] == runs[0]
    for c, launches in zip(calls, runs[0]):
        flags = launches[0][2]
        assert flags["ACT"] == lookup(c["act"]).kernel_id and flags["HAS_BIAS"] == (c["b"] is not None)
        assert flags["STORE_Z"] == c["store_preact"] and flags["FP64"] == (c["x"].dtype == torch.float64)
    assert len(picks) == len(calls)


def test_a_plan_follows_the_operands_strides(monkeypatch):
    """The 64-bit index path is decided by the operands' extent (shape and strides): a view of the same
    shape reaching past the int32 range (here lowered to 1000 elements) gets INT64, from its own plan."""
    monkeypatch.setattr(launcher, "_INT32_LIMIT", 1000)
    w, b = randn(8, 16), randn(8)
    narrow = randn(8, 16)
    wide = randn(8, 16 * 80)[:, ::80]  # the same shape; its last element at offset 7·1280 + 15·80 ≥ 1000
    for _ in range(2):
        for x, int64 in ((narrow, False), (wide, True), (narrow, False)):
            launches = _forward(x, w, b, "relu")[2]
            assert all(flags["INT64"] is int64 for _, _, flags in launches)


def test_a_plan_follows_the_operands_alignment(tuner):
    """A tuned tensor-descriptor row needs 16-byte aligned operands: an input 4 bytes off gets the pointer
    kernel, from its own plan, while the aligned input keeps the descriptor row."""
    tuner.speed = lambda name, flags: 0.5 if name == "linear_fwd_tma" else 1.0
    w = randn(24, 32)
    aligned = randn(40, 32)
    off = randn(40 * 32 + 1)[1:].view(40, 32)  # one fp32 element past an aligned start
    assert off.data_ptr() % 16 and aligned.data_ptr() % 16 == 0
    for _ in range(2):
        for x, kernel in ((aligned, "linear_fwd_tma"), (off, "linear_fwd"), (aligned, "linear_fwd_tma")):
            assert [k for k, _, _ in _forward(x, w, None, "gelu")[2]] == [kernel]


def test_a_plan_is_dropped_when_the_tuned_choice_changes(tuner, tmp_path):
    """A plan holds what the autotune cache said when it was made: clearing the cache, re-tuning, or
    loading another machine's results makes the next launch choose again."""
    x, w = randn(40, 32), randn(24, 32)

    def prefer(row):
        tuner.speed = lambda name, flags: 0.5 if name == row else 1.0

    prefer("linear_fwd")
    assert [k for k, _, _ in _forward(x, w)[2]] == ["linear_fwd"]
    exported = tmp_path / "tuned-pointer.json"
    configs.export_cache(exported)
    configs.clear_cache(disk=True)
    prefer("linear_fwd_torch")
    for _ in range(2):
        assert [k for k, _, _ in _forward(x, w)[2]] == ["linear_fwd_torch"]  # re-tuned, then from its plan
    configs.load_cache(exported)
    for _ in range(2):
        assert [k for k, _, _ in _forward(x, w)[2]] == ["linear_fwd"]  # the loaded result, not the plan


def test_autotuning_turned_off_is_seen_by_a_planned_launch(tuner, monkeypatch):
    """FUSEDAD_AUTOTUNE=0 means the heuristic rows, also for a key this process tuned before: neither a plan
    nor the tuned cache serves the torch row then; turned on again, the tuned row is back."""
    tuner.speed = lambda name, flags: 0.5 if name == "linear_fwd_torch" else 1.0
    x, w = randn(40, 32), randn(24, 32)
    for setting, kernel in (("1", "linear_fwd_torch"), ("1", "linear_fwd_torch"), ("0", "linear_fwd"),
                            ("0", "linear_fwd"), ("1", "linear_fwd_torch")):
        monkeypatch.setenv("FUSEDAD_AUTOTUNE", setting)
        assert [k for k, _, _ in _forward(x, w)[2]] == [kernel], setting


def test_a_forced_row_and_forced_int64_are_not_served_from_a_plan(picks):
    x, w = randn(40, 32), randn(24, 32)
    plain = _forward(x, w, None, "relu")[2]
    with variants.use("linear_fwd_torch"):
        assert [k for k, _, _ in _forward(x, w, None, "relu")[2]] == ["linear_fwd_torch"]
    with force_int64():
        assert all(flags["INT64"] for _, _, flags in _forward(x, w, None, "relu")[2])
    assert _forward(x, w, None, "relu")[2] == plain  # the plan again
    assert picks == ["fwd", "fwd", "fwd"]


def test_the_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(launcher, "PLAN_MEMO_SIZE", 3)
    w = randn(24, 32)
    for rows in (40, 41, 42, 43, 44, 40):
        _forward(randn(rows, 32), w, None, "gelu")
        assert 1 <= len(launcher._PLANS) <= 3


# ---- the backward: its dZ pass and GEMM launch, planned together ----------------------------------------

def _backward(gy, x, w, saved, act, need=(True, True, True), **outs):
    """([dx, dw, db], [(kernel, grid, flags) per launch]) of one launcher backward, checked against float64
    (a buffer in ``outs`` — weight_grad_out / input_grad_out — starts at zero: it holds the gradient after)."""
    need_x, need_w, need_b = need
    with record_launches() as log:
        got = launcher.linear_backward(gy, x if need_w else None, w if need_x else None, saved, act,
                                       need_x, need_w, need_b, **outs)
    z = saved.double().requires_grad_() if saved is not None else None
    dz = (gy.double() if z is None else
          torch.autograd.grad(lookup(act).apply(z), z, gy.double())[0])
    want = [dz @ w.double() if need_x else None, dz.t() @ x.double() if need_w else None,
            dz.sum(0) if need_b else None]
    for g, e in zip(got, want):
        assert (g is None) == (e is None)
        if g is not None:
            tol = {torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[g.dtype]
            torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)
    return got, [(launch.kernel, launch.grid, launch.flags) for launch in log]


def _bwd_args(M=40, N=24, K=32, dtype=torch.float32):
    return randn(M, N, dtype=dtype), randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(M, N, dtype=dtype)


@pytest.mark.parametrize("act, need, kernels", [("gelu", (True, True, True), ["linear_dz", "linear_bwd"]),
                                                (None, (True, True, True), ["linear_dz", "linear_bwd"]),
                                                (None, (True, True, False), ["linear_bwd"]),
                                                ("gelu", (False, False, True), ["linear_dz"])],
                         ids=["gelu", "identity-db", "identity-gemm-only", "db-only"])
def test_a_repeated_backward_chooses_once_and_launches_the_same(picks, act, need, kernels):
    gy, x, w, z = _bwd_args()
    saved = z if act is not None else None
    first = _backward(gy, x, w, saved, act, need)[1]
    assert [kernel for kernel, _, _ in first] == kernels
    for _ in range(2):
        assert _backward(gy, x, w, saved, act, need)[1] == first
    gy2, x2, w2, z2 = _bwd_args()  # other values, the same signature: the plan, with this call's tensors
    assert _backward(gy2, x2, w2, z2 if act is not None else None, act, need)[1] == first
    assert picks == ["bwd"]


def test_every_field_of_the_backward_signature_has_its_own_plan(picks):
    """Backward launches of one (M, N, K) that differ in the gradients asked for, the activation, the dtype,
    an operand's layout, or a buffer added into: each runs its own launches and gives its own right answer,
    the first time and from its plan."""
    M, N, K = 40, 24, 32
    gy, x, w, z = _bwd_args(M, N, K)
    calls = [
        dict(gy=gy, x=x, w=w, saved=z, act="gelu", need=(True, True, True)),
        dict(gy=gy, x=x, w=w, saved=z, act="gelu", need=(True, True, False)),  # only db's request differs
        dict(gy=gy, x=x, w=w, saved=z, act="gelu", need=(True, False, False)),
        dict(gy=gy, x=x, w=w, saved=z, act="gelu", need=(False, True, True)),
        dict(gy=gy, x=x, w=w, saved=z, act="silu", need=(True, True, True)),
        dict(gy=gy, x=x, w=w, saved=None, act=None, need=(True, True, True)),
        dict(gy=gy.double(), x=x.double(), w=w.double(), saved=z.double(), act="gelu", need=(True, True, True)),
        dict(gy=randn(N, M).t(), x=x, w=w, saved=z, act="gelu", need=(True, True, True)),
        dict(gy=gy, x=randn(K, M).t(), w=w, saved=z, act="gelu", need=(True, True, True)),
        dict(gy=gy, x=x, w=randn(K, N).t(), saved=z, act="gelu", need=(True, True, True)),
        dict(gy=gy, x=x, w=w, saved=randn(N, M).t(), act="gelu", need=(True, True, True)),
        dict(gy=gy, x=x, w=w, saved=z, act="gelu", need=(True, True, True), weight_grad_out=(N, K)),
        dict(gy=gy, x=x, w=w, saved=z, act="gelu", need=(True, True, True), input_grad_out=(M, K)),
    ]

    def run(c):
        outs = {k: torch.zeros(c[k]) for k in ("weight_grad_out", "input_grad_out") if k in c}
        got, launches = _backward(c["gy"], c["x"], c["w"], c["saved"], c["act"], c["need"], **outs)
        for k, buffer in outs.items():  # added into the caller's buffer, which is what is returned
            assert got[1 if k == "weight_grad_out" else 0] is buffer
        return launches

    runs = [[run(c) for c in calls] for _ in range(2)]
    assert runs[1] == runs[0]
    for c, launches in zip(calls, runs[0]):
        flags = launches[-1][2]
        assert flags["ACCUMULATE_DW"] == ("weight_grad_out" in c) and flags["ACCUMULATE_DX"] == ("input_grad_out" in c)
        assert flags["FP64"] == (c["gy"].dtype == torch.float64)
    assert len(picks) == len(calls)


def test_a_backward_plan_follows_the_operands_strides(monkeypatch):
    """INT64 for a saved tensor whose view reaches past the (lowered) int32 range, from its own plan."""
    monkeypatch.setattr(launcher, "_INT32_LIMIT", 1000)
    gy, x, w, _ = _bwd_args(8, 16, 4)
    narrow = randn(8, 16)
    wide = randn(8, 16 * 80)[:, ::80]
    for _ in range(2):
        for saved, int64 in ((narrow, False), (wide, True), (narrow, False)):
            launches = _backward(gy, x, w, saved, "gelu")[1]
            assert all(flags["INT64"] is int64 for _, _, flags in launches)


def test_a_tuned_torch_backward_is_planned_beside_an_accumulating_one(tuner):
    """The tuner keeps torch's backward row for the key; its plan runs it again. An accumulating launch of
    the same shape (which torch's row may not run) has its own plan with the Triton row."""
    tuner.speed = lambda name, flags: 0.5 if name == "linear_bwd_torch" else 1.0
    gy, x, w, z = _bwd_args()
    for _ in range(2):
        assert [k for k, _, _ in _backward(gy, x, w, z, "gelu")[1]] == ["linear_bwd_torch"]
        launches = _backward(gy, x, w, z, "gelu", weight_grad_out=torch.zeros(24, 32))[1]
        assert [k for k, _, _ in launches] == ["linear_dz", "linear_bwd"]
    planned = sorted(plan.variant.name for plan in launcher._PLANS.values())
    assert planned == ["linear_bwd", "linear_bwd_torch"]  # one plan per signature, each with its own row


def test_a_backward_plan_is_dropped_when_the_tuned_choice_changes(tuner):
    gy, x, w, z = _bwd_args()
    tuner.speed = lambda name, flags: 0.5 if name == "linear_bwd" else 1.0
    assert [k for k, _, _ in _backward(gy, x, w, z, "gelu")[1]] == ["linear_dz", "linear_bwd"]
    configs.clear_cache(disk=True)
    tuner.speed = lambda name, flags: 0.5 if name == "linear_bwd_torch" else 1.0
    for _ in range(2):
        assert [k for k, _, _ in _backward(gy, x, w, z, "gelu")[1]] == ["linear_bwd_torch"]


def test_forced_backward_rows_and_forced_int64_are_not_served_from_a_plan(picks):
    gy, x, w, z = _bwd_args()
    plain = _backward(gy, x, w, z, "gelu")[1]
    with variants.use("linear_bwd_prologue"):
        assert [k for k, _, _ in _backward(gy, x, w, z, "gelu")[1]] == ["linear_bwd_prologue"]
    with variants.use("linear_bwd_torch"):
        assert [k for k, _, _ in _backward(gy, x, w, z, "gelu")[1]] == ["linear_bwd_torch"]
    with force_int64():
        assert all(flags["INT64"] for _, _, flags in _backward(gy, x, w, z, "gelu")[1])
    assert _backward(gy, x, w, z, "gelu")[1] == plain  # the plan again
    assert picks == ["bwd"] * 4

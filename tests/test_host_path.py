"""The per-call host path: what was moved out of it must not change any answer.

* the one-check fast path of ``fusedad.linear`` takes exactly the calls the full check would pass
  unchanged (everything else — broadcast biases, N-D inputs, autocast, errors — takes the full path);
* the eager backend's first-order dZ (PyTorch's fused activation backward) equals the activation
  table's differentiable chain, NaN and inf included;
* the int64 decision's shortcut for contiguous tensors still sees every offset ≥ 2³¹;
* the launcher reads a tuned key's choice without building the tuning space again (and never for a
  forced row), and builds the heuristic tile once per shape;
* the module's own fast path applies the activation it has at call time;
* on the eager backend a call without ``main_grad`` is torch's own graph, saving exactly what the
  Function saves, with the same gradients to second order; a ``main_grad`` layer still accumulates;
* there a plain CPU call is F.linear + the activation with no check of fusedad's own first, and every
  call fusedad refuses raises the full check's error (also those F.linear would compute).
"""
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

import fusedad
from conftest import ACTS, randn
from fusedad import _validate, autograd
from fusedad.activations import lookup
from fusedad.kernels import configs, record_launches, variants
from fusedad.kernels import linear as launcher


def _args(dtype=torch.float32):
    return randn(5, 8, dtype=dtype), randn(6, 8, dtype=dtype), randn(6, dtype=dtype)


def test_the_fast_check_takes_only_calls_the_full_check_passes_unchanged():
    x, w, b = _args()
    assert _validate.common_2d_call(x, w, b) and _validate.common_2d_call(x, w, None)
    not_common = [
        (x.double(), w, b),  # dtype mismatch
        (x, w, b.double()),
        (x.to(torch.int32), w.to(torch.int32), None),  # unsupported dtype
        (randn(5, 7), w, b),  # in_features mismatch
        (x, w, randn(1)),  # broadcast bias (1,): the full path expands it
        (x, w, torch.randn(())),  # and ()
        (x, w, randn(7)),  # wrong bias
        (x, w[0], None),  # 1-D weight
        (randn(2, 5, 8), w, b),  # N-D input: folded by the full path
        (randn(8), w, b),  # 1-D input
        (x.tolist(), w, b),  # not a tensor
        (x, w.to("meta"), None),  # two devices
    ]
    for args in not_common:
        assert not _validate.common_2d_call(*args), [getattr(a, "shape", type(a)) for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _validate.common_2d_call(x, w, b)  # autocast casts: the full path


@pytest.mark.parametrize("bias_shape", [(6,), (1,), ()])
def test_fast_and_full_paths_agree(bias_shape):
    x, w, _ = _args(torch.float64)
    b = torch.randn(bias_shape, dtype=torch.float64)
    y = fusedad.functional.linear(x, w, b, "silu")
    torch.testing.assert_close(y, F.silu(F.linear(x, w, b)), rtol=1e-12, atol=1e-12)
    y3 = fusedad.functional.linear(x.unsqueeze(0), w, b, "silu")  # the full path (3-D input)
    torch.testing.assert_close(y3[0], y, rtol=0, atol=0)


def test_errors_are_the_full_checks():
    x, w, b = _args()
    with pytest.raises(RuntimeError, match="in_features=8"):
        fusedad.functional.linear(randn(5, 7), w, b)
    with pytest.raises(RuntimeError, match="same dtype"):
        fusedad.functional.linear(x.double(), w, b)
    with pytest.raises(TypeError, match="must be a Tensor"):
        fusedad.functional.linear(x.tolist(), w, b)


@pytest.mark.parametrize("act", [a for a in ACTS if a is not None])
def test_first_order_chain_equals_the_differentiable_chain(act):
    row = lookup(act)
    z = randn(64, dtype=torch.float64, scale=3.0)
    z[:4] = torch.tensor([0.0, -0.0, float("nan"), 1e-300], dtype=torch.float64)
    saved = row.apply(z) if row.saves == "y" else z
    g = randn(64, dtype=torch.float64)
    g[4:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0], dtype=torch.float64)
    torch.testing.assert_close(row.first_order_chain(g, saved), row.chain(g, saved), rtol=1e-13, atol=1e-15,
                               equal_nan=True)


def test_int64_shortcut_still_sees_large_offsets():
    small = torch.empty(4, 4)
    assert not launcher.needs_int64(small, small.t(), None)
    big_contiguous = torch.empty(2**31, device="meta")  # largest offset 2³¹ − 1
    strided = torch.empty(2, 2**31, device="meta")[:, :1]  # two elements, the second at offset 2³¹
    assert launcher.needs_int64(small, big_contiguous) and launcher.needs_int64(strided)
    assert not launcher.needs_int64(torch.empty(2**31 - 2, device="meta"))


def test_a_tuned_key_is_read_without_building_the_tuning_space(tuner, monkeypatch):
    """After the first call of a key, the launcher asks the cache first: no config space, no tuning space."""
    built = []
    real_space = variants.tuning_space
    monkeypatch.setattr(variants, "tuning_space", lambda *a, **k: built.append(a[0]) or real_space(*a, **k))
    layer = fusedad.nn.Linear(32, 24, activation="relu")
    x = randn(40, 32, requires_grad=True)
    for _ in range(3):
        with record_launches() as log:
            layer(x).sum().backward()
        assert [launch.kernel for launch in log] == ["linear_fwd", "linear_dz", "linear_bwd"]
    assert built == ["fwd", "bwd"]  # once per key, on its first call


def test_the_heuristic_tile_is_built_once_per_shape(monkeypatch):
    """``variants.heuristic_config``: the config space's first entry, the space built once per (row, M, N,
    K, dtype) — every field of the key gives its own answer — and the memo starts over at its bound."""
    built = []

    def space(M, N, K, dtype):
        built.append((M, N, K, dtype))
        return configs.candidates(M, N, K, dtype)

    row = dataclasses.replace(variants.by_name("linear_fwd"), config_space=space)
    monkeypatch.setattr(variants, "_HEURISTIC", {})
    shapes = [(64, 32, 48, torch.bfloat16), (64, 32, 48, torch.float32), (200, 32, 48, torch.float32),
              (64, 40, 48, torch.float32), (64, 32, 80, torch.float32), (8, 32, 48, torch.float64)]
    for _ in range(3):
        for shape in shapes:
            assert variants.heuristic_config(row, *shape) == configs.candidates(*shape)[0], shape
    assert built == shapes  # each once, on its first call
    other = variants.by_name("linear_fwd_tangent")  # another row: its own space, though the shape is the same
    assert variants.heuristic_config(other, *shapes[0]) == other.config_space(*shapes[0])[0]
    monkeypatch.setattr(variants, "HEURISTIC_MEMO_SHAPES", len(shapes) + 1)
    variants.heuristic_config(row, 1, 2, 3, torch.float16)
    assert len(variants._HEURISTIC) == 1  # at the bound: cleared, then this shape remembered


def test_the_module_reads_its_activation_at_call_time():
    """``fusedad.nn.Linear``'s fast path looks the activation up per call: one set after construction (as
    ``convert()`` does) is the one applied, in every grad mode."""
    layer = fusedad.nn.Linear(8, 6)
    x = randn(5, 8, requires_grad=True)
    layer.activation = "relu"
    expected = F.relu(F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    layer.activation = None
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_a_forced_row_runs_though_its_key_is_tuned(tuner):
    """The cache-first path serves unforced launches only: under ``variants.use`` the forced row runs even
    where the direction's key already holds another row."""
    x, w = randn(40, 32), randn(24, 32)
    with record_launches() as log:
        launcher.linear_forward(x, w, None, "relu")  # tunes the "fwd" key: every pair ties, the pointer kernel kept
    assert [launch.kernel for launch in log] == ["linear_fwd"]
    with variants.use("linear_fwd_torch"), record_launches() as log:
        y, _, _, _ = launcher.linear_forward(x, w, None, "relu")
    assert [launch.kernel for launch in log] == ["linear_fwd_torch"]
    torch.testing.assert_close(y, F.relu(F.linear(x, w)))


@pytest.fixture
def eager_cpu(monkeypatch):
    """CPU tensors on the eager backend (as where TRITON_INTERPRET is unset), whatever this run's setting."""
    backends = importlib.import_module("fusedad.backend")  # (fusedad.backend is also a function)
    eager = backends.eager_backend()
    monkeypatch.setattr(backends, "_CPU", eager)
    # (and the custom ops' bodies, which select by device: a compiled call runs them)
    monkeypatch.setattr(backends, "_BY_DEVICE_TYPE", {("cpu", False): eager, ("cpu", True): eager})


def _saved(fn):
    """(y, [every tensor saved for backward]) of one recorded call."""
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = fn()
    return y, packed


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)],
                         ids=["all", "x-only", "weight-and-bias", "bias-only"])
def test_the_eager_backend_records_torch_ops_saving_what_the_function_saves(eager_cpu, act, needs):
    """On the eager backend a plain recorded call is torch's own graph (no Python Function): the same values
    and gradients as nn.Linear + the activation, to second order, and the same tensors saved for backward as
    fusedad's Function saves there — the same storages, the same bytes."""
    rx, rw, rb = needs
    x, w, b = randn(7, 12, requires_grad=rx), randn(5, 12, requires_grad=rw), randn(5, requires_grad=rb)
    row = lookup(act)
    y, ours = _saved(lambda: fusedad.linear(x, w, b, act))
    assert "FusedLinear" not in type(y.grad_fn).__name__
    _, functions = _saved(lambda: autograd.FusedLinearEagerFunction.apply(x, w, b, row, None, None)[0])

    def storages(tensors):  # each distinct storage once: an input's by name, an output's by size
        names = {t.untyped_storage().data_ptr(): name for name, t in (("x", x), ("w", w), ("b", b))}
        return sorted({names.get(t.untyped_storage().data_ptr(), str(t.untyped_storage().nbytes()))
                       for t in tensors})

    assert storages(ours) == storages(functions)
    inputs = [t for t in (x, w, b) if t.requires_grad]
    ref = row.apply(F.linear(x, w, b))
    torch.testing.assert_close(y, ref)
    g = randn(7, 5)
    first = torch.autograd.grad(y, inputs, g, create_graph=True)
    ref_first = torch.autograd.grad(ref, inputs, g, create_graph=True)
    for got, want in zip(first, ref_first):
        torch.testing.assert_close(got, want)
    if act not in (None, "relu") and any(t.requires_grad for t in first):
        second = torch.autograd.grad(sum((t * t).sum() for t in first), inputs, allow_unused=True)
        ref_second = torch.autograd.grad(sum((t * t).sum() for t in ref_first), inputs, allow_unused=True)
        for got, want in zip(second, ref_second):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want)


def test_main_grad_on_the_eager_backend_still_accumulates(eager_cpu):
    """torch's own nodes cannot add dW into an fp32 main_grad: such a layer keeps fusedad's Function."""
    layer = fusedad.nn.Linear(12, 5, activation="gelu", accumulate_main_grad=True)
    ref = torch.nn.Linear(12, 5)
    ref.load_state_dict(layer.state_dict())
    x = randn(7, 12)
    for _ in range(2):
        layer(x).sum().backward()
        F.gelu(ref(x)).sum().backward()
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.weight.main_grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)


# ---- the eager backend's CPU call: F.linear checks, fusedad's check names what it refuses ----------------

def _bad_calls():
    """(id, (input, weight, bias)) calls fusedad refuses; some of them F.linear would compute."""
    x, w, b = _args()
    return [
        ("in_features", (randn(5, 7), w, b)),
        ("bias_length", (x, w, randn(7))),
        ("bias_2d", (x, w, randn(5, 6))),  # F.linear broadcasts it
        ("input_0d", (torch.tensor(1.0), w, None)),
        ("weight_3d", (x, randn(2, 6, 8), None)),
        ("vector_weight_with_bias", (x, w[0], randn(1))),  # F.linear adds it
        ("input_dtype", (x.double(), w, b)),
        ("weight_dtype", (x, w.half(), None)),
        ("bias_dtype", (x, w, b.double())),
        ("int_everywhere", (x.long(), w.long(), b.long())),  # F.linear computes it on CPU
        ("int_bias", (x, w, b.long())),
        ("bool", (x.bool(), w.bool(), None)),
        ("complex", (x.to(torch.complex64), w.to(torch.complex64), None)),  # F.linear computes it
        ("meta_input", (x.to("meta"), w, b)),
        ("meta_input_no_bias", (x.to("meta"), w, None)),  # F.linear computes it on the input's device
        ("meta_weight", (x, w.to("meta"), b)),  # F.linear computes it on CPU
        ("meta_bias", (x, w, b.to("meta"))),
        ("list_weight", (x, w.tolist(), None)),
    ]


def _error(fn):
    with pytest.raises((RuntimeError, TypeError)) as info:
        fn()
    return info.type, str(info.value)


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[name for name, _ in _bad_calls()])
def test_the_eager_cpu_call_raises_the_checked_paths_error(eager_cpu, case):
    """Where F.linear refuses, fusedad's check names the problem; where F.linear would compute (a 2-D bias,
    integer or complex tensors, a meta tensor beside CPU ones) the call is refused as on every backend —
    the same exception and message as the full check, through the function and through the module."""
    args = _bad_calls()[case][1]
    want = _error(lambda: _validate.check_linear_args(*args))
    assert _error(lambda: fusedad.linear(*args, activation="gelu")) == want
    x, w, b = args
    if isinstance(w, torch.Tensor) and w.dim() == 2 and (b is None or b.dim() == 1):
        layer = fusedad.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, activation="gelu")
        with torch.no_grad():
            layer.weight = torch.nn.Parameter(w, requires_grad=False)
            layer.bias = None if b is None else torch.nn.Parameter(b, requires_grad=False)
        assert _error(lambda: layer(x)) == want


def _no_full_check(monkeypatch):
    """Make the checked path fail loudly: a call that reaches it did not take the eager CPU call."""
    def checked(*args):
        raise AssertionError("took the checked path")

    monkeypatch.setattr(fusedad.functional, "common_2d_call", checked)
    monkeypatch.setattr(fusedad.functional, "cast_and_check", checked)
    monkeypatch.setattr(fusedad.nn, "common_2d_call", checked)


@pytest.mark.parametrize("x_shape, bias_shape", [((5, 8), (6,)), ((2, 3, 8), (6,)), ((8,), (6,)), ((5, 8), (1,)),
                                                 ((5, 8), None)], ids=["2d", "3d", "1d", "bias1", "nobias"])
def test_the_eager_cpu_call_is_nn_linear_and_the_activation(eager_cpu, monkeypatch, x_shape, bias_shape):
    """On the eager backend a plain CPU call goes straight to F.linear + the activation — no argument check of
    fusedad's own, no fold of leading dims: the same values as nn.Linear + the activation, torch's own graph."""
    _no_full_check(monkeypatch)
    x = randn(*x_shape, dtype=torch.float64, requires_grad=True)
    w = randn(6, 8, dtype=torch.float64, requires_grad=True)
    b = None if bias_shape is None else randn(*bias_shape, dtype=torch.float64, requires_grad=True)
    y = fusedad.linear(x, w, b, "silu")
    want = F.silu(F.linear(x, w, b))
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    assert "FusedLinear" not in type(y.grad_fn).__name__
    inputs = [t for t in (x, w, b) if t is not None]
    for got, ref in zip(torch.autograd.grad(y.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    layer = fusedad.nn.Linear(8, 6, bias=b is not None, activation="silu", dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b.expand(6))
    torch.testing.assert_close(layer(x), F.silu(F.linear(x, w, None if b is None else b.expand(6))), rtol=0, atol=0)


def test_the_eager_cpu_call_under_autocast_casts_as_nn_linear(eager_cpu, monkeypatch):
    _no_full_check(monkeypatch)
    layer, ref = fusedad.nn.Linear(8, 6, activation="gelu"), torch.nn.Linear(8, 6)
    ref.load_state_dict(layer.state_dict())
    x = randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x), F.gelu(ref(x))
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_calls_the_eager_cpu_call_leaves_to_the_checked_path(eager_cpu):
    """A 0-D bias, a 1-D weight and meta tensors take the checked path (and agree with F.linear)."""
    x, w, b = (t.requires_grad_() for t in _args(torch.float64))
    assert autograd.eager_cpu_linear(x, w, b, lookup("gelu")) is not None
    for args in [(x, w, b[0]), (x, w[0], None)]:
        assert autograd.eager_cpu_linear(*args, lookup("gelu")) is None
        y = fusedad.linear(*args, activation="gelu")
        torch.testing.assert_close(y, F.gelu(F.linear(*args)))
        assert "FusedLinear" not in type(y.grad_fn).__name__  # the checked path ends in torch's ops too
    assert autograd.eager_cpu_linear(x.to("meta"), w.to("meta"), None, lookup(None)) is None


def test_cpu_running_the_kernels_never_takes_the_eager_call():
    x, w, b = _args()
    assert (autograd.eager_cpu_linear(x, w, b, lookup(None)) is None) == (fusedad.backend(x) != "eager")


def test_a_compiled_call_on_the_eager_backend_keeps_the_custom_op(eager_cpu):
    """Under torch.compile the eager CPU call steps aside: Dynamo's graph holds fusedad's custom op, as on
    every backend (Dynamo sees plain tensor types, so only the compile check keeps it out)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    layer = fusedad.nn.Linear(8, 6, activation="gelu")
    x = randn(5, 8)
    y = torch.compile(layer, backend=record, fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(y, F.gelu(F.linear(x, layer.weight, layer.bias)))
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    others = " ".join(targets).replace("fusedad.linear_fwd", "")
    assert "fusedad.linear_fwd" in targets and "linear" not in others, targets


@pytest.mark.parametrize("dtype, rows, into_db", [(torch.float32, 8, True), (torch.float64, 8, True),
                                                  (torch.bfloat16, 8, False), (torch.float32, 300, False),
                                                  (torch.bfloat16, 300, False)],
                         ids=["fp32", "fp64", "bf16", "fp32-many-row-blocks", "bf16-many-row-blocks"])
def test_the_dz_pass_writes_db_itself_where_one_row_block_covers_the_batch(dtype, rows, into_db):
    """db's partial sums need no buffer and no reduction afterwards where they are one row in db's own dtype
    (a small batch in fp32/fp64); otherwise an fp32 buffer, summed in fp32 and rounded once (a bf16 db is
    the exact sum rounded to bf16, bit for bit). Both from a fresh choice and a plan."""
    gy, x, w, z = (randn(rows, 24, dtype=dtype), randn(rows, 16, dtype=dtype), randn(24, 16, dtype=dtype),
                   randn(rows, 24, dtype=dtype))
    want = (gy.double() * torch.func.grad(lambda t: F.gelu(t).sum())(z.double())).sum(0)
    for _ in range(2):
        with record_launches() as log:
            _, _, db = launcher.linear_backward(gy, x, w, z, "gelu", need_bias=True)
        (dz_launch,) = [launch for launch in log if launch.kernel == "linear_dz"]
        partial = dz_launch.args[3]
        assert (partial.data_ptr() == db.data_ptr()) == into_db
        assert partial.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if dtype == torch.bfloat16:  # summed in fp32, rounded once: the exact sum rounded to bf16
            assert torch.equal(db, want.to(dtype)), (db.double() - want).abs().max()
        else:
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(db.double(), want, rtol=tol, atol=tol)

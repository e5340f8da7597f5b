"""torch's own product as rows of the kernel-variant table (``kernels/torch_rows.py``).

* results: each torch row, forced with ``variants.use``, equals the Triton rows' results (fp64: to
  rounding; the activation applied, db summed) and is what ``record_launches`` shows;
* choice: the launcher's autotuner (run here on CPU tensors with the CUDA-only parts replaced: a fake
  timer that says which pair is fast, a fake device name) keeps the torch row for a key only when it
  was timed faster — per flags —, never times an accumulating launch, and the on-disk cache round-trips
  the row's name; without autotuning, and under the interpreter unless forced, a Triton row runs;
* capture: a torch.compile trace and torch.export still see the custom ops.
"""
import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

import fusedad
from conftest import ACTS, randn, runs_kernels
from fusedad.activations import lookup
from fusedad.kernels import configs, linear_backward, linear_forward, record_launches, variants
from fusedad.kernels import linear as launcher

FWD, BWD = "linear_fwd_torch", "linear_bwd_torch"


def _needs_kernels():
    if not runs_kernels("cpu"):
        pytest.skip("the launcher runs only with the kernels (TRITON_INTERPRET=1 or a GPU); here fusedad is eager")


def _kernels(log):
    return [launch.kernel for launch in log]


def _inputs(act, dtype=torch.float64, M=21, N=18, K=24, bias=True):
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype)
    b = randn(N, dtype=dtype) if bias else None
    if act in ("relu", "relu2") and b is not None:  # keep z away from the kink (act' is discontinuous there)
        with torch.no_grad():
            b += torch.where(F.linear(x, w, b).abs().min(0).values < 0.1, 0.5, 0.0)
    return x, w, b


def test_table_rows():
    fwd, bwd = variants.by_name(FWD), variants.by_name(BWD)
    assert (fwd.direction, bwd.direction) == ("fwd", "bwd")
    assert fwd.is_torch and bwd.is_torch and fwd.kernel is None and bwd.kernel is None
    assert not fwd.default and not bwd.default  # the heuristic's pick stays a Triton row
    assert all(not v.is_torch for v in variants.VARIANTS if v.default)


# ---- results ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_forward_row_equals_the_kernel(act, bias):
    _needs_kernels()
    x, w, b = _inputs(act, bias=bias)
    store = lookup(act).needs_z
    with record_launches() as log:
        y_k, z_k, _, _ = linear_forward(x, w, b, act, store_preact=store)
    assert _kernels(log) == ["linear_fwd"]
    with variants.use(FWD), record_launches() as log:
        y_t, z_t, _, _ = linear_forward(x, w, b, act, store_preact=store)
    assert _kernels(log) == [FWD]
    assert log[0].flags["ACT"] == lookup(act).kernel_id and log[0].flags["HAS_BIAS"] == bias
    torch.testing.assert_close(y_t, y_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_t, lookup(act).apply(F.linear(x, w, b)), rtol=1e-12, atol=1e-12)
    assert (z_t is None) == (z_k is None) == (not store)
    if store:
        torch.testing.assert_close(z_t, z_k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)],
                         ids=lambda n: "+".join(k for k, on in zip(("dx", "dw", "db"), n) if on))
@pytest.mark.parametrize("act", ACTS)
def test_backward_row_equals_the_kernel(act, need):
    _needs_kernels()
    x, w, b = _inputs(act)
    y, z, _, _ = linear_forward(x, w, b, act, store_preact=lookup(act).needs_z)
    saved = lookup(act).saved(y, z)
    gy = randn(*y.shape, dtype=y.dtype)
    need_x, need_w, need_b = need
    with record_launches() as log:
        ref = linear_backward(gy, x, w, saved, act, need_x, need_w, need_b)
    assert BWD not in _kernels(log)
    with variants.use(BWD), record_launches() as log:
        got = linear_backward(gy, x, w, saved, act, need_x, need_w, need_b)
    assert _kernels(log) == [BWD]
    for name, g, r in zip(("dx", "dw", "db"), got, ref):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11, msg=name)


def test_rows_follow_autograd_and_float32():
    """A layer's forward+backward on the torch rows equals the default (Triton) rows, fp32."""
    _needs_kernels()
    layer = fusedad.nn.Linear(24, 18, activation="silu")
    x = randn(9, 24, requires_grad=True)
    results = []
    for forced in ((), (FWD, BWD)):
        with contextlib.ExitStack() as stack, record_launches() as log:
            for name in forced:
                stack.enter_context(variants.use(name))
            y = layer(x)
            grads = torch.autograd.grad(y.square().sum(), [x, layer.weight, layer.bias])
        assert (set(_kernels(log)) == {FWD, BWD}) == bool(forced)
        results.append((y, *grads))
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ---- the choice: the launcher's tuner with a fake timer -------------------------------------------------

def _torch_fast_without_activation(name, flags):
    """torch wins a plain GEMM (no activation), loses where the epilogue fuses one."""
    if name.endswith("_torch"):
        return 1.0 if flags["ACT"] == 0 else 3.0
    return 2.0


def test_tuner_keeps_the_torch_row_only_where_it_was_faster(tuner):
    tuner.speed = _torch_fast_without_activation
    x = randn(40, 32)
    plain, fused = fusedad.nn.Linear(32, 24), fusedad.nn.Linear(32, 24, activation="gelu")
    with record_launches() as log:
        plain(x.requires_grad_()).sum().backward()
    assert _kernels(log) == [FWD, BWD]
    timed_names = {n for n, _ in tuner.timed}
    assert {FWD, BWD, "linear_fwd", "linear_bwd"} <= timed_names  # timed like every other row
    tuner.timed.clear()
    with record_launches() as log:
        fused(x).sum().backward()
    assert _kernels(log) == ["linear_fwd", "linear_dz", "linear_bwd"]
    assert {FWD, BWD} <= {n for n, _ in tuner.timed}  # it was timed, and lost
    # the report holds every key's timings, the torch rows' among them
    report = dict(configs.tuning_report())
    assert len(report) == 4
    for key, timings in report.items():
        names = [item[0] for item, _ in timings]
        assert (FWD in names) or (BWD in names), key
    # the next calls time nothing and keep their rows
    tuner.timed.clear()
    with record_launches() as log:
        plain(x).sum().backward()
        fused(x).sum().backward()
    assert tuner.timed == [] and _kernels(log) == [FWD, BWD, "linear_fwd", "linear_dz", "linear_bwd"]


def test_torch_row_results_in_a_tuned_layer(tuner):
    tuner.speed = lambda name, flags: 1.0 if name.endswith("_torch") else 2.0
    layer = fusedad.nn.Linear(32, 24, activation="relu2", dtype=torch.float64)
    x = randn(30, 32, dtype=torch.float64, requires_grad=True)
    with record_launches() as log:
        y = layer(x)
        grads = torch.autograd.grad(y.sum(), [x, layer.weight, layer.bias])
    assert _kernels(log) == [FWD, BWD]
    ref = torch.square(F.relu(F.linear(x, layer.weight, layer.bias)))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), [x, layer.weight, layer.bias])):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)


def test_the_disk_cache_round_trips_the_torch_row(tuner):
    tuner.speed = lambda name, flags: 1.0 if name == FWD else 2.0
    x, w = randn(40, 32), randn(24, 32)
    with record_launches() as log:
        linear_forward(x, w)
    assert _kernels(log) == [FWD]
    with open(configs.cache_path()) as f:
        entries = json.load(f)["entries"]
    (entry,) = entries.values()
    assert entry["variant"] == FWD
    assert {t["variant"] for t in entry["timings"]} >= {FWD, "linear_fwd"}
    configs.clear_cache()  # a new process: only the file
    tuner.speed = lambda name, flags: pytest.fail("timed although the choice was on disk")
    with record_launches() as log:
        linear_forward(x, w)
    assert _kernels(log) == [FWD]


def test_an_accumulating_backward_is_never_timed_and_never_runs_the_torch_row(tuner):
    """The plain launch's key chose torch; the same launch adding dW into an fp32 main_grad reuses that
    key but cannot run the torch row (it would round the product before adding): the Triton row runs,
    and nothing is timed."""
    tuner.speed = lambda name, flags: 1.0 if name.endswith("_torch") else 2.0
    layer = fusedad.nn.Linear(32, 24)
    x = randn(40, 32)
    with record_launches() as log:
        layer(x).sum().backward()
    assert _kernels(log) == [FWD, BWD]
    layer.weight.grad = None
    acc = fusedad.nn.Linear(32, 24, accumulate_main_grad=True)
    acc.load_state_dict(layer.state_dict())
    tuner.timed.clear()
    with record_launches() as log:
        acc(x).sum().backward()
    assert not any(flags.get("ACCUMULATE_DW") for _, flags in tuner.timed)
    assert _kernels(log) == [FWD, "linear_dz", "linear_bwd"]
    assert log[-1].flags["ACCUMULATE_DW"]
    torch.testing.assert_close(acc.weight.main_grad, layer(x).new_ones(40, 24).t() @ x, rtol=1e-5, atol=1e-5)


def test_without_autotuning_the_heuristic_row_is_triton(tuner, monkeypatch):
    monkeypatch.setenv("FUSEDAD_AUTOTUNE", "0")
    tuner.speed = lambda name, flags: pytest.fail("timed with autotuning off")
    with record_launches() as log:
        fusedad.nn.Linear(32, 24)(randn(40, 32, requires_grad=True)).sum().backward()
    assert _kernels(log) == ["linear_fwd", "linear_dz", "linear_bwd"]


def test_under_the_interpreter_torch_rows_run_only_when_forced():
    _needs_kernels()
    layer = fusedad.nn.Linear(16, 8)
    x = randn(5, 16, requires_grad=True)
    with record_launches() as log:
        layer(x).sum().backward()
    assert not any(k.endswith("_torch") for k in _kernels(log))
    with variants.use(FWD), record_launches() as log:
        layer(x).sum().backward()
    assert _kernels(log)[0] == FWD and BWD not in _kernels(log)


def test_a_trace_never_offers_the_torch_row():
    """``wrap`` (inside a torch.compile trace): a forced torch row is not offered, the Triton row runs."""
    _needs_kernels()
    x, w = randn(20, 40), randn(24, 40)
    with variants.use(FWD), record_launches() as log:
        linear_forward(x, w, None, "relu", wrap=lambda kernel: kernel)
    assert _kernels(log) == ["linear_fwd"]


# ---- capture: the custom ops stay visible ------------------------------------------------------------

def _model():
    return torch.nn.Sequential(fusedad.nn.Linear(8, 16, activation="gelu"), fusedad.nn.Linear(16, 4))


@pytest.mark.parametrize("forced", [False, True], ids=["default", "torch-rows-forced"])
def test_export_and_compile_still_see_the_custom_ops(forced):
    stack = contextlib.ExitStack()
    if forced:
        stack.enter_context(variants.use(FWD))
        stack.enter_context(variants.use(BWD))
    with stack:
        model, x = _model(), randn(3, 8)
        ep = torch.export.export(model, (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert targets.count("fusedad.linear_fwd.default") == 2
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-6)

        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        called = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        assert sum("fusedad.linear_fwd" in c for c in called) == 2, called


def test_the_benchmark_reports_which_row_each_key_kept(tuner):
    """``bench.tuning.rows``: per tuned key the row kept, the runner-up of another variant and the margin."""
    from bench import tuning

    def speed(name, flags):  # the default Triton rows 2.0, the other Triton rows 2.4, torch 1.0 or 3.0
        return _torch_fast_without_activation(name, flags) + (0.4 if name not in ("linear_fwd", "linear_bwd")
                                                              and not name.endswith("_torch") else 0.0)

    tuner.speed = speed
    x = randn(40, 32, requires_grad=True)
    fusedad.nn.Linear(32, 24)(x).sum().backward()
    fusedad.nn.Linear(32, 24, activation="gelu")(x).sum().backward()
    rows = {(r["launch"], r["flags"].split()[0]): r for r in tuning.rows()}
    assert set(rows) == {("fwd", "ACT=0"), ("bwd", "ACT=0"), ("fwd", "ACT=2"), ("bwd", "ACT=2")}
    for direction in ("fwd", "bwd"):
        plain, fused = rows[(direction, "ACT=0")], rows[(direction, "ACT=2")]
        assert plain["picked"] == f"linear_{direction}_torch" and plain["margin"] == pytest.approx(2.0)
        assert plain["triton_over_torch"] == pytest.approx(2.0)
        assert fused["picked"].startswith(f"linear_{direction} ") and fused["margin"] == pytest.approx(1.2)
        assert not fused["runner_up"].endswith("_torch") and fused["triton_over_torch"] == pytest.approx(2 / 3)
    md = "\n".join(tuning.markdown(tuning.rows(), ""))
    assert "linear_fwd_torch" in md and "2.00×" in md

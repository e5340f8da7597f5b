"""Rules tested over every case they cover, each case enumerated from its source of truth (the variant
table, the kernels' signatures and source, the recorded launch flags, torch's own constructors), so that a
new flag, operand or argument is covered without anyone remembering to add an example:

* no launch that accumulates into its output (any ``ACCUMULATE_*`` flag of any kernel) is ever timed;
* every field that selects a kernel or its config space is part of the tune-cache key;
* the TMA predicate checks every operand a tensor descriptor addresses, outputs included;
* every tensor a launch addresses (inputs, outputs, tangents) takes part in the int64 decision;
* partial sums (db, split-K, the LM head's dX over class chunks, main_grad) are accumulated in fp32
  (fp64 for fp64) — checked on the buffers the launch log records, and by a large-M bf16 case whose bound
  a 16-bit accumulator fails;
* main_grad is added into, never overwritten, on every backward path;
* ``convert()`` carries every constructor argument and buffer of the modules it swaps.
"""
import contextlib
import dataclasses
import inspect
import re

import pytest
import torch

import fusedad
from conftest import randn
from fusedad.kernels import configs, variants
from fusedad.kernels import cross_entropy as lce_kernels
from fusedad.kernels import linear as launchers
from fusedad.kernels import record_launches

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    """Every Triton kernel fusedad launches: the variant table's and the LM head's."""
    ks = {v.kernel for v in variants.VARIANTS if v.kernel is not None}  # torch's rows launch no kernel
    ks |= {lce_kernels._lce_fwd_kernel, lce_kernels._lce_dz_kernel}
    return sorted(ks, key=lambda k: k.arg_names[0] + str(len(k.arg_names)))


def _accumulate_flags():
    return sorted({a for k in _kernels() for a in k.arg_names if a.startswith("ACCUMULATE_")})


# ------------------------------------------------------------------------------------------ the tuner

@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """Autotuning on, an empty in-memory and on-disk cache of the test's own."""
    monkeypatch.setenv("FUSEDAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSEDAD_AUTOTUNE", raising=False)
    configs.clear_cache()
    yield
    configs.clear_cache()


def test_the_kernels_have_accumulate_flags():
    """The rule below is enumerated from the kernels' signatures: it must find the flags it is about."""
    assert {"ACCUMULATE_DW", "ACCUMULATE_DX"} <= set(_accumulate_flags())


@pytest.mark.parametrize("flag", _accumulate_flags())
def test_no_accumulating_launch_is_ever_timed(tuner, flag):
    """Each timed run of a launch that adds into its output would add into it again. For every
    ACCUMULATE_* flag of every kernel: nothing is timed; the launch takes the config tuned for the same
    launch without accumulation (or the heuristic before that)."""
    M, N, K, dtype = 512, 256, 384, torch.bfloat16
    cands = configs.candidates(M, N, K, dtype)
    flags = dict(ACT=0, COMPUTE_DX=True, COMPUTE_DW=True, COMPUTE_DB=False, **{flag: True})

    def no_timing(fn):
        raise AssertionError(f"a launch with {flag}=True was timed")

    def launch(fl, bench):
        return configs.launch_config("H100", "bwd", fl, M, N, K, dtype, lambda c: c, bench)

    assert launch(flags, no_timing) == cands[0]
    ran = []
    plain = dict(flags, **{flag: False})
    best = launch(plain, lambda fn: (ran.append(fn()), 1.0 if ran[-1] == cands[-1] else 2.0)[1])
    assert ran == cands and best == cands[-1]
    assert launch(flags, no_timing) == cands[-1]


def test_every_accumulating_launch_the_launchers_make_is_untimed(tuner, monkeypatch):
    """The same rule at the launchers, driven as on CUDA (the tuner is asked; nothing runs): the launches
    that add into an output (main_grad, the LM head's dX over class chunks) are never timed, a plain one is."""
    asked = []

    def fake_tuned_config(key, M, N, K, dtype, run, bench, tune=True, space=None):
        asked.append((dict(key[2]), tune))
        return space(M, N, K, dtype)[0]

    monkeypatch.setattr(launchers, "INTERPRETER", False)
    monkeypatch.setattr(launchers, "_device_name", lambda index: "fake")
    monkeypatch.setattr(launchers, "_run", lambda *a, **k: None)
    monkeypatch.setattr(launchers, "_launch_kernel", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(configs, "tuned_config", fake_tuned_config)
    x, w, dy = randn(24, 16), randn(20, 16), randn(24, 20)
    launchers.linear_backward(dy, x, w, None, None)
    launchers.linear_backward(dy, x, w, None, None, weight_grad_out=torch.zeros(20, 16))
    launchers.linear_backward(dy, x, w, None, None, input_grad_out=torch.zeros(24, 16))
    assert [tune for _, tune in asked] == [True, False, False], asked


def _recorded_flags():
    """The constexpr flags of real forward and backward launches (the config's own fields left out)."""
    cfg_fields = {f.name for f in dataclasses.fields(configs.TileConfig)}
    x, w, b = randn(20, 24, requires_grad=True), randn(18, 24, requires_grad=True), randn(18, requires_grad=True)
    with record_launches() as log:
        fusedad.linear(x, w, b, "gelu").sum().backward()
    out = {}
    for launch in log:
        out.setdefault(launch.kernel, {k: v for k, v in launch.flags.items() if k not in cfg_fields})
    return out


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    raise TypeError(value)


def _key_cases():
    """(field, base launch, changed launch) for every field of a launch's tune key: device, kernel,
    every recorded constexpr flag, M bucket, N, K and dtype."""
    flags = _recorded_flags()["linear_fwd"]
    base = dict(device="H100", kernel="linear_fwd", flags=flags, M=512, N=256, K=384, dtype=torch.bfloat16)
    cases = [("device", dict(base, device="H200")), ("kernel", dict(base, kernel="linear_fwd_tma")),
             ("M bucket", dict(base, M=4096)), ("N", dict(base, N=512)), ("K", dict(base, K=768)),
             ("dtype", dict(base, dtype=torch.float32)), ("dtype fp16", dict(base, dtype=torch.float16))]
    cases += [(f"flag {name}", dict(base, flags=dict(flags, **{name: _other(v)})))
              for name, v in sorted(flags.items()) if not name.startswith("ACCUMULATE_")]
    return base, cases


@pytest.mark.parametrize("case", range(len(_key_cases()[1])), ids=lambda i: _key_cases()[1][i][0])
def test_tune_key_holds_every_field(tuner, case):
    """Two launches that differ only in one field are each tuned, and each gets a config from its own
    space (a key without the dtype would hand fp32 a 16-bit tile)."""
    base, cases = _key_cases()
    _, changed = cases[case]
    for launch in (base, changed):
        ran = []
        space = configs.candidates(launch["M"], launch["N"], launch["K"], launch["dtype"])
        best = configs.launch_config(launch["device"], launch["kernel"], launch["flags"], launch["M"], launch["N"],
                                     launch["K"], launch["dtype"], lambda c: c,
                                     lambda fn: (ran.append(fn()), 1.0 if ran[-1] == space[-1] else 2.0)[1])
        assert ran == space, f"{cases[case][0]}: not tuned (a cached result of another launch was reused)"
        assert best == space[-1]


def test_tune_key_fields_survive_the_disk_cache(tuner):
    """The on-disk key keeps the fields apart too: fp32 and bf16 results of one shape are two entries."""
    flags = _recorded_flags()["linear_fwd"]
    for dtype in (torch.bfloat16, torch.float32):
        space = configs.candidates(512, 256, 384, dtype)
        configs.launch_config("H100", "linear_fwd", flags, 512, 256, 384, dtype, lambda c: c,
                              lambda fn, s=space: 1.0 if fn() == s[-1] else 2.0)
    configs.clear_cache()  # memory forgotten: what follows comes from disk
    for dtype in (torch.bfloat16, torch.float32):
        got = configs.launch_config("H100", "linear_fwd", flags, 512, 256, 384, dtype, lambda c: c,
                                    lambda fn: pytest.fail("a result on disk was timed again"))
        assert got == configs.candidates(512, 256, 384, dtype)[-1]


# ---------------------------------------------------------------------------------- the TMA predicate

def _descriptor_operands(kernel):
    """Indices (into the kernel's arguments, = ``Problem.tensors``) of the pointers the kernel builds
    tensor descriptors on, read from its source."""
    names = re.findall(r"make_tensor_descriptor\(\s*(\w+)", inspect.getsource(kernel.fn))
    return sorted({kernel.arg_names.index(n) for n in names})


def _misaligned_like(t):
    """The same shape and dtype at a base address 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype)
    return flat[1:1 + t.numel()].view(t.shape)


TMA_ROWS = [v for v in variants.VARIANTS if v.descriptors]


def test_descriptor_operands_are_found():
    for v in TMA_ROWS:
        assert [v.kernel.arg_names[i] for i in _descriptor_operands(v.kernel)] == ["x_ptr", "w_ptr", "y_ptr", "z_ptr"]


@pytest.mark.parametrize("variant", TMA_ROWS, ids=lambda v: v.name)
@pytest.mark.parametrize("how", ["misaligned base", "72-byte rows"])
def test_tma_predicate_checks_every_descriptor_operand(variant, how):
    """For each operand the kernel addresses through a descriptor (x, weight, y, z: outputs included),
    that operand alone unaddressable makes the predicate refuse the problem."""
    M, N, K, dtype = 32, 64, 64, torch.bfloat16
    full = [randn(M, K, dtype=dtype), randn(N, K, dtype=dtype), randn(N, dtype=dtype), randn(M, N, dtype=dtype),
            randn(M, N, dtype=dtype)]
    flags = dict(ACT=0, HAS_BIAS=True, STORE_Z=True, INT64=False)
    assert variant.applies(variants.Problem(M, N, K, dtype, tuple(full), flags))  # the control
    for i in _descriptor_operands(variant.kernel):
        bad = list(full)
        if how == "misaligned base":
            bad[i] = _misaligned_like(full[i])
        else:  # 36 bf16 elements per row, in a 64-wide buffer: a row stride of 72 bytes
            rows, cols = full[i].shape
            bad[i] = torch.empty(rows * 36 + cols, dtype=dtype).as_strided((rows, cols), (36, 1))
        assert not variant.applies(variants.Problem(M, N, K, dtype, tuple(bad), flags)), (
            f"{variant.name}: {variant.kernel.arg_names[i]} ({how}) accepted")


@pytest.mark.parametrize("variant", [v.name for v in TMA_ROWS])
def test_forced_tma_forward_falls_back_on_a_72_byte_row_output(variant):
    """x and weight aligned, but y = (M, 36) bf16 has 72-byte rows: a forced TMA row must not run."""
    x, w = randn(24, 64, dtype=torch.bfloat16), randn(36, 64, dtype=torch.bfloat16)
    with variants.use(variant), record_launches() as log:
        y, _, _, _ = launchers.linear_forward(x, w)
    assert [launch.kernel for launch in log] == ["linear_fwd"]
    torch.testing.assert_close(y.float(), (x.double() @ w.double().t()).float(), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------ the int64 decision

HUGE = 2**31  # an element offset that wraps in int32


def _meta(shape, huge=False, dtype=torch.float32):
    """A meta tensor of ``shape``; with ``huge``, its first dimension's stride puts its last element past
    2³¹ (no memory is reserved: meta tensors have no storage)."""
    if not huge:
        return torch.empty(shape, device="meta", dtype=dtype)
    stride = (HUGE // max(shape[0] - 1, 1) + 1,) + tuple(1 for _ in shape[1:])
    return torch.empty_strided(shape, stride, device="meta", dtype=dtype)


@pytest.fixture
def captured_flags(monkeypatch):
    """Launches are recorded (flags per kernel direction) but never run: the tensors are meta tensors."""
    seen = {}

    def fake_launch(variant, grid, args, kwargs, *rest):
        seen.setdefault(variant.direction, []).append(kwargs)

    monkeypatch.setattr(launchers, "_launch_kernel", fake_launch)  # every Triton launch ends there
    return seen


FORWARD_ROLES = ["x", "weight", "bias", "outputs", "x_tangent", "weight_tangent", "bias_tangent"]


@pytest.mark.parametrize("role", FORWARD_ROLES)
def test_forward_int64_decision_sees_every_tensor(captured_flags, role):
    """Each tensor the forward (or its lockstep tangent kernel) addresses, alone past 2³¹ elements,
    switches the launch to 64-bit offsets; outputs are y, z, ẏ, ż (M·N ≥ 2³¹ with small x and W)."""
    M, N, K = (2**16, 2**15 + 1, 2) if role == "outputs" else (5, 6, 7)
    args = dict(x=_meta((M, K), role == "x"), weight=_meta((N, K), role == "weight"),
                bias=_meta((N,), role == "bias"), store_preact=True)
    for t in ("x_tangent", "weight_tangent", "bias_tangent"):
        args[t] = _meta(args[t.split("_")[0] if t != "x_tangent" else "x"].shape, role == t)
    args["store_preact_tangent"] = True
    launchers.linear_forward(activation="gelu", **args)
    (flags,) = captured_flags["fwd_tangent"]
    assert flags["INT64"], f"{role} past 2³¹ elements did not switch on 64-bit offsets"


def test_forward_int64_off_when_every_tensor_is_small(captured_flags):
    launchers.linear_forward(_meta((5, 7)), _meta((6, 7)), _meta((6,)), "gelu", True,
                             _meta((5, 7)), _meta((6, 7)), _meta((6,)), True)
    assert not captured_flags["fwd_tangent"][0]["INT64"]


BACKWARD_ROLES = ["grad_y", "x", "weight", "saved", "grad_x", "grad_w", "weight_grad_out", "input_grad_out"]


@pytest.mark.parametrize("role", BACKWARD_ROLES)
def test_backward_int64_decision_sees_every_tensor(captured_flags, role):
    """The same for the backward's GEMM launch and its dZ pass: inputs (dY, X, W, the saved Z), outputs
    (dX = M·K, dW = N·K past 2³¹ with a small dY), and the buffers it adds into."""
    M, N, K = 5, 6, 7
    if role == "grad_x":
        M, K = 2**16, 2**15 + 1
    if role == "grad_w":
        N, K = 2**16, 2**15 + 1
    gy, x, w = _meta((M, N), role == "grad_y"), _meta((M, K), role == "x"), _meta((N, K), role == "weight")
    saved = _meta((M, N), role == "saved")
    kw = {}
    if role == "weight_grad_out":
        kw["weight_grad_out"] = _meta((N, K), True)
    if role == "input_grad_out":
        kw["input_grad_out"] = _meta((M, K), True)
    launchers.linear_backward(gy, x, w, saved, "gelu", need_bias=True, **kw)
    assert captured_flags["bwd"][0]["INT64"], f"{role} past 2³¹ elements did not switch on 64-bit offsets"
    if role in ("grad_y", "saved"):  # the tensors the dZ pass reads
        assert captured_flags["dz"][0]["INT64"], f"dz pass: {role} past 2³¹ elements"


# ------------------------------------------------------------------------- accumulation precision

def _args_of(log, kernel, index):
    return [launch.args[index] for launch in log if launch.kernel == kernel]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_db_partial_sums_are_fp32(dtype):
    x, w, b = (randn(70, 24, dtype=dtype, requires_grad=True), randn(18, 24, dtype=dtype, requires_grad=True),
               randn(18, dtype=dtype, requires_grad=True))
    with record_launches() as log:
        fusedad.linear(x, w, b, "gelu").sum().backward()
    kernel = variants.by_name("linear_dz").kernel
    (partial,) = _args_of(log, "linear_dz", kernel.arg_names.index("dbp_ptr"))
    assert partial.dtype == _acc_dtype(dtype) and partial.shape[0] > 1


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_split_k_partial_products_are_fp32(dtype):
    x, w = randn(3, 300, dtype=dtype), randn(20, 300, dtype=dtype)
    with record_launches() as log:
        launchers.linear_forward(x, w)
    kernel = variants.by_name("linear_fwd_splitk").kernel
    (part,) = _args_of(log, "linear_fwd_splitk", kernel.arg_names.index("part_ptr"))
    assert part.dtype == _acc_dtype(dtype) and part.shape[0] > 1


@pytest.fixture
def lce_chunks(monkeypatch):
    """LM-head backward chunks of 16 classes, so that dX is summed over several."""
    monkeypatch.setattr(lce_kernels, "CHUNK_BYTES", 0)
    monkeypatch.setattr(lce_kernels, "MIN_CHUNK_CLASSES", 16)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_lm_head_sums_dx_over_chunks_and_db_in_fp32(dtype, lce_chunks):
    x, w, b = (randn(20, 24, dtype=dtype, requires_grad=True), randn(50, 24, dtype=dtype, requires_grad=True),
               randn(50, dtype=dtype, requires_grad=True))
    t = torch.randint(0, 50, (20,))
    with record_launches() as log:
        fusedad.linear_cross_entropy(x, w, t, linear_bias=b).backward()
    bwd = variants.by_name("linear_bwd").kernel
    dx_index, dw_index = bwd.arg_names.index("dx_ptr"), bwd.arg_names.index("dw_ptr")
    gemms = [launch for launch in log if launch.kernel == "linear_bwd"]
    assert len(gemms) == 4 and all(launch.flags["ACCUMULATE_DX"] for launch in gemms)
    assert all(launch.args[dx_index].dtype == _acc_dtype(dtype) for launch in gemms)
    assert len({launch.args[dx_index].data_ptr() for launch in gemms}) == 1  # one accumulator for all chunks
    assert all(launch.args[dw_index].dtype == dtype for launch in gemms)  # each chunk's dW rows: written once
    dbp = _args_of(log, "lce_dz", lce_kernels._lce_dz_kernel.arg_names.index("dbp_ptr"))
    assert len(dbp) == 4 and all(p.dtype == _acc_dtype(dtype) for p in dbp)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_main_grad_accumulates_in_its_own_fp32_buffer(dtype):
    layer = fusedad.nn.Linear(24, 18, dtype=dtype, accumulate_main_grad=True)
    with record_launches() as log:
        layer(randn(20, 24, dtype=dtype)).sum().backward()
    bwd = variants.by_name("linear_bwd").kernel
    (dw,) = [launch.args[bwd.arg_names.index("dw_ptr")] for launch in log if launch.kernel == "linear_bwd"]
    assert dw is layer.weight.main_grad and dw.dtype == _acc_dtype(dtype)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_large_m_bf16_bias_gradient_is_as_accurate_as_eager():
    """db = Σ over 8192 rows: fp32 partial sums round once, at the end. Measured ratio of our error to
    eager's (5 seeds, 64 columns): 0.58–0.75; with 16-bit partial sums (one rounding per 32-row block)
    1.38–1.89. The bound, 1.15×, separates the two."""
    M, N = 8192, 64
    z = randn(M, N, dtype=torch.bfloat16)
    dy = randn(M, N, dtype=torch.bfloat16)
    db = torch.empty(N, dtype=torch.bfloat16)
    from fusedad.activations import lookup

    launchers._dz_pass(dy, z, lookup("gelu"), db, launchers._common_flags(torch.bfloat16, dy, z), None)
    ref = (dy.double() * torch.func.grad(lambda t: torch.nn.functional.gelu(t).sum())(z.double())).sum(0)
    eager = torch.ops.aten.gelu_backward(dy, z).sum(0)
    assert _rel(db, ref) <= 1.15 * _rel(eager, ref), (_rel(db, ref), _rel(eager, ref))


def test_lm_head_bf16_dx_over_many_chunks_is_as_accurate_as_eager(lce_chunks):
    """dX summed over 32 class chunks (16 classes each) in fp32 and rounded once. Measured ratio of our
    error to eager's (4 seeds): 0.67–0.74; summed in bf16 2.18–2.56 (with 8 chunks only 1.11–1.33, too
    close to tell apart). The bound, 1.5×, separates the two."""
    M, K, V = 32, 32, 512
    x = randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    w = randn(V, K, dtype=torch.bfloat16, scale=0.3)
    t = torch.randint(0, V, (M,))
    with record_launches() as log:
        (dx,) = torch.autograd.grad(fusedad.linear_cross_entropy(x, w, t, reduction="sum"), x)
    assert sum(launch.kernel == "lce_dz" for launch in log) == V // 16
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.nn.functional.cross_entropy(x64 @ w.double().t(), t, reduction="sum"), x64)
    xe = x.detach().clone().requires_grad_()
    (eager,) = torch.autograd.grad(torch.nn.functional.cross_entropy(xe @ w.t(), t, reduction="sum"), xe)
    assert _rel(dx, ref) <= 1.5 * _rel(eager, ref), (_rel(dx, ref), _rel(eager, ref))


# ------------------------------------------------------------------------ main_grad on every path

def _main_grad_paths():
    """name -> backward(x, w, b, dy, main_grad): one micro-batch's backward on that path."""
    act = "gelu"

    def kernel(x, w, b, dy, mg):
        fusedad.linear(x, w, b, act, weight_main_grad=mg).backward(dy)

    def composite(x, w, b, dy, mg):  # create_graph: the differentiable (double-backward) path
        fusedad.linear(x, w, b, act, weight_main_grad=mg).backward(dy, create_graph=True)

    def eager_backend(x, w, b, dy, mg):
        from fusedad import activations, eager
        row = activations.lookup(act)
        y, z, _, _ = eager.linear_forward(x.detach(), w.detach(), b.detach(), row, store_preact=True)
        eager.linear_backward(dy, x.detach(), w.detach(), row.saved(y, z), row, weight_grad_out=mg)

    def module(x, w, b, dy, mg):
        layer = fusedad.nn.Linear(w.shape[1], w.shape[0], activation=act, accumulate_main_grad=True)
        layer.weight, layer.bias = w, b
        layer.weight.main_grad = mg
        layer(x).backward(dy)

    return dict(kernel=kernel, composite=composite, eager_backend=eager_backend, module=module)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("path", list(_main_grad_paths()))
def test_main_grad_is_added_into_on_every_backward_path(path):
    """Two micro-batches on the same main_grad (which starts non-zero): it ends at start + dW₁ + dW₂ and
    weight.grad stays None — on every path a backward can take."""
    backward = _main_grad_paths()[path]
    w = torch.nn.Parameter(randn(18, 24, scale=0.2))
    b = torch.nn.Parameter(randn(18))
    start = randn(18, 24)
    mg = start.clone()
    expected = start.double()
    for _ in range(2):
        x, dy = randn(20, 24, requires_grad=True), randn(20, 18)
        w64 = w.detach().double().requires_grad_()
        torch.nn.functional.gelu(torch.nn.functional.linear(x.detach().double(), w64, b.detach().double())).backward(
            dy.double())
        expected = expected + w64.grad
        backward(x, w, b, dy, mg)
    assert w.grad is None
    torch.testing.assert_close(mg.double(), expected, rtol=1e-5, atol=1e-5)


def test_main_grad_under_torch_func_is_refused_with_a_clear_error():
    """torch.func returns gradients instead of accumulating them: a weight the transform differentiates
    cannot also add into main_grad (functorch would refuse the in-place add with an error that does not
    name main_grad), so fusedad says so; a transform over the input alone leaves main_grad untouched."""
    w, b, x, dy = randn(18, 24), randn(18), randn(20, 24), randn(20, 18)
    mg = torch.zeros(18, 24)
    with pytest.raises(RuntimeError, match="weight_main_grad.*torch.func"):
        torch.func.grad(lambda ww: (fusedad.linear(x, ww, b, "gelu", weight_main_grad=mg) * dy).sum())(w)
    _, vjp = torch.func.vjp(lambda xx: fusedad.linear(xx, w, b, "gelu", weight_main_grad=mg), x)
    (dx,) = vjp(dy)
    assert torch.equal(mg, torch.zeros(18, 24))
    x64 = x.double().requires_grad_()
    torch.nn.functional.gelu(torch.nn.functional.linear(x64, w.double(), b.double())).backward(dy.double())
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ convert()

V_CLASSES, IN = 7, 12
TorchLCE = getattr(torch.nn, "LinearCrossEntropyLoss", None)


def _non_default_lce_args():
    """A value other than the default for every argument of torch.nn.LinearCrossEntropyLoss (the test
    fails if torch adds one that is not listed, so convert() is checked for it too)."""
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    values = dict(out_features=(2,), bias=True, dtype=torch.float64, reduction="sum",
                  weight=torch.rand(V_CLASSES, dtype=torch.float64) + 0.5, ignore_index=3, label_smoothing=0.1,
                  options=LinearCrossEntropyOptions(batch_chunk_size=4))
    params = set(inspect.signature(TorchLCE.__init__).parameters) - {"self", "in_features", "num_classes", "device"}
    assert params == set(values), f"torch.nn.LinearCrossEntropyLoss arguments changed: {params ^ set(values)}"
    return values


def _module_state(m):
    """What a module is: its public attributes, its parameters and its buffers (by name, as objects)."""
    attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
    return attrs, dict(m.named_parameters()), dict(m.named_buffers())


@pytest.mark.skipif(TorchLCE is None, reason="torch.nn.LinearCrossEntropyLoss needs PyTorch >= 2.13")
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ..options.. ignored")
@pytest.mark.parametrize("arg", ["all at once", "out_features", "bias", "dtype", "reduction", "weight",
                                 "ignore_index", "label_smoothing", "options"])
def test_convert_carries_every_argument_and_buffer_of_linear_cross_entropy(arg):
    """Each constructor argument alone (and all at once) set to a non-default value: the converted module
    has the same attributes, the same Parameter and buffer objects, and computes the same loss and
    gradients as torch's."""
    values = _non_default_lce_args()
    kw = values if arg == "all at once" else {arg: values[arg]}
    dtype = kw.get("dtype", torch.float32)
    if "weight" in kw:
        kw = dict(kw, weight=kw["weight"].to(dtype))
    torch_loss = TorchLCE(IN, V_CLASSES, **kw)
    attrs, params, buffers = _module_state(torch_loss)
    fused = fusedad.convert(torch_loss)
    assert isinstance(fused, fusedad.nn.LinearCrossEntropyLoss)
    f_attrs, f_params, f_buffers = _module_state(fused)
    for name, value in attrs.items():
        if name == "linear":
            continue
        assert name in f_attrs and (f_attrs[name] is value or f_attrs[name] == value), name
    assert f_params.keys() == params.keys() and all(f_params[k] is v for k, v in params.items())
    assert f_buffers.keys() == buffers.keys() and all(f_buffers[k] is v for k, v in buffers.items())
    extra = kw.get("out_features", ())
    x = randn(9, IN, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V_CLASSES, (9, *extra))
    t[0] = kw.get("ignore_index", -100)
    ref = TorchLCE.forward(torch_loss, x, t)
    out = fused(x, t)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    grads = torch.autograd.grad(out.sum(), [x, *params.values()])
    ref_grads = torch.autograd.grad(ref.sum(), [x, *params.values()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("kw", [dict(bias=False), dict(bias=True), dict(dtype=torch.float64)], ids=str)
def test_convert_carries_every_argument_of_linear(kw):
    layer = torch.nn.Linear(IN, V_CLASSES, **kw)
    params = set(inspect.signature(torch.nn.Linear.__init__).parameters) - {"self", "device"}
    assert params == {"in_features", "out_features", "bias", "dtype"}, params
    attrs, p, b = _module_state(layer)
    fused = fusedad.convert(layer)
    f_attrs, f_p, f_b = _module_state(fused)
    assert all(f_attrs[k] == v for k, v in attrs.items())
    assert f_p.keys() == p.keys() and all(f_p[k] is v for k, v in p.items()) and f_b.keys() == b.keys()
    assert fused.weight.dtype == kw.get("dtype", torch.float32)


LCE_ROLES = ["x", "weight", "bias", "class_weight", "target"]


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("role", LCE_ROLES)
def test_lm_head_int64_decision_sees_every_tensor(monkeypatch, direction, role):
    """The LM head's kernels too: each tensor they address, alone past 2³¹ elements (a strided view),
    switches their launches to 64-bit offsets."""
    seen = []
    monkeypatch.setattr(lce_kernels, "_run", lambda name, kernel, grid, args, flags, *rest: seen.append(flags))
    monkeypatch.setattr(launchers, "_launch_kernel", lambda *a, **k: None)
    M, K, V = 5, 7, 6
    x, w = _meta((M, K), role == "x"), _meta((V, K), role == "weight")
    b, cw = _meta((V,), role == "bias"), _meta((V,), role == "class_weight")
    t = _meta((M,), role == "target", dtype=torch.int64)
    if direction == "forward":
        lce_kernels.lce_forward(x, w, b, t, cw, 0.0, True)
    else:
        stats = [_meta((M,)) for _ in range(4)]
        lce_kernels.lce_backward(x, w, b, t, cw, 0.0, stats[0], stats[1], stats[2], stats[3], True, True, True)
    assert seen and all(flags["INT64"] for flags in seen), f"{role} past 2³¹ elements: {seen}"

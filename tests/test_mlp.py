"""The fused MLP blocks (fusedad.functional.mlp / gated_mlp, fusedad.nn.MLP / GatedMLP) against float64
and eager references, what they save and launch, and their autograd modes.

Shapes are small and deliberately not multiples of the interpreter's 16…64 tiles (CI runs the kernels
through Triton's interpreter on two cores)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fusedad
import fusedad.testing as ft
from fusedad.functional import gated_mlp, mlp
from fusedad.kernels import force_int64, record_launches

from conftest import ACTS, DTYPES, runs_kernels

backend = importlib.import_module("fusedad.backend")  # the module (fusedad.backend is also a function)

# (M, K, I, N): every dimension off the tile grid; I spans two 64-wide tiles under the interpreter.
SHAPE = (20, 24, 72, 18)
# The activation × dtype matrix: one tile per launch, the cheapest shape that is still off the grid.
SMALL = (12, 16, 24, 10)
# Every reduction (K, N, I, M) longer than the interpreter's 64-deep K step: the K loops iterate.
DEEP = (70, 72, 80, 66)
# gradcheck's finite differences in fast mode (one random direction: a wrong gradient still fails it);
# the full mode takes ~40 s per block on the CI machines.
FAST = dict(fast_mode=True)
FORMS = ["gated", "plain"]
#: Where the block kernels run: CUDA where there is one, else the CPU through Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not runs_kernels(DEVICE), reason="no device runs the block kernels here (no GPU, and "
                                "the interpreter is off: conftest sets TRITON_INTERPRET=1 only without a GPU)")


def _block(form):
    return gated_mlp if form == "gated" else mlp


def _inputs(form, dtype=torch.float32, shape=SHAPE, **kw):
    return ft.block_inputs(form == "gated", shape, dtype, device=kw.pop("device", DEVICE), **kw)


def _call(form, tensors, act, **kw):
    return ft.call_block(_block(form), form == "gated", tensors, act, **kw)


def _kinds(log):
    return [launch.kernel for launch in log]


# ---- values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("form", FORMS)
def test_block_matches_references(form, act, dtype):
    """Every activation of the table × every dtype, with biases: forward and all seven gradients."""
    ft.check_block_against_references(_block(form), *_inputs(form, dtype, shape=SMALL), activation=act,
                                      gated=form == "gated", context=f"{form} {dtype}")


@pytest.mark.parametrize("form", FORMS)
def test_block_with_several_k_steps(form):
    """Every product's K loop runs more than once (pointer advances, masks of the last step)."""
    ft.check_block_against_references(_block(form), *_inputs(form, shape=DEEP), activation="gelu_tanh",
                                      gated=form == "gated")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["no_bias", "packed", "packed_bias", "recompute"])
def test_gated_variants_match_references(case, dtype):
    kw = dict(bias=case in ("packed_bias", "recompute"), packed=case.startswith("packed"))
    extra = dict(recompute=True) if case == "recompute" else {}
    ft.check_block_against_references(gated_mlp, *_inputs("gated", dtype, **kw), activation="silu", gated=True,
                                      context=case, **extra)


@pytest.mark.parametrize("case", ["no_bias", "recompute"])
def test_plain_variants_match_references(case):
    extra = dict(recompute=True) if case == "recompute" else {}
    ft.check_block_against_references(mlp, *_inputs("plain", torch.bfloat16, bias=case != "no_bias"),
                                      activation="gelu_tanh", gated=False, context=case, **extra)


@pytest.mark.parametrize("form", FORMS)
def test_transposed_strided_and_batched_operands(form):
    """Weights stored transposed, a sliced input, a 3-D input and a non-contiguous dY: no copies needed,
    same results."""
    M, K, I, N = SHAPE
    _, w_in, w_up, w_out, b_in, b_up, b_out = [t.detach() if t is not None else None for t in _inputs(form)]
    x = torch.randn(2, M, 2 * K, device=DEVICE)[:, :, ::2].requires_grad_()  # (2, M, K), K stride 2
    w_in = w_in.t().contiguous().t().requires_grad_()  # (I, K) stored (K, I)
    w_out = w_out.t().contiguous().t().requires_grad_()
    w_up = w_up.t().contiguous().t().requires_grad_() if w_up is not None else None
    dy = torch.randn(N, 2, M, device=DEVICE).permute(1, 2, 0)  # (2, M, N), non-contiguous
    ft.check_block_against_references(_block(form), x, w_in, w_up, w_out, b_in, b_up, b_out, activation="gelu",
                                      gated=form == "gated", dy=dy, context="strided")


@pytest.mark.parametrize("form", FORMS)
def test_int64_offsets(form):
    """The 64-bit index path of the three block kernels (forced on a small shape)."""
    with force_int64(), record_launches() as log:
        ft.check_block_against_references(_block(form), *_inputs(form), activation="silu", gated=form == "gated")
    assert log and all(launch.flags["INT64"] for launch in log)


@pytest.mark.parametrize("form", FORMS)
def test_empty_batch(form):
    t = list(_inputs(form, shape=(0, 8, 12, 6)))
    y = _call(form, t, "silu")
    assert y.shape == (0, 6)
    grads = torch.autograd.grad(y.sum(), [u for u in t if u is not None])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---- what is saved, written and launched ------------------------------------------------------------


def _saved_activation_tensors(fn, params):
    """Tensors saved for backward during fn(), parameters left out (they are references, not copies)."""
    saved = []
    param_ptrs = {p.data_ptr() for p in params}

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_saves_only_input_and_preactivations(form, recompute):
    M, K, I, N = SHAPE
    t = _inputs(form, torch.bfloat16)
    params = [u for u in t[1:] if u is not None]
    y, saved = _saved_activation_tensors(lambda: _call(form, t, "silu", recompute=recompute), params)
    shapes = sorted(tuple(s.shape) for s in saved)
    expected = [(M, K)] if recompute else sorted([(M, K), (M, I)] + ([(M, I)] if form == "gated" else []))
    assert shapes == expected, shapes
    assert any(s is t[0] for s in saved)  # the input itself, not a copy
    y.backward(torch.randn_like(y))  # and the backward works from just that


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no_requires_grad"])
@pytest.mark.parametrize("form", FORMS)
def test_inference_saves_and_writes_no_preactivation(form, mode):
    t = _inputs(form, requires_grad=mode != "no_requires_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with ctx(), record_launches() as log:
        y = _call(form, t, "gelu")
    assert y.grad_fn is None
    up = log[0]
    assert up.kernel == ("mlp_gated_up" if form == "gated" else "linear_fwd")
    assert not up.flags["STORE_PRE" if form == "gated" else "STORE_Z"]
    assert _kinds(log)[1:] == ["linear_fwd"]


@pytest.mark.parametrize("form", FORMS)
def test_backward_has_no_dz_pass(form):
    """The activation's backward runs in the down projection's dX GEMM epilogue: no elementwise dZ launch,
    and every bias gradient comes from that kernel's partial sums."""
    t = _inputs(form)
    y = _call(form, t, "gelu_tanh")
    with record_launches() as log:
        y.backward(torch.randn_like(y))
    expected = ["mlp_down_bwd", "linear_bwd", "mlp_gated_dual_bwd" if form == "gated" else "linear_bwd"]
    assert _kinds(log) == expected
    down = log[0].flags
    assert down["BIAS_PRE"] and down["BIAS_DOWN"] and down["STORE_H"] and down["COMPUTE_DPRE"]
    assert all(launch.flags.get("ACT", 0) == 0 for launch in log[1:])  # no activation left for the GEMMs
    assert "linear_dz" not in _kinds(log)


@pytest.mark.parametrize("form", FORMS)
def test_recompute_replays_only_the_up_projection(form):
    t = _inputs(form)
    y = _call(form, t, "silu", recompute=True)
    with record_launches() as log:
        y.backward(torch.randn_like(y))
    up = "mlp_gated_up" if form == "gated" else "linear_fwd"
    assert _kinds(log)[:2] == [up, "mlp_down_bwd"]


def test_frozen_weights_do_no_weight_gradient_work():
    """LoRA-style training of a frozen base: only the input needs a gradient. No dW_d GEMM, H not
    written, the dual grid holds dX tiles only."""
    M, K, I, N = SHAPE
    x, w_in, w_up, w_out = (t.detach() for t in _inputs("gated", bias=False)[:4])
    x.requires_grad_()
    y = gated_mlp(x, w_in, w_up, w_out, "silu")
    dy = torch.randn_like(y)
    with record_launches() as log:
        (dx,) = torch.autograd.grad(y, [x], dy)
    assert _kinds(log) == ["mlp_down_bwd", "mlp_gated_dual_bwd"]
    down, dual = log[0], log[1]
    assert not down.flags["STORE_H"] and down.flags["COMPUTE_DPRE"]
    assert not dual.flags["COMPUTE_DWG"] and not dual.flags["COMPUTE_DWU"] and dual.flags["COMPUTE_DX"]
    cfg = dual.flags
    tiles_dx = -(-M // cfg["BLOCK_M"]) * -(-K // cfg["BLOCK_N"])
    assert dual.grid == (tiles_dx,)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(ft.reference_block(x64, w_in.double(), w_up.double(), w_out.double()), [x64],
                                 dy.double())
    assert ft.rel_err(dx, ref) < 1e-5


@pytest.mark.parametrize("frozen", ["gate", "up", "down", "gate_up"])
def test_partly_frozen_weights(frozen):
    """Each frozen weight gets no gradient and its dW tiles are not launched; the rest match references."""
    t = [u.detach() if u is not None else None for u in _inputs("gated")]
    names = {"gate": [1], "up": [2], "down": [3], "gate_up": [1, 2]}[frozen]
    for i, u in enumerate(t):
        if u is not None and i not in names:
            u.requires_grad_()
    with record_launches() as log:
        ft.check_block_against_references(gated_mlp, *t, activation="relu2", gated=True, context=frozen)
    flags = {launch.kernel: launch.flags for launch in log}
    assert flags["mlp_gated_dual_bwd"]["COMPUTE_DWG"] == (1 not in names)
    assert flags["mlp_gated_dual_bwd"]["COMPUTE_DWU"] == (2 not in names)
    assert flags["mlp_down_bwd"]["STORE_H"] == (3 not in names)


def test_packed_gate_up_weight_is_read_in_place():
    M, K, I, N = SHAPE
    t = _inputs("gated", packed=True)
    packed = t[1]
    with record_launches() as log:
        y = ft.call_block(gated_mlp, True, t, "silu")
        y.backward(torch.randn_like(y))
    up = next(launch for launch in log if launch.kernel == "mlp_gated_up")
    wg, wu = up.args[1], up.args[2]
    assert wg.data_ptr() == packed.data_ptr()
    assert wu.data_ptr() == packed.data_ptr() + I * packed.stride(0) * packed.element_size()
    assert packed.grad.shape == (2 * I, K)


# ---- modes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form,act", [("gated", "silu"), ("gated", "relu"), ("plain", "gelu"), ("plain", "relu2")])
def test_gradcheck(form, act):
    assert ft.block_gradcheck(gated=form == "gated", activation=act, **FAST)


def test_gradcheck_packed_and_recompute():
    assert ft.block_gradcheck(gated=True, activation="gelu_tanh", packed=True, **FAST)
    assert ft.block_gradcheck(lambda *a, **k: gated_mlp(*a, recompute=True, **k), gated=True, activation="silu",
                              **FAST)


def test_gradgradcheck():
    """Double backward (composite: the block recomputed as differentiable per-layer ops) by finite
    differences; the plain block (the gated one is checked against float64 below: ~3× the launches)."""
    assert ft.block_gradgradcheck(gated=False, activation="silu", **FAST)


@pytest.mark.parametrize("form", FORMS)
def test_double_backward_matches_float64(form):
    """d/dθ of (∂L/∂x · v) — a Hessian-vector product through create_graph=True — against float64."""
    t = [u for u in _inputs(form, torch.float64, shape=(5, 6, 7, 4))]
    t64 = [u.detach().clone().requires_grad_() if u is not None else None for u in t]
    v = torch.randn(5, 6, dtype=torch.float64, device=DEVICE)
    results = []
    for tensors, fn in ((t, lambda ts: _call(form, ts, "gelu")),
                        (t64, lambda ts: ft.reference_block(*ts, activation="gelu", gated=form == "gated"))):
        y = fn(tensors)
        (gx,) = torch.autograd.grad(y.square().sum(), [tensors[0]], create_graph=True)
        leaves = [u for u in tensors if u is not None]
        results.append(torch.autograd.grad((gx * v).sum(), leaves))
    for ours, ref in zip(*results):
        assert ft.rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("form", FORMS)
def test_forward_ad(form):
    assert ft.block_forward_ad_check(gated=form == "gated", activation="gelu", **FAST)


def test_torch_func_grad_and_vmap():
    t = [u.detach() for u in _inputs("gated", torch.float64, bias=False)[:4]]
    x, wg, wu, wd = t

    def loss(x, wg):
        return gated_mlp(x, wg, wu, wd, "silu").square().sum()

    gx, gw = torch.func.grad(loss, argnums=(0, 1))(x, wg)
    x64, w64 = x.clone().requires_grad_(), wg.clone().requires_grad_()
    rx, rw = torch.autograd.grad(ft.reference_block(x64, w64, wu, wd).square().sum(), [x64, w64])
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    ys = torch.func.vmap(lambda xi: gated_mlp(xi, wg, wu, wd, "silu"))(x.view(4, 5, -1))
    torch.testing.assert_close(ys.reshape(x.shape[0], -1), ft.reference_block(x, wg, wu, wd))


def test_autocast_matches_linear_semantics():
    """Under autocast (bf16) the block computes in bf16 like nn.Linear, gradients return in fp32."""
    t = _inputs("gated", torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = ft.call_block(gated_mlp, True, t, "silu")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(u.grad is not None and u.grad.dtype == torch.float32 for u in t if u is not None)
    t16 = [u.detach().bfloat16().requires_grad_() if u is not None else None for u in t]
    ref = ft.call_block(gated_mlp, True, t16, "silu")
    torch.testing.assert_close(y, ref)


# ---- modules ----------------------------------------------------------------------------------------


class _LlamaMLP(torch.nn.Module):
    """The Hugging Face Llama MLP's layout, in eager PyTorch."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _TimmMlp(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_modules_load_hugging_face_and_timm_state_dicts():
    x = torch.randn(3, 7, 24, device=DEVICE)
    llama = _LlamaMLP(24, 40).to(DEVICE)
    ours = fusedad.nn.GatedMLP(24, 40, device=DEVICE)
    ours.load_state_dict(llama.state_dict())
    assert isinstance(ours.gate_proj, fusedad.nn.Linear)
    torch.testing.assert_close(ours(x), llama(x))
    timm = _TimmMlp(24, 40).to(DEVICE)
    ours = fusedad.nn.MLP(24, 40, device=DEVICE)
    ours.load_state_dict(timm.state_dict())
    assert ours.fc2.out_features == 24
    torch.testing.assert_close(ours(x), timm(x))


@pytest.mark.parametrize("form", FORMS)
def test_accumulate_main_grad(form):
    """Children with accumulate_main_grad: dW is added into fp32 main_grad over two micro-batches."""
    torch.manual_seed(1)
    m = (fusedad.nn.GatedMLP(24, 40, bias=True) if form == "gated" else fusedad.nn.MLP(24, 40)).to(DEVICE, torch.bfloat16)
    ref = [p.detach().double().requires_grad_() for p in m.parameters()]
    for layer in m.children():
        layer.accumulate_main_grad = True
    xs = [torch.randn(9, 24, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    for x in xs:
        m(x).float().sum().backward()
    names = [n for n, _ in m.named_parameters()]
    refp = dict(zip(names, ref))
    for x in xs:
        if form == "gated":
            y = ft.reference_block(x.double(), refp["gate_proj.weight"], refp["up_proj.weight"], refp["down_proj.weight"],
                                   refp["gate_proj.bias"], refp["up_proj.bias"], refp["down_proj.bias"])
        else:
            y = ft.reference_block(x.double(), refp["fc1.weight"], None, refp["fc2.weight"], refp["fc1.bias"], None,
                                   refp["fc2.bias"], activation="gelu", gated=False)
        y.sum().backward()
    for (name, p), r in zip(m.named_parameters(), ref):
        if name.endswith("weight"):
            assert p.grad is None and p.main_grad.dtype == torch.float32
            assert ft.rel_err(p.main_grad, r.grad) < 2e-2, name
        else:
            assert ft.rel_err(p.grad, r.grad) < 2e-2, name


def test_eager_backend_has_the_same_semantics(monkeypatch):
    """CPU without the interpreter runs the eager mirror of the block kernels: same results, same saved
    tensors, no launches."""
    monkeypatch.setitem(backend._BY_DEVICE_TYPE, ("cpu", False), backend._BACKENDS[backend.EAGER])
    assert fusedad.backend(torch.device("cpu")) == "eager"
    for form, packed in (("gated", False), ("gated", True), ("plain", False)):
        t = _inputs(form, packed=packed, device="cpu")
        with record_launches() as log:
            ft.check_block_against_references(_block(form), *t, activation="relu", gated=form == "gated")
            _, saved = _saved_activation_tensors(lambda: _call(form, t, "relu"), [u for u in t[1:] if u is not None])
        assert log == []
        assert len(saved) == (3 if form == "gated" else 2)


# ---- errors -----------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    x, wg, wu, wd = (t.detach() for t in _inputs("gated", bias=False)[:4])
    with pytest.raises(RuntimeError, match=r"w_up must have shape \(72, 24\).*got \(72, 23\)"):
        gated_mlp(x, wg, wu[:, :23], wd)
    with pytest.raises(RuntimeError, match=r"w_down must have shape \(\*, 72\)"):
        gated_mlp(x, wg, wu, wd[:, :5])
    with pytest.raises(RuntimeError, match=r"even number of rows.*\(71, 24\)"):
        gated_mlp(x, wg[:71], None, wd)
    with pytest.raises(RuntimeError, match="same dtype.*w_up: torch.float64"):
        gated_mlp(x, wg, wu.double(), wd)
    with pytest.raises(RuntimeError, match=r"b1 must have shape \(72,\)"):
        mlp(x, wg, torch.zeros(3), wd, None)
    with pytest.raises(ValueError, match="unknown activation"):
        gated_mlp(x, wg, wu, wd, "swish")
    with pytest.raises(TypeError, match="int64"):
        gated_mlp(x.long(), wg, wu, wd)


# ---- graph capture and docs -------------------------------------------------------------------------


def test_compile_fullgraph_runs_the_block_ops():
    """torch.compile(fullgraph=True) traces a block as the fusedad::mlp_fwd custom op (its registered
    backward: fusedad::mlp_bwd) without graph breaks. aot_eager: Dynamo and AOTAutograd as Inductor gets
    them, without Inductor's ~30 s CPU codegen."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    t = _inputs("gated", bias=True)
    f = torch.compile(lambda *a: gated_mlp(*a[:4], "silu", *a[4:]), fullgraph=True, backend=backend)
    y = f(*t)
    assert "fusedad.mlp_fwd" in graphs[0] and "linear_fwd" not in graphs[0]
    leaves = [u for u in t if u is not None]
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    t64 = [u.detach().double().requires_grad_() for u in leaves]
    ref = ft.reference_block(*t64)
    ref_grads = torch.autograd.grad(ref, t64, torch.ones_like(ref))
    assert ft.rel_err(y, ref) < 1e-5
    assert all(ft.rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("form,packed,store", [("gated", True, True), ("plain", False, False)])
def test_opcheck_block_ops(form, packed, store):
    """Schema, fake (meta) kernels, the registered autograd (fusedad::mlp_bwd, recomputing when nothing was
    stored) and AOT dispatch of the block's custom ops. (Each opcheck runs the op ~10 times: two cases.)"""
    t = [u.detach().requires_grad_() if u is not None else None
         for u in _inputs(form, torch.float64, shape=(5, 6, 7, 4), packed=packed)]
    torch.library.opcheck(torch.ops.fusedad.mlp_fwd.default, (*t, "gelu", form == "gated", packed, store))


def test_export_records_the_block_op():
    m = fusedad.nn.MLP(16, 24, activation="gelu_tanh", device=DEVICE)
    ep = torch.export.export(m, (torch.randn(4, 16, device=DEVICE),))
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "fusedad" in str(n.target)]
    assert ops == ["fusedad.mlp_fwd.default"]
    x = torch.randn(4, 16, device=DEVICE)  # fresh values, the exported (static) batch size
    torch.testing.assert_close(ep.module()(x), m(x))


def test_docs_examples_run():
    """Every python block of docs/mlp-blocks.md runs as pasted."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "mlp-blocks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/mlp-blocks.md block {i}", "exec"), {})

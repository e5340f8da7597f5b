"""fusedad across processes: DTensor (tensor and sequence parallel), FSDP2, DDP, and tensor subclasses.

The multi-process checks run in ONE spawn of 2 gloo ranks on CPU (``ranks`` below, shared by the tests
of this module): each check writes what it measured per rank, and the tests compare that with a
single-process run of the same global batch made here. The ranks run the kernels through Triton's
interpreter (set for the children even where the parent has a GPU), so the recorded launches show the
shapes the kernels actually ran on.
"""
import contextlib
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fusedad
from conftest import kernel_kinds, randn
from fusedad.kernels import record_launches

WORLD = 2
SPAWN_TIMEOUT_S = 300  # the whole spawn (both ranks, every check); killed past it
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a rank waiting on a dead peer raises instead of hanging

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

# ---- the spawn -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spawn_two_ranks(worker, args, timeout=SPAWN_TIMEOUT_S):
    """Run worker(rank, *args) on 2 spawned processes; kill them and fail the test past ``timeout`` s.

    The children run the kernels through Triton's interpreter (CPU tensors, gloo), also on a GPU machine.
    """
    import torch.multiprocessing as mp

    with _env(TRITON_INTERPRET="1"):
        ctx = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {timeout} s")


def _init(rank, store):
    # A file store: no TCP port to pick (a port race between concurrent test runs could hang).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=COLLECTIVE_TIMEOUT)


def _exit():
    dist.destroy_process_group()
    # Skip interpreter finalisation: with torch 2.13 (CPU, gloo) a spawned rank sometimes hangs at exit
    # after destroy_process_group — plain nn.Linear DDP too (2 of 8 runs, 2026-11-26); os._exit never did.
    os._exit(0)


def _checks_worker(rank, store, out_dir, cases):
    """Every check of ``CHECKS`` in turn; each writes ``<name>.rank<r>.pt`` (its results, or the error)."""
    _init(rank, store)
    for name, check in CHECKS.items():
        torch.manual_seed(0)
        try:
            result = check(rank, cases.get(name))
        except Exception:  # recorded: the test of that check fails with it, the other checks still run
            result = {"error": traceback.format_exc()}
        torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    _exit()


class Ranks:
    def __init__(self, out_dir, cases):
        self.out_dir, self.cases = out_dir, cases

    def __call__(self, name):
        """[rank 0's results, rank 1's results] of a check; fails the test with a rank's error."""
        results = []
        for rank in range(WORLD):
            path = self.out_dir / f"{name}.rank{rank}.pt"
            assert path.exists(), f"rank {rank} wrote no result for {name!r}"
            result = torch.load(path, weights_only=False)
            if "error" in result:
                pytest.fail(f"rank {rank} failed in {name!r}:\n{result['error']}")
            results.append(result)
        return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cases = {name: make() for name, make in CASES.items()}
    _spawn_two_ranks(_checks_worker, (str(out_dir / "store"), str(out_dir), cases))
    return Ranks(out_dir, cases)


# ---- helpers shared by the ranks and the tests ------------------------------------------------------

def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _shapes(log, kernels, count):
    """(kernel, [shapes of its first ``count`` tensor arguments]) for the launches of the given kernels."""
    return [(launch.kernel, [tuple(a.shape) for a in launch.args if isinstance(a, torch.Tensor)][:count])
            for launch in log if launch.kernel in kernels]


def _fwd(log):
    """The forward launches: ("linear_fwd", [x's shape, weight's shape]) whichever forward variant ran
    (pointer, TMA or split-K decode; the split-K reduce launch, which takes no x or weight, left out)."""
    kinds = kernel_kinds(log)
    launches = [launch for launch in log if launch.kernel != "linear_fwd_splitk_reduce"]
    return [(kind, [tuple(a.shape) for a in launch.args if isinstance(a, torch.Tensor)][:2])
            for kind, launch in zip(kinds, launches) if kind == "linear_fwd"]


def _bwd(log):
    """The backward's product launches: (kernel, [dZ's (or dY's) shape, x's, weight's])."""
    return _shapes(log, ("linear_bwd", "linear_bwd_prologue"), 3)


def _act_module(act):
    return {None: nn.Identity(), "gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[act]


def _mlp(acts, sizes=(8, 16, 6), fused=True):
    """Two layers (sizes[0] -> sizes[1] -> sizes[2]) with activations acts; fused: fusedad layers, else
    nn.Linear followed by the activation module; the same parameters every time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(sizes[i], sizes[i + 1]) for i in range(2)]
        return (_Fused if fused else _Plain)(layers, acts)


class _Fused(nn.Module):
    def __init__(self, layers, acts):
        super().__init__()
        self.fc0 = fusedad.nn.Linear(*layers[0].weight.shape[::-1], activation=acts[0])
        self.fc1 = fusedad.nn.Linear(*layers[1].weight.shape[::-1], activation=acts[1])
        self.fc0.load_state_dict(layers[0].state_dict())
        self.fc1.load_state_dict(layers[1].state_dict())

    def forward(self, x):
        return self.fc1(self.fc0(x))


class _Plain(nn.Module):
    def __init__(self, layers, acts):
        super().__init__()
        self.fc0, self.fc1 = layers
        self.act0, self.act1 = _act_module(acts[0]), _act_module(acts[1])

    def forward(self, x):
        return self.act1(self.fc1(self.act0(self.fc0(x))))


def _grads(model):
    """{name: (full gradient, placements or None)}"""
    return {name: _full(p.grad) for name, p in model.named_parameters()}


def _assert_grads_match(got, model, **tol):
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name][0], p.grad, msg=lambda m: f"{name}: {m}", **tol)


# ---- tensor parallel: fusedad.linear on DTensors of every placement ---------------------------------
#
# Each combination: fusedad.linear(x, w, b, act) on DTensors, against act(F.linear(x, w, b)) on the same
# DTensors (DTensor's own strategies for aten ops: the placements to expect) and against one process.

_COMBOS = {
    # name: (x dims, x placement, w placement, b placement, local x rows x cols, local w shape)
    "replicate": (2, "R", "R", "R", (6, 8), (6, 8)),
    "colwise": (2, "R", "S0", "S0", (6, 8), (3, 8)),
    "rowwise": (2, "S-1", "S1", "R", (6, 4), (6, 4)),
    "rows": (2, "S0", "R", "R", (3, 8), (6, 8)),
    "sequence": (3, "S1", "R", "R", (2 * 3, 8), (6, 8)),  # (2, 6, 8) sharded on the sequence dim
    "partial_x": (2, "P", "R", "R", (6, 8), (6, 8)),
}
_COMBO_ACTS = (None, "gelu")  # relu (act' read from y) runs in the MLP checks


def _combo_case():
    xs = {2: randn(6, 8), 3: randn(2, 6, 8)}
    return dict(xs=xs, w=randn(6, 8), b=randn(6), gs={2: randn(6, 6), 3: randn(2, 6, 6)})


def _placement(code):
    from torch.distributed.tensor import Partial, Replicate, Shard

    return {"R": Replicate(), "P": Partial(), "S0": Shard(0), "S1": Shard(1), "S-1": Shard(-1)}[code]


def _dtensor_leaf(full, code, mesh):
    """(leaf, DTensor holding ``full`` with placement ``code``). Partial: the leaf is this rank's plain
    addend (the ranks' addends sum to ``full``); its gradient is then the global one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if code == "P":
        leaf = (full * (dist.get_rank() + 1) / sum(range(1, WORLD + 1))).requires_grad_()
        return leaf, DTensor.from_local(leaf, mesh, [_placement("P")])
    leaf = distribute_tensor(full, mesh, [_placement(code)]).requires_grad_()
    return leaf, leaf


def _full(t):
    """(the global tensor, its placements) of a DTensor; (t, None) for a plain tensor."""
    return (t.full_tensor(), tuple(t.placements)) if hasattr(t, "full_tensor") else (t, None)


def _check_combos(rank, case):
    mesh = _mesh()
    out = {}
    for name, (ndim, xp, wp, bp, _, _) in _COMBOS.items():
        for act in _COMBO_ACTS:
            runs = {}
            for impl in ("fused", "aten"):
                x_leaf, x = _dtensor_leaf(case["xs"][ndim], xp, mesh)
                w, _ = _dtensor_leaf(case["w"], wp, mesh)
                b, _ = _dtensor_leaf(case["b"], bp, mesh)
                with record_launches() as fwd_log:
                    if impl == "fused":
                        y = fusedad.linear(x, w, b, act)
                    else:
                        y = fusedad.activations.lookup(act).apply(F.linear(x, w, b))
                placements = tuple(y.placements)
                with record_launches() as bwd_log:
                    (y.full_tensor() * case["gs"][ndim]).sum().backward()
                runs[impl] = dict(y=y.full_tensor().detach(), placements=placements,
                                  grads={n: _full(t.grad) for n, t in (("x", x_leaf), ("w", w), ("b", b))},
                                  fwd=_fwd(fwd_log), bwd=_bwd(bwd_log))
            out[(name, act)] = runs
    return out


@needs_gloo
@pytest.mark.parametrize("combo", list(_COMBOS))
def test_dtensor_placements_values_and_local_shapes(ranks, combo):
    """fusedad.linear on DTensors: the output and every gradient on the placements DTensor gives
    act(F.linear(...)) on the same DTensors, the values of one process, the kernels on the local shards."""
    from torch.distributed.tensor import Shard

    ndim, _, _, _, x_local, w_local = _COMBOS[combo]
    case = ranks.cases["combos"]
    for rank, result in enumerate(ranks("combos")):
        for act in _COMBO_ACTS:
            fused, aten = result[(combo, act)]["fused"], result[(combo, act)]["aten"]
            where = f"rank {rank}, {combo}, activation={act}"
            rows_local, n_local = x_local[0], (w_local[0] if combo != "rowwise" else 6)
            if combo == "partial_x" and act is not None:
                # The partial input must be reduced before the activation. For fusedad's op DTensor's
                # cheapest choice is a reduce-scatter into rows (the kernel then runs on half the rows);
                # for act(F.linear(...)) it all-reduces F.linear's partial output. Both are right; the
                # gradients' placements follow from that choice, their values are checked below.
                assert fused["placements"] == (Shard(0),), (where, fused["placements"])
                rows_local = x_local[0] // WORLD
            else:
                assert fused["placements"] == aten["placements"], where
                for n in ("x", "w", "b"):
                    assert fused["grads"][n][1] == aten["grads"][n][1], (where, n, fused["grads"][n], aten["grads"][n])
            if act is not None:
                assert not any(p.is_partial() for p in fused["placements"]), where
            # one process, the global tensors
            x, w, b = (case["xs"][ndim].clone().requires_grad_(), case["w"].clone().requires_grad_(),
                       case["b"].clone().requires_grad_())
            y = fusedad.activations.lookup(act).apply(F.linear(x, w, b))
            (y * case["gs"][ndim]).sum().backward()
            torch.testing.assert_close(fused["y"], y.detach(), msg=lambda m: f"{where}: {m}")
            for n, t in (("x", x), ("w", w), ("b", b)):
                torch.testing.assert_close(fused["grads"][n][0], t.grad, msg=lambda m: f"{where}, grad {n}: {m}")
            # the kernels ran, once forward and once backward, on the local shards
            assert aten["fwd"] == aten["bwd"] == [], "the reference must not run fusedad's kernels"
            assert fused["fwd"] == [("linear_fwd", [(rows_local, x_local[1]), w_local])], (where, fused["fwd"])
            assert len(fused["bwd"]) == 1, (where, fused["bwd"])
            assert fused["bwd"][0][1] == [(rows_local, n_local), (rows_local, x_local[1]), w_local], (where, fused["bwd"])


def _op_cache_case():
    return dict(x=randn(4, 8), w=randn(3, 8))


def _check_op_cache(rank, case):
    """The sharding decision depends on the op's activation argument: DTensor's cache must see it."""
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh()
    x = distribute_tensor(case["x"], mesh, [_placement("S1")])
    w = distribute_tensor(case["w"], mesh, [_placement("S1")])
    out = {}
    for act in ("none", "gelu", "none"):
        y, _ = torch.ops.fusedad.linear_fwd(x, w, None, act, False)
        out.setdefault(act, []).append((tuple(y.placements), y.full_tensor()))
    return out


@needs_gloo
def test_dtensor_sharding_cache_keys_on_the_activation(ranks):
    """The same DTensor arguments with and without an activation: without, partial sums (no
    communication); with, never partial sums under the activation."""
    case = ranks.cases["op_cache"]
    z = F.linear(case["x"], case["w"])
    for result in ranks("op_cache"):
        for placements, y in result["none"]:
            assert placements[0].is_partial()
            torch.testing.assert_close(y, z)
        (placements, y), = result["gelu"]
        assert not placements[0].is_partial(), placements
        torch.testing.assert_close(y, F.gelu(z))


# ---- tensor parallel: an MLP through parallelize_module ---------------------------------------------

_MLP_ACTS = {"gelu_then_none": ("gelu", None), "relu_then_silu": ("relu", "silu")}


def _tp_case():
    return dict(x=randn(2, 5, 8), target=randn(2, 5, 6))


def _check_tp_mlp(rank, case):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh()
    out = {}
    for name, acts in _MLP_ACTS.items():
        runs = {}
        for fused in (True, False):
            model = _mlp(acts, fused=fused)
            parallelize_module(model, mesh, {"fc0": ColwiseParallel(), "fc1": RowwiseParallel()})
            with record_launches() as log:
                y = model(case["x"])
                loss = F.mse_loss(y, case["target"])
                loss.backward()
            runs[fused] = dict(y=y.detach(), loss=loss.detach(), grads=_grads(model),
                               fwd=_fwd(log), bwd=_bwd(log))
        out[name] = runs
    return out


@needs_gloo
@pytest.mark.parametrize("acts", list(_MLP_ACTS))
def test_tensor_parallel_mlp_matches_single_process(ranks, acts):
    """ColwiseParallel then RowwiseParallel (an activation on the rowwise layer too: applied after the
    reduction): output, loss and full gradients of one process; gradients on nn.Linear's placements;
    the kernels ran on the local shards (half the hidden features)."""
    case = ranks.cases["tp_mlp"]
    ref = _mlp(_MLP_ACTS[acts])
    loss = F.mse_loss(y := ref(case["x"]), case["target"])
    loss.backward()
    for rank, result in enumerate(ranks("tp_mlp")):
        fused, plain = result[acts][True], result[acts][False]
        torch.testing.assert_close(fused["y"], y.detach())
        torch.testing.assert_close(fused["loss"], loss.detach())
        _assert_grads_match(fused["grads"], ref)
        assert {n: g[1] for n, g in fused["grads"].items()} == {n: g[1] for n, g in plain["grads"].items()}
        assert fused["grads"]["fc0.weight"][1] is not None  # the parameters really are DTensors
        # fc0: weight Shard(0) -> 8 of 16 rows; fc1: weight Shard(1) -> 8 of 16 columns; x 2·5 rows
        assert fused["fwd"] == [("linear_fwd", [(10, 8), (8, 8)]), ("linear_fwd", [(10, 8), (6, 8)])], fused["fwd"]
        # backward: fc1 (dZ, x, weight), then fc0 (dZ, x; no dX: the input needs no gradient)
        assert [s[:3] for _, s in fused["bwd"][:1]] == [[(10, 6), (10, 8), (6, 8)]], fused["bwd"]
        assert [s[:2] for _, s in fused["bwd"][1:]] == [[(10, 8), (10, 8)]], fused["bwd"]
        assert plain["fwd"] == []


def _sp_case():
    return dict(x=randn(2, 6, 8), target=randn(2, 6, 6))


def _check_sequence_parallel_mlp(rank, case):
    """Megatron-style sequence parallel: inputs and outputs sharded on the sequence dimension."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh()
    seq = slice(rank * 3, rank * 3 + 3)
    model = _mlp(("gelu", "relu"))
    parallelize_module(model, mesh, {"fc0": ColwiseParallel(input_layouts=_placement("S1")),
                                     "fc1": RowwiseParallel(output_layouts=_placement("S1"))})
    with record_launches() as log:
        y = model(case["x"][:, seq])
        # the local shard's part of the global mean squared error
        loss = F.mse_loss(y, case["target"][:, seq], reduction="sum") / case["target"].numel()
        loss.backward()
    return dict(y=y.detach(), loss=loss.detach(), grads=_grads(model), fwd=_fwd(log))


@needs_gloo
def test_sequence_parallel_mlp_matches_single_process(ranks):
    case = ranks.cases["sequence_parallel"]
    ref = _mlp(("gelu", "relu"))
    y = ref(case["x"])
    loss = F.mse_loss(y, case["target"])
    loss.backward()
    results = ranks("sequence_parallel")
    torch.testing.assert_close(torch.cat([r["y"] for r in results], dim=1), y.detach())
    torch.testing.assert_close(sum(r["loss"] for r in results), loss.detach())
    for result in results:
        # each rank's gradients are the global ones: the local losses' gradients, summed by DTensor
        _assert_grads_match(result["grads"], ref)
        # the layer's input is the all-gathered sequence (2·6 rows), its weights the local halves
        assert result["fwd"] == [("linear_fwd", [(12, 8), (8, 8)]), ("linear_fwd", [(12, 8), (6, 8)])], result["fwd"]


def _check_main_grad_tp(rank, case):
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    layer = parallelize_module(fusedad.nn.Linear(8, 4, accumulate_main_grad=True), _mesh(), ColwiseParallel())
    try:
        layer(randn(3, 8))
    except NotImplementedError as e:
        return dict(message=str(e))
    return dict(message="no error")


@needs_gloo
def test_main_grad_refused_for_dtensor_weights(ranks):
    for result in ranks("main_grad_tp"):
        assert "accumulate_main_grad=True) with DTensor arguments is not supported" in result["message"], result
        assert "Use accumulate_main_grad=False" in result["message"]


# ---- FSDP2 and DDP: data parallel over the global batch ---------------------------------------------

def _dp_case():
    return dict(x=randn(8, 8), target=randn(8, 6))


def _check_fsdp2(rank, case):
    from torch.distributed.fsdp import fully_shard

    model = _mlp(("gelu", None))
    fully_shard(model.fc0)
    fully_shard(model.fc1)
    fully_shard(model)
    rows = slice(rank * 4, rank * 4 + 4)
    with record_launches() as log:
        loss = F.mse_loss(model(case["x"][rows]), case["target"][rows])
        loss.backward()  # FSDP2 averages the ranks' gradients
    out = dict(loss=loss.detach(), grads=_grads(model), fwd=_fwd(log))

    messages = []
    for wrap_parent in (False, True):  # fully_shard on the layer itself, and on a module above it
        layer = fusedad.nn.Linear(6, 2, accumulate_main_grad=True)
        fully_shard(nn.Sequential(layer) if wrap_parent else layer)
        try:
            layer(randn(4, 6)).sum().backward()
            messages.append("no error")
        except RuntimeError as e:
            messages.append(str(e))
    out["main_grad_messages"] = messages
    return out


@needs_gloo
def test_fsdp2_matches_single_process(ranks):
    """fully_shard per layer and at the root: losses and full gradients of one process on the global batch;
    the kernels ran on the gathered (full) weights and this rank's half of the batch."""
    case = ranks.cases["fsdp2"]
    ref = _mlp(("gelu", None))
    loss = F.mse_loss(ref(case["x"]), case["target"])
    loss.backward()
    results = ranks("fsdp2")
    torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, loss.detach())
    for result in results:
        _assert_grads_match(result["grads"], ref)
        assert result["grads"]["fc0.weight"][1] == (_placement("S0"),)  # FSDP2's sharded gradients
        assert result["fwd"] == [("linear_fwd", [(4, 8), (16, 8)]), ("linear_fwd", [(4, 16), (6, 16)])], result["fwd"]


@needs_gloo
def test_fsdp2_refuses_main_grad_accumulation(ranks):
    """FSDP2 reduce-scatters .grad only: main_grad accumulation would leave the sharded weight without a
    gradient. Refused with an error that says why and what to do, on every rank, wherever fully_shard is."""
    for result in ranks("fsdp2"):
        for message in result["main_grad_messages"]:
            assert "accumulate_main_grad=True) under FSDP2 (fully_shard)" in message, message
            assert "reduce_dtype=torch.float32" in message


def _check_ddp(rank, case):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp(("gelu", None))
    ddp = DDP(model)
    rows = slice(rank * 4, rank * 4 + 4)
    with record_launches() as log:
        F.mse_loss(ddp(case["x"][rows]), case["target"][rows]).backward()  # DDP averages the gradients
    out = dict(grads=_grads(model), fwd=_fwd(log))
    layer = fusedad.nn.Linear(6, 2, accumulate_main_grad=True)
    try:
        DDP(layer)(randn(4, 6)).sum().backward()
        out["main_grad_message"] = "no error"
    except RuntimeError as e:
        out["main_grad_message"] = str(e)
    return out


@needs_gloo
def test_ddp_matches_single_process(ranks):
    case = ranks.cases["ddp"]
    ref = _mlp(("gelu", None))
    F.mse_loss(ref(case["x"]), case["target"]).backward()
    for result in ranks("ddp"):
        _assert_grads_match(result["grads"], ref, rtol=1e-5, atol=1e-6)
        assert result["fwd"] == [("linear_fwd", [(4, 8), (16, 8)]), ("linear_fwd", [(4, 16), (6, 16)])], result["fwd"]


@needs_gloo
def test_ddp_refuses_main_grad_accumulation(ranks):
    """DDP all-reduces .grad only: main_grad accumulation under it would train on each rank's own sum.
    It is refused with an error that says why and what to do, on every rank."""
    for result in ranks("ddp"):
        message = result["main_grad_message"]
        assert "accumulate_main_grad=True) inside DistributedDataParallel" in message, message
        assert "all-reduce weight.main_grad yourself" in message
    layer = fusedad.nn.Linear(6, 2, accumulate_main_grad=True)  # outside DDP and FSDP2: allowed
    layer(randn(3, 6)).sum().backward()
    assert layer.weight.main_grad.abs().sum() > 0


# ---- fused MLP blocks (fusedad.nn.GatedMLP) under DDP, FSDP2 and tensor parallelism --------------------


def _gated_block():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return fusedad.nn.GatedMLP(8, 12, activation="silu", bias=True)


def _block_case():
    return dict(x=randn(8, 8), target=randn(8, 8))


def _check_blocks(rank, case):
    """One GatedMLP step under each setup; the launches say whether the block kernels or the composite
    per-layer path ran."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    rows = slice(rank * 4, rank * 4 + 4)
    out = {}
    setups = {
        "ddp": lambda m: DDP(m),
        "fsdp2": lambda m: fully_shard(m),
        # the standard MLP plan: gate and up column-wise (I sharded), down row-wise (a partial sum reduced)
        "tp": lambda m: parallelize_module(m, _mesh(), {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                         "down_proj": RowwiseParallel()}),
    }
    for name, wrap in setups.items():
        block = _gated_block()
        model = wrap(block)
        x, target = (case["x"], case["target"]) if name == "tp" else (case["x"][rows], case["target"][rows])
        with record_launches() as log:
            y = model(x)
            loss = F.mse_loss(y, target)
            loss.backward()
        out[name] = dict(loss=_full(loss.detach())[0], grads=_grads(block), kernels=sorted({l.kernel for l in log}))
    return out


CASES = {"combos": _combo_case, "op_cache": _op_cache_case, "tp_mlp": _tp_case, "sequence_parallel": _sp_case,
         "fsdp2": _dp_case, "ddp": _dp_case, "blocks": _block_case}
CHECKS = {"combos": _check_combos, "op_cache": _check_op_cache, "tp_mlp": _check_tp_mlp,
          "sequence_parallel": _check_sequence_parallel_mlp, "main_grad_tp": _check_main_grad_tp,
          "fsdp2": _check_fsdp2, "ddp": _check_ddp, "blocks": _check_blocks}


@needs_gloo
@pytest.mark.parametrize("setup", ["ddp", "fsdp2", "tp"])
def test_gated_mlp_block_matches_single_process(ranks, setup):
    """DDP and FSDP2 (each rank half the batch, gradients averaged) run the block kernels; tensor
    parallelism (DTensor weights) runs the composite per-layer path on the local shards. Each equals one
    process on the global batch."""
    case = ranks.cases["blocks"]
    ref = _gated_block()
    loss = F.mse_loss(ref(case["x"]), case["target"])
    loss.backward()
    results = [r[setup] for r in ranks("blocks")]
    if setup == "tp":
        for r in results:
            torch.testing.assert_close(r["loss"], loss.detach())
    else:
        torch.testing.assert_close(sum(r["loss"] for r in results) / WORLD, loss.detach())
    for r in results:
        _assert_grads_match(r["grads"], ref, rtol=1e-5, atol=1e-6)
        block_kernels = {"mlp_gated_up", "mlp_down_bwd", "mlp_gated_dual_bwd"}
        if setup == "tp":
            assert not block_kernels & set(r["kernels"]), r["kernels"]
            assert any(k.startswith("linear_fwd") for k in r["kernels"]), r["kernels"]  # fused layers on shards
        else:
            assert block_kernels <= set(r["kernels"]), r["kernels"]


# ---- other tensor subclasses --------------------------------------------------------------------------

class _Wrapper(torch.Tensor):
    """A minimal ``__torch_dispatch__`` wrapper (no storage of its own): it runs every op on the tensor it
    wraps and wraps the results, counting the ops it saw."""

    seen = []

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device,
                                                   strides=inner.stride(), requires_grad=inner.requires_grad)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map_only

        cls.seen.append(func)
        out = func(*tree_map_only(_Wrapper, lambda t: t.inner, args),
                   **tree_map_only(_Wrapper, lambda t: t.inner, kwargs or {}))
        return tree_map_only(torch.Tensor, _Wrapper, out)


def _unwrap(t):
    return t.inner if isinstance(t, _Wrapper) else t


@pytest.mark.parametrize("wrapped", ["all", "weight"])
@pytest.mark.parametrize("act", [None, "gelu", "relu"])
def test_other_subclasses_take_the_eager_path(wrapped, act):
    """A __torch_dispatch__ wrapper has no storage the kernels could read: fusedad runs torch ops on it
    (the subclass sees them), with the values and gradients of plain tensors, and launches nothing."""
    plain = [randn(5, 3, 4), randn(6, 4), randn(6)]
    args = [(_Wrapper(t) if wrapped == "all" or i == 1 else t.clone()).requires_grad_() for i, t in enumerate(plain)]
    refs = [t.clone().requires_grad_() for t in plain]
    assert fusedad.backend(args[1]) == "eager"
    _Wrapper.seen.clear()
    with record_launches() as log:
        y = fusedad.linear(*args, activation=act)
        assert isinstance(y, _Wrapper) and _Wrapper.seen
        y.sum().backward()
    assert log == []
    y_ref = fusedad.activations.lookup(act).apply(F.linear(*refs))
    y_ref.sum().backward()
    torch.testing.assert_close(y.inner, y_ref)
    for arg, ref in zip(args, refs):
        torch.testing.assert_close(_unwrap(arg.grad), ref.grad)


def test_other_subclasses_refuse_main_grad():
    layer = fusedad.nn.Linear(4, 3, accumulate_main_grad=True)
    with pytest.raises(NotImplementedError, match="accumulate_main_grad=True\\) with a tensor subclass"):
        layer(_Wrapper(randn(2, 4)))


def test_fake_tensors_outside_compile_take_the_eager_path():
    """Shape inference under FakeTensorMode (no compile): no kernel reads a fake tensor's missing storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = fusedad.nn.Linear(4, 3, activation="silu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, record_launches() as log:
        y = layer(mode.from_tensor(randn(2, 5, 4)))
        y.sum().backward()
    assert y.shape == (2, 5, 3) and log == []

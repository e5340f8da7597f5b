"""DTensor (tensor / sequence parallel) support: sharding strategies for the custom ops, and the path
``route`` takes for DTensor arguments.

A DTensor call runs ``fusedad::linear_fwd`` (and, in its backward, ``fusedad::linear_bwd``) as an op
that DTensor dispatches: DTensor picks one of the strategies registered below (redistributing inputs
where none fits their current placements), runs the op's body on the local shards (the kernels, on
plain tensors) and wraps the results with the strategy's output placements. Per mesh dimension, with
x (M, K), weight (N, K), bias (N,) and y, z (M, N):

    x            weight      bias        -> y, z          (what it is)
    Replicate    Replicate   Replicate      Replicate      replicated
    Shard(0)*    Replicate   Replicate      Shard(0)*      rows sharded (data / sequence parallel)
    Replicate    Shard(0)    Shard(0)       Shard(1)       output features sharded (ColwiseParallel)
    Shard(1)     Shard(1)    Partial        Partial        contraction sharded (RowwiseParallel)
    Partial      Replicate   Partial        Partial        a partial input (x·Wᵀ is linear in x)

    * or the row placement x already has, e.g. the strided shard that flattening a sequence-sharded
      (B, S, K) input into rows gives: rows stay on their rank, no communication.

The two Partial rows exist only without an activation: act(Σ partial sums) ≠ Σ act(partial sums). A
fused activation on a layer whose contraction dimension is sharded is therefore applied by
``dtensor_linear`` after the reduction (the op without activation, an all-reduce, then bias and activation as
ordinary DTensor ops). A bias with a Partial output is made Partial by DTensor itself (a replicated
bias is divided evenly over the ranks, as DTensor does for ``aten.addmm``), so the sum adds it once.
The backward's strategies (``linear_bwd``) are the transposes of these, so gradients come out on the
placements of their inputs' shards (a replicated parameter's gradient as Partial, unreduced, as
DTensor's own strategies give it for ``aten.mm``).

Nothing here runs for plain tensors: ``route`` sends only tensor subclasses to ``subclass_linear``.
"""
import sys

import torch
import torch.nn.functional as F

from . import activations, backend, ops

_NO_ACTIVATION = activations.lookup(None)
_registered = False
is_dtensor = backend.is_dtensor


def subclass_linear(x, weight, bias, act, weight_main_grad):
    """act(x·weightᵀ + bias) for 2-D arguments of which at least one is a tensor subclass.

    DTensors run the kernels on their local shards through the custom ops (see the module docstring).
    Any other subclass (a ``__torch_dispatch__`` wrapper the kernels cannot read, a fake tensor, a
    ``__torch_function__`` subclass) takes the eager path as torch ops, which the subclass handles.
    """
    if any(is_dtensor(t) for t in (x, weight, bias)):
        return dtensor_linear(x, weight, bias, act, weight_main_grad)
    if weight_main_grad is not None:
        raise NotImplementedError(
            f"fusedad: weight_main_grad (accumulate_main_grad=True) with a tensor subclass "
            f"({', '.join(sorted({type(t).__name__ for t in (x, weight, bias) if t is not None}))}): the subclass "
            f"runs fusedad's eager path as torch ops, which fill weight.grad. Use accumulate_main_grad=False")
    return act.apply(F.linear(x, weight, bias))


def dtensor_linear(x, weight, bias, act, weight_main_grad):
    """act(x·weightᵀ + bias) for DTensor arguments: the custom ops, dispatched by DTensor."""
    register_sharding_strategies()
    if weight_main_grad is not None:
        raise NotImplementedError(
            "fusedad: weight_main_grad (accumulate_main_grad=True) with DTensor arguments is not supported: the "
            "DTensor path runs the custom ops, whose backward returns dW (sharded like the weight) instead of "
            "adding it into main_grad. Use accumulate_main_grad=False (weight.grad is then a DTensor)")
    if act.name is not None and _contraction_sharded(x, weight):
        # Partial sums: the activation (and the bias) must come after the reduction.
        from torch.distributed.tensor import Replicate

        z = ops.linear(x, weight, None, _NO_ACTIVATION)
        z = z.redistribute(z.device_mesh, [Replicate() if p.is_partial() else p for p in z.placements])
        return act.apply(z if bias is None else z + bias)
    return ops.linear(x, weight, bias, act)


def _contraction_sharded(x, weight):
    """True if x's last dimension or weight's dimension 1 is sharded on some mesh dimension."""
    for t, dim in ((x, -1), (weight, 1)):
        if is_dtensor(t) and any(isinstance(getattr(p, "dim", None), int) and p.dim % t.dim() == dim % t.dim()
                                 for p in t.placements):
            return True
    return False


# ---- sharding strategies -----------------------------------------------------------------------------

def _row_placements(spec):
    """Shard(0), and any other placement of ``spec`` that shards dimension 0 (a strided shard)."""
    from torch.distributed.tensor import Shard

    found = [Shard(0)]
    for p in spec.placements if spec is not None else ():
        if getattr(p, "dim", None) == 0 and p not in found:
            found.append(p)
    return found


def _fwd_strategies(x, weight, bias, activation, store_preact):
    from torch.distributed.tensor import Partial, Replicate, Shard

    act = activations.lookup(activation)
    keeps_z = store_preact and act.needs_z  # else z is an empty (0,) tensor: replicated
    R = Replicate()

    def row(out, x_p, w_p, b_p):
        return [out, out if keeps_z else R], [x_p, w_p, None if bias is None else b_p, None, None]

    strategies = [row(R, R, R, R), row(Shard(1), R, Shard(0), Shard(0))]
    strategies += [row(p, p, R, R) for p in _row_placements(x)]
    if act.name is None:
        strategies += [row(Partial(), Shard(1), Shard(1), Partial()), row(Partial(), Partial(), R, Partial())]
    return strategies


def _bwd_strategies(grad_y, x, weight, saved, activation, need_x, need_weight, need_bias):
    from torch.distributed.tensor import Partial, Replicate, Shard

    R = Replicate()

    def row(dx, dw, db, gy, x_p, w_p, saved_p):
        outs = [dx if need_x else R, dw if need_weight else R, db if need_bias else R]
        ins = [gy, None if x is None else x_p, None if weight is None else w_p, None if saved is None else saved_p]
        return outs, ins + [None] * 4

    strategies = [
        row(R, R, R, R, R, R, R),
        row(Partial(), Shard(0), Shard(0), Shard(1), R, Shard(0), Shard(1)),  # output features sharded
        row(Shard(1), Shard(1), R, R, Shard(1), Shard(1), R),  # contraction sharded
        # dZ = dY ⊙ act'(saved) is linear in dY: a partial dY gives partial gradients.
        row(Partial(), Partial(), Partial(), Partial(), R, R, R),
        row(R, Partial(), R, R, Partial(), R, R),  # the forward's partial input: dW = dZᵀ·X is partial too
    ]
    strategies += [row(p, Partial(), Partial(), p, p, R, p) for p in _row_placements(grad_y)]
    return strategies


def register_sharding_strategies():
    """Register the strategies with DTensor (once; imports torch.distributed.tensor)."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    propagator = DTensor._op_dispatcher.sharding_propagator
    for op, strategies, first_static in ((torch.ops.fusedad.linear_fwd.default, _fwd_strategies, 3),
                                         (torch.ops.fusedad.linear_bwd.default, _bwd_strategies, 4)):
        register_sharding(op)(strategies)
        # register_sharding keys DTensor's sharding cache on the tensor arguments and int arguments only;
        # the activation (str) and the flags (bool) change the strategies and the outputs' shapes.
        propagator.op_to_schema_info[op] = RuntimeSchemaInfo(first_static, needs_pytree=True)
    _registered = True


if "torch.distributed.tensor" in sys.modules:  # DTensor already in use: ops called directly work too
    register_sharding_strategies()

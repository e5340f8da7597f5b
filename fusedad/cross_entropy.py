"""Fused linear + cross-entropy (the LM head): ``cross_entropy(linear(input, W, b), target)`` without the logits.

The fused part is a differentiable map from (x (M, K), W (V, K), b (V,)) to three per-row statistics of the
logits z = softcap(x·Wᵀ + b) (``kernels/cross_entropy.py``):

    lse = logsumexp_v z        zt = z[target]        zsum = Σ_v cw[v]·z[:, v]   (label smoothing only)

Every loss variant is then an O(M) combination of them with plain torch ops (``_combine``): class weights,
ignore_index, label smoothing, z-loss and the reductions keep PyTorch's exact formulas, and autograd of
that combination hands the backward kernels their per-row coefficients. Paths:

* eager, kernels (CUDA, or CPU under the Triton interpreter): ``_LCEStats`` launches them directly;
* torch.compile: the custom ops ``fusedad::lce_stats`` / ``fusedad::lce_bwd`` (``triton_op``);
* double backward (``create_graph=True``), torch.func transforms and forward-mode AD: a composite path
  in torch ops that recomputes the full (M, V) logits (differentiable again, O(M·V) memory);
* CPU without the interpreter (the "eager" backend): the statistics and the first-order backward in row
  chunks of ≤ ``EAGER_CHUNK_LOGITS`` logits with torch ops (no (M, V) tensor);
* probability (soft) targets: the reference ``cross_entropy(linear(...))`` with a one-time warning.
"""
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op

from . import ops
from .backend import select as _select_backend
from .autograd import is_functorch_tensor
from .kernels import cross_entropy as kernels

_REDUCTIONS = ("none", "mean", "sum")
_warned_soft_targets = False


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cap(z, softcap):
    return softcap * torch.tanh(z / softcap) if softcap else z


def _logits(x, weight, bias, softcap):
    """The full (M, V) logits in the statistics dtype (composite and eager paths only)."""
    return _cap(F.linear(x, weight, bias).to(_stat_dtype(x.dtype)), softcap)


def _onehot(target, num_classes, dtype):
    valid = (target >= 0) & (target < num_classes)
    return F.one_hot(torch.where(valid, target, 0), num_classes).to(dtype) * valid[:, None].to(dtype)


def _stats_from_logits(z, target, class_weight, sum_logits):
    lse = torch.logsumexp(z, dim=-1)
    zt = (z * _onehot(target, z.shape[-1], z.dtype)).sum(-1)
    if not sum_logits:
        return lse, zt, torch.zeros_like(lse)
    zs = (z * class_weight.to(z.dtype)).sum(-1) if class_weight is not None else z.sum(-1)
    return lse, zt, zs


def _stats_eager(x, weight, bias, target, class_weight, softcap, sum_logits):
    """The statistics with torch ops, in row chunks of ≤ EAGER_CHUNK_LOGITS logits (no (M, V) tensor at once)."""
    rows = max(1, EAGER_CHUNK_LOGITS // max(weight.shape[0], 1))
    parts = [_stats_from_logits(_logits(x[i:i + rows], weight, bias, softcap), target[i:i + rows], class_weight,
                                sum_logits) for i in range(0, x.shape[0], rows)]
    if not parts:
        empty = x.new_empty(0, dtype=_stat_dtype(x.dtype))
        return empty, empty.clone(), empty.clone()
    return tuple(torch.cat(p) for p in zip(*parts))


def _grads_composite(x, weight, bias, target, class_weight, softcap, g_lse, g_zt, g_zs, need_x, need_w, need_b):
    """(dx, dw, db) by torch ops on the recomputed (M, V) logits; differentiable (double backward)."""
    z = _logits(x, weight, bias, softcap)
    dz = g_lse[:, None] * torch.softmax(z, dim=-1) + g_zt[:, None] * _onehot(target, z.shape[-1], z.dtype)
    if g_zs is not None:
        dz = dz + g_zs[:, None] * (class_weight.to(z.dtype)[None, :] if class_weight is not None else 1.0)
    if softcap:
        dz = dz * (1 - (z / softcap) ** 2)
    dz = dz.to(x.dtype)
    return (dz @ weight if need_x else None, dz.t() @ x if need_w else None,
            dz.sum(0).to(bias.dtype) if need_b else None)


#: The eager backend's statistics and backward work on row chunks of at most this many logits (a module
#: attribute, so tests can force many chunks).
EAGER_CHUNK_LOGITS = 2**24


def _grads_eager(x, weight, bias, target, class_weight, softcap, g_lse, g_zt, g_zs, need_x, need_w, need_b):
    """``_grads_composite`` over row chunks of ≤ EAGER_CHUNK_LOGITS logits (the eager backend's first-order
    backward: no (M, V) tensor); dW and db summed over the chunks in the statistics dtype."""
    M, V = x.shape[0], weight.shape[0]
    rows = max(1, EAGER_CHUNK_LOGITS // max(V, 1))
    if M <= rows:
        return _grads_composite(x, weight, bias, target, class_weight, softcap, g_lse, g_zt, g_zs,
                                need_x, need_w, need_b)
    sd = _stat_dtype(x.dtype)
    dx = torch.empty_like(x) if need_x else None
    dw = torch.zeros(weight.shape, dtype=sd, device=weight.device) if need_w else None
    db = torch.zeros(bias.shape, dtype=sd, device=bias.device) if need_b else None
    for i in range(0, M, rows):
        part = slice(i, i + rows)
        gx, gw, gb = _grads_composite(x[part], weight, bias, target[part], class_weight, softcap, g_lse[part],
                                      g_zt[part], g_zs[part] if g_zs is not None else None, need_x, need_w, need_b)
        if need_x:
            dx[part] = gx
        if need_w:
            dw += gw
        if need_b:
            db += gb
    return dx, (dw.to(weight.dtype) if need_w else None), (db.to(bias.dtype) if need_b else None)


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


class _LCEStats(torch.autograd.Function):
    """(x, W, b, target, class_weight, softcap, sum_logits) -> (lse, zt, zsum), each (M,)."""

    @staticmethod
    def forward(x, weight, bias, target, class_weight, softcap, sum_logits):
        if _select_backend(x.device).runs_kernels:
            lse, zt, zs = kernels.lce_forward(x, weight, bias, target, class_weight, softcap, sum_logits)
            return lse, zt, (zs if zs is not None else torch.zeros_like(lse))
        return _stats_eager(x, weight, bias, target, class_weight, softcap, sum_logits)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, class_weight, softcap, sum_logits = inputs
        ctx.softcap, ctx.sum_logits = softcap, sum_logits
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, target, class_weight, output[0])
        ctx.save_for_forward(x, weight, bias, target, class_weight)

    @staticmethod
    def backward(ctx, g_lse, g_zt, g_zs):
        x, weight, bias, target, class_weight, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not ctx.sum_logits:
            g_zs = None
        if (g_lse is None and g_zt is None and g_zs is None) or not (need_x or need_w or need_b):
            return None, None, None, None, None, None, None
        g_lse, g_zt = _zeros_if_none(g_lse, lse), _zeros_if_none(g_zt, lse)
        composite = (torch.is_grad_enabled()
                     or any(is_functorch_tensor(t) for t in (g_lse, g_zt, g_zs, x, weight, bias)))
        if not composite and not _select_backend(x.device).runs_kernels:
            dx, dw, db = _grads_eager(x, weight, bias, target, class_weight, ctx.softcap, g_lse, g_zt, g_zs,
                                      need_x, need_w, need_b)
        elif composite:
            dx, dw, db = _grads_composite(x, weight, bias, target, class_weight, ctx.softcap, g_lse, g_zt, g_zs,
                                          need_x, need_w, need_b)
        else:
            sd = lse.dtype
            rows = [g.to(sd).contiguous() if g is not None else None for g in (g_lse, g_zt, g_zs)]
            dx, dw, db = kernels.lce_backward(x, weight, bias, target, class_weight, ctx.softcap, lse, *rows,
                                              need_x, need_w, need_b)
        return dx, dw, db, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        """Composite: the logits' tangent is materialised, (M, V)."""
        x, weight, bias, target, class_weight = ctx.saved_tensors
        z = _logits(x, weight, bias, ctx.softcap)
        zdot = torch.zeros_like(z)
        if x_t is not None:
            zdot = zdot + F.linear(x_t, weight).to(z.dtype)
        if weight_t is not None:
            zdot = zdot + F.linear(x, weight_t).to(z.dtype)
        if bias_t is not None:
            zdot = zdot + bias_t.to(z.dtype)
        if ctx.softcap:
            zdot = zdot * (1 - (z / ctx.softcap) ** 2)
        lse_t = (torch.softmax(z, -1) * zdot).sum(-1)
        zt_t = (zdot * _onehot(target, z.shape[-1], z.dtype)).sum(-1)
        if not ctx.sum_logits:
            zs_t = torch.zeros_like(lse_t)
        else:
            zs_t = (zdot * class_weight.to(z.dtype)).sum(-1) if class_weight is not None else zdot.sum(-1)
        return lse_t, zt_t, zs_t


# ------------------------------------------------------------------------ custom ops (torch.compile)

@triton_op("fusedad::lce_stats", mutates_args=())
def lce_stats(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
              class_weight: Optional[torch.Tensor], softcap: float,
              sum_logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen, extra = ops._body_backend(x, weight, bias, target, class_weight)
    if chosen.runs_kernels:
        lse, zt, zs = kernels.lce_forward(x, weight, bias, target, class_weight, softcap, sum_logits, **extra)
        return lse, zt, (zs if zs is not None else torch.zeros_like(lse))
    return _stats_eager(x, weight, bias, target, class_weight, softcap, sum_logits)


@lce_stats.register_fake
def _lce_stats_fake(x, weight, bias, target, class_weight, softcap, sum_logits):
    lse = x.new_empty(x.shape[0], dtype=_stat_dtype(x.dtype))
    return lse, torch.empty_like(lse), torch.empty_like(lse)


@triton_op("fusedad::lce_bwd", mutates_args=())
def lce_bwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
            class_weight: Optional[torch.Tensor], softcap: float, lse: torch.Tensor, g_lse: torch.Tensor,
            g_zt: torch.Tensor, g_zsum: Optional[torch.Tensor], need_x: bool, need_weight: bool,
            need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen, extra = ops._body_backend(x, weight, bias, target, class_weight, lse, g_lse, g_zt, g_zsum)
    if chosen.runs_kernels:
        dx, dw, db = kernels.lce_backward(x, weight, bias, target, class_weight, softcap, lse, g_lse, g_zt, g_zsum,
                                          need_x, need_weight, need_bias, **extra)
    else:
        dx, dw, db = _grads_composite(x, weight, bias, target, class_weight, softcap, g_lse, g_zt, g_zsum,
                                      need_x, need_weight, need_bias)
    empty = x.new_empty(0)
    return (dx if dx is not None else empty.clone(), dw if dw is not None else empty.clone(),
            db if db is not None else empty.clone())


def _setup_stats(ctx, inputs, output):
    x, weight, bias, target, class_weight, softcap, sum_logits = inputs
    ctx.softcap, ctx.sum_logits = softcap, sum_logits
    ctx.save_for_backward(x, weight, bias, target, class_weight, output[0])


def _backward_stats(ctx, g_lse, g_zt, g_zs):
    x, weight, bias, target, class_weight, lse = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.fusedad.lce_bwd(x, weight, bias, target, class_weight, ctx.softcap, lse,
                                           g_lse.to(lse.dtype).contiguous(), g_zt.to(lse.dtype).contiguous(),
                                           g_zs.to(lse.dtype).contiguous() if ctx.sum_logits else None,
                                           need_x, need_w, need_b and bias is not None)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None, None, None)


lce_stats.register_autograd(_backward_stats, setup_context=_setup_stats)


def _stats(x, weight, bias, target, class_weight, softcap, sum_logits):
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return torch.ops.fusedad.lce_stats(x, weight, bias, target, class_weight, float(softcap or 0.0), sum_logits)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))) \
            and not any(is_functorch_tensor(t) for t in (x, weight, bias)) \
            and torch.autograd.forward_ad._current_level < 0:
        # no_grad / inference_mode / nothing to differentiate: the forward kernel alone, nothing saved.
        return _LCEStats.forward(x, weight, bias, target, class_weight, softcap, sum_logits)
    return _LCEStats.apply(x, weight, bias, target, class_weight, softcap, sum_logits)


# ------------------------------------------------------------------------------------- the loss

def _combine(lse, zt, zs, target, class_weight, num_classes, ignore_index, reduction, label_smoothing, z_loss):
    """PyTorch's cross_entropy (class indices) from the per-row statistics, (M,) -> per row or reduced."""
    counted = target != ignore_index
    if class_weight is not None:
        w_t = class_weight.to(lse.dtype)[torch.where(counted, target, 0)]
        w_t = torch.where(counted, w_t, 0.0)
    else:
        w_t = counted.to(lse.dtype)
    row = (1.0 - label_smoothing) * w_t * (lse - zt)
    if label_smoothing > 0:
        w_sum = class_weight.to(lse.dtype).sum() if class_weight is not None else num_classes
        row = row + (label_smoothing / num_classes) * (lse * w_sum - zs)
    if z_loss:
        row = row + z_loss * lse * lse
    row = torch.where(counted, row, 0.0)
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / w_t.sum()


def _soft_target_reference(input, linear_weight, target, linear_bias, weight, reduction, label_smoothing, softcap,
                           z_loss):
    global _warned_soft_targets
    if not _warned_soft_targets:
        _warned_soft_targets = True
        warnings.warn("fusedad.linear_cross_entropy: probability (soft) targets run the reference "
                      "cross_entropy(linear(...)) path, which materialises the logits", stacklevel=3)
    logits = _cap(F.linear(input, linear_weight, linear_bias), softcap)
    class_logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits
    loss = F.cross_entropy(class_logits, target, weight=weight, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        zl = z_loss * torch.logsumexp(logits.float(), dim=-1) ** 2
        loss = loss + (zl if reduction == "none" else zl.sum() if reduction == "sum" else zl.mean()).to(loss.dtype)
    return loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, softcap=None, z_loss=0.0, out_dtype=None):
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    Same semantics as ``torch.nn.functional.linear_cross_entropy`` (PyTorch ≥ 2.13) for every shared argument,
    on any torch version. Shapes:

        input (K,) | (N, K) | (*, K)    — (*, K) with target (*) is an extension (PyTorch takes 1-D/2-D)
        linear_weight (V, K), or (V, d1, …, dk, K) with input (N, K) and target (N, d1, …, dk)
        linear_bias (V,) (or (V, d1, …, dk)), weight (V,): class weights
        target: class indices (int64) shaped like input without its last dim; ignore_index=None means -100.
            Probability (float) targets run a reference path (logits materialised) with a warning.
        returns: a scalar, or per-row losses shaped like target with reduction="none"

    Extensions: ``softcap`` (logits z ← softcap·tanh(z/softcap) before the softmax) and ``z_loss``
    (z_loss·lse² added to the loss of every counted row before the reduction; "mean" divides it by the same
    denominator as the cross-entropy), ``out_dtype`` (the loss's dtype; default input's — e.g. torch.float32
    for a bf16 model, as transformers' losses upcast). Extra memory O(rows): the logits are computed tile by tile and folded
    into per-row statistics, forward and backward (``kernels/cross_entropy.py``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"fusedad.linear_cross_entropy: softcap must be > 0 or None, got {softcap}")
    if input.dim() < 1 or linear_weight.dim() < 2 or input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(f"fusedad.linear_cross_entropy: input {tuple(input.shape)} and linear_weight "
                           f"{tuple(linear_weight.shape)} do not match ((*, K) and (V, K))")
    num_classes = linear_weight.shape[0]
    if weight is not None and weight.shape != (num_classes,):
        raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
    if target.is_floating_point():
        return _soft_target_reference(input, linear_weight, target, linear_bias, weight, reduction,
                                      label_smoothing, softcap, z_loss)
    ignore_index = -100 if ignore_index is None else ignore_index
    K = input.shape[-1]
    extra = linear_weight.shape[1:-1]  # the K-dimensional loss's (d1, …, dk)
    if extra:
        if input.dim() != 2 or tuple(target.shape) != (input.shape[0], *extra):
            raise RuntimeError(f"fusedad.linear_cross_entropy: a weight of shape {tuple(linear_weight.shape)} needs "
                               f"input (N, {K}) and target (N, {', '.join(map(str, extra))})")
        D = math.prod(extra)
        w3 = linear_weight.reshape(num_classes, D, K)
        b2 = linear_bias.reshape(num_classes, D) if linear_bias is not None else None
        t2 = target.reshape(input.shape[0], D)
        slices = [(input, w3[:, j], None if b2 is None else b2[:, j], t2[:, j]) for j in range(D)]
    else:
        if tuple(target.shape) != tuple(input.shape[:-1]):
            raise RuntimeError(f"fusedad.linear_cross_entropy: target of shape {tuple(target.shape)} does not "
                               f"match input of shape {tuple(input.shape)} (expected {tuple(input.shape[:-1])})")
        slices = [(input.reshape(-1, K), linear_weight, linear_bias, target.reshape(-1))]
    if target.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"fusedad.linear_cross_entropy: class-index targets must be int64, got {target.dtype}")
    if not torch.compiler.is_compiling():
        kernels.check_target(target, num_classes, ignore_index)
    cap = float(softcap) if softcap else 0.0
    stats = [_stats(x, w, b, t, weight, cap, label_smoothing > 0) for x, w, b, t in slices]
    if extra:
        lse, zt, zs = (torch.stack(s, dim=1).reshape(-1) for s in zip(*stats))
    else:
        lse, zt, zs = stats[0]
    loss = _combine(lse, zt, zs, target.reshape(-1), weight, num_classes, ignore_index, reduction, label_smoothing,
                    z_loss)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(input.dtype if out_dtype is None else out_dtype)


__all__ = ["linear_cross_entropy"]

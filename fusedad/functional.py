"""``fusedad.functional.linear``: ``torch.nn.functional.linear`` plus a fused activation."""
import math

import torch

from . import activations
from . import mlp as _mlp
from ._validate import _check_main_grad, autocast_all, cast_and_check, check_block_args, common_2d_call
from .autograd import eager_cpu_linear, route


def linear(input, weight, bias=None, activation=None, *, weight_main_grad=None):
    """``act(input · weightᵀ + bias)`` with the bias and activation fused into the GEMM epilogue.

    Same semantics as ``torch.nn.functional.linear`` for ``activation=None``.

    Args:
        input: (*, in_features) — any number of leading dims, including none (1-D input).
        weight: (out_features, in_features), or (in_features,) for a single output without bias.
        bias: (out_features,) or None ((1,) and () broadcast as in F.linear).
        activation: None or a name of ``fusedad.ACTIVATIONS``: "relu", "gelu" (erf), "gelu_tanh", "silu",
            "relu2" (squared ReLU).
        weight_main_grad: None, or an (out_features, in_features) buffer (typically float32 for a
            bf16 weight, as Megatron's ``main_grad``): the backward kernel *adds* dW into it and leaves
            ``weight.grad`` untouched — gradient accumulation over micro-batches with no extra pass.
    Returns:
        (*, out_features); (*) for a 1-D weight.

    Runs the Triton kernels on CUDA, the same kernels through Triton's interpreter on CPU when
    ``TRITON_INTERPRET=1`` was set before import, else an eager path (``fusedad.backend(tensor)`` says
    which). Under autocast it casts like ``nn.Linear`` (to the autocast dtype) and gradients flow back
    in the original dtypes.
    """
    act = activations.lookup(activation)  # raises on an unknown name
    if weight_main_grad is None:  # the per-call fast paths
        y = eager_cpu_linear(input, weight, bias, act)  # CPU tensors on the eager backend: F.linear checks
        if y is not None:
            return y
        if common_2d_call(input, weight, bias):
            return route(input, weight, bias, act)  # nothing to cast, fold or expand
    input, weight, bias = cast_and_check(input, weight, bias, weight_main_grad)

    vector_weight = weight.dim() == 1
    if vector_weight:
        weight = weight.unsqueeze(0)
        weight_main_grad = None if weight_main_grad is None else weight_main_grad.unsqueeze(0)
    out_features, in_features = weight.shape
    if bias is not None and bias.shape != (out_features,):
        bias = bias.expand(out_features)  # () or (1,): a stride-0 view, read as is by the kernels
    lead = input.shape[:-1]
    # 2-D inputs reach the kernels with their own strides; leading dims are folded into rows (a view
    # whenever they can be, as F.linear does).
    x = input if input.dim() == 2 else input.reshape(math.prod(lead), in_features)
    y = route(x, weight, bias, act, weight_main_grad)
    y = y if input.dim() == 2 else y.reshape(*lead, out_features)
    return y.squeeze(-1) if vector_weight else y


def _rows(input, in_features):
    """(*, K) -> (M, K): a view whenever the leading dims allow (as F.linear folds them)."""
    return input if input.dim() == 2 else input.reshape(math.prod(input.shape[:-1]), in_features)


def _check_main_grads(main_grads, weights):
    if main_grads is None:
        return None
    for m, w in zip(main_grads, weights):
        if m is not None:
            _check_main_grad(m, w)
    return tuple(main_grads)


def mlp(input, w1, b1, w2, b2, activation="gelu", *, recompute=False, main_grads=None):
    """The plain MLP block ``act(input·w1ᵀ + b1)·w2ᵀ + b2`` (GPT-2, BERT, ViT), fused.

    Args:
        input: (*, in_features).  w1: (hidden, in_features), b1: (hidden,) or None.
        w2: (out_features, hidden), b2: (out_features,) or None.
        activation: None or a name of ``fusedad.ACTIVATIONS`` (GPT-2: "gelu_tanh", BERT/ViT: "gelu").
        recompute: save only ``input`` for backward and recompute ``input·w1ᵀ + b1`` there.
        main_grads: None or (for w1, w2) fp32 buffers the backward adds dW into (``.grad`` untouched).
    Returns:
        (*, out_features).

    Saved for backward: ``input`` and the pre-activation Z₁ (M, hidden), not act(Z₁): the down
    projection's backward kernel forms dZ₁ = (dY·w2) ⊙ act'(Z₁) in its epilogue and recomputes act(Z₁)
    there for w2's gradient (see docs/mlp-blocks.md).
    """
    act = activations.lookup(activation)
    input, w1, b1, w2, b2 = autocast_all(input, w1, b1, w2, b2)
    k = input.shape[-1] if isinstance(input, torch.Tensor) and input.dim() > 0 else None
    hidden = w1.shape[0] if isinstance(w1, torch.Tensor) and w1.dim() == 2 else None
    out = w2.shape[0] if isinstance(w2, torch.Tensor) and w2.dim() == 2 else None
    check_block_args("fusedad.functional.mlp", input, [("w1", w1, (None, k)), ("w2", w2, (None, hidden))],
                     [("b1", b1, hidden), ("b2", b2, out)])
    main_grads = _check_main_grads(main_grads, (w1, w2))
    if main_grads is not None:
        main_grads = (main_grads[0], None, main_grads[1])
    y = _mlp.block(_rows(input, k), w1, None, w2, b1, None, b2, _mlp.BlockSpec(act, gated=False, recompute=recompute),
                   main_grads)
    return y.reshape(*input.shape[:-1], out)


def gated_mlp(input, w_gate, w_up, w_down, activation="silu", b_gate=None, b_up=None, b_down=None, *,
              recompute=False, main_grads=None):
    """The gated MLP block ``(act(input·w_gateᵀ + b_gate) ⊙ (input·w_upᵀ + b_up))·w_downᵀ + b_down``, fused.

    SwiGLU (Llama, Mistral, Qwen): activation="silu"; GeGLU (Gemma): "gelu_tanh" / "gelu"; ReGLU: "relu".

    Args:
        input: (*, hidden).  w_gate, w_up: (intermediate, hidden) — or ``w_gate`` one packed
            (2·intermediate, hidden) gate_up weight, gate rows first (Phi-3's ``gate_up_proj``) with
            ``w_up=None`` (read in place, never copied; its gradient is one (2·intermediate, hidden) tensor).
        w_down: (out, intermediate).  b_gate, b_up: (intermediate,) or None (packed: ``b_gate`` may be the
            packed (2·intermediate,) bias, ``b_up=None``).  b_down: (out,) or None.
        recompute: save only ``input`` for backward (the up projection runs again there).
        main_grads: None or (for w_gate, w_up, w_down) fp32 buffers the backward adds dW into.
    Returns:
        (*, out).

    Saved for backward: ``input``, G = input·w_gateᵀ + b_gate and U = input·w_upᵀ + b_up — not act(G) nor
    H; nothing under ``no_grad``/``inference_mode``, where G and U are not even written.
    """
    act = activations.lookup(activation)
    input, w_gate, w_up, w_down, b_gate, b_up, b_down = autocast_all(input, w_gate, w_up, w_down, b_gate, b_up, b_down)
    k = input.shape[-1] if isinstance(input, torch.Tensor) and input.dim() > 0 else None
    packed = w_up is None
    rows = w_gate.shape[0] if isinstance(w_gate, torch.Tensor) and w_gate.dim() == 2 else None
    where = "fusedad.functional.gated_mlp"
    if packed and rows is not None and rows % 2:
        raise RuntimeError(f"{where}: a packed gate_up weight (w_up=None) needs an even number of rows "
                           f"(2·intermediate, hidden), got shape {tuple(w_gate.shape)}")
    inter = rows // 2 if packed and rows is not None else rows
    out = w_down.shape[0] if isinstance(w_down, torch.Tensor) and w_down.dim() == 2 else None
    weights = [("w_gate", w_gate, (None, k))] + ([] if packed else [("w_up", w_up, (inter, k))]) + \
        [("w_down", w_down, (None, inter))]
    if packed and b_up is not None:
        raise RuntimeError(f"{where}: with a packed gate_up weight (w_up=None) pass its bias as b_gate of shape "
                           f"({rows},), not b_up")
    biases = [("b_gate", b_gate, rows), ("b_up", b_up, inter), ("b_down", b_down, out)]
    check_block_args(where, input, weights, biases)
    main_grads = _check_main_grads(main_grads, (w_gate, w_up if not packed else w_gate, w_down))
    spec = _mlp.BlockSpec(act, gated=True, packed=packed, recompute=recompute)
    y = _mlp.block(_rows(input, k), w_gate, w_up, w_down, b_gate, b_up, b_down, spec, main_grads)
    return y.reshape(*input.shape[:-1], out)


from .cross_entropy import linear_cross_entropy  # noqa: E402  (the fused LM head loss)

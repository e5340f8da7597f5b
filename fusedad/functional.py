"""``fusedad.functional.linear``: ``torch.nn.functional.linear`` plus a fused activation."""
import math

from . import activations
from ._validate import cast_and_check, common_2d_call
from .autograd import route


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
    if weight_main_grad is None and common_2d_call(input, weight, bias):
        return route(input, weight, bias, act)  # the per-call fast path: nothing to cast, fold or expand
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


from .cross_entropy import linear_cross_entropy  # noqa: E402  (the fused LM head loss)

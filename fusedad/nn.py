"""``fusedad.nn.Linear``: a drop-in ``torch.nn.Linear`` running the fused kernels."""
import torch

from . import activations
from .functional import linear


class Linear(torch.nn.Linear):
    """``y = act(x·Wᵀ + b)`` — ``torch.nn.Linear`` with an optional fused activation.

    Same parameters, initialisation (``reset_parameters``), ``state_dict`` keys and ``extra_repr`` as
    ``torch.nn.Linear`` (it subclasses it, so ``isinstance(m, nn.Linear)`` holds and an nn.Linear
    state_dict loads unchanged).

    Args:
        in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
        activation: None, "relu", "gelu", "gelu_tanh" or "silu", applied in the GEMM epilogue.

    Shape:
        input (*, in_features) -> output (*, out_features)
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        activations.check_activation(activation)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input):
        return linear(input, self.weight, self.bias, self.activation)

    def extra_repr(self):
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"

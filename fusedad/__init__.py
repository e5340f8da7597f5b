"""fusedad — a drop-in ``nn.Linear`` on Triton kernels with a fused bias+activation epilogue and a fused,
single-launch backward.

    import fusedad
    layer = fusedad.nn.Linear(1024, 4096, activation="gelu_tanh")
    y = fusedad.functional.linear(x, w, b, activation="relu")
    mlp = fusedad.nn.GatedMLP(4096, 14336, activation="silu")   # fused SwiGLU block (also nn.MLP)
    model = fusedad.convert(model)          # swap every nn.Linear (and fuse Linear→ReLU/GELU/SiLU)
                                            # and Hugging Face MLP blocks (fusedad.recipes)
    fusedad.testing.gradcheck(my_linear)     # verify a linear kernel as fusedad's suite does
    loss = fusedad.linear_cross_entropy(h, lm_head_w, labels)   # fused LM head loss, no logits
    fusedad.backend(x)                      # "triton" | "triton-interpreter" | "eager"
"""
from . import functional, nn, recipes, testing
from .activations import ACTIVATIONS
from .backend import backend
from .convert import convert
from .functional import linear, linear_cross_entropy
from .nn import GatedMLP, Linear, LinearCrossEntropyLoss, MLP

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "GatedMLP", "Linear", "MLP", "LinearCrossEntropyLoss", "backend", "convert", "functional", "linear",
           "linear_cross_entropy", "nn", "recipes", "testing"]

"""The one dispatch point: which implementation runs fusedad's forward and backward for a device.

    "triton"             CUDA tensors: the compiled Triton kernels
    "triton-interpreter" CPU tensors when the kernels were defined under TRITON_INTERPRET=1: the same
                         kernels, run by Triton's interpreter (numpy) — how CI tests the real kernels
    "eager"              anything else (CPU without the interpreter, other devices): torch ops with the
                         same semantics (``fusedad/eager.py``)

``select(device)`` returns a ``Backend`` with ``forward`` and ``backward`` (the contract of
``kernels/linear.py``, activations as table rows). Inside a graph that Inductor compiles (the custom
ops' bodies on torch.compile's fake tensors) the interpreter is never chosen: those take the eager path.
"""
import dataclasses
import sys
from typing import Callable

import torch

from . import eager
from .kernels import linear as kernels

TRITON = "triton"
INTERPRETER = "triton-interpreter"
EAGER = "eager"


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    #: forward(x, weight, bias, act, store_preact=False, x_tangent=None, weight_tangent=None,
    #:         bias_tangent=None, store_preact_tangent=False[, wrap]) -> (y, z, y_tangent, z_tangent)
    forward: Callable
    #: backward(grad_y, x, weight, saved, act, need_x, need_weight, need_bias, weight_grad_out=None[, wrap])
    #:     -> (grad_x, grad_w, grad_b)
    backward: Callable

    @property
    def runs_kernels(self):
        return self.name != EAGER


_BACKENDS = {name: Backend(name, kernels.linear_forward, kernels.linear_backward) for name in (TRITON, INTERPRETER)}
_BACKENDS[EAGER] = Backend(EAGER, eager.linear_forward, eager.linear_backward)


def _name(device_type, in_graph):
    if kernels.INTERPRETER:
        return INTERPRETER if device_type in ("cpu", "cuda") and not in_graph else EAGER
    return TRITON if device_type == "cuda" else EAGER


_BY_DEVICE_TYPE = {}  # (device type, in_graph) -> Backend: decided once per device type


def select(device, in_graph=False):
    """The Backend for tensors on ``device`` (a torch.device); ``in_graph``: inside a custom op's body
    that torch.compile is tracing (see ``select_for_op``)."""
    key = (device.type, in_graph)
    chosen = _BY_DEVICE_TYPE.get(key)
    if chosen is None:
        chosen = _BY_DEVICE_TYPE[key] = _BACKENDS[_name(device.type, in_graph)]
    return chosen


def eager_backend():
    """The eager Backend (torch ops)."""
    return _BACKENDS[EAGER]


#: The Backends of a CPU and a CUDA tensor outside a graph, decided once (at import the interpreter
#: setting is known): ``for_tensor``'s per-call answer is two attribute reads.
_CPU = _BACKENDS[_name("cpu", False)]
_CUDA = _BACKENDS[_name("cuda", False)]


def for_tensor(t):
    """``select(t.device)`` for a plain call, without building the device object for CPU and CUDA."""
    if t.is_cuda:
        return _CUDA
    if t.is_cpu:
        return _CPU
    return select(t.device)


#: The tensor types the kernels take. Functorch's wrappers are of type torch.Tensor; any Python subclass
#: (DTensor, fake and functional tensors, other ``__torch_dispatch__`` wrappers) is not.
PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def select_for_op(*tensors):
    """The Backend for a custom op's body called on ``tensors`` (None entries ignored).

    CUDA: the kernels (``wrap_triton`` makes the launch visible to torch.compile). Triton's interpreter:
    only on real tensors (a plain call, the replay of a traced, scripted or exported model);
    torch.compile also runs the body on functional (fake) tensors to trace it, and an interpreted
    kernel cannot run on those, so they take the eager path, which Inductor compiles as ordinary ops.
    """
    plain = all(type(t) in PLAIN_TYPES for t in tensors if t is not None)
    return select(tensors[0].device, in_graph=not plain)


def backend(tensor_or_device):
    """Name of the implementation that runs fusedad ops for this tensor (or device).

    A DTensor: the one that runs on its local shards. Any other tensor subclass: "eager" (``fusedad.linear``
    runs torch ops on it, which the subclass handles; the kernels read raw storage).
    """
    if isinstance(tensor_or_device, torch.Tensor):
        if type(tensor_or_device) not in PLAIN_TYPES and not is_dtensor(tensor_or_device):
            return EAGER
        return select(tensor_or_device.device).name
    return select(torch.device(tensor_or_device)).name


def is_dtensor(t):
    """True for a DTensor (without importing torch.distributed.tensor: no DTensor exists before that)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)

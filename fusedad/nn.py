"""``fusedad.nn.Linear``: a drop-in ``torch.nn.Linear`` running the fused kernels."""
import sys

import torch

from . import activations, ops
from ._validate import common_2d_call
from .autograd import eager_cpu_linear, route
from .functional import gated_mlp, linear, mlp


class Linear(torch.nn.Linear):
    """``y = act(x·Wᵀ + b)`` — ``torch.nn.Linear`` with an optional fused activation.

    Same parameters, initialisation (``reset_parameters``), ``state_dict`` keys and ``extra_repr`` as
    ``torch.nn.Linear`` (it subclasses it, so ``isinstance(m, nn.Linear)`` holds and an nn.Linear
    state_dict loads unchanged).

    Args:
        in_features, out_features, bias, device, dtype: as ``torch.nn.Linear``.
        activation: None or a name of ``fusedad.ACTIVATIONS``, applied in the GEMM epilogue.
        accumulate_main_grad: keep an fp32 (fp64 for an fp64 weight) ``weight.main_grad`` (allocated on
            first use) into which the backward kernel adds dW, as Megatron does for bf16 parameters;
            ``weight.grad`` then stays None. Zero it yourself between optimizer steps
            (``layer.weight.main_grad.zero_()``). Refused inside ``DistributedDataParallel`` and under
            FSDP2's ``fully_shard`` (both reduce ``.grad`` only) and for DTensor (tensor-parallel) weights;
            across processes without them, all-reduce ``main_grad`` yourself.

    Shape:
        input (*, in_features) -> output (*, out_features)
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None,
                 accumulate_main_grad=False):
        activations.lookup(activation)  # an unknown name fails here, at construction
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.accumulate_main_grad = accumulate_main_grad

    def forward(self, input):
        if torch.jit.is_scripting():
            # TorchScript compiles only this branch (is_scripting() is a constant to it, the Python path
            # below is never compiled); see ops.scripted_linear.
            return ops.scripted_linear(input, self.weight, self.bias, self.activation, self.accumulate_main_grad)
        weight, bias = self.weight, self.bias
        if not self.accumulate_main_grad:
            # The per-call fast paths (what ``linear`` does for this call, without its own call).
            act = activations.lookup(self.activation)
            y = eager_cpu_linear(input, weight, bias, act)
            if y is not None:
                return y
            if common_2d_call(input, weight, bias):
                return route(input, weight, bias, act)
        main_grad = None
        if self.accumulate_main_grad and self.weight.requires_grad:
            _refuse_main_grad_under_data_parallel(self)
            main_grad = getattr(self.weight, "main_grad", None)
            if main_grad is None:
                # fp32 for 16-bit and fp32 weights; an fp64 weight keeps fp64 (fp32 would round its dW).
                acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
                main_grad = self.weight.main_grad = torch.zeros_like(self.weight, dtype=acc)
        return linear(input, self.weight, self.bias, self.activation, weight_main_grad=main_grad)

    def extra_repr(self):
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"


def _tensor_parallel(block):
    """True when a parameter is a DTensor at forward time (tensor parallelism; FSDP2 has unsharded its
    parameters into plain tensors by then)."""
    from .backend import is_dtensor

    return any(is_dtensor(p) for p in block.parameters())


def _main_grads(block, layers):
    """The fp32 ``main_grad`` buffers of the layers that accumulate into one (allocated on first use),
    or None when none does. A block fuses its layers' backward: each child's ``accumulate_main_grad``
    decides for its own weight, as in the child's own forward."""
    if not any(layer.accumulate_main_grad and layer.weight.requires_grad for layer in layers):
        return None
    out = []
    for layer in layers:
        if layer.accumulate_main_grad and layer.weight.requires_grad:
            _refuse_main_grad_under_data_parallel(layer)
            if getattr(layer.weight, "main_grad", None) is None:
                layer.weight.main_grad = torch.zeros_like(layer.weight, dtype=torch.float32)
            out.append(layer.weight.main_grad)
        else:
            out.append(None)
    return tuple(out)


class GatedMLP(torch.nn.Module):
    """``down_proj(act(gate_proj(x)) ⊙ up_proj(x))`` — the Llama/Mistral/Qwen/Gemma MLP, fused.

    Children ``gate_proj``, ``up_proj`` (hidden → intermediate) and ``down_proj`` (intermediate → hidden)
    are ``fusedad.nn.Linear`` layers, so a Hugging Face ``LlamaMLP`` state_dict loads unchanged. The
    forward runs ``fusedad.functional.gated_mlp`` on their parameters (the children's own forwards are
    not called); a child's ``accumulate_main_grad`` is honoured for its weight.

    Args:
        hidden_size, intermediate_size: K and I.
        activation: a name of ``fusedad.ACTIVATIONS`` ("silu": SwiGLU; "gelu_tanh"/"gelu": GeGLU; "relu": ReGLU).
        bias: biases on all three projections.
        recompute: save only the input for backward; the backward replays the gate/up projection.
    Shape:
        input (*, hidden_size) -> output (*, hidden_size)
    """

    def __init__(self, hidden_size, intermediate_size, activation="silu", bias=False, device=None, dtype=None,
                 recompute=False):
        super().__init__()
        activations.lookup(activation)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation
        self.recompute = recompute

    def forward(self, input):
        if _tensor_parallel(self):
            # DTensor weights (parallelize_module): the plan's input/output conversions are forward hooks of
            # the children, so run the children (fused linear layers on the local shards) and the gated
            # product by torch ops.
            act = activations.lookup(self.activation)
            return self.down_proj(act.apply(self.gate_proj(input)) * self.up_proj(input))
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        return gated_mlp(input, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.activation,
                         self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias, recompute=self.recompute,
                         main_grads=_main_grads(self, layers))

    def extra_repr(self):
        return f"activation={self.activation!r}, recompute={self.recompute}"


class MLP(torch.nn.Module):
    """``fc2(act(fc1(x)))`` — the GPT-2/BERT/ViT MLP (timm's ``Mlp`` layout), fused.

    Children ``fc1`` (in → hidden) and ``fc2`` (hidden → out) are ``fusedad.nn.Linear`` layers, so a timm
    ``Mlp`` state_dict loads unchanged.

    Args:
        in_features, hidden_features: K and I; out_features: N (default ``in_features``).
        activation: None or a name of ``fusedad.ACTIVATIONS`` (default "gelu", erf form as timm/BERT).
        bias, device, dtype: as ``torch.nn.Linear``.
        recompute: save only the input for backward; the backward replays fc1.
    Shape:
        input (*, in_features) -> output (*, out_features)
    """

    def __init__(self, in_features, hidden_features, out_features=None, activation="gelu", bias=True, device=None,
                 dtype=None, recompute=False):
        super().__init__()
        activations.lookup(activation)
        out_features = in_features if out_features is None else out_features
        self.fc1 = Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.recompute = recompute

    def forward(self, input):
        if _tensor_parallel(self):  # see GatedMLP.forward
            return self.fc2(activations.lookup(self.activation).apply(self.fc1(input)))
        return mlp(input, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation,
                   recompute=self.recompute, main_grads=_main_grads(self, (self.fc1, self.fc2)))

    def extra_repr(self):
        return f"activation={self.activation!r}, recompute={self.recompute}"


def _refuse_main_grad_under_data_parallel(layer):
    """DistributedDataParallel and FSDP2 reduce ``.grad``; main_grad accumulation leaves ``weight.grad`` None,
    so they would never see the weight gradient and each rank's ``main_grad`` would hold its own
    unsynchronised sum (measured with gloo on 2 processes under DDP: weight.grad all zeros, main_grad off
    the global sum by up to 0.54; under FSDP2 the sharded weight's grad stays None). Refuse instead of
    training on silently wrong gradients."""
    from torch.nn.parallel import DistributedDataParallel

    if DistributedDataParallel._get_active_ddp_module() is not None:
        raise RuntimeError(
            "fusedad.nn.Linear(accumulate_main_grad=True) inside DistributedDataParallel: DDP all-reduces "
            "weight.grad, which main_grad accumulation leaves None, so weight.main_grad would hold this rank's "
            "unsynchronised sum. Use accumulate_main_grad=False under DDP, or all-reduce weight.main_grad "
            "yourself outside DDP.")
    if _managed_by_fully_shard(layer):
        raise RuntimeError(
            "fusedad.nn.Linear(accumulate_main_grad=True) under FSDP2 (fully_shard): FSDP2 reduce-scatters "
            "weight.grad, which main_grad accumulation leaves None, so the sharded weight would get no gradient "
            "and weight.main_grad would hold this rank's unsynchronised sum. Use accumulate_main_grad=False; "
            "for fp32 gradient reduction and accumulation with bf16 compute, give fully_shard "
            "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) with fp32 "
            "parameters.")


def _managed_by_fully_shard(layer):
    """True if FSDP2's fully_shard manages this layer's parameters (applied to it or to a module above it).

    FSDP2 marks only the modules fully_shard is applied to, so this asks its states which module each
    parameter belongs to. Those are FSDP2 internals: checked by tests/test_distributed.py with the torch
    version CI pins (2.13: a list ``_fsdp_param_groups``) and by hand with the GPU image's 2.11 (one
    ``_fsdp_param_group``); if a later torch renames them, this finds nothing rather than failing."""
    fsdp_state = sys.modules.get("torch.distributed.fsdp._fully_shard._fsdp_state")
    if fsdp_state is None:  # fully_shard was never imported
        return False
    from torch.distributed._composable_state import _module_state_mapping

    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, fsdp_state.FSDPState):
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:
                group = getattr(state, "_fsdp_param_group", None)
                groups = (group,) if group is not None else ()
            for group in groups:
                for param in getattr(group, "fsdp_params", ()):
                    if getattr(getattr(param, "_module_info", None), "module", None) is layer:
                        return True
    return False


class LinearCrossEntropyLoss(torch.nn.modules.loss._WeightedLoss):
    """Mirror of ``torch.nn.LinearCrossEntropyLoss`` (PyTorch ≥ 2.13) on the fused kernels, on any torch.

    Owns the head: ``self.linear`` is a ``torch.nn.Linear(in_features, num_classes·∏out_features, bias)``
    and ``self.weight`` the class weights (a buffer), so the constructor, ``state_dict`` keys
    (``weight``, ``linear.weight``, ``linear.bias``) and ``forward(input, target)`` are PyTorch's.
    ``options`` (the chunking strategy of PyTorch's path) is accepted and ignored: fusedad never
    materialises the logits. Extensions: ``softcap`` and ``z_loss`` (see
    ``fusedad.functional.linear_cross_entropy``).
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None,
                 softcap=None, z_loss=0.0):
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.softcap = softcap
        self.z_loss = z_loss
        size = num_classes
        for d in self.out_features:
            size *= d
        self.linear = torch.nn.Linear(in_features, size, bias=bias, device=device, dtype=dtype)

    def forward(self, input, target):
        from .cross_entropy import linear_cross_entropy

        lead = (self.num_classes, *self.out_features)
        weight = self.linear.weight.reshape(*lead, self.linear.in_features)
        bias = self.linear.bias.reshape(lead) if self.linear.bias is not None else None
        return linear_cross_entropy(input, weight, target, linear_bias=bias, weight=self.weight,
                                    reduction=self.reduction, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, softcap=self.softcap, z_loss=self.z_loss)

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, softcap={self.softcap}, "
                f"z_loss={self.z_loss}")

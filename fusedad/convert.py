"""``fusedad.convert``: swap a model's ``nn.Linear`` layers for ``fusedad.nn.Linear``."""
import torch

from . import activations, causal_lm, recipes
from .nn import Linear, LinearCrossEntropyLoss


def _fused_copy(linear, activation=None):
    """A fusedad Linear sharing ``linear``'s Parameter objects (no copy, no re-initialisation)."""
    new = Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                 dtype=linear.weight.dtype, activation=activation)
    new.weight = linear.weight
    new.bias = linear.bias
    new.train(linear.training)
    return new


def _is_torch_lce(module):
    """``torch.nn.LinearCrossEntropyLoss`` (PyTorch ≥ 2.13; never true on older torch)."""
    cls = getattr(torch.nn, "LinearCrossEntropyLoss", None)
    return cls is not None and type(module) is cls


def _fused_lce(loss):
    """A fusedad LinearCrossEntropyLoss sharing ``loss``'s head (its ``linear`` module and class weights)."""
    new = LinearCrossEntropyLoss(loss.linear.in_features, loss.num_classes, out_features=loss.out_features,
                                 bias=loss.linear.bias is not None, device="meta", reduction=loss.reduction,
                                 ignore_index=loss.ignore_index, label_smoothing=loss.label_smoothing,
                                 options=loss.options)
    new.linear = loss.linear
    new.weight = loss.weight
    new.train(loss.training)
    return new


def convert(model, fuse_activations=True, loss_without_logits=True):
    """Replace every ``torch.nn.Linear`` in ``model`` (in place) and return ``model``.

    Each replacement shares the original parameters, so optimizers, tied weights and state_dict keys
    keep working. With ``fuse_activations``, an ``nn.Linear`` directly followed inside an
    ``nn.Sequential`` by a module the activation table lists (``nn.ReLU``, ``nn.GELU`` with either
    approximation, ``nn.SiLU``; exact types only) becomes one fused layer, and the activation module is replaced by ``nn.Identity`` (indices, and so
    state_dict keys, stay the same). Subclasses of nn.Linear (fusedad's own included) are left alone,
    as are forward hooks registered on the replaced modules (they are not carried over).

    With ``fuse_activations``, MLP blocks a recipe recognises (``fusedad.recipes``: Hugging Face
    transformers' Llama/Mistral/Qwen2/Qwen3/Gemma, Phi-3, GPT-NeoX, GPT-2 MLPs and BERT/ViT
    ``*Intermediate``, plus any registered with ``fusedad.recipes.register``) become a
    ``fusedad.recipes.FusedBlock`` running the fused block, with the same children, names and Parameter
    objects; a block that is unrecognised, modified, hooked, or whose activation has no table row is
    left as it is (its ``nn.Linear`` layers are still swapped). transformers' ``Conv1D`` layers (GPT-2)
    become a ``Conv1D`` subclass running the kernels on ``weight.t()`` (no copy; ``state_dict`` unchanged).

    With ``loss_without_logits``, transformers' causal LMs listed in ``fusedad.causal_lm.MODELS`` get an
    instance-level ``forward`` whose training calls with ``labels`` compute the loss with
    ``fusedad.linear_cross_entropy`` from the hidden states (no logits; ``logits=None`` is returned);
    other calls run the model's own forward (see ``fusedad.causal_lm``).

    ``torch.nn.LinearCrossEntropyLoss`` modules (PyTorch ≥ 2.13) become ``fusedad.nn.LinearCrossEntropyLoss``
    sharing their ``linear`` head and class weights. A bare ``nn.Linear`` (or LinearCrossEntropyLoss) passed
    as ``model`` is returned converted.
    """
    if type(model) is torch.nn.Linear:
        return _fused_copy(model)
    if _is_torch_lce(model):
        return _fused_lce(model)
    if recipes.is_hf_conv1d(model):
        return recipes.fused_conv1d(model)
    if fuse_activations:
        block = recipes.fuse_block(model)
        if block is not None:
            return block
    if loss_without_logits:
        causal_lm.install(model)
    for name, child in list(model.named_children()):
        block = recipes.fuse_block(child) if fuse_activations else None
        if block is not None:
            setattr(model, name, block)
        elif type(child) is torch.nn.Linear:
            setattr(model, name, _fused_copy(child))
        elif recipes.is_hf_conv1d(child) and not recipes._hooked(child):
            setattr(model, name, recipes.fused_conv1d(child))
        elif _is_torch_lce(child):
            setattr(model, name, _fused_lce(child))
        else:
            convert(child, fuse_activations, loss_without_logits)
    if fuse_activations and isinstance(model, torch.nn.Sequential):
        names = list(model._modules)
        for first, second in zip(names, names[1:]):
            layer, act_module = model._modules[first], model._modules[second]
            act = activations.from_module(act_module)
            if type(layer) is Linear and layer.activation is None and act is not None:
                layer.activation = act.name
                model._modules[second] = torch.nn.Identity()
    return model

"""The causal-LM training loss without logits, for transformers' ``*ForCausalLM`` models.

``fusedad.convert`` gives a recognised causal LM (:data:`MODELS`: its forward is transformers' standard
one — decoder, ``lm_head`` on the hidden states, ``self.loss_function``) an instance-level ``forward``
(:class:`LossWithoutLogits`; the class is not patched). A *training* call with ``labels`` then computes
the loss with ``fusedad.linear_cross_entropy`` from the decoder's hidden states and the head's weight —
the M×V logits are never created — and returns ``logits=None``. Everything else calls the model's own
forward unchanged: calls without labels, ``eval()`` mode, ``no_grad`` (so evaluation and ``generate()``
return logits as before).

The loss is transformers' ``ForCausalLMLoss``: labels shifted left by one with ``ignore_index`` -100
padded at the end (or ``shift_labels`` if given), mean over the counted tokens — or, with
``num_items_in_batch`` (the Trainer's gradient-accumulation normaliser), the sum divided by it — returned
in fp32. It differs from transformers' in one way: the logits are not rounded to the model's dtype before
the fp32 softmax (the fused loss never stores them), so bf16/fp16 losses are slightly more accurate.

The model's own forward runs instead (the fused path would not compute the same) when: ``logits_to_keep``
is not 0, ``return_dict=False``, the model's ``loss_function`` is not ``ForCausalLMLoss`` (a custom
``loss_type`` or loss function), the head is not a bias-free or biased linear layer (or has hooks), or the
config has ``pretraining_tp > 1``. A config's ``final_logit_softcapping`` c (Gemma 2: the logits are
c·tanh(z/c) before the loss) is the fused loss's ``softcap``.
"""
import inspect
import warnings

import torch
import torch.nn.functional as F

from .cross_entropy import linear_cross_entropy

#: class name (from a ``transformers.models`` module) -> (decoder attribute, output class name)
MODELS = {
    "LlamaForCausalLM": ("model", "CausalLMOutputWithPast"),
    "MistralForCausalLM": ("model", "CausalLMOutputWithPast"),
    "Qwen2ForCausalLM": ("model", "CausalLMOutputWithPast"),
    "Qwen3ForCausalLM": ("model", "CausalLMOutputWithPast"),
    "GemmaForCausalLM": ("model", "CausalLMOutputWithPast"),
    # logits = c·tanh(lm_head(h) / c) with c = config.final_logit_softcapping: the fused loss's softcap
    "Gemma2ForCausalLM": ("model", "CausalLMOutputWithPast"),
    "Gemma3ForCausalLM": ("model", "CausalLMOutputWithPast"),  # the text model; Gemma 2's forward, softcap included
    "Phi3ForCausalLM": ("model", "CausalLMOutputWithPast"),
    "GPTNeoXForCausalLM": ("gpt_neox", "CausalLMOutputWithPast"),
    "GPT2LMHeadModel": ("transformer", "CausalLMOutputWithCrossAttentions"),
}

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def recognised(model):
    cls = type(model)
    return (cls.__name__ in MODELS and cls.__module__.startswith("transformers.models.")
            and "forward" in vars(cls) and "forward" not in vars(model))


class LossWithoutLogits:
    """The instance-level ``forward`` of a converted causal LM (see the module docstring)."""

    def __init__(self, model):
        # transformers' names are resolved here, not in the call: an import inside the forward is traced by
        # torch.compile, and torch 2.11's Dynamo cannot trace ``from transformers import modeling_outputs``
        # (a lazy module: "Bad import result", a graph break).
        from transformers import modeling_outputs
        from transformers.loss.loss_utils import ForCausalLMLoss

        self.model = model
        self.__signature__ = inspect.signature(type(model).forward.__get__(model))  # generate() reads it
        self._transformers_loss = ForCausalLMLoss
        self._output_class = getattr(modeling_outputs, MODELS[type(model).__name__][1])

    def _own(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def _fusable(self, bound):
        model, kw = self.model, bound.arguments
        head = getattr(model, "lm_head", None)
        config = model.config
        extra = kw.get("kwargs", {})
        return (model.training and torch.is_grad_enabled() and kw.get("labels") is not None
                and isinstance(kw.get("logits_to_keep", 0), int) and kw.get("logits_to_keep", 0) == 0
                and extra.get("return_dict", True) is not False
                and extra.get("output_hidden_states") is not True  # hidden_states tuple: keep it simple
                and model.loss_function is self._transformers_loss
                and isinstance(head, torch.nn.Linear) and not any(getattr(head, h) for h in _HOOKS)
                and getattr(head, "activation", None) is None
                and getattr(config, "pretraining_tp", 1) <= 1)

    def __call__(self, *args, **kwargs):
        bound = self.__signature__.bind(*args, **kwargs)
        if not self._fusable(bound):
            return self._own(*args, **kwargs)
        model = self.model
        decoder_name = MODELS[type(model).__name__][0]
        arguments = dict(bound.arguments)
        labels = arguments.pop("labels")
        arguments.pop("logits_to_keep", None)
        extra = arguments.pop("kwargs", {})
        outputs = getattr(model, decoder_name)(**arguments, **extra)
        hidden = outputs.last_hidden_state
        shift_labels = extra.get("shift_labels")
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        num_items = extra.get("num_items_in_batch")
        head = model.lm_head
        loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), linear_bias=head.bias,
                                    reduction="mean" if num_items is None else "sum", ignore_index=-100,
                                    softcap=getattr(model.config, "final_logit_softcapping", None),
                                    out_dtype=torch.float32)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return self._output_class(loss=loss, logits=None, **fields)

    def __reduce__(self):  # pickles as "the fused forward of this model"
        return LossWithoutLogits, (self.model,)


_WARNED = set()


def install(model):
    """Give a recognised causal LM the loss without logits (idempotent). True if installed. Another
    transformers ``*ForCausalLM`` / ``*LMHeadModel`` keeps its own forward, and says so once per class."""
    if not recognised(model):
        cls = type(model)
        if (cls.__module__.startswith("transformers.models.") and cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))
                and cls.__name__ not in MODELS and cls.__name__ not in _WARNED):
            _WARNED.add(cls.__name__)
            warnings.warn(f"fusedad.convert: {cls.__name__} keeps its own forward: its training loss still creates "
                          f"the logits (only {', '.join(MODELS)} get the loss without logits)", stacklevel=3)
        return False
    model.forward = LossWithoutLogits(model)
    return True

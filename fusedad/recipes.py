"""Recipes: how ``fusedad.convert`` recognises a model's MLP blocks and replaces them with fused ones.

A model's MLP block calls its activation (and the gated product) inside its own ``forward``, so swapping
its linear layers fuses nothing. A *recipe* says what a block class computes in terms of its children:

    "gated":   down(act(gate(x)) ⊙ up(x))            Llama, Mistral, Qwen2/3, Gemma 1-3, and any class whose
                                                  forward reads as Llama's (see :func:`recipe_for`)
    "packed":  down(act(g) ⊙ u), (g, u) = gate_up(x) split in halves, gate first      Phi-3
    "plain":   down(act(fc1(x)))                      GPT-NeoX, GPT-2 (Conv1D)
    "act":     act(fc1(x))                            BERT / ViT ``*Intermediate`` (fused into the GEMM)

followed by the ``post`` children in order (GPT-2's residual dropout). ``convert`` replaces a block it
recognises with a :class:`FusedBlock` that holds the *same* child modules under the same names (the
projections as ``fusedad.nn.Linear`` / fused Conv1D sharing the Parameter objects, so ``state_dict`` keys,
optimizers and tied weights keep working) and runs ``fusedad.functional.gated_mlp`` / ``mlp`` / ``linear``.

A recipe never changes what a module computes. A block is left as it is unless every check holds:
its class is exactly the recipe's (transformers' built-in recipes: a class defined in a
``transformers.models`` module, ``forward`` its own and reading, statement for statement, as the recipe's
was read — :func:`forward_text`); no ``forward`` set on the instance; no hooks on it or
its children, and no global module hooks; its children are exactly the recipe's (an extra dropout or
any other added child → left alone); each projection is exactly ``nn.Linear`` (or an unfused
``fusedad.nn.Linear``), or transformers' ``Conv1D`` where the recipe says so — a PEFT/LoRA-wrapped
projection is another type, so the block is left alone (its plain ``nn.Linear`` layers are still
swapped); the shapes agree; and the activation module maps to a row of the activation table
(:func:`activation_of`; one without a row, e.g. ``quick_gelu``, leaves the block unfused).

A fused block re-checks its children on every call: a projection replaced after conversion (PEFT
injecting LoRA layers) or a hook added since makes it call its children as the original block did.

Users register recipes for their own block types with :func:`register`. Nothing here imports
transformers: classes are recognised by name and module, so a model that does not use transformers never
imports it, and no transformers class is patched.
"""
import ast
import dataclasses
import inspect
import textwrap
import weakref
from typing import Optional, Tuple

import torch

from . import activations, functional

__all__ = ["Recipe", "FusedBlock", "register", "recipe_for", "activation_of", "fuse_block", "fused_conv1d",
           "is_hf_conv1d"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a block class computes from its children (attribute names).

    kind: "gated" (``proj`` = (gate, up)), "packed" (``proj`` = (gate_up,), gate rows first), "plain"
    (``proj`` = (fc1,)) or "act" (``proj`` = (fc1,), ``down`` None: the block is act(fc1(x))).
    down: the down projection (None for "act").  act: the activation module.
    post: children applied to the block's output in order (only ``nn.Dropout`` is accepted).
    conv1d: the projections are transformers' ``Conv1D`` (weight stored (in, out)) instead of nn.Linear.
    """

    kind: str
    proj: Tuple[str, ...]
    down: Optional[str]
    act: str
    post: Tuple[str, ...] = ()
    conv1d: bool = False

    def __post_init__(self):
        want = {"gated": 2, "packed": 1, "plain": 1, "act": 1}
        if self.kind not in want or len(self.proj) != want[self.kind]:
            raise ValueError(f"fusedad: bad recipe kind {self.kind!r} with projections {self.proj!r}")
        if (self.down is None) != (self.kind == "act"):
            raise ValueError("fusedad: a recipe has a down projection unless its kind is 'act'")

    @property
    def children(self):
        return (*self.proj, *((self.down,) if self.down else ()), self.act, *self.post)


_GATED = Recipe("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn")

#: The forward every gated block below reads, written as :func:`forward_text` writes a ``forward``:
#: ``(parameters): statements`` (the docstring dropped, each statement unparsed by ``ast``).
GATED_FORWARD = "(self, x): down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)); return down_proj"

#: transformers' non-gated blocks by class name (the class must come from a ``transformers.models.*``
#: module), with the forward each was read with (transformers 5.17 and 5.25 alike): a class whose
#: ``forward`` reads otherwise — another transformers version changed it — is left as it is. The gated
#: blocks (LlamaMLP, MistralMLP, Qwen2/3MLP, Gemma/Gemma2/Gemma3MLP, …) need no entry: every transformers
#: class whose forward reads GATED_FORWARD gets the gated recipe (``recipe_for``).
_HF = {
    "Phi3MLP": (Recipe("packed", ("gate_up_proj",), "down_proj", "activation_fn"),
                "(self, hidden_states): up_states = self.gate_up_proj(hidden_states); "
                "gate, up_states = up_states.chunk(2, dim=-1); up_states = up_states * self.activation_fn(gate); "
                "return self.down_proj(up_states)"),
    "GPTNeoXMLP": (Recipe("plain", ("dense_h_to_4h",), "dense_4h_to_h", "act"),
                   "(self, hidden_states): hidden_states = self.dense_h_to_4h(hidden_states); "
                   "hidden_states = self.act(hidden_states); hidden_states = self.dense_4h_to_h(hidden_states); "
                   "return hidden_states"),
    "GPT2MLP": (Recipe("plain", ("c_fc",), "c_proj", "act", post=("dropout",), conv1d=True),
                "(self, hidden_states): hidden_states = self.c_fc(hidden_states); "
                "hidden_states = self.act(hidden_states); hidden_states = self.c_proj(hidden_states); "
                "hidden_states = self.dropout(hidden_states); return hidden_states"),
    "BertIntermediate": (Recipe("act", ("dense",), None, "intermediate_act_fn"),
                         "(self, hidden_states): hidden_states = self.dense(hidden_states); "
                         "hidden_states = self.intermediate_act_fn(hidden_states); return hidden_states"),
    "ViTMLP": (Recipe("plain", ("fc1",), "fc2", "activation_fn"),
               "(self, hidden_states): hidden_states = self.fc1(hidden_states); "
               "hidden_states = self.activation_fn(hidden_states); hidden_states = self.fc2(hidden_states); "
               "return hidden_states"),
}

#: user recipes, by exact class
_USER = {}


def register(cls, recipe):
    """Register ``recipe`` (a :class:`Recipe`) for blocks of exactly the class ``cls`` (subclasses are not
    matched: they may compute something else). ``recipe=None`` removes a registration. The same checks
    as for the built-in recipes apply to each block before it is fused."""
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise TypeError(f"fusedad.recipes.register: expected an nn.Module subclass, got {cls!r}")
    if recipe is None:
        _USER.pop(cls, None)
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"fusedad.recipes.register: expected a fusedad.recipes.Recipe, got {recipe!r}")
    else:
        _USER[cls] = recipe


def _own_forward(cls):
    """The class defines its own ``forward`` (not patched in from elsewhere)."""
    fn = vars(cls).get("forward")
    return fn is not None and getattr(fn, "__qualname__", None) == f"{cls.__qualname__}.forward" and \
        getattr(fn, "__module__", None) == cls.__module__


_FORWARD_TEXT = weakref.WeakKeyDictionary()  # class -> forward_text(class); classes made at run time can go


def forward_text(cls):
    """``cls.forward`` as ``"(parameters): statement; statement"`` — its parameters (positional only: any
    default, ``*args``, keyword-only or ``**kwargs`` → None), then its body without the docstring, each
    statement unparsed by ``ast`` (so comments, blank lines and formatting do not count) — or None if it
    has decorators or its source cannot be read. Cached per class."""
    if cls in _FORWARD_TEXT:
        return _FORWARD_TEXT[cls]
    text = None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(vars(cls)["forward"])))
    except (KeyError, OSError, TypeError, SyntaxError, IndentationError):
        tree = None
    fn = tree.body[0] if tree is not None and len(tree.body) == 1 else None
    if isinstance(fn, ast.FunctionDef) and not fn.decorator_list:
        a = fn.args
        if not (a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or a.defaults):
            body = fn.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                body = body[1:]
            text = f"({', '.join(p.arg for p in a.args)}): " + "; ".join(ast.unparse(stmt) for stmt in body)
    _FORWARD_TEXT[cls] = text
    return text


def recipe_for(module):
    """The recipe for this module's exact class, or None.

    A registered class: its recipe. A transformers class (defined in a ``transformers.models`` module,
    with its own ``forward``): the table's recipe for its name if its forward reads as the table says;
    for any other name, the gated recipe if its forward reads exactly :data:`GATED_FORWARD` — Llama's
    block, which most decoder models in transformers define under their own class name (Mistral, Qwen,
    Gemma, OLMo, SmolLM3, Granite, DeepSeek-V3's dense layers, Qwen-MoE's shared experts, …)."""
    cls = type(module)
    if cls in _USER:
        return _USER[cls]
    if not (cls.__module__.startswith("transformers.models.") and _own_forward(cls)):
        return None
    recipe, forward = _HF.get(cls.__name__, (_GATED, GATED_FORWARD))
    return recipe if forward_text(cls) == forward else None


def _from_transformers(module, qualname, where="transformers.activations"):
    cls = type(module)
    return cls.__qualname__ == qualname and cls.__module__ == where and _own_forward(cls)


def activation_of(module):
    """The activation table row this activation module computes, or None.

    torch's ``nn.ReLU`` / ``nn.GELU`` / ``nn.SiLU`` (exact types) and transformers' ``GELUActivation``
    (erf, either implementation), ``GELUTanh`` ("gelu_pytorch_tanh"), ``NewGELUActivation`` ("gelu_new"),
    ``FastGELUActivation`` ("gelu_fast": the tanh form with √(2/π) rounded to 0.7978845608, ≈ 4·10⁻¹²
    relative), ``SiLUActivation`` and ``ReLUSquaredActivation``. Anything else (``QuickGELUActivation``,
    clipped GELU, a subclass, an instance with its own ``forward`` or hooks) → None.
    """
    if "forward" in vars(module) or _hooked(module):
        return None
    row = activations.from_module(module)
    if row is not None:
        return row
    name = None
    if _from_transformers(module, "GELUActivation"):
        name = "gelu"  # self.act: F.gelu or the erf formula
    elif _from_transformers(module, "GELUTanh") or _from_transformers(module, "NewGELUActivation") or \
            _from_transformers(module, "FastGELUActivation"):
        name = "gelu_tanh"
    elif _from_transformers(module, "SiLUActivation"):
        name = "silu"
    elif _from_transformers(module, "ReLUSquaredActivation"):
        name = "relu2"
    return activations.lookup(name) if name else None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _hooked(module):
    return any(getattr(module, d, None) for d in _HOOK_DICTS)


def _global_hooks():
    m = torch.nn.modules.module
    return any(getattr(m, d, None) for d in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                              "_global_backward_hooks", "_global_backward_pre_hooks"))


def is_hf_conv1d(module):
    """Exactly transformers' ``Conv1D`` (GPT-2, GPT: weight (in, out), bias (out,)), unmodified."""
    return _from_transformers(module, "Conv1D", "transformers.pytorch_utils") and "forward" not in vars(module)


_CONV1D_CLASSES = {}


def _conv1d_forward(self, x):
    return functional.linear(x, self.weight.t(), self.bias)  # a transposed view: the kernels take any strides


def fused_conv1d(conv):
    """A transformers ``Conv1D`` that runs fusedad's kernels: a subclass (isinstance checks still hold)
    sharing the Parameter objects; ``weight.t()`` is passed to the kernels, never copied."""
    base = type(conv)
    cls = _CONV1D_CLASSES.get(base)
    if cls is None:
        cls = _CONV1D_CLASSES[base] = type("FusedConv1D", (base,), {
            "forward": _conv1d_forward, "__module__": __name__,
            "__repr__": lambda self: f"FusedConv1D(nf={self.nf}, nx={self.nx})",
            "__doc__": "transformers' Conv1D on fusedad's kernels (``fusedad.functional.linear(x, weight.t(), bias)``)."})
        if len(_CONV1D_CLASSES) == 1:  # transformers' own Conv1D: importable by name, so models pickle
            globals()["FusedConv1D"] = cls
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    new.nf, new.nx = conv.nf, conv.nx
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new


def _projection(module, conv1d):
    """Is this child a projection the recipe may read the weights of? -> (in, out) features or None."""
    from .nn import Linear

    if "forward" in vars(module) or _hooked(module):
        return None
    if conv1d:
        if not (is_hf_conv1d(module) or type(module) in _CONV1D_CLASSES.values()):
            return None
        return module.weight.shape[0], module.weight.shape[1]
    if type(module) is torch.nn.Linear or (type(module) is Linear and module.activation is None):
        return module.in_features, module.out_features
    return None


def _check(module, recipe):
    """The activation row if ``module`` may be fused by ``recipe``, else None (see the module docstring)."""
    if "forward" in vars(module) or _hooked(module) or _global_hooks():
        return None
    names = list(module._modules)
    if sorted(names) != sorted(recipe.children) or any(module._modules[n] is None for n in names):
        return None
    shapes = [_projection(module._modules[n], recipe.conv1d) for n in recipe.proj + ((recipe.down,) if recipe.down else ())]
    if any(s is None for s in shapes):
        return None
    if any(type(module._modules[n]) is not torch.nn.Dropout or _hooked(module._modules[n]) for n in recipe.post):
        return None
    if recipe.kind == "gated":
        (gi, go), (ui, uo), (di, _) = shapes
        if not (gi == ui and go == uo == di):
            return None
    elif recipe.kind == "packed":
        (gi, go), (di, _) = shapes
        if go != 2 * di:
            return None
    elif recipe.kind == "plain":
        (_, fo), (di, _) = shapes
        if fo != di:
            return None
    return activation_of(module._modules[recipe.act])


class FusedBlock(torch.nn.Module):
    """A recognised MLP block, fused: the original block's children under their original names (the
    projections converted, sharing their Parameter objects; the activation module kept but not called),
    its other attributes copied, and a ``forward`` that runs the fused block (``fusedad.functional``)."""

    def __init__(self, original, recipe, act):
        super().__init__()
        from .convert import convert

        for key, value in vars(original).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)  # e.g. LlamaMLP.config, .hidden_size, .intermediate_size
        for name, child in original._modules.items():
            if name in recipe.proj or name == recipe.down:
                child = fused_conv1d(child) if recipe.conv1d and is_hf_conv1d(child) else convert(child)
            self.add_module(name, child)
        self.recipe = recipe
        self.activation = act.name
        self._projection_types = tuple({type(self._modules[n]) for n in (*recipe.proj, *((recipe.down,) if recipe.down else ()))})
        self.original_class = type(original).__qualname__
        self.train(original.training)

    def _weights(self, name):
        layer = self._modules[name]
        w = layer.weight.t() if self.recipe.conv1d else layer.weight  # Conv1D: (in, out) → a (out, in) view
        return w, layer.bias

    def _still_fusable(self):
        """The children are still what the block was fused from: no projection replaced (PEFT injecting
        LoRA layers after conversion), no hooks registered since on them or on the activation, no global
        module hooks. Otherwise ``forward`` calls the children as the original block did."""
        r = self.recipe
        for name in (*r.proj, *((r.down,) if r.down else ())):
            layer = self._modules.get(name)
            if layer is None or type(layer) not in self._projection_types or _hooked(layer) or "forward" in vars(layer):
                return False
        act = self._modules.get(r.act)
        return act is not None and not _hooked(act) and not _global_hooks()

    def _unfused(self, x):
        """The original block's computation, by calling the children."""
        r, m = self.recipe, self._modules
        act = m[r.act]
        if r.kind == "act":
            return act(m[r.proj[0]](x))
        if r.kind == "plain":
            return m[r.down](act(m[r.proj[0]](x)))
        if r.kind == "gated":
            return m[r.down](act(m[r.proj[0]](x)) * m[r.proj[1]](x))
        gate, up = m[r.proj[0]](x).chunk(2, dim=-1)
        return m[r.down](up * act(gate))

    def forward(self, x):
        r = self.recipe
        if not self._still_fusable():
            y = self._unfused(x)
        elif r.kind == "act":
            w, b = self._weights(r.proj[0])
            y = functional.linear(x, w, b, activation=self.activation)
        elif r.kind == "plain":
            (w1, b1), (w2, b2) = self._weights(r.proj[0]), self._weights(r.down)
            y = functional.mlp(x, w1, b1, w2, b2, activation=self.activation)
        elif r.kind == "gated":
            (wg, bg), (wu, bu), (wd, bd) = self._weights(r.proj[0]), self._weights(r.proj[1]), self._weights(r.down)
            y = functional.gated_mlp(x, wg, wu, wd, self.activation, bg, bu, bd)
        else:  # packed
            (wgu, bgu), (wd, bd) = self._weights(r.proj[0]), self._weights(r.down)
            y = functional.gated_mlp(x, wgu, None, wd, self.activation, bgu, None, bd)
        for name in r.post:
            y = self._modules[name](y)
        return y

    def extra_repr(self):
        return f"fused {self.original_class} ({self.recipe.kind}, activation={self.activation})"


def fuse_block(module):
    """A :class:`FusedBlock` replacing ``module`` if a recipe recognises it and every check holds, else None."""
    recipe = recipe_for(module)
    if recipe is None:
        return None
    act = _check(module, recipe)
    if act is None:
        return None
    return FusedBlock(module, recipe, act)

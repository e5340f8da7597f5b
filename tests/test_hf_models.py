"""fusedad.convert on Hugging Face transformers models, tested against transformers itself.

Tiny models built from configs in code (no hub access), fp64, the kernels through the interpreter on
CPU: the converted model must equal the unconverted one (outputs, loss, every parameter's gradient, AdamW
steps), the block kernels must really run, and every MLP activation must be fused. Blocks a recipe must
not touch (a dropout between the projections, a hook, an activation without a table row) stay as they are.

The first tests need no transformers: the repository's top-level ``kernels/`` directory (fusedad.kernels)
must not shadow the PyPI package ``kernels`` that transformers imports, when Python starts at the root.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: a tiny Llama built in the sub-processes below (needs LlamaConfig and LlamaForCausalLM imported there)
_TINY_LLAMA = ("LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
               "num_attention_heads=2, num_key_value_heads=2, vocab_size=32))")


def _run_at_root(code, *args):
    """Python started at the repository root (sys.path[0] = root, as ``python -m pytest`` / ``-m bench``)."""
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bare_kernels_name_is_the_pypi_package_at_the_root():
    """``import kernels`` with the root first on sys.path: the PyPI package where installed, else an empty
    stand-in — never fusedad's kernels under the wrong name. And what broke: a transformers model (its
    activations import ``kernels`` for hub kernels, which resolved to this repository's directory and
    failed with a relative-import error) builds next to fusedad."""
    code = ("import os, sys; assert os.path.abspath(sys.path[0] or '.') == os.getcwd()\n"
            "import fusedad.kernels as fk\n"
            "import kernels\n"
            "print('FILE', getattr(kernels, '__file__', None), kernels.__name__, hasattr(kernels, 'record_launches'))\n"
            "print('OURS', fk.__file__, fk.__name__, hasattr(fk, 'record_launches'))\n"
            "import torch, fusedad\nfusedad.convert(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()))\n"
            "print('IMPORTED', 'transformers' in sys.modules)\n"
            "try:\n    import transformers\nexcept ImportError:\n    pass\nelse:\n"
            "    from transformers import LlamaConfig, LlamaForCausalLM\n"
            f"    m = {_TINY_LLAMA}\n    print('MODEL', type(m).__name__)\n")
    out = _run_at_root(code)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["OURS"].endswith("True") and "fusedad.kernels" in lines["OURS"]
    assert lines["IMPORTED"] == "False"  # convert() on a model without transformers never imports it
    path, name, has_ours = lines["FILE"].split()
    assert name == "kernels" and has_ours == "False"
    if _pypi_kernels_installed():
        assert not os.path.abspath(path).startswith(os.path.join(ROOT, "kernels") + os.sep), path
    else:
        assert path == "None"
    if importlib.util.find_spec("transformers") is not None:
        assert lines["MODEL"] == "LlamaForCausalLM"


def test_bare_kernels_name_without_the_pypi_package():
    """Only the root and the standard library on sys.path: ``import kernels`` gives what Python gives for a
    directory without ``__init__.py`` — an empty namespace-like module (no ``__file__``, no version, none
    of fusedad's names) whose submodules are not found, so fusedad's kernels never load under that name."""
    code = ("import sys, os\nsys.path[:] = [os.getcwd()] + [p for p in sys.path if 'site-packages' not in p "
            "and 'dist-packages' not in p and os.path.abspath(p or '.') != os.getcwd()]\n"
            "import kernels\n"
            "print('MODULE', getattr(kernels, '__file__', None), getattr(kernels, '__version__', None), "
            "list(kernels.__path__), sorted(k for k in vars(kernels) if not k.startswith('__')))\n"
            "try:\n    import kernels.linear\nexcept ModuleNotFoundError as e:\n"
            "    print('SUBMODULE', e.name, 'kernels.linear' in sys.modules)\n")
    out = _run_at_root(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["MODULE None None [] []", "SUBMODULE kernels.linear False"]


def test_transformers_builds_at_the_root_without_the_pypi_kernels_package():
    """transformers 5.17 (the GPU image's version) does not require the PyPI ``kernels``; probing for it,
    it finds this repository's directory under that name and imports it. That import must not fail, or no
    model class imports (it did fail: every Hugging Face test and the benchmark's model step broke there).
    Here the PyPI package is hidden — the path finder sees only the root's directory under the name, and
    no distribution metadata answers for it — and transformers must build a model and call hub kernels
    unavailable. (Checked for real on CPU with transformers 5.17.0, torch 2.11.0, Triton 3.6.0.)"""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")
    code = ("import importlib.machinery as M, importlib.metadata as md, os\nroot = os.getcwd()\n"
            "find = M.PathFinder.find_spec.__func__\n"
            "def find_spec(cls, name, path=None, target=None):\n"
            "    return find(cls, name, [root] if name == 'kernels' else path, target)\n"
            "M.PathFinder.find_spec = classmethod(find_spec)\n"
            "version = md.version\n"
            "def no_kernels_version(name):\n"
            "    if name == 'kernels':\n        raise md.PackageNotFoundError(name)\n    return version(name)\n"
            "md.version = no_kernels_version\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            f"m = {_TINY_LLAMA}\n"
            "import kernels\n"
            "print(type(m).__name__, is_kernels_available(), getattr(kernels, '__file__', None))\n")
    out = _run_at_root(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["LlamaForCausalLM", "False", "None"]


def _pypi_kernels_installed():
    """True if a ``kernels`` package other than the repository's is importable (outside the root)."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s else '')"], cwd="/", capture_output=True, text=True, timeout=60)
    origin = out.stdout.strip()
    return bool(origin) and not origin.startswith(os.path.join(ROOT, "kernels"))


# ---- converted transformers models against transformers itself ----------------------------------------

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[test]')")

import copy  # noqa: E402

import torch  # noqa: E402

import fusedad  # noqa: E402
from fusedad.kernels import record_launches  # noqa: E402
from fusedad.recipes import FusedBlock, Recipe, activation_of  # noqa: E402

T = transformers
V, SEQ = 64, 8
#: where the kernels run: CUDA if present (compiled), else the CPU through Triton's interpreter (conftest)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _small(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=V, **kw)


def _quiet(config):
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0  # ids inside the tiny vocabulary
    return config


_NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

#: name -> (build the model, MLP block class, activation the blocks must get, gated, AdamW steps checked)
ARCHS = {
    "llama": (lambda: T.LlamaForCausalLM(_quiet(T.LlamaConfig(**_small(num_key_value_heads=1)))),
              "LlamaMLP", "silu", True, 0),
    "mistral": (lambda: T.MistralForCausalLM(_quiet(T.MistralConfig(**_small(num_key_value_heads=2, hidden_act="relu2")))),
                "MistralMLP", "relu2", True, 0),
    "qwen2": (lambda: T.Qwen2ForCausalLM(_quiet(T.Qwen2Config(**_small(num_key_value_heads=2, hidden_act="gelu_fast")))),
              "Qwen2MLP", "gelu_tanh", True, 0),
    "qwen3": (lambda: T.Qwen3ForCausalLM(_quiet(T.Qwen3Config(**_small(num_key_value_heads=2, head_dim=16)))),
              "Qwen3MLP", "silu", True, 0),
    "gemma": (lambda: T.GemmaForCausalLM(_quiet(T.GemmaConfig(**_small(num_key_value_heads=2, head_dim=16,
                                                                        hidden_act="gelu_pytorch_tanh",
                                                                        hidden_activation="gelu_pytorch_tanh")))),
              "GemmaMLP", "gelu_tanh", True, 0),
    # final-logit softcapping (c·tanh(z/c) before the loss) at c = 2: every logit is visibly capped
    "gemma2": (lambda: T.Gemma2ForCausalLM(_quiet(T.Gemma2Config(**_small(num_key_value_heads=2, head_dim=16,
                                                                          final_logit_softcapping=2.0)))),
               "Gemma2MLP", "gelu_tanh", True, 0),
    # Gemma 3 (text): Gemma 2's block and loss path, softcapping included
    "gemma3": (lambda: T.Gemma3ForCausalLM(_quiet(T.Gemma3TextConfig(**_small(num_key_value_heads=2, head_dim=16,
                                                                              final_logit_softcapping=2.0)))),
               "Gemma3MLP", "gelu_tanh", True, 0),
    "phi3": (lambda: T.Phi3ForCausalLM(_quiet(T.Phi3Config(**_small(num_key_value_heads=2)))), "Phi3MLP", "silu", True, 2),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(_quiet(T.GPTNeoXConfig(**_small(hidden_act="relu")))),
                 "GPTNeoXMLP", "relu", False, 0),
    "gpt2": (lambda: T.GPT2LMHeadModel(_quiet(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=16,
                                                          activation_function="gelu_new", resid_pdrop=0.0,
                                                          embd_pdrop=0.0, attn_pdrop=0.0))),
             "GPT2MLP", "gelu_tanh", False, 2),
    "bert": (lambda: T.BertForMaskedLM(_quiet(T.BertConfig(**_small(**_NO_DROP)))), "BertIntermediate", "gelu", False, 0),
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**{k: v for k, v in _small(**_NO_DROP).items() if k != "vocab_size"},
                                                            image_size=8, patch_size=4, num_labels=3)),
            "ViTMLP", "gelu", False, 0),
}


def _inputs(name):
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 8, 8, dtype=torch.float64, device=DEVICE),
                    labels=torch.tensor([0, 2], device=DEVICE))
    ids = torch.randint(0, V, (2, SEQ), device=DEVICE)
    return dict(input_ids=ids, labels=ids)


def _reference_loss(model, inputs):
    """transformers' causal-LM loss (``ForCausalLMLoss``: labels shifted left, -100 padded, mean over
    counted tokens, or the sum / ``num_items_in_batch``) in the model's dtype: ForCausalLMLoss itself
    upcasts the logits to fp32, which would make an fp64 comparison meaningless. Returns (output, loss)."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "shift_labels")}
    out = model(**kwargs)
    shift = inputs.get("shift_labels")
    if shift is None:
        shift = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:]
    loss = fixed_cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), shift.reshape(-1),
                               inputs.get("num_items_in_batch"), -100)
    return out, loss


def _step(model, inputs, opt, causal_reference=False):
    opt.zero_grad()
    if causal_reference:
        out, loss = _reference_loss(model, inputs)
    else:
        out = model(**inputs)
        loss = out.loss
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    opt.step()
    return out, loss, grads


def _assert_same_step(ref, got, causal=False):
    (out0, loss0, g0), (out1, loss1, g1) = ref, got
    if causal:  # the loss without logits: fp32 like transformers', logits=None
        assert out1.logits is None and loss1.dtype == torch.float32
        torch.testing.assert_close(loss1, loss0.float())
    else:
        torch.testing.assert_close(loss1, loss0)
        torch.testing.assert_close(out1.logits, out0.logits)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", list(ARCHS))
def test_converted_model_equals_transformers(name):
    """fp64: the converted model's loss, logits and every parameter's gradient equal the unconverted
    model's (and the parameters after AdamW steps, where listed); every MLP block is fused with the
    expected activation; the block kernels ran; state_dict keys and Parameter objects are kept."""
    build, block_cls, act, gated, steps = ARCHS[name]
    torch.manual_seed(0)
    ref = build().to(DEVICE, torch.float64).train()
    model = copy.deepcopy(ref)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    n_blocks = sum(type(m).__name__ == block_cls for m in model.modules())
    assert n_blocks == 1

    assert fusedad.convert(model) is model
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]
    assert len(blocks) == n_blocks and not any(type(m).__name__ == block_cls for m in model.modules())
    assert all(b.original_class == block_cls and b.activation == act for b in blocks)  # 100 % fused
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    fusedad.convert(model)  # converting again changes nothing
    assert [m for m in model.modules() if isinstance(m, FusedBlock)] == blocks
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    if name == "gpt2":
        assert not any(type(m).__name__ == "Conv1D" for m in model.modules())  # every Conv1D on the kernels

    inputs = _inputs(name)
    opt0 = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt1 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    causal = name not in ("bert", "vit")
    if causal:  # transformers' own loss (fp32: it upcasts the logits) agrees at fp32's precision
        with torch.no_grad():
            own = ref(**inputs).loss
    with record_launches() as log:
        got = _step(model, inputs, opt1)
    _assert_same_step(_step(ref, inputs, opt0, causal), got, causal)
    if causal:
        torch.testing.assert_close(got[1], own)
    kernels = [launch.kernel for launch in log]
    assert ("mlp_down_bwd" in kernels) == (blocks[0].recipe.kind != "act")
    if gated:
        assert "mlp_gated_up" in kernels and "mlp_gated_dual_bwd" in kernels
    else:  # plain, or linear→activation: the activation in the up projection's GEMM epilogue
        up = {launch.flags["ACT"] for launch in log if launch.kernel.startswith("linear_fwd") and launch.flags.get("ACT", 0)}
        assert up == {fusedad.activations.lookup(act).kernel_id}
    if causal:  # the LM head's loss ran fused
        assert any(k.startswith("lce") for k in kernels), sorted(set(kernels))
    if name == "gpt2":  # Conv1D: the kernels read the (in, out) weight through a transposed view, no copy
        w = model.transformer.h[0].attn.c_attn.weight
        assert any(isinstance(a, torch.Tensor) and a.data_ptr() == w.data_ptr() and a.stride() == (1, w.shape[1])
                   for launch in log for a in launch.args)
    for _ in range(steps):
        _assert_same_step(_step(ref, inputs, opt0, causal), _step(model, inputs, opt1), causal)
        for (n, p0), p1 in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(p1, p0, msg=lambda m, n=n: f"{n} after AdamW: {m}")


#: decoders whose MLP class is not in the recipe table but whose forward reads as Llama's, statement for
#: statement: fused by that rule. Their causal LMs keep their own forward (not in the loss's table).
LLAMA_STYLE = {
    "olmo2": (lambda: T.Olmo2ForCausalLM(_quiet(T.Olmo2Config(**_small(num_key_value_heads=2)))), "Olmo2MLP"),
    "smollm3": (lambda: T.SmolLM3ForCausalLM(_quiet(T.SmolLM3Config(**_small(num_key_value_heads=2)))), "SmolLM3MLP"),
    "granite": (lambda: T.GraniteForCausalLM(_quiet(T.GraniteConfig(**_small(num_key_value_heads=2)))), "GraniteMLP"),
}


@pytest.mark.parametrize("name", sorted(LLAMA_STYLE))
def test_llama_style_blocks_of_other_architectures_are_fused(name):
    """fp64: the block is fused (the gated kernels run) and the model's logits and every gradient equal
    the unconverted model's; the causal LM's forward is its own (logits returned), with a warning."""
    build, block_cls = LLAMA_STYLE[name]
    torch.manual_seed(0)
    ref = build().to(DEVICE, torch.float64).train()
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="keeps its own forward"):
        fusedad.convert(model)
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]
    assert [b.original_class for b in blocks] == [block_cls] and blocks[0].activation == "silu"
    ids = torch.randint(0, V, (2, SEQ), device=DEVICE)
    with record_launches() as log:
        got = model(input_ids=ids).logits
        got.square().mean().backward()
    want = ref(input_ids=ids).logits
    want.square().mean().backward()
    torch.testing.assert_close(got, want)
    for (n, p0), p1 in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, msg=lambda m, n=n: f"{n}: {m}")
    kernels = {launch.kernel for launch in log}
    assert {"mlp_gated_up", "mlp_gated_dual_bwd", "mlp_down_bwd"} <= kernels, sorted(kernels)


_FAKE_ARCH = '''
import functools

import torch
from transformers.activations import ACT2FN


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(8, 16, bias=False)
        self.up_proj = torch.nn.Linear(8, 16, bias=False)
        self.down_proj = torch.nn.Linear(16, 8, bias=False)
        self.act_fn = ACT2FN["silu"]


class ReformattedMLP(_Block):
    def forward(self, x):
        """A docstring, comments and other line breaks do not change what it computes."""
        # the gated product
        down_proj = self.down_proj(
            self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class ActOnUpMLP(_Block):
    def forward(self, x):
        down_proj = self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))
        return down_proj


class ScaledMLP(_Block):
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return 2 * down_proj


class KeywordMLP(_Block):  # the fused block's forward takes x alone: a caller's keywords would fail there
    def forward(self, x, **kwargs):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


def _twice(fn):
    @functools.wraps(fn)  # as transformers' decorators do: inspect then reads the decorated source
    def twice(self, x):
        return 2 * fn(self, x)
    return twice


class DecoratedMLP(_Block):
    @_twice
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class LlamaMLP(_Block):  # a table name, but not the forward the table read
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))
        return down_proj
'''


def test_llama_style_rule_reads_the_forward_statement_for_statement(tmp_path):
    """Classes of a (fake) ``transformers.models`` module: only a forward that reads as Llama's — the
    formatting, comments and docstring aside — is fused; a changed operand order, a scaled output, a
    keyword parameter, a decorator, or a table name whose forward is not the one the table read are
    left as they are (and still compute what they did)."""
    import importlib.util

    path = tmp_path / "modeling_fakearch.py"
    path.write_text(_FAKE_ARCH)
    spec = importlib.util.spec_from_file_location("transformers.models.fakearch.modeling_fakearch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    for cls, fused in [(mod.ReformattedMLP, True), (mod.ActOnUpMLP, False), (mod.ScaledMLP, False),
                       (mod.KeywordMLP, False), (mod.DecoratedMLP, False), (mod.LlamaMLP, False)]:
        ref = cls().to(DEVICE, torch.float64)
        model = fusedad.convert(torch.nn.Sequential(copy.deepcopy(ref)))
        assert isinstance(model[0], FusedBlock) == fused, cls.__name__
        torch.testing.assert_close(model(x), ref(x), msg=lambda m, c=cls: f"{c.__name__}: {m}")


_ACT_NAMES = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
              "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "silu": "silu", "swish": "silu",
              "relu": "relu", "relu2": "relu2",
              # no table row: left unfused
              "quick_gelu": None, "gelu_10": None, "gelu_accurate": None, "mish": None, "linear": None,
              "tanh": None, "sigmoid": None, "leaky_relu": None, "relu6": None}


@pytest.mark.parametrize("hf_name", list(_ACT_NAMES))
def test_activation_mapping(hf_name):
    """transformers' activation objects map to the table row that computes the same function (fp64, at
    points that separate the rows), or to None."""
    module = T.activations.ACT2FN[hf_name]
    row = activation_of(module)
    assert (row.name if row else None) == _ACT_NAMES[hf_name]
    if row is not None:
        z = torch.linspace(-6, 6, 241, dtype=torch.float64)
        torch.testing.assert_close(row.apply(z), module(z), rtol=1e-10, atol=1e-12)  # gelu_fast's rounded √(2/π)


def _llama_mlp(act="silu"):
    return T.models.llama.modeling_llama.LlamaMLP(T.LlamaConfig(**_small(num_key_value_heads=1, hidden_act=act))).to(DEVICE, torch.float64)


class _Wrapped(torch.nn.Module):
    """A projection wrapped like PEFT's LoRA layers: another type around the base layer."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.lora = torch.nn.Linear(base.in_features, base.out_features, bias=False, dtype=base.weight.dtype)

    def forward(self, x):
        return self.base_layer(x) + self.lora(x)


class _LlamaMLPWithDropout(T.models.llama.modeling_llama.LlamaMLP):
    """A user's modified block: dropout between the gated product and the down projection."""

    def __init__(self, config):
        super().__init__(config)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def _hook(m, args, out):
    return out * 2


def _modify(how):
    if how == "quick_gelu":
        return _llama_mlp("quick_gelu")
    if how == "gelu_10":
        return _llama_mlp("gelu_10")
    if how == "subclass_with_dropout":
        return _LlamaMLPWithDropout(T.LlamaConfig(**_small(num_key_value_heads=1))).to(DEVICE, torch.float64)
    m = _llama_mlp()
    if how == "extra_dropout_child":
        m.dropout = torch.nn.Dropout(0.5)
    elif how == "hook_on_block":
        m.register_forward_hook(_hook)
    elif how == "hook_on_projection":
        m.up_proj.register_forward_hook(_hook)
    elif how == "pre_hook_on_activation":
        m.act_fn.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    elif how == "peft_wrapped_projection":
        m.gate_proj = _Wrapped(m.gate_proj)
    elif how == "instance_forward":
        m.forward = lambda x: m.down_proj(m.up_proj(x))
    elif how == "fused_linear_child":
        m.gate_proj = fusedad.nn.Linear(32, 64, bias=False, activation="relu", dtype=torch.float64, device=DEVICE)
    return m


@pytest.mark.parametrize("how", ["quick_gelu", "gelu_10", "subclass_with_dropout", "extra_dropout_child",
                                 "hook_on_block", "hook_on_projection", "pre_hook_on_activation",
                                 "peft_wrapped_projection", "instance_forward", "fused_linear_child"])
def test_modified_blocks_are_left_alone(how):
    """A block a recipe cannot prove it computes the same is left as it is (its nn.Linear layers are still
    swapped), and computes what it computed before (the dropout ones in eval mode)."""
    torch.manual_seed(0)
    m = _modify(how).eval()
    cls = type(m)
    x = torch.randn(2, 3, 32, dtype=torch.float64, device=DEVICE)
    want = m(x)
    parent = torch.nn.Sequential(m)
    fusedad.convert(parent)
    assert type(parent[0]) is cls and not any(isinstance(c, FusedBlock) for c in parent.modules())
    if how != "hook_on_projection":  # convert swaps a hooked nn.Linear without its hooks (README: Hooks)
        torch.testing.assert_close(parent(x), want)


def test_global_hook_leaves_blocks_alone():
    m = torch.nn.Sequential(_llama_mlp())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        fusedad.convert(m)
    finally:
        handle.remove()
    assert type(m[0]).__name__ == "LlamaMLP"


class _MyGLU(torch.nn.Module):
    """A user's own block type."""

    def __init__(self):
        super().__init__()
        self.wi = torch.nn.Linear(32, 48, bias=True, dtype=torch.float64, device=DEVICE)
        self.wg = torch.nn.Linear(32, 48, bias=True, dtype=torch.float64, device=DEVICE)
        self.wo = torch.nn.Linear(48, 32, bias=False, dtype=torch.float64, device=DEVICE)
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.wo(self.act(self.wg(x)) * self.wi(x))


def test_user_recipe():
    """A registered recipe fuses the user's block type (exact class only); equal in fp64 forward and
    backward; unregistering restores the default (left alone)."""
    torch.manual_seed(0)
    ref = _MyGLU()
    fusedad.recipes.register(_MyGLU, Recipe("gated", ("wg", "wi"), "wo", "act"))
    try:
        model = fusedad.convert(torch.nn.Sequential(copy.deepcopy(ref)))
        assert isinstance(model[0], FusedBlock) and model[0].activation == "gelu"
        x = torch.randn(2, 5, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)
        x0 = x.detach().clone().requires_grad_()
        with record_launches() as log:
            y = model(x)
            y.backward(torch.ones_like(y))
        assert "mlp_gated_up" in [launch.kernel for launch in log]
        y0 = ref(x0)
        y0.backward(torch.ones_like(y0))
        torch.testing.assert_close(y, y0)
        torch.testing.assert_close(x.grad, x0.grad)
        for (n, p0), p1 in zip(ref.named_parameters(), model[0].parameters()):
            torch.testing.assert_close(p1.grad, p0.grad, msg=lambda m, n=n: f"{n}: {m}")
    finally:
        fusedad.recipes.register(_MyGLU, None)
    assert type(fusedad.convert(torch.nn.Sequential(_MyGLU()))[0]) is _MyGLU
    with pytest.raises(TypeError):
        fusedad.recipes.register(_MyGLU, ("gated",))


def test_same_class_name_elsewhere_is_not_a_transformers_block():
    """Built-in recipes match transformers' own classes only: a user's class that happens to be called
    LlamaMLP (here: a different computation) is left alone."""
    base = _llama_mlp()

    class LlamaMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (base.gate_proj, base.up_proj,
                                                                          base.down_proj, base.act_fn)

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    class SameForward(LlamaMLP):  # Llama's forward, statement for statement, but not transformers' class
        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            return down_proj

    SameForward.__name__ = SameForward.__qualname__ = "LlamaMLP"
    for cls in (LlamaMLP, SameForward):
        m = torch.nn.Sequential(cls())
        fusedad.convert(m)
        assert type(m[0]) is cls and not isinstance(m[0], FusedBlock)  # users register their own classes


def test_gpt2_block_dropout_runs_after_the_fused_block():
    """GPT-2's MLP ends in a residual dropout: in training, with the same RNG state, the fused block
    draws the same mask (fp64, through the kernels)."""
    config = T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.5,
                          activation_function="gelu_new")
    ref = T.models.gpt2.modeling_gpt2.GPT2MLP(64, config).to(DEVICE, torch.float64).train()
    model = fusedad.convert(torch.nn.Sequential(copy.deepcopy(ref)))[0]
    assert isinstance(model, FusedBlock) and model.training
    x = torch.randn(2, 4, 32, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(1)
    want = ref(x)
    torch.manual_seed(1)
    got = model(x)
    assert (want == 0).any()
    torch.testing.assert_close(got, want)


# ---- the causal-LM loss without logits --------------------------------------------------------------


def _llama(vocab=V, tie=False):
    torch.manual_seed(0)
    config = _quiet(T.LlamaConfig(**{**_small(num_key_value_heads=1), "vocab_size": vocab}, tie_word_embeddings=tie))
    ref = T.LlamaForCausalLM(config).to(DEVICE, torch.float64).train()
    return ref, fusedad.convert(copy.deepcopy(ref))


def test_causal_lm_loss_options_and_tied_embeddings():
    """ignore_index tokens, num_items_in_batch (sum / n) and shift_labels as transformers takes them, with
    tied input/output embeddings (the shared weight gets both gradients): fp64 equal to the reference."""
    ref, model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, V, (2, SEQ), device=DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100
    shift = torch.randint(0, V, (2, SEQ), device=DEVICE)
    shift[1, -2:] = -100
    for extra in (dict(labels=labels), dict(labels=labels, num_items_in_batch=torch.tensor(11, device=DEVICE)),
                  dict(labels=labels, shift_labels=shift)):
        inputs = dict(input_ids=ids, **extra)
        opt0, opt1 = torch.optim.SGD(ref.parameters(), lr=0.0), torch.optim.SGD(model.parameters(), lr=0.0)
        _assert_same_step(_step(ref, inputs, opt0, True), _step(model, inputs, opt1), causal=True)


def test_causal_lm_keeps_its_own_forward_elsewhere():
    """Without labels, in eval mode, under no_grad, with logits_to_keep or a custom loss function: the
    model's own forward (logits returned, equal); generate() unchanged."""
    ref, model = _llama()
    ids = torch.randint(0, V, (1, 4), device=DEVICE)
    with torch.no_grad():
        want = ref(input_ids=ids, labels=ids)
        for call in (lambda: model(input_ids=ids), lambda: model(input_ids=ids, labels=ids)):
            out = call()
            torch.testing.assert_close(out.logits, want.logits)
    out = model(input_ids=ids, labels=ids[:, -2:], logits_to_keep=2)
    assert out.logits.shape[1] == 2
    model.eval()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, want.loss)
    torch.testing.assert_close(out.logits, want.logits)
    model.train()
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum() * 0.0
    assert model(input_ids=ids, labels=ids).logits is not None
    del model._loss_function
    ref.eval()
    model.eval()
    g0 = ref.generate(ids, max_new_tokens=2, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=2, do_sample=False), g0)


def test_causal_lm_training_step_creates_no_logits(monkeypatch):
    """Every tensor a training step creates (a TorchDispatchMode sees each op's outputs) is smaller than
    the M×V logits, with the fused loss's backward chunk forced well below M×V; the (V, K) head weight's
    gradient aside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fusedad.kernels.cross_entropy as kce

    vocab = 256
    monkeypatch.setattr(kce, "MIN_CHUNK_CLASSES", 32)
    monkeypatch.setattr(kce, "CHUNK_BYTES", 1)
    ref, model = _llama(vocab)
    ids = torch.randint(0, vocab, (2, SEQ), device=DEVICE)
    M, K = ids.numel(), 32

    class Largest(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view or func._schema.is_mutable:
                return out  # no new memory: a view, or an in-place / out= op on an existing tensor
                # (e.g. the interpreter's host copies of the kernels' arguments)
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and tuple(t.shape) != (vocab, K):
                    self.sizes.append((t.numel(), tuple(t.shape), str(func)))
            return out

    with Largest():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits is None
    largest = max(Largest.sizes)
    assert largest[0] < M * vocab, sorted(Largest.sizes)[-12:]
    Largest.sizes.clear()
    with Largest():  # the control: the unconverted model does create them
        ref(input_ids=ids, labels=ids).loss.backward()
    assert max(Largest.sizes)[0] >= M * vocab


def test_converted_causal_lm_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a converted Llama's training step (fused blocks, loss without
    logits): no graph break, and the same loss and gradients as the converted model run eagerly (fp64;
    the aot_eager backend — Inductor's code generation is not what this checks)."""
    ref, model = _llama()
    ref = fusedad.convert(ref)
    ids = torch.randint(0, V, (2, SEQ), device=DEVICE)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.logits is None
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss)
    for (n, p0), p1 in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, msg=lambda m, n=n: f"{n}: {m}")


def test_loss_without_logits_imports_nothing_per_call(monkeypatch):
    """The converted forward resolves transformers' names when it is installed, not per call: torch.compile
    traces an import inside the forward, and torch 2.11's Dynamo (the GPU image's) cannot trace
    ``from transformers import modeling_outputs`` (a lazy module) — the compiled training step broke there
    with "Bad import result". Every import statement executed by fusedad's code during a training call
    is recorded: there must be none."""
    import builtins

    _, model = _llama()
    model = fusedad.convert(model)
    ids = torch.randint(0, V, (2, SEQ), device=DEVICE)
    model(input_ids=ids, labels=ids)  # a first call may import lazily elsewhere; not what is checked
    imported = []
    real_import = builtins.__import__

    def spy(name, globals=None, locals=None, fromlist=(), level=0):
        caller = (globals or {}).get("__name__", "")
        if caller.startswith("fusedad"):
            imported.append((caller, name, tuple(fromlist or ())))
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", spy)
    out = model(input_ids=ids, labels=ids)
    monkeypatch.undo()
    assert out.logits is None and out.loss is not None
    assert imported == [], imported


@pytest.mark.parametrize("change", ["wrap_projection_after", "hook_projection_after", "hook_activation_after"])
def test_fused_block_changed_after_conversion_calls_its_children(change):
    """A fused block whose projection is replaced afterwards (PEFT injecting LoRA layers into a converted
    model) or hooked afterwards computes what the original block would: it calls its children."""
    torch.manual_seed(0)
    ref = _llama_mlp()
    model = fusedad.convert(torch.nn.Sequential(copy.deepcopy(ref)))
    fused = model[0]
    assert isinstance(fused, FusedBlock)
    if change == "wrap_projection_after":
        ref.gate_proj = _Wrapped(ref.gate_proj)
        fused.gate_proj = _Wrapped(fused.gate_proj)
        fused.gate_proj.lora.weight = ref.gate_proj.lora.weight
    elif change == "hook_projection_after":
        ref.up_proj.register_forward_hook(_hook)
        fused.up_proj.register_forward_hook(_hook)
    else:
        ref.act_fn.register_forward_hook(_hook)
        fused.act_fn.register_forward_hook(_hook)
    x = torch.randn(2, 3, 32, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(model(x), ref(x))


def test_other_causal_lm_keeps_its_forward_and_says_so_once():
    """A causal LM outside the table (OPT) keeps its own forward, with one warning per class."""
    def build():
        return T.OPTForCausalLM(_quiet(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                                   num_attention_heads=2, vocab_size=V, word_embed_proj_dim=32,
                                                   max_position_embeddings=16)))

    with pytest.warns(UserWarning, match="OPTForCausalLM keeps its own forward"):
        model = fusedad.convert(build())
    assert "forward" not in vars(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedad.convert(build())


@pytest.mark.parametrize("order", ["peft_then_convert", "convert_then_peft"])
def test_peft_lora_either_order(order):
    """PEFT LoRA on the MLP projections and q_proj, applied before or after convert: loss and every
    gradient equal PEFT on the unconverted model (fp64); the frozen bases get no gradient and no kernel
    computes a dW for them (the dW launches are exactly one per trainable converted layer)."""
    peft = pytest.importorskip("peft", reason="peft is not installed (optional: pip install peft)")
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(_quiet(T.LlamaConfig(**_small(num_key_value_heads=1)))).to(DEVICE, torch.float64).train()
    config = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"],
                  lora_dropout=0.0, init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    if order == "peft_then_convert":
        model = fusedad.convert(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)))
    else:
        model = peft.get_peft_model(fusedad.convert(copy.deepcopy(base)), peft.LoraConfig(**config))
    model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, V, (2, SEQ), device=DEVICE)
    _, want = _reference_loss(ref, dict(input_ids=ids, labels=ids))
    want.backward()
    with record_launches() as log:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.float())
    for (n, p0), (n1, p1) in zip(ref.named_parameters(), model.named_parameters()):
        assert n == n1 and (p0.grad is None) == (p1.grad is None), n
        if p0.grad is not None:
            torch.testing.assert_close(p1.grad, p0.grad, msg=lambda m, n=n: f"{n}: {m}")
    trainable = sum(type(m) is fusedad.nn.Linear and m.weight.requires_grad for m in model.modules())
    assert sum(bool(launch.flags.get("COMPUTE_DW")) for launch in log if launch.kernel == "linear_bwd") == trainable

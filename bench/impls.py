"""The implementations compared, as zero-argument callables that return the tensors to check.

For one case, ``layer_builders`` / ``net3_builders`` return ``{impl name: build}``; ``build()`` constructs
the implementation (torch.compile happens in the first call, inside the check) and returns ``fn``;
``fn()`` runs one phase and returns a tuple of tensors that is compared with eager's, then timed.
Every implementation of a case shares eager's Parameter objects (``fusedad.convert`` swaps modules but
keeps the Parameters; ``torch.compile`` wraps the eager module), and gradients are taken with
``torch.autograd.grad`` so nothing accumulates into ``.grad`` between calls.
"""
import contextlib

import torch
from torch import nn

import fusedad

#: Planted-mismatch scale: 10% off is far beyond every dtype tolerance (bf16 2e-2).
PLANTED_SCALE = 1.1


def activation_module(name):
    """The nn module eager code would use for the activation (None for "none")."""
    return {"none": None, "relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
            "silu": nn.SiLU()}[name]


def eager_layer(shape, dtype, activation, device, bias=True):
    """nn.Sequential(nn.Linear(K, N), activation): what fusedad replaces."""
    layers = [nn.Linear(shape.K, shape.N, bias=bias, device=device, dtype=dtype)]
    act = activation_module(activation)
    return nn.Sequential(*layers, *([act] if act is not None else []))


def eager_net3(net3, dtype, device):
    """The seed's Net3 as bias-free nn.Linear layers with ReLU between. The seed's MyLinear draws its
    weight with torch.randn (std 1), which at width 8192 grows activations by ~√8192 per layer and
    overflows fp16; nn.Linear's default init keeps them O(1), and the timings do not depend on values."""
    mods = []
    for i, (K, N) in enumerate(net3.layers):
        mods.append(nn.Linear(K, N, bias=False, device=device, dtype=dtype))
        if i < len(net3.layers) - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def fusedad_copy(model):
    """fusedad.convert on a new Sequential holding the same children: the eager model stays as it is,
    and the fused layers (Linear→ReLU/GELU/SiLU become one fusedad.nn.Linear) share its Parameters."""
    return fusedad.convert(nn.Sequential(*model))


def compiled(fn):
    """torch.compile with a clean dynamo cache: every case compiles afresh, so no case hits the
    recompile limit (after which dynamo silently falls back to eager) or inherits dynamic shapes."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _forward_under(grad_mode, model, x):
    """fn() running ``model(x)`` inside ``grad_mode()`` (a context manager factory) -> (output,)."""
    def fn():
        with grad_mode():
            return (model(x),)
    return fn


#: Net3's forward grad modes (plan.MODES) as context-manager factories.
GRAD_MODES = {"default": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _phase_fn(model, phase, x, dy, xt):
    """One layer phase (see plan.PHASES) of ``model`` -> fn() returning the tensors to compare."""
    if phase == "fwd":
        return _forward_under(torch.no_grad, model, x)
    if phase == "jvp":
        def fn():
            with torch.no_grad():
                return tuple(torch.func.jvp(model, (x,), (xt,)))
        return fn
    xg = x.detach().requires_grad_()
    inputs = [xg, *(p for p in model.parameters() if p.requires_grad)]
    if phase == "bwd":
        y = model(xg)  # the forward once, outside the timing; retain_graph keeps it for every call

        def fn():
            return torch.autograd.grad(y, inputs, dy, retain_graph=True)
        return fn
    if phase in ("fwd+bwd", "fwd+bwd-frozenW"):
        def fn():
            return torch.autograd.grad(model(xg), inputs, dy)
        return fn
    raise ValueError(f"unknown phase {phase!r}")


def _cublaslt_fn(model, activation, x):
    """cuBLASLt's fused bias+ReLU / bias+GELU(tanh) epilogue, forward only."""
    linear = model[0]
    w, b, use_gelu = linear.weight, linear.bias, activation == "gelu_tanh"

    def fn():
        with torch.no_grad():
            return (torch._addmm_activation(b, x, w.t(), use_gelu=use_gelu),)
    return fn


def cublaslt_applies(device, phase, activation, bias=True):
    """torch._addmm_activation has relu and (tanh-approximated on CUDA) gelu epilogues, needs a bias."""
    return device == "cuda" and phase == "fwd" and bias and activation in ("relu", "gelu_tanh")


def _planted(build):
    """Test hook: fusedad's result scaled by PLANTED_SCALE — must be reported FAIL and never timed."""
    def planted_build():
        fn = build()
        return lambda: tuple(t * PLANTED_SCALE for t in fn())
    return planted_build


def layer_builders(shape, dtype, activation, phase, impls, device, plant_mismatch=False):
    """{impl: build} for one layer case. ``eager`` is always first (it is the reference)."""
    model = eager_layer(shape, dtype, activation, device)
    if phase == "fwd+bwd-frozenW":
        model[0].weight.requires_grad_(False)
    x = torch.randn(shape.M, shape.K, device=device, dtype=dtype)
    dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
    xt = torch.randn(shape.M, shape.K, device=device, dtype=dtype) if phase == "jvp" else None

    def compile_build():
        if phase == "jvp":
            jvp = compiled(lambda a, at: torch.func.jvp(model, (a,), (at,)))

            def fn():
                with torch.no_grad():
                    return tuple(jvp(x, xt))
            return fn
        return _phase_fn(compiled(model), phase, x, dy, xt)

    def fused_build():
        return _phase_fn(fusedad_copy(model), phase, x, dy, xt)

    builders = {"eager": lambda: _phase_fn(model, phase, x, dy, xt)}
    if "fusedad" in impls:
        builders["fusedad"] = fused_build
    if "compile" in impls:
        builders["compile"] = compile_build
    if "cublaslt" in impls and cublaslt_applies(device, phase, activation):
        builders["cublaslt"] = lambda: _cublaslt_fn(model, activation, x)
    if plant_mismatch:
        builders["planted-mismatch"] = _planted(fused_build)
    return builders


def _mode_fn(model, mode, x, dout):
    """Net3 in one grad mode (plan.MODES) -> fn() returning the output (and the weight gradients)."""
    if mode in GRAD_MODES:
        return _forward_under(GRAD_MODES[mode], model, x)
    if mode == "fwd+bwd":
        params = [p for p in model.parameters() if p.requires_grad]

        def fn():
            out = model(x)
            return (out.detach(), *torch.autograd.grad(out, params, dout))
        return fn
    raise ValueError(f"unknown mode {mode!r}")


def net3_builders(net3, dtype, mode, impls, device, plant_mismatch=False):
    """{impl: build} for the seed's Net3 in one grad mode (cuBLASLt does not apply: no bias)."""
    model = eager_net3(net3, dtype, device)
    x = torch.randn(net3.batch, net3.dims[0], device=device, dtype=dtype)
    dout = torch.randn(net3.batch, net3.dims[-1], device=device, dtype=dtype)
    def fused_build():
        return _mode_fn(fusedad_copy(model), mode, x, dout)

    builders = {"eager": lambda: _mode_fn(model, mode, x, dout)}
    if "fusedad" in impls:
        builders["fusedad"] = fused_build
    if "compile" in impls:
        builders["compile"] = lambda: _mode_fn(compiled(model), mode, x, dout)
    if plant_mismatch:
        builders["planted-mismatch"] = _planted(fused_build)
    return builders

"""The models the suites run, and their implementations as ``{impl name: build}`` (``builders``):
``build()`` constructs one (torch.compile happens in the first call, inside the check) and returns
``fn``; ``fn()`` runs one phase and returns a tuple of tensors, compared with eager's, then timed. All
implementations of a case share eager's Parameter objects, and gradients are taken with
``torch.autograd.grad``, so nothing accumulates into ``.grad`` between calls.
"""
import contextlib
import dataclasses
import functools

import torch
from torch import nn

import fusedad

from .runner import Builders

class TableActivation(nn.Module):
    """The eager module of an activation torch has no module for (relu2: ``torch.square(F.relu(z))``, the
    activation table's own torch function). ``fuse`` folds it into the preceding fusedad Linear, as
    ``fusedad.convert`` does with nn.ReLU / nn.GELU / nn.SiLU."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.fn = fusedad.activations.lookup(name).apply

    def forward(self, z):
        return self.fn(z)

    def extra_repr(self):
        return self.name


#: The eager module for each activation of fusedad's table: what ``fusedad.convert`` fuses into the
#: preceding Linear (the table's first listed module type, with its attributes), or a TableActivation
#: where torch has none (relu2).
ACTIVATION_MODULES = {a.name: (functools.partial(a.modules[0][0], **a.modules[0][1]) if a.modules
                               else functools.partial(TableActivation, a.name))
                      for a in fusedad.activations.TABLE if a.name is not None}

#: Activation choices: "none" (a plain linear) and every activation above.
ACTIVATIONS = ("none", *ACTIVATION_MODULES)


def fuse(model):
    """``fusedad.convert`` of a new Sequential of ``model``'s children (sharing its Parameters), with every
    Linear followed by a TableActivation fused as convert fuses the torch activation modules."""
    out = fusedad.convert(nn.Sequential(*model))
    for i in range(len(out) - 1):
        if isinstance(out[i], fusedad.nn.Linear) and out[i].activation is None and isinstance(out[i + 1],
                                                                                             TableActivation):
            out[i].activation, out[i + 1] = out[i + 1].name, nn.Identity()
    return out


#: Layer phases and what each runs (bwd: of a forward done once, outside the timing).
PHASES = {"fwd": "no_grad forward", "bwd": "backward only: dX, dW, db", "fwd+bwd": "both",
          "fwd+bwd-frozenW": "weight.requires_grad=False: no dW", "jvp": "forward mode: primal + tangent"}

#: Net3's forward grad modes as context-manager factories; MODES adds a training step.
GRAD_MODES = {"default": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
MODES = (*GRAD_MODES, "fwd+bwd")

#: Planted-mismatch scale: 10% off is far beyond every dtype tolerance (bf16 2e-2).
PLANTED_SCALE = 1.1


def forced_variant_build(name, call):
    """The build of implementation ``fusedad:<name>``: ``fn()`` returns ``call()`` run under
    ``fusedad.kernels.variants.use(name)``. Its first call (the check) records the launches and raises if
    ``name`` is not among them (its predicate does not hold: a time under the wrong name is never taken);
    ``fn.row_fields`` then names the variant, whether it is the default, and the kernels launched."""
    from fusedad.kernels import record_launches, variants

    def build():
        def fn():
            if fn.row_fields is not None:
                with variants.use(name):
                    return call()
            with variants.use(name), record_launches() as log:
                out = call()
            ran = [launch.kernel for launch in log]
            if name not in ran:
                raise RuntimeError(f"variants.use({name!r}) ran {'+'.join(ran) or 'nothing'}: its predicate "
                                   "does not apply to this case")
            fn.row_fields = {"variant": name, "default_variant": variants.by_name(name).default,
                             "kernels": "+".join(ran)}
            return out

        fn.row_fields = None
        return fn
    return build


@dataclasses.dataclass(frozen=True)
class Net3:
    """The seed's Net3: bias-free layers dims[0] → dims[1] → … → dims[-1], ReLU between, batch rows."""

    batch: int
    dims: tuple

    @property
    def layers(self):
        """(K, N) of each layer."""
        return tuple(zip(self.dims[:-1], self.dims[1:]))

    @property
    def label(self):
        return f"Net3 batch {self.batch}, " + "→".join(map(str, self.dims))


SEED_NET3 = Net3(256, (4096, 8192, 8192, 8192, 1))
TINY_NET3 = Net3(8, (32, 64, 64, 64, 1))


def net3_preset(device, quick):
    """Settings of the Net3 suites (modes, memory): the seed's Net3 on CUDA (bf16 quick, else all three
    dtypes); on CPU a tiny Net3 in fp32 and bf16 (the kernels round bf16 stores to nearest-even by hand
    under the interpreter, which truncates, so CPU bf16 sees the GPU's numerics)."""
    if device == "cuda":
        return {"net3": SEED_NET3, "dtypes": (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16,
                                                                            torch.float32)}
    return {"net3": TINY_NET3, "dtypes": (torch.float32, torch.bfloat16)}


def compiled(fn):
    """torch.compile with a clean dynamo cache: every case compiles afresh, so no case hits the
    recompile limit (after which dynamo silently falls back to eager) or inherits dynamic shapes."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def builders(model, run, plan, compile_build=None, extra=None):
    """{impl: build} for ``plan.impls``, eager first (the reference); ``run(module)`` -> fn. eager runs
    ``model``; fusedad ``fuse(model)`` (the fused layers share the Parameters); compile
    ``compiled(model)``, or ``compile_build``; ``extra``: more {impl: build}. ``plan.plant_mismatch`` (a test hook) adds
    fusedad's result scaled by PLANTED_SCALE."""
    def fused():
        return run(fuse(model))

    def planted():
        fn = fused()
        return lambda: tuple(t * PLANTED_SCALE for t in fn())

    every = {"eager": lambda: run(model), "fusedad": fused,
             "compile": compile_build or (lambda: run(compiled(model))), **(extra or {})}
    out = {name: build for name, build in every.items() if name == "eager" or name in plan.impls}
    return {**out, "planted-mismatch": planted} if plan.plant_mismatch else out


def forward_under(grad_mode, model, x, result=lambda y: (y,)):
    """fn() running ``model(x)`` inside ``grad_mode()`` (a context manager factory) -> result(output)."""
    def fn():
        with grad_mode():
            return result(model(x))
    return fn


def phase_fn(model, phase, x, dy, xt):
    """One layer phase (see PHASES) of ``model`` -> fn() returning the tensors to compare."""
    if phase == "fwd":
        return forward_under(torch.no_grad, model, x)
    if phase == "jvp":
        return forward_under(torch.no_grad, lambda a: torch.func.jvp(model, (a,), (xt,)), x, tuple)
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


def layer_builders(shape, dtype, activation, phase, plan):
    """{impl: build} for nn.Sequential(nn.Linear(K, N), activation module) — what fusedad replaces — in
    one phase; cuBLASLt where its fused epilogue applies (torch._addmm_activation: CUDA, forward, with
    bias, relu or tanh-approximated gelu)."""
    device = plan.device
    act = [] if activation == "none" else [ACTIVATION_MODULES[activation]()]
    model = nn.Sequential(nn.Linear(shape.K, shape.N, device=device, dtype=dtype), *act)
    if phase == "fwd+bwd-frozenW":
        model[0].weight.requires_grad_(False)
    x = torch.randn(shape.M, shape.K, device=device, dtype=dtype)
    dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
    xt = torch.randn(shape.M, shape.K, device=device, dtype=dtype) if phase == "jvp" else None

    def compile_jvp():  # compile the jvp transform of the module, not a jvp of a compiled module
        jvp = compiled(lambda a, at: torch.func.jvp(model, (a,), (at,)))
        return forward_under(torch.no_grad, lambda a: jvp(a, xt), x, tuple)

    def cublaslt():
        w, b, gelu = model[0].weight, model[0].bias, activation == "gelu_tanh"
        return forward_under(torch.no_grad, lambda a: torch._addmm_activation(b, a, w.t(), use_gelu=gelu), x)

    def refresh():
        """New values for the case's inputs, in place (the CUDA-graph check): dY, and X and Ẋ unless the
        forward was done once at build time (phase bwd: it saved X; changing X would void that graph)."""
        with torch.no_grad():
            for t in (dy, xt) if phase == "bwd" else (x, dy, xt):
                if t is not None:
                    t.normal_()

    applies = device == "cuda" and phase == "fwd" and activation in ("relu", "gelu_tanh")
    return Builders(builders(model, lambda m: phase_fn(m, phase, x, dy, xt), plan,
                             compile_jvp if phase == "jvp" else None, {"cublaslt": cublaslt} if applies else None),
                    refresh)


def net3_builders(net3, dtype, mode, plan):
    """{impl: build} for the seed's Net3 in one grad mode (see MODES) -> fn() returning the output (and,
    for the training step, the weight gradients). Bias-free nn.Linear layers with ReLU between: the
    seed's MyLinear draws its weight with torch.randn (std 1), which at width 8192 grows activations by
    ~√8192 per layer and overflows fp16; nn.Linear's default init keeps them O(1), and the timings do
    not depend on values. cuBLASLt does not apply: no bias."""
    mods = []
    for K, N in net3.layers:
        mods += [nn.Linear(K, N, bias=False, device=plan.device, dtype=dtype), nn.ReLU()]
    model = nn.Sequential(*mods[:-1])
    x = torch.randn(net3.batch, net3.dims[0], device=plan.device, dtype=dtype)
    dout = torch.randn(net3.batch, net3.dims[-1], device=plan.device, dtype=dtype)

    def run(m):
        if mode in GRAD_MODES:
            return forward_under(GRAD_MODES[mode], m, x)
        if mode != "fwd+bwd":
            raise ValueError(f"unknown mode {mode!r}")
        params = [p for p in m.parameters() if p.requires_grad]

        def fn():
            out = m(x)
            return (out.detach(), *torch.autograd.grad(out, params, dout))
        return fn

    return builders(model, run, plan)

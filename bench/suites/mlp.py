"""The ``mlp`` suite: one MLP block's training step (fwd+bwd), timed, with the bytes it saves for backward.

Blocks (x (M, K), intermediate I, out K): gated SwiGLU (Llama: no biases) and plain GELU(tanh) (GPT-2:
biases). Implementations: eager (nn.Linear layers + activation (+ mul), as Hugging Face / timm write
them), fusedad (``fusedad.nn.GatedMLP`` / ``fusedad.nn.MLP`` sharing eager's Parameters), torch.compile of
the eager block. FLOP: 9 products of 2·M·K·I for the gated block (3 forward, 6 backward), 6 for the plain
one. ``saved_mb``: what one forward keeps for backward (``bench/mlp_memory.py`` counts it).
"""
import functools

import torch
from torch import nn

import fusedad

from .. import report
from ..impls import PLANTED_SCALE, compiled, phase_fn
from ..mlp_memory import EagerGated, EagerPlain, saved_bytes
from ..plan import DTYPE_NAMES, Shape
from ..runner import Case
from . import Suite

#: (M, K, I): the Llama-8B MLP at 8192 tokens and at 256; CPU: tiny.
CUDA_SHAPES = (Shape(8192, 4096, 14336, "llama-8b mlp"), Shape(256, 4096, 14336, "llama-8b mlp"))
CPU_SHAPES = (Shape(24, 32, 80, "mlp tiny"),)
BLOCKS = {"gated": "silu", "plain": "gelu_tanh"}


def preset(device, quick):
    cuda = device == "cuda"
    shapes = CUDA_SHAPES if cuda else CPU_SHAPES
    return {"shapes": shapes[:1] if quick else shapes, "dtypes": (torch.bfloat16,) if cuda else (torch.float32,),
            "blocks": ("gated",) if quick else tuple(BLOCKS)}


def block_builders(shape, block, dtype, plan):
    """{impl: build} -> fn() returning (dX, the weight and bias gradients) of one fwd+bwd step."""
    device, act, gated = plan.device, BLOCKS[block], block == "gated"
    M, K, I = shape.M, shape.K, shape.N
    with torch.random.fork_rng():
        torch.manual_seed(plan.seed)
        kw = dict(device=device, dtype=dtype, bias=not gated)
        eager = EagerGated(K, I, act, **kw) if gated else EagerPlain(K, I, act, **kw)
        # nn.Linear's init: O(1) activations at any width
    fused = (fusedad.nn.GatedMLP(K, I, act, device="meta", bias=not gated) if gated
             else fusedad.nn.MLP(K, I, activation=act, device="meta", bias=not gated))
    for name, child in eager.named_children():  # share eager's Parameters (same values, one copy)
        for pname, p in child.named_parameters():
            setattr(getattr(fused, name), pname, p)
    x = torch.randn(M, K, device=device, dtype=dtype)
    dy = torch.randn(M, K, device=device, dtype=dtype)

    def run(module, count=True):
        fn = phase_fn(module, "fwd+bwd", x, dy, None)
        if count:  # (a compiled module's saved tensors are AOTAutograd's: not counted by the hooks)
            fn.row_fields = {"saved_mb": saved_bytes(module, x.detach().requires_grad_())[0] / 2**20}
        return fn

    def planted():
        fn = run(fused)
        return lambda: tuple(t * PLANTED_SCALE for t in fn())

    every = {"eager": lambda: run(eager), "fusedad": lambda: run(fused), "compile": lambda: run(compiled(eager), count=False)}
    out = {name: build for name, build in every.items() if name == "eager" or name in plan.impls}
    return {**out, "planted-mismatch": planted} if plan.plant_mismatch else out


def cases(settings, plan):
    for dtype in settings["dtypes"]:
        for shape in settings["shapes"]:
            for block in settings["blocks"]:
                products = 9 if block == "gated" else 6
                meta = {"case": f"{shape.label} {block}", "M": shape.M, "K": shape.K, "I": shape.N,
                        "dtype": DTYPE_NAMES[dtype], "activation": BLOCKS[block], "phase": "fwd+bwd"}
                yield Case(meta, dtype, functools.partial(block_builders, shape, block, dtype, plan),
                           flops=products * 2.0 * shape.M * shape.K * shape.N)


def run(case, plan, peaks):
    from ..runner import run_timed, vs_eager

    return vs_eager(run_timed(case, plan, peaks), "saved_mb", "saved_vs_eager")


SUITE = Suite(
    name="mlp", title="mlp — one MLP block's training step (gated SwiGLU, plain GELU)",
    help="one MLP block fwd+bwd (Llama-8B shape at M=8192 and 256 on CUDA; tiny on CPU): fusedad.nn.GatedMLP / "
         "MLP vs eager nn.Linear+act(+mul) vs torch.compile, time and bytes saved for backward",
    preset=preset, cases=cases, run=run,
    columns=lambda perf: [("case", "case"), ("dtype", "dtype"), *report.timed_columns(perf, (report.SPREAD,
                                                                                          report.TFLOPS,
                                                                                          report.SPEEDUP)),
                          ("saved MiB", report.num("saved_mb", ".3g")),
                          ("saved × eager", report.num("saved_vs_eager", ".3f"))],
    fields={"I": "the block's intermediate size (x (M, K) -> (M, I) -> (M, K))",
            "saved_mb": "bytes one forward saves for backward (saved_tensors_hooks, parameters excluded), MiB",
            "saved_vs_eager": "saved_mb / eager saved_mb"})

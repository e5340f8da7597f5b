"""The ``model`` suite: one training step of a Llama-style causal LM, unconverted vs ``fusedad.convert``.

The model is built in code from a ``transformers.LlamaConfig`` (no hub, random weights); ``fusedad`` is
``fusedad.convert`` of a deep copy (same values). One step = ``model(input_ids, labels=ids)`` then the
gradients of every parameter (``torch.autograd.grad``: nothing accumulates between calls); the check
compares the loss and every gradient with eager's. Per implementation the row reports:

    fused_flop_frac  linear FLOPs whose activation or loss is fused, ÷ all linear FLOPs of the step,
                     counted from the module tree: a fused MLP block's GEMMs, a fusedad.nn.Linear with
                     an activation, and the LM head when the converted model's loss runs without logits;
                     attention's projections (plain fusedad.nn.Linear, no epilogue to fuse) and attention
                     itself stay eager. (Forward and backward have the same ratio: 3 GEMMs per linear.)
    saved_mb         bytes saved for backward by the step's forward (saved_tensors_hooks, each storage
                     once, parameters excluded)
    largest_mb       the largest tensor any op creates during the whole step, forward and backward
                     (a TorchDispatchMode over every op's outputs), and the op that made it; a custom
                     op whose body runs below the mode (a ``torch.library`` op dispatched as one) shows
                     its outputs, not its scratch
    loss, loss_rel_err   the step's loss, and |loss − eager's| / |eager's|

Sizes: CUDA — Llama-8B layer shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads), two decoder
layers, the Llama-3 vocabulary (128256, head not tied), bf16, 4 × 2048 = 8192 tokens (≈ 1.5 B parameters:
3 GB per model, both resident, plus a step's gradients and activations: well under 80 GB); CPU — a tiny model (fp32) for the
Triton interpreter (a correctness run: its times are no performance figure, and there the interpreter's
own copies can be the largest tensor).
"""
import copy
import dataclasses
import functools
import importlib.util

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import report
from ..mlp_memory import SavedBytes, _storage_key
from ..plan import DTYPE_NAMES
from ..runner import Case, run_case, time_interleaved, vs_eager
from . import Suite


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    label: str

    @property
    def tokens(self):
        return self.batch * self.seq


CUDA_SHAPES = (ModelShape(4096, 14336, 2, 32, 8, 128256, 4, 2048, "llama-8b layers ×2"),)
CPU_SHAPES = (ModelShape(32, 80, 2, 4, 2, 96, 2, 32, "llama tiny ×2"),)


def preset(device, quick):
    cuda = device == "cuda"
    return {"models": CUDA_SHAPES if cuda else CPU_SHAPES, "dtypes": (torch.bfloat16,) if cuda else (torch.float32,)}


def build_model(shape, dtype, device, seed):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 16), tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(dtype)
    return model.train()


def linear_flops(model, tokens):
    """(fused, total) forward FLOPs of the linear layers of one call on ``tokens`` tokens with labels."""
    import fusedad
    from fusedad.causal_lm import LossWithoutLogits
    from fusedad.recipes import FusedBlock

    def gemm(m):
        w = m.weight
        return 2.0 * tokens * w.shape[0] * w.shape[1]

    fused = total = 0.0
    inside = set()
    for block in model.modules():
        if isinstance(block, FusedBlock):
            for name in (*block.recipe.proj, *((block.recipe.down,) if block.recipe.down else ())):
                f = gemm(block._modules[name])
                fused, total = fused + f, total + f
                inside.add(id(block._modules[name]))
    head = model.get_output_embeddings()
    head_fused = isinstance(vars(model).get("forward"), LossWithoutLogits)
    for m in model.modules():
        if id(m) in inside or not isinstance(m, torch.nn.Linear):
            continue
        f = gemm(m)
        total += f
        if (m is head and head_fused) or (isinstance(m, fusedad.nn.Linear) and m.activation is not None):
            fused += f
    return fused, total


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op run under it creates: bytes of its storage and the op's name. Outputs
    that share a storage with an input (views, in-place ops) create nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _storage_key(t) not in inputs:
                try:
                    n = t.untyped_storage().nbytes()
                except (RuntimeError, NotImplementedError):
                    n = t.numel() * t.element_size()
                if n > self.nbytes:
                    self.nbytes, self.op = n, str(func.overloadpacket.__name__)
        return out


def step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]

    def fn():
        loss = model(input_ids=ids, labels=ids).loss
        return (loss.detach(), *torch.autograd.grad(loss, params))
    return fn


def measure_step(model, ids):
    """Row fields of one step: fused FLOP fraction, bytes saved for backward, largest tensor, loss."""
    fused, total = linear_flops(model, ids.numel())
    largest = LargestTensor()
    with largest:
        with SavedBytes(model.parameters()) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    del grads
    return {"fused_flop_frac": fused / total, "linear_gflop": 3 * total / 1e9, "saved_mb": saved.nbytes / 2**20,
            "largest_mb": largest.nbytes / 2**20, "largest_op": largest.op, "loss": float(loss.detach())}


def model_builders(shape, dtype, plan, state=None):
    """{impl: build}; ``state`` gets the models (as they are built) and the input ids, for ``run``'s measurement."""
    import fusedad

    eager = build_model(shape, dtype, plan.device, plan.seed)
    g = torch.Generator(device="cpu").manual_seed(plan.seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=g).to(plan.device)
    models = {}
    if state is not None:
        state.update(models=models, ids=ids)

    def build(name, make):
        def b():
            models[name] = make()
            return step_fn(models[name], ids)
        return b

    out = {"eager": build("eager", lambda: eager),
           "fusedad": build("fusedad", lambda: fusedad.convert(copy.deepcopy(eager)))}
    out = {k: v for k, v in out.items() if k == "eager" or k in plan.impls}
    if plan.plant_mismatch:
        def planted():
            fn = step_fn(eager, ids)
            return lambda: tuple(t * 1.5 for t in fn())
        out["planted-mismatch"] = planted
    return out


def cases(settings, plan):
    for dtype in settings["dtypes"]:
        for shape in settings["models"]:
            meta = {"case": shape.label, "hidden": shape.hidden, "intermediate": shape.intermediate,
                    "layers": shape.layers, "vocab": shape.vocab, "tokens": shape.tokens, "dtype": DTYPE_NAMES[dtype],
                    "phase": "fwd+bwd"}
            yield Case(meta, dtype, functools.partial(model_builders, shape, dtype, plan))


#: The rows' status where transformers is not installed (it comes with the test extra, not the bench one).
NO_TRANSFORMERS = 'skipped (needs transformers: the test extra)'


def run(case, plan, peaks):
    """Check (loss and every gradient vs eager), time interleaved, then measure one step of each."""
    if importlib.util.find_spec("transformers") is None:
        return [dict(case.meta, impl=impl, status=NO_TRANSFORMERS) for impl in ("eager", "fusedad")
                if impl == "eager" or impl in plan.impls]
    state = {}
    case = dataclasses.replace(case, make_builders=functools.partial(case.make_builders, state=state))

    def measure(fns):
        out = time_interleaved(fns, plan.device, plan.rounds, plan.rep_ms)
        models, ids = state["models"], state["ids"]
        for name, m in out.items():
            if isinstance(m, dict) and name in models:
                try:
                    m.update(measure_step(models[name], ids))
                except Exception as exc:  # noqa: BLE001 - a row, not a crash
                    out[name] = exc
        return out

    rows = run_case(case, plan, measure)
    state.clear()
    base = next((r.get("loss") for r in rows if r["impl"] == "eager"), None)
    for r in rows:
        if base is not None and r.get("loss") is not None:
            r["loss_rel_err"] = abs(r["loss"] - base) / abs(base)
    vs_eager(rows, "saved_mb", "saved_vs_eager")
    vs_eager(rows, "largest_mb", "largest_vs_eager")
    return vs_eager(rows, "ms", "speedup", invert=True) if plan.is_performance_run else rows


SUITE = Suite(
    name="model", title="model — a Llama-style causal LM's training step, unconverted vs fusedad.convert",
    help="one training step (loss with labels, fwd+bwd) of a Llama-style model built from a config (CUDA: two "
         "Llama-8B layers, vocab 128256, 8192 tokens, bf16; CPU: tiny): fused fraction of linear FLOPs, bytes "
         "saved for backward, largest tensor, loss, time",
    preset=preset, cases=cases, run=run,
    columns=lambda perf: [
        ("case", "case"), ("dtype", "dtype"), ("tokens", "tokens"),
        *report.timed_columns(perf, (report.SPREAD, report.SPEEDUP)),
        ("fused FLOP", report.num("fused_flop_frac", ".1%")),
        ("saved MiB", report.num("saved_mb", ".4g")), ("saved × eager", report.num("saved_vs_eager", ".3f")),
        ("largest MiB", report.num("largest_mb", ".4g")), ("largest op", lambda r: r.get("largest_op") or ""),
        ("largest × eager", report.num("largest_vs_eager", ".3f")),
        ("loss", report.num("loss", ".6g")), ("loss rel err", report.num("loss_rel_err", ".1e"))],
    fields={"hidden, intermediate, layers, vocab": "the model's config", "tokens": "batch × sequence length",
            "fused_flop_frac": "linear FLOPs whose activation or loss is fused ÷ all linear FLOPs (module tree: "
                               "fused MLP blocks' GEMMs, the LM head when the loss runs without logits)",
            "linear_gflop": "linear FLOPs of the step, fwd+bwd (3 GEMMs per linear), GFLOP",
            "saved_mb": "bytes the step's forward saves for backward (saved_tensors_hooks, each storage once, "
                        "parameters excluded), MiB",
            "saved_vs_eager": "saved_mb / eager saved_mb",
            "largest_mb": "largest tensor any op creates in the step, fwd+bwd (TorchDispatchMode), MiB",
            "largest_op": "the op that created it", "largest_vs_eager": "largest_mb / eager largest_mb",
            "loss": "the step's loss", "loss_rel_err": "|loss - eager loss| / |eager loss|"})

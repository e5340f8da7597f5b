"""Activation memory of one MLP block's training step: the bytes autograd keeps for backward.

    python -m bench.mlp_memory                       # Llama-8B block on the meta device, bf16
    python -m bench.mlp_memory --shape 8192x4096x14336 --dtype bf16 --device meta

Counted with ``torch.autograd.graph.saved_tensors_hooks`` during the forward: every tensor packed for
backward, each storage once, parameters left out (autograd keeps references to them, not copies) —
deterministic on any machine. On the meta device no data exists: fusedad runs its eager backend there,
which saves exactly the tensors the kernels' path saves (tests/test_mlp.py checks the two agree).

Implementations of a block (x (M, K); gate/up (I, K); down (K, I)):

    eager            nn.Linear layers + the activation (+ the gated product), as Hugging Face / timm write it
    fusedad-layers   the same with each nn.Linear a fusedad.nn.Linear (the plain block's activation fused
                     into fc1, as ``fusedad.convert`` does)
    fusedad          fusedad.nn.GatedMLP / fusedad.nn.MLP
    fusedad-recompute  the same with recompute=True
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fusedad

LLAMA_8B = (8192, 4096, 14336)  # M (tokens per step), hidden K, intermediate I


class EagerGated(nn.Module):
    def __init__(self, k, i, act, linear=nn.Linear, **kw):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(k, i, **kw), linear(k, i, **kw), linear(i, k, **kw)
        self.act = fusedad.activations.lookup(act).apply

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EagerPlain(nn.Module):
    def __init__(self, k, i, act, linear=nn.Linear, fuse_act=False, **kw):
        super().__init__()
        self.fc1 = linear(k, i, activation=act, **kw) if fuse_act else linear(k, i, **kw)
        self.fc2 = linear(i, k, **kw)
        self.act = (lambda z: z) if fuse_act else fusedad.activations.lookup(act).apply

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def blocks(gated, k, i, act, device, dtype):
    """{implementation: module}, all with the same shapes (weights need not be equal: only sizes count)."""
    kw = dict(device=device, dtype=dtype, bias=not gated)
    if gated:
        return {"eager": EagerGated(k, i, act, **kw),
                "fusedad-layers": EagerGated(k, i, act, linear=fusedad.nn.Linear, **kw),
                "fusedad": fusedad.nn.GatedMLP(k, i, act, **kw),
                "fusedad-recompute": fusedad.nn.GatedMLP(k, i, act, recompute=True, **kw)}
    return {"eager": EagerPlain(k, i, act, **kw),
            "fusedad-layers": EagerPlain(k, i, act, linear=fusedad.nn.Linear, fuse_act=True, **kw),
            "fusedad": fusedad.nn.MLP(k, i, activation=act, **kw),
            "fusedad-recompute": fusedad.nn.MLP(k, i, activation=act, recompute=True, **kw)}


def _storage_key(t):
    """The identity of a tensor's storage (its StorageImpl): equal for views of one buffer, on any device
    including meta, where every data pointer is 0."""
    return t.untyped_storage()._cdata


class SavedBytes:
    """Inside ``with``: the bytes of the distinct storages saved for backward (``.nbytes``), each storage
    counted once (views of one buffer share it), the ``parameters``' own storages left out."""

    def __init__(self, parameters):
        self._params = {_storage_key(p) for p in parameters}
        self._seen = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        key = _storage_key(t)
        if key not in self._params and key not in self._seen:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def saved_bytes(module, x):
    """Bytes of the distinct non-parameter storages saved for backward by one forward of ``module``."""
    with SavedBytes(module.parameters()) as saved:
        y = module(x)
    return saved.nbytes, y


def measure(gated, shape, act, device, dtype):
    """[(implementation, saved bytes, × eager)] for one block's training-step forward."""
    M, K, I = shape
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for name, module in blocks(gated, K, I, act, device, dtype).items():
        b, _ = saved_bytes(module, x)
        rows.append((name, b))
    eager = rows[0][1]
    return [(n, b, b / eager) for n, b in rows]


def table(shape, dtype, device, acts=(("gated", "silu"), ("plain", "gelu_tanh"))):
    lines = [f"saved for backward, one block step: M={shape[0]} K={shape[1]} I={shape[2]} {dtype} on {device} "
             f"(torch {torch.__version__})", f"{'block':8s} {'act':10s} {'impl':18s} {'MiB':>10s} {'x eager':>8s}"]
    out = []
    for form, act in acts:
        for name, b, ratio in measure(form == "gated", shape, act, device, dtype):
            lines.append(f"{form:8s} {act:10s} {name:18s} {b / 2**20:10.1f} {ratio:8.3f}")
            out.append(dict(block=form, activation=act, impl=name, saved_bytes=b, vs_eager=ratio))
    return "\n".join(lines), out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.mlp_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="x".join(map(str, LLAMA_8B)), help="MxKxI (default: Llama-8B, 8192x4096x14336)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--device", default="meta")
    args = p.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    text, _ = table(tuple(int(s) for s in args.shape.split("x")), dtype, args.device)
    print(text)


if __name__ == "__main__":
    main()

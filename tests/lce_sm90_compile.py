"""Lower the LM-head kernels (kernels/cross_entropy.py) for sm_90 on any machine — no GPU needed.

Run as a script with the interpreter off (``tests/test_cross_entropy.py`` does); prints one JSON line per
kernel × dtype: {"name", "ok", "shared", "regs", "stack", "wgmma", "error"}.
"""
import json
import os
import sys

import torch

PTR = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}


def lower(kernel, dtype, flags, cfg, int64=False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(flags, FP64=dtype == torch.float64, EMULATE_BF16=False, PRECISION="ieee", INT64=int64,
                      **{k: v for k, v in cfg.items() if k.startswith(("BLOCK", "GROUP")) and k in kernel.arg_names})
    signature, attrs = {}, {}
    for i, (name, p) in enumerate(zip(kernel.arg_names, kernel.params)):
        if p.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = ("*i64" if name == "t_ptr" else "*fp32" if name in ("lse_ptr", "zt_ptr", "zs_ptr",
                               "glse_ptr", "gzt_ptr", "gzs_ptr") and dtype != torch.float64 else PTR[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "dbp_ptr":
            signature[name] = "*fp64" if dtype == torch.float64 else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "softcap":
            signature[name] = "fp32"
        elif name in ("stride_xk", "stride_wk", "stride_b", "stride_cw", "stride_t", "stride_dzn"):
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i64" if int64 else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def main():
    from fusedad.kernels import cross_entropy as ce
    sys.path.insert(0, os.path.dirname(__file__))
    from sm90_compile import resource_usage

    on = dict(HAS_BIAS=True, HAS_CW=True, SOFTCAP=True)
    cases = [("lce_fwd", ce._lce_fwd_kernel, dict(on, SUM_Z=True)),
             ("lce_dz", ce._lce_dz_kernel, dict(on, HAS_GZS=True, WRITE_DZ=True, COMPUTE_DB=True))]
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        cfg = ce._config(dtype)
        for name, kernel, flags in cases:
            for int64 in (False, True) if dtype == torch.bfloat16 else (False,):
                label = f"{name} {str(dtype)[6:]}{' int64' if int64 else ''}"
                try:
                    k = lower(kernel, dtype, flags, cfg, int64)
                    regs, stack = resource_usage(k.asm["cubin"])
                    row = dict(name=label, ok=True, shared=k.metadata.shared, regs=regs, stack=stack,
                               wgmma="wgmma.mma_async" in k.asm["ptx"], error=None)
                except Exception as e:  # noqa: BLE001 - reported to the test
                    row = dict(name=label, ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before fusedad.kernels defines the kernels
    main()

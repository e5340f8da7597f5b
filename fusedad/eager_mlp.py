"""The eager backend of the MLP-block kernels: the contract of ``kernels/mlp.py`` with torch ops.

Used where no Triton kernel runs (CPU without ``TRITON_INTERPRET=1``, other devices). Shapes and
returns as in ``kernels/mlp.py``; ``act`` is an activation-table row.
"""
import torch
import torch.nn.functional as F


def gated_up_forward(x, w_gate, w_up, b_gate, b_up, act, store_preact):
    """-> (h, g | None, u | None): H = act(x·w_gateᵀ + b_gate) ⊙ (x·w_upᵀ + b_up)."""
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    h = act.apply(g) * u
    return h, (g if store_preact else None), (u if store_preact else None)


def down_backward(grad_y, w_down, g, u, act, need_pre=True, need_h=True, need_bias_pre=False, need_bias_down=False):
    """-> (dg, du, h, db_pre, db_up, db_down); see ``kernels.mlp.down_backward``."""
    a = act.apply(g)
    h = a * u if u is not None else a
    dg = du = db_pre = db_up = None
    if need_pre:
        dh = grad_y.mm(w_down)  # dH = dY·W_d
        if u is not None:
            dg, du = act.chain(dh * u, g), dh * a
        else:
            dg = act.chain(dh, g)
        if need_bias_pre:
            db_pre = dg.sum(0)
            db_up = du.sum(0) if du is not None else None
    db_down = grad_y.sum(0) if need_bias_down else None
    return dg, du, (h if need_h else None), db_pre, db_up, db_down


def gated_dual_backward(dg, du, x, w_gate, w_up, need_x=True, need_gate=True, need_up=True,
                        dwg_out=None, dwu_out=None, accumulate=False):
    """-> (dx | None, dwg | None, dwu | None); see ``kernels.mlp.gated_dual_backward``."""
    dx = torch.addmm(dg.mm(w_gate), du, w_up) if need_x else None

    def weight_grad(dp, out, need):
        if not need:
            return None
        dw = dp.t().mm(x)
        if out is None:
            return dw
        return out.add_(dw) if accumulate else out.copy_(dw)

    return dx, weight_grad(dg, dwg_out, need_gate), weight_grad(du, dwu_out, need_up)

"""FLOP and byte models per phase, and the figures derived from a time.

Linear layer x (M, K), W (N, K), b (N), y (M, N) (GUIDE §1). One GEMM is 2·M·N·K FLOP:

    fwd              z = x·Wᵀ + b                         1 GEMM
    bwd              dX = dZ·W, dW = dZᵀ·X                2 GEMMs
    fwd+bwd                                               3 GEMMs
    fwd+bwd-frozenW  no dW                                2 GEMMs
    jvp              y = act(x·Wᵀ + b), ẏ = act'(z)⊙(ẋ·Wᵀ) 2 GEMMs

Bytes are the minimum traffic (every operand read once, every result written once), so GB/s is a
lower bound on what the kernel moved; it is the figure of merit where a case is memory-bound
(arithmetic intensity below the device's measured ridge point, peak FLOP/s ÷ copy bytes/s).
"""


def layer_flops(M, K, N, phase):
    gemm = 2.0 * M * N * K
    return gemm * {"fwd": 1, "bwd": 2, "fwd+bwd": 3, "fwd+bwd-frozenW": 2, "jvp": 2}[phase]


def layer_bytes(M, K, N, phase, elem, activation, bias=True):
    """Minimum bytes moved; ``elem`` = bytes per element. Backward reads y (relu) or z (smooth) for act'."""
    x, w, y, b = M * K, N * K, M * N, (N if bias else 0)
    saved = y if activation not in (None, "none") else 0
    fwd = x + w + b + y
    dx_part = y + saved + w + x          # read dY, saved, W; write dX
    dw_part = x + w + b                  # read X (dY counted above); write dW, db
    counts = {
        "fwd": fwd,
        "bwd": dx_part + dw_part,
        "fwd+bwd": fwd + saved + dx_part + dw_part,   # the training forward also writes `saved`
        "fwd+bwd-frozenW": fwd + saved + dx_part + b,
        "jvp": fwd + x + y,                           # + read ẋ, write ẏ
    }
    return float(elem * counts[phase])


def net3_flops(net3, mode):
    """FLOPs of Net3 at its batch: forward GEMMs, plus dW for every layer and dX for all but the first
    (the input needs no gradient) in a training step."""
    M = net3.batch
    fwd = sum(2.0 * M * K * N for K, N in net3.layers)
    if mode != "fwd+bwd":
        return fwd
    dw = fwd
    dx = sum(2.0 * M * K * N for K, N in net3.layers[1:])
    return fwd + dw + dx


def throughput(flops, nbytes, ms, peaks, dtype_name):
    """Derived figures for one timing.

    Returns dict: tflops, gbps, bound ("compute" | "memory" | None without peaks), pct_peak (% of the
    device's measured GEMM peak in this dtype when compute-bound, of its copy bandwidth when
    memory-bound; None without peaks).
    """
    tflops = flops / ms / 1e9 if flops else None
    gbps = nbytes / ms / 1e6 if nbytes else None
    out = {"tflops": tflops, "gbps": gbps, "bound": None, "pct_peak": None}
    gemm_peak = (peaks or {}).get("gemm_tflops", {}).get(dtype_name)
    copy_peak = (peaks or {}).get("copy_gbps")
    if tflops is None or not gemm_peak or not copy_peak:
        return out
    ridge = gemm_peak * 1e3 / copy_peak                   # FLOP per byte where the two roofs meet
    if gbps is not None and flops / nbytes < ridge:
        out.update(bound="memory", pct_peak=100.0 * gbps / copy_peak)
    else:
        out.update(bound="compute", pct_peak=100.0 * tflops / gemm_peak)
    return out

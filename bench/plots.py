"""PNG plots of a run (matplotlib, Agg backend: no display needed).

    modes.png            Net3 ms per grad mode, per implementation (the seed's experiment)
    speedup-<dtype>.png  speedup vs eager per layer case, one panel per phase          (CUDA runs)
    roofline-<dtype>.png achieved TFLOP/s vs arithmetic intensity under the measured roofline,
                         right axis in % of the measured GEMM peak                     (CUDA runs)
    memory.png           MiB a training step allocates at its peak, per implementation  (CUDA runs)
    correctness.png      rel. error / tolerance of every checked row (all runs; > 1 is FAIL)

CPU runs get modes.png titled as not a performance figure, and correctness.png.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .plan import IMPL_LABELS, MODES, PHASES  # noqa: E402

IMPL_ORDER = ("eager", "fusedad", "compile", "cublaslt", "planted-mismatch")
COLORS = {"eager": "#7f7f7f", "fusedad": "#d62728", "compile": "#1f77b4", "cublaslt": "#2ca02c",
          "planted-mismatch": "#9467bd"}


def _impls(rows):
    present = {r["impl"] for r in rows}
    return [i for i in IMPL_ORDER if i in present]


def _title(env, what):
    t = f"{what}\n{env['device_name']} · torch {env['torch']} · triton {env['triton']} · {env['date'][:10]}"
    return t if env["performance_figures"] else t + f"\n{env['run_label']}: times are not performance figures"


def _grouped_bars(ax, groups, impls, value, rows_by, fmt="{:.3g}"):
    """Bars per group (x) and implementation, each labelled with its value (``fmt``); a FAIL / ERROR row
    gets its status written instead."""
    width = 0.8 / max(1, len(impls))
    x = np.arange(len(groups))
    for j, impl in enumerate(impls):
        for i, g in enumerate(groups):
            r = rows_by.get((g, impl))
            if r is None:
                continue
            xpos = x[i] + (j - (len(impls) - 1) / 2) * width
            v = value(r)
            if r["status"] != "ok" or v is None:
                ax.text(xpos, 0, r["status"].split(":")[0], rotation=90, ha="center", va="bottom", fontsize=7)
            else:
                bars = ax.bar(xpos, v, width, color=COLORS.get(impl), label=IMPL_LABELS.get(impl, impl))
                if len(groups) * len(impls) <= 40:
                    ax.bar_label(bars, [fmt.format(v)], fontsize=6, padding=1)
    ax.set_xlim(-0.5, len(groups) - 0.5)  # status texts do not enter autoscaling
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)


def plot_modes(rows, env, path):
    rows = [r for r in rows if r["suite"] == "modes"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    if not dtypes:
        return False
    fig, axes = plt.subplots(1, len(dtypes), figsize=(max(7, 5 * len(dtypes)), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        sub = [r for r in rows if r["dtype"] == dtype]
        by = {(r["mode"], r["impl"]): r for r in sub}
        _grouped_bars(ax, [m for m in MODES if any(r["mode"] == m for r in sub)], _impls(rows),
                      lambda r: r.get("ms"), by)
        ax.set_ylabel("ms per call" + ("" if env["performance_figures"] else "*"))
        ax.set_title(f"{sub[0]['case']}, {dtype}", fontsize=9)
    fig.suptitle(_title(env, "Net3: forward per grad mode, and a training step"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speedup(rows, env, dtype, path):
    rows = [r for r in rows if r["suite"] == "layers" and r["dtype"] == dtype and r["impl"] != "eager"]
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)]
    if not phases:
        return False
    impls = _impls(rows)  # the same bar slots and colours in every panel
    fig, axes = plt.subplots(len(phases), 1, figsize=(11, 2.9 * len(phases)), squeeze=False)
    for ax, phase in zip(axes[:, 0], phases):
        sub = [r for r in rows if r["phase"] == phase]
        groups = list(dict.fromkeys(f"{r['case']} · {r['activation']}" for r in sub))
        by = {(f"{r['case']} · {r['activation']}", r["impl"]): r for r in sub}
        _grouped_bars(ax, groups, impls, lambda r: r.get("speedup"), by, fmt="{:.2f}×")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel("× eager")
        ax.set_title(phase, fontsize=9)
    fig.suptitle(_title(env, f"speedup vs eager (eager ms / ms), {dtype}; above 1 is faster"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_roofline(rows, env, peaks, dtype, path):
    rows = [r for r in rows if r["suite"] == "layers" and r["dtype"] == dtype and r.get("tflops") and r.get("gbps")]
    peak = (peaks or {}).get("gemm_tflops", {}).get(dtype)
    if not rows or not peak:
        return False
    bw = peaks["copy_gbps"]
    fig, ax = plt.subplots(figsize=(8, 5))
    # FLOP/byte = tflops·1e12 / (gbps·1e9)
    ai = lambda r: r["tflops"] * 1e3 / r["gbps"]  # noqa: E731
    xs = np.logspace(np.log10(min(ai(r) for r in rows) / 2), np.log10(max(ai(r) for r in rows) * 2), 200)
    ax.plot(xs, np.minimum(peak, bw * xs / 1e3), color="black", lw=1,
            label=f"measured roof: {peak:.0f} TFLOP/s, {bw:.0f} GB/s")
    markers = {"eager": "o", "fusedad": "*", "compile": "s", "cublaslt": "^", "planted-mismatch": "x"}
    for impl in _impls(rows):
        sub = [r for r in rows if r["impl"] == impl]
        ax.scatter([ai(r) for r in sub], [r["tflops"] for r in sub], marker=markers.get(impl, "o"),
                   color=COLORS.get(impl), label=IMPL_LABELS.get(impl, impl), s=40, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity, FLOP / minimum byte")
    ax.set_ylabel("TFLOP/s")
    sec = ax.secondary_yaxis("right", functions=(lambda t: 100 * t / peak, lambda p: p * peak / 100))
    sec.set_ylabel(f"% of measured {dtype} GEMM peak")
    ax.legend(fontsize=8)
    ax.set_title(_title(env, f"layers, {dtype}: TFLOP/s and % of peak, all phases"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(rows, env, path):
    rows = [r for r in rows if r["suite"] == "memory"]
    if not any(r.get("step_mb") for r in rows):
        return False
    label = lambda r: f"{r['case']} {r['dtype']} {r.get('activation', '')} {r.get('phase', '')}"  # noqa: E731
    groups = list(dict.fromkeys(label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.5))
    _grouped_bars(ax, groups, _impls(rows), lambda r: r.get("step_mb"), {(label(r), r["impl"]): r for r in rows},
                  fmt="{:.0f}")
    ax.set_ylabel("MiB: peak allocated during the step\nminus allocated before it (weights, inputs)")
    ax.set_title(_title(env, "peak memory of one training step"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_correctness(rows, env, path):
    """rel_err / tol per implementation (jittered strip, log scale): every point must sit below 1."""
    rows = [r for r in rows if r["impl"] != "eager"]
    impls = _impls(rows)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(impls) + 2), 4.5))
    rng = np.random.default_rng(0)
    floor = 1e-6
    for i, impl in enumerate(impls):
        sub = [r for r in rows if r["impl"] == impl]
        ok = [max(r["rel_err"] / r["tol"], floor) for r in sub if r["status"] == "ok" and r.get("rel_err") is not None]
        bad = [max(r["rel_err"] / r["tol"], floor) if r.get("rel_err") is not None else 1e3
               for r in sub if r["status"] == "FAIL"]
        n_err = sum(1 for r in sub if r["status"].startswith("ERROR"))
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(ok)), ok, color=COLORS.get(impl), s=14, label=None)
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(bad)), bad, color="red", marker="x", s=40)
        ax.text(i, 2e3, f"{len(ok)} ok\n{len(bad)} FAIL\n{n_err} ERROR", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="red", lw=0.8, ls="--", label="tolerance")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 1e5)
    ax.set_xticks(range(len(impls)))
    ax.set_xticklabels([IMPL_LABELS.get(i, i) for i in impls], fontsize=8)
    ax.set_xlim(-0.6, max(len(impls) - 0.4, 0.6))
    ax.set_ylabel("rel. error vs eager / tolerance")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(_title(env, "correctness: ‖out − eager‖/‖eager‖ ÷ dtype tolerance (outputs and gradients)"),
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results, out_dir):
    """Write every plot that has data; returns the file names written."""
    rows, env, peaks = results["rows"], results["env"], results.get("peaks")
    written = []

    def save(name, ok):
        if ok:
            written.append(name)

    save("modes.png", plot_modes(rows, env, out_dir / "modes.png"))
    if env["performance_figures"]:
        for dtype in results["plan"]["dtypes"]:
            save(f"speedup-{dtype}.png", plot_speedup(rows, env, dtype, out_dir / f"speedup-{dtype}.png"))
            save(f"roofline-{dtype}.png", plot_roofline(rows, env, peaks, dtype, out_dir / f"roofline-{dtype}.png"))
        save("memory.png", plot_memory(rows, env, out_dir / "memory.png"))
    save("correctness.png", plot_correctness(rows, env, out_dir / "correctness.png"))
    return written

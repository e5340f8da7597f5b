"""PNG plots of a run (matplotlib, Agg backend: no display needed): each suite's own (``Suite.plot``,
drawn with the helpers here), then correctness.png — rel. error / tolerance of every checked row, all
runs (> 1 is FAIL). CPU runs label times as not performance figures.
"""
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .plan import IMPL_LABELS  # noqa: E402
from .report import suite_rows  # noqa: E402

#: correctness.png's lowest drawn ratio: a log axis has no 0, so smaller ratios (exact 0 included) sit here.
PLOT_FLOOR = 1e-6

IMPL_ORDER = ("eager", "fusedad", "compile", "cublaslt", "planted-mismatch")
COLORS = {"eager": "#7f7f7f", "fusedad": "#d62728", "compile": "#1f77b4", "cublaslt": "#2ca02c",
          "planted-mismatch": "#9467bd"}


def impls_in(rows):
    """The implementations present in ``rows``, in IMPL_ORDER (others after, as they come)."""
    present = list(dict.fromkeys(r["impl"] for r in rows))
    return [i for i in IMPL_ORDER if i in present] + [i for i in present if i not in IMPL_ORDER]


def title(env, what):
    t = f"{what}\n{env['device_name']} · torch {env['torch']} · triton {env['triton']} · {env['date'][:10]}"
    return t if env["performance_figures"] else t + f"\n{env['run_label']}: times are not performance figures"


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_chart(path, env, what, panels, group, value, ylabel, fmt="{:.3g}", stacked=False, figsize=None,
              hline=None):
    """Bars per x group (``group(row)``, in order of appearance) and implementation (the same slots and
    colours in every panel), one panel per (title, rows) of ``panels``, side by side or ``stacked``. Each
    bar is labelled with ``value(row)`` (``fmt``); a FAIL / ERROR row gets its status written instead."""
    impls = impls_in([r for _, rows in panels for r in rows])
    n, width = len(panels), 0.8 / max(1, len(impls))
    fig, axes = plt.subplots(n if stacked else 1, 1 if stacked else n, squeeze=False,
                             figsize=figsize or ((11, 2.9 * n) if stacked else (max(7, 5 * n), 4.5)))
    for ax, (panel, rows) in zip(axes.flat, panels):
        groups = list(dict.fromkeys(group(r) for r in rows))
        by = {(group(r), r["impl"]): r for r in rows}
        for (j, impl), (i, g) in itertools.product(enumerate(impls), enumerate(groups)):
            r = by.get((g, impl))
            if r is None:
                continue
            xpos = i + (j - (len(impls) - 1) / 2) * width
            if r["status"] != "ok" or value(r) is None:
                ax.text(xpos, 0, r["status"].split(":")[0], rotation=90, ha="center", va="bottom", fontsize=7)
            else:
                bars = ax.bar(xpos, value(r), width, color=COLORS.get(impl), label=IMPL_LABELS.get(impl, impl))
                if len(groups) * len(impls) <= 40:
                    ax.bar_label(bars, [fmt.format(value(r))], fontsize=6, padding=1)
        ax.set(xlim=(-0.5, len(groups) - 0.5), xticks=range(len(groups)), ylabel=ylabel)  # texts do not autoscale
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))  # one entry per implementation
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        if hline is not None:
            ax.axhline(hline, color="black", lw=0.8)
        ax.set_title(panel, fontsize=9)
    fig.suptitle(title(env, what), fontsize=9)
    save(fig, path)


def plot_correctness(rows, env, path):
    """rel_err / tol per implementation (jittered strip, log scale): every point must sit below 1.

    A log axis has no 0, and exact agreement with eager (rel. error 0) is common: ratios below FLOOR are
    drawn AT FLOOR as hollow down-triangles, with a dotted line and a legend entry saying so (and how
    many there are); FAIL rows without a number are drawn at 1e3. Long implementation names are broken
    after their "fusedad:" prefix and slanted, so neighbouring labels never overlap."""
    rows = [r for r in rows if r["impl"] != "eager"]
    impls = impls_in(rows)
    fig, ax = plt.subplots(figsize=(max(9, 1.0 * len(impls) + 4.5), 5.2))
    rng = np.random.default_rng(0)
    floor = PLOT_FLOOR
    n_clamped = 0
    for i, impl in enumerate(impls):
        sub = [r for r in rows if r["impl"] == impl]
        ok = [r["rel_err"] / r["tol"] for r in sub if r["status"] == "ok" and r.get("rel_err") is not None]
        low = [v for v in ok if v < floor]
        ok = [v for v in ok if v >= floor]
        n_clamped += len(low)
        bad = [max(r["rel_err"] / r["tol"], floor) if r.get("rel_err") is not None else 1e3
               for r in sub if r["status"] == "FAIL"]
        n_err = sum(1 for r in sub if r["status"].startswith("ERROR"))
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(ok)), ok, color=COLORS.get(impl), s=14)
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(low)), [floor] * len(low), marker="v", s=18,
                   facecolors="none", edgecolors=COLORS.get(impl, "black"), linewidths=0.8)
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(bad)), bad, color="red", marker="x", s=40)
        ax.text(i, 2e3, f"{len(ok) + len(low)} ok\n{len(bad)} FAIL\n{n_err} ERROR", ha="center", va="bottom",
                fontsize=7)
    ax.axhline(1.0, color="red", lw=0.8, ls="--", label="tolerance (above: FAIL)")
    ax.axhline(floor, color="gray", lw=0.6, ls=":")
    ax.scatter([], [], marker="v", s=18, facecolors="none", edgecolors="black", linewidths=0.8,
               label=f"below {floor:g} (exact 0 included):\ndrawn at {floor:g}, {n_clamped} points")
    ax.set(yscale="log", ylim=(floor / 3, 1e5), xlim=(-0.6, max(len(impls) - 0.4, 0.6)), xticks=range(len(impls)),
           ylabel="rel. error vs eager / tolerance")
    ax.set_xticklabels([IMPL_LABELS.get(i, i).replace(":", ":\n", 1) for i in impls], fontsize=7, rotation=30,
                       ha="right", rotation_mode="anchor")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a point
    ax.set_title(title(env, "correctness: ‖out − eager‖/‖eager‖ ÷ dtype tolerance (outputs and gradients)"),
                 fontsize=8)
    save(fig, path)


def write_plots(results, out_dir):
    """Every suite's plots, then correctness.png; returns the file names written."""
    out_dir = Path(out_dir)
    written = []
    for suite, rows in suite_rows(results):
        if suite.plot is not None:
            written += suite.plot(rows, results, out_dir)
    plot_correctness(results["rows"], results["env"], out_dir / "correctness.png")
    return written + ["correctness.png"]


def per_shape_bar_charts(rows, results, out_dir, stem, what, ylabel):
    """Performance runs only: ``<stem>-<dtype>.png``, ms per activation and implementation, one panel per
    shape (the backward and forward suites' variant comparisons). Returns the file names written."""
    env, written = results["env"], []
    if not env["performance_figures"]:
        return written
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        panels = [(case, [r for r in sub if r["case"] == case]) for case in dict.fromkeys(r["case"] for r in sub)]
        name = f"{stem}-{dtype}.png"
        bar_chart(out_dir / name, env, f"{what}, {dtype}; lower is faster", panels, lambda r: r["activation"],
                  lambda r: r.get("ms"), ylabel, stacked=True)
        written.append(name)
    return written

"""``python -m bench``: argparse front end and the run itself.

Nothing here imports fusedad at module level: ``main`` first decides the device and, without CUDA, sets
``TRITON_INTERPRET=1`` (Triton reads it when the kernels are defined, i.e. when fusedad is imported),
so on a CPU machine the real kernels run through Triton's interpreter. Only then is the parser built: its
choices come from the suite registry (``bench/suites/``) and fusedad's activations.
"""
import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

#: Default output folder, git-ignored: running the benchmark leaves the checkout as it was. Results worth
#: keeping are written with ``--out bench/results/<name>`` and committed on purpose.
OUT_DIR = Path(__file__).resolve().parent / "out"

DESCRIPTION = """\
Benchmark fusedad's fused Linear(+activation) kernels against eager PyTorch (nn.Linear + activation
module), torch.compile of the same eager module, and cuBLASLt's fused epilogue (torch._addmm_activation),
across grad modes and phases. Every implementation is first checked against eager (relative error
||out - eager|| / ||eager|| over outputs and gradients; tolerance fp32 1e-4, fp16 5e-3, bf16 2e-2): a
mismatch is reported as FAIL and never timed; an implementation that raises is reported as ERROR.

suites:
{suites}

timing (CUDA): triton.testing.do_bench medians; the implementations of a case are interleaved over
--rounds rounds (rotating order, so clock drift cancels) and the median of the round medians is
reported with their min-max spread. TFLOP/s, GB/s (memory-bound cases), % of the device's peak (same-
dtype 8192^3 GEMM and device copy bandwidth, measured at start), speedup vs eager, peak memory.

Without CUDA the kernels run in Triton's interpreter on tiny shapes: a correctness run, and its
timings are labelled "cpu-interpreter (not a performance figure)".
"""

EPILOG = """\
outputs: a console table, and in bench/out/<YYYY-MM-DD>-<device>[-quick]/ (git-ignored) or --out DIR:
  results.json (every figure, the plan and the environment: card, driver, versions, command line),
  results.md (tables), PNG plots (modes, speedup vs eager, roofline/% of peak, memory, correctness).
exit status: 1 if any fusedad row is FAIL or ERROR (its CUDA-graph replay included), else 0.

examples:
  python -m bench --quick      # CPU: < 1 min, interpreter, correctness only; GPU: sized for < 3 min
  python -m bench --suite layers --dtype bf16 --activation gelu_tanh --phase fwd+bwd
  python -m bench --suite layers --shape 4096x4096x4096 --impl eager fusedad --rounds 7
"""


def build_parser():
    """The parser; imports fusedad (through the suites): call it after TRITON_INTERPRET is decided."""
    from .impls import ACTIVATIONS, PHASES
    from .plan import DTYPES, IMPLS
    from .suites import SUITES

    suites = "\n".join(textwrap.fill(" ".join(s.help.split()), 105, initial_indent=f"  {name:8s} ",
                                      subsequent_indent=" " * 11) for name, s in SUITES.items())
    p = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION.format(suites=suites),
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small subset: CUDA: seed Net3 + one Net3 layer (gelu_tanh), bf16, 3 rounds; "
                        "CPU: tiny shapes, fp32 + bf16, no torch.compile, 2 rounds (correctness only)")
    p.add_argument("--suite", nargs="+", choices=list(SUITES), metavar="SUITE",
                   help=f"suites to run, of {', '.join(SUITES)} (default: all)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), metavar="DTYPE",
                   help=f"dtypes, of {', '.join(DTYPES)}, for every suite (default CUDA: all, bf16 with --quick; "
                        "CPU: fp32 bf16, and fp16 for a full run's layers)")
    p.add_argument("--activation", nargs="+", choices=ACTIVATIONS, metavar="ACT",
                   help=f"layer activations, of {', '.join(ACTIVATIONS)} (default: none gelu_tanh relu)")
    p.add_argument("--phase", nargs="+", choices=list(PHASES), metavar="PHASE", help="layer phases: " + ", ".join(
        f"{k} ({v})" for k, v in PHASES.items()) + " (default: all)")
    p.add_argument("--impl", nargs="+", choices=list(IMPLS), metavar="IMPL", help="implementations: " + ", ".join(
        f"{k} ({v})" for k, v in IMPLS.items()) + " (default: all that apply)")
    p.add_argument("--shape", nargs="+", metavar="MxKxN",
                   help="layer shapes instead of the preset, e.g. 8192x4096x14336 (x: M×K, weight: N×K)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="interleaved timing rounds per case (default: 5 full, 3 quick; CPU 3 / 2)")
    p.add_argument("--graph-max-m", type=int, metavar="M",
                   help="also time a CUDA-graph replay of every implementation for cases with M <= this, in the "
                        "suites that have the setting (default: backward 256, layers 0 = none); without CUDA "
                        "those rows say 'skipped (no GPU)'")
    p.add_argument("--rep-ms", type=float, metavar="MS",
                   help="do_bench timing window per implementation per round, CUDA (default: 25 full, 10 quick)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where to run (default: cuda if available, else cpu with the Triton interpreter)")
    p.add_argument("--out", metavar="DIR", help="write results here instead of bench/out/<date>-<device>[-quick]/")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed for every case (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # Test hook (tests/test_bench.py): a deliberately wrong implementation that must show as FAIL.
    p.add_argument("--plant-mismatch", action="store_true", help=argparse.SUPPRESS)
    return p


def resolve_device(choice):
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m bench: --device cuda, but torch.cuda.is_available() is False")
    return choice


def plan_from_args(args, device):
    """The preset of ``device`` / ``--quick`` for the chosen suites, with the options applied: --dtype,
    --activation, --phase and --shape replace those settings in every suite that has them."""
    from .plan import DTYPES, Shape, make_plan

    plan = make_plan(device, args.quick, args.suite)
    given = {"dtypes": args.dtype and tuple(DTYPES[d] for d in args.dtype),
             "activations": args.activation and tuple(args.activation), "phases": args.phase and tuple(args.phase),
             "shapes": args.shape and tuple(Shape.parse(s) for s in args.shape)}
    for settings in plan.settings.values():
        settings.update({k: v for k, v in given.items() if v and k in settings})
        if args.graph_max_m is not None and "graph_max_m" in settings:
            settings["graph_max_m"] = args.graph_max_m
    if args.impl:
        plan.impls = tuple(dict.fromkeys(("eager", *args.impl)))
        plan.skipped_impls = {k: v for k, v in plan.skipped_impls.items() if k not in plan.impls or k == "cublaslt"}
    if args.rounds:
        plan.rounds = max(1, args.rounds)
    if args.rep_ms:
        plan.rep_ms = args.rep_ms
    plan.seed = args.seed
    plan.plant_mismatch = args.plant_mismatch
    return plan


def default_out_dir(env, quick, slug):
    return OUT_DIR / f"{env['date'][:10]}-{slug}{'-quick' if quick else ''}"


def run(plan, argv=(), out_dir=None, progress=True, plots=True, log=print):
    """Run ``plan`` and write its results; returns the results dict (env, peaks, plan, rows, out_dir)."""
    import torch

    import fusedad

    from . import device as dev
    from . import report, runner
    from .suites import SUITES

    started = time.perf_counter()
    backend = fusedad.backend(torch.empty(0, device=plan.device))
    if plan.device == "cuda" and backend != "triton":
        raise SystemExit(f"python -m bench: fusedad backend on CUDA is {backend!r}, not 'triton' (is TRITON_INTERPRET "
                         "set?): its timings would mean nothing. Unset it, or use --device cpu.")
    if plan.device == "cpu" and backend != "triton-interpreter":
        plan.label += f" (fusedad backend: {backend}; set TRITON_INTERPRET=1 before importing fusedad)"
    env = dev.environment(plan, list(argv), backend)
    log(f"fusedad benchmark: {plan.label} — {env['device_name']} (fusedad backend: {backend})")
    if plan.device == "cuda":
        log("measuring device peaks (8192³ GEMM per dtype, 1 GiB copy) …")
    dtypes = (t for settings in plan.settings.values() for t in settings.get("dtypes", ()))
    peaks = dev.measure_peaks(plan.device, tuple(dict.fromkeys(dtypes)))
    log(report.peaks_line(peaks).strip())

    out_dir = Path(out_dir) if out_dir else default_out_dir(env, plan.quick, dev.device_slug(plan.device, backend))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"env": env, "peaks": peaks, "plan": report.plan_record(plan), "rows": [], "plots": []}
    for name in plan.suites:
        done = results["rows"]

        def write_so_far(rows, done=done):  # after every case: a run cut short keeps what it measured
            results["rows"] = done + rows
            report.write(results, out_dir)

        results["rows"] = done + runner.run_suite(SUITES[name], plan, peaks, progress=progress,
                                                  after_case=write_so_far)
        report.write(results, out_dir)

    from . import tuning

    note = tuning.status(plan.device)
    results["tuning"] = {"note": note, "rows": [] if note else tuning.rows()}
    env["seconds"] = round(time.perf_counter() - started, 1)
    if plots:
        from . import plots as plotting  # matplotlib only when plots are wanted

        results["plots"] = plotting.write_plots(results, out_dir)
    report.write(results, out_dir)
    log(report.console_report(results))
    log(f"\nwrote {out_dir}/: results.json results.md {' '.join(results['plots'])}  ({env['seconds']:.0f} s)")
    results["out_dir"] = out_dir
    return results


def fusedad_failures(rows):
    """fusedad rows (``plan.is_fusedad``) that are FAIL or ERROR, or whose CUDA-graph replay is (a row
    "skipped (…)" — a suite whose optional dependency is missing — is neither)."""
    from .plan import is_fusedad
    from .protocol import not_ok
    from .runner import graph_failed

    return [r for r in rows if is_fusedad(r["impl"]) and (not_ok(r["status"]) or graph_failed(r))]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default="auto")  # its choices are checked by the full parser below
    device = resolve_device(pre.parse_known_args(argv)[0].device)
    if device == "cpu":
        # Must precede the first import of fusedad (Triton reads it when the kernels are defined).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args, device)
    results = run(plan, argv, args.out, progress=not args.no_progress, plots=not args.no_plots)
    bad = fusedad_failures(results["rows"])
    if bad:
        print(f"{len(bad)} fusedad row(s) FAIL or ERROR", file=sys.stderr)
    return 1 if bad else 0

"""``python -m bench`` — fusedad vs eager PyTorch, cuBLASLt epilogues and torch.compile.

Not shipped in the wheel. Importing this package imports nothing heavy (no torch, no fusedad), so
``bench/cli.py`` can set ``TRITON_INTERPRET=1`` before fusedad is imported on a machine without CUDA.

Modules, one job each:

    cli.py        argparse, the run plan from the options, orchestration
    plan.py       what a run covers: shape sets, dtypes, phases, implementations (quick / full, CPU / CUDA)
    device.py     environment record, result-folder name, measured device peaks (GEMM TFLOP/s, copy GB/s)
    impls.py      the implementations (eager, fusedad, torch.compile, cuBLASLt epilogue) per phase / mode
    checks.py     relative error vs eager and the per-dtype tolerances
    timing.py     interleaved timing (``triton.testing.do_bench`` medians on CUDA) and peak memory
    figures.py    FLOP and byte models per phase -> TFLOP/s, GB/s, % of measured peak, speedup
    suites.py     the ``modes``, ``layers`` and ``memory`` suites: check, then time, one row per result
    report.py     console table, results.json, results.md
    plots.py      PNG plots (matplotlib, Agg)
    sanitize_case.py  a small CUDA forward+backward for ``compute-sanitizer`` (used by gpu_check.sh)
"""

"""The benchmark harness's CPU path (``python -m bench``).

One real ``python -m bench --quick --device cpu --plant-mismatch`` run (module fixture, ~20 s: kernels
in Triton's interpreter) checks the files it writes, that it writes nothing else into the checkout, and
that a planted wrong implementation is FAIL and never timed; the rest call the suite API with fakes or
synthetic rows (milliseconds each), including the CUDA-only report and plot paths that a CPU run never
reaches, and a suite defined here, which must reach the CLI, the report and the plots through the
registry alone.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedad

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is not installed (not shipped in the wheel): import it from the checkout

from bench import checks, cli, impls, plan, protocol, report, runner  # noqa: E402
from bench.suites import SUITES, Suite, backward, forward, layers, lm_head, memory, modes, register  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(path):
    """json.load that rejects NaN / Infinity (not JSON)."""
    def reject(token):
        raise ValueError(f"non-JSON constant {token}")
    return json.loads(Path(path).read_text(), parse_constant=reject)


def _git(*args):
    """git's output in the checkout, or None where there is no git checkout (e.g. an unpacked sdist)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-quick")
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--out", str(out), "--plant-mismatch",
           "--no-progress"]
    status_before = _git("status", "--porcelain")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    proc.git_status = (status_before, _git("status", "--porcelain"))
    return proc, out, _strict_json(out / "results.json")


def test_quick_run_leaves_the_checkout_as_it_was(quick_run):
    """Nothing tracked is modified and nothing untracked appears (the run writes only to its --out)."""
    before, after = quick_run[0].git_status
    if before is None:
        pytest.skip("not a git checkout")
    assert after == before


def test_default_output_folder_is_git_ignored():
    """Without --out, results go to bench/out/<date>-<device>[-quick]/, which git ignores: running the
    README's command leaves `git status` clean; results worth keeping are committed with --out."""
    env = {"date": "2026-11-26T10:00:00+00:00"}
    dirs = [cli.default_out_dir(env, True, "cpu-interpreter"), cli.default_out_dir(env, False, "h100-80gb-hbm3")]
    assert dirs[0].parent == REPO / "bench" / "out" and dirs[0].name == "2026-11-26-cpu-interpreter-quick"
    if _git("rev-parse", "--git-dir") is None:
        pytest.skip("not a git checkout")
    for d in dirs:
        assert _git("check-ignore", "-q", str(d / "results.json")) is not None, f"{d} is not git-ignored"


def test_quick_run_exits_0_when_fusedad_passes(quick_run):
    """Exit status 1 means a fusedad row is FAIL or ERROR (the planted mismatch does not count)."""
    proc, _, results = quick_run
    bad = cli.fusedad_failures(results["rows"])
    assert (proc.returncode, bad) == (0, []), proc.stderr[-2000:]


def test_quick_run_covers_every_suite_and_labels_cpu_timings(quick_run):
    proc, _, results = quick_run
    for suite in SUITES.values():
        assert f"-- {suite.title}" in proc.stdout
    assert plan.CPU_TIMING_NOTE in proc.stdout
    assert plan.CPU_LABEL in proc.stdout
    assert {r["suite"] for r in results["rows"]} == set(SUITES) == {"modes", "layers", "memory", "backward", "forward",
                                                                     "lm-head", "mlp", "model"}
    # Every phase of the layers suite and every grad mode of Net3 ran.
    assert {r["phase"] for r in results["rows"] if r["suite"] == "layers"} == set(impls.PHASES)
    assert {r["mode"] for r in results["rows"] if r["suite"] == "modes"} == set(impls.MODES)


def test_quick_json_records_environment_and_no_cpu_performance_figures(quick_run):
    _, _, results = quick_run
    env = results["env"]
    for key in ("date", "command", "device_name", "driver", "torch", "triton", "python", "interpreter",
                "fusedad_backend", "git_commit"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["interpreter"] is True and env["fusedad_backend"] == "triton-interpreter"
    assert env["performance_figures"] is False and env["timing_note"] == plan.CPU_TIMING_NOTE
    assert "--quick" in env["command"] and "-m bench" in env["command"]
    assert results["peaks"] is None
    assert results["plan"]["skipped_impls"] == {"cublaslt": "CUDA only", "compile": "skipped: cpu quick"}
    for r in results["rows"]:
        assert r.get("tflops") is None and r.get("speedup") is None and r.get("pct_peak") is None
        if r["suite"] == "memory":
            assert r.get("peak_mb") is None


def test_quick_fusedad_rows_pass_and_are_timed(quick_run):
    _, _, results = quick_run
    fused = [r for r in results["rows"] if plan.is_fusedad(r["impl"])]
    assert {r["suite"] for r in fused} == set(SUITES)
    for r in fused:
        assert r["status"] == "ok", r
        assert 0 <= r["rel_err"] <= r["tol"]
        if r["suite"] != "memory":
            assert r["ms"] > 0 and r["ms_min"] <= r["ms"] <= r["ms_max"]
            assert len(r["round_ms"]) == results["plan"]["rounds"]


def test_planted_mismatch_is_fail_and_never_timed(quick_run):
    proc, out, results = quick_run
    planted = [r for r in results["rows"] if r["impl"] == "planted-mismatch"]
    assert {r["suite"] for r in planted} == set(SUITES)
    for r in planted:
        assert r["status"] == "FAIL" and r["rel_err"] > r["tol"]
        assert "ms" not in r and "round_ms" not in r
    assert re.search(r"planted-mismatch\s+FAIL", proc.stdout)
    assert "| planted-mismatch | FAIL |" in (out / "results.md").read_text()


def test_quick_markdown_and_pngs(quick_run):
    _, out, results = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# fusedad benchmark")
    assert "| dtype | mode | impl | status | rel err | ms* |" in md
    assert plan.CPU_TIMING_NOTE in md
    assert {"modes.png", "correctness.png"} <= set(results["plots"])
    import matplotlib.image

    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# --- the suite API, without kernels ---------------------------------------------------------------


def _tiny_plan(rounds=3, **kw):
    p = plan.make_plan("cpu", quick=True)
    p.rounds = rounds
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _fake_case(builders, dtype=torch.float32):
    meta = {"case": "fake", "M": 2, "K": 3, "N": 4, "dtype": plan.DTYPE_NAMES[dtype], "activation": "none",
            "phase": "fwd"}
    return runner.Case(meta, dtype, lambda: builders, flops=48.0, nbytes=100.0)


def test_run_case_statuses_ok_fail_error_and_only_ok_is_timed():
    ref = torch.randn(16, 8)
    calls = {"bad": 0}

    def bad():
        calls["bad"] += 1
        return (ref * 1.01,)  # 1e-2 > fp32 tolerance 1e-4

    def broken_build():
        raise RuntimeError("compile failed\nlong traceback")

    builders = {
        "eager": lambda: (lambda: (ref.clone(),)),
        "fusedad": lambda: (lambda: (ref + 1e-7 * torch.randn_like(ref),)),
        "planted-mismatch": lambda: bad,
        "compile": broken_build,
        "nan": lambda: (lambda: (torch.full_like(ref, math.nan),)),
    }
    rows = {r["impl"]: r for r in runner.run_timed(_fake_case(builders), _tiny_plan(), None)}
    assert rows["eager"]["status"] == "ok" and rows["fusedad"]["status"] == "ok"
    assert len(rows["fusedad"]["round_ms"]) == 3
    assert rows["planted-mismatch"]["status"] == "FAIL"
    assert rows["planted-mismatch"]["rel_err"] == pytest.approx(1e-2, rel=1e-3)
    assert calls["bad"] == 1  # the check only: never timed
    assert rows["compile"]["status"] == "ERROR: RuntimeError: compile failed"
    assert rows["nan"]["status"] == "FAIL" and rows["nan"]["rel_err"] is None
    for name in ("planted-mismatch", "compile", "nan"):
        assert "ms" not in rows[name]


def test_run_case_eager_failure_marks_every_row():
    def boom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    builders = {"eager": boom, "fusedad": lambda: (lambda: (torch.ones(1),))}
    rows = runner.run_timed(_fake_case(builders), _tiny_plan(), None)
    assert [r["status"].split(":")[0] for r in rows] == ["ERROR", "ERROR"]


def test_memory_suite_measures_only_passing_impls_and_compares_with_eager(monkeypatch):
    """memory's own run (CUDA's peak-memory figures faked here): FAIL never measured, step × eager."""
    ref = torch.randn(4)
    mib = {}
    builders = {name: (lambda v=v: (lambda: (v,))) for name, v in
                (("eager", ref), ("fusedad", ref.clone()), ("planted-mismatch", 2 * ref))}
    steps = {id(ref): (300.0, 150.0)}

    def fake_peak(fn, device):
        out = fn()[0]
        mib[device] = mib.get(device, 0) + 1
        peak, step = steps.get(id(out), (250.0, 125.0))
        return {"peak_mb": peak, "step_mb": step}

    monkeypatch.setattr(memory, "peak_memory_mb", fake_peak)
    rows = {r["impl"]: r for r in memory.SUITE.run(_fake_case(builders), _tiny_plan(), None)}
    assert mib == {"cpu": 2}  # eager and fusedad; the planted FAIL is never measured
    assert (rows["eager"]["step_mb"], rows["fusedad"]["step_mb"]) == (150.0, 125.0)
    assert rows["fusedad"]["mem_vs_eager"] == pytest.approx(125 / 150)
    assert rows["planted-mismatch"]["status"] == "FAIL" and "step_mb" not in rows["planted-mismatch"]


# torch.func.jvp's first use loads torch's jvp decompositions, which call the deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_layer_case_with_real_fusedad_and_planted_mismatch():
    """The suite API's own test hook (plant_mismatch) on a real tiny layer, every phase."""
    p = _tiny_plan(rounds=1, plant_mismatch=True)
    p.settings = {"layers": dict(p.settings["layers"], shapes=(plan.Shape(4, 16, 8),), dtypes=(torch.float32,),
                                 activations=("gelu_tanh",))}
    rows = runner.run_suite(SUITES["layers"], p, None, progress=False)
    assert {r["phase"] for r in rows} == set(impls.PHASES)
    assert {r["suite"] for r in rows} == {"layers"}
    for r in rows:
        expected = "FAIL" if r["impl"] == "planted-mismatch" else "ok"
        assert r["status"] == expected, r
        assert ("ms" in r) == (expected == "ok")


def test_time_interleaved_rotates_order_and_reports_errors():
    order = []

    def make(name):
        return lambda: order.append(name)

    def raises():
        raise ValueError("boom")

    fns = {"a": make("a"), "b": make("b"), "c": make("c"), "x": raises}
    out = runner.time_interleaved(fns, "cpu", rounds=3, rep_ms=0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # x dropped after its first failure
    assert isinstance(out["x"], ValueError)
    t = out["a"]
    assert len(t["round_ms"]) == 3 and t["ms_min"] <= t["ms"] <= t["ms_max"]
    assert t["spread_pct"] == pytest.approx(100 * (t["ms_max"] - t["ms_min"]) / t["ms"])


def test_rel_err_and_tolerances():
    r = torch.tensor([3.0, 4.0])
    assert checks.rel_err(r, r) == 0.0
    assert checks.rel_err(torch.tensor([3.0, 4.5]), r) == pytest.approx(0.1)
    assert math.isnan(checks.rel_err(torch.tensor([math.nan, 4.0]), r))
    assert math.isnan(checks.rel_err(torch.zeros(3), r))  # shape mismatch
    assert not checks.passes(math.nan, torch.float32)
    assert checks.passes(1e-4, torch.float32) and not checks.passes(2e-4, torch.float32)
    assert checks.tolerance(torch.bfloat16) > checks.tolerance(torch.float16) > checks.tolerance(torch.float32)


def test_flop_models_and_roofline_classification():
    M, K, N = 256, 4096, 8192
    fwd = layers.layer_flops(M, K, N, "fwd")
    assert fwd == 2 * M * K * N
    assert layers.layer_flops(M, K, N, "fwd+bwd") == 3 * fwd
    assert layers.layer_flops(M, K, N, "fwd+bwd-frozenW") == 2 * fwd == layers.layer_flops(M, K, N, "jvp")
    net3 = impls.SEED_NET3
    assert modes.net3_flops(net3, "fwd+bwd") < 3 * modes.net3_flops(net3, "no_grad")  # no dX for layer 0
    peaks = {"gemm_tflops": {"bf16": 785.0}, "copy_gbps": 4222.0}  # an H200's measured peaks
    # decode M=1 on 8192×8192 bf16: ~1 FLOP/byte, far below the ridge (~186 FLOP/byte): memory-bound
    nbytes = layers.layer_bytes(1, 8192, 8192, "fwd", 2, "none")
    dec = runner.throughput(layers.layer_flops(1, 8192, 8192, "fwd"), nbytes, 0.045, peaks, "bf16")
    assert dec["bound"] == "memory" and dec["pct_peak"] == pytest.approx(100 * dec["gbps"] / 4222.0)
    big = runner.throughput(layers.layer_flops(8192, 4096, 14336, "fwd"),
                            layers.layer_bytes(8192, 4096, 14336, "fwd", 2, "none"), 1.3, peaks, "bf16")
    assert big["bound"] == "compute" and big["pct_peak"] == pytest.approx(100 * big["tflops"] / 785.0)
    assert runner.throughput(fwd, 1.0, 1.0, None, "bf16")["pct_peak"] is None


def test_eager_activation_modules_are_the_ones_fusedad_fuses():
    """The bench's activation list is fusedad's whole table; fusedad.convert fuses each eager module that
    torch has as that activation, and impls.fuse the others (relu2) the same way."""
    assert impls.ACTIVATIONS == ("none", *fusedad.ACTIVATIONS)
    for a in fusedad.activations.TABLE[1:]:
        eager = torch.nn.Sequential(torch.nn.Linear(2, 3), impls.ACTIVATION_MODULES[a.name]())
        model = (fusedad.convert if a.modules else impls.fuse)(eager)
        assert model[0].activation == a.name and isinstance(model[1], torch.nn.Identity)
        assert model[0].weight is eager[0].weight
        x = torch.randn(5, 2)
        torch.testing.assert_close(model(x), eager(x))


# --- CUDA-only report and plot paths, from synthetic rows ------------------------------------------


def _synthetic_cuda_results():
    peaks = {"gemm_tflops": {"bf16": 700.0}, "copy_gbps": 4000.0, "gemm_shape": "8192x8192x8192",
             "copy_bytes": 2**30}
    p = plan.make_plan("cuda", quick=True)
    env = {"run_label": p.label, "device_name": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
           "date": "2026-11-26T00:00:00+00:00", "command": "python -m bench --quick", "performance_figures": True}
    rows = []
    for mode in impls.MODES:
        for impl, ms in (("eager", 1.0), ("fusedad", 0.9), ("compile", 1.1)):
            rows.append(dict(suite="modes", case="Net3", dtype="bf16", mode=mode, impl=impl, status="ok",
                             rel_err=1e-3, tol=2e-2, ms=ms, spread_pct=1.0, tflops=80.0 / ms, speedup=1.0 / ms))
    for (M, K, N), phase in (((256, 4096, 8192), "fwd"), ((1, 8192, 8192), "fwd"), ((256, 4096, 8192), "jvp")):
        for impl, ms in (("eager", 0.05), ("fusedad", 0.04), ("cublaslt", 0.045)):
            fl = layers.layer_flops(M, K, N, phase)
            nb = layers.layer_bytes(M, K, N, phase, 2, "gelu_tanh")
            row = dict(suite="layers", case=f"M{M} K{K} N{N}", M=M, K=K, N=N, dtype="bf16", activation="gelu_tanh",
                       phase=phase, impl=impl, status="ok", rel_err=1e-3, tol=2e-2, ms=ms, spread_pct=2.0,
                       **runner.throughput(fl, nb, ms, peaks, "bf16"))
            rows.append(row)
        runner.vs_eager(rows[-3:], "ms", "speedup", invert=True)
    rows.append(dict(rows[-1], impl="compile", status="ERROR: BackendCompilerFailed: x", ms=None, tflops=None,
                     gbps=None, speedup=None))
    for act in ("gelu", "none"):
        for impl, ms, graph in (("eager", 0.2, 0.15), ("fusedad:linear_bwd", 0.1, 0.08), ("floor", 0.08, 0.07)):
            rows.append(dict(suite="backward", case="net3-l0 M256 K4096 N8192", M=256, K=4096, N=8192, dtype="bf16",
                             activation=act, phase="bwd", impl=impl, status="ok", rel_err=1e-3, tol=2e-2, ms=ms,
                             graph_status="ok", ms_graph=graph, launch_ms=ms - graph, kernels="linear_bwd",
                             **({"note": "dZ given"} if impl == "floor" else {})))
    for impl, mb in (("eager", 300.0), ("fusedad", 250.0), ("planted-mismatch", None)):
        rows.append(dict(suite="memory", case="Net3 training step", dtype="bf16", activation="relu", phase="fwd+bwd",
                         impl=impl, status="ok" if mb else "FAIL", rel_err=1e-3 if mb else 0.1, tol=2e-2,
                         peak_mb=mb, step_mb=mb and mb / 2, mem_vs_eager=mb and mb / 300))
    return {"env": env, "peaks": peaks, "plan": report.plan_record(p), "rows": rows}


def test_cuda_report_and_plots_from_synthetic_rows(tmp_path):
    from bench import plots

    results = _synthetic_cuda_results()
    written = plots.write_plots(results, tmp_path)
    assert set(written) == {"modes.png", "speedup-bf16.png", "roofline-bf16.png", "memory.png", "backward-bf16.png",
                            "correctness.png"}
    for name in written:
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    text = report.console_report(results)
    assert "TFLOP/s" in text and "× eager" in text and "% bw" in text and "% mm" in text
    assert "measured peaks: GEMM 8192x8192x8192 TFLOP/s: bf16 700" in text
    md = report.markdown_report(dict(results, plots=written))
    assert "![roofline-bf16.png](roofline-bf16.png)" in md and "ERROR: BackendCompilerFailed" in md
    layer = [r for r in results["rows"] if r["suite"] == "layers" and r["impl"] == "fusedad"][0]
    assert layer["speedup"] == pytest.approx(0.05 / 0.04)
    assert "| 250 | 125 | 0.83 |" in md  # memory: peak MiB, step MiB, step × eager
    # backward: the graph columns and the note are shown (they are set), in the layers table they are not
    assert "| impl | status | rel err | ms | graph ms | launch ms | graph |" in md and "| dZ given |" in md
    layers_md = md.split("## layers", 1)[1].split("## ", 1)[0]
    assert "graph ms" not in layers_md and "note" not in layers_md


def test_json_is_strict_and_records_field_meanings(tmp_path):
    results = _synthetic_cuda_results()
    results["rows"].append(dict(results["rows"][0], rel_err=math.nan, ms=math.inf))
    report.write(results, tmp_path)
    data = _strict_json(tmp_path / "results.json")
    assert (tmp_path / "results.md").read_text().startswith("# fusedad benchmark")
    assert data["rows"][-1]["rel_err"] is None and data["rows"][-1]["ms"] is None
    assert {"speedup", "mode", "phase", "step_mb"} <= set(data["fields"])  # common ones and each suite's
    assert data["plan"]["settings"]["layers"]["dtypes"] == ["bf16"]


def test_cli_help_and_options_apply_to_every_suite_that_has_the_setting():
    text = cli.build_parser().format_help()
    for word in ("--quick", "--suite", "--dtype", "--activation", "--phase", "--impl", "--shape", "--rounds",
                 "--rep-ms", "--graph-max-m", "--out", "do_bench", "FAIL", *(f"  {s.name:8s} " for s in SUITES.values())):
        assert word in text
    assert "--plant-mismatch" not in text  # a test hook, hidden
    args = cli.build_parser().parse_args(["--quick", "--dtype", "fp16", "--impl", "fusedad", "--shape", "2x3x4"])
    p = cli.plan_from_args(args, "cpu")
    assert p.suites == ("modes", "layers", "memory", "backward", "forward", "lm-head", "mlp", "model")
    assert all(s["dtypes"] == (torch.float16,) for s in p.settings.values())
    assert p.impls == ("eager", "fusedad") and p.settings["layers"]["shapes"] == (plan.Shape(2, 3, 4),)
    assert p.settings["memory"]["net3"] == impls.TINY_NET3 and "shapes" not in p.settings["memory"]
    assert cli.plan_from_args(cli.build_parser().parse_args(["--suite", "memory"]), "cpu").suites == ("memory",)
    graphs = cli.plan_from_args(cli.build_parser().parse_args(["--graph-max-m", "0"]), "cuda").settings
    assert graphs["layers"]["graph_max_m"] == graphs["backward"]["graph_max_m"] == 0 and "graph_max_m" not in graphs[
        "modes"]
    assert plan.make_plan("cuda", False).settings["layers"]["graph_max_m"] == 0  # layers: no graphs unless asked
    with pytest.raises(ValueError, match="MxKxN"):
        plan.Shape.parse("2x3")


def test_a_new_suite_is_one_registration(tmp_path, monkeypatch, capsys):
    """A suite defined here, registered through the interface and nothing else, is in --help and --suite,
    takes --dtype, runs (checked, then timed), and has its table in the console and results.md, its
    fields in results.json and its plot."""
    from bench import plots

    def preset(device, quick):
        return {"dtypes": (torch.float32,), "sizes": (3, 5)}

    def cases(settings, plan_):
        for n in settings["sizes"]:
            for dtype in settings["dtypes"]:
                x = torch.arange(n, dtype=dtype)
                yield runner.Case({"case": f"sum of {n}", "dtype": plan.DTYPE_NAMES[dtype], "n": n}, dtype,
                                  lambda x=x: {"eager": lambda: (lambda: (x.sum(),)),
                                               "fusedad": lambda: (lambda: (x.flip(0).sum(),))})

    def plot(rows, results, out_dir):
        plots.bar_chart(out_dir / "sums.png", results["env"], "sums", [("all", rows)], lambda r: r["case"],
                        lambda r: r.get("ms"), "ms")
        return ["sums.png"]

    monkeypatch.setattr("bench.suites.SUITES", dict(SUITES))  # the registry as it was, after the test
    register(Suite(name="sums", title="sums — a suite defined in a test", help="sums of a vector, to test the "
                   "suite interface", preset=preset, cases=cases, plot=plot, fields={"n": "vector length"},
                   columns=lambda perf: [("case", "case"), ("dtype", "dtype"), *report.timed_columns(perf)]))
    assert "  sums     sums of a vector, to test the suite interface" in cli.build_parser().format_help()
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # main() may set it
    out = tmp_path / "out"
    argv = ["--suite", "sums", "--dtype", "fp16", "--rounds", "2", "--device", "cpu", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "-- sums — a suite defined in a test" in text and re.search(r"sum of 5\s+fp16\s+fusedad\s+ok", text)
    results = _strict_json(out / "results.json")
    assert [(r["suite"], r["case"], r["dtype"], r["impl"], r["status"]) for r in results["rows"]] == [
        ("sums", f"sum of {n}", "fp16", impl, "ok") for n in (3, 5) for impl in ("eager", "fusedad")]
    assert all(len(r["round_ms"]) == 2 for r in results["rows"])
    assert results["fields"]["n"] == "vector length" and results["fields"]["suite"] == "sums"
    assert results["plots"] == ["sums.png", "correctness.png"]
    assert (out / "sums.png").read_bytes().startswith(PNG_SIGNATURE)
    md = (out / "results.md").read_text()
    assert "## sums — a suite defined in a test" in md and "| sum of 3 | fp16 | fusedad | ok |" in md


def test_a_suite_file_dropped_into_bench_suites_is_registered(tmp_path):
    """The registry imports every module of bench/suites/: a new file there is all a suite needs (here
    in a copy of bench/, so the checkout stays as it is)."""
    shutil.copytree(REPO / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__", "out"))
    (tmp_path / "bench" / "suites" / "extra.py").write_text(
        "from . import Suite\n"
        "SUITE = Suite(name='extra', title='extra', help='a suite in its own file', preset=lambda d, q: {},\n"
        "              cases=lambda settings, plan: [], columns=lambda perf: [])\n")
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"suites:\n  modes .*\n  layers .*\n  memory .*\n  backward .*\n  extra    a suite in its own "
                     r"file\n",
                     proc.stdout.replace("\n           ", " ")), proc.stdout




def test_overhead_script_runs():
    """bench.overhead measures fusedad vs nn.Linear per call (here: few rounds, values not judged)."""
    from bench import overhead

    result = overhead.measure("cpu", rounds=2, calls=3)
    assert set(result) == {"forward (no_grad)", "forward (recording)", "forward+backward"}
    assert all(a > 0 and b > 0 and floor > 0 for a, b, floor in result.values())  # + the Function floor


def test_overhead_shape_option_sets_the_layer(tmp_path, monkeypatch):
    """--shape IN OUT BATCH: the layer and batch measured (1 1 1: host time against host time)."""
    from bench import overhead

    seen = []
    real = overhead.measure
    monkeypatch.setattr(overhead, "measure", lambda *a, **k: seen.append(a) or real(*a, **k))
    out = tmp_path / "o.json"
    overhead.main(["--device", "cpu", "--shape", "3", "2", "5", "--rounds", "1", "--calls", "2", "--json", str(out)])
    assert seen == [("cpu", 3, 2, 5)]
    assert "Linear(3, 2) + GELU, batch 5" in json.loads(out.read_text())["what"]


def test_overhead_launcher_mode_runs_the_launch_path_with_every_launch_stubbed(tmp_path):
    """--launcher: fusedad's CUDA launch path on CPU tensors (the launch log shows the rows it picked),
    no Triton kernel run, and everything it patched put back afterwards."""
    import importlib

    from bench import overhead
    from fusedad.kernels import linear as launcher
    from fusedad.kernels import record_launches, variants

    backend = importlib.import_module("fusedad.backend")
    before = (launcher.INTERPRETER, launcher._device_name, variants.VARIANTS, variants.num_sms, backend._CPU)
    with overhead.stubbed_launcher(str(tmp_path)):
        assert not launcher.INTERPRETER and all(v.kernel is None or isinstance(v.kernel, overhead._NoLaunch)
                                                for v in variants.VARIANTS)
        layer = fusedad.nn.Linear(64, 64, activation="gelu")
        with record_launches() as log:
            layer(torch.randn(8, 64, requires_grad=True)).sum().backward()
    # (batch 8, K = 64: the decode path's plan has one split — one launch of the pointer kernel)
    assert [launch.kernel for launch in log] == ["linear_fwd", "linear_dz", "linear_bwd"]
    assert (launcher.INTERPRETER, launcher._device_name, variants.VARIANTS, variants.num_sms, backend._CPU) == before


# --- CUDA-graph timing, on the CPU with a fake capture ----------------------------------------------


def _fake_capture(bake=False, write=True, raises=None):
    """A stand-in for ``runner.capture_graph``: static outputs, and a replay that re-runs fn into them
    (what a real graph does) — or, planted bugs, one that copies the values seen at capture time
    (``bake``), writes nothing (``write=False``), or a capture that raises."""
    def capture(fn, stream):
        if raises:
            raise RuntimeError(raises)
        outs = tuple(t.clone() for t in fn())
        baked = tuple(t.clone() for t in outs)

        class Graph:
            def replay(self):
                if write:
                    for o, n in zip(outs, baked if bake else fn()):
                        o.copy_(n)
        return Graph(), outs
    return capture


def _graph_case(builders, **kw):
    meta = {"case": "fake", "M": 2, "K": 3, "N": 4, "dtype": "fp32", "activation": "none", "phase": "bwd"}
    return runner.Case(meta, torch.float32, lambda: builders, graph=True, **kw)


def _run_with_fake_graphs(monkeypatch, builders, capture):
    """run_timed of a graph case on the CPU, with capture_graphs taking its CUDA path on a fake capture."""
    real = runner.capture_graphs
    monkeypatch.setattr(runner, "capture_graph", capture)
    monkeypatch.setattr(runner, "_synchronize", lambda: None)
    monkeypatch.setattr(runner, "capture_graphs", lambda fns, b, dtype, device, stream: real(fns, b, dtype, "cuda",
                                                                                              stream))
    return {r["impl"]: r for r in runner.run_timed(_graph_case(builders), _tiny_plan(rounds=2), None)}


def _graph_builders():
    """eager and two candidates computing 2·x from the same input x; refresh() draws a new x."""
    x = torch.randn(8, 4)
    builds = {name: (lambda: (lambda: (2 * x,))) for name in ("eager", "fusedad", "fusedad:other")}
    return runner.Builders(builds, refresh=lambda: x.copy_(torch.randn_like(x)))


def test_graph_replays_are_checked_then_timed_with_the_plain_calls(monkeypatch):
    rows = _run_with_fake_graphs(monkeypatch, _graph_builders(), _fake_capture())
    for name in ("eager", "fusedad", "fusedad:other"):
        r = rows[name]
        assert (r["status"], r["graph_status"], r["graph_rel_err"]) == ("ok", "ok", 0.0)
        assert len(r["round_ms_graph"]) == 2 and r["ms_graph_min"] <= r["ms_graph"] <= r["ms_graph_max"]
        assert r["launch_ms"] == pytest.approx(r["ms"] - r["ms_graph"])
    assert cli.fusedad_failures(list(rows.values())) == []


@pytest.mark.parametrize("bug, expected", [("bake", "FAIL"), ("no-write", "FAIL"), ("raises", "ERROR")])
def test_a_wrong_graph_replay_is_fail_or_error_and_a_fusedad_failure(monkeypatch, bug, expected):
    """A replay that returns values from capture time (the refresh exposes it), one that leaves its
    outputs unwritten (NaN-filled first), and a capture that raises: the plain row stays ok (its time
    is valid), the graph is not timed, and the run's exit status counts it as a fusedad failure."""
    capture = _fake_capture(bake=bug == "bake", write=bug != "no-write", raises="capture failed" if bug == "raises"
                            else None)
    rows = _run_with_fake_graphs(monkeypatch, _graph_builders(), capture)
    r = rows["fusedad"]
    assert r["status"] == "ok" and "ms" in r
    assert r["graph_status"].startswith(expected) and "ms_graph" not in r
    assert runner.graph_failed(r) and r in cli.fusedad_failures(list(rows.values()))


def test_without_cuda_graph_rows_say_skipped_and_the_columns_show_only_where_set():
    rows = runner.run_timed(_graph_case(_graph_builders()), _tiny_plan(rounds=1), None)
    assert {r["graph_status"] for r in rows} == {runner.GRAPH_NO_GPU} and not cli.fusedad_failures(rows)
    cols = report.timed_columns(False)
    assert "skipped (no GPU)" in report.text_table(rows, cols).splitlines()[2]
    plain = runner.run_timed(_fake_case({"eager": lambda: (lambda: (torch.ones(2),))}), _tiny_plan(rounds=1), None)
    assert "graph" not in report.text_table(plain, cols) and "graph" not in report.markdown_table(plain, cols)


def test_a_reference_build_is_checked_on_its_part_of_eager_outputs():
    ref = (torch.randn(3), torch.randn(3), torch.randn(3))
    builders = {"eager": lambda: (lambda: ref),
                "floor": runner.reference_build(lambda: (lambda: ref[:2]), lambda r: r[:2], "part only"),
                "wrong": runner.reference_build(lambda: (lambda: (ref[1], ref[0])), lambda r: r[:2], "part only")}
    rows = {r["impl"]: r for r in runner.run_timed(_fake_case(builders), _tiny_plan(rounds=1), None)}
    assert (rows["floor"]["status"], rows["floor"]["note"]) == ("ok", "part only")
    assert rows["wrong"]["status"] == "FAIL"


# --- the backward suite ------------------------------------------------------------------------------


def _backward_plan(**kw):
    p = _tiny_plan(rounds=1, **kw)
    p.settings = {"backward": dict(backward.preset("cpu", False), shapes=(plan.Shape(4, 16, 8),),
                                   activations=("gelu_tanh",), graph_max_m=4)}
    return p


def test_backward_suite_runs_every_bwd_variant_of_the_table_eager_and_the_floor():
    rows = {r["impl"]: r for r in runner.run_suite(SUITES["backward"], _backward_plan(plant_mismatch=True), None,
                                                   progress=False)}
    names = [v.name for v in backward.bwd_variants()]
    assert {"linear_bwd", "linear_bwd_prologue"} <= set(names)
    assert list(rows) == ["eager", *(plan.VARIANT_IMPL.format(n) for n in names), "floor", "planted-mismatch"]
    for name in names:
        r = rows[plan.VARIANT_IMPL.format(name)]
        assert r["status"] == "ok" and r["variant"] == name and name in r["kernels"].split("+"), r
        assert r["graph_status"] == runner.GRAPH_NO_GPU
    assert rows["fusedad:linear_bwd"]["kernels"] == "linear_dz+linear_bwd"  # the dZ pass, then the GEMMs
    assert rows["fusedad:linear_bwd_prologue"]["kernels"] == "linear_bwd_prologue"  # one launch
    assert rows["floor"]["status"] == "ok" and rows["floor"]["note"] == backward.FLOOR_NOTE
    assert rows["planted-mismatch"]["status"] == "FAIL" and "ms" not in rows["planted-mismatch"]


def test_backward_suite_reports_a_variant_that_did_not_run_as_error(monkeypatch):
    """variants.select falls back to the default when a forced variant's predicate does not apply: the
    row must be an ERROR, not the default's time under the other name."""
    from fusedad.kernels import variants

    real = variants.select
    monkeypatch.setattr(variants, "select", lambda direction, problem, **kw: real(direction, problem, **kw)
                        if direction != "bwd" else variants.by_name("linear_bwd"))
    rows = {r["impl"]: r for r in runner.run_suite(SUITES["backward"], _backward_plan(), None, progress=False)}
    assert rows["fusedad:linear_bwd"]["status"] == "ok"
    assert rows["fusedad:linear_bwd_prologue"]["status"].startswith("ERROR: RuntimeError: variants.use(")
    assert "predicate does not apply" in rows["fusedad:linear_bwd_prologue"]["status"]


def _forward_plan(shapes, acts=("gelu_tanh",), **kw):
    p = _tiny_plan(rounds=1, **kw)
    p.settings = {"forward": dict(forward.preset("cpu", False), shapes=shapes, activations=acts)}
    return p


def test_forward_suite_runs_every_applicable_fwd_variant_f_linear_eager_and_the_copy():
    """A decode case runs every forward variant of the table (split-K included: its own launch pair, K
    spanning two splits), a larger one every variant but split-K; F.linear and, at decode, the weight
    copy beside them."""
    shapes = (plan.Shape(1, 80, 16), plan.Shape(24, 32, 16))
    rows = runner.run_suite(SUITES["forward"], _forward_plan(shapes, plant_mismatch=True), None, progress=False)
    names = [v.name for v in forward.fwd_variants()]
    assert {"linear_fwd", "linear_fwd_tma", "linear_fwd_tma_persistent", "linear_fwd_tma_ws",
            "linear_fwd_splitk", "linear_fwd_torch"} == set(names)
    for M in (1, 24):
        sub = {r["impl"]: r for r in rows if r["M"] == M}
        ran = [n for n in names if M == 1 or n != "linear_fwd_splitk"]
        assert sub["eager"]["variants"] == "+".join(ran)
        assert list(sub) == ["eager", *(plan.VARIANT_IMPL.format(n) for n in ran), "F.linear",
                             *(["copy"] if M == 1 else []), "planted-mismatch"]
        for n in ran:
            r = sub[plan.VARIANT_IMPL.format(n)]
            assert r["status"] == "ok" and r["variant"] == n and r["phase"] == "fwd", r
            assert r["kernels"] == ("linear_fwd_splitk+linear_fwd_splitk_reduce" if n == "linear_fwd_splitk" else n)
        assert sub["F.linear"]["status"] == "ok" and sub["F.linear"]["note"] == forward.LINEAR_NOTE
        assert sub["planted-mismatch"]["status"] == "FAIL" and "ms" not in sub["planted-mismatch"]
    copy = next(r for r in rows if r["impl"] == "copy")
    assert copy["status"] == "ok" and copy["note"] == forward.COPY_NOTE
    assert all("pct_copy" not in r for r in rows)  # a CPU run: no bandwidth figure


def test_forward_suite_reports_a_variant_that_did_not_run_as_error(monkeypatch):
    from fusedad.kernels import variants

    real = variants.select
    monkeypatch.setattr(variants, "select", lambda direction, problem, **kw: real(direction, problem, **kw)
                        if direction != "fwd" else variants.by_name("linear_fwd"))
    rows = {r["impl"]: r for r in runner.run_suite(SUITES["forward"], _forward_plan((plan.Shape(24, 32, 16),)),
                                                   None, progress=False)}
    assert rows["fusedad:linear_fwd"]["status"] == "ok"
    assert rows["fusedad:linear_fwd_tma"]["status"].startswith("ERROR: RuntimeError: variants.use(")


def test_forward_copy_fraction_is_each_rows_bandwidth_over_the_copys():
    rows = [dict(impl="copy", status="ok", ms=0.1, gbps=1.0, tflops=1.0),
            dict(impl="F.linear", status="ok", ms=0.08, gbps=1.0),
            dict(impl="fusedad:linear_fwd_splitk", status="ok", ms=0.1, gbps=0.75 * 2000.0),
            dict(impl="fusedad:linear_fwd", status="FAIL")]
    weight_bytes = 1e8
    forward.with_copy_fraction(rows, weight_bytes)
    assert rows[0]["gbps"] == pytest.approx(2 * weight_bytes / 0.1 / 1e6) and rows[0]["tflops"] is None
    assert rows[0]["pct_copy"] == pytest.approx(100.0)
    assert rows[2]["pct_copy"] == pytest.approx(75.0)
    assert "pct_copy" not in rows[3]


def test_forward_preset_is_the_protocol_plan(monkeypatch):
    from fusedad.kernels import variants

    # The plan as an H100 builds it: the split-K row applies where its plan (decode tile, 132 SMs) splits K.
    monkeypatch.setattr(variants, "_INTERPRETER", False)
    monkeypatch.setattr(variants, "num_sms", lambda problem: 132)
    cuda = forward.preset("cuda", False)
    assert [(s.M, s.K, s.N) for s in cuda["shapes"]] == [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096),
                                                         (256, 4096, 8192), (1, 8192, 8192), (16, 8192, 8192)]
    assert cuda["activations"] == ("gelu_tanh", "none") and cuda["dtypes"] == (torch.bfloat16,)
    cases = list(forward.cases(cuda, plan.make_plan("cuda", False)))
    assert len(cases) == 12 and not any(c.graph for c in cases)
    # every TMA variant (and torch's row) applies to the protocol's (aligned, bf16) shapes; split-K to the
    # decode ones only
    for c in cases:
        tma = {"linear_fwd", "linear_fwd_tma", "linear_fwd_tma_persistent", "linear_fwd_tma_ws", "linear_fwd_torch"}
        assert set(c.meta["variants"].split("+")) == tma | ({"linear_fwd_splitk"} if c.meta["M"] <= 16 else set())


def test_backward_preset_is_the_protocol_plan():
    cuda = backward.preset("cuda", False)
    assert [(s.M, s.K, s.N) for s in cuda["shapes"]] == [(256, 4096, 8192), (8192, 4096, 14336)]
    assert cuda["activations"] == ("gelu", "gelu_tanh", "silu", "relu", "none")
    assert cuda["dtypes"] == (torch.bfloat16,) and cuda["graph_max_m"] == 256
    graphs = [c.graph for c in backward.cases(cuda, plan.make_plan("cuda", False))]
    assert graphs == [True] * 5 + [False] * 5


def test_model_suite_runs_on_cpu_and_reports_every_field():
    """The model suite on the tiny CPU model: eager and fusedad.convert agree (loss and every gradient);
    the converted step fuses the MLP blocks' and the head's FLOPs (counted from the module tree), saves
    less for backward, and its loss equals eager's; a planted mismatch is FAIL and never measured."""
    from bench.suites import model

    p = plan.make_plan("cpu", True, ["model"])
    p.rounds, p.plant_mismatch = 1, True
    (case,) = model.cases(p.settings["model"], p)
    rows = {r["impl"]: r for r in model.run(case, p, None)}
    assert list(rows) == ["eager", "fusedad", "planted-mismatch"]
    eager, fused = rows["eager"], rows["fusedad"]
    assert eager["status"] == fused["status"] == "ok" and fused["rel_err"] <= fused["tol"]
    assert rows["planted-mismatch"]["status"] == "FAIL" and "saved_mb" not in rows["planted-mismatch"]
    shape = model.CPU_SHAPES[0]
    K, I, V, L = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    kv = K * shape.kv_heads // shape.heads
    attn, mlp, head = 2 * K * K + 2 * K * kv, 3 * K * I, K * V
    assert eager["fused_flop_frac"] == 0.0
    assert fused["fused_flop_frac"] == pytest.approx((L * mlp + head) / (L * (attn + mlp) + head))
    assert fused["linear_gflop"] == eager["linear_gflop"] == pytest.approx(6 * shape.tokens * (L * (attn + mlp) + head) / 1e9)
    assert 0 < fused["saved_mb"] < eager["saved_mb"] and fused["saved_vs_eager"] < 1
    assert eager["largest_mb"] >= shape.tokens * V * 4 / 2**20  # eager materialises the fp32 logits
    assert fused["largest_mb"] > 0 and fused["largest_op"]
    assert fused["loss_rel_err"] < 1e-5 and eager["loss_rel_err"] == 0.0
    assert fused["ms"] > 0 and "speedup" not in fused  # CPU: not a performance figure
    cols = [h for h, _ in SUITES["model"].columns(False)]
    assert {"fused FLOP", "saved MiB", "largest MiB", "loss", "ms*"} <= set(cols)
    assert set(SUITES["model"].fields) >= {"fused_flop_frac", "saved_mb", "largest_mb", "loss_rel_err"}


def test_model_suite_without_transformers_says_skipped_and_fails_nothing(monkeypatch):
    """Installed with the bench extra only (no transformers), the model suite's rows say what is missing
    and how to get it; the run's exit status and the protocol's count do not take them as failures."""
    import importlib.util

    from bench import cli, protocol
    from bench.suites import model

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real_find_spec(name, *a))
    p = plan.make_plan("cpu", True, ["model"])
    (case,) = model.cases(p.settings["model"], p)
    rows = model.run(case, p, None)
    assert [r["impl"] for r in rows] == ["eager", "fusedad"]
    assert all(r["status"] == 'skipped (needs transformers: the test extra)' for r in rows)
    assert cli.fusedad_failures(rows) == []
    assert protocol.results_detail({"rows": rows}, "model").endswith("fusedad not ok: 0")
    # (a FAIL or ERROR still counts)
    failed = [dict(rows[1], status="ERROR: RuntimeError: boom")]
    assert cli.fusedad_failures(failed) == failed
    assert protocol.results_detail({"rows": failed}, "model").endswith("fusedad not ok: 1")


def test_model_suite_cuda_preset_is_a_llama_8b_layer_shape():
    from bench.suites import model

    (shape,) = model.preset("cuda", False)["models"]
    assert (shape.hidden, shape.intermediate, shape.vocab, shape.tokens) == (4096, 14336, 128256, 8192)
    assert shape.layers in (1, 2) and model.preset("cuda", False)["dtypes"] == (torch.bfloat16,)


# --- bench/gpu_run.sh and its dry run ------------------------------------------------------------------

GPU_RUN = REPO / "bench" / "gpu_run.sh"
DRY_RUN_STEPS = {"setup": "PASS", "pytest": "skipped (no GPU)", "backward": "PASS", "forward": "PASS",
                 "train": "PASS", "mlp": "PASS",
                 "memcheck": "skipped (no GPU)", "memcheck-alt-bwd": "skipped (no GPU)", "sanitize-cpu": "PASS",
                 "overhead": "PASS", "lm-head": "PASS", "model": "PASS"}


def test_gpu_run_script_parses_and_has_help():
    subprocess.run(["bash", "-n", str(GPU_RUN)], check=True)
    text = subprocess.run(["bash", str(GPU_RUN), "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("--dry-run", "OUT=", "PYTEST_LIMIT", "BACKWARD_LIMIT", "FORWARD_LIMIT", "TRAIN_LIMIT", "MEMCHECK_LIMIT",
                 "OVERHEAD_LIMIT", "LM_HEAD_LIMIT", "MLP_LIMIT", "MODEL_LIMIT", "TOTAL_LIMIT", "FUSEDAD_AUTOTUNE"):
        assert word in text
    assert not (REPO / "bench" / "gpu_check.sh").exists()  # one script


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``bash bench/gpu_run.sh --dry-run`` as a GPU session would run it (OUT=...), here on the CPU."""
    if torch.cuda.is_available():
        pytest.skip("the dry run's expectations are those of a machine without a GPU")
    out = tmp_path_factory.mktemp("gpu-run")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDAD_POISON_OUTPUTS")}
    status_before = _git("status", "--porcelain")
    proc = subprocess.run(["bash", str(GPU_RUN), "--dry-run"], cwd=REPO, env=dict(env, OUT=str(out), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=900)
    assert (out / "summary.json").exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    proc.git_status = (status_before, _git("status", "--porcelain"))
    return proc, out, _strict_json(out / "summary.json")


def test_dry_run_passes_and_records_every_step(dry_run):
    proc, _, summary = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert {s["step"]: s["status"] for s in summary["steps"]} == DRY_RUN_STEPS
    assert summary["dry_run"] is True and summary["failed"] == [] and summary["performance_figures"] is False


def test_dry_run_writes_few_flat_files_the_device_tool_takes_back(dry_run):
    _, out, _ = dry_run
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries) and len(entries) <= 9
    assert {p.name for p in entries} == {"summary.md", "summary.json", "pytest.log", "steps.log", "memcheck.log",
                                         "backward.json", "forward.json", "train.json", "lm_head.json"}
    for p in entries:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size < 16 * 2**20


def test_dry_run_prints_the_summary_table_last_and_shows_skips(dry_run):
    proc, out, _ = dry_run
    tail = proc.stdout.rstrip().splitlines()
    assert tail[-1] == "result: every step PASS or skipped"
    table = tail[tail.index(next(ln for ln in tail if ln.startswith("| step "))):-1]
    assert [ln.split("|")[1].strip() for ln in table[2:] if ln.startswith("|")] == list(DRY_RUN_STEPS)
    assert "| pytest           | skipped (no GPU) |" in proc.stdout  # visible, not silent
    assert "**DRY RUN**" in proc.stdout and "not a performance figure" in proc.stdout
    assert (out / "summary.md").read_text() in proc.stdout


def test_dry_run_backward_and_train_step_results(dry_run):
    _, out, summary = dry_run
    rows = _strict_json(out / "backward.json")["rows"]
    impls = ["eager", *(plan.VARIANT_IMPL.format(v.name) for v in backward.bwd_variants()), "floor"]
    cases = {(r["case"], r["activation"]) for r in rows}
    assert len(cases) == 2 * 5 and {a for _, a in cases} == set(backward.ACTS)
    for case in cases:
        sub = [r for r in rows if (r["case"], r["activation"]) == case]
        assert [r["impl"] for r in sub] == impls and all(r["status"] == "ok" for r in sub)
        small = sub[0]["M"] <= backward.CPU_SHAPES[0].M
        assert all((r.get("graph_status") == runner.GRAPH_NO_GPU) == small for r in sub)
    train = _strict_json(out / "train.json")
    assert {r["phase"] for r in train["rows"]} == {"fwd+bwd"} and {r["impl"] for r in train["rows"]} == {
        "eager", "fusedad"}
    assert any(r.get("graph_status") == runner.GRAPH_NO_GPU for r in train["rows"])
    tables = summary["tables"]
    assert len(tables["backward"]) == 10 and len(tables["backward_graph"]) == 5 and len(tables["train"]) == 4
    assert {line["compile"] for line in tables["train"]} == {"not run"}  # visible: compile is not run on CPU
    assert set(tables["overhead"][0]) == {"phase", "nn.Linear µs", "fusedad µs", "added µs", "ratio"}
    assert tables["tuning"] == [] and "no tuning on CPU" in (out / "summary.md").read_text()


def test_dry_run_forward_step_results(dry_run):
    """The forward step: every CPU stand-in shape × (gelu_tanh, none), every applicable variant ok beside
    eager and F.linear (and the copy at decode); its figures reach summary.md/json: the ms table with
    both ratios' columns (n/a where a variant does not apply) and the decode table's % of copy."""
    proc, out, summary = dry_run
    rows = _strict_json(out / "forward.json")["rows"]
    cases = list(dict.fromkeys((r["case"], r["activation"]) for r in rows))
    assert len(cases) == len(forward.CPU_SHAPES) * 2 and {a for _, a in cases} == set(forward.ACTS)
    assert all(r["status"] == "ok" for r in rows)
    decode = {r["case"] for r in rows if r["impl"] == "copy"}
    assert decode == {s.label for s in forward.CPU_SHAPES if s.M <= 16}
    assert {r["impl"] for r in rows} == {"eager", "F.linear", "copy",
                                         *(plan.VARIANT_IMPL.format(v.name) for v in forward.fwd_variants())}
    table, dec = summary["tables"]["forward"], summary["tables"]["forward_decode"]
    assert [(t["shape"], t["act"]) for t in table] == cases and len(dec) == 2 * len(decode)
    for line in table:
        assert line["eager"] and line["F.linear"] and "copy" not in line
        splitk = line["fusedad:linear_fwd_splitk"]
        assert (splitk == "n/a") == (line["shape"] not in decode), line
    assert {f"fusedad:{v.name} % copy" for v in forward.fwd_variants()} | {"copy GB/s", "F.linear % copy"} <= set(dec[0])
    assert "## forward (no_grad" in proc.stdout and "### forward, decode" in proc.stdout


def test_dry_run_lm_head_step_results(dry_run):
    """The lm-head step: both phases, eager and fusedad (and PyTorch's chunked path where the torch has it)
    checked ok; its table reaches summary.md/json."""
    proc, out, summary = dry_run
    rows = _strict_json(out / "lm_head.json")["rows"]
    impls = {"eager", "fusedad", *(("torch-chunked",) if lm_head.HAS_CHUNKED else ())}
    assert {(r["phase"], r["impl"]) for r in rows} == {(p, i) for p in lm_head.PHASES for i in impls}
    assert all(r["status"] == "ok" for r in rows)
    table = summary["tables"]["lm_head"]
    assert [t["phase"] for t in table] == list(lm_head.PHASES)
    assert all(t["eager"] and t["fusedad"] not in ("", "not run") for t in table)
    assert "## LM head" in proc.stdout


def test_dry_run_leaves_the_checkout_as_it_was(dry_run):
    before, after = dry_run[0].git_status
    if before is None:
        pytest.skip("not a git checkout")
    assert after == before


def test_protocol_report_from_cuda_like_results(tmp_path):
    """The summary of a GPU run (synthetic results): ratios, graph tables, failed steps, exit status."""
    def row(case, act, impl, ms, graph=None, status="ok"):
        r = dict(suite="backward", case=case, M=256, K=4096, N=8192, dtype="bf16", activation=act, phase="bwd",
                 impl=impl, status=status, ms=ms)
        if graph is not None:
            r.update(graph_status="ok", ms_graph=graph, launch_ms=ms - graph)
        return r

    rows = [row("net3-l0 M256", "gelu", "eager", 0.20, 0.12), row("net3-l0 M256", "gelu", "fusedad:linear_bwd", 0.10, 0.08),
            row("net3-l0 M256", "gelu", "floor", 0.08, 0.07),
            row("llm-up M8192", "gelu", "eager", 3.3), row("llm-up M8192", "gelu", "fusedad:linear_bwd", 3.0),
            row("llm-up M8192", "gelu", "floor", 2.8, status="ERROR: RuntimeError: x")]
    env = {"performance_figures": True, "device_name": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "backward.json").write_text(json.dumps({"env": env, "rows": rows}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("setup\tPASS\t3\t20\tsteps.log\t\npytest\tTIMEOUT (90 s)\t90\t90\tpytest.log\t\n"
                     "backward\tPASS\t60\t80\tsteps.log\t\n")
    (tmp_path / "pytest.log").write_text("==== pytest (limit 90 s)\n...\n= 120 passed in 89.0s (interrupted) =\n")
    md, summary = protocol.build(tmp_path, protocol.read_steps(steps), "mode: GPU\n", False)
    b = summary["tables"]["backward"]
    assert b[0]["fusedad:linear_bwd × eager"] == "2.00" and b[0]["fusedad:linear_bwd ÷ floor"] == "1.25"
    assert b[1]["floor"] == "ERROR" and b[1]["fusedad:linear_bwd ÷ floor"] == ""
    g = summary["tables"]["backward_graph"]
    assert len(g) == 1 and g[0]["fusedad:linear_bwd graph"] == "0.08" and g[0]["eager launch"] == "0.08"
    assert summary["failed"] == ["pytest"] and md.rstrip().endswith("result: NOT OK: pytest")
    assert "forward" not in summary["tables"]  # no forward.json: no forward table
    detail = {s["step"]: s["detail"] for s in summary["steps"]}
    assert detail["pytest"] == "120 passed in 89.0s (interrupted)" and "no train.json" not in md
    assert detail["backward"] == "6 rows: 1 ERROR, 5 ok; graphs: 3 ok; fusedad not ok: 0"


def test_protocol_report_shows_the_tuners_choices(tmp_path):
    """A tuned train step (synthetic results): the summary lists, per key, the row kept and its margin;
    an untuned one says why there is no table."""
    tuned_row = {"device": "NVIDIA H100 80GB HBM3", "launch": "fwd", "M bucket": 256, "N": 8192, "K": 4096,
                 "dtype": "bfloat16", "flags": "ACT=0 HAS_BIAS=0 STORE_Z=0", "picked": "linear_fwd_torch",
                 "picked_ms": 0.05, "runner_up": "linear_fwd_tma 128x128x64/w8s3", "runner_up_ms": 0.06,
                 "margin": 1.2, "torch_ms": 0.05, "best_triton_ms": 0.06, "triton_over_torch": 1.2, "timed": 11,
                 "failed": 0}
    env = {"performance_figures": True, "device_name": "NVIDIA H100 80GB HBM3"}
    steps = tmp_path / "steps.tsv"
    steps.write_text("train\tPASS\t50\t55\tsteps.log\t\n")
    for tuning, expect in (({"note": "", "rows": [tuned_row]}, "| fwd | ACT=0 HAS_BIAS=0 STORE_Z=0 | 256 |"),
                           ({"note": "autotuning off (FUSEDAD_AUTOTUNE=0): the heuristic rows ran", "rows": []},
                            "FUSEDAD_AUTOTUNE=1 bash bench/gpu_run.sh")):
        (tmp_path / "train.json").write_text(json.dumps({"env": env, "rows": [], "tuning": tuning}))
        md, summary = protocol.build(tmp_path, protocol.read_steps(steps), "mode: GPU\n", False)
        assert "### train step: tuner choices" in md and expect in md
        assert len(summary["tables"]["tuning"]) == len(tuning["rows"])
    assert summary["tables"]["tuning"] == []


def test_protocol_report_from_cuda_like_forward_results(tmp_path):
    """The forward tables of a GPU run (synthetic rows): both ratios, n/a for a variant that does not
    apply, the decode table's copy GB/s and % of copy."""
    def row(case, M, impl, ms, pct=None, status="ok", variants="linear_fwd+linear_fwd_tma+linear_fwd_splitk"):
        r = dict(suite="forward", case=case, M=M, K=8192, N=8192, dtype="bf16", activation="gelu_tanh", phase="fwd",
                 impl=impl, status=status, ms=ms, variants=variants)
        if pct is not None:
            r.update(pct_copy=pct, gbps=pct * 30.0)
        return r

    big = "linear_fwd+linear_fwd_tma"
    rows = [row("llm M8192", 8192, "eager", 0.44, variants=big), row("llm M8192", 8192, "fusedad:linear_fwd", 0.5,
                                                                    variants=big),
            row("llm M8192", 8192, "fusedad:linear_fwd_tma", 0.4, variants=big),
            row("llm M8192", 8192, "F.linear", 0.4, variants=big),
            row("decode M1", 1, "eager", 0.07, 70), row("decode M1", 1, "fusedad:linear_fwd", 0.1, 49),
            row("decode M1", 1, "fusedad:linear_fwd_tma", 0.2, status="ERROR: RuntimeError: x"),
            row("decode M1", 1, "fusedad:linear_fwd_splitk", 0.07, 70), row("decode M1", 1, "F.linear", 0.07, 70),
            dict(row("decode M1", 1, "copy", 0.1), gbps=3000.0)]
    env = {"performance_figures": True, "device_name": "NVIDIA H100 80GB HBM3"}
    (tmp_path / "forward.json").write_text(json.dumps({"env": env, "rows": rows}))
    steps = tmp_path / "steps.tsv"
    steps.write_text("forward\tPASS\t40\t60\tsteps.log\t\n")
    md, summary = protocol.build(tmp_path, protocol.read_steps(steps), "mode: GPU\n", False)
    f = {t["shape"]: t for t in summary["tables"]["forward"]}
    assert f["llm M8192"]["fusedad:linear_fwd_tma × F.linear"] == "1.00"
    assert f["llm M8192"]["fusedad:linear_fwd_tma × eager"] == "1.10"
    assert f["llm M8192"]["fusedad:linear_fwd × F.linear"] == "0.80"
    assert f["llm M8192"]["fusedad:linear_fwd_splitk"] == "n/a" == f["llm M8192"]["fusedad:linear_fwd_splitk × eager"]
    assert f["decode M1"]["fusedad:linear_fwd_tma"] == "ERROR" and f["decode M1"]["fusedad:linear_fwd_splitk"] == "0.07"
    (d,) = summary["tables"]["forward_decode"]
    assert d["copy GB/s"] == "3000" and d["fusedad:linear_fwd_splitk % copy"] == "70"
    assert d["fusedad:linear_fwd % copy"] == "49" and d["fusedad:linear_fwd_tma % copy"] == "ERROR"
    assert "### forward, decode" in md and summary["failed"] == []


def test_notes_prediction_template_lists_every_figure_the_protocol_prints():
    """bench/NOTES.md's template has a row for every (shape, activation) the protocol times and a column
    for every implementation, so predictions can be written before a run."""
    notes = (REPO / "bench" / "NOTES.md").read_text()
    section = notes.split("## GPU protocol (bench/gpu_run.sh)", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    for shape in backward.preset("cuda", False)["shapes"]:
        for act in backward.ACTS:
            assert any(f"| {shape.label} | {act} |" in ln for ln in lines), (shape.label, act)
    heads = " ".join(ln for ln in lines if ln.startswith("| shape"))
    for impl in ("eager", *(plan.VARIANT_IMPL.format(v.name) for v in backward.bwd_variants()), "floor", "compile"):
        assert impl in heads, impl
    for step in ("pytest", "backward", "forward", "train", "memcheck", "memcheck-alt-bwd", "overhead", "lm-head",
                 "model"):
        assert f"| {step} |" in section, step
    for shape in lm_head.preset("cuda", False)["shapes"]:  # Table L: both phases predicted
        for phase in lm_head.PHASES:
            assert any(f"| {shape.label} | {phase} |" in ln for ln in lines), phase
    # The forward step's tables: every (shape, activation) in the ms table (its header names every variant
    # and both references), the ratio table and, for the decode shapes, the % of copy table.
    cuda = forward.preset("cuda", False)
    names = [plan.VARIANT_IMPL.format(v.name) for v in forward.fwd_variants()]
    tables = section.split("Table F — forward", 1)[1].split("Table O", 1)[0].split("Table F-")
    ms, ratios, decode = tables[0], tables[1], tables[2]
    for shape in cuda["shapes"]:
        for act in forward.ACTS:
            for table in (ms, ratios) + ((decode,) if shape.M <= 16 else ()):
                assert f"| {shape.label} | {act} |" in table, (shape.label, act)
    head = next(ln for ln in ms.splitlines() if ln.startswith("| shape"))
    assert all(f" {impl} |" in head for impl in ("eager", "F.linear", *names)), head
    head = next(ln for ln in decode.splitlines() if ln.startswith("| shape"))
    assert "copy GB/s" in head and all(f"{impl} % copy" in head for impl in ("F.linear", *names)), head

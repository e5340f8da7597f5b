"""The summary of ``bench/gpu_run.sh`` (the GPU timing protocol): ``summary.md`` and ``summary.json``.

    python -m bench.protocol report --out OUT --steps STEPS.tsv [--env ENV.txt] [--overhead JSON] [--dry-run]

Reads what the protocol's steps wrote into OUT (backward.json, forward.json, train.json, lm_head.json, pytest.log,
steps.log, memcheck.log) and the step records (STEPS.tsv: name, status, seconds, limit, log file, note; one line per
step, written by the script), writes OUT/summary.md and OUT/summary.json, and prints summary.md: the
figure tables first and the step table last. Standard library only (no torch): it runs, and the table
appears, even where a step broke the Python environment. Exit status: 1 if a step is neither PASS nor
skipped. The tables' rows and columns are the ones bench/NOTES.md's prediction template lists.
"""
import argparse
import datetime
import json
import re
import sys
from pathlib import Path

CPU_NOTE = "cpu-interpreter (not a performance figure)"
GRAPH_LIMIT_NOTE = "CUDA-graph replay"
TRAIN_IMPLS = ("eager", "fusedad", "compile")
#: The result files of the steps that run the benchmark (python -m bench ... --out, results.json copied here).
RESULT_FILES = {"backward": "backward.json", "forward": "forward.json", "train": "train.json",
                "lm-head": "lm_head.json"}
#: The forward table's references: bare F.linear, and eager F.linear + activation.
FORWARD_BASES = ("F.linear", "eager")


def read_steps(path):
    steps = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, status, seconds, limit, log, note = (line.split("\t") + [""] * 6)[:6]
        steps.append({"step": name, "status": status, "seconds": int(seconds or 0), "limit": int(limit or 0),
                      "log": log, "note": note})
    return steps


def log_section(out, log, name):
    """The part of ``out/log`` that the step ``name`` wrote (after its '==== name ' header)."""
    path = Path(out) / log
    if not log or not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = re.split(r"^==== ", text, flags=re.M)
    return "\n".join(p for p in parts if p.startswith(name + " "))


def load_results(out, step):
    path = Path(out) / RESULT_FILES[step]
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fmt_ms(v):
    return "" if v is None else f"{v:.4g}"


def fmt_ratio(a, b):
    return f"{a / b:.2f}" if a and b else ""


def _bad(status):
    return status.split(":")[0] if status and status != "ok" else ""


def impl_order(rows, expected=()):
    present = list(dict.fromkeys(r["impl"] for r in rows))
    first = [i for i in ("eager",) if i in present or i in expected]
    fused = [i for i in present if i.startswith("fusedad")]
    rest = [i for i in (*expected, *present) if i not in first and i not in fused]
    return list(dict.fromkeys([*first, *fused, *rest]))


def pivot(rows, impls, perf, ratio_base=("eager",), floor=None):
    """Rows (shape, act) × implementations: ms per call (or the row's status), then on performance runs
    for each fusedad impl: eager ms / its ms ("× eager") and its ms / the floor's ("÷ floor")."""
    keys = list(dict.fromkeys((r["case"], r["activation"]) for r in rows))
    by = {(r["case"], r["activation"], r["impl"]): r for r in rows}
    fused = [i for i in impls if i.startswith("fusedad")]
    table = []
    for case, act in keys:
        line = {"shape": case, "act": act}
        for impl in impls:
            r = by.get((case, act, impl))
            line[impl] = "not run" if r is None else _bad(r["status"]) or fmt_ms(r.get("ms"))
        if perf:
            ms = {i: r.get("ms") for i in impls if (r := by.get((case, act, i))) and r["status"] == "ok"}
            for i in fused:
                for base in ratio_base:
                    if base in impls and base != i:
                        line[f"{i} × {base}"] = fmt_ratio(ms.get(base), ms.get(i))
                if floor in impls:
                    line[f"{i} ÷ {floor}"] = fmt_ratio(ms.get(i), ms.get(floor))
        table.append(line)
    return table


def not_applicable(table, rows):
    """In a pivot of forward rows: "n/a" (not "not run", nor a blank ratio) in the columns of a fusedad
    variant whose predicate does not hold for the case (the rows' ``variants`` field lists the ones that do)."""
    applies = {(r["case"], r["activation"]): r["variants"].split("+") for r in rows if "variants" in r}
    for line in table:
        ran = applies.get((line["shape"], line["act"]))
        for key, value in line.items():
            name = key.split(" ")[0][len("fusedad:"):] if key.startswith("fusedad:") else None
            if name and ran is not None and name not in ran and value in ("not run", ""):
                line[key] = "n/a"
    return table


def copy_pivot(rows, impls):
    """Decode cases (those with a ``copy`` row): the copy's GB/s and every other implementation's GB/s as
    % of it (``pct_copy``; blank where it is not a performance figure)."""
    keys = list(dict.fromkeys((r["case"], r["activation"]) for r in rows if r["impl"] == "copy"))
    by = {(r["case"], r["activation"], r["impl"]): r for r in rows}
    table = []
    for case, act in keys:
        copy = by[(case, act, "copy")]
        line = {"shape": case, "act": act,
                "copy GB/s": _bad(copy["status"]) or ("" if copy.get("gbps") is None else f"{copy['gbps']:.0f}")}
        for impl in impls:
            if impl == "copy":
                continue
            r = by.get((case, act, impl))
            line[f"{impl} % copy"] = ("not run" if r is None else _bad(r["status"])
                                      or ("" if r.get("pct_copy") is None else f"{r['pct_copy']:.0f}"))
        table.append(line)
    return not_applicable(table, rows)


def lm_head_pivot(rows, impls, perf):
    """LM-head rows (case, phase) × implementations: ms per call (or the row's status), then on performance
    runs each one's time as eager ms / its ms ("× eager") and its step memory (``max_memory_allocated``
    during one call, minus what was allocated before) as MiB and ÷ eager's."""
    keys = list(dict.fromkeys((r["case"], r["phase"]) for r in rows))
    by = {(r["case"], r["phase"], r["impl"]): r for r in rows}
    table = []
    for case, phase in keys:
        line = {"shape": case, "phase": phase}
        for impl in impls:
            r = by.get((case, phase, impl))
            line[impl] = "not run" if r is None else _bad(r["status"]) or fmt_ms(r.get("ms"))
        if perf:
            ok = {i: r for i in impls if (r := by.get((case, phase, i))) and r["status"] == "ok"}
            eager = ok.get("eager", {})
            for i in impls:
                r = ok.get(i, {})
                if i != "eager":
                    line[f"{i} × eager"] = fmt_ratio(eager.get("ms"), r.get("ms"))
                line[f"{i} step MiB"] = "" if r.get("step_mb") is None else f"{r['step_mb']:.0f}"
                if i != "eager":
                    line[f"{i} mem ÷ eager"] = fmt_ratio(r.get("step_mb"), eager.get("step_mb"))
        table.append(line)
    return table


def graph_pivot(rows, impls):
    """The graph cases: replay ms and launch ms (= plain ms − replay ms) per implementation, or the
    graph status (skipped (no GPU), FAIL, ERROR)."""
    graph_rows = [r for r in rows if "graph_status" in r]
    keys = list(dict.fromkeys((r["case"], r["activation"]) for r in graph_rows))
    by = {(r["case"], r["activation"], r["impl"]): r for r in graph_rows}
    table = []
    for case, act in keys:
        line = {"shape": case, "act": act}
        for impl in impls:
            r = by.get((case, act, impl))
            status = "" if r is None else r.get("graph_status", "")
            if r is None:
                line[f"{impl} graph"] = line[f"{impl} launch"] = "not run"
            elif status != "ok":
                line[f"{impl} graph"] = status.split(":")[0] if status.startswith(("FAIL", "ERROR")) else status
                line[f"{impl} launch"] = ""
            else:
                line[f"{impl} graph"] = fmt_ms(r.get("ms_graph"))
                line[f"{impl} launch"] = fmt_ms(r.get("launch_ms"))
        table.append(line)
    return table


def markdown(table):
    if not table:
        return "(no rows)"
    heads = list(dict.fromkeys(k for line in table for k in line))
    rows = [[str(line.get(h, "")).replace("|", "\\|") for h in heads] for line in table]
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, width)) + " |",
           "|" + "|".join("-" * (w + 2) for w in width) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |" for r in rows]
    return "\n".join(out)


def not_ok(status):
    """A row's status that counts against the implementation: FAIL or ERROR (not ok, not "skipped (…)")."""
    return status != "ok" and not status.startswith("skipped")


def results_detail(results, name):
    """'N rows: a ok, b FAIL; graphs: c ok, d skipped (no GPU); fusedad not ok: k' of a results file."""
    if results is None:
        return f"no {RESULT_FILES[name]}"
    rows = results.get("rows", [])
    count = {}
    for r in rows:
        s = r["status"].split(":")[0]
        count[s] = count.get(s, 0) + 1
    graphs = {}
    for r in rows:
        if "graph_status" in r:
            g = r["graph_status"].split(":")[0]
            graphs[g] = graphs.get(g, 0) + 1
    bad = sum(1 for r in rows if r["impl"].startswith("fusedad") and (
        not_ok(r["status"]) or str(r.get("graph_status", "")).startswith(("FAIL", "ERROR"))))
    text = f"{len(rows)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(count.items()))
    if graphs:
        text += "; graphs: " + ", ".join(f"{n} {s}" for s, n in sorted(graphs.items()))
    return text + f"; fusedad not ok: {bad}"


def last_error_line(section):
    """The last line of a step's output that reads like the reason it failed, else its last line."""
    lines = [ln.strip() for ln in section.splitlines()
             if ln.strip() and not ln.startswith(("---- ", "$ ")) and not ln.lstrip().startswith("warnings.warn")]
    errors = [ln for ln in lines if re.search(r"(Error|Exception|Interrupt|FAILED|error:)", ln)]
    return (errors or lines or [""])[-1][:200]


def step_detail(step, out):
    """One line saying what a step found, from its own output; for a step that is neither PASS nor
    skipped, also the last line of its output that reads like the reason."""
    detail = _step_detail(step, out)
    if step["status"] == "PASS" or step["status"].startswith("skipped"):
        return detail
    reason = last_error_line(log_section(out, step["log"], step["step"]))
    return "; ".join(x for x in (detail, reason if reason.strip(" =") not in detail else "") if x)


def _step_detail(step, out):
    name, note = step["step"], step["note"]
    section = log_section(out, step["log"], name)
    if name == "pytest" and section:
        lines = [ln.strip(" =") for ln in section.splitlines()
                 if re.search(r"\b(passed|failed|errors?|no tests ran|deselected)\b", ln)]
        found = lines[-1] if lines else f"no pytest summary line (limit {step['limit']} s)"
        return "; ".join(x for x in (found, note) if x)
    if name in RESULT_FILES:
        return "; ".join(x for x in (results_detail(load_results(out, name), name), note) if x)
    if name.startswith("memcheck") and section:
        summary = re.findall(r"ERROR SUMMARY: .*", section)
        kernels = sorted(set(re.findall(r"bwd kernels (\S+)", section)))
        cases = len(re.findall(r"fwd\+bwd\+jvp rel\.err", section))
        bits = [summary[-1] if summary else "", f"{cases} cases, bwd kernels {', '.join(kernels)}" if cases else "",
                note]
        return "; ".join(b for b in bits if b)
    if name == "overhead" and section:
        m = re.search(r"^forward\+backward\s+\S+\s+\S+\s+(\S+)", section, re.M)
        return "; ".join(x for x in (f"forward+backward added {m.group(1)} µs per call" if m else "", note) if x)
    return note


def env_lines(env_text, results):
    env = dict((results or {}).get("env") or {})
    lines = []
    if env:
        lines.append(f"device: {env.get('device_name')} · driver {env.get('driver')} · torch {env.get('torch')} · "
                     f"triton {env.get('triton')} · python {env.get('python')} · fusedad backend "
                     f"{env.get('fusedad_backend')}")
    peaks = (results or {}).get("peaks")
    if peaks:
        mm = ", ".join(f"{k} {v:.0f}" for k, v in peaks["gemm_tflops"].items())
        lines.append(f"peaks (measured at start): GEMM {peaks['gemm_shape']} TFLOP/s {mm}; device copy "
                     f"{peaks['copy_gbps']:.0f} GB/s")
    for line in (env_text or "").splitlines():
        if line.startswith(("mode:", "FUSEDAD_AUTOTUNE", "command:", "date:", "limits:", "gpu:", "commit:")):
            lines.append(line)
    return lines


def build(out, steps, env_text, dry_run, overhead_path=None):
    """(summary markdown, summary dict)."""
    backward, forward, train, lm_head = (load_results(out, name) for name in ("backward", "forward", "train",
                                                                              "lm-head"))
    perf = any(r and r.get("env", {}).get("performance_figures") for r in (backward, forward, train, lm_head))
    tables = {}
    md = ["# GPU protocol (bench/gpu_run.sh) — summary", ""]
    if dry_run:
        md += ["**DRY RUN**: the same plan on the CPU through Triton's interpreter at tiny shapes; CUDA-only steps "
               "are skipped (no GPU). Times are not performance figures.", ""]
    md += [f"- {line}" for line in env_lines(env_text, backward or forward or train or lm_head)] + [""]
    unit = "ms per call" if perf else f"ms* per call, {CPU_NOTE}"
    if backward:
        rows = [r for r in backward["rows"] if r["suite"] == "backward"]
        impls = impl_order(rows, ("floor",))
        tables["backward"] = pivot(rows, impls, perf, floor="floor")
        tables["backward_graph"] = graph_pivot(rows, impls)
        md += [f"## backward (dX, dW, db; {', '.join(sorted({r['dtype'] for r in rows}))}): {unit}", "",
               "Checked against eager before timing; `floor` = two torch.mm on eager's dZ, checked on dX and dW "
               "only (no db). Ratios: `× eager` = eager ms / ms (above 1 is faster); `÷ floor` = ms / floor ms.",
               "", markdown(tables["backward"]), ""]
        if tables["backward_graph"]:
            md += [f"### backward, {GRAPH_LIMIT_NOTE} (graph ms; launch = plain ms − graph ms)", "",
                   markdown(tables["backward_graph"]), ""]
    if forward:
        rows = [r for r in forward["rows"] if r["suite"] == "forward"]
        impls = impl_order(rows, FORWARD_BASES)
        # (the copy's ms is no comparison: its GB/s heads the decode table)
        tables["forward"] = not_applicable(pivot(rows, [i for i in impls if i != "copy"], perf,
                                                 ratio_base=FORWARD_BASES), rows)
        tables["forward_decode"] = copy_pivot(rows, impls)
        md += [f"## forward (no_grad, {', '.join(sorted({r['dtype'] for r in rows}))}): {unit}", "",
               "Every applicable forward kernel variant (`fusedad:<variant>`, forced with variants.use; n/a: its "
               "predicate does not hold), checked against eager (F.linear + activation) before timing; `F.linear` "
               "is the bare GEMM with bias. Ratios: `× F.linear` / `× eager` = their ms / the variant's ms (above "
               "1: fusedad is faster).", "", markdown(tables["forward"]), ""]
        if tables["forward_decode"]:
            blank = "" if perf else " — blank: no bandwidth figure from a CPU run"
            md += [f"### forward, decode: GB/s as % of a device copy of the weight (timed in the same rounds){blank}",
                   "", markdown(tables["forward_decode"]), ""]
    if train:
        rows = [r for r in train["rows"] if r["suite"] == "layers"]
        impls = impl_order(rows, TRAIN_IMPLS)
        tables["train"] = pivot(rows, impls, perf, ratio_base=("eager", "compile"))
        tables["train_graph"] = graph_pivot(rows, impls)
        md += [f"## train step (Linear+act forward+backward, {', '.join(sorted({r['dtype'] for r in rows}))}): "
               f"{unit}", "", "`× eager` / `× compile` = their ms / fusedad ms (above 1: fusedad is faster).", "",
               markdown(tables["train"]), ""]
        if tables["train_graph"]:
            md += [f"### train step, {GRAPH_LIMIT_NOTE} (graph ms; launch = plain ms − graph ms)", "",
                   markdown(tables["train_graph"]), ""]
    tuned = (train or {}).get("tuning")
    if tuned is not None:
        from .tuning import markdown as tuning_markdown, table_rows

        tables["tuning"] = table_rows(tuned["rows"])
        note = tuned["note"]
        if note.startswith("autotuning off"):
            note += ("; FUSEDAD_AUTOTUNE=1 bash bench/gpu_run.sh runs the train step tuned (more kernel compiles) "
                     "and lists here which row of the variant table each key kept. The forward and backward "
                     "tables time torch's rows (fusedad:linear_fwd_torch, fusedad:linear_bwd_torch) beside "
                     "every Triton row either way")
        section = tuning_markdown(tuned["rows"], note)
        md += ["### train step: " + section[0][3:]] + section[1:]  # ("## tuner choices …" one level down)
    if lm_head:
        rows = [r for r in lm_head["rows"] if r["suite"] == "lm-head"]
        tables["lm_head"] = lm_head_pivot(rows, impl_order(rows), perf)
        md += [f"## LM head: cross_entropy(x·Wᵀ, t) ({', '.join(sorted({r['dtype'] for r in rows}))}): {unit}", "",
               "Checked against eager (F.cross_entropy(F.linear)) before timing; fwd = the loss under no_grad, "
               "fwd+bwd = loss, dX and dW. `× eager` = eager ms / its ms (above 1: faster); step MiB = "
               "max_memory_allocated during one call beyond what was allocated before; `mem ÷ eager` below 1: "
               "less memory.", "", markdown(tables["lm_head"]), ""]
    if overhead_path and Path(overhead_path).is_file():
        overhead = json.loads(Path(overhead_path).read_text(encoding="utf-8"))
        tables["overhead"] = [{"phase": k, "nn.Linear µs": f"{v['nn_linear_us']:.1f}",
                               "fusedad µs": f"{v['fusedad_us']:.1f}", "added µs": f"{v['added_us']:+.1f}",
                               **({"ratio": f"{v['ratio']:.2f}"} if "ratio" in v else {})}
                              for k, v in overhead["phases"].items()]
        md += ["## overhead (python -m bench.overhead)", "", overhead["what"], "", markdown(tables["overhead"]), ""]
    for s in steps:
        s["detail"] = step_detail(s, out)
    failed = [s["step"] for s in steps if not (s["status"] == "PASS" or s["status"].startswith("skipped"))]
    step_table = [{"step": s["step"], "status": s["status"], "s": str(s["seconds"]), "limit s": str(s["limit"]),
                   "detail": s["detail"]} for s in steps]
    total = sum(s["seconds"] for s in steps)
    files = {p.name for p in Path(out).iterdir() if p.is_file()} if Path(out).is_dir() else set()
    files = sorted(files | {"summary.md", "summary.json"})
    md += [f"## steps ({total} s in steps; files in {out}: {', '.join(files)})", "",
           markdown(step_table), "",
           "result: " + (f"NOT OK: {', '.join(failed)}" if failed else "every step PASS or skipped")]
    summary = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "dry_run": dry_run,
               "performance_figures": perf, "env": env_lines(env_text, backward or forward or train or lm_head),
               "steps": steps, "failed": failed, "tables": tables}
    return "\n".join(md) + "\n", summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="write OUT/summary.md and OUT/summary.json, print summary.md")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", required=True, help="the step records (TSV)")
    r.add_argument("--env", help="the environment record the script wrote")
    r.add_argument("--overhead", help="the JSON that python -m bench.overhead --json wrote")
    r.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    env_text = Path(args.env).read_text(encoding="utf-8", errors="replace") if args.env else ""
    md, summary = build(args.out, read_steps(args.steps), env_text, args.dry_run, args.overhead)
    (Path(args.out) / "summary.md").write_text(md, encoding="utf-8")
    with open(Path(args.out) / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(md, end="")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

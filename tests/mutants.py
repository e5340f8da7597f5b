#!/usr/bin/env python3
"""Mutation check: plant realistic bugs one at a time and see whether the tests catch them.

    python tests/mutants.py                    # every mutant in tests/mutants.toml; exit 0 iff all caught
    python tests/mutants.py --list             # names, files, bugs, test selections
    python tests/mutants.py NAME [NAME ...]    # a subset (fnmatch patterns allowed: 'bf16*')
    python tests/mutants.py -j 2               # two mutants at a time
    python tests/mutants.py --keep NAME        # keep the mutated copy (path and rerun command printed)
    python tests/mutants.py --timeout 300      # per-mutant limit in seconds (TIMEOUT is not "caught")
    python tests/mutants.py --check-baseline   # the selections must PASS on the unmutated copy
    python tests/mutants.py --run-skipped      # also run the mutants marked `skip` (e.g. on a GPU machine)

For each mutant (tests/mutants.toml: file, exact old → new text, the targeted tests) the script copies the
project into a fresh temporary directory, applies the edit on disk (``@triton.jit`` reads kernel source
from disk, so edits must be real file edits), and runs ``pytest -x`` on the mutant's selection there.
A failing selection = CAUGHT (so is a test process killed by a signal — a segfault or abort that CI
would see), a passing one = MISSED. A mutant whose ``old`` text no longer occurs exactly
once in the source is STALE (or AMBIGUOUS) and counts as an error, never as caught; so does a pytest
exit that is neither pass nor fail (collection error, no test selected), a TIMEOUT, or a copy that did
not import its own code.

A mutant that no test can catch on this machine (a GPU-only behaviour) carries a ``skip`` reason in the
toml: its text is still checked (a stale one is an error), it is not run, and it is reported as SKIPPED
with its reason, never as caught. ``--run-skipped`` runs it anyway (on a machine that has what it needs).

Exit status: 0 all caught (skipped ones aside); 1 some missed (and no errors); 2 any stale / ambiguous /
error / timeout (--check-baseline: 0 iff every selection passes unmutated).

Import isolation. The package is installed editable, and setuptools maps ``fusedad.kernels`` to the
top-level ``kernels/`` through a meta-path finder appended *after* the normal path finder. The copy is
therefore laid out as an installed package — ``fusedad/`` with the copied ``kernels/`` at
``fusedad/kernels/`` — and its root goes first on ``sys.path`` (pytest's rootdir config and PYTHONPATH),
so the path finder resolves every ``fusedad*`` module inside the copy before the editable finder is asked.
(A naive copy with ``kernels/`` left at the top level would import the ORIGINAL kernels: the path finder
finds no ``fusedad/kernels`` in the copy and the editable finder answers with the source tree.) This is
proved twice: an import check before the run (a child process in a copy with a canary line appended to
the files prints each module's ``__file__`` and canary; a naive copy is shown importing from elsewhere),
and, in every mutant's own pytest run, this file loaded as a plugin (``-p mutants``) which, after
collection, asserts that ``fusedad``, ``fusedad.kernels.*`` and the mutated module come from the copy
and that the mutated module's file on disk has the mutated content (sha256), and at session end that
no ``fusedad`` module was imported from elsewhere. A run whose guard did not report is an error.

Runs on demand, not in CI; pytest does not collect this file (it is not named ``test_*``).
"""
import argparse
import concurrent.futures
import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent  # the project root
DATA = HERE / "mutants.toml"

#: pytest exit status the in-copy guard uses when the copy imported code from outside itself.
GUARD_EXIT = 97
#: Where a source-tree file lands in the copy (the installed layout: kernels/ is fusedad.kernels).
LAYOUT = {"kernels/": "fusedad/kernels/"}
#: Modules the guard requires to come from the copy (besides the mutated one).
CORE_MODULES = ("fusedad", "fusedad.kernels", "fusedad.kernels.gemm", "fusedad.kernels.linear",
                "fusedad.kernels.activations", "fusedad.autograd", "fusedad.functional")
ENV_ROOT, ENV_FILE, ENV_SHA, ENV_REPORT = ("FUSEDAD_MUTANT_ROOT", "FUSEDAD_MUTANT_FILE", "FUSEDAD_MUTANT_SHA256",
                                           "FUSEDAD_MUTANT_REPORT")
CAUGHT, MISSED, SKIPPED, STALE, AMBIGUOUS, ERROR, TIMEOUT, PASSED, FAILED = (
    "CAUGHT", "MISSED", "SKIPPED", "STALE", "AMBIGUOUS", "ERROR", "TIMEOUT", "PASSED", "FAILED")


# ---- the mutant list ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Mutant:
    name: str
    file: str  # source-tree path, e.g. kernels/gemm.py
    bug: str
    old: str
    new: str
    tests: list  # pytest args (paths / node ids), groups expanded
    k: str = None
    note: str = None
    skip: str = None  #: why no test can catch it here (GPU-only behaviour): reported SKIPPED, never caught

    def selection(self):
        return tuple(self.tests) + (("-k", self.k) if self.k else ())


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            sys.exit("tests/mutants.py: needs Python >= 3.11 (tomllib) or `pip install tomli`")
    return tomllib


def load_mutants(path=DATA):
    data = _toml().loads(path.read_text(encoding="utf-8"))
    groups = data.get("groups", {})
    mutants, seen = [], set()
    for i, entry in enumerate(data.get("mutant", [])):
        where = f"{path.name}: mutant #{i + 1} ({entry.get('name', '?')})"
        missing = {"name", "file", "bug", "old", "new", "tests"} - set(entry)
        unknown = set(entry) - {"name", "file", "bug", "old", "new", "tests", "k", "note", "skip"}
        if missing or unknown:
            raise SystemExit(f"{where}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        if entry["name"] in seen:
            raise SystemExit(f"{where}: duplicate name")
        seen.add(entry["name"])
        if entry["old"] == entry["new"] or not entry["old"]:
            raise SystemExit(f"{where}: `old` must be non-empty and differ from `new`")
        tests = []
        for t in entry["tests"]:
            expanded = groups[t[1:]] if t.startswith("@") and t[1:] in groups else [t]
            if t.startswith("@") and t[1:] not in groups:
                raise SystemExit(f"{where}: unknown group {t}")
            tests += [e for e in expanded if e not in tests]
        for t in tests:
            if not (SOURCE / t.split("::")[0]).exists():
                raise SystemExit(f"{where}: test path {t} does not exist")
        mutants.append(Mutant(entry["name"], entry["file"], entry["bug"], entry["old"], entry["new"], tests,
                              entry.get("k"), entry.get("note"), entry.get("skip")))
    return mutants


def check_applies(mutant, text):
    """(status, message): None if ``old`` occurs exactly once in ``text``."""
    count = text.count(mutant.old)
    if count == 1:
        return None, ""
    first = mutant.old.strip().splitlines()[0] if mutant.old.strip() else mutant.old
    if count == 0:
        return STALE, (f"`old` text not found in {mutant.file} (the source changed?) — first line: {first!r}; "
                       f"update {DATA.name}")
    return AMBIGUOUS, f"`old` text occurs {count}× in {mutant.file} — add context to make it unique"


# ---- the temporary copy -------------------------------------------------------------------------------

def copy_path(rel):
    """Source-tree path → path in the copy (kernels/… → fusedad/kernels/…)."""
    for src, dst in LAYOUT.items():
        if rel.startswith(src):
            return dst + rel[len(src):]
    return rel


def module_name(copy_rel):
    """fusedad/kernels/gemm.py → fusedad.kernels.gemm (None if not a module of the package)."""
    if not copy_rel.startswith("fusedad/") or not copy_rel.endswith(".py"):
        return None
    name = copy_rel[:-3].replace("/", ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", "gpu-out"}


def project_files():
    """The working tree's files (tracked + untracked-but-not-ignored): what a clean checkout would hold,
    plus uncommitted edits. Falls back to a filtered walk outside git."""
    try:
        out = subprocess.run(["git", "-C", str(SOURCE), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f and (SOURCE / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(SOURCE):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dirpath, f), SOURCE) for f in filenames]
        files = [f for f in files if "bench/results/" not in f.replace(os.sep, "/")]
    return sorted(f.replace(os.sep, "/") for f in files)


def make_copy(files, label, layout=True):
    dest = Path(tempfile.mkdtemp(prefix=f"fusedad-mutant-{label}-"))
    for rel in files:
        target = dest / (copy_path(rel) if layout else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SOURCE / rel, target)  # fresh mtimes: no stale bytecode can match
    return dest


def child_env(copy):
    env = dict(os.environ)
    # The copy first (and tests/, so `-p mutants` loads the copy's guard); nothing of the source tree.
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and Path(p).resolve() not in (SOURCE, SOURCE / "tests")]
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests"), *extra])
    env.pop("PYTEST_ADDOPTS", None)
    # A fresh torch.compile cache per copy: Inductor's on-disk FX-graph/AOT caches key a graph by its ops,
    # not by the Python bodies of our custom ops, so a graph compiled from the unmutated source would be
    # reused and the mutant's code never traced (seen: select_for_op_interprets_fake_tensors was missed so).
    env["TORCHINDUCTOR_CACHE_DIR"] = str(copy / ".inductor-cache")
    return env


def _run(cmd, cwd, env, timeout):
    """(returncode or None on timeout, combined output, seconds); the whole process group dies on timeout."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    _CHILDREN.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        rc = None
    finally:
        _CHILDREN.discard(proc)
    return rc, out.decode(errors="replace"), time.monotonic() - start


_CHILDREN = set()


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group we started (start_new_session)
    except ProcessLookupError:
        pass


# ---- import check: the copy imports its own code ------------------------------------------------------

_PROBE = r"""
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        m = importlib.import_module(name)
        out[name] = {"file": getattr(m, "__file__", None), "canary": getattr(m, "_MUTANT_CANARY", None)}
    except Exception as e:
        out[name] = {"error": f"{type(e).__name__}: {e}"}
print("PROBE" + json.dumps(out))
"""


def _probe(copy, modules, timeout=120):
    rc, out, _ = _run([sys.executable, "-c", _PROBE, *modules], copy, child_env(copy), timeout)
    line = next((l for l in out.splitlines() if l.startswith("PROBE")), None)
    if line is None:
        raise RuntimeError(f"import probe failed (rc {rc}):\n{out[-3000:]}")
    return json.loads(line[len("PROBE"):])


def check_imports(files, keep=False):
    """Canary proof that a copy imports its own (mutated) files; True if it does. Also shows that a naive
    copy (kernels/ left at the top level) would not — the pitfall the layout avoids (informational)."""
    targets = sorted({copy_path(f) for f in files if module_name(copy_path(f))})
    token = f"canary-{os.getpid()}-{time.time_ns()}"
    copy = make_copy(files, "imports")
    ok = True
    try:
        for rel in targets:
            with open(copy / rel, "a", encoding="utf-8") as f:
                f.write(f"\n_MUTANT_CANARY = {token!r}\n")
        names = [module_name(rel) for rel in targets]
        found = _probe(copy, names)
        print(f"import check: a child process in the copy {copy} imports")
        for rel, name in zip(targets, names):
            info = found[name]
            inside = info.get("file") and Path(info["file"]).resolve() == (copy / rel).resolve()
            good = inside and info.get("canary") == token
            ok &= bool(good)
            print(f"  {'ok  ' if good else 'FAIL'} {name:32s} {info.get('file') or info.get('error')}"
                  f"{'' if good else '  (canary ' + repr(info.get('canary')) + ')'}")
        naive = make_copy(files, "naive", layout=False)
        try:
            info = _probe(naive, ["fusedad.kernels.gemm"])["fusedad.kernels.gemm"]
            where = info.get("file") or info.get("error")
            outside = info.get("file") and naive not in Path(info["file"]).resolve().parents
            print(f"  (control: a naive copy with kernels/ at the top level imports fusedad.kernels.gemm from "
                  f"{where}{' — OUTSIDE that copy' if outside else ''})")
        finally:
            shutil.rmtree(naive, ignore_errors=True)
    finally:
        if keep:
            print(f"  kept: {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)
    if not ok:
        print("import check FAILED: the copy does not import its own code; results would be meaningless")
    return ok


# ---- the guard: loaded inside each copy's pytest run as `-p mutants` ----------------------------------

def _guard_check(phase):
    """Problems (strings) with where fusedad was imported from, inside a mutant's pytest process."""
    root = Path(os.environ[ENV_ROOT]).resolve()
    problems, files = [], {}
    if phase == "collection":
        for name in CORE_MODULES + ((module_name(os.environ[ENV_FILE]),) if module_name(os.environ[ENV_FILE]) else ()):
            m = importlib.import_module(name)
            files[name] = m.__file__
        target = root / os.environ[ENV_FILE]
        if hashlib.sha256(target.read_bytes()).hexdigest() != os.environ[ENV_SHA]:
            problems.append(f"{target} does not hold the expected (mutated) content")
        name = module_name(os.environ[ENV_FILE])
        if name and Path(files[name]).resolve() != target.resolve():
            problems.append(f"{name} imported from {files[name]}, not {target}")
    for name, m in list(sys.modules.items()):
        if (name == "fusedad" or name.startswith("fusedad.")) and getattr(m, "__file__", None):
            files[name] = m.__file__
    for name, f in files.items():
        if root not in Path(f).resolve().parents:
            problems.append(f"{name} imported from {f}, outside the copy {root}")
    return problems, files


def _guard_report(phase, problems, files):
    path = Path(os.environ[ENV_REPORT])
    report = json.loads(path.read_text()) if path.exists() else {}
    report[phase] = {"problems": problems, "modules": files}
    path.write_text(json.dumps(report, indent=1))


def pytest_collection_finish(session):  # after conftest.py set TRITON_INTERPRET and imported fusedad
    if ENV_ROOT not in os.environ:
        return
    problems, files = _guard_check("collection")
    _guard_report("collection", problems, files)
    if problems:
        import pytest

        pytest.exit("mutants guard: " + "; ".join(problems), returncode=GUARD_EXIT)


def pytest_sessionfinish(session, exitstatus):
    if ENV_ROOT not in os.environ:
        return
    problems, files = _guard_check("finish")
    _guard_report("finish", problems, files)
    if problems:
        session.exitstatus = GUARD_EXIT


# ---- running one selection in a copy ------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    output: str = ""
    copy: Path = None
    command: str = ""


def build_pytest_command(selection):
    cmd = [sys.executable, "-m", "pytest", *selection, "-x", "-q", "-rfE", "--no-header", "-p", "no:cacheprovider",
           "-p", "mutants"]
    if importlib.util.find_spec("hypothesis") is not None:
        cmd.append("--hypothesis-seed=0")  # a reproducible fuzz draw: the same verdict on every run
    return cmd


def run_selection(label, selection, files, timeout, keep, mutant=None):
    """Copy the project, apply ``mutant`` (None: baseline), run ``selection`` there. -> Result."""
    copy = make_copy(files, label)
    target = copy_path(mutant.file if mutant else "kernels/gemm.py")
    try:
        path = copy / target
        text = path.read_text(encoding="utf-8")
        if mutant is not None:
            status, message = check_applies(mutant, text)
            if status:
                return Result(label, status, detail=message, copy=copy)
            text = text.replace(mutant.old, mutant.new)
            path.write_text(text, encoding="utf-8")
        report = copy / ".mutant-guard.json"
        env = child_env(copy)
        env.update({ENV_ROOT: str(copy), ENV_FILE: target, ENV_REPORT: str(report),
                    ENV_SHA: hashlib.sha256(path.read_bytes()).hexdigest()})
        cmd = build_pytest_command(selection)
        rc, out, seconds = _run(cmd, copy, env, timeout)
        (copy / ".mutant-pytest.log").write_text(out)
        shown = " ".join(_shell(c) for c in cmd)
        guard = json.loads(report.read_text()) if report.exists() else {}
        result = Result(label, ERROR, seconds, output=out, copy=copy,
                        command=f"cd {copy} && {' '.join(f'{k}={_shell(env[k])}' for k in (ENV_ROOT, ENV_FILE, ENV_SHA, ENV_REPORT))} "
                                f"PYTHONPATH={_shell(env['PYTHONPATH'])} {shown}")
        if rc is None:
            result.status, result.detail = TIMEOUT, f"no verdict within {timeout:.0f} s"
        elif rc == GUARD_EXIT or any(v.get("problems") for v in guard.values()):
            result.detail = "the copy imported code from outside itself: " + "; ".join(
                dict.fromkeys(p for v in guard.values() for p in v.get("problems", [])))
        elif "collection" not in guard and (rc in (0, 1) or rc < 0):
            result.detail = "the import guard did not run (was `-p mutants` loaded?)"
        elif rc < 0 and mutant is not None:
            # Killed by a signal (not our timeout): a segfault / abort in a test, e.g. an out-of-bounds
            # store corrupting the heap. The suite dies, so CI fails: caught. faulthandler names the test.
            frame = re.search(r'File "[^"]*/(tests/test_\w+\.py)", line \d+ in (\w+)', out)
            result.status = CAUGHT
            result.detail = f"crashed ({_signal_name(-rc)})" + (f" in {frame.group(1)}::{frame.group(2)}" if frame else "")
        elif rc in (0, 1):
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
            passed = re.search(r"(\d+) passed", out)
            if mutant is None:
                result.status = PASSED if rc == 0 else FAILED
            else:
                result.status = MISSED if rc == 0 else CAUGHT
            result.detail = f"by {failed[0]}" if failed else (f"{passed.group(1)} passed" if passed else "")
        else:
            meaning = {2: "interrupted (collection error?)", 3: "pytest internal error", 4: "usage error",
                       5: "no tests selected"}.get(rc, "unexpected exit")
            result.detail = f"pytest exit {rc}: {meaning}"
        return result
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)


def _signal_name(num):
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _shell(s):
    return s if re.fullmatch(r"[\w@%+=:,./-]+", s) else "'" + s.replace("'", "'\\''") + "'"


# ---- CLI ----------------------------------------------------------------------------------------------

def select(mutants, patterns):
    if not patterns:
        return mutants
    chosen, unknown = [], []
    for p in patterns:
        hits = [m for m in mutants if fnmatch.fnmatchcase(m.name, p)]
        unknown += [] if hits else [p]
        chosen += [m for m in hits if m not in chosen]
    if unknown:
        raise SystemExit(f"unknown mutant(s): {', '.join(unknown)}; known: {', '.join(m.name for m in mutants)}")
    return chosen


def print_list(mutants):
    for m in mutants:
        print(f"{m.name}  [{m.file}]\n    {m.bug}")
        if m.note:
            print(f"    note: {m.note}")
        if m.skip:
            print(f"    skipped: {m.skip}")
        print(f"    tests: {' '.join(m.tests)}{f' -k {m.k!r}' if m.k else ''}")
    print(f"{len(mutants)} mutants")


def run_parallel(jobs, work, on_done):
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(fn): key for key, fn in work}
        try:
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = res = fut.result()
                on_done(res)
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            for proc in list(_CHILDREN):
                _kill(proc)
            raise
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Mutants, their tests and this script: tests/mutants.toml, tests/mutants.py.")
    ap.add_argument("names", nargs="*", help="mutants to run (fnmatch patterns); default all")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    ap.add_argument("--keep", action="store_true", help="keep each temporary copy (path and rerun command printed)")
    ap.add_argument("--check-baseline", action="store_true",
                    help="run the import check and each distinct selection on the UNMUTATED copy; all must pass")
    ap.add_argument("--run-skipped", action="store_true",
                    help="also run the mutants marked `skip` (GPU-only: on a machine that can catch them)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's full output for every run")
    args = ap.parse_args(argv)

    mutants = select(load_mutants(), args.names)
    if args.list:
        print_list(mutants)
        return 0
    files = project_files()
    clash = [f for f in files if f.startswith("fusedad/kernels/")]
    if clash:
        raise SystemExit(f"the source tree has fusedad/kernels/ files, which the copy layout reserves: {clash}")

    # Stale before anything runs: a mutant whose text is gone must never be counted as caught.
    pre = {}
    for m in mutants:
        status, message = check_applies(m, (SOURCE / m.file).read_text(encoding="utf-8"))
        if status:
            pre[m.name] = Result(m.name, status, detail=message)
        elif m.skip and not args.run_skipped:
            pre[m.name] = Result(m.name, SKIPPED, detail=f"skipped ({m.skip})")

    t0 = time.monotonic()
    if not check_imports(files, keep=args.keep):
        return 2
    lock = threading.Lock()

    def report(res):
        with lock:
            print(f"{res.status:9s} {res.name:40s} {res.seconds:6.1f}s  {res.detail}", flush=True)
            if res.copy is not None and args.keep:
                print(f"          kept: {res.copy}\n          rerun: {res.command}")
            if args.verbose or res.status in (ERROR, TIMEOUT, FAILED):
                print(textwrap.indent(res.output[-4000:] if not args.verbose else res.output, "          | "))

    if args.check_baseline:
        selections = {}  # one run per distinct set of tests (their order only matters to -x's speed)
        for m in mutants:
            if m.skip and not args.run_skipped:
                continue
            key = tuple(sorted(m.tests)) + (("-k", m.k) if m.k else ())
            selections.setdefault(key, []).append(m.name)
        print(f"baseline: {len(selections)} distinct selections on the unmutated copy, -j {args.jobs}")
        work = [(sel, (lambda sel=sel, i=i: run_selection(f"baseline{i}", sel, files, args.timeout, args.keep)))
                for i, sel in enumerate(selections)]

        results = run_parallel(args.jobs, work, report)
        bad = 0
        for i, (sel, names) in enumerate(selections.items()):
            res = results[sel]
            bad += res.status != PASSED
            print(f"{res.status:9s} baseline{i}: {' '.join(sel)}\n          (used by {', '.join(names)})")
        print(f"baseline: {len(selections) - bad}/{len(selections)} selections pass unmutated "
              f"({time.monotonic() - t0:.0f} s)")
        return 0 if bad == 0 else 2

    print(f"running {len(mutants) - len(pre)} mutants, -j {args.jobs}, timeout {args.timeout:.0f} s"
          + (f" ({sum(r.status == SKIPPED for r in pre.values())} skipped)" if pre else ""))
    for res in pre.values():
        report(res)
    work = [(m.name, (lambda m=m: run_selection(m.name, m.selection(), files, args.timeout, args.keep, m)))
            for m in mutants if m.name not in pre]
    results = dict(pre)
    results.update(run_parallel(args.jobs, work, report))

    print(f"\n{'status':9s} {'mutant':40s} {'file':24s} time")
    for m in mutants:
        r = results[m.name]
        print(f"{r.status:9s} {m.name:40s} {m.file:24s} {r.seconds:5.0f}s  {r.detail}")
    counts = {s: sum(r.status == s for r in results.values())
              for s in (CAUGHT, MISSED, SKIPPED, STALE, AMBIGUOUS, ERROR, TIMEOUT)}
    print(f"\n{counts[CAUGHT]}/{len(mutants) - counts[SKIPPED]} caught, {counts[MISSED]} missed"
          + "".join(f", {n} {s.lower()}" for s, n in counts.items() if s not in (CAUGHT, MISSED) and n)
          + f" — {time.monotonic() - t0:.0f} s wall, -j {args.jobs}")
    missed = [m.name for m in mutants if results[m.name].status == MISSED]
    if missed:
        print("missed (no selected test fails with this bug): " + " ".join(missed))
    skipped = [m.name for m in mutants if results[m.name].status == SKIPPED]
    if skipped:
        print("skipped (not run, not counted as caught; --run-skipped runs them): " + " ".join(skipped))
    errors = [m.name for m in mutants if results[m.name].status not in (CAUGHT, MISSED, SKIPPED)]
    if errors:
        print("not judged (stale / ambiguous / error / timeout — fix these first): " + " ".join(errors))
        return 2
    return 1 if missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        for proc in list(_CHILDREN):
            _kill(proc)
        sys.exit(130)

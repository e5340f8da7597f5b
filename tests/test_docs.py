"""Every fenced ```python block of README.md and docs/*.md runs, so the docs cannot drift from the code.

A block runs in a fresh namespace, in a temporary working directory, in this process: on CPU the suite
has TRITON_INTERPRET=1 (conftest), so the examples run the kernels through the interpreter and must be
sized for it (a few hundred rows and features at most). A block that needs a GPU carries the marker
line ``<!-- example: cuda -->`` right above its fence: it is compiled (syntax) everywhere and run only
where CUDA is present, else skipped with that reason. Any other marker is an error. The README's
quickstart is also run the way a newcomer runs it: a new process without TRITON_INTERPRET (the eager
path on CPU).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOC_FILES = [README, *sorted((REPO / "docs").glob("*.md"))]
MARKERS = {"cuda": "needs a CUDA GPU"}
BLOCK = re.compile(r"(?:^<!--\s*example:\s*(?P<marker>[\w-]+)\s*-->\n)?^```python\n(?P<code>.*?)^```", re.M | re.S)


def blocks(path):
    """(first code line, marker or None, code) of every ```python block in ``path``."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m["marker"], m["code"]) for m in BLOCK.finditer(text)]


def _params():
    return [pytest.param(path, line, marker, code, id=f"{path.relative_to(REPO)}:{line}")
            for path in DOC_FILES for line, marker, code in blocks(path)]


@pytest.mark.parametrize("path, line, marker, code", _params())
def test_example_runs(path, line, marker, code, tmp_path, monkeypatch):
    assert marker is None or marker in MARKERS, f"{path.name}:{line}: unknown example marker {marker!r}"
    compiled = compile(code, f"{path.relative_to(REPO)}:{line}", "exec")  # a syntax error fails everywhere
    if marker == "cuda" and not torch.cuda.is_available():
        pytest.skip(MARKERS[marker])
    monkeypatch.chdir(tmp_path)  # an example that saves a file writes it here
    torch.manual_seed(0)
    try:
        exec(compiled, {"__name__": "__docs_example__"})
    finally:
        torch._dynamo.reset()  # an example's compiled frames do not count against later tests' recompile limit


def test_every_doc_has_its_examples_found():
    """The pattern finds every ```python fence (a fence it skipped would be an unrun example)."""
    for path in DOC_FILES:
        assert len(blocks(path)) == path.read_text().count("```python"), path


def test_readme_quickstart_runs_as_written_on_the_eager_path(tmp_path):
    """The README's first example, pasted into a fresh Python on a CPU without TRITON_INTERPRET."""
    line, marker, code = blocks(README)[0]
    assert marker is None and len(code.splitlines()) <= 15, "the quickstart: at most 15 lines, no marker"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "triton" if torch.cuda.is_available() else "eager"
    assert proc.stdout.split()[0] == expected, proc.stdout


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.relative_to(REPO)}: broken link {target}"

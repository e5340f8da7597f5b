"""fusedad.convert on Hugging Face transformers models, tested against transformers itself.

Tiny models built from configs in code (no hub access), fp64, the kernels through the interpreter on
CPU: the converted model must equal the unconverted one (outputs, loss, every parameter's gradient, AdamW
steps), the block kernels must really run, and every MLP activation must be fused. Blocks a recipe must
not touch (a dropout between the projections, a hook, an activation without a table row) stay as they are.

The first tests need no transformers: the repository's top-level ``kernels/`` directory (fusedad.kernels)
must not shadow the PyPI package ``kernels`` that transformers imports, when Python starts at the root.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_at_root(code, *args):
    """Python started at the repository root (sys.path[0] = root, as ``python -m pytest`` / ``-m bench``)."""
    return subprocess.run([sys.executable, *args, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_bare_kernels_name_is_the_pypi_package_at_the_root():
    """``import kernels`` with the root first on sys.path: the PyPI package where installed, else the
    ordinary ModuleNotFoundError — never fusedad's kernels under the wrong name. And what broke: a
    transformers model (its activations import ``kernels`` for hub kernels, which resolved to this
    repository's directory and failed with a relative-import error) builds next to fusedad."""
    code = ("import os, sys; assert os.path.abspath(sys.path[0] or '.') == os.getcwd()\n"
            "import fusedad.kernels as fk\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('MISSING', e.name)\n"
            "else:\n    print('FILE', kernels.__file__, kernels.__name__, hasattr(kernels, 'record_launches'))\n"
            "print('OURS', fk.__file__, fk.__name__, hasattr(fk, 'record_launches'))\n"
            "try:\n    import transformers\nexcept ImportError:\n    pass\nelse:\n"
            "    from transformers import LlamaConfig, LlamaForCausalLM\n"
            "    m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=2, vocab_size=32))\n    print('MODEL', type(m).__name__)\n")
    out = _run_at_root(code)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["OURS"].endswith("True") and "fusedad.kernels" in lines["OURS"]
    if _pypi_kernels_installed():
        path, name, has_ours = lines["FILE"].split()
        assert not os.path.abspath(path).startswith(os.path.join(ROOT, "kernels") + os.sep), path
        assert name == "kernels" and has_ours == "False"
    else:
        assert lines["MISSING"] == "kernels"
    if importlib.util.find_spec("transformers") is not None:
        assert lines["MODEL"] == "LlamaForCausalLM"


def test_bare_kernels_name_without_the_pypi_package():
    """Only the root and the standard library on sys.path: ``import kernels`` fails as it would elsewhere,
    and leaves no half-imported module behind."""
    code = ("import sys, os\nsys.path[:] = [os.getcwd()] + [p for p in sys.path if 'site-packages' not in p "
            "and 'dist-packages' not in p and os.path.abspath(p or '.') != os.getcwd()]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    print('MISSING', e.name, 'kernels' in sys.modules)\n")
    out = _run_at_root(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MISSING", "kernels", "False"]


def _pypi_kernels_installed():
    """True if a ``kernels`` package other than the repository's is importable (outside the root)."""
    out = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                          "print(s.origin if s else '')"], cwd="/", capture_output=True, text=True, timeout=60)
    origin = out.stdout.strip()
    return bool(origin) and not origin.startswith(os.path.join(ROOT, "kernels"))

"""fusedad.kernels — pure Triton: the fused linear kernels, their variant table and thin launch wrappers.

No autograd and no nn here (that is ``fusedad``). Installed as ``fusedad.kernels`` from the top-level
``kernels/`` directory (the bare name ``kernels`` is taken on PyPI).

Imported under the bare name ``kernels`` — which happens whenever the repository root is on ``sys.path``:
``python -m pytest`` or ``python -m bench`` started there, a script in the root, pytest's ``pythonpath`` —
this directory is not what the caller wants (transformers 5 imports the PyPI package ``kernels``): the
module then hands over to the next ``kernels`` on the path (the PyPI package, if installed) in
``sys.modules`` and defines nothing of its own; without one, it is an empty stand-in, like the namespace
package Python makes of a directory without ``__init__.py``: no ``__file__``, no version, no submodules.
"""
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _handover():
        here = _os.path.dirname(_os.path.abspath(__file__))
        root = _os.path.dirname(here)

        def ours(spec):
            origin = spec.origin or ""
            locations = list(spec.submodule_search_locations or [])
            return any(_os.path.abspath(p) == here for p in locations) or \
                _os.path.abspath(origin).startswith(here + _os.sep)

        path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != root]
        for finder in _sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find("kernels", path if finder is _machinery.PathFinder else None)
            if spec is not None and not ours(spec):
                module = _util.module_from_spec(spec)
                _sys.modules["kernels"] = module  # the import statement returns this module
                spec.loader.exec_module(module)
                return True
        return False

    if not _handover():
        # No other ``kernels`` is installed (transformers 5.17, the GPU image's, does not require it; 5.25
        # does). Raising here broke transformers: it probes the name (``find_spec`` finds this directory,
        # then ``import_module``), and a ModuleNotFoundError there stopped its model classes from importing.
        # Python itself makes an empty namespace package of a directory without ``__init__.py``, and
        # transformers reads "no ``__file__``, no ``__version__``" as "not installed": the bare name
        # becomes that — no attributes, no submodules.
        __file__ = None
        __path__ = []
        del _machinery, _util, _os, _sys, _handover
else:
    from .linear import (INTERPRETER, Launch, dot_precision, force_int64, linear_backward, linear_forward,
                         needs_int64, record_launches)

    __all__ = ["INTERPRETER", "Launch", "dot_precision", "force_int64", "linear_forward", "linear_backward",
               "needs_int64", "record_launches"]

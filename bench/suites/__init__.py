"""The suites, one module each, and their registry (read by the CLI, the report and the plots).

A suite module defines ``SUITE = Suite(...)``. Every module in this folder but ``_*.py`` is registered
when ``bench.suites`` is imported: the built-in ones first, in the order below, then the others by file
name. ``register`` adds one from elsewhere (a test).
"""
import dataclasses
import importlib
import pkgutil
from typing import Callable, Optional

from ..runner import run_timed


@dataclasses.dataclass(frozen=True)
class Suite:
    """What the harness needs to know about a suite.

    preset(device, quick) -> settings: the suite's own axes, a dict (recorded in results.json). The CLI's
        --dtype/--activation/--phase/--shape replace its keys dtypes/activations/phases/shapes, if present.
    cases(settings, plan) -> iterable of ``runner.Case``.
    run(case, plan, peaks) -> rows, one dict per implementation (``runner.run_timed`` by default).
    columns(performance) -> [(header, row key or cell(row) -> str)] of its table (``report`` has the
        common ones); ``performance`` is False on a CPU run, where no throughput figure exists.
    plot(rows, results, out_dir) -> names of the PNG files written (``plots`` has helpers), or None.
    fields: meaning of the row fields it adds, stored in results.json.
    """

    name: str
    title: str                       # heading of its table in the console and results.md
    help: str                        # its line under "suites:" in --help
    preset: Callable
    cases: Callable
    columns: Callable
    run: Callable = run_timed
    plot: Optional[Callable] = None
    fields: dict = dataclasses.field(default_factory=dict)


#: name -> Suite, in run order.
SUITES = {}


def register(suite):
    """Add ``suite`` to the registry (replacing one of the same name); returns it."""
    SUITES[suite.name] = suite
    return suite


_OTHERS = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _name in dict.fromkeys(("modes", "layers", "memory", *_OTHERS)):
    register(importlib.import_module(f"{__name__}.{_name}").SUITE)

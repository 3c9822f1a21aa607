"""Load a script of ``benchmarks/`` as a module, the way it runs: its own folder first on ``sys.path`` (for
``_record``), restored afterwards. Shared by the tests of the benchmark scripts' own logic."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def benchmark_module(script: str, name: str) -> Iterator[ModuleType]:
    """``benchmarks/<script>`` imported as module ``name`` for the duration of the block."""
    folder = str(ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(folder)

"""Lazy package attributes (PEP 562): a package's public names, each imported from its module on first use.

``import deltaplane`` and the registry's metadata-only commands must not wait for torch, yet
``from deltaplane import Delta`` must work as an eager import would. A package lists its names and the modules
that define them, and takes its module-level ``__getattr__`` and ``__dir__`` from :func:`lazy_attributes`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, names: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``names`` (name → defining module) load lazily.

    A name is imported on its first look-up and stored in ``namespace`` (the package's ``globals()``), so later
    look-ups find it there without calling ``__getattr__`` again; ``__dir__`` lists the loaded and the lazy names.

    Example:
        >>> __getattr__, __dir__ = lazy_attributes("pkg", {"sqrt": "math"}, ns := {})
        >>> __getattr__("sqrt")(4.0), "sqrt" in ns
        (2.0, True)
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__

"""A real text-classification task that ships with Python: which area of the standard library a docstring is from.

Why it is real: the texts are the docstrings of the standard library's public functions, classes and methods,
written by CPython's developers for people (not generated, not templated), read with :func:`inspect.getdoc`
from the interpreter that runs the code — so nothing is downloaded and every machine with the same Python version
gets the same data. The label is the area of the library the docstring documents (text processing, numbers,
files, networking, concurrency, data formats, dates and times, developer tools), a topic-classification task
like AG News, over technical English with a natural class imbalance.

Used to fine-tune all-MiniLM-L6-v2 with a classification head (LoRA federation, adapter deployment benchmarks).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["AREAS", "TextDataset", "load_stdlib_docstrings"]

AREAS: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "stringprep", "codecs", "locale", "gettext"),
    "numbers": ("math", "cmath", "statistics", "fractions", "decimal", "random", "numbers", "operator"),
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "io", "stat"),
    "network": (
        "socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse",
        "smtplib", "ftplib", "imaplib", "poplib", "ipaddress", "email.message", "email.utils",
    ),
    "concurrency": (
        "threading", "multiprocessing", "multiprocessing.pool", "asyncio", "concurrent.futures", "queue",
        "subprocess", "sched", "selectors", "signal",
    ),
    "formats": (
        "json", "csv", "xml.etree.ElementTree", "xml.dom.minidom", "html.parser", "configparser", "pickle",
        "zipfile", "tarfile", "gzip", "bz2", "lzma", "base64", "binascii", "plistlib", "struct",
    ),
    "time": ("datetime", "time", "calendar", "zoneinfo"),
    "devtools": (
        "unittest", "unittest.mock", "doctest", "pdb", "bdb", "inspect", "logging", "traceback", "ast",
        "dis", "tokenize", "trace", "timeit", "cProfile", "pstats", "warnings",
    ),
}  # fmt: skip
"""Label → the standard-library modules whose docstrings carry it."""


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels (``labels[i]`` indexes ``classes``)."""

    texts: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> TextDataset:
        """The examples at ``idx``."""
        return TextDataset([self.texts[i] for i in idx], self.labels[idx], self.classes)


def _stdlib(member: object) -> bool:
    """Whether ``member`` comes from the standard library (a C method has no ``__module__``: it does)."""
    module = getattr(member, "__module__", None)
    return module is None or module.partition(".")[0] in sys.stdlib_module_names


def _docs(module_name: str, min_chars: int) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(module_name)
    except ImportError:  # a module missing from this build of Python (e.g. no _ssl) just contributes nothing
        return []
    out = []
    for name, obj in sorted(vars(module).items()):
        # a hook the module invites replacing keeps its original as _NAME_orig (warnings.showwarning, which
        # `deltaplane run` replaces while it runs): read that, so the data do not depend on who replaced it
        obj = vars(module).get(f"_{name}_orig", obj)
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        members = [obj]
        if inspect.isclass(obj):
            # only the standard library's methods: a library may attach its own to a standard-library class when
            # it is imported (transformers adds Logger.warning_once, info_once and warning_advice), which made the
            # data depend on what the process had imported before (3 more docstrings after `deltaplane run` than in
            # a fresh `run_federation`: another split, test accuracy 0.630 against 0.713 for the same RunConfig)
            members += [
                m
                for n, m in sorted(vars(obj).items())
                if not n.startswith("_") and callable(m) and _stdlib(m)
            ]
        for m in members:
            if not (inspect.isroutine(m) or inspect.isclass(m)):
                continue
            doc = inspect.getdoc(m)
            if doc and len(doc) >= min_chars:
                out.append(" ".join(doc.split()))
    return out


def load_stdlib_docstrings(*, min_chars: int = 40, max_chars: int = 400) -> TextDataset:
    """The docstrings of :data:`AREAS`' modules labelled by area (deduplicated, truncated to ``max_chars``).

    A docstring that appears under two areas (re-exported helpers) is dropped, so no text carries two labels.
    """
    texts: dict[str, set[int]] = {}
    classes = tuple(AREAS)
    for label, modules in enumerate(AREAS.values()):
        for module in modules:
            for doc in _docs(module, min_chars):
                texts.setdefault(doc[:max_chars], set()).add(label)
    items = sorted(
        ((t, next(iter(ls))) for t, ls in texts.items() if len(ls) == 1),
        key=lambda x: hashlib.sha256(x[0].encode()).hexdigest(),  # order independent of import order
    )
    return TextDataset([t for t, _ in items], np.array([lab for _, lab in items], dtype=np.int64), classes)

import inspect
import json

import numpy as np

from deltaplane.data.docstrings import AREAS, load_stdlib_docstrings


def test_real_stdlib_docstrings_labelled_by_area():
    d = load_stdlib_docstrings()
    assert len(d) > 1000 and d.classes == tuple(AREAS)
    counts = np.bincount(d.labels, minlength=len(AREAS))
    assert counts.min() >= 50  # every area is represented
    # the texts really are the interpreter's docstrings: json.dumps' own doc is in the "formats" class
    doc = " ".join(inspect.getdoc(json.dumps).split())[:400]
    assert d.labels[d.texts.index(doc)] == d.classes.index("formats")
    assert len(set(d.texts)) == len(d.texts)
    again = load_stdlib_docstrings()
    assert again.texts == d.texts and (again.labels == d.labels).all()


def test_a_method_a_library_attaches_to_a_stdlib_class_is_not_in_the_data(monkeypatch) -> None:
    """transformers adds ``Logger.warning_once`` (and two more) when its logging module is imported: their
    docstrings were in the data only where the process had imported it first, so ``deltaplane run`` (3 more
    texts, another train/test split) and ``run_federation`` in a fresh process scored the same config apart."""
    import logging

    before = load_stdlib_docstrings()

    def warning_once(self, *args: object) -> None:
        """This method is identical to `logger.warning()`, but emits a message only once: not the stdlib's."""

    warning_once.__module__ = "somelibrary.logging"
    monkeypatch.setattr(logging.Logger, "warning_once", warning_once, raising=False)
    after = load_stdlib_docstrings()
    assert after.texts == before.texts and (after.labels == before.labels).all()
    assert not any(t.startswith("This method is identical to `logger.warning()`") for t in after.texts)


def test_a_replaced_warnings_showwarning_keeps_its_docstring(monkeypatch) -> None:
    """``deltaplane run`` replaces ``warnings.showwarning`` while it runs (the stdlib invites it and keeps the
    original as ``_showwarning_orig``): the task it loaded lacked that docstring (1756 texts against 1757)."""
    import warnings

    before = load_stdlib_docstrings()
    monkeypatch.setattr(warnings, "showwarning", lambda *args, **kwargs: None)
    after = load_stdlib_docstrings()
    assert after.texts == before.texts and (after.labels == before.labels).all()

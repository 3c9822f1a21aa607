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

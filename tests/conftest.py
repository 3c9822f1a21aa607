"""Fixtures shared across test folders."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BYO_DOC = Path(__file__).resolve().parents[1] / "docs" / "byo.md"


@pytest.fixture
def byo_task(tmp_path, monkeypatch) -> str:
    """docs/byo.md's ``mytask.py`` (the block starting ``# mytask.py``), written into a user folder on sys.path,
    as a reader would save it; yields the task path ``"mytask:make_task"``."""
    blocks = re.findall(r"```python\n(.*?)```", BYO_DOC.read_text(), re.S)
    (tmp_path / "mytask.py").write_text(next(b for b in blocks if b.startswith("# mytask.py")))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mytask:make_task"
    sys.modules.pop("mytask", None)

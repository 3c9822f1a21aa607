"""The registry's docstring example and the runnable example in docs/ops.md are real."""

import doctest
import re
import subprocess
import sys
from pathlib import Path

import deltaplane.registry.store


def test_store_docstring_example():
    result = doctest.testmod(deltaplane.registry.store, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_ops_doc_example_runs(tmp_path):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ops.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "blocked: True" in out.stdout and "rollback identical: True" in out.stdout

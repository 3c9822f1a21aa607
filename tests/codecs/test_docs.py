"""The Python examples in docs/codecs.md run as written."""

import re
from pathlib import Path

from deltaplane.codecs import base

DOC = Path(__file__).resolve().parents[2] / "docs" / "codecs.md"


def test_codecs_doc_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 4
    scope: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), scope)
        assert "halve" in base.available_codecs()
        x = scope["torch"].randn(8)
        y = base.get_codec("halve").decode(base.get_codec("halve").encode(x, None))
        assert scope["torch"].equal(x, y)
    finally:
        base._REGISTRY.pop("halve", None)  # the example codec must not leak into other tests

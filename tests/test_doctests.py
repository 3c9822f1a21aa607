"""The examples in public docstrings are real: run them."""

import doctest
import importlib

import pytest

MODULES = [
    "deltaplane.delta",
    "deltaplane.seeding",
    "deltaplane.lazy",
    "deltaplane.codecs",
    "deltaplane.codecs.base",
    "deltaplane.codecs.compressor",
    "deltaplane.codecs.policy",
    "deltaplane.aggregation.fedavg",
    "deltaplane.aggregation.accounting",
    "deltaplane.aggregation.clipping",
    "deltaplane.aggregation.dp",
    "deltaplane.aggregation.validation",
    "deltaplane.apps.digits.followup",
    "deltaplane.adapters.lora",
    "deltaplane.adapters.bundle",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0, f"{name} has no examples"


def test_import_deltaplane_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, deltaplane, deltaplane.codecs; "
        "heavy = [m for m in ('fastapi', 'flwr', 'onnx', 'matplotlib', 'transformers', 'uvicorn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import deltaplane pulled in heavy modules: {out}"

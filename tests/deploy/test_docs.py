"""The Python examples in docs/deploy.md run as written."""

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_deploy_doc_example_runs(i):
    torch.manual_seed(0)
    exec(compile(BLOCKS[i], f"docs/deploy.md[{i}]", "exec"), {})


def test_doc_has_examples():
    assert len(BLOCKS) >= 2

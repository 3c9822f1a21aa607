"""Every ```python block of docs/*.md runs, page by page in a scratch folder: the documented API is real."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md") if "```python" in p.read_text())


def _merging_inputs(folder: Path) -> None:
    """The files merging.md's merge_files example reads: its YAML and the three checkpoints it names."""
    from safetensors.torch import save_file

    text = (DOCS / "merging.md").read_text()
    (folder / "merge.yaml").write_text(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    for i, name in enumerate(["base", "math", "code"]):
        (folder / name).mkdir()
        g = torch.Generator().manual_seed(i)
        tensors = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
        save_file(tensors, folder / name / "model.safetensors")


def _byo_task(folder: Path) -> None:
    """byo.md's task file (the block that starts ``# mytask.py``), saved where the page imports it from."""
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "byo.md").read_text(), re.S)
    (folder / "mytask.py").write_text(next(b for b in blocks if b.startswith("# mytask.py")))
    sys.modules.pop("mytask", None)
    sys.path.insert(0, str(folder))


SETUP: dict[str, Callable[[Path], None]] = {
    "merging.md": _merging_inputs,
    "byo.md": _byo_task,
}


def test_the_pages_with_examples_are_found() -> None:
    assert {"core.md", "codecs.md", "aggregation.md", "merging.md", "sim-speed.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_doc_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if page in SETUP:
        SETUP[page](tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)
    namespace: dict = {
        "__name__": "__docs__"
    }  # blocks of one page build on each other, as a reader's session
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} (block {i + 1})", "exec"), namespace)

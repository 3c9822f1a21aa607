"""The layering of docs/core.md holds: import-linter's layers contract (pyproject.toml) is kept.

Runs in `make test`: a lower layer importing a higher one (say the engine importing a driver, or one driver
importing another) fails here with the offending import named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_is_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [exe, "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "deltaplane layers KEPT" in proc.stdout


def test_the_layer_map_in_the_docs_is_the_contract() -> None:
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0][
        "layers"
    ]
    doc = (ROOT / "docs" / "core.md").read_text()
    for layer in layers:
        for package in layer.replace(":", "|").split("|"):
            assert f"`{package.strip()}`" in doc, package

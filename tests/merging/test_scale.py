"""Slow: a ≥1B-parameter synthetic model (many tensors, on disk under /tmp) merges with peak RSS < 2 GB."""

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from deltaplane.merging.checkpoint import SafetensorsWriter

N_TENSORS, ROWS, COLS = 256, 2048, 2048  # 256 × 4.19 M = 1.07 B parameters, 2.1 GB per model in bf16


def _write(folder: Path, seed: int) -> None:
    folder.mkdir()
    names = [f"model.layers.{i}.weight" for i in range(N_TENSORS)]
    with SafetensorsWriter(
        folder / "model.safetensors", [(n, (ROWS, COLS), torch.bfloat16) for n in names]
    ) as w:
        for i, n in enumerate(names):
            t = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(i))
            if seed:
                t += 0.01 * torch.randn(
                    ROWS, COLS, generator=torch.Generator().manual_seed(seed * 10_000 + i)
                )
            w.write(n, t.to(torch.bfloat16))


@pytest.mark.slow
def test_billion_parameter_merge_stays_under_2gb() -> None:
    root = Path(tempfile.mkdtemp(prefix="dp_1b_", dir="/tmp"))
    try:
        for seed, name in enumerate(["base", "a", "b"]):
            _write(root / name, seed)
        cfg = {"merge_method": "ties", "base_model": "base",
               "models": [{"model": m, "parameters": {"density": 0.2, "weight": 1.0}} for m in "ab"]}  # fmt: skip
        (root / "merge.yaml").write_text(yaml.safe_dump(cfg))
        code = textwrap.dedent(f"""
            from deltaplane.merging import merge_files
            r = merge_files({str(root / "merge.yaml")!r}, {str(root / "out")!r})
            hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
            print(r.n_params, hwm // 1024)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        n_params, peak_mb = map(int, out.stdout.split())
        assert n_params >= 1_000_000_000
        assert peak_mb < 2048, peak_mb
        assert (root / "out" / "model.safetensors").stat().st_size > 2 * n_params
    finally:
        shutil.rmtree(root, ignore_errors=True)

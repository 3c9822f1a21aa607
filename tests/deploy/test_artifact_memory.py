"""write_artifact lists a tensor's non-zero positions only when a sparse layout could be smaller."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from deltaplane.codecs.entropy import index_sizes
from deltaplane.deploy import artifact
from deltaplane.deploy.artifact import read_artifact, write_artifact


def test_a_mostly_nonzero_tensor_is_stored_dense_without_listing_its_positions(tmp_path: Path, monkeypatch):
    """Before: every tensor with a zero got np.flatnonzero (8 bytes a position) and its index coded, then the
    dense layout won anyway; on MiniLM's int8 embedding table (11.7 M uint8 codes, a few zeros) that was ~300 MB
    at once, the peak of packing the artifact. Every coder takes at least a bit a position, so such a tensor
    is now known dense from its count of non-zeros alone."""
    a = np.arange(1, 10_001, dtype=np.uint8).reshape(100, 100)
    a[0, :3] = 0

    def listed(*_args, **_kwargs):
        raise AssertionError("positions listed for a tensor that cannot be sparse")

    monkeypatch.setattr(artifact, "encode_indices", listed)
    write_artifact(tmp_path / "a.dpla", {"t": a})
    back = read_artifact(tmp_path / "a.dpla")
    assert np.array_equal(back.tensors["t"], a)


@pytest.mark.parametrize("density", [0.0, 0.02, 0.2, 0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_the_layout_is_the_smaller_of_dense_and_sparse(tmp_path: Path, density: float, dtype: str) -> None:
    """The shortcut changes no choice: sparse exactly when the index plus the values are smaller than dense."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((64, 64)) * 40 + 100).astype(dtype)
    a[rng.random(a.shape) > density] = 0
    info = write_artifact(tmp_path / "a.dpla", {"t": a})
    nz = np.flatnonzero(a)
    bits = a.dtype.itemsize * 8
    sparse = len(nz) < a.size and (
        min(index_sizes(nz, a.size).values()) + math.ceil(len(nz) * bits / 8) < math.ceil(a.size * bits / 8)
    )
    assert info.tensors[0]["layout"] == ("sparse" if sparse else "dense")
    assert np.array_equal(read_artifact(tmp_path / "a.dpla").tensors["t"], a)

"""What a wire session remembers between a round's payloads changes no byte and skips no refusal.

:meth:`WireSession.pack` remembers each tensor's skeleton part by the tree's shape, meta, field lengths and
codings (:func:`~deltaplane.codecs.session._tree_key`), so a round's updates of one codec share the work;
the reference here is a fresh session (nothing remembered) framing each update alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import WireSession
from deltaplane.codecs.fuzzing import SPECS, fuzz_model


def _cold(session: WireSession) -> WireSession:
    """``session`` with nothing remembered (what it framed and read before is forgotten)."""
    for memo in ("_packed", "_skeletons"):
        session.__dict__.pop(memo, None)
    return session


def _updates(n: int, seed: int = 0) -> list[dp.Delta]:
    base = fuzz_model()
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        out.append(
            dp.Delta(
                {
                    k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
                    if v.is_floating_point()
                    else v
                    for k, v in base.items()
                }
            )
        )
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("entropy", [True, False])
def test_pack_remembers_nothing_that_changes_a_byte(spec: str, entropy: bool) -> None:
    layout = dp.Layout.of(fuzz_model())
    session = WireSession.create(layout, spec, base_id="m", entropy=entropy)
    reference = WireSession.create(layout, spec, base_id="m", entropy=entropy)
    for i, d in enumerate(_updates(3)):
        trees, _ = dp.Compressor(spec, error_feedback=False, seed=i).encode(d)
        warm = session.pack(trees, i)
        assert warm == _cold(reference).pack(trees, i)
    assert session._packed  # something was remembered


def test_pack_tells_apart_values_that_compare_equal() -> None:
    """True == 1 and -0.0 == 0.0 in Python, not on the wire: the remembered parts keep them apart."""
    layout = dp.Layout.of(fuzz_model())
    session = WireSession.create(layout, "randk(0.1)", base_id="m")
    reference = WireSession.create(layout, "randk(0.1)", base_id="m")
    trees, _ = dp.Compressor("randk(0.1)", error_feedback=False).encode(_updates(1)[0])
    name = "fc1.weight"
    dtype, tree = trees[name]
    seen = set()
    for seed in [1, True, 0, False, 0.0, -0.0, 1.0, float("nan"), 5, 5]:
        variant = dict(trees)
        variant[name] = (dtype, dataclasses.replace(tree, meta={**tree.meta, "seed": seed}))
        want = _cold(reference).pack(variant, 3)
        assert session.pack(variant, 3) == want
        seen.add(want)
    assert len(seen) == 9  # every distinct value framed differently (the repeated 5 alike)

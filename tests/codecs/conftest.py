"""Helpers the codec tests share: decoding payloads one by one (the reference a batched or remembering
decoder is held to) and comparing the two outcomes exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch

import deltaplane as dp
from deltaplane.codecs import WireSession
from deltaplane.errors import DeltaplaneError


def decode_one_by_one(
    payloads: list[bytes], session: Callable[[], WireSession], base: tuple[str, int]
) -> list[object]:
    """Each payload decoded alone with ``dp.decompress`` in the session ``session()`` gives: its delta, or the
    typed error it raises."""
    out: list[object] = []
    for p in payloads:
        try:
            out.append(dp.decompress(p, session=session(), expect_base=base))
        except DeltaplaneError as exc:
            out.append(exc)
    return out


def assert_same_outcomes(got: list[object], want: list[object]) -> None:
    """The same deltas (dtype and every value) or the same errors (type and message), position by position."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, DeltaplaneError):
            assert type(g) is type(w) and str(g) == str(w)
        else:
            assert isinstance(g, dp.Delta) and list(g) == list(w)  # type: ignore[arg-type]
            for k in w:  # type: ignore[union-attr]
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k])  # type: ignore[index]

"""Helpers the codec tests share: decoding payloads one by one (the reference a batched or remembering
decoder is held to), comparing the two outcomes exactly, and a session per fuzzed codec with the
structure-aware mutator over their payloads."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

import deltaplane as dp
from deltaplane.codecs import WireSession
from deltaplane.codecs.fuzzing import SPECS, Mutator, fuzz_model
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


def fuzz_sessions(seed: int) -> tuple[list[WireSession], Mutator]:
    """A wire session for each of the fuzzer's codecs (``SPECS``, base ``m``) and a mutator, drawing from
    ``seed``, over one plain payload of each (base version 3), whose lies keep a valid checksum."""
    layout = dp.Layout.of(fuzz_model())
    sessions = [WireSession.create(layout, s, base_id="m") for s in SPECS]
    plain = [
        dp.Compressor(s, error_feedback=False, seed=i).compress(
            dp.Delta(fuzz_model()), base_id="m", base_version=3
        )
        for i, s in enumerate(SPECS)
    ]
    return sessions, Mutator(plain, random.Random(seed))

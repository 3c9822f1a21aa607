"""decompress_many: a round's compact payloads decoded together, exactly as one by one.

The reference is :func:`deltaplane.decompress` on each payload alone: the same tensors bit for bit, and for a
malformed payload the same error class and message, whatever its neighbours in the batch are. The malformed
payloads come from the structure-aware fuzzer (CRC-valid lies about shapes, lengths, codings, sessions and
versions) and from a hand-made NaN update with a valid checksum.
"""

from __future__ import annotations

import random
import struct

import crc32c
import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import WireSession, decompress_many
from deltaplane.codecs.fuzzing import SPECS, fuzz_model
from deltaplane.errors import DeltaplaneError, VersionMismatch

from .conftest import assert_same_outcomes, decode_one_by_one, fuzz_sessions


def _valid(spec: str, session: WireSession, n: int) -> list[bytes]:
    base = fuzz_model()
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        d = dp.Delta(
            {
                k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
                if v.is_floating_point()
                else v
                for k, v in base.items()
            }
        )
        out.append(
            dp.Compressor(spec, error_feedback=False, seed=i).compress(d, base_version=3, session=session)
        )
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_valid_payloads_decode_as_one_by_one(spec: str) -> None:
    session = WireSession.create(dp.Layout.of(fuzz_model()), spec, base_id="m")
    payloads = _valid(spec, session, 5)
    got = decompress_many(payloads, session=session, expect_base=("m", 3))
    assert_same_outcomes(got, decode_one_by_one(payloads, lambda: session, ("m", 3)))
    assert all(isinstance(d, dp.Delta) for d in got)


def test_fuzzed_payloads_get_the_one_by_one_errors_whatever_their_neighbours() -> None:
    sessions, mutator = fuzz_sessions(7)
    refused = 0
    for src, session in enumerate(sessions):
        batch = _valid(SPECS[src], session, 3)
        for _ in range(8):
            batch.append(mutator.mutate_compact(sessions, source=src)[0])
        random.Random(src).shuffle(batch)
        want = decode_one_by_one(batch, lambda s=session: s, ("m", 3))
        refused += sum(isinstance(w, DeltaplaneError) for w in want)
        assert_same_outcomes(decompress_many(batch, session=session, expect_base=("m", 3)), want)
    assert refused > 30  # the batches did hold malformed payloads


def _with_nan(payload: bytes, value: torch.Tensor) -> bytes:
    """``payload`` (identity codec) with ``value``'s first float replaced by NaN and the checksum redone."""
    raw = value.contiguous().numpy().tobytes()
    at = payload.index(raw)
    body = payload[:at] + struct.pack("<f", float("nan")) + payload[at + 4 : -4]
    return body + struct.pack("<I", crc32c.crc32c(body))


def test_a_nan_update_is_refused_and_its_neighbours_are_kept() -> None:
    model = fuzz_model()
    session = WireSession.create(dp.Layout.of(model), "identity", base_id="m", entropy=False)
    name = max(model, key=lambda k: model[k].numel())
    good = dp.Compressor("identity", error_feedback=False).compress(
        dp.Delta(model), base_version=3, session=session
    )
    bad = _with_nan(good, model[name])
    batch = [good, bad, good]
    want = decode_one_by_one(batch, lambda: session, ("m", 3))
    assert isinstance(want[1], DeltaplaneError) and "NaN" in str(want[1])
    got = decompress_many(batch, session=session, expect_base=("m", 3))
    assert_same_outcomes(got, want)
    got[0][name].add_(1.0)  # type: ignore[index]  # row views of one stack, yet each update is its own
    assert torch.equal(got[2][name], model[name])  # type: ignore[index]


def test_another_base_model_is_refused_for_the_whole_batch() -> None:
    session = WireSession.create(dp.Layout.of(fuzz_model()), "identity", base_id="m")
    with pytest.raises(VersionMismatch, match="base 'm'"):
        decompress_many(_valid("identity", session, 2), session=session, expect_base=("other", 3))

"""The in-process downlink: an exact, memoryless codec's payload is not decoded again, a lossy one's is."""

from __future__ import annotations

import pytest
import torch

import deltaplane.engine.server as server
from deltaplane.codecs import Compressor, decompress
from deltaplane.delta import Delta
from deltaplane.engine.server import MemoryPublisher


def _update() -> Delta:
    g = torch.Generator().manual_seed(0)
    return Delta({"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)})


def test_a_memoryless_codec_publishes_what_its_payload_decodes_to_without_decoding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publisher = MemoryPublisher(Compressor("identity"), "m")
    update = _update()

    def refuse(*args: object, **kwargs: object) -> Delta:
        raise AssertionError("an identity payload was decoded again")

    monkeypatch.setattr(server, "decompress", refuse)
    payload, applied = publisher.publish(update, base_version=3, lineage={})
    decoded = decompress(payload, expect_base=("m", 3), expect_layout=update)
    assert list(applied) == list(decoded)
    for name, t in decoded.items():
        assert applied[name].dtype == t.dtype and torch.equal(applied[name], t), name
    assert publisher.compressor.state.rounds == 1


def test_a_lossy_codec_publishes_its_decoded_payload() -> None:
    publisher = MemoryPublisher(Compressor("topk(0.1)"), "m")
    update = _update()
    payload, applied = publisher.publish(update, base_version=0, lineage={})
    decoded = decompress(payload, expect_base=("m", 0), expect_layout=update)
    for name, t in decoded.items():
        assert torch.equal(applied[name], t), name
    assert not torch.equal(applied["w"], update["w"])  # top-k sent a tenth: the devices apply that
    assert publisher.compressor.state.residual is not None  # the rest waits in the downlink residual

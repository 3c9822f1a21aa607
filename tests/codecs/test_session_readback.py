"""A wire session read back from its bytes frames and reads exactly as the session it was written from.

A device takes the server's word for the session (``DeviceClient.session``: ``WireSession.from_bytes``), while
the server and the in-process engines use the session they created. The canonical text sorts every object's
keys, so a node's fields come back in another order than the codec wrote them: framing must not depend on a
dict's order, or a device's frames travel whole (twice the bytes for ``stc``) and the server's downlink frames
are refused by the device.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from deltaplane.codecs import Compressor, WireSession
from deltaplane.codecs.compressor import decompress
from deltaplane.delta import Delta

SPECS = [
    "stc(0.006)",
    "stc(0.4)",
    "ternary",
    "sign",
    "quant(bits=8)",
    "topk(0.05) | quant(bits=8)",
    "topk(0.01) | quant(bits=4) | zstd",
    "powersgd(rank=2)",
    "randk(0.1)",
]


def _delta(seed: int) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta(
        {
            "conv.weight": torch.randn(16, 4, 5, 5, generator=g) * 1e-3,
            "fc.weight": torch.randn(64, 300, generator=g) * 1e-3,
            "fc.bias": torch.randn(300, generator=g) * 1e-3,
        }
    )


@pytest.mark.parametrize("spec", SPECS)
def test_a_session_read_back_frames_and_reads_as_the_one_it_came_from(spec: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # codecs that are not contractions warn about error feedback
        made = WireSession.create(dict(_delta(0)), spec)
        read = WireSession.from_bytes(made.to_bytes())
        assert read == made
        for seed in (1, 2):
            delta = _delta(seed)
            by_made = Compressor(spec, error_feedback=False).compress(delta, session=made)
            by_read = Compressor(spec, error_feedback=False).compress(delta, session=read)
            assert by_read == by_made  # the same frame, byte for byte: nothing travels whole
            for payload in (by_made, by_read):
                for session in (made, read):
                    out = decompress(payload, session=session)
                    want = decompress(by_made, session=made)
                    for name in want:
                        assert torch.equal(out[name], want[name])

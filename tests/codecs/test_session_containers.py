"""A wire session text's objects and arrays are bounded by the layout it describes, before it is parsed
(``Limits.session_containers``).

A session text may be 64 MiB, and ``json.loads`` spends ~60-190 bytes of Python objects on each container: a
text of ``[{},{},...]`` cost ~25 bytes of objects a byte (tracemalloc peak of ``WireSession.from_bytes``) and
2-4 s for 4 MiB before the layout check refused it, where honest sessions of every codec hold at most ~10.4
containers a layout row.
"""

import json
import tracemalloc

import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import WireSession
from deltaplane.codecs.fuzzing import SPECS
from deltaplane.codecs.wire import Limits
from deltaplane.errors import DecodeError


def _head(rows: list[bytes]) -> bytes:
    return b'{"base_id":"","codec":"identity","entropy":true,"layout":[' + b",".join(rows) + b'],"template":['


def _rows(n: int) -> list[bytes]:
    return [b'["%x","float32",[]]' % i for i in range(n)]


@pytest.mark.parametrize("unit", [b"{}", b"[]", b'{"a":0}'])
def test_a_session_of_empty_containers_is_refused_before_it_is_parsed(unit: bytes) -> None:
    text = _head([]) + b",".join([unit] * 200_000) + b'],"v":1}'
    tracemalloc.start()
    try:
        with pytest.raises(
            DecodeError, match=r"wire session holds 20000\d JSON objects and arrays for 0 layout"
        ):
            WireSession.from_bytes(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(text)  # the text's bytes, never its parse (was ~22-25x: ~15 MB for [{},{},...])


def test_containers_beyond_the_allowance_of_the_layout_rows_are_refused() -> None:
    """10 minimal rows earn 16 containers each (2 of them their own); the rest go to filler in the template."""
    limits = Limits(min_session_containers=0)

    def text(filler: int) -> bytes:  # the outer object, the layout and template arrays, 2 a row, the filler
        return _head(_rows(10)) + b",".join([b"{}"] * filler) + b'],"v":1}'

    with pytest.raises(DecodeError, match="137 template nodes for 10 tensors"):
        WireSession.from_bytes(text(160 - 20 - 3), limits=limits)  # exactly 160: counted, then parsed
    with pytest.raises(
        DecodeError, match=r"holds 161 JSON objects and arrays for 10 layout rows, more than the 160"
    ):
        WireSession.from_bytes(text(160 - 20 - 2), limits=limits)


@pytest.mark.parametrize("spec", SPECS)
def test_honest_sessions_of_every_codec_fit_without_the_floor(spec: str) -> None:
    """The densest layouts we know (one-character names; empty, scalar and tiny tensors) hold at most 10.4
    containers a row, within the per-row allowance alone."""
    g = torch.Generator().manual_seed(0)
    model = {chr(65 + i): torch.randn((i % 3) * 4, 8, generator=g) for i in range(40)}
    model |= {f"{chr(97 + i)}.bias": torch.randn(0 if i % 2 else 8, generator=g) for i in range(20)}
    model |= {f"s{i}": torch.randn((), generator=g) for i in range(5)} | {
        "n": torch.zeros(3, dtype=torch.int64)
    }
    session = WireSession.create(dp.Layout.of(model), spec, base_id="m")
    assert WireSession.from_bytes(session.to_bytes(), limits=Limits(min_session_containers=0)) == session


def test_rows_are_read_from_the_canonical_text_only() -> None:
    """A row spelled inside a tensor name is not a row; a text that is not canonical earns only the floor."""
    from deltaplane.codecs.session import _layout_rows  # here, so the other tests run on a source without it

    layout = dp.Layout([('x"],["y","float32",[]],["z', (2,), "float32"), ("w", (), "int64")])
    session = WireSession.create(layout, "topk(0.5)")
    text = session.to_bytes()
    assert _layout_rows(text) == 2
    spaced = json.dumps(session.to_json(), sort_keys=True).encode()
    assert _layout_rows(spaced) == 0
    assert WireSession.from_bytes(spaced) == session  # small: the floor covers it
    with pytest.raises(DecodeError, match="for 0 layout rows"):
        WireSession.from_bytes(spaced, limits=Limits(min_session_containers=0))


def test_the_session_text_the_server_sends_earns_its_rows() -> None:
    """``GET /v1/models/{m}/session`` returns ``to_json()`` through starlette: ``"v"`` first, compact, UTF-8
    names unescaped. 300 tensors under ``topk`` hold ~3,000 containers, so the floor alone would not admit
    a model of ~400 tensors."""
    from starlette.responses import JSONResponse

    layout = dp.Layout((f"layer.{i}.wéight", (2, 3), "float32") for i in range(300))
    session = WireSession.create(layout, "topk(0.5)")
    served = bytes(JSONResponse(session.to_json()).body)
    assert served.startswith(b'{"v":1,"base_id":')
    assert WireSession.from_bytes(served, limits=Limits(min_session_containers=0)) == session

"""A receiver that holds the model parses a payload's header within a budget linear in its model.

A zlib header inflates up to ~1000×: a 16 KB CRC-valid payload inflated to the 16 MiB header limit of
``[{},{},...]``, which ``json.loads`` turned into ~420 MB of Python objects before any check could look at it.
With an expected layout the header may inflate to at most ``Limits.header_budget`` of that layout."""

import json
import tracemalloc
import zlib

import crc32c
import pytest
import torch

import deltaplane as dp
from deltaplane.codecs.wire import _CRC, _PREFIX, FLAG_ZLIB_HEADER, MAGIC, VERSION, Limits
from deltaplane.errors import DecodeError


def _frame(raw_header: bytes) -> bytes:
    """A payload whose zlib header is ``raw_header`` and whose body is empty, its CRC right."""
    head = zlib.compress(raw_header, 9)
    frame = _PREFIX.pack(MAGIC, VERSION, FLAG_ZLIB_HEADER, len(head)) + head
    return frame + _CRC.pack(crc32c.crc32c(frame))


def _bomb(raw_bytes: int) -> bytes:
    """``raw_bytes`` of header JSON, nearly all of it empty objects in the metadata (~25 bytes of Python
    objects per byte of JSON)."""
    return _frame(b'{"t":[],"meta":{"a":[' + b"{}," * (raw_bytes // 3 - 12) + b"{}]}}")


MODEL = {"fc.weight": torch.zeros(8, 16), "fc.bias": torch.zeros(8)}


def test_a_header_bomb_is_refused_before_it_is_parsed() -> None:
    payload = _bomb(16 << 20)
    assert len(payload) < 20_000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=r"inflates beyond the \d+-byte header limit"):
            dp.decompress(payload, expect_layout=MODEL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    budget = Limits().header_budget(2, len("fc.weight") + len("fc.bias"))
    assert budget < 1.1 * (1 << 20)
    assert peak < 4 * budget  # the inflated header and the layout, never its parse (was ~420 MB)


def test_a_small_header_bomb_without_a_layout_still_decodes_as_before() -> None:
    """A standalone file (no layout) keeps ``Limits.max_header_bytes``: a header of a few KB is read."""
    got = dp.decompress(_bomb(4096))
    assert len(got) == 0


def test_honest_headers_fit_the_budget_without_its_floor() -> None:
    """The per-tensor allowance alone covers honest headers: many tensors with long, non-ASCII names
    (escaped by JSON to 12 bytes a character), a nested pipeline, and adapter-sized metadata."""
    names = [f"model.layers.{i}.\U0001f600\u00e9.mlp.down_proj.weight" for i in range(300)]
    model = {n: torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    limits = Limits(min_header_bytes=0)
    for spec in ("identity", "topk(0.5) | quant(bits=4)", "powersgd(rank=1, min_size=4)"):
        payload = dp.Compressor(spec, seed=0).compress(dp.Delta(model), base_id="m", meta={"note": "x" * 100})
        got = dp.decompress(payload, expect_layout=model, limits=limits)
        assert sorted(got) == sorted(names)
    header_chars = len(json.dumps(names))
    assert limits.header_budget(len(names), sum(map(len, names))) > header_chars


def test_the_header_budget_is_linear_in_the_layout_and_capped() -> None:
    limits = Limits()
    assert limits.header_budget() == limits.max_header_bytes
    assert limits.header_budget(0) == limits.min_header_bytes
    assert limits.header_budget(10, 100) == (1 << 20) + 10 * 4096 + 1200
    assert limits.header_budget(10**6) == limits.max_header_bytes


def test_a_raw_header_over_the_layout_budget_is_refused_by_its_length() -> None:
    raw = b'{"t":[],"meta":{"a":"' + b"x" * (2 << 20) + b'"}}'
    frame = _PREFIX.pack(MAGIC, VERSION, 0, len(raw)) + raw
    payload = frame + _CRC.pack(crc32c.crc32c(frame))
    with pytest.raises(DecodeError, match=r"header of \d+ bytes exceeds the \d+-byte header limit"):
        dp.decompress(payload, expect_layout=MODEL)
    assert len(dp.decompress(payload)) == 0  # a standalone file may carry it

"""A receiver that holds the model parses a payload's header within a budget linear in its model.

A zlib header inflates up to ~1000×: a 16 KB CRC-valid payload inflated to the 16 MiB header limit of
``[{},{},...]``, which ``json.loads`` turned into ~420 MB of Python objects before any check could look at it.
With an expected layout the header may inflate to at most ``Limits.header_budget`` of that layout; with or
without one it may hold at most ``Limits.header_values`` of the payload's size, counted while it inflates."""

import json
import tracemalloc
import zlib

import crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
    values = Limits(min_header_values=1 << 30, max_header_values=1 << 30)  # the byte budget alone
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=r"inflates beyond the \d+-byte header limit"):
            dp.decompress(payload, expect_layout=MODEL, limits=values)
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


def _raw_frame(raw_header: bytes) -> bytes:
    """A payload whose uncompressed header is ``raw_header`` and whose body is empty, its CRC right."""
    frame = _PREFIX.pack(MAGIC, VERSION, 0, len(raw_header)) + raw_header
    return frame + _CRC.pack(crc32c.crc32c(frame))


def test_a_header_bomb_without_a_layout_is_refused_while_it_inflates() -> None:
    """A standalone payload (``deltaplane decompress`` without ``--base``) kept the 16 MiB header limit, so
    the 16 KB bomb made ~420 MB of objects (peak RSS +400 MB); its values are now counted per inflated step."""
    payload = _bomb(16 << 20)
    cap = Limits().header_values(len(payload))
    assert cap == (1 << 17) + 16 * len(payload) < 400_000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=rf"more than {cap} JSON values .* {len(payload)}-byte payload"):
            dp.decompress(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * cap + (1 << 20)  # ~3 bytes a value of inflated steps, never the parse (was ~420 MB)


def test_the_value_limit_is_exact_at_its_cap() -> None:
    """``1 +`` the commas, brackets and braces bound what ``json.loads`` builds: a header at the cap is read,
    one more value is refused, whether the header is compressed or not."""
    limits = Limits(min_header_values=40, header_values_per_byte=0)

    def header(zeros: int) -> bytes:  # values: 1 + 2 ("{" and "[") + 1 ("," after []) + 1 ("{") + zeros
        return b'{"t":[],"meta":{"a":[' + b",".join([b"0"] * zeros) + b"]}}"

    for frame in (_frame, _raw_frame):
        assert len(dp.decompress(frame(header(35)), limits=limits)) == 0
        with pytest.raises(DecodeError, match="more than 40 JSON values"):
            dp.decompress(frame(header(36)), limits=limits)


def test_honest_multi_thousand_tensor_payloads_fit_the_value_limit_without_its_floor() -> None:
    """The per-byte allowance alone covers honest standalone payloads: 2,000 tensors of 3 values each under a
    nested pipeline (~21 values a tensor in ~15 payload bytes) and 2,000 empty tensors (nothing in the body;
    ~19 values a tensor in ~3 bytes); docs/wire-format.md §6 quotes 5,000 and 20,000."""
    limits, n = Limits(min_header_values=0), 2000
    for shape, spec in (((3,), "topk(0.01) | quant(bits=4)"), ((0,), "topk(0.01)")):
        model = {f"model.layers.{i}.mlp.w": torch.ones(shape) for i in range(n)}
        payload = dp.Compressor(spec, seed=0).compress(dp.Delta(model), base_id="m")
        assert len(dp.decompress(payload, limits=limits)) == n


def test_a_truncated_compressed_header_is_refused() -> None:
    head = zlib.compress(b'{"t":[]}', 9)[:-3]
    frame = _PREFIX.pack(MAGIC, VERSION, FLAG_ZLIB_HEADER, len(head)) + head
    with pytest.raises(DecodeError, match="compressed header is truncated"):
        dp.decompress(frame + _CRC.pack(crc32c.crc32c(frame)))


def test_bytes_after_a_compressed_headers_stream_are_refused() -> None:
    """The header's declared length must end with its zlib stream: bytes after it were read past unchecked,
    so one payload had many CRC-valid spellings (the format says the stream must end exactly)."""
    honest = zlib.compress(b'{"t":[]}', 9)
    for head, ok in ((honest, True), (honest + b"junk", False), (honest + honest, False)):
        frame = _PREFIX.pack(MAGIC, VERSION, FLAG_ZLIB_HEADER, len(head)) + head
        payload = frame + _CRC.pack(crc32c.crc32c(frame))
        if ok:
            assert dict(dp.decompress(payload)) == {}
        else:
            with pytest.raises(DecodeError, match="bytes after its stream ends"):
                dp.decompress(payload)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=30,
)


def _values(doc: object) -> int:
    items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    return 1 + sum(map(_values, items))


@settings(max_examples=200, deadline=None)
@given(_JSON)
def test_the_count_bounds_the_values_json_builds(doc: object) -> None:
    # imported here, not at the top: the other tests of this file also run against a reader without it
    from deltaplane.codecs.wire import _ValueCount

    count = _ValueCount(1 << 30, 0)
    count.add(json.dumps(doc, separators=(",", ":")).encode())
    assert count.values >= _values(doc)

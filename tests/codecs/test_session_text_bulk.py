"""A wire session's text is checked in bulk (``node_shapes_in_bulk``, ``Layout._from_canonical_rows``) and
accepts and refuses exactly what the node-by-node reader did.

``WireSession.from_json`` took ~5 µs a layout row and ~10 µs a template node, one Python check after another
(1-2 s for 4 MiB of tiny tensors on a shared core, more when the garbage collector ran a full pass over the
parsed text); it now decides each rule for all rows at once and falls back to the reader only when that is not
sure. The reference here is the code as it was, kept verbatim but for the one rule added since (a layout
row's shape must be a list), run on a fuzz corpus: sessions of every codec
whose tables get the wire fuzzer's mutations (:class:`~deltaplane.codecs.fuzzing.Mutator`) and session-only
ones (layout rows, types JSON cannot hold, limits).
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
from typing import Any

import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import Layout, WireSession
from deltaplane.codecs.base import get_codec
from deltaplane.codecs.fuzzing import SPECS, Buf, Mutator, fuzz_model
from deltaplane.codecs.session import COMPACT_VERSION
from deltaplane.codecs.wire import Limits, _Reader
from deltaplane.errors import CodecError, DecodeError, DeltaplaneError, ShapeMismatch, SpecError


# -- the reference: the session reader as it was, node by node ---------------------------------------------
def _old_layout(doc: Any) -> Layout:
    if not isinstance(doc, list) or not all(
        isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], str) for r in doc
    ):
        raise DecodeError("layout must be a list of [name, dtype, shape] rows")
    try:
        return Layout(map(_text_row, doc, range(len(doc))))
    except (ShapeMismatch, TypeError) as exc:
        raise DecodeError(f"malformed layout: {exc}") from None


def _text_row(row: list[Any], i: int) -> tuple[Any, ...]:
    """The one rule added since: a row's shape is a list (``""`` and ``{}`` read as ``()`` before)."""
    name, dtype, shape = row
    if not isinstance(shape, list):
        raise DecodeError(
            f"layout row {i} ('{name}'): shape must be a JSON array of integers >= 0, got {shape!r:.80}"
        )
    return name, shape, dtype


def _old_from_json(doc: Any, limits: Limits | None = None) -> WireSession:
    limits = limits or Limits()
    if not isinstance(doc, dict) or set(doc) != {"v", "base_id", "codec", "entropy", "layout", "template"}:
        raise DecodeError("wire session must be an object with v, base_id, codec, entropy, layout, template")
    if doc["v"] != COMPACT_VERSION:
        raise DecodeError(f"wire session version {doc['v']!r}; this deltaplane reads {COMPACT_VERSION}")
    if not isinstance(doc["base_id"], str) or not isinstance(doc["codec"], str):
        raise DecodeError("wire session: base_id and codec must be strings")
    if not isinstance(doc["entropy"], bool) or not isinstance(doc["template"], list):
        raise DecodeError("wire session: entropy must be a boolean and template a list")
    layout = _old_layout(doc["layout"])
    try:
        spec = get_codec(doc["codec"]).spec
    except SpecError as exc:
        raise DecodeError(f"wire session: {exc}") from None
    if len(doc["template"]) != len(layout):
        raise DecodeError(f"wire session: {len(doc['template'])} template nodes for {len(layout)} tensors")
    reader = _Reader(limits)
    for (name, t), node in zip(layout.items(), doc["template"], strict=True):
        tree = reader.node(node, f"template of '{name}'", 0)
        if tree.shape != t.shape:
            raise DecodeError(f"wire session: template of '{name}' has shape {list(tree.shape)}")
    try:
        return WireSession(layout, spec, doc["base_id"], doc["entropy"], tuple(doc["template"]))
    except CodecError as exc:
        raise DecodeError(str(exc)) from None


def _outcome(read: Any, doc: Any, limits: Limits | None) -> tuple[Any, ...]:
    """What reading ``doc`` gives: the session (its canonical bytes and its layout's entries, types and all)
    or the error's class and message."""
    try:
        s = read(copy.deepcopy(doc), limits=limits)
    except DeltaplaneError as exc:
        return type(exc), str(exc)
    entries = [(k, v.shape, tuple(map(type, v.shape)), v.dtype) for k, v in s.layout.items()]
    return "read", s.to_bytes(), entries, s.template == tuple(doc["template"])


# -- the corpus ---------------------------------------------------------------------------------------------
class _Int(int):
    pass


class _Dict(dict):  # type: ignore[type-arg]
    pass


class _Str(str):
    __slots__ = ()


def _plain(node: Any) -> Any:
    """A mutated table node as a session template holds it: byte fields as their lengths."""
    if isinstance(node, Buf):
        return len(node.data)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _session_doc(session: WireSession, table: Any) -> dict[str, Any]:
    """``session``'s text with its layout rows and template taken from a (mutated) payload table: a row's
    shape is the model's for a name the model has, else its node's."""
    doc = session.to_json()
    if not isinstance(table, list):
        doc["template"] = _plain(table)
        return doc
    shapes = {name: list(t.shape) for name, t in session.layout.items()}
    layout, template = [], []
    for row in table:
        if isinstance(row, list) and len(row) == 3:
            name, dtype, node = row
            shape = node.get("s") if isinstance(node, dict) else None
            layout.append([name, dtype, shapes.get(name, shape) if isinstance(name, str) else shape])
            template.append(_plain(node))
        else:
            layout.append(_plain(row))
            template.append(_plain(row))
    doc["layout"], doc["template"] = layout, template
    return doc


_ODD_VALUES = [True, False, 2.0, -1, 0, 2**40, 2**63, None, "2", [2], {}, [], "", _Int(2), _Str("x")]


def _session_mutation(doc: dict[str, Any], rnd: random.Random) -> None:
    """One session-only lie: a layout row or a template node with values the payload mutations do not make
    (values JSON cannot hold among them: the bulk checks must send those to the reader)."""
    rows, nodes = doc["layout"], doc["template"]
    i = rnd.randrange(len(rows)) if rows else 0
    choice = rnd.randrange(15)
    if not rows:
        doc["layout"] = rnd.choice([None, {}, "x", [[]]])
    elif choice == 0:  # a dimension of the layout row
        shape = list(rows[i][2]) if isinstance(rows[i][2], list) else []
        if shape:
            shape[rnd.randrange(len(shape))] = rnd.choice(_ODD_VALUES)
        else:
            shape.append(rnd.choice(_ODD_VALUES))
        rows[i][2] = shape
    elif choice == 1:  # a dimension of the node, alone or the row's too
        node = nodes[i]
        if isinstance(node, dict) and isinstance(node.get("s"), list) and node["s"]:
            j = rnd.randrange(len(node["s"]))
            v = rnd.choice([True, 2.0, _Int(node["s"][j]), float(node["s"][j]), node["s"][j] == 1])
            node["s"][j] = v
            if rnd.random() < 0.3 and isinstance(rows[i][2], list) and len(rows[i][2]) > j:
                rows[i][2][j] = v
    elif choice == 2:  # the row's shape spelled another way
        rows[i][2] = rnd.choice(
            [tuple(rows[i][2]) if isinstance(rows[i][2], list) else (), "", "12", {}, None, [[1]]]
        )
    elif choice == 3:  # the row itself
        rows[i] = rnd.choice([[*rows[i], 0], rows[i][:2], tuple(rows[i]), "x", None, [rows[i][0], 7, []]])
    elif choice == 4:  # a name repeated, or no string
        rows[i][0] = rnd.choice([rows[rnd.randrange(len(rows))][0], 3, None, _Str(str(rows[i][0]))])
    elif choice == 5:  # a dtype
        rows[i][1] = rnd.choice(["float32", "int64", "complex64", "", 3, _Str("float32"), "Float32"])
    elif choice == 6:  # the node in a container JSON does not make, or a subclass of one
        if isinstance(nodes[i], dict):
            node = _Dict(nodes[i]) if rnd.random() < 0.5 else dict(nodes[i])
            if rnd.random() < 0.5 and isinstance(node.get("f"), dict):
                node["f"] = _Dict(node["f"])
            nodes[i] = node
    elif choice == 7:  # a field's length
        node = nodes[i]
        if isinstance(node, dict) and isinstance(node.get("f"), dict) and node["f"]:
            k = rnd.choice(list(node["f"]))
            node["f"][k] = rnd.choice(_ODD_VALUES)
    elif choice == 8:  # meta
        node = nodes[i]
        if isinstance(node, dict):
            node["m"] = rnd.choice([{"a": v} for v in _ODD_VALUES] + [[], None, _Dict(a=1), {}])
    elif choice == 9:  # the codec string
        node = nodes[i]
        if isinstance(node, dict):
            node["c"] = rnd.choice(["", "x" * 4000, "x" * 4001, 3, None, _Str("fp16"), "nosuch"])
    elif choice == 10:  # node keys
        node = nodes[i]
        if isinstance(node, dict):
            key = rnd.choice(["c", "s", "f", "m", "x"])
            if key in node and rnd.random() < 0.5:
                del node[key]
            else:
                node[key] = {} if key in "mf" else 1
    elif choice == 11:  # nesting beyond the depth limit
        node: Any = nodes[i]
        for _ in range(rnd.randint(1, 12)):
            node = {"c": "topk(ratio=1.0)", "s": [1], "f": {"idx": 1, "values": node}}
        nodes[i] = node
    elif choice == 12:  # a template of another length
        if rnd.random() < 0.5:
            nodes.pop()
        else:
            nodes.append(copy.deepcopy(nodes[0]))
    elif choice == 13:  # the scalar keys
        key = rnd.choice(["v", "base_id", "codec", "entropy", "extra"])
        doc[key] = rnd.choice([*_ODD_VALUES, "fp16", "nosuch(", 1])
    else:  # a huge dimension in both row and node (the layout takes it, the node limit does not)
        big = rnd.choice([2**34, 2**34 + 1, 2**40])
        rows[i][2] = [0, big] if rnd.random() < 0.5 else [big]
        if isinstance(nodes[i], dict):
            nodes[i]["s"] = list(rows[i][2])


_LIMITS = [None, None, None, Limits(max_depth=1), Limits(max_numel=300), Limits(max_numel=0)]


@pytest.fixture(scope="module")
def corpus() -> list[tuple[dict[str, Any], Limits | None]]:
    """~2,400 session texts: honest ones of every codec, payload-mutated, session-mutated, and both."""
    model = fuzz_model()
    delta = dp.Delta(model)
    sessions = [WireSession.create(dp.Layout.of(model), spec, base_id="fuzz") for spec in SPECS]
    payloads = [dp.Compressor(spec, error_feedback=False, seed=0).compress(delta) for spec in SPECS]
    rnd = random.Random(0)
    mutator = Mutator(payloads, rnd)
    out: list[tuple[dict[str, Any], Limits | None]] = [(s.to_json(), None) for s in sessions]
    for n in range(2400):
        table_doc, _, _, src = mutator.mutate_doc() if n % 3 else (mutator.pool[n % len(SPECS)].doc, 0, 0, 0)
        src = src if n % 3 else n % len(SPECS)
        doc = _session_doc(sessions[src], copy.deepcopy(table_doc).get("t"))
        if n % 3 != 1:
            for _ in range(rnd.choice([1, 1, 2])):
                # an earlier mutation may leave no place for this one: the text stays as it is
                with contextlib.suppress(TypeError, KeyError, IndexError, AttributeError, ValueError):
                    _session_mutation(doc, rnd)
        out.append((doc, rnd.choice(_LIMITS)))
    return out


def test_the_bulk_checks_accept_and_refuse_exactly_what_the_node_reader_did(corpus) -> None:
    outcomes: dict[str, int] = {}
    for doc, limits in corpus:
        want = _outcome(_old_from_json, doc, limits)
        got = _outcome(WireSession.from_json, doc, limits)
        assert got == want, (json.dumps(doc, default=repr)[:400], limits)
        name = want[0] if isinstance(want[0], str) else want[0].__name__
        outcomes[name] = outcomes.get(name, 0) + 1
    # the corpus reaches both sides of the decision, and the session-only lies are not all refused early
    assert outcomes["read"] > 200 and outcomes["DecodeError"] > 1000, outcomes


def test_every_layout_row_is_read_as_the_constructor_reads_it(corpus) -> None:
    """Layout.from_json alone, against the constructor row by row: the same layout or the same error."""

    def outcome(read: Any, rows: Any) -> tuple[Any, ...]:
        try:
            layout = read(copy.deepcopy(rows))
        except DeltaplaneError as exc:
            return type(exc), str(exc)
        return tuple((k, v.shape, tuple(map(type, v.shape)), v.dtype) for k, v in layout.items())

    for doc, _ in corpus:
        if isinstance(doc, dict) and "layout" in doc:
            assert outcome(Layout.from_json, doc["layout"]) == outcome(_old_layout, doc["layout"])


def test_the_bulk_layout_reads_what_the_row_by_row_path_reads(corpus) -> None:
    """What ``_from_canonical_rows`` accepts, the row-by-row path accepts as the same layout (types and all);
    what that path refuses, the bulk one is not sure of."""

    def entries(layout: Layout) -> list[Any]:
        return [(k, v.shape, tuple(map(type, v.shape)), v.dtype) for k, v in layout.items()]

    bulk = 0
    for doc, _ in corpus:
        rows = doc.get("layout") if isinstance(doc, dict) else None
        fast = Layout._from_canonical_rows(copy.deepcopy(rows))
        try:
            slow: Any = entries(_old_layout(copy.deepcopy(rows)))
        except DecodeError as exc:
            slow = str(exc)
        if fast is not None:
            bulk += 1
            assert entries(fast) == slow
    assert bulk > 500


@pytest.mark.parametrize("shape", ["", "12", "2", {}, {"a": 1}, None, 3, (2, 2), [[2]], [True], [2.0], [-1]])
def test_a_layout_row_whose_shape_is_no_array_of_dimensions_is_refused_naming_the_row(shape: Any) -> None:
    """A string, an object or a number is no shape: ``""`` and ``{}`` read as a scalar's ``()`` before, a
    tuple (not JSON) as its dimensions; both paths refuse, the bulk one by leaving it to the row path."""
    rows = [["a", "float32", [2, 2]], ["b", "float32", shape]]
    assert Layout._from_canonical_rows(copy.deepcopy(rows)) is None
    with pytest.raises(DecodeError, match=r"layout row 1 \('b'\)|tensor 'b' has shape") as err:
        Layout.from_json(rows)
    if not isinstance(shape, list):
        assert "shape must be a JSON array of integers >= 0" in str(err.value)
    doc = WireSession.create(
        Layout.from_json([["a", "float32", [2, 2]], ["b", "float32", [0]]]), "fp16"
    ).to_json()
    doc["layout"][1][2] = shape
    with pytest.raises(DecodeError, match=r"layout row 1 \('b'\)|tensor 'b' has shape"):
        WireSession.from_json(doc)


def test_honest_sessions_are_read_without_the_node_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Honest texts (every codec, and 3,000 tiny tensors) never reach the node-by-node reader nor the layout
    constructor's row loop: what made a 4 MiB session of tiny tensors take seconds."""
    g = torch.Generator().manual_seed(0)
    tiny = {f"block{i}.w": torch.randn(2, 2, generator=g) for i in range(3000)}
    sessions = [WireSession.create(dp.Layout.of(fuzz_model()), spec, base_id="fuzz") for spec in SPECS]
    sessions.append(WireSession.create(dp.Layout.of(tiny), "powersgd(rank=2)", base_id="tiny"))
    texts = [s.to_bytes() for s in sessions]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the node-by-node path ran on an honest session")

    monkeypatch.setattr(_Reader, "node", refuse)
    monkeypatch.setattr(Layout, "__init__", refuse)
    for s, text in zip(sessions, texts, strict=True):
        got = WireSession.from_bytes(text)
        assert got.to_bytes() == text and got.id == s.id and got.layout.to_json() == s.layout.to_json()


@pytest.mark.parametrize(
    ("node", "fine"),
    [
        ({"c": "fp16", "s": [2], "f": {"data": 4}}, True),
        ({"c": "fp16", "s": [True], "f": {"data": 4}}, False),  # a bool is no dimension
        ({"c": "fp16", "s": [2.0], "f": {"data": 4}}, False),
        ({"c": "fp16", "s": [2], "f": {"data": True}}, False),
        ({"c": "fp16", "s": [2], "f": {"data": -1}}, False),
        ({"c": "fp16", "s": [2], "m": {"a": [1]}, "f": {"data": 4}}, False),
        ({"c": "", "s": [2], "f": {"data": 4}}, False),
        ({"c": "fp16", "s": [1] * 17, "f": {"data": 4}}, False),
        ({"c": "fp16", "s": [0, 2**35], "f": {"data": 4}}, False),  # numel 0, a dimension beyond the limit
        ({"c": "topk", "s": [2], "f": {"idx": 1, "values": {"c": "fp16", "s": [1], "f": {"data": 2}}}}, True),
        ({"c": "topk", "s": [2], "f": {"idx": 1, "values": {"c": "fp16", "s": [1], "f": {"d": -2}}}}, False),
    ],
)
def test_a_bulk_verdict_is_the_readers(node: dict[str, Any], fine: bool) -> None:
    """What the bulk check is sure of, the reader accepts; what the reader refuses, the bulk check is not
    sure of (the values a 4 MiB session would repeat 70,000 times, one at a time)."""
    from deltaplane.codecs.wire import node_shapes_in_bulk  # here: the corpus tests run on the old source too

    limits = Limits()
    try:
        _Reader(limits).node(copy.deepcopy(node), "n", 0)
        reader_fine = True
    except DecodeError:
        reader_fine = False
    assert reader_fine is fine
    shapes = node_shapes_in_bulk([node] * 3, limits)
    assert (shapes is not None) is fine
    if fine:
        assert shapes == [node["s"]] * 3

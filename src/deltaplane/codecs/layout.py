"""The layout a receiver expects an update to have: tensor names, shapes and dtypes, in order.

A receiver always knows its model, so it knows what a legitimate update for it looks like; checking a
payload's tensor table against that layout *before* decoding anything means a small payload cannot declare a
huge tensor (a size bomb), a tensor the model lacks, or a dtype it does not hold. ``decompress(payload,
expect_layout=Layout.of(model_state))`` does this (see :func:`~deltaplane.codecs.compressor.decompress`).

A layout is also a value both sides can agree on once and then refer to: :meth:`Layout.to_json` is a
canonical, order-preserving text form and :meth:`Layout.digest` its SHA-256, so a session can fix the layout
up front and later payloads need not repeat the tensor table (see issue #16).

Example:
    >>> import torch
    >>> from deltaplane.codecs import Layout
    >>> layout = Layout.of({"fc.weight": torch.zeros(10, 64), "steps": torch.zeros(1, dtype=torch.int64)})
    >>> layout["fc.weight"].shape, layout.numel
    ((10, 64), 641)
    >>> Layout.from_json(layout.to_json()) == layout
    True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, tee
from operator import itemgetter
from typing import Any, NamedTuple

import torch
from torch import Tensor

from deltaplane.codecs.quantize import DTYPE_NAMES, DTYPES
from deltaplane.errors import DecodeError, ShapeMismatch

__all__ = ["Layout", "TensorLayout"]

#: the dtype names a layout row may give (what :class:`Layout` accepts as a string)
_DTYPES_BY_NAME = {name: dt for name, dt in DTYPES.items() if dt in DTYPE_NAMES}


def _text_row(row: list[Any], i: int) -> tuple[str, list[int], str]:
    """Layout text row ``i`` (``[name, dtype, shape]``) as a constructor entry; its shape must be a list (a JSON
    array): what the constructor then checks, row by row and in order, is its dimensions."""
    name, dtype, shape = row
    if not isinstance(shape, list):
        raise DecodeError(
            f"layout row {i} ('{name}'): shape must be a JSON array of integers >= 0, got {shape!r:.80}"
        )
    return name, shape, dtype


class TensorLayout(NamedTuple):
    """One tensor of a layout: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Layout(Mapping[str, TensorLayout]):
    """An ordered mapping ``name -> TensorLayout(shape, dtype)``: what a model's updates must look like.

    Build one from a state dict or a :class:`~deltaplane.delta.Delta` (:meth:`of`), from text
    (:meth:`from_json`) or from ``(name, shape, dtype)`` triples. It is immutable and compares by value.
    """

    __slots__ = ("_digest", "_entries")

    def __init__(self, entries: Iterable[tuple[str, Sequence[int], torch.dtype | str]]) -> None:
        out: dict[str, TensorLayout] = {}
        for name, shape, dtype in entries:
            if not isinstance(name, str) or name in out:
                raise ShapeMismatch(
                    f"layout: tensor names must be unique strings, got {name!r} twice or not a string"
                )
            dims = tuple(shape)
            if not all(type(d) is int and d >= 0 for d in dims):
                raise ShapeMismatch(
                    f"layout: tensor '{name}' has shape {list(dims)}; dimensions are integers >= 0"
                )
            dt = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
            if dt not in DTYPE_NAMES:
                raise ShapeMismatch(
                    f"layout: tensor '{name}' has dtype {dtype!r}; supported: {', '.join(DTYPES)}"
                )
            out[name] = TensorLayout(dims, dt)
        self._entries = out
        self._digest: str | None = None  # computed on first use: hashing a layout (dict keys) needs it

    @classmethod
    def of(cls, state: Mapping[str, Tensor] | Layout) -> Layout:
        """The layout of a state dict or delta (names in its order), or ``state`` itself if it is one."""
        if isinstance(state, Layout):
            return state
        return cls((k, tuple(v.shape), v.dtype) for k, v in state.items())

    # -- mapping -------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TensorLayout:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and list(self._entries.items()) == list(other._entries.items())

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return f"Layout({len(self)} tensors, {self.numel} values, digest={self.digest()[:12]})"

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Values in all tensors."""
        return sum(t.numel for t in self._entries.values())

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors in their own dtypes (the model's size)."""
        return sum(t.numel * t.dtype.itemsize for t in self._entries.values())

    @property
    def decoded_bytes(self) -> int:
        """Bytes a decoder works in: every value at least 4 (codecs decode to float32, then cast)."""
        return sum(t.numel * max(4, t.dtype.itemsize) for t in self._entries.values())

    # -- subsets -------------------------------------------------------------------------------------------
    def only(self, names: Iterable[str]) -> Layout:
        """The layout of just ``names`` (in this layout's order); every name must be in it."""
        keep = set(names)
        unknown = keep - set(self._entries)
        if unknown:
            raise ShapeMismatch(f"layout has no tensor(s) {sorted(unknown)[:5]}")
        return Layout((k, v.shape, v.dtype) for k, v in self._entries.items() if k in keep)

    def without(self, names: Iterable[str]) -> Layout:
        """This layout less ``names`` (e.g. the layers a personalized device keeps to itself)."""
        drop = set(names)
        return Layout((k, v.shape, v.dtype) for k, v in self._entries.items() if k not in drop)

    # -- text form -----------------------------------------------------------------------------------------
    def to_json(self) -> list[list[Any]]:
        """``[[name, dtype name, shape], ...]`` in order: canonical, so equal layouts give equal text."""
        return [[k, DTYPE_NAMES[v.dtype], list(v.shape)] for k, v in self._entries.items()]

    @classmethod
    def from_json(cls, doc: Any) -> Layout:
        """Inverse of :meth:`to_json`; anything malformed is a :class:`~deltaplane.errors.DecodeError`.

        A row's shape must be a JSON array of integers >= 0: the constructor takes any sequence, but in text
        a string or an object is no shape (``""`` and ``{}`` would read as a scalar's ``()``)."""
        fast = cls._from_canonical_rows(doc)
        if fast is not None:
            return fast
        if not isinstance(doc, list) or not all(
            isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[1], str)
            for r in doc
        ):
            raise DecodeError("layout must be a list of [name, dtype, shape] rows")
        try:
            return cls(map(_text_row, doc, range(len(doc))))
        except (ShapeMismatch, TypeError) as exc:
            raise DecodeError(f"malformed layout: {exc}") from None

    @classmethod
    def _from_canonical_rows(cls, doc: Any) -> Layout | None:
        """The layout of ``doc`` if it is certainly valid text of :meth:`to_json` (unique string names, known
        dtype names, lists of integers >= 0 as shapes), else ``None``: not sure, let the constructor say what is
        wrong. A wire session's layout can hold 100,000 rows; each rule here is one C-level pass over all of
        them (``map``, ``set``, ``min``) instead of ~5 µs of Python a row, and only exact JSON types pass, so
        what this accepts the constructor accepts, as the same layout."""
        if type(doc) is not list or not doc or set(map(type, doc)) != {list} or set(map(len, doc)) != {3}:
            return None
        # columns by itemgetter: zip(*doc) would make an iterator per row
        names, dtypes, shapes = (list(map(itemgetter(i), doc)) for i in range(3))
        if set(map(type, names)) != {str} or len(set(names)) != len(names):
            return None
        if set(map(type, dtypes)) != {str} or not set(dtypes) <= _DTYPES_BY_NAME.keys():
            return None
        if set(map(type, shapes)) != {list}:
            return None
        dims = list(chain.from_iterable(shapes))
        if dims and (set(map(type, dims)) != {int} or min(dims) < 0):
            return None
        # rows of equal shape and dtype share one (immutable) entry: a layout of many tiny tensors holds a few
        # distinct ones, and ~2 objects a row fewer that outlive this call keep the garbage collector's full
        # passes (over the whole parsed session) away
        rows = tee(map(TensorLayout, map(tuple, shapes), map(_DTYPES_BY_NAME.__getitem__, dtypes)))
        distinct: dict[TensorLayout, TensorLayout] = {}
        out = cls.__new__(cls)
        out._entries = dict(zip(names, map(distinct.setdefault, *rows), strict=True))
        out._digest = None
        return out

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical text form: two parties holding equal layouts get equal digests."""
        if self._digest is None:  # a layout never changes: worked out once
            text = json.dumps(self.to_json(), separators=(",", ":"))
            self._digest = hashlib.sha256(text.encode()).hexdigest()
        return self._digest

    # -- checking ------------------------------------------------------------------------------------------
    def check(self, declared: Mapping[str, tuple[torch.dtype, Sequence[int]]]) -> None:
        """Refuse a payload whose tensor table (name -> (dtype, shape)) differs from this layout.

        Names must be the same set, and each tensor's shape and dtype equal; raises
        :class:`~deltaplane.errors.ShapeMismatch` naming the first difference. Nothing is decoded.
        """
        if declared.keys() != self._entries.keys():
            missing = sorted(set(self._entries) - set(declared))
            extra = sorted(set(declared) - set(self._entries))
            raise ShapeMismatch(
                f"update tensors differ from the expected layout: missing {missing[:5]}, unknown {extra[:5]}"
            )
        for name, (dtype, shape) in declared.items():
            want = self._entries[name]
            if tuple(shape) != want.shape or dtype != want.dtype:
                raise ShapeMismatch(
                    f"tensor '{name}': update declares shape {list(shape)} {DTYPE_NAMES.get(dtype, dtype)}, "
                    f"the expected layout has {list(want.shape)} {DTYPE_NAMES[want.dtype]}"
                )

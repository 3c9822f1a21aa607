"""Checks a parsed payload passes before any of its tensors is decoded.

The frame and header checks of :mod:`deltaplane.codecs.wire` prove a payload is well formed; they cannot
tell whether what it declares is affordable or makes sense for the codecs it names. :func:`preflight`
walks every node of every tensor once, touching no value, and refuses the payload (typed errors only) if:

- its tensor table differs from the receiver's expected :class:`~deltaplane.codecs.layout.Layout`;
- all nodes together would decode to more bytes than the decode budget
  (:meth:`~deltaplane.codecs.wire.Limits.decode_budget`: relative to the expected model, or without one to
  the payload's own size);
- a node names something other than one tensor codec (a pipeline, a policy, ``zstd``, an unknown name or
  parameter), carries fields its codec does not declare, or a nested node larger than its parent;
- a codec's counts and lengths disagree with the node's shape (:meth:`~deltaplane.codecs.base.Codec.check`:
  top-k's value count, index stream lengths, quantized code and scale lengths, PowerSGD's factor shapes,
  rand-k's plausible count...).

So :func:`~deltaplane.codecs.compressor.decode_delta` afterwards only allocates what the budget allows
and only runs generators or index decoders over sizes the payload backs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from deltaplane.codecs.base import Encoded, _node_codec
from deltaplane.codecs.layout import Layout
from deltaplane.codecs.quantize import DTYPE_NAMES, DTYPES, Identity
from deltaplane.codecs.wire import Limits
from deltaplane.errors import DecodeError

__all__ = [
    "check_budget",
    "check_field_bytes",
    "check_nodes",
    "decoded_bytes",
    "field_lengths",
    "max_field_bytes",
    "preflight",
]


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _check_node(e: Encoded, table_dtype: torch.dtype | None) -> int:
    """Validate one node and its subtree; returns the bytes it decodes to (all nodes counted)."""
    codec = _node_codec(e)
    identity_dtype = DTYPES.get(str(e.meta.get("dtype"))) if isinstance(codec, Identity) else None
    if table_dtype is not None:
        # raw tensors travel in their own dtype, and an integer tensor only raw: a float codec's output
        # cast to an integer dtype is not what any sender sent
        raw = not table_dtype.is_floating_point or identity_dtype is not None
        if raw and identity_dtype != table_dtype:
            raise DecodeError(
                f"a {DTYPE_NAMES[table_dtype]} tensor must travel as identity of that dtype, got '{e.codec}'"
                + (f" of {e.meta.get('dtype')!r}" if isinstance(codec, Identity) else "")
            )
    elif isinstance(codec, Identity) and identity_dtype != torch.float32:
        raise DecodeError(f"a nested field is a float32 tensor, got identity of {e.meta.get('dtype')!r}")
    for k, child in e.fields.items():
        if isinstance(child, Encoded) and child.numel > e.numel:
            raise DecodeError(
                f"{e.codec}: field '{k}' declares {child.numel} values, more than its tensor's {e.numel}"
            )
    codec.check(e)
    size = e.numel * max(4, _itemsize(identity_dtype) if identity_dtype is not None else 4)
    if table_dtype is not None:
        size = max(size, e.numel * max(4, _itemsize(table_dtype)))
    for k, child in e.fields.items():
        if isinstance(child, Encoded):
            try:
                size += _check_node(child, None)
            except DecodeError as exc:
                raise DecodeError(f"field '{k}': {exc}") from None
    return size


def field_lengths(e: Encoded) -> list[int]:
    """The declared lengths of ``e``'s byte fields (a table's, not yet read), in the order they tile the body."""
    out: list[int] = []
    for v in e.fields.values():
        if isinstance(v, Encoded):
            out.extend(field_lengths(v))
        else:
            out.append(v.length)
    return out


def max_field_bytes(trees: Mapping[str, tuple[torch.dtype, Encoded]]) -> list[tuple[str, int | None]]:
    """Each byte field's name (``tensor 'w' field 'idx'``) and most bytes
    (:meth:`~deltaplane.codecs.base.Codec.max_field_bytes`; ``None`` where its codec states no bound), in the
    order the fields tile the body (table order, each node's fields depth-first).

    Reads shapes, meta and codec specs only, so it runs on a table whose fields are not yet read; raises
    :class:`~deltaplane.errors.DecodeError` for a node that names no tensor codec.
    """
    out: list[tuple[str, int | None]] = []

    def walk(e: Encoded, where: str) -> None:
        bounds = _node_codec(e).max_field_bytes(e)
        for k, v in e.fields.items():
            if isinstance(v, Encoded):
                walk(v, f"{where} field '{k}'")
            else:
                out.append((f"{where} field '{k}'", bounds.get(k)))

    for name, (_, tree) in trees.items():
        try:
            walk(tree, f"tensor '{name}'")
        except DecodeError as exc:
            raise DecodeError(f"tensor '{name}': {exc}") from None
    return out


def check_field_bytes(
    trees: Mapping[str, tuple[torch.dtype, Encoded]], lengths: list[int], which: list[bool]
) -> None:
    """Refuse a field (those ``which`` marks, in body order) that declares more bytes than its node allows.

    ``lengths``: every byte field's declared length, in body order. Run before a field is expanded (an
    entropy-coded field of a compact frame, a zstd body), so what it costs is what an honest field of the
    receiver's layout could cost, whatever few bytes it is stored in.
    """
    bounds = max_field_bytes(trees)
    if len(bounds) != len(lengths):  # a reader bug, never a payload's
        raise DecodeError(f"{len(lengths)} field lengths for {len(bounds)} byte fields")
    for (where, most), n, check in zip(bounds, lengths, which, strict=True):
        if check and most is not None and n > most:
            raise DecodeError(f"{where} declares {n} bytes; its node allows at most {most}")


def decoded_bytes(trees: Mapping[str, tuple[torch.dtype, Encoded]]) -> int:
    """Bytes all nodes of ``trees`` decode to (4 a value, or the raw dtype's size if larger); nothing checked."""

    def walk(e: Encoded, table: torch.dtype | None) -> int:
        item = 4
        if e.codec == "identity":
            dt = DTYPES.get(str(e.meta.get("dtype")))
            item = max(4, _itemsize(dt)) if dt is not None else 4
        if table is not None:
            item = max(item, _itemsize(table))
        return e.numel * item + sum(walk(c, None) for c in e.fields.values() if isinstance(c, Encoded))

    return sum(walk(tree, dtype) for dtype, tree in trees.values())


def check_budget(
    trees: Mapping[str, tuple[torch.dtype, Encoded]],
    *,
    payload_bytes: int,
    layout: Layout | None = None,
    limits: Limits | None = None,
) -> int:
    """Refuse a tensor table that differs from ``layout`` or decodes beyond the budget; returns the budget.

    Reads only shapes, dtypes and codec names, so it runs on a :class:`~deltaplane.codecs.wire.Table`'s
    trees before the body is read or inflated.
    """
    limits = limits or Limits()
    if layout is not None:
        layout.check({name: (dtype, tree.shape) for name, (dtype, tree) in trees.items()})
    if layout is None:
        budget = limits.decode_budget(payload_bytes)
    else:
        budget = limits.decode_budget(payload_bytes, layout.decoded_bytes, len(layout))
    total = decoded_bytes(trees)
    if total > budget:
        hint = (
            "pass expect_layout= the receiving model's layout, or raise Limits.max_decoded_bytes"
            if layout is None
            else "the update does not fit the model it claims to update"
        )
        raise DecodeError(
            f"invalid deltaplane payload: {payload_bytes} bytes declare {total} decoded bytes, beyond the "
            f"decode budget of {budget}; {hint}"
        )
    return budget


def check_nodes(
    trees: Mapping[str, tuple[torch.dtype, Encoded]], *, memo: dict[str, Any] | None = None
) -> None:
    """Every node's codec, fields, nested sizes and counts/lengths (:meth:`~deltaplane.codecs.base.Codec.check`).

    ``memo``: the facts a wire session keeps about one compact skeleton (:meth:`WireSession.read_frame
    <deltaplane.codecs.session.WireSession.read_frame>`). Every payload of that skeleton has the same codecs,
    shapes, meta and field lengths, so when every node's check is structural (reads no field's bytes:
    :attr:`~deltaplane.codecs.base.Codec.structural_check`) the verdict of the first is every payload's,
    and a passed check is remembered there.
    """
    if memo is not None and memo.get("nodes_checked"):
        return
    for name, (dtype, tree) in trees.items():
        try:
            _check_node(tree, dtype)
        except DecodeError as exc:
            raise DecodeError(f"tensor '{name}': {exc}") from None
    if memo is not None and all(_structural(tree) for _, tree in trees.values()):
        memo["nodes_checked"] = True


def _structural(e: Encoded) -> bool:
    """Whether every check of ``e``'s subtree reads only shapes, meta and byte lengths: the class that
    defines each codec's ``check`` declares ``structural_check = True`` itself (a subclass that overrides
    ``check`` without saying so is not trusted)."""
    codec = _node_codec(e)
    for klass in type(codec).__mro__:
        if "check" in vars(klass):
            if vars(klass).get("structural_check") is not True:
                return False
            break
    else:
        return False
    return all(_structural(c) for c in e.fields.values() if isinstance(c, Encoded))


def preflight(
    trees: Mapping[str, tuple[torch.dtype, Encoded]],
    *,
    payload_bytes: int,
    layout: Layout | None = None,
    limits: Limits | None = None,
) -> None:
    """Refuse (before decoding) a parsed payload that does not fit ``layout``, the budget or its codecs.

    ``trees`` is what :func:`~deltaplane.codecs.wire.unpack` returns; ``payload_bytes`` the payload's length.
    Raises :class:`~deltaplane.errors.ShapeMismatch` if the tensor table differs from ``layout``, and
    :class:`~deltaplane.errors.DecodeError` for everything else (see the module docstring).
    """
    check_budget(trees, payload_bytes=payload_bytes, layout=layout, limits=limits)
    check_nodes(trees)

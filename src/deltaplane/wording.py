"""Counts in user-facing text: :func:`count` writes ``1 identity`` and ``2 identities``, never ``1 identities``.

A message built as ``f"{n} devices revoked"`` reads wrong whenever ``n`` is 1, which is the common case for a
command run on one device; every such message goes through this one function instead of an ``if`` of its own.
"""

from __future__ import annotations


def count(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it takes: ``count(1, "device")`` is ``1 device``, ``count(3, "device")``
    ``3 devices``; give ``plural`` where adding an ``s`` is wrong (``count(2, "identity", "identities")``)."""
    return f"{n} {singular if n == 1 else (plural if plural is not None else singular + 's')}"

"""Request bodies: read under a byte cap, enforced while reading (a Content-Length header can lie); JSON bodies
parsed strictly (:class:`StrictBody`)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict

from deltaplane.errors import DecodeError

__all__ = ["NAME", "ModelName", "StrictBody", "content_length", "read_capped"]

#: a model name: what the registry and every route take (letters, digits, ``._-``; at most 128 characters)
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: a route's ``{model}`` path parameter
ModelName = Annotated[str, PathParam(pattern=NAME, max_length=128, description="model name")]

# RFC 9110: Content-Length = 1*DIGIT, ASCII digits only. ``str.isdigit`` also takes "²" or "٣" (and int()
# reads "٣" as 3), so a header that is no length at all passed as one.
_DIGITS = re.compile(rb"[0-9]+")
# more digits than any byte count a cap allows: read as "too large" without int() of thousands of digits
# (Python refuses ints above 4,300 digits: a 16 KiB head of digits would have raised ValueError, a 500)
_LONGEST = 18


class StrictBody(BaseModel):
    """A JSON request body that refuses fields it does not declare (422): a misspelt option is an error, not a
    default silently kept."""

    model_config = ConfigDict(extra="forbid")


def content_length(value: str | bytes) -> int | None:
    """The byte count a ``Content-Length`` value declares, or None when it is not strict ASCII digits.

    A value longer than 18 digits reads as ``10**18`` (above every cap) rather than being converted."""
    raw = value.encode("latin-1", errors="replace") if isinstance(value, str) else value
    raw = raw.strip(b" \t")
    if not _DIGITS.fullmatch(raw):
        return None
    return int(raw) if len(raw) <= _LONGEST else 10**_LONGEST


async def read_capped(
    request: Request,
    limit: int,
    *,
    cap: str = "this stage's",
    empty: str = "send a SecAgg message made by deltaplane's SecAgg device client",
) -> bytes:
    """The request's body, refused (413) as soon as it exceeds ``limit`` bytes (``cap`` names whose limit it is),
    whatever its Content-Length says; an empty body is a :class:`DecodeError` (``empty``: what to send). A
    Content-Length that is not ASCII digits is refused (400) before anything is read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        n = content_length(declared)
        if n is None:
            raise HTTPException(
                400,
                f"Content-Length {declared!r} is not a byte count (ASCII digits only); send the body's length",
            )
        if n > limit:
            raise HTTPException(413, f"a message of {declared} bytes exceeds {cap} {limit}-byte maximum")
    chunks, size = [], 0
    async for chunk in request.stream():  # enforce the cap while reading: Content-Length can lie
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the message exceeds {cap} {limit}-byte maximum")
        chunks.append(chunk)
    if not size:
        raise DecodeError(f"empty body; {empty}")
    return b"".join(chunks)

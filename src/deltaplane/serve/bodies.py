"""Request bodies read under a byte cap, enforced while reading (a Content-Length header can lie)."""

from __future__ import annotations

from fastapi import HTTPException, Request

from deltaplane.errors import DecodeError

__all__ = ["read_capped"]


async def read_capped(
    request: Request,
    limit: int,
    *,
    cap: str = "this stage's",
    empty: str = "send a SecAgg message made by deltaplane's SecAgg device client",
) -> bytes:
    """The request's body, refused (413) as soon as it exceeds ``limit`` bytes (``cap`` names whose limit it is),
    whatever its Content-Length says; an empty body is a :class:`DecodeError` (``empty``: what to send)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
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

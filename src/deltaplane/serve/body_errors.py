"""What to fix in a request body that is not the JSON its route takes: the route, the shape, what went wrong.

FastAPI answers a body that is not JSON with ``body.1: JSON decode error`` (422), a body JSON cannot decode at all
(bytes that are not UTF-8, nesting too deep for the parser) with ``There was an error parsing the body`` (400),
and a JSON array or ``null`` where an object belongs with ``body: Input should be a valid dictionary…``: none
names the route, the fields it takes, or where the JSON broke. :func:`body_problem` says all three; the status
stays the same 4xx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from pydantic import BaseModel

__all__ = ["FASTAPI_UNPARSED_BODY", "body_problem", "body_shape", "describe"]

#: the detail of FastAPI's 400 for a body its JSON reader raised on (not a ``JSONDecodeError``)
FASTAPI_UNPARSED_BODY = "There was an error parsing the body"
# error types meaning the body as a whole is not the JSON object the route takes (not a field inside it)
_WHOLE_BODY = {"missing", "dict_type", "model_attributes_type", "model_type"}


def body_shape(request: Request) -> str:
    """The JSON the matched route takes, e.g. ``a JSON object with "version" (required), "metrics"``."""
    field = getattr(request.scope.get("route"), "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        names = [
            f'"{f.alias or name}"' + (" (required)" if f.is_required() else "")
            for name, f in annotation.model_fields.items()
        ]
        return "a JSON object with " + ", ".join(names) if names else "a JSON object"
    return f"JSON of type {getattr(annotation, '__name__', None) or annotation}" if annotation else "JSON"


def body_problem(request: Request, errors: Sequence[Any] = ()) -> str | None:
    """The message for a body that is not JSON, or not JSON of the route's shape; None when ``errors`` (a
    ``RequestValidationError``'s) concern something else (a field's value, the query string)."""
    route = f"{request.method} {request.url.path}"
    what = f"the body must be {body_shape(request)}, sent with Content-Type: application/json"
    if not errors:  # FASTAPI_UNPARSED_BODY: the JSON reader itself failed
        return f"{route}: the body could not be read as JSON (not UTF-8, or nested too deep); {what}"
    whole = [e for e in errors if _whole_body(e)]
    if not whole:
        return None
    first = whole[0]
    if first.get("type") == "json_invalid":
        loc = tuple(first.get("loc", ()))
        why = (first.get("ctx") or {}).get("error", "invalid JSON")
        message = (
            f"{route}: the body is not valid JSON ({why} at byte {loc[1] if len(loc) > 1 else '?'}); {what}"
        )
    else:
        sent = request.headers.get("content-type", "")
        if first.get("type") == "missing":
            got = "no body (or JSON null)"
        elif sent.split(";")[0].strip().lower() != "application/json":
            # FastAPI reads a body as JSON only when it says so: any other body reaches the model as bytes
            got = f"a body sent as {sent!r}, not read as JSON" if sent else "a body without a Content-Type"
        else:
            got = "JSON of another shape"
        message = f"{route}: got {got}; {what}"
    others = [describe(e) for e in errors if e is not first][:4]  # e.g. a path parameter's own error
    return message + "".join(f"; also {o}" for o in others)


def describe(error: Any) -> str:
    """One validation error as ``loc.path: message``."""
    return f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg', '')}"


def _whole_body(error: Any) -> bool:
    """Whether a validation error says the body as a whole is not the route's JSON (not a field inside it)."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        return True
    return loc == ("body",) and error.get("type") in _WHOLE_BODY

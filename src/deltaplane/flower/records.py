"""The record keys deltaplane's Flower adapters agree on, and the conversions between Flower records and ours.

Both sides of the adapter pair (:func:`~deltaplane.flower.delta_mod` on the SuperNode,
:class:`~deltaplane.flower.DeltaStrategy` in the ServerApp) read and write these keys, so they live in one
place. Payloads are the bytes of deltaplane's wire format (:mod:`deltaplane.codecs.wire`) carried as a
``bytes`` value of a Flower ``ConfigRecord``: Flower transports them verbatim, and their length is what the
device really sends.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from deltaplane.delta import Delta, StateDict
from deltaplane.errors import DecodeError
from deltaplane.personalization import PersonalState

__all__ = [
    "CONTROL_KEY",
    "DELTA_KEY",
    "DOWNLINK_KEY",
    "UPLINK_KEY",
    "arrays_to_state",
    "as_bytes",
    "as_float",
    "as_int",
    "content_bytes",
    "field_bytes",
    "payload_of",
    "personal_from_bytes",
    "personal_to_bytes",
    "state_from_bytes",
    "state_to_arrays",
    "state_to_bytes",
]

#: ConfigRecord in a train instruction: ``base-id``, ``base-version`` (the global model the node must train
#: from) and ``downlink-from`` (the version the downlink payloads start at; -1 when full arrays are sent).
CONTROL_KEY = "deltaplane"
#: ConfigRecord in a train instruction: ``payloads``, the downlink deltas that take the node's cached model
#: from version ``downlink-from`` to ``base-version``, one wire payload per round it missed.
DOWNLINK_KEY = "deltaplane.downlink"
#: ConfigRecord in a train reply: ``payload``, the node's compressed update (a wire payload).
UPLINK_KEY = "deltaplane.uplink"
#: a ClientApp's reply may carry its update itself here (ArrayRecord), instead of trained weights
DELTA_KEY = "deltaplane.delta"


def state_to_arrays(state: StateDict) -> ArrayRecord:
    """A Flower ArrayRecord holding ``state`` (tensors are copied; names and order are kept)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()}, keep_input=True)


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The torch state dict an ArrayRecord holds (values round-trip bit for bit)."""
    return dict(arrays.to_torch_state_dict())


def state_to_bytes(obj: Any) -> bytes:
    """Serialize tensors/ints/strings (e.g. a compressor's ``state_dict``) for a ConfigRecord ``bytes`` value."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> Any:
    """Inverse of :func:`state_to_bytes`; ``weights_only`` so a node's state can never run code."""
    return torch.load(io.BytesIO(data), weights_only=True)


def personal_to_bytes(state: PersonalState) -> bytes:
    """A device's :class:`~deltaplane.personalization.PersonalState` as bytes for its node's ``Context.state``."""
    return state_to_bytes(
        {
            "local": dict(state.local),
            "personal_delta": None if state.personal_delta is None else dict(state.personal_delta),
            "alpha": float(state.alpha),
            "personal_model": None if state.personal_model is None else dict(state.personal_model),
            "history": list(state.history),
        }
    )


def personal_from_bytes(data: bytes) -> PersonalState:
    """Inverse of :func:`personal_to_bytes` (tensors, numbers and lists only: loading never runs code)."""
    doc = state_from_bytes(data)
    delta = doc["personal_delta"]
    return PersonalState(
        local=dict(doc["local"]),
        personal_delta=None if delta is None else Delta(delta),
        alpha=float(doc["alpha"]),
        personal_model=doc["personal_model"],
        history=list(doc["history"]),
    )


def as_int(value: object) -> int:
    """``int(value)`` of a number held in a Flower record (a round, a partition id, a model version).

    Flower types every record value as a union of scalars and lists; this is the one place that narrows it, with
    the conversion the adapters always made. A list raises the ``TypeError`` that ``int()`` itself raises.
    """
    if not isinstance(value, int | float | str | bytes):
        raise TypeError(f"int() argument must be a number or text, not {type(value).__name__!r}")
    return int(value)


def as_float(value: object) -> float:
    """``float(value)`` of a number held in a Flower record (a metric, a weight); see :func:`as_int`."""
    if not isinstance(value, int | float | str | bytes):
        raise TypeError(f"float() argument must be a number or text, not {type(value).__name__!r}")
    return float(value)


def as_bytes(value: object) -> bytes:
    """A Flower record value that must be ``bytes`` (a node's saved state), narrowed; anything else raises the
    ``TypeError`` that reading it with ``io.BytesIO`` (as :func:`state_from_bytes` does) raises."""
    if not isinstance(value, bytes):
        raise TypeError(f"a bytes-like object is required, not {type(value).__name__!r}")
    return value


def field_bytes(value: object, what: str) -> bytes:
    """A record value a peer must send as bytes (a wire payload, a SecAgg roster or request), narrowed; anything
    else is a :class:`~deltaplane.errors.DecodeError` naming ``what``. Never ``bytes(value)``: that turns an int
    into that many zero bytes, so a peer naming 2**62 would make this process allocate without bound."""
    if not isinstance(value, bytes):
        raise DecodeError(f"{what} must be bytes, not {type(value).__name__}")
    return value


def payload_of(value: object) -> bytes:
    """A wire payload read from a Flower record; anything but bytes is refused with a
    :class:`~deltaplane.errors.DecodeError`, as the decoder itself refuses it."""
    return field_bytes(value, "invalid deltaplane payload: the payload")


def content_bytes(content: RecordDict) -> int:
    """Bytes of all records in a message's content, as Flower counts them (``Record.count_bytes``)."""
    return sum(record.count_bytes() for record in content.values())


def control(base_id: str, version: int, downlink_from: int) -> ConfigRecord:
    """The control record of a train instruction (see :data:`CONTROL_KEY`)."""
    return ConfigRecord({"base-id": base_id, "base-version": version, "downlink-from": downlink_from})

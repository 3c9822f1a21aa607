"""Typed exceptions: every error deltaplane raises on purpose is a :class:`DeltaplaneError`.

Subclasses also derive from the closest built-in (``ValueError``, ``KeyError``...) so generic handlers keep
working, while callers that care can catch exactly what went wrong.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "ConfigError",
    "DecodeError",
    "DeltaplaneError",
    "ExportError",
    "InvalidUpdate",
    "PrivacyBudgetExceeded",
    "ShapeMismatch",
    "SpecError",
    "UnsupportedLayer",
    "VersionMismatch",
]


class DeltaplaneError(Exception):
    """Base class of every error raised by deltaplane."""


class ShapeMismatch(DeltaplaneError, ValueError):
    """Two state dicts or deltas disagree on names, shapes or dtypes; the message names the tensor."""


class InvalidUpdate(DeltaplaneError, ValueError):
    """An update is unusable: NaN/Inf values, a norm out of range, or otherwise rejected by validation."""


class CodecError(DeltaplaneError, ValueError):
    """A codec was misconfigured or asked to encode something it cannot."""


class SpecError(CodecError):
    """A codec spec string (``"topk(0.01) | quant(bits=8)"``) could not be parsed or names an unknown codec."""


class DecodeError(DeltaplaneError, ValueError):
    """A payload is malformed: bad magic, version, checksum, lengths, offsets, shapes or values."""


class VersionMismatch(DeltaplaneError, ValueError):
    """A payload or model was made against a different base model version than the one it is applied to."""


class ConfigError(DeltaplaneError, ValueError):
    """A configuration file or option is invalid; the message says which field and why."""


class PrivacyBudgetExceeded(DeltaplaneError, RuntimeError):
    """Continuing would spend more differential-privacy budget (epsilon) than allowed."""


class UnsupportedLayer(DeltaplaneError, TypeError):
    """A model holds a layer (or an operator) that the requested pruning, quantization or export cannot handle."""


class ExportError(DeltaplaneError, RuntimeError):
    """Exporting a model failed or the exported model disagrees with PyTorch; no partial file is left behind."""

"""Typed exceptions: every error deltaplane raises on purpose is a :class:`DeltaplaneError`.

Subclasses also derive from the closest built-in (``ValueError``, ``KeyError``...) so generic handlers keep
working, while callers that care can catch exactly what went wrong.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterMismatch",
    "AmbiguousCheckpoint",
    "BaseMismatch",
    "CodecError",
    "ConfigError",
    "Conflict",
    "CoordinatorRunning",
    "DecodeError",
    "DeltaplaneError",
    "DowngradeRefused",
    "ExportError",
    "GateRefused",
    "IncompatibleDefense",
    "IntegrityError",
    "InvalidUpdate",
    "MissingTokenizer",
    "MissingTrustedKeys",
    "NotFound",
    "NotPrivatizable",
    "PrivacyBudgetExceeded",
    "PromotionRefused",
    "QualityGateFailed",
    "RegistryInUse",
    "ReleaseCountDamaged",
    "RoundAbandoned",
    "RoundAborted",
    "RoundLost",
    "ServiceKeyMismatch",
    "ServiceUnreachable",
    "SessionMismatch",
    "ShapeMismatch",
    "SignatureError",
    "SpecError",
    "TaskError",
    "TooFewUpdates",
    "UnsupportedAdapter",
    "UnsupportedLayer",
    "UnsupportedOption",
    "VersionMismatch",
]


class DeltaplaneError(Exception):
    """Base class of every error raised by deltaplane."""


class ShapeMismatch(DeltaplaneError, ValueError):
    """Two state dicts or deltas disagree on names, shapes or dtypes; the message names the tensor."""


class InvalidUpdate(DeltaplaneError, ValueError):
    """An update is unusable: NaN/Inf values, a norm out of range, or otherwise rejected by validation."""


class NotPrivatizable(InvalidUpdate):
    """A differential-privacy mechanism was given a tensor it cannot clip and noise (an integer step counter, a
    boolean mask); it refuses rather than release the tensor exactly. The message names the tensor."""


class CodecError(DeltaplaneError, ValueError):
    """A codec was misconfigured or asked to encode something it cannot."""


class SpecError(CodecError):
    """A codec spec string (``"topk(0.01) | quant(bits=8)"``) could not be parsed or names an unknown codec."""


class DecodeError(DeltaplaneError, ValueError):
    """A payload is malformed: bad magic, version, checksum, lengths, offsets, shapes or values."""


class SessionMismatch(DecodeError):
    """A compact payload names another wire session (layout, codec, template) than the receiver agreed on."""


class VersionMismatch(DeltaplaneError, ValueError):
    """A payload or model was made against a different base model version than the one it is applied to."""


class BaseMismatch(VersionMismatch):
    """A delta records the SHA-256 fingerprint of the base it was taken against, and the base it is being
    applied to has another one: applying it would produce a model nobody trained. The message names both
    fingerprints (short form) and how to override the check when the other base is intended."""


class ConfigError(DeltaplaneError, ValueError):
    """A configuration file or option is invalid; the message says which field and why."""


class AmbiguousCheckpoint(ConfigError):
    """A checkpoint folder holds two checkpoints (``model.safetensors`` and a ``model.safetensors.index.json``
    whose shards do not include it): which one is meant is the user's to say, by removing the other; the message
    names both files and what to remove."""


class GateRefused(DeltaplaneError, RuntimeError):
    """A gate said no on purpose (promotion, quality, privacy budget): the command worked, the answer is "no".

    The CLI exits with code 3 for these, so scripts can tell a refusal from a failure (1) or a usage error (2).
    """


class PrivacyBudgetExceeded(GateRefused):
    """Continuing would spend more differential-privacy budget (epsilon) than allowed."""


class UnsupportedLayer(DeltaplaneError, TypeError):
    """A model holds a layer (or an operator) that the requested pruning, quantization or export cannot handle."""


class ExportError(DeltaplaneError, RuntimeError):
    """Exporting a model failed or the exported model disagrees with PyTorch; no partial file is left behind."""


class NotFound(DeltaplaneError, KeyError):
    """A model, version, tag or key that was asked for does not exist; the message says what exists instead."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingTrustedKeys(NotFound):
    """A registry read checks signatures but no public key is trusted: the home has no ``keys/`` public key (a
    copy of ``registry.db`` and ``blobs/`` without it, a registry written with a signer passed in) and no pin is
    set; the message names the fix (pin or copy the signing key's public key; a new key verifies nothing)."""


class IntegrityError(DeltaplaneError, RuntimeError):
    """Stored bytes do not match their recorded SHA-256, or metadata points to a blob that is missing."""


class ReleaseCountDamaged(IntegrityError):
    """A device's stored count of its local-DP releases (``fleet device``'s ``.releases`` file) cannot be read
    as one: never reset to zero, since a smaller count would report a smaller ε than the device has spent."""


class SignatureError(DeltaplaneError, ValueError):
    """An artifact's Ed25519 signature is missing, malformed, from an untrusted key or does not verify."""


class PromotionRefused(GateRefused):
    """A promotion gate refused a version (an evaluation regressed beyond tolerance or governance forbids it)."""


class TaskError(DeltaplaneError, ValueError):
    """A task (the user's model and data) cannot be loaded or does not fit together: a task path that does not
    import, a factory that returns something else than a :class:`~deltaplane.engine.Task`, or a model whose
    output does not match the data's inputs or labels."""


class MissingTokenizer(ConfigError):
    """A token model has to be measured on text but no tokenizer was found; the message names the fixes
    (put the tokenizer files in the checkpoint folder, ``--tokenizer DIR``, or ``--random-tokens``)."""


class UnsupportedOption(ConfigError):
    """A run option that the chosen driver (engine or transport) cannot honour, with the physical reason; raised
    before the run starts, never silently ignored."""


class IncompatibleDefense(ConfigError):
    """A robust aggregation rule combined with an uplink codec it is not valid with (a coordinate-wise median or
    trimmed mean over a sparsifying codec's top-k payloads collapses the model), or with DP noise."""


class QualityGateFailed(GateRefused):
    """A compressed model missed a deploy quality gate (cosine, accuracy, OOD or adversarial drop); nothing shipped.

    ``results`` holds every gate's outcome and ``manifest`` the measured numbers, so a caller can show which gate
    failed and by how much.
    """

    def __init__(self, message: str, *, results: list | None = None, manifest: dict | None = None) -> None:
        super().__init__(message)
        self.results = results or []
        self.manifest = manifest or {}


class AdapterError(DeltaplaneError, ValueError):
    """A LoRA adapter (folder, config or factors) is malformed; the message names the file, layer or field."""


class AdapterMismatch(AdapterError, ShapeMismatch):
    """An adapter does not fit: a target module missing in the base, or ranks/shapes that disagree."""


class UnsupportedAdapter(AdapterError):
    """An adapter uses a PEFT feature deltaplane does not handle (DoRA, bias LoRA, ...); the message names the field."""


class DowngradeRefused(SignatureError):
    """A device was offered an older version than the one it holds, without a signed rollback record for it."""


class Conflict(DeltaplaneError, RuntimeError):
    """The request conflicts with stored state: a round not open, a duplicate or replayed upload."""


class RoundLost(Conflict):
    """A round that can never complete: the service stopped while it was open (a SecAgg round's keys, shares
    and masked inputs live in the service's memory only). HTTP 409; wait for the next round."""


class RoundAborted(Conflict):
    """A SecAgg round the operator gave up unpublished (too few devices left to unmask it, or aborted by hand):
    nothing from it reaches a model. HTTP 409; a device that sent its masked update there keeps its error
    feedback as before the round, and waits for the next round."""


class RoundAbandoned(RoundAborted):
    """A SecAgg round aborted because no coordinator runs it any more (its coordinator was stopped or killed, or
    its open's answer was lost): not one of any coordinator's ``--rounds``, so a device does not count it towards
    its own. HTTP 409, as :class:`RoundAborted`."""


class CoordinatorRunning(Conflict):
    """A round of the model is open under another coordinator that may still run it (its process is alive, or on
    another host, which this one cannot check): a second coordinator would take its devices. The message names
    the round, its coordinator and how to abort the round if that coordinator is gone."""


class RegistryInUse(Conflict):
    """Another process already serves this registry: each open round lives in the serving process's memory, so
    a second service process is refused at its start (``<home>/service.lock``); the message names its pid."""


class TooFewUpdates(DeltaplaneError, RuntimeError):
    """A round's aggregation rule cannot give a result from the updates it holds: none added, weights summing
    to zero, or fewer than the rule needs (Krum's ``n > 2f + 2``, a mean around the median leaving none).
    Wait for more updates (or let more devices take part), or abort the round. HTTP 400."""


class ServiceKeyMismatch(DeltaplaneError, RuntimeError):
    """The service presented a TLS key other than the one the device pins (``fleet device --service-spki``):
    another server holding a certificate the trusted CA issued (a man in the middle), or the service's key was
    replaced (``deltaplane keys tls`` issues a new one on each run without ``--keep-key``). Raised during the TLS handshake, before
    any request (its token included) is sent; waiting cannot help, so it is never taken for an outage."""


class ServiceUnreachable(DeltaplaneError, ConnectionError):
    """The service could not be reached or did not prove its identity (TLS verification failed): the message
    says which, and what to check (the URL, the CA file); no request was sent in clear instead.

    ``final`` is true when waiting cannot help (the certificate failed verification, an ``http://`` URL names a
    port that speaks TLS, a mutual-TLS service got no client certificate it accepts): the fleet's device and
    coordinator then stop at once instead of riding it out as an outage for ``--patience`` seconds."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final

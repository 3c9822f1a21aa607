"""Ed25519 signatures for every artifact the registry stores or the service sends.

A signature covers a domain-separated, canonical JSON statement of *what* the bytes are (kind, model, version,
SHA-256), not only the bytes: a validly signed old model cannot be replayed as a newer version, and a signed
delta cannot be presented as a full model. Keys live under ``<home>/keys`` (``deltaplane keys init``); a device
or service trusts the public keys it was given and refuses everything else with
:class:`~deltaplane.errors.SignatureError`. Ed25519 (RFC 8032, https://www.rfc-editor.org/rfc/rfc8032) via the
``cryptography`` package.

Trust that lives in the home proves only that the home is consistent: whoever can write ``<home>`` can put a
key pair of their own in ``<home>/keys`` and re-sign everything. ``$DELTAPLANE_TRUSTED_KEYS``
(:func:`load_trusted_keys`) pins trust outside it: then only the keys it names are trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaplane.errors import ConfigError, NotFound, SignatureError
from deltaplane.textfile import write_secret_file

__all__ = [
    "DOMAIN",
    "TRUSTED_KEYS_ENV",
    "Signature",
    "Signer",
    "Verifier",
    "canonical_json",
    "init_keys",
    "key_id_of",
    "load_signer",
    "load_trusted_keys",
    "load_verifier",
    "statement",
    "write_secret_file",
]

DOMAIN = b"deltaplane/artifact/v1\x00"
PRIVATE_NAME = "signing.ed25519.pem"
PUBLIC_NAME = "signing.ed25519.pub"
TRUSTED_KEYS_ENV = "DELTAPLANE_TRUSTED_KEYS"


def canonical_json(value: Any) -> bytes:
    """``value`` as canonical JSON (sorted keys, compact separators): one byte string per value, so it can be
    hashed and signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def statement(context: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed: the domain tag then ``context`` as canonical (sorted, compact) JSON."""
    return DOMAIN + canonical_json(dict(context))


def key_id_of(public_raw: bytes) -> str:
    """A short, stable identifier of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    """A detached signature: which key made it and the 64 signature bytes (base64 in text form)."""

    key_id: str
    value: bytes

    def to_text(self) -> str:
        """``key_id:base64`` — the form stored in the registry and sent in HTTP headers."""
        return f"{self.key_id}:{base64.b64encode(self.value).decode()}"

    @classmethod
    def from_text(cls, text: str) -> Signature:
        """Parse :meth:`to_text` output; raises :class:`SignatureError` when malformed."""
        key_id, sep, b64 = (text or "").partition(":")
        try:
            value = base64.b64decode(b64, validate=True)
        except ValueError:
            value = b""
        if not sep or not key_id or len(value) != 64:
            raise SignatureError(f"malformed signature {text[:40]!r}; expected 'key_id:base64(64 bytes)'")
        return cls(key_id, value)


class Signer:
    """Holds an Ed25519 private key and signs artifact statements."""

    def __init__(self, private_key: Any) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = private_key
        self.public_raw: bytes = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of(self.public_raw)

    @classmethod
    def generate(cls) -> Signer:
        """A fresh random key (tests, ephemeral services)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    def sign(self, context: Mapping[str, Any]) -> Signature:
        """Sign the statement for ``context`` (which must name the bytes' ``sha256``)."""
        if "sha256" not in context:
            raise SignatureError("a signed statement must include the artifact's 'sha256'")
        return Signature(self.key_id, self._key.sign(statement(context)))

    def verifier(self) -> Verifier:
        """A verifier trusting exactly this key."""
        return Verifier([self.public_raw])


class Verifier:
    """A set of trusted Ed25519 public keys; checks signatures and the bytes' hash together."""

    def __init__(self, public_keys: Iterable[bytes]) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raws = {key_id_of(k): bytes(k) for k in public_keys}
        self._keys = {kid: Ed25519PublicKey.from_public_bytes(k) for kid, k in raws.items()}
        self._fingerprints = {kid: hashlib.sha256(k).hexdigest() for kid, k in raws.items()}
        if not self._keys:
            raise SignatureError("a verifier needs at least one trusted public key")

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def fingerprint(self, key_id: str) -> str | None:
        """The SHA-256 of the whole trusted public key with id ``key_id`` (None when not trusted): a key id is
        only 64 bits of it, so whoever records which key verified something records this."""
        return self._fingerprints.get(key_id)

    def verify(self, context: Mapping[str, Any], signature: Signature | str | object) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is a trusted key's signature of ``context``.

        ``signature`` is a :class:`Signature` or its text; anything else (a BLOB written into a registry.db
        signature column, a state log entry's malformed field) is taken, and refused as malformed."""
        from cryptography.exceptions import InvalidSignature

        if isinstance(signature, str):
            sig = Signature.from_text(signature)
        elif isinstance(signature, Signature):
            sig = signature
        else:  # e.g. a BLOB written into a registry.db signature column
            raise SignatureError(
                f"malformed signature: a {type(signature).__name__}, not 'key_id:base64(64 bytes)' text"
            )
        key = self._keys.get(sig.key_id)
        if key is None:
            raise SignatureError(f"signed by untrusted key {sig.key_id}; trusted keys: {self.key_ids}")
        try:
            key.verify(sig.value, statement(context))
        except InvalidSignature:
            what = (
                f"{context.get('kind', 'artifact')} {context.get('model', '')}@{context.get('version', '')}"
                if "model" in context
                else f"{context.get('kind', 'statement')} {context.get('seq', '')}".rstrip()
            )
            raise SignatureError(
                f"signature by {sig.key_id} does not verify for {what}: the bytes or metadata were altered"
            ) from None

    def verify_bytes(self, data: bytes, context: Mapping[str, Any], signature: Signature | str) -> None:
        """Check that ``data`` hashes to ``context['sha256']`` and that the signature over it verifies."""
        digest = hashlib.sha256(data).hexdigest()
        if digest != context.get("sha256"):
            raise SignatureError(
                f"bytes hash to {digest[:16]}…, but the signed statement names {str(context.get('sha256'))[:16]}…; "
                "the artifact was tampered with or corrupted"
            )
        self.verify(context, signature)


# -- key files (written with write_secret_file, in deltaplane.textfile so that lower layers can use it) -----
def init_keys(home: str | os.PathLike[str], *, overwrite: bool = False) -> Signer:
    """Create ``<home>/keys/`` with a new Ed25519 key pair (private key mode 0600) and return its signer.

    Refuses to replace an existing key unless ``overwrite`` (every artifact it signed would stop verifying
    for devices that trust only the new key).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from deltaplane.textfile import atomic_write_bytes

    keys = Path(home) / "keys"
    if (keys / PRIVATE_NAME).exists() and not overwrite:
        raise SignatureError(
            f"a signing key already exists in {keys}; pass --force to replace it (overwrite=True from Python)"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    keys.mkdir(parents=True, exist_ok=True)
    write_secret_file(keys / PRIVATE_NAME, pem)
    signer = Signer(key)
    atomic_write_bytes(keys / PUBLIC_NAME, base64.b64encode(signer.public_raw) + b"\n")
    return signer


def load_signer(home: str | os.PathLike[str]) -> Signer:
    """The signing key in ``<home>/keys``; :class:`NotFound` (with the command to run) when absent."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(home) / "keys" / PRIVATE_NAME
    if not path.exists():
        raise NotFound(f"no signing key at {path}; create one with `deltaplane keys init --home {home}`")
    from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

    return Signer(
        load_pem_private_key(read_bounded_bytes(path, limit=KEY_LIMIT, what="signing key"), password=None)
    )


def load_verifier(home: str | os.PathLike[str]) -> Verifier:
    """The keys a registry at ``home`` trusts: the pinned ones when ``$DELTAPLANE_TRUSTED_KEYS`` is set (and
    then only those), else the home's own public key plus every ``*.pub`` file in ``<home>/keys/trusted/``."""
    pinned = os.environ.get(TRUSTED_KEYS_ENV)
    if pinned:
        return load_trusted_keys(pinned)
    keys = Path(home) / "keys"
    files = [keys / PUBLIC_NAME, *sorted((keys / "trusted").glob("*.pub"))]
    from deltaplane.textfile import KEY_LIMIT, read_bounded_text

    raws = [
        base64.b64decode(read_bounded_text(f, limit=KEY_LIMIT, what="public key file").strip())
        for f in files
        if f.exists()
    ]
    if not raws:
        raise NotFound(f"no public keys under {keys}; run `deltaplane keys init --home {home}`")
    return Verifier(raws)


def load_trusted_keys(path: str | os.PathLike[str]) -> Verifier:
    """Trust exactly the Ed25519 public keys at ``path``, kept apart from any registry home.

    ``path`` is a file with one base64 public key per line (blank lines and ``#`` comments skipped; a
    ``signing.ed25519.pub`` is such a file) or a directory whose ``*.pub`` files are. Anything else is a
    :class:`ConfigError` naming the file and line: a pin that silently trusted nothing, or something else, would
    defeat its purpose.
    """
    root = Path(path)
    if not root.exists():
        raise ConfigError(
            f"trusted keys {root} does not exist; point ${TRUSTED_KEYS_ENV} (or --trusted) at a file of base64 "
            "public keys or a directory of *.pub files (e.g. a copy of HOME/keys/signing.ed25519.pub)"
        )
    files = sorted(root.glob("*.pub")) if root.is_dir() else [root]
    raws = [raw for f in files for raw in _public_keys_in(f)]
    if not raws:
        raise ConfigError(
            f"no public keys in {root} (expected base64 Ed25519 keys, one a line, or *.pub files)"
        )
    return Verifier(raws)


def _public_keys_in(file: Path) -> list[bytes]:
    out = []
    from deltaplane.textfile import KEY_LIMIT, read_bounded_text

    text = read_bounded_text(file, limit=KEY_LIMIT, what="trusted keys file")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            raw = base64.b64decode(line, validate=True)
        except ValueError:
            raise ConfigError(f"{file} line {n} is not base64: {line[:40]!r}") from None
        if len(raw) != 32:
            raise ConfigError(f"{file} line {n} is {len(raw)} bytes, not a 32 bytes Ed25519 public key")
        out.append(raw)
    return out

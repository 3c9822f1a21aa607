"""Encryption at rest for registry blobs: AES-256-GCM envelope encryption with rotatable key-encryption keys.

Each blob gets its own random 256-bit data key (DEK); the blob is encrypted with it, and the DEK is stored in
the blob's header wrapped (AES-GCM) by a key-encryption key (KEK). Both encryptions authenticate the blob's
SHA-256 name as associated data, so a valid encrypted blob cannot be moved under another name, and any
flipped bit fails the GCM tag (:class:`~deltaplane.errors.IntegrityError`). Rotating the KEK rewrites only
the small headers — the ciphertext stays. (NIST SP 800-38D for GCM; the envelope pattern is the one cloud
KMSs use.)

Blob layout (version 1)::

    b"DPEB" | u8 version | u8 kid_len | kid | u8 wrap_nonce(12) | wrapped_dek(48) | nonce(12) | ciphertext+tag

KEKs come from, in order: ``$DELTAPLANE_KEK`` (base64 of 32 bytes; several keys separated by commas),
``$DELTAPLANE_KEK_FILE`` (a file holding the same), and every ``<home>/keys/kek/*.key`` (newest first); the first
one encrypts new blobs, all of them decrypt.

Several processes may use one registry while :meth:`Registry.rotate_kek` runs: ``<home>/keys/kek/rotation.lock``
is held shared (``flock``) by every handle from choosing the current key to the sealed blob's rename, and
exclusively by a rotation from start to end, so no blob is sealed with a key the rotation is retiring. A handle
reloads its key ring when :meth:`KeyRing.fingerprint` changed. A rotation records the keys it retired in
``<home>/keys/kek/retired.json``; sealing with a retired key is refused (a process still started with the old
``$DELTAPLANE_KEK``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from deltaplane.errors import ConfigError, IntegrityError, NotFound

__all__ = [
    "KEK_ENV",
    "KEK_FILE_ENV",
    "MAGIC",
    "KekRotation",
    "KeyRing",
    "is_sealed",
    "kek_id",
    "key_lock",
    "parse_key",
    "parse_keys",
]

MAGIC = b"DPEB"
VERSION = 1
KEK_ENV = "DELTAPLANE_KEK"
KEK_FILE_ENV = "DELTAPLANE_KEK_FILE"
_WRAP_AAD = b"deltaplane/kek-wrap/v1\x00"
_DATA_AAD = b"deltaplane/blob/v1\x00"
_NONCE = 12
_WRAPPED = 32 + 16
HEADER_MAX = 6 + 255 + _NONCE + _WRAPPED
"""The longest an envelope's header (magic .. wrapped data key) can be: what a rotation reads of each blob."""
LOCK_NAME = "rotation.lock"
RETIRED_NAME = "retired.json"
_SEPARATORS = re.compile(rb"[,\s]+")


def kek_id(key: bytes) -> str:
    """A key's public identifier: the first 16 hex digits of SHA-256 over a domain tag and the key."""
    return hashlib.sha256(b"deltaplane/kek-id\x00" + key).hexdigest()[:16]


def is_sealed(raw: bytes) -> bool:
    return raw[:4] == MAGIC


def parse_key(text: bytes, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{where} must hold a base64-encoded 32-byte key (AES-256)")
    return key


def parse_keys(text: bytes, where: str) -> list[bytes]:
    """One or more base64 keys separated by commas or whitespace, in order (the first is the current one)."""
    parts = [p for p in _SEPARATORS.split(text.strip()) if p]
    if not parts:
        raise ConfigError(f"{where} must hold a base64-encoded 32-byte key (AES-256); it is empty")
    return [parse_key(p, f"{where} (key {i + 1})" if len(parts) > 1 else where) for i, p in enumerate(parts)]


@contextlib.contextmanager
def key_lock(home: str | os.PathLike[str], *, exclusive: bool, required: bool = True) -> Iterator[None]:
    """Hold ``<home>/keys/kek/rotation.lock``: shared while sealing a blob, exclusive for a whole rotation.

    An advisory ``flock``, so it is released when the process dies (a killed rotation blocks nobody). With
    ``required=False`` (readers) a lock file that cannot be created (a read-only registry) is not an error.
    """
    path = KeyRing.key_dir(home) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        except OSError:
            if required:
                raise
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass(frozen=True)
class KekRotation:
    """What :meth:`Registry.rotate_kek` did, and what the operator still has to do."""

    rewrapped: int
    current: str
    source: str
    removed_files: tuple[str, ...]
    retired: tuple[str, ...]
    advice: str


class KeyRing:
    """Key-encryption keys by id; ``current`` wraps new data keys, every key unwraps.

    ``sources`` names where each key came from (``$DELTAPLANE_KEK``, ``$DELTAPLANE_KEK_FILE`` or a key file's
    path); ``retired`` holds the ids a rotation retired, which :meth:`seal` refuses to use.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        current: str,
        *,
        sources: Mapping[str, str] | None = None,
        retired: frozenset[str] = frozenset(),
    ) -> None:
        if current not in keys:
            raise ConfigError(f"current KEK {current} is not among the loaded keys {sorted(keys)}")
        self.keys = dict(keys)
        self.current = current
        self.sources = dict(sources or {})
        self.retired = retired

    @staticmethod
    def key_dir(home: str | os.PathLike[str]) -> Path:
        return Path(home) / "keys" / "kek"

    @property
    def from_environment(self) -> bool:
        """Whether the current key comes from ``$DELTAPLANE_KEK`` / ``$DELTAPLANE_KEK_FILE`` (not a key file)."""
        return self.sources.get(self.current, "").startswith("$")

    @classmethod
    def load(cls, home: str | os.PathLike[str]) -> KeyRing:
        """The KEKs available to the registry at ``home`` (environment first, then key files, newest first)."""
        ordered: list[tuple[bytes, str]] = []
        if os.environ.get(KEK_ENV):
            ordered += [(k, f"${KEK_ENV}") for k in parse_keys(os.environ[KEK_ENV].encode(), f"${KEK_ENV}")]
        if os.environ.get(KEK_FILE_ENV):
            p = Path(os.environ[KEK_FILE_ENV])
            if not p.exists():  # a FIFO or a device is refused below, by name, not called missing
                raise NotFound(f"${KEK_FILE_ENV} names {p}, which does not exist")
            from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

            data = read_bounded_bytes(p, limit=KEY_LIMIT, what=f"${KEK_FILE_ENV} key file")
            ordered += [(k, f"${KEK_FILE_ENV} ({p})") for k in parse_keys(data, str(p))]
        ordered += [(parse_key(data, str(f)), str(f)) for f, data in cls._key_files(home)]
        if not ordered:
            raise NotFound(
                f"the registry at {home} is encrypted but no key-encryption key was found: set ${KEK_ENV} or "
                f"${KEK_FILE_ENV}, or restore {cls.key_dir(home)}"
            )
        keys: dict[str, bytes] = {}
        sources: dict[str, str] = {}
        for key, where in ordered:
            kid = kek_id(key)
            keys.setdefault(kid, key)
            sources.setdefault(kid, where)
        return cls(keys, kek_id(ordered[0][0]), sources=sources, retired=cls.load_retired(home))

    @classmethod
    def _key_files(cls, home: str | os.PathLike[str]) -> list[tuple[Path, bytes]]:
        """(path, contents) of every key file, newest first; a file deleted meanwhile is skipped."""
        from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

        found: list[tuple[int, Path, bytes]] = []
        for f in cls.key_dir(home).glob("*.key"):
            try:
                mtime = f.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            # bounded: a FIFO or a huge file among the keys would block or exhaust every registry open
            data = read_bounded_bytes(f, limit=KEY_LIMIT, what="key-encryption key file", missing_ok=True)
            if data is not None:  # else deleted meanwhile (a rotation's clean-up)
                found.append((mtime, f, data))
        found.sort(key=lambda t: t[0], reverse=True)
        return [(f, data) for _, f, data in found]

    @classmethod
    def fingerprint(cls, home: str | os.PathLike[str]) -> tuple[object, ...]:
        """A cheap summary of every key source (no key is read): when it changed, a loaded ring is stale.

        The environment's keys enter as a hash (no second copy of them), the files as name, inode and mtime.
        """
        env = hashlib.sha256(os.environ.get(KEK_ENV, "").encode()).digest()
        files: list[tuple[str, int, int]] = []
        named = os.environ.get(KEK_FILE_ENV, "")
        paths = [Path(named)] if named else []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            paths += [p for p in cls.key_dir(home).iterdir() if p.suffix == ".key" or p.name == RETIRED_NAME]
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((str(p), st.st_ino, st.st_mtime_ns))
        return (env, tuple(sorted(files)))

    @classmethod
    def load_retired(cls, home: str | os.PathLike[str]) -> frozenset[str]:
        """The key ids rotations retired (``<home>/keys/kek/retired.json``); empty when none was."""
        from deltaplane.textfile import KEY_LIMIT, read_bounded_bytes

        path = cls.key_dir(home) / RETIRED_NAME
        data = read_bounded_bytes(path, limit=KEY_LIMIT, what="retired key list", missing_ok=True)
        if data is None:
            return frozenset()
        try:
            ids = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); it lists retired key ids") from None
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise ConfigError(f"{path} must be a JSON list of retired key ids")
        return frozenset(ids)

    @classmethod
    def save_retired(cls, home: str | os.PathLike[str], ids: frozenset[str] | set[str]) -> None:
        from deltaplane.registry.signing import write_secret_file

        write_secret_file(cls.key_dir(home) / RETIRED_NAME, json.dumps(sorted(ids)).encode() + b"\n")

    @classmethod
    def create_key_file(cls, home: str | os.PathLike[str], key: bytes | None = None) -> str:
        """Write a (new random) KEK to ``<home>/keys/kek/<id>.key`` (mode 0600 from creation); returns its id."""
        from deltaplane.registry.signing import write_secret_file

        key = key if key is not None else secrets.token_bytes(32)
        kid = kek_id(key)
        write_secret_file(cls.key_dir(home) / f"{kid}.key", base64.b64encode(key) + b"\n")
        return kid

    # -- envelope --------------------------------------------------------------------------------------
    def seal(self, data: bytes, name: str) -> bytes:
        """Encrypt ``data`` (whose SHA-256 is ``name``) under a fresh data key wrapped by the current KEK.

        :class:`ConfigError` when a rotation retired the current key: a blob sealed with it would become
        unreadable once the operator deletes that key as the rotation told them to.
        """
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if self.current in self.retired:
            where = self.sources.get(self.current, "a key file")
            raise ConfigError(
                f"key-encryption key {self.current} (from {where}) was retired by a key rotation and must not "
                f"encrypt new blobs: "
                + (
                    f"put the current key first in {where.split(' ')[0]} and restart this process"
                    if where.startswith("$")
                    else f"delete {where} or run `deltaplane registry rotate-key`"
                )
            )
        dek = secrets.token_bytes(32)
        nonce = secrets.token_bytes(_NONCE)
        body = AESGCM(dek).encrypt(nonce, data, _DATA_AAD + name.encode())
        return self._header(self.current, dek, name) + nonce + body

    def _header(self, kid: str, dek: bytes, name: str) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        wrap_nonce = secrets.token_bytes(_NONCE)
        wrapped = AESGCM(self.keys[kid]).encrypt(wrap_nonce, dek, _WRAP_AAD + name.encode())
        k = kid.encode()
        return MAGIC + struct.pack("<BB", VERSION, len(k)) + k + wrap_nonce + wrapped

    @staticmethod
    def blob_kid(raw: bytes) -> str | None:
        """The id of the KEK that wraps a sealed blob's data key (None when the header is malformed)."""
        if len(raw) < 6 or raw[:4] != MAGIC:
            return None
        klen = raw[5]
        return raw[6 : 6 + klen].decode("ascii", errors="replace") if len(raw) >= 6 + klen else None

    def _split(self, raw: bytes, name: str, size: int | None = None) -> tuple[str, bytes, int]:
        """(kid, data key, offset of the data nonce) of a sealed blob; IntegrityError if it does not open.

        ``raw`` may be the blob's first bytes only (at least its header, :data:`HEADER_MAX` suffices), given the
        whole blob's ``size``."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        size = len(raw) if size is None else size
        if len(raw) < 6 or raw[:4] != MAGIC:
            raise IntegrityError(f"blob {name} is not an encrypted registry blob")
        version, klen = struct.unpack_from("<BB", raw, 4)
        if version != VERSION:
            raise IntegrityError(
                f"blob {name} uses encryption format {version}; this deltaplane reads {VERSION}"
            )
        off = 6 + klen
        if size < off + _NONCE + _WRAPPED + _NONCE + 16 or len(raw) < off + _NONCE + _WRAPPED:
            raise IntegrityError(f"blob {name} is truncated")
        kid = raw[6:off].decode("ascii", errors="replace")
        kek = self.keys.get(kid)
        if kek is None:
            raise IntegrityError(
                f"blob {name} is wrapped by key {kid}, which is not loaded ({sorted(self.keys)})"
            )
        wrap_nonce, wrapped = raw[off : off + _NONCE], raw[off + _NONCE : off + _NONCE + _WRAPPED]
        try:
            dek = AESGCM(kek).decrypt(wrap_nonce, wrapped, _WRAP_AAD + name.encode())
        except InvalidTag:
            raise IntegrityError(
                f"blob {name}: its data key fails the AES-GCM tag (tampered or moved)"
            ) from None
        return kid, dek, off + _NONCE + _WRAPPED

    def open(self, raw: bytes, name: str) -> bytes:
        """Decrypt a sealed blob; :class:`IntegrityError` when any byte was altered or it was renamed."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        _, dek, off = self._split(raw, name)
        try:
            return AESGCM(dek).decrypt(
                raw[off : off + _NONCE], raw[off + _NONCE :], _DATA_AAD + name.encode()
            )
        except InvalidTag:
            raise IntegrityError(
                f"blob {name} fails its AES-GCM tag: the encrypted bytes were tampered with"
            ) from None

    def rewrap(self, raw: bytes, name: str) -> bytes | None:
        """The blob with its data key re-wrapped by the current KEK (None when it already is)."""
        new = self.rewrap_header(raw, name, len(raw))
        return None if new is None else new[0] + raw[new[1] :]

    def rewrap_header(self, head: bytes, name: str, size: int) -> tuple[bytes, int] | None:
        """(new header, offset in the blob where the unchanged rest starts) to re-wrap a blob of ``size`` bytes
        whose first bytes are ``head`` (:data:`HEADER_MAX` of them suffice) by the current KEK; None when it is
        wrapped by it already. The ciphertext is not read: a rotation streams it across unchanged."""
        kid, dek, off = self._split(head, name, size)
        if kid == self.current:
            return None
        return self._header(self.current, dek, name), off

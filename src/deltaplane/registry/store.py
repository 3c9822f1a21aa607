"""The registry: immutable, signed versions of models and deltas with lineage, tags and governance metadata.

Storage is two parts, each crash-safe on its own and together by ordering:

* a content-addressed blob store (``<home>/blobs/ab/cdef…``, named by SHA-256) written as temp file →
  ``fsync`` → ``rename`` → directory ``fsync``, so a blob is either absent or complete;
* SQLite metadata in WAL mode with ``synchronous=FULL``; every change is one transaction, and the blob is
  durable *before* the row that points to it commits.

A SIGKILL therefore leaves at worst an orphan blob or temp file (reported by :meth:`Registry.verify`, removed by
:meth:`Registry.gc`), never a row without its bytes nor a half-written row. Artifact rows are immutable
(SQLite triggers refuse UPDATE and DELETE); tags move, and every move is kept in ``tag_history`` so a
rollback knows the previous production version. Tag moves and consent withdrawals are also appended, signed
and hash-chained, to the state log (:mod:`deltaplane.registry.eventlog`) in the same transaction, so
:meth:`Registry.verify` and verified reads catch those tables edited behind the registry's back.

Example:
    >>> import tempfile, torch
    >>> from deltaplane.registry import Registry
    >>> reg = Registry.create(tempfile.mkdtemp())
    >>> v1 = reg.register_model("cnn", {"w": torch.zeros(3)}, lineage={"round": 0})
    >>> v2 = reg.register_model("cnn", {"w": torch.ones(3)}, parent=v1.number, lineage={"round": 1})
    >>> reg.set_tag("cnn", "production", v2.number)
    >>> reg.resolve("cnn:production").number, reg.load_state("cnn@1")["w"].tolist()
    (2, [0.0, 0.0, 0.0])
    >>> reg.verify().ok
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeGuard

from deltaplane.errors import (
    ConfigError,
    DecodeError,
    DeltaplaneError,
    IntegrityError,
    MissingTrustedKeys,
    NotFound,
    PromotionRefused,
    SignatureError,
)
from deltaplane.registry import eventlog, seal
from deltaplane.registry.encryption import HEADER_MAX, KekRotation, KeyRing, is_sealed, key_lock
from deltaplane.registry.signing import (
    PUBLIC_NAME,
    TRUSTED_KEYS_ENV,
    Signer,
    Verifier,
    canonical_json,
    load_signer,
    load_verifier,
)
from deltaplane.shards import COMPANION_FILES, COMPANION_LIMIT
from deltaplane.textfile import SETTINGS_LIMIT, TOKENIZER_LIMIT, read_bounded_text

if TYPE_CHECKING:  # torch loads on first use: `deltaplane registry list` must not wait for it
    import torch
if TYPE_CHECKING:
    from deltaplane.codecs import Layout

__all__ = [
    "Artifact",
    "Governance",
    "IntegrityReport",
    "Registry",
    "RepairReport",
    "default_home",
    "is_gated_tag",
    "rollback_statement",
    "state_from_bytes",
    "state_to_bytes",
    "withdrawn_among",
]

HOME_ENV = "DELTAPLANE_HOME"
SETTINGS_NAME = "registry.json"
ENCRYPTION = "aes-256-gcm"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_REF = re.compile(
    r"^(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:(?P<sep>[@:])(?P<what>[A-Za-z0-9._-]{1,128}))?\Z"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    number INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('model', 'delta')),
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    parent INTEGER,
    base INTEGER,
    target INTEGER,
    codec TEXT,
    lineage TEXT NOT NULL,
    governance TEXT NOT NULL,
    signature TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (model, number)
);
CREATE INDEX IF NOT EXISTS artifacts_delta ON artifacts (model, kind, base, target);
CREATE INDEX IF NOT EXISTS artifacts_sha256 ON artifacts (sha256);
CREATE TRIGGER IF NOT EXISTS artifacts_immutable_u BEFORE UPDATE ON artifacts
    BEGIN SELECT RAISE(ABORT, 'registry artifacts are immutable'); END;
CREATE TRIGGER IF NOT EXISTS artifacts_immutable_d BEFORE DELETE ON artifacts
    BEGIN SELECT RAISE(ABORT, 'registry artifacts are immutable'); END;
CREATE TABLE IF NOT EXISTS tags (
    model TEXT NOT NULL, tag TEXT NOT NULL, number INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (model, tag)
);
CREATE TABLE IF NOT EXISTS tag_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, tag TEXT NOT NULL, number INTEGER,
    previous INTEGER, action TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    id INTEGER PRIMARY KEY AUTOINCREMENT, artifact INTEGER NOT NULL REFERENCES artifacts(id),
    sha256 TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, artifact INTEGER NOT NULL REFERENCES artifacts(id),
    evaluator TEXT NOT NULL, metrics TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS withdrawals (
    cohort TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollbacks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, tag TEXT NOT NULL, number INTEGER NOT NULL,
    supersedes INTEGER NOT NULL, signature TEXT NOT NULL, at REAL NOT NULL
);
"""

# The registry's settings (encryption), also in registry.json: the copy in the database is what a deleted or
# edited registry.json is checked against. Registries made before it get the table on first open.
_SETTINGS_TABLE = "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _recorded_setting(con: sqlite3.Connection, name: str) -> str | None:
    """A setting as the database records it; None when it does not (yet), e.g. a registry from before."""
    try:
        row = con.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return None
    return None if row is None else str(row[0])


# Created on first use, so registries made before promotion verdicts were kept gain it without a migration.
_DECISIONS_TABLE = """CREATE TABLE IF NOT EXISTS promotion_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, tag TEXT NOT NULL, candidate INTEGER NOT NULL,
    previous INTEGER, promoted INTEGER NOT NULL, evaluator TEXT NOT NULL, metrics TEXT NOT NULL,
    baseline TEXT, reasons TEXT NOT NULL, at REAL NOT NULL
)"""


def _setting_in(db: Path, name: str) -> str | None:
    """A setting recorded in the database file ``db`` (None when there is none, or no readable database)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(db, timeout=60)
    except sqlite3.DatabaseError:
        return None
    try:
        return _recorded_setting(con, name)
    except sqlite3.DatabaseError:
        return None  # opening the registry reports the broken database
    finally:
        con.close()


def rollback_statement(model: str, tag: str, number: int, supersedes: int, sha256: str) -> dict[str, Any]:
    """What a rollback record's signature covers (see :meth:`Registry.record_rollback`)."""
    return {
        "kind": "rollback",
        "model": model,
        "tag": tag,
        "version": number,
        "supersedes": supersedes,
        "sha256": sha256,
    }


def default_home() -> Path:
    """``$DELTAPLANE_HOME`` if set, else ``~/.deltaplane``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".deltaplane")


def _lineage_json(lineage: Mapping[str, Any] | None) -> str:
    """The stored JSON of a version's lineage; values JSON has no type for are stored as text.

    Raises:
        ConfigError: ``lineage`` is not a mapping (a JSON object).
    """
    if lineage is not None and not isinstance(lineage, Mapping):
        raise ConfigError(f"lineage must be a mapping (a JSON object), not {type(lineage).__name__}")
    value = dict(lineage or {})
    # depth first, without recursion: a row nested deeper than json can read back would break every read of it
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > LINEAGE_DEPTH:
            raise ConfigError(
                f"lineage is nested more than {LINEAGE_DEPTH} levels deep; record deep structures flattened or "
                "as a string"
            )
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    try:
        # allow_nan=False: NaN and Infinity are not JSON (the CLI's --lineage parser refuses them; a row holding
        # them is read back by Python only, and signed metadata should mean the same to every reader)
        return json.dumps(value, sort_keys=True, default=str, allow_nan=False)
    except (
        TypeError,
        ValueError,
    ) as exc:  # keys of mixed types cannot be sorted; a value that refers to itself; NaN or Infinity
        raise ConfigError(
            f"lineage cannot be stored as JSON: {exc}; use string keys and plain, finite values"
        ) from None


LINEAGE_DEPTH = 64
"""How deeply a version's lineage may nest (objects and lists): deep enough for any config, shallow enough that
reading the row back never nears Python's recursion limit."""


PRODUCTION = "production"
GATED_ACTIONS = ("promote", "rollback")
"""The tag moves that run the promotion gate's checks (:func:`~deltaplane.registry.promotion.promote`,
:func:`~deltaplane.registry.promotion.rollback`): the only ones that may move a gated tag once it is held."""


def is_gated_tag(tag: str) -> bool:
    """Whether ``tag`` says what devices are served as production: ``production`` itself or a cohort's
    ``production.<cohort>`` (the service serves a device of cohort ``eu`` ``production.eu`` before
    ``production``, so moving either changes what devices run, and only the gate may do it).

    Tag names are ASCII letters, digits, ``.``, ``_`` and ``-`` and compared exactly (``Production`` or
    ``production `` is another tag, or no tag at all, and is never served as production).
    """
    return tag == PRODUCTION or tag.startswith(PRODUCTION + ".")


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} must be 1-128 characters of letters, digits, '.', '_' or '-' starting with a letter "
            f"or digit. Found {name!r}"
        )
    return name


# -- canonical model bytes -------------------------------------------------------------------------------
_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def state_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state dict as a safetensors file whose bytes depend only on the tensors and their order.

    Written by hand rather than with ``safetensors.torch.save`` because that one emits its metadata map in
    hash order, so equal tensors could give different bytes — and content addressing, signatures and the
    byte-identical rollback/downlink checks all need one canonical encoding. The layout is the documented
    safetensors format (https://github.com/huggingface/safetensors#format), readable by any safetensors
    loader: u64 header length, JSON header (sorted keys, space-padded to 8 bytes), tensor data in key order.
    """
    import torch

    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, t in state.items():
        t = t.detach().contiguous().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _ST_DTYPES:
            raise ConfigError(f"tensor '{name}' has dtype {t.dtype}, which the registry cannot store")
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"deltaplane.order": json.dumps(list(state)), "format": "deltaplane.model"}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`state_to_bytes`; :class:`DecodeError` on anything that is not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(bytes(data[8 : 8 + header_len])).get("__metadata__", {}) or {}
        order = json.loads(meta.get("deltaplane.order", "null")) or list(tensors)
    except (SafetensorError, ValueError, TypeError, RecursionError) as exc:  # recursion: a nested order
        raise DecodeError(f"model bytes are not a safetensors state dict: {exc!s:.200}") from exc
    if not (isinstance(order, list) and all(isinstance(k, str) for k in order)):
        raise DecodeError(f"model bytes: 'deltaplane.order' must list tensor names. Found {order!r:.80}")
    if sorted(order) != sorted(tensors):
        order = list(tensors)
    return {k: tensors[k] for k in order}


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# -- what artifact signatures cover ----------------------------------------------------------------------
STATEMENT_VERSION = 2
"""The statement new artifacts are signed over (see :meth:`Artifact.statement`); kept per row in
``artifacts.statement_version``, so a signature is checked against the one statement it was made over."""


def _json_digest(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys, compact): how a statement covers free-form metadata."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def _add_statement_version(con: sqlite3.Connection) -> None:
    """Give a registry made before metadata signing its ``statement_version`` column (existing rows: 1).

    Which statement a signature was made over is stored, never inferred (trying both would let a row's
    metadata be swapped for any that an old signature did not cover). Runs on each new connection, outside any
    transaction; ``ALTER TABLE … ADD COLUMN`` is atomic on its own.
    """
    have = {r[1] for r in con.execute("PRAGMA table_info(artifacts)")}
    if not have or "statement_version" in have:
        return  # no artifacts table (an unreadable registry is reported elsewhere) or already there
    try:
        con.execute("ALTER TABLE artifacts ADD COLUMN statement_version INTEGER NOT NULL DEFAULT 1")
    except sqlite3.OperationalError as exc:
        # another connection added it first; or a read-only database, whose rows then all read as statement 1
        if "duplicate column" not in str(exc) and "readonly" not in str(exc):
            raise


def _add_sha256_index(con: sqlite3.Connection) -> None:
    """Give a registry made before it the index by weights' hash (:meth:`Registry._upstream` looks up, for each
    version a consent walk passes, the earlier versions holding the same weights). A read-only database goes
    without: the look-up is then a scan, slower but the same answer."""
    if con.execute("SELECT 1 FROM sqlite_master WHERE type='index' AND name='artifacts_sha256'").fetchone():
        return
    if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='artifacts'").fetchone():
        return  # no artifacts table (an unreadable registry is reported elsewhere)
    try:
        con.execute("CREATE INDEX IF NOT EXISTS artifacts_sha256 ON artifacts (sha256)")
    except sqlite3.OperationalError as exc:
        if "readonly" not in str(exc):
            raise


def withdrawn_among(cohorts: Iterable[str], withdrawn: Iterable[str]) -> list[str]:
    """Those of ``cohorts`` that a withdrawal in ``withdrawn`` names, sorted; names match without regard to case.

    Cohort names are ASCII registry names, so case is the one way two spellings of a cohort can differ: a
    withdrawal recorded as ``EU`` must reach the versions and devices of ``eu``, not record a cohort nobody
    is in while their data stays served. Every consent check (serving, promotion, round bases, uploads,
    ``registry pull``) asks this, never ``in`` or ``&`` on the raw names.
    """
    folded = {w.casefold() for w in withdrawn}
    return sorted({c for c in cohorts if c.casefold() in folded})


# -- records ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Governance:
    """Consent metadata: where a version's training data came from and which cohorts it leaves out.

    ``cohorts`` are the client cohorts whose updates contributed; ``excluded_cohorts`` are cohorts this
    version is certified *not* to contain (for instance retrained after a cohort withdrew consent).
    """

    data_sources: tuple[str, ...] = ()
    cohorts: tuple[str, ...] = ()
    excluded_cohorts: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        for what in ("data_sources", "cohorts", "excluded_cohorts"):
            value = getattr(self, what)
            if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
                # a bare string would be taken letter by letter: cohorts "eu" recorded as 'e' and 'u', which a
                # withdrawal of "eu" then never reaches
                raise ConfigError(
                    f"governance {what} must be a list of names, e.g. [{value!r:.40}]. Found {type(value).__name__}"
                )
        overlap = set(self.cohorts) & set(self.excluded_cohorts)
        if overlap:
            raise ConfigError(f"cohorts {sorted(overlap)} are listed both as contributing and as excluded")

    @classmethod
    def combine(cls, own: Governance, *inherited: Governance) -> Governance:
        """``own`` plus everything ``inherited`` contributed; exclusions hold only where nothing re-added them."""
        cohorts = set(own.cohorts).union(*(g.cohorts for g in inherited))
        sources = set(own.data_sources).union(*(g.data_sources for g in inherited))
        excluded = set(own.excluded_cohorts).union(*(g.excluded_cohorts for g in inherited)) - cohorts
        return cls(tuple(sorted(sources)), tuple(sorted(cohorts)), tuple(sorted(excluded)), own.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data_sources": list(self.data_sources),
            "cohorts": list(self.cohorts),
            "excluded_cohorts": list(self.excluded_cohorts),
            "notes": self.notes,
        }

    @classmethod
    def of(cls, value: Governance | Mapping[str, Any] | None) -> Governance:
        """``value`` as a :class:`Governance` (one already, or its JSON form: :meth:`from_dict`)."""
        return value if isinstance(value, Governance) else cls.from_dict(value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Governance:
        """Governance from its JSON form; each list field must be a list (:class:`ConfigError` otherwise)."""
        d = d or {}
        if not isinstance(d, Mapping):
            raise ConfigError(f"governance must be a mapping (a JSON object), not {type(d).__name__}")
        fields = [d.get(k, ()) for k in ("data_sources", "cohorts", "excluded_cohorts")]
        sources, cohorts, excluded = [tuple(v) if isinstance(v, list | tuple) else v for v in fields]
        return cls(sources, cohorts, excluded, str(d.get("notes", "")))

    def check_names(self) -> Governance:
        """``self``, after checking that every cohort is a name a withdrawal can be recorded under.

        :meth:`Registry.withdraw_cohort` (and the service's device cohorts) take only registry names: a version
        recorded with a cohort such as ``"EU West"`` could never have that consent withdrawn.

        Raises:
            ConfigError: a cohort or excluded cohort is not such a name.
        """
        for cohort in (*self.cohorts, *self.excluded_cohorts):
            _check_name("cohort", cohort)
        return self


@dataclass(frozen=True)
class Artifact:
    """One immutable registry entry: a full model (``kind="model"``) or a delta between two model versions."""

    id: int
    model: str
    number: int
    kind: str
    sha256: str
    size: int
    parent: int | None
    base: int | None
    target: int | None
    codec: str | None
    lineage: dict[str, Any]
    governance: Governance
    signature: str
    created_at: float
    statement_version: int = STATEMENT_VERSION

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.number}"

    def statement(self) -> dict[str, Any]:
        """What the signature covers, in the version of the statement it was made over.

        Statement 2 (every artifact registered since metadata is signed): kind, model, number, base/target,
        the SHA-256 and size of the bytes, parent, codec and the SHA-256 of the canonical JSON of lineage and
        governance (as read back, so what callers see is what was signed). Statement 1 (older artifacts)
        covered kind, model, number, base/target and the SHA-256 only: their metadata is unsigned, which
        :meth:`Registry.verify` notes. An unknown version is a :class:`SignatureError` (never guessed).
        """
        core = {
            "kind": self.kind,
            "model": self.model,
            "version": self.number,
            "base": self.base,
            "target": self.target,
            "sha256": self.sha256,
        }
        if self.statement_version == 1:
            return core
        if self.statement_version != STATEMENT_VERSION:
            raise SignatureError(
                f"{self.ref} names signed statement version {self.statement_version!r}; this deltaplane knows "
                f"1 and {STATEMENT_VERSION}: the row was altered or written by a newer release"
            )
        return {
            **core,
            "statement": STATEMENT_VERSION,
            "size": self.size,
            "parent": self.parent,
            "codec": self.codec,
            "lineage_sha256": _json_digest(self.lineage),
            "governance_sha256": _json_digest(self.governance.to_dict()),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "model": self.model,
            "number": self.number,
            "kind": self.kind,
            "sha256": self.sha256,
            "size": self.size,
            "parent": self.parent,
            "base": self.base,
            "target": self.target,
            "codec": self.codec,
            "lineage": self.lineage,
            "governance": self.governance.to_dict(),
            "signature": self.signature,
            "statement_version": self.statement_version,
            "created_at": self.created_at,
        }


@dataclass
class IntegrityReport:
    """Result of :meth:`Registry.verify`: ``ok`` unless a blob is corrupt/missing or a signature fails."""

    blobs_checked: int = 0
    rows_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not failures (e.g. unsigned metadata)
    orphans: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    # the signed state log's newest entry (INDEX:SHA256): record it elsewhere to detect a log cut short later
    log_head: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RepairReport:
    """Result of :meth:`Registry.repair_from_log`: what differed from the signed state log, and whether it was
    rewritten (``applied``; False for a dry run and when nothing differed)."""

    log_head: str  # the verified log's newest entry (INDEX:SHA256) the tables now equal (or would)
    differences: list[str] = field(default_factory=list)  # one line per row, as verify names them
    notes: list[str] = field(default_factory=list)  # what the operator should know about the rewrite
    applied: bool = False
    # cards, evaluations, verdicts that differ from the log: it holds each row's SHA-256, not its columns, so
    # they cannot be rewritten from it (a backup can); the CLI exits 1 while any remain
    unrepaired: list[str] = field(default_factory=list)


def _missing_keys(home: Path) -> MissingTrustedKeys:
    """The error for a registry read without trusted keys, naming what to do (see :attr:`Registry.verifier`)."""
    return MissingTrustedKeys(
        f"no public keys under {home / 'keys'} and no ${TRUSTED_KEYS_ENV} pin. Reading the registry at {home} "
        "checks signatures (its versions, its signed state log), so it needs the public key of the key that "
        f"signed it: set ${TRUSTED_KEYS_ENV} to a copy of that key's "
        f"{PUBLIC_NAME} (from the home that holds the signing key; kept outside this home it is also a pin), or "
        f"copy it into {home / 'keys' / 'trusted'}/ as NAME.pub. Only for a registry with nothing signed yet is "
        "`deltaplane keys init` the fix: a new key verifies nothing the old one signed"
    )


def _artifact(row: sqlite3.Row) -> Artifact:
    """The artifact a row holds; :class:`IntegrityError` naming the row when a column is not what the registry
    writes (an edited ``registry.db``): never a JSON, type or recursion error from deep inside a read."""
    ref = f"{str(row['model'])[:128]}@{str(row['number'])[:40]}"
    ints = {k: row[k] for k in ("id", "number", "size")}
    optional = {k: row[k] for k in ("parent", "base", "target")}
    texts = {k: row[k] for k in ("model", "kind", "sha256", "signature")}
    bad = [k for k, v in ints.items() if type(v) is not int]
    bad += [k for k, v in optional.items() if v is not None and type(v) is not int]
    bad += [k for k, v in texts.items() if not isinstance(v, str)]
    bad += [] if row["codec"] is None or isinstance(row["codec"], str) else ["codec"]
    bad += [] if isinstance(row["created_at"], int | float) else ["created_at"]
    # absent only in a registry.db made before metadata signing, opened read-only: all its rows are statement 1
    # (`in row` would search a sqlite3.Row's values, not its column names)
    version = row["statement_version"] if "statement_version" in row.keys() else 1  # noqa: SIM118
    bad += [] if type(version) is int else ["statement_version"]
    if bad:
        raise IntegrityError(
            f"registry.db row {ref!r} holds a value of the wrong type in {', '.join(bad)}: the database was "
            "edited; restore it from a backup"
        )
    meta = {
        # a str column only (json.loads would take a BLOB's bytes too: not what the registry writes)
        column: _stored_json(
            row[column] if isinstance(row[column], str) else None,
            f"registry.db row {ref!r}: its {column}",
            dict,
        )
        for column in ("lineage", "governance")
    }
    try:
        governance = Governance.from_dict(meta["governance"])
    except ConfigError as exc:
        raise IntegrityError(f"registry.db row {ref!r}: {exc}: the database was edited") from None
    return Artifact(
        id=row["id"],
        model=row["model"],
        number=row["number"],
        kind=row["kind"],
        sha256=row["sha256"],
        size=row["size"],
        parent=row["parent"],
        base=row["base"],
        target=row["target"],
        codec=row["codec"],
        lineage=meta["lineage"],
        governance=governance,
        signature=row["signature"],
        created_at=row["created_at"],
        statement_version=version,
    )


FILES_KEY = "files"
"""The lineage entry naming a version's companion files (tokenizer, generation config): ``{name: {"sha256": …,
"bytes": …}}``. Inside the lineage, so the version's signature covers each file's hash; the bytes are blobs."""
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_ENTRY_KEYS = frozenset({"sha256", "bytes"})


def _is_companion_record(entries: object) -> TypeGuard[dict[str, Any]]:
    """Whether a lineage's ``files`` has the shape :meth:`Registry.register_model` writes: a non-empty object of
    companion file names, each an object of exactly ``sha256`` and ``bytes``.

    Releases before the registry carried companion files let a user lineage hold its own ``files`` (a list of
    data files, a count, an object of other names): such a version has no companion files, and must keep
    verifying and pulling as it did. No companion name is a path, so an entry that is not the registry's is never
    written anywhere; its integrity is the signature's (statement 2 covers the whole lineage)."""
    return (
        isinstance(entries, dict)
        and bool(entries)
        and all(name in COMPANION_FILES for name in entries)
        and all(isinstance(e, dict) and set(e) == _ENTRY_KEYS for e in entries.values())
    )


def _companion_entries(artifact: Artifact) -> dict[str, tuple[str, int]]:
    """The companion files ``artifact`` records (name → (SHA-256, bytes)); none for a version registered
    without any (every version registered before the registry carried them), including one whose user lineage
    used the key ``files`` for something else (see :func:`_is_companion_record`).

    Raises:
        IntegrityError: a record of the registry's shape that is not what it writes: a malformed hash or
            size, or files recorded in a statement-1 version's unsigned lineage (no statement-1 version was
            registered with companion files).
    """
    entries = artifact.lineage.get(FILES_KEY)
    if not _is_companion_record(entries):
        return {}
    if artifact.statement_version < 2:
        raise IntegrityError(
            f"{artifact.ref}: its lineage's {FILES_KEY!r} is not the signed file list the registry writes: the "
            "database was edited; restore it from a backup"
        )
    out: dict[str, tuple[str, int]] = {}
    for name, entry in entries.items():
        sha, size = entry["sha256"], entry["bytes"]
        if (
            not isinstance(sha, str)
            or not _SHA256.match(sha)
            or type(size) is not int
            or not 0 <= size <= TOKENIZER_LIMIT
        ):
            raise IntegrityError(
                f"{artifact.ref}: its lineage names file {name!r:.80} with {entry!r:.120}, not an entry the "
                f"registry writes (a SHA-256 and a size of at most {TOKENIZER_LIMIT} bytes): the database was "
                "edited; restore it from a backup"
            )
        out[name] = (sha, size)
    return out


def _stored_json(text: str | bytes | None, what: str, kind: type) -> Any:
    """JSON the registry wrote (a card, an evaluation's metrics) read back; :class:`IntegrityError` naming ``what``
    when it is not JSON of that ``kind`` (an edited ``registry.db`` row: never a decode or recursion error)."""
    try:
        value = json.loads(text) if text is not None else None  # None: a column of another type
    except (ValueError, RecursionError, TypeError):  # UnicodeDecodeError is a ValueError
        value = None
    if not isinstance(value, kind):
        raise IntegrityError(
            f"{what} is not the JSON {kind.__name__} the registry writes: registry.db was edited; restore it from "
            "a backup"
        )
    return value


#: A blob of unknown size that ``verify`` finds is read up to the longest one the registry records, or this.
_UNKNOWN_BLOB_FLOOR = 64 << 20
#: How much of a blob a rotation copies at a time (its memory bound, see Registry._rewrap_all).
_COPY_CHUNK = 1 << 20

#: The most an encrypted blob's envelope (magic, key id, wrapped data key, nonce, GCM tag) adds to its data.
_ENVELOPE_SLACK = 4096


def _read_blob_bytes(path: Path, sha256: str, size: int | None, *, largest: int | None = None) -> bytes:
    """A blob file's stored bytes: a regular file only (a FIFO would block the reader for good), and no longer
    than ``size`` (the length recorded for it) plus the envelope when known, else than ``largest`` (the longest
    any blob of the registry records) plus the envelope when given. FileNotFoundError when absent; messages
    name the blob by hash only."""
    import stat

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"blob {sha256} is not a regular file; restore it from a backup")
        limit = st.st_size
        if size is not None:
            limit = size + _ENVELOPE_SLACK
            if st.st_size > limit:
                raise IntegrityError(
                    f"blob {sha256} holds {st.st_size} bytes, more than the {size} recorded for it: corrupt"
                )
        elif largest is not None:
            limit = largest + _ENVELOPE_SLACK
            if st.st_size > limit:
                raise IntegrityError(
                    f"blob {sha256} holds {st.st_size} bytes, more than any blob this registry records "
                    f"({largest}): not one of its blobs"
                )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise IntegrityError(f"blob {sha256} grew while being read")
    return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _card_mismatch(card: Mapping[str, Any], model: str | None, number: int | None) -> str | None:
    """Why ``card`` (a card row's JSON) is not the card of ``model@number``, the version its row points to.

    A card row points to its version by the artifact's row id, which no signature covers: ids swapped in
    ``registry.db`` would show one version's promotion card (the gate's passing metrics) on another. The card's
    JSON is bound to the signed state log by its SHA-256, and a promotion card names its version, so the two
    must agree. A card that names no version (attached by hand) cannot be checked this way.
    """
    named = (card.get("model"), card.get("version"))
    if named == (None, None) or named == (model, number):
        return None
    owner = f"{model}@{number}" if model is not None else "a version that does not exist"
    return (
        f"the model card of {owner} is {named[0]}@{named[1]}'s: the cards row or the artifact row ids were edited "
        "in registry.db (restore it from a backup)"
    )


class Registry:
    """A registry rooted at ``home`` (``<home>/registry.db`` + ``<home>/blobs``), safe across threads/processes.

    Args:
        home: the registry folder; :func:`default_home` when None.
        signer: the key that signs new artifacts; loaded from ``<home>/keys`` on first write when None.
        verifier: trusted public keys for reads; when None, the keys pinned by ``$DELTAPLANE_TRUSTED_KEYS`` if
            set, else those in ``<home>/keys`` (:func:`~deltaplane.registry.signing.load_verifier`). Only a
            pin kept outside the home proves anything against someone who can write the home.
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        if not (self.home / "registry.db").exists():
            raise NotFound(
                f"no registry at {self.home}; create one with `deltaplane registry init --home {self.home}`"
            )
        self._signer = signer
        self._verifier = verifier
        self._local = threading.local()
        self._ring: KeyRing | None = None
        self._ring_fingerprint: tuple[object, ...] | None = None
        settings = self.home / SETTINGS_NAME
        text = (
            read_bounded_text(settings, limit=SETTINGS_LIMIT, what="registry settings file")
            if settings.exists()
            else None
        )
        try:
            found = json.loads(text) if text is not None else None
        except ValueError as exc:
            raise ConfigError(f"{settings} is not valid JSON: {exc}") from None
        if found is not None and not isinstance(found, dict):
            raise ConfigError(f'{settings} must hold a JSON object such as {{"encryption": "{ENCRYPTION}"}}')
        try:
            recorded = self._record_encryption(found)  # also fails early on a broken database
        except sqlite3.DatabaseError as exc:
            raise IntegrityError(
                f"{self.home / 'registry.db'} is not a readable SQLite database: {exc}"
            ) from None
        self._settings: dict[str, Any] = self._checked_settings(found, recorded)
        self._signed: eventlog.SignedState | None = None  # the state log as last verified (see _reading)
        self._plaintext_checked = False  # see _check_signed_plaintext
        self._start_state_log()

    def _start_state_log(self) -> None:
        """Give a registry without a signed state log its first entry: a checkpoint of its current tags, tag
        history and withdrawals (the migration of registries made before the log); a log started by an older
        release gets the entry binding its cards, evaluations and verdicts from before signing
        (:func:`eventlog.ensure_started`).

        Needs the signing key; a handle without one (or on a read-only database) leaves it to the first write,
        which needs the key anyway. An emptied log is left as found: verify reports it, and writes refuse.
        """
        from deltaplane.registry.signing import PRIVATE_NAME

        con = self._connect()
        if eventlog.read_head(con) is not None and all(
            eventlog.marked(con, m) for m in (eventlog.RECORDS_MARKER, eventlog.VERSIONS_MARKER)
        ):
            return  # started, binding the rows of cards/evaluations/verdicts from before signing and their versions
        if self._signer is None and not (self.home / "keys" / PRIVATE_NAME).exists():
            return
        try:
            with self.transaction() as con:
                eventlog.ensure_started(con, self.signer)
        except IntegrityError:
            return
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_READONLY":
                raise

    def _record_encryption(self, found: dict[str, Any] | None) -> str | None:
        """The encryption setting the database records; recorded from registry.json first when it has none.

        That first recording is the migration of registries made before the setting was kept in the database.
        A read-only database keeps the file's word (nothing is written through such a handle anyway).
        """
        con = self._connect()
        recorded = _recorded_setting(con, "encryption")
        if recorded is not None or found is None:
            return recorded
        try:
            with self.transaction() as con:
                con.execute(_SETTINGS_TABLE)
                con.execute(
                    "INSERT OR IGNORE INTO settings (name, value) VALUES ('encryption', ?)",
                    (str(found.get("encryption", "none")),),
                )
                return _recorded_setting(con, "encryption")  # another process may have recorded it first
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_READONLY":
                raise
            return None

    def _checked_settings(self, found: dict[str, Any] | None, recorded: str | None) -> dict[str, Any]:
        """registry.json's settings, refused when the file is missing or disagrees with the database.

        Without this check, deleting or editing registry.json would make an encrypted registry write new
        blobs in plaintext, silently. A registry from before encryption (no file, no record) stays plaintext.
        """
        settings, db = self.home / SETTINGS_NAME, self.home / "registry.db"
        if recorded is None:
            return found or {}
        restore = f"restore it from a backup or write {json.dumps({'encryption': recorded})} to it"
        if found is None:
            raise ConfigError(
                f"{settings} is missing, but {db} records encryption {recorded!r} for this registry: {restore} "
                f"(the registry does not open without it, so that losing it cannot change how blobs are stored)"
            )
        if str(found.get("encryption", "none")) != recorded:
            raise ConfigError(
                f"{settings} says encryption {found.get('encryption', 'none')!r}, but {db} records {recorded!r}: "
                f"an existing registry's encryption cannot be changed by editing the file; {restore}"
            )
        return found

    @classmethod
    def create(
        cls,
        home: str | os.PathLike[str] | None = None,
        *,
        signer: Signer | None = None,
        keys: bool = True,
        encrypt: bool = True,
    ) -> Registry:
        """Create (or open) a registry; also create a signing key when ``keys`` and none exists.

        New registries encrypt blobs at rest unless ``encrypt=False`` (an explicit opt-out). The setting is
        kept in ``<home>/registry.json`` and in the database; a registry whose file is missing or disagrees
        with the database does not open (:class:`ConfigError`), so deleting the file cannot turn encryption
        off. The key-encryption key is ``$DELTAPLANE_KEK`` / ``$DELTAPLANE_KEK_FILE`` when set, else a new
        key file in ``<home>/keys/kek/`` (keep a copy apart from the data: without it the blobs cannot be
        read). Opening an existing registry never changes its setting.
        """
        from deltaplane.registry.signing import PRIVATE_NAME, init_keys

        home = Path(home) if home is not None else default_home()
        try:
            (home / "blobs" / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only or missing parent, a file in the way, /proc...
            raise ConfigError(
                f"cannot create a registry at {home}: {exc.strerror or exc}; choose a folder you can write "
                "(--home, or $DELTAPLANE_HOME)"
            ) from None
        if keys and signer is None and not (home / "keys" / PRIVATE_NAME).exists():
            signer = init_keys(home)
        settings = home / SETTINGS_NAME
        if not settings.exists() and _setting_in(home / "registry.db", "encryption") is None:
            # a registry made before encryption existed stays plaintext (its blobs are plaintext)
            encrypt = encrypt and not (home / "registry.db").exists()
            if encrypt:
                try:
                    KeyRing.load(home)
                except NotFound:
                    KeyRing.create_key_file(home)
            from deltaplane.textfile import atomic_write_bytes

            atomic_write_bytes(
                settings, json.dumps({"encryption": ENCRYPTION if encrypt else "none"}).encode()
            )
        con = sqlite3.connect(home / "registry.db", timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
        finally:
            con.close()
        return cls(home, signer=signer)  # records the setting in the database (see _record_encryption)

    # -- connection & transactions ---------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.home / "registry.db", timeout=60, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # a returned commit survives power loss, not only SIGKILL
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA busy_timeout=60000")
            try:
                _add_statement_version(con)
                _add_sha256_index(con)
            except BaseException:
                con.close()
                raise
            self._local.con = con
        return con

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on this thread's connection; nested uses join the outermost one.

        Nesting is what makes multi-step changes atomic: e.g. the service closes a round by registering the
        new version, its delta, the tag move and the round's closed state inside one ``transaction()``, so a
        failure anywhere leaves none of them (blobs written meanwhile become orphans for :meth:`gc`).
        """
        # BEGIN IMMEDIATE takes the write lock up front, so read-then-insert (next version number) is atomic
        con = self._connect()
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield con
            finally:
                self._local.depth = depth
            return
        con.execute("BEGIN IMMEDIATE")
        self._local.depth = 1
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            self._local.depth = 0
        con.execute("COMMIT")

    _write = transaction

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """Reads that see one consistent state: the open transaction, else a read transaction of their own."""
        con = self._connect()
        if getattr(self._local, "depth", 0) or con.in_transaction:
            yield con
            return
        con.execute("BEGIN")
        try:
            yield con
        finally:
            con.execute("COMMIT")

    @contextmanager
    def _reading(
        self,
        verify: bool,
        *,
        model: str | None = None,
        tag: str | None = None,
        parts: Sequence[str] = eventlog.PARTS,
    ) -> Iterator[sqlite3.Connection]:
        """A connection to read tags/withdrawals from; with ``verify``, first checked against the signed state log
        in the same snapshot (:func:`eventlog.check`: :class:`IntegrityError` / :class:`SignatureError`)."""
        if not verify:
            yield self._connect()
            return
        with self._snapshot() as con:
            self._signed = eventlog.check(con, self.verifier, self._signed, model=model, tag=tag, parts=parts)
            yield con
        self._seal_if_due()

    def _seal_if_due(self) -> None:
        """Store a seal of the state log as last verified (:mod:`~deltaplane.registry.seal`) when it is due and
        this handle holds the signing key, so the next process's first read re-hashes instead of re-verifying.

        Only an optimisation: a read-only database, another writer holding the lock or a handle without the key
        leaves the seal as it is (the next read with the key tries again).
        """
        from deltaplane.registry.signing import PRIVATE_NAME

        due = None if self._signed is None else self._signed.due_seal()
        con = self._connect()
        if due is None or (con.in_transaction and not getattr(self._local, "depth", 0)):
            return  # nothing to seal, or inside a caller's read snapshot (whose lock cannot be upgraded)
        if self._signer is None and not (self.home / "keys" / PRIVATE_NAME).exists():
            return
        from cryptography.exceptions import UnsupportedAlgorithm

        try:
            signer = self.signer
        except (DeltaplaneError, OSError, ValueError, TypeError, UnsupportedAlgorithm):
            return  # a key file this process cannot use (not its to read, or not a key): a read never needs it
        outer = getattr(self._local, "depth", 0)
        if not outer:
            con.execute("PRAGMA busy_timeout=200")  # a read never waits long for a seal
        try:
            with self.transaction() as con:
                seal.write(con, signer, due)
        except sqlite3.OperationalError as exc:
            if outer or getattr(exc, "sqlite_errorname", "") not in ("SQLITE_READONLY", "SQLITE_BUSY"):
                raise
            return
        finally:
            if not outer:
                con.execute("PRAGMA busy_timeout=60000")
        if self._signed is not None and self._signed.head == eventlog.Head(due.index, due.sha256):
            self._signed.sealed = due.index

    def check_state(self, *, model: str | None = None, tag: str | None = None) -> eventlog.Head:
        """Check that tags, tag history and withdrawals (of ``model``/``tag``) are what the signed state log says.

        Raises :class:`IntegrityError` naming what differs (or a broken chain), :class:`SignatureError` for an
        entry without a trusted signature; returns the log's head.
        """
        with self._reading(True, model=model, tag=tag) as _:
            assert self._signed is not None and self._signed.head is not None
            return self._signed.head

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only statement on this thread's connection (for layers that keep tables here)."""
        return self._connect().execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        """Close this thread's database connection."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            self._signer = load_signer(self.home)
        return self._signer

    @property
    def verifier(self) -> Verifier:
        """The trusted public keys reads check signatures with (artifacts, the signed state log; see ``verifier``
        of the class).

        Raises:
            MissingTrustedKeys: no pin is set and the home has no public key (nor does the handle hold a signer).
                Setups that meet it: a copy of ``registry.db`` and ``blobs/`` made without ``keys/`` (a backup, a
                read-only replica for a dashboard), a registry written through the API with a signer passed in
                (``create(keys=False)``). A new key (``deltaplane keys init``) would verify nothing signed before,
                so the message names the fix: trust the signing key's public key.
        """
        if self._verifier is None:
            try:
                self._verifier = load_verifier(self.home)
            except NotFound:
                if self._signer is None:
                    raise _missing_keys(self.home) from None
                self._verifier = self._signer.verifier()
        return self._verifier

    # -- blobs -----------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives; anything but a SHA-256 hex digest is refused (no path outside blobs/)."""
        if not _SHA256_HEX.fullmatch(sha256):
            raise IntegrityError(f"not a blob name (a SHA-256 hex digest): {sha256!r:.80}")
        return self.home / "blobs" / sha256[:2] / sha256[2:]

    @property
    def encrypted(self) -> bool:
        """Whether new blobs are encrypted at rest (AES-256-GCM envelope, :mod:`deltaplane.registry.encryption`)."""
        return self._settings.get("encryption") == ENCRYPTION

    @property
    def keyring(self) -> KeyRing:
        """The key-encryption keys as last loaded (see :meth:`_fresh_keyring` for when they are reloaded)."""
        if self._ring is None:
            self._reload_keyring()
        assert self._ring is not None
        return self._ring

    def _reload_keyring(self) -> KeyRing:
        fingerprint = KeyRing.fingerprint(self.home)  # before reading, so a change meanwhile reloads again
        self._ring = KeyRing.load(self.home)
        self._ring_fingerprint = fingerprint
        return self._ring

    def _fresh_keyring(self) -> KeyRing:
        """The key ring as the key sources are now; call with :func:`key_lock` held (no rotation under way).

        Another handle or process may have rotated the key since this one loaded its ring: sealing with the
        cached current key would use a key whose file the rotation deleted.
        """
        if self._ring is None or KeyRing.fingerprint(self.home) != self._ring_fingerprint:
            return self._reload_keyring()
        return self._ring

    def _decode_blob(self, raw: bytes, sha256: str) -> bytes:
        """The data of a stored blob: opened when the registry is encrypted (its setting says so, never the
        blob's first bytes: a plaintext registry may hold weights that start with the envelope's magic)."""
        if not self.encrypted:
            data = raw
        elif not is_sealed(raw):
            raise IntegrityError(
                f"blob {sha256} is stored in plaintext in an encrypted registry: restore it from a backup"
            )
        else:
            data = self.keyring.open(raw, sha256)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"blob {sha256} is corrupt: its bytes no longer hash to its name")
        return data

    def _read_blob_file(
        self, path: Path, sha256: str, size: int | None = None, *, largest: int | None = None
    ) -> tuple[bytes, bytes]:
        """(stored bytes, decoded bytes) of a blob file; FileNotFoundError when it does not exist.

        ``size``: the decoded length its artifact records, when known; a file longer than that (and the
        envelope's few hundred bytes) is refused before it is read. A blob wrapped by a key this handle has
        not loaded was re-wrapped by a rotation (elsewhere) after the ring was loaded, or is being: wait for
        any rotation, reload the keys and read the file again.
        """
        raw = _read_blob_bytes(path, sha256, size, largest=largest)
        if self.encrypted and is_sealed(raw) and KeyRing.blob_kid(raw) not in self.keyring.keys:
            with key_lock(self.home, exclusive=False, required=False):
                self._fresh_keyring()
                raw = _read_blob_bytes(path, sha256, size, largest=largest)
        return raw, self._decode_blob(raw, sha256)

    def _write_blob_file(self, path: Path, stored: bytes, tag: str, rest: BinaryIO | None = None) -> None:
        """Write ``stored`` (then what is left of ``rest``, copied in chunks) to ``path`` durably and atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.home / "blobs" / "tmp" / f"{tag[:16]}.{uuid.uuid4().hex}.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(stored)
                if rest is not None:
                    shutil.copyfileobj(rest, f, _COPY_CHUNK)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # an error, Ctrl-C or SIGTERM leaves no orphan in blobs/tmp
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` durably under its SHA-256 (temp + fsync + rename + dir fsync); returns the hash.

        In an encrypted registry the file holds the sealed bytes. An existing file under the same name is
        kept only if it decodes to these bytes; a corrupt one is replaced (repaired), not trusted by size.
        """
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        try:
            self._read_blob_file(path, digest)
            return digest
        except (FileNotFoundError, IntegrityError):
            pass  # absent, corrupt or undecryptable: write it below
        if not self.encrypted:
            self._check_signed_plaintext()
            self._write_blob_file(path, data, digest)
            return digest
        # shared with other writers, exclusive with a rotation: the key chosen stays current until the
        # sealed blob is in place (a rotation then re-wraps it, or has finished and its key is the current one)
        with key_lock(self.home, exclusive=False):
            self._write_blob_file(path, self._fresh_keyring().seal(data, digest), digest)
        return digest

    def _check_signed_plaintext(self) -> None:
        """Refuse to write a plaintext blob unless the signed state log says this registry is unencrypted.

        registry.json and the database's ``settings`` row are checked against each other at open, but whoever
        can write both could turn encryption off for every blob written after; the log's ``settings`` entry,
        signed by the registry's key, cannot be rewritten so. Checked once per handle (the setting never
        changes); a registry whose log signs no settings yet (no log, or opened since only without the signing
        key) is taken at its recorded word, which verify notes.
        """
        if self._plaintext_checked:
            return
        with self._snapshot() as con:
            if eventlog.read_head(con) is None:
                return
            self._signed = eventlog.signed_state(con, self.verifier, self._signed)
            signed = self._signed.settings
        if signed is not None and signed.get("encryption") != "none":
            raise IntegrityError(
                f"the signed state log says this registry's blobs are encrypted ({signed.get('encryption')!r}), but "
                f"{self.home / SETTINGS_NAME} and registry.db say 'none': the setting was changed behind the "
                "registry's back; nothing is written in plaintext; restore both from a backup"
            )
        self._plaintext_checked = True

    def get_blob(self, sha256: str, *, size: int | None = None) -> bytes:
        """The bytes stored under ``sha256`` (decrypted); :class:`IntegrityError` if missing, tampered or corrupt,
        not a regular file, or (``size``: the length its artifact records) longer than that.

        Messages name the blob by hash only, never by server path (they may reach devices).
        """
        try:
            return self._read_blob_file(self.blob_path(sha256), sha256, size)[1]
        except FileNotFoundError:
            raise IntegrityError(f"blob {sha256} is missing from the registry") from None

    def rotate_kek(self, new_key: bytes | None = None) -> KekRotation:
        """Re-wrap every blob's data key with the current (or a new) key-encryption key and retire the others.

        Key files: ``new_key`` (default: a random one) is written to ``<home>/keys/kek/`` (0600) and becomes
        current; the old key files are deleted once every blob is re-wrapped. Keys from the environment
        (``$DELTAPLANE_KEK``, ``$DELTAPLANE_KEK_FILE``): the first key there is current and every blob is
        re-wrapped to it; nothing in the environment can be deleted from here, so the result's ``advice`` says
        which keys to remove from it. ``new_key`` is then refused (:class:`ConfigError`): a key file would not
        take over from the environment after a restart.

        Only blob headers are rewritten (atomically, one blob at a time: an interrupted rotation leaves every
        blob readable with the old or the new key). The rotation holds the key lock exclusively throughout,
        so handles in other processes seal no blob meanwhile and reload the keys afterwards; the retired key
        ids are recorded, and a handle whose current key is one of them refuses to seal.
        """
        if not self.encrypted:
            raise ConfigError(f"the registry at {self.home} is not encrypted; there is no key to rotate")
        with key_lock(self.home, exclusive=True):
            ring = KeyRing.load(self.home)
            if ring.from_environment and new_key is not None:
                where = ring.sources[ring.current].split(" ")[0]
                raise ConfigError(
                    f"the current key-encryption key comes from {where}, so a new key file would not take "
                    f"over after a restart: put the new key first in {where} (comma-separated, the old keys "
                    f"after it), restart the processes that use this registry, then run "
                    f"`deltaplane registry rotate-key` without a key (Registry.rotate_kek())"
                )
            old_files = sorted(KeyRing.key_dir(self.home).glob("*.key"))
            if not ring.from_environment:
                kid = KeyRing.create_key_file(self.home, new_key)
                loaded = KeyRing.load(self.home)
                ring = KeyRing(loaded.keys, kid, sources=loaded.sources, retired=loaded.retired)
            changed = self._rewrap_all(ring)
            retired = (set(ring.retired) | set(ring.keys)) - {ring.current}
            KeyRing.save_retired(self.home, retired)
            removed = tuple(f.name for f in old_files if f.stem != ring.current)
            for name in removed:
                (KeyRing.key_dir(self.home) / name).unlink(missing_ok=True)
            self._reload_keyring()
        return KekRotation(
            rewrapped=changed,
            current=ring.current,
            source=ring.sources[ring.current],
            removed_files=removed,
            retired=tuple(sorted(set(ring.keys) - {ring.current})),
            advice=self._rotation_advice(ring, removed),
        )

    def _rewrap_all(self, ring: KeyRing) -> int:
        """Re-wrap every sealed blob to ``ring.current``; returns how many changed.

        Streamed: of each blob only the header is read and rewritten; the ciphertext is copied across in
        :data:`_COPY_CHUNK` pieces, so memory stays bounded by the chunk, not by the largest blob.
        """
        changed = 0
        for sub in sorted(p for p in (self.home / "blobs").iterdir() if p.is_dir() and p.name != "tmp"):
            for f in sorted(sub.iterdir()):
                with open(f, "rb") as src:
                    head = src.read(HEADER_MAX)
                    if not is_sealed(head):
                        continue
                    new = ring.rewrap_header(head, sub.name + f.name, os.fstat(src.fileno()).st_size)
                    if new is None:
                        continue
                    src.seek(new[1])
                    self._write_blob_file(f, new[0], sub.name + f.name, rest=src)
                changed += 1
        return changed

    @staticmethod
    def _rotation_advice(ring: KeyRing, removed: tuple[str, ...]) -> str:
        """What is left for the operator after a rotation: the retired keys the environment still holds."""
        lines = [f"every blob is wrapped by key {ring.current} (from {ring.sources[ring.current]})"]
        if removed:
            lines.append(f"deleted old key files: {', '.join(removed)}")
        in_env = sorted(k for k in ring.keys if k != ring.current and ring.sources[k].startswith("$"))
        if in_env:
            places = sorted({ring.sources[k].split(" ")[0] for k in in_env})
            lines.append(
                f"the old keys {', '.join(in_env)} are no longer needed: remove them from "
                f"{' and '.join(places)} (keep only the current key) and restart the processes that use it"
            )
        return "; ".join(lines)

    # -- registration ----------------------------------------------------------------------------------
    def _insert(
        self,
        *,
        model: str,
        kind: str,
        data: bytes,
        parent: int | None,
        base: int | None,
        target: int | None,
        codec: str | None,
        lineage: Mapping[str, Any] | None,
        governance: Governance | Mapping[str, Any] | None,
    ) -> Artifact:
        _check_name("model name", model)
        gov = Governance.of(governance)
        lineage_json = _lineage_json(lineage)
        governance_json = json.dumps(gov.to_dict(), sort_keys=True)
        digest = self.put_blob(data)  # durable before any row references it
        with self._write() as con:
            for label, ref in (("parent", parent), ("base", base), ("target", target)):
                if (
                    ref is not None
                    and not con.execute(
                        "SELECT 1 FROM artifacts WHERE model=? AND number=? AND kind='model'", (model, ref)
                    ).fetchone()
                ):
                    raise NotFound(f"{label} version {model}@{ref} is not a registered model")
            number = con.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM artifacts WHERE model=?", (model,)
            ).fetchone()[0]
            now = time.time()
            # sign the row as it will be read back (lineage and governance parsed from their stored JSON)
            draft = Artifact(
                id=0,
                model=model,
                number=number,
                kind=kind,
                sha256=digest,
                size=len(data),
                parent=parent,
                base=base,
                target=target,
                codec=codec,
                lineage=json.loads(lineage_json),
                governance=Governance.from_dict(json.loads(governance_json)),
                signature="",
                created_at=now,
            )
            sig = self.signer.sign(draft.statement()).to_text()
            cur = con.execute(
                "INSERT INTO artifacts (model, number, kind, sha256, size, parent, base, target, codec, lineage,"
                " governance, signature, created_at, statement_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    model,
                    number,
                    kind,
                    digest,
                    len(data),
                    parent,
                    base,
                    target,
                    codec,
                    lineage_json,
                    governance_json,
                    sig,
                    now,
                    draft.statement_version,
                ),
            )
            row = con.execute("SELECT * FROM artifacts WHERE id=?", (cur.lastrowid,)).fetchone()
        return _artifact(row)

    def register_model(
        self,
        model: str,
        state: Mapping[str, torch.Tensor] | bytes,
        *,
        parent: int | None = None,
        lineage: Mapping[str, Any] | None = None,
        governance: Governance | Mapping[str, Any] | None = None,
        sources: Sequence[Artifact | str] = (),
        files: Mapping[str, bytes] | None = None,
    ) -> Artifact:
        """Add a new immutable, signed model version (next number for ``model``) and return it.

        ``lineage`` records what produced it — e.g. ``{"round": 12, "merge_config": {...}, "deploy_recipe":
        "int8"}``; ``parent`` is the model version it was derived from; ``sources`` are other versions (of any
        model) it was built from — a merge's inputs, the model a deploy recipe compressed. The version's
        governance is the union of what it is given and what the parent and sources contributed (cohorts and
        data sources flow down the lineage), so a consent withdrawal reaches every descendant.

        ``files`` are the checkpoint folder's companion files (its tokenizer's, its generation config:
        :func:`~deltaplane.shards.read_companion_files`), stored as blobs and named with their SHA-256 and size
        in the lineage's ``files``, so the signature covers them as it covers ``config``; :meth:`load_files`
        gives them back. Left out (``None``), a version with a ``parent`` inherits the parent's (the same
        blobs, nothing copied): a fleet round's model or a fine-tune registered with ``--parent`` keeps the
        tokenizer it was trained with. ``files={}`` registers a version without any.

        Raises:
            ConfigError: a file name outside :data:`~deltaplane.shards.COMPANION_FILES`, a file or all of them
                over their limits, or a ``lineage`` that sets ``files`` itself.
            IntegrityError, SignatureError: the parent's files to inherit are not as signed, or their blobs
                are gone.
        """
        data = state if isinstance(state, bytes) else state_to_bytes(state)
        if isinstance(state, bytes):
            state_from_bytes(state)  # refuse bytes that are not a loadable state dict
        own = Governance.of(governance).check_names()
        inputs = [self.resolve(x) if isinstance(x, str) else x for x in sources]
        inherited: dict[str, dict[str, Any]] = {}
        if parent is not None:
            inputs.append(self.get(model, parent))
            if files is None:  # a child keeps its parent's tokenizer unless given its own
                inherited = self._inherited_files(inputs[-1])
        if inputs:
            own = Governance.combine(own, *(a.governance for a in inputs))
            if sources:
                lineage = {**dict(lineage or {}), "sources": [a.ref for a in inputs[: len(sources)]]}
        governance = own
        if isinstance(lineage, Mapping) and FILES_KEY in lineage:
            raise ConfigError(
                f"lineage key {FILES_KEY!r} is the registry's (the hashes of the files stored with a version); "
                "name your entry otherwise"
            )
        if files:
            lineage = {**dict(lineage or {}), FILES_KEY: self._put_files(files)}
        elif inherited:
            lineage = {**dict(lineage or {}), FILES_KEY: inherited}
        return self._insert(
            model=model,
            kind="model",
            data=data,
            parent=parent,
            base=None,
            target=None,
            codec=None,
            lineage=lineage,
            governance=governance,
        )

    def _inherited_files(self, parent: Artifact) -> dict[str, dict[str, Any]]:
        """``parent``'s companion file entries, for a child that names the same blobs (none when it has none).

        The parent's signature is checked first: the child's signature will cover these entries, so an entry
        edited into the parent's row must not come out of a child validly signed. The blobs must be present
        (a child whose pull fails is not registered); they are not read again, so a round costs no extra I/O.
        """
        entries = _companion_entries(parent)
        if not entries:
            return {}
        self.verifier.verify(parent.statement(), parent.signature)
        missing = [name for name, (sha, _) in entries.items() if not self.blob_path(sha).is_file()]
        if missing:
            raise IntegrityError(
                f"{parent.ref}: the blobs of its files {', '.join(missing)} are missing, so a version made from it "
                "cannot inherit them; restore blobs/ from a backup, or register the child with its own files"
            )
        return {name: {"sha256": sha, "bytes": size} for name, (sha, size) in entries.items()}

    def _put_files(self, files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
        """Store companion files as blobs (durable before the row naming them); their lineage entry."""
        bad = [n for n in files if n not in COMPANION_FILES]
        if bad:
            raise ConfigError(
                f"files {bad[:5]!r:.200} are not files the registry carries with a version; it carries "
                f"{', '.join(COMPANION_FILES)}"
            )
        sizes = {n: len(d) for n, d in files.items()}
        if max(sizes.values()) > TOKENIZER_LIMIT or sum(sizes.values()) > COMPANION_LIMIT:
            raise ConfigError(
                f"the files stored with a version may hold at most {TOKENIZER_LIMIT // 2**20} MiB each and "
                f"{COMPANION_LIMIT // 2**20} MiB together; these hold {sizes}"
            )
        return {n: {"sha256": self.put_blob(bytes(d)), "bytes": len(d)} for n, d in files.items()}

    def load_files(self, artifact: Artifact, *, verify: bool = True) -> dict[str, bytes]:
        """The companion files stored with a model version (name → bytes; empty for one registered without).

        Each is hash-checked against the lineage entry, which (``verify``) the version's signature covers.

        Raises:
            IntegrityError: a blob missing, tampered with or longer than recorded; a lineage entry the
                registry does not write (see :func:`_companion_entries`).
            SignatureError: (``verify``) the version's signature does not verify.
        """
        entries = _companion_entries(artifact)
        if entries and verify:
            self.verifier.verify(artifact.statement(), artifact.signature)
        out = {}
        for name, (sha, size) in entries.items():
            data = self.get_blob(sha, size=size)
            if len(data) != size:
                raise IntegrityError(
                    f"{artifact.ref}: file {name} has {len(data)} bytes, its lineage says {size}"
                )
            out[name] = data
        return out

    def register_delta(
        self,
        model: str,
        payload: bytes,
        *,
        base: int,
        target: int | None = None,
        lineage: Mapping[str, Any] | None = None,
        governance: Governance | Mapping[str, Any] | None = None,
        expect_layout: Layout | Mapping[str, torch.Tensor] | None = None,
    ) -> Artifact:
        """Add a compressed delta (a wire-format payload) that turns model ``base`` into ``target``.

        The payload must decode and declare ``(model, base)`` as its base; ``target`` (optional) is the
        model version that applying it produces, which lets the service serve it as a downlink delta.
        ``expect_layout`` (the base's state dict or its :class:`~deltaplane.codecs.Layout`) also refuses a
        payload for another architecture before decoding it.
        """
        from deltaplane.codecs import decompress, read_header

        # strict: malformed, wrong-base or (given a layout) wrong-architecture payloads are refused
        decompress(payload, expect_base=(model, base), expect_layout=expect_layout)
        codec = read_header(payload).codec
        if governance is not None:
            governance = Governance.of(governance).check_names()
        return self._insert(
            model=model,
            kind="delta",
            data=payload,
            parent=base,
            base=base,
            target=target,
            codec=codec,
            lineage=lineage,
            governance=governance,
        )

    # -- lookup ----------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [r[0] for r in self._connect().execute("SELECT DISTINCT model FROM artifacts ORDER BY model")]

    def versions(self, model: str | None = None, *, kind: str | None = None) -> list[Artifact]:
        """All artifacts (optionally of one model / kind), oldest first."""
        q, args = "SELECT * FROM artifacts WHERE 1=1", []
        if model is not None:
            q += " AND model=?"
            args.append(model)
        if kind is not None:
            q += " AND kind=?"
            args.append(kind)
        return [_artifact(r) for r in self._connect().execute(q + " ORDER BY id", args)]

    def deployed_from(self, sha256: str, *, model: str | None = None) -> Artifact | None:
        """The model version a deploy artifact names as its source, or None when no version holds it.

        A deploy manifest's ``source_sha256`` is the SHA-256 of the weights file it compressed: a version pulled
        with ``registry pull`` (whose ``model.safetensors`` is the version's bytes, so the version's ``sha256``)
        or the file a version was registered from (its lineage's ``source.sha256``). Versions of ``model`` come
        first, then the newest; the one returned has its signature checked, so the link rests on what the
        registry signed, not on an edited row (a statement-1 version's unsigned lineage links by bytes only).

        Raises:
            SignatureError: the version found does not verify (the database was edited).
        """
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            return None
        rows = self._connect().execute(
            "SELECT *, sha256=? AS by_bytes FROM artifacts WHERE kind='model' AND (sha256=? OR (json_valid(lineage)"
            " AND json_extract(lineage, '$.source.sha256')=?)) ORDER BY model=? DESC, id DESC",
            (sha256, sha256, sha256, model),
        )
        for row in rows:
            art = _artifact(row)
            if row["by_bytes"] or art.statement_version >= 2:
                self.verifier.verify(art.statement(), art.signature)
                return art
        return None

    def get(self, model: str, number: int) -> Artifact:
        if not isinstance(number, int) or not 0 < number < 2**63:
            raise NotFound(f"{model}@{number} does not exist: version numbers are positive 64-bit integers")
        row = (
            self._connect()
            .execute("SELECT * FROM artifacts WHERE model=? AND number=?", (model, number))
            .fetchone()
        )
        if row is None:
            known = [a.number for a in self.versions(model)]
            raise NotFound(f"{model}@{number} does not exist; {model} has versions {known[-10:]}")
        return _artifact(row)

    def resolve(self, ref: str, *, verify: bool = False) -> Artifact:
        """Look up ``model@N``, ``model@latest`` (newest model version) or ``model:tag`` (with ``verify``, the tag
        is checked against the signed state log)."""
        m = _REF.fullmatch(ref) if isinstance(ref, str) else None
        if not m or not m.group("sep"):
            raise ConfigError(
                f"version reference must be 'model@N', 'model@latest' or 'model:tag' (names and tags of at most "
                f"128 characters). Found {ref!r:.200}"
            )
        model, sep, what = m.group("model"), m.group("sep"), m.group("what")
        if sep == ":":
            return self.get(model, self.tag(model, what, verify=verify))
        if what == "latest":
            rows = self.versions(model, kind="model")
            if not rows:
                raise NotFound(f"{model} has no model versions")
            return rows[-1]
        if not what.isdigit():  # 'wine@training': a tag named the way a version is
            raise ConfigError(
                f"version number must be an integer. Found {what!r} in {ref!r}; a tag is named with a colon: "
                f"'{model}:{what}'"
            )
        return self.get(model, int(what))

    def find_delta(self, model: str, base: int, target: int) -> Artifact | None:
        """The newest registered delta turning ``base`` into ``target``, if any."""
        row = (
            self._connect()
            .execute(
                "SELECT * FROM artifacts WHERE model=? AND kind='delta' AND base=? AND target=? ORDER BY id DESC",
                (model, base, target),
            )
            .fetchone()
        )
        return _artifact(row) if row else None

    def read(self, artifact: Artifact, *, verify: bool = True) -> bytes:
        """The artifact's bytes, hash-checked, and (``verify``) signature-checked against trusted keys."""
        data = self.get_blob(artifact.sha256, size=artifact.size)
        if verify:
            self.verifier.verify_bytes(data, artifact.statement(), artifact.signature)
        return data

    def load_state(self, ref: str | Artifact, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The state dict of a model version, verified before it is returned (a ``model:tag`` reference: the tag too)."""
        art = self.resolve(ref, verify=verify) if isinstance(ref, str) else ref
        if art.kind != "model":
            raise ConfigError(f"{art.ref} is a delta; load_state needs a model version")
        return state_from_bytes(self.read(art, verify=verify))

    # -- tags ------------------------------------------------------------------------------------------
    def tag(self, model: str, tag: str, *, verify: bool = False) -> int:
        """The version ``model:tag`` points to; ``verify`` checks the tag against the signed state log first."""
        with self._reading(verify, model=model, tag=tag, parts=("tags",)) as con:
            row = con.execute("SELECT number FROM tags WHERE model=? AND tag=?", (model, tag)).fetchone()
        if row is None:
            raise NotFound(f"{model} has no tag {tag!r}; tags: {sorted(self.tags(model))}")
        return int(row[0])

    def tags(self, model: str, *, verify: bool = False) -> dict[str, int]:
        """Every tag of ``model``; ``verify`` checks them against the signed state log first."""
        with self._reading(verify, model=model, parts=("tags",)) as con:
            rows = con.execute("SELECT tag, number FROM tags WHERE model=?", (model,)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def set_tag(self, model: str, tag: str, number: int, *, reason: str = "", action: str = "set") -> None:
        """Point ``model:tag`` at model version ``number`` (recorded in the tag history and the signed state log).

        Refused (:class:`IntegrityError`) when the tag or its history already differ from the signed state log:
        the move would otherwise sign a ``previous`` version that someone else wrote.

        A gated tag (:func:`is_gated_tag`: ``production``, ``production.<cohort>``) says what devices are served,
        so it moves only through the promotion gate: :func:`~deltaplane.registry.promotion.promote` and
        :func:`~deltaplane.registry.promotion.rollback`, which run its checks first. Any move of a gated tag
        from here is a :class:`PromotionRefused`, with one exception: placing a model's first ``production`` (a
        new model's initial version, which no device runs yet and nothing can be compared with) when that
        version contains no withdrawn cohort. ``action`` is what the tag history records; the gate's own actions
        (``"promote"``, ``"rollback"``) are refused here, so that no caller can label a move as the gate's to
        skip the gate.
        """
        if action in GATED_ACTIONS:
            raise PromotionRefused(
                f"set_tag(action={action!r}) is refused: only the promotion gate records a {action!r} "
                f"(promote(registry, '{model}@{number}', to='{tag}') or rollback(registry, '{model}', tag='{tag}'); "
                f"`deltaplane registry promote` / `rollback`), after its checks"
            )
        self._move_tag(model, tag, number, reason=reason, action=action)

    def _move_tag(self, model: str, tag: str, number: int, *, reason: str = "", action: str) -> None:
        """:meth:`set_tag` without its refusal of the gate's actions: for :mod:`~deltaplane.registry.promotion`
        only, which calls it with ``"promote"`` / ``"rollback"`` once its checks passed."""
        _check_name("tag", tag)
        gated = is_gated_tag(tag) and action not in GATED_ACTIONS
        if gated and tag != PRODUCTION:
            raise PromotionRefused(
                f"{model}:{tag} is what devices of cohort {tag.partition('.')[2]!r} are served as production, so it "
                f"moves only through the promotion gate: `deltaplane registry promote {model}@{number} --to {tag}` "
                f"(promote(registry, '{model}@{number}', to='{tag}'), POST /admin/models/{model}/promote)"
            )
        if gated:
            problems = self.governance_problems(self.get(model, number), verify=True)
            if problems:
                raise PromotionRefused(f"{model}@{number} may not be tagged {tag!r}: {problems[0]}")
        signer = self.signer  # before the write lock: loading the key reads a file
        with self._write() as con:
            if not con.execute(
                "SELECT 1 FROM artifacts WHERE model=? AND number=? AND kind='model'", (model, number)
            ).fetchone():
                raise NotFound(f"{model}@{number} is not a registered model version")
            eventlog.ensure_started(con, signer)
            self._signed = eventlog.check(
                con, self.verifier, self._signed, model=model, tag=tag, parts=("tags", "tag_history")
            )
            if (
                gated
                and con.execute(
                    "SELECT 1 FROM tag_history WHERE model=? AND tag=? LIMIT 1", (model, tag)
                ).fetchone()
            ):
                raise PromotionRefused(
                    f"{model}:{tag} is already held: it moves only through the promotion gate "
                    f"(`deltaplane registry promote {model}@{number}`, promote(registry, '{model}@{number}'), "
                    f"POST /admin/models/{model}/promote) or back with `deltaplane registry rollback {model}`"
                )
            self._seal_if_due()
            prev = con.execute("SELECT number FROM tags WHERE model=? AND tag=?", (model, tag)).fetchone()
            previous, now = (prev[0] if prev else None), time.time()
            con.execute(
                "INSERT INTO tags (model, tag, number, updated_at) VALUES (?,?,?,?) "
                "ON CONFLICT (model, tag) DO UPDATE SET number=excluded.number, updated_at=excluded.updated_at",
                (model, tag, number, now),
            )
            row = con.execute(
                "INSERT INTO tag_history (model, tag, number, previous, action, reason, at) VALUES (?,?,?,?,?,?,?)",
                (model, tag, number, previous, action, reason, now),
            ).lastrowid
            change = eventlog.tag_change(model, tag, number, previous, action, reason, now, int(row or 0))
            eventlog.append(con, signer, change)

    def record_rollback(self, model: str, tag: str, number: int) -> dict[str, Any]:
        """Sign and store a rollback record: ``model:tag`` now serves ``number``, superseding every newer version.

        Devices refuse to move to an older version than the one they hold (a downgrade is what a man in the
        middle replaying an old, validly signed model would cause); a rollback record signed by the registry's
        key is the explicit permission. It covers every version up to the newest that exists now
        (``supersedes``), so a device on any of them may follow the rollback.
        """
        target = self.get(model, number)
        with self._write() as con:
            supersedes = con.execute("SELECT MAX(number) FROM artifacts WHERE model=?", (model,)).fetchone()[
                0
            ]
            stmt = rollback_statement(model, tag, number, int(supersedes), target.sha256)
            sig = self.signer.sign(stmt).to_text()
            con.execute(
                "INSERT INTO rollbacks (model, tag, number, supersedes, signature, at) VALUES (?,?,?,?,?,?)",
                (model, tag, number, int(supersedes), sig, time.time()),
            )
        return {"tag": tag, "version": number, "supersedes": int(supersedes), "signature": sig}

    def rollback_record(
        self, model: str, number: int, have: int, *, tag: str | None = None
    ) -> dict[str, Any] | None:
        """The signed rollback record that lets a device on ``have`` move back to ``number``, if one is current
        (``tag``: only a rollback of that tag, the one the device is served from).

        A record is current only while its tag still holds what that rollback put there: the tag's newest move
        (its history, verified against the signed state log) is the rollback to ``number`` that signed it, and it
        is the tag's newest record. Once the tag moves again (a promotion, a move back by hand, another rollback)
        the record is stale and never offered again, so a device ahead of a later move back stays where it is.
        """
        con = self._connect()
        rows = con.execute(
            "SELECT tag, number, supersedes, signature, at FROM rollbacks WHERE model=? AND (? IS NULL OR tag=?) "
            "ORDER BY id DESC",
            (model, tag, tag),
        ).fetchall()
        newest: dict[str, tuple[Any, ...]] = {}
        for r in rows:
            newest.setdefault(r[0], tuple(r))
        for rtag, rnum, supersedes, signature, at in newest.values():
            if rnum != number or supersedes < have:
                continue
            history = self.tag_history(model, rtag, verify=True)
            last = history[-1] if history else None
            if last and last["action"] == "rollback" and last["number"] == number and last["at"] <= at:
                return {"tag": rtag, "version": rnum, "supersedes": supersedes, "signature": signature}
        return None

    def tag_history(self, model: str, tag: str, *, verify: bool = False) -> list[dict[str, Any]]:
        """Every move of ``model:tag``, oldest first; ``verify`` checks them against the signed state log first."""
        with self._reading(verify, model=model, tag=tag, parts=("tag_history",)) as con:
            rows = con.execute(
                "SELECT * FROM tag_history WHERE model=? AND tag=? ORDER BY id", (model, tag)
            ).fetchall()
        return [dict(r) for r in rows]

    # -- cards, evaluations, governance ----------------------------------------------------------------
    def attach_card(self, artifact: Artifact, card: Mapping[str, Any]) -> str:
        """Attach a model card (JSON) to an artifact; the newest attached card is the current one."""
        digest = self.put_blob(json.dumps(dict(card), sort_keys=True, indent=1, default=str).encode())
        self._insert_signed(
            "cards",
            "INSERT INTO cards (artifact, sha256, at) VALUES (?,?,?)",
            (artifact.id, digest, time.time()),
        )
        return digest

    def _insert_signed(self, table: str, sql: str, args: tuple[Any, ...], ddl: str | None = None) -> None:
        """Insert a row of ``table`` and, in the same transaction, append a signed state log entry carrying the
        row's SHA-256 (:func:`eventlog.record_change`), so :meth:`verify` sees the row edited, moved or deleted."""
        signer = self.signer  # before the write lock: loading the key reads a file
        with self._write() as con:
            if ddl is not None:
                con.execute(ddl)
            row = con.execute(sql, args).lastrowid
            eventlog.append(con, signer, eventlog.record_change(con, table, int(row or 0)))

    @contextmanager
    def _records(self) -> Iterator[tuple[sqlite3.Connection, eventlog.SignedState | None]]:
        """A snapshot to read cards, evaluations and verdicts from, with the verified state log that binds them
        (None for a registry without a log: its rows are all unsigned, and labelled so).

        The verified replay is cached on the handle (:func:`eventlog.signed_state`): a read replays only the
        entries appended since, so its cost is a head lookup and one SHA-256 per row returned.
        """
        with self._snapshot() as con:
            if eventlog.read_head(con) is None and not eventlog.marked(con):
                yield con, None
                return
            self._signed = eventlog.signed_state(con, self.verifier, self._signed)
            yield con, self._signed
        self._seal_if_due()

    @staticmethod
    def _record_status(
        signed: eventlog.SignedState | None,
        table: str,
        row: sqlite3.Row,
        what: str,
        of: Artifact | None = None,
    ) -> str:
        """:func:`eventlog.record_status` of ``row`` (``of``: the version it was read for), its
        :class:`IntegrityError` naming ``what`` and the remedy."""
        version = None if of is None else [of.model, of.number, of.sha256]
        try:
            return eventlog.record_status(signed, table, dict(row), version)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{what}: {exc}. `deltaplane registry verify` lists every such row; restore registry.db from a "
                "backup"
            ) from None

    def card_entry(self, artifact: Artifact) -> tuple[dict[str, Any], str] | None:
        """The current model card of ``artifact`` and how its row is vouched for (``"signed"``, ``"legacy"``:
        written before rows were signed and bound as found, ``"unsigned"``: not verified, see
        :func:`eventlog.record_status`); None when it has none.

        Raises:
            IntegrityError: the card row differs from the signed state log (edited, another version's card row,
                inserted into registry.db), or its blob is not the card JSON the registry wrote.
        """
        with self._records() as (con, signed):
            row = con.execute(
                "SELECT * FROM cards WHERE artifact=? ORDER BY id DESC", (artifact.id,)
            ).fetchone()
            if not row:
                return None
            what = f"the model card of {artifact.ref} (cards row {row['id']})"
            status = self._record_status(signed, "cards", row, what, artifact)
        card = _stored_json(self.get_blob(row["sha256"]), f"{what}, blob {row['sha256']}", dict)
        mismatch = _card_mismatch(card, artifact.model, artifact.number)
        if mismatch:
            raise IntegrityError(mismatch)
        return card, status

    def card(self, artifact: Artifact) -> dict[str, Any] | None:
        """The current model card of ``artifact`` (None when it has none), checked as :meth:`card_entry` says."""
        entry = self.card_entry(artifact)
        return None if entry is None else entry[0]

    def record_evaluation(self, artifact: Artifact, evaluator: str, metrics: Mapping[str, float]) -> None:
        """Keep an evaluator's scores of ``artifact`` (bound to the signed state log, as cards and verdicts are)."""
        self._insert_signed(
            "evaluations",
            "INSERT INTO evaluations (artifact, evaluator, metrics, at) VALUES (?,?,?,?)",
            (artifact.id, evaluator, json.dumps(dict(metrics), sort_keys=True), time.time()),
        )

    def evaluations(self, artifact: Artifact) -> list[dict[str, Any]]:
        """Every evaluation of ``artifact``, oldest first; each row checked against the signed state log, its
        ``record`` saying how it is vouched for (as :meth:`card_entry`; :class:`IntegrityError` naming the row)."""
        with self._records() as (con, signed):
            rows = con.execute(
                "SELECT * FROM evaluations WHERE artifact=? ORDER BY id", (artifact.id,)
            ).fetchall()
            out = []
            for r in rows:
                what = f"evaluation row {r['id']} of {artifact.ref}"
                status = self._record_status(
                    signed, "evaluations", r, what, artifact
                )  # first: edits are named
                out.append(
                    {
                        "evaluator": r["evaluator"],
                        "metrics": _stored_json(r["metrics"], what, dict),
                        "at": r["at"],
                        "record": status,
                    }
                )
        return out

    def record_promotion_decision(
        self,
        model: str,
        tag: str,
        candidate: int,
        *,
        previous: int | None,
        promoted: bool,
        evaluator: str,
        metrics: Mapping[str, float],
        baseline: Mapping[str, float] | None,
        reasons: list[str],
    ) -> None:
        """Keep a promotion gate's verdict and its numbers, refusals included (the dashboard shows them)."""
        self._insert_signed(
            "promotion_decisions",
            "INSERT INTO promotion_decisions (model, tag, candidate, previous, promoted, evaluator, metrics, "
            "baseline, reasons, at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                model,
                tag,
                candidate,
                previous,
                int(promoted),
                evaluator,
                json.dumps(dict(metrics), sort_keys=True),
                None if baseline is None else json.dumps(dict(baseline), sort_keys=True),
                json.dumps(list(reasons)),
                time.time(),
            ),
            ddl=_DECISIONS_TABLE,
        )

    def promotion_decisions(self, model: str) -> list[dict[str, Any]]:
        """Every recorded promotion verdict for ``model``, oldest first (see :meth:`record_promotion_decision`);
        each row checked against the signed state log, its ``record`` saying how it is vouched for (as
        :meth:`card_entry`; :class:`IntegrityError` naming the row)."""
        with self._records() as (con, signed):
            if not con.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='promotion_decisions'"
            ).fetchone():
                return []  # a registry created before decisions were recorded
            rows = con.execute(
                "SELECT * FROM promotion_decisions WHERE model=? ORDER BY id", (model,)
            ).fetchall()
            out = []
            for r in rows:
                what = f"promotion decision row {r['id']}"
                status = self._record_status(signed, "promotion_decisions", r, what)
                out.append(
                    {
                        "tag": r["tag"],
                        "candidate": r["candidate"],
                        "previous": r["previous"],
                        "promoted": bool(r["promoted"]),
                        "evaluator": r["evaluator"],
                        "metrics": _stored_json(r["metrics"], what, dict),
                        "baseline": None
                        if r["baseline"] is None
                        else _stored_json(r["baseline"], what, dict),
                        "reasons": _stored_json(r["reasons"], what, list),
                        "at": r["at"],
                        "record": status,
                    }
                )
        return out

    def withdraw_cohort(self, cohort: str, *, reason: str = "") -> list[Artifact]:
        """Record that ``cohort`` withdrew consent; returns every version (and delta) that contains it.

        Those versions can no longer be promoted or served; :meth:`last_unaffected` names the version a
        rebuild without the cohort starts from.
        """
        _check_name("cohort", cohort)
        signer = self.signer
        with self._write() as con:
            # never refused for a state log that differs elsewhere: a withdrawal must always be recorded
            now = time.time()
            con.execute(
                "INSERT OR REPLACE INTO withdrawals (cohort, reason, at) VALUES (?,?,?)",
                (cohort, reason, now),
            )
            eventlog.append(con, signer, eventlog.withdraw_change(cohort, reason, now))
        return self.affected_by(cohort)

    def withdrawn_cohorts(self, *, verify: bool = False) -> set[str]:
        """Every cohort that withdrew consent; ``verify`` checks them against the signed state log first (a deleted
        withdrawal would let versions trained on the cohort pass the promotion gate and be served)."""
        with self._reading(verify, parts=("withdrawals",)) as con:
            return {r[0] for r in con.execute("SELECT cohort FROM withdrawals").fetchall()}

    def contributors(self, artifact: Artifact, _memo: dict[str, set[str]] | None = None) -> set[str]:
        """Every cohort in ``artifact``: its own governance plus its parent's and sources', transitively.

        Walking the lineage (not only trusting the recorded governance) means a version cannot shed a
        cohort by declaring it excluded while descending from a version that contains it. The walk keeps its
        own stack (no recursion), so a parent chain of any length (a version per round, thousands of rounds)
        is walked in time and memory linear in its length, never into Python's recursion limit.
        """
        memo = {} if _memo is None else _memo
        if artifact.ref in memo:
            return memo[artifact.ref]
        # post-order: an artifact's set is made once every artifact above it has one; one on the current path
        # (a loop, which only an edited registry.db can hold) counts with its own cohorts
        on_path: set[str] = set()
        stack: list[tuple[Artifact, list[Artifact] | None]] = [(artifact, None)]
        while stack:
            art, ups = stack.pop()
            if ups is None:
                if art.ref in memo:
                    continue
                ups = self._upstream(art)
                on_path.add(art.ref)
                stack.append((art, ups))
                stack.extend((up, None) for up in ups if up.ref not in memo and up.ref not in on_path)
                continue
            out = set(art.governance.cohorts)
            for up in ups:
                out |= memo.get(up.ref, set(up.governance.cohorts))
            memo[art.ref] = out
            on_path.discard(art.ref)
        return memo[artifact.ref]

    def _upstream(self, artifact: Artifact) -> list[Artifact]:
        """The versions ``artifact`` was built from: its parent, the lineage's ``sources`` that still resolve, and
        every earlier model version holding the same weights.

        The same weights are the same model, whatever the new row says: a version pulled (``registry pull``)
        and registered again under another name, with no ``--parent`` and no cohorts, would otherwise be a
        withdrawn cohort's model laundered into a version free to promote and serve. The canonical bytes are
        compared (:func:`state_to_bytes`: a file re-saved with other metadata or tensor order still matches);
        only earlier versions count, so the walk stays acyclic and a version's contributors never change after
        it is registered. Weights changed at all (fine-tuned, re-quantized) are a new model, which only its
        recorded lineage links."""
        ups: list[Artifact] = []
        if artifact.parent is not None:
            ups.append(self.get(artifact.model, artifact.parent))
        ups.extend(self.same_weights(artifact))
        for ref in artifact.lineage.get("sources", []) if isinstance(artifact.lineage, dict) else []:
            try:
                ups.append(self.resolve(str(ref)))
            except (NotFound, ConfigError):
                continue
        return ups

    def same_weights(self, artifact: Artifact) -> list[Artifact]:
        """The model versions registered before ``artifact`` that hold the same weights (the same canonical bytes),
        oldest first; none for a delta. The consent walk counts ``artifact`` as built from each of them."""
        if artifact.kind != "model":
            return []
        rows = self._connect().execute(
            "SELECT * FROM artifacts WHERE sha256=? AND kind='model' AND id<? ORDER BY id",
            (artifact.sha256, artifact.id),
        )
        return [_artifact(r) for r in rows]

    def affected_by(self, cohort: str) -> list[Artifact]:
        """Every artifact that contains ``cohort`` (through its lineage), oldest first."""
        memo: dict[str, set[str]] = {}
        return [a for a in self.versions() if withdrawn_among(self.contributors(a, memo), [cohort])]

    def governance_problems(
        self, artifact: Artifact, *, verify: bool = False, memo: dict[str, set[str]] | None = None
    ) -> list[str]:
        """Why ``artifact`` may not be promoted or served: it contains a cohort that withdrew consent (``verify``:
        the withdrawals are checked against the signed state log first). ``memo`` (a dict kept across calls, as
        :meth:`contributors` takes it) lets a caller asking about many versions of one lineage walk it once: a
        page of 50 versions on a 3,000-version chain walked it 50 times (10 s)."""
        bad = withdrawn_among(self.contributors(artifact, memo), self.withdrawn_cohorts(verify=verify))
        return [f"{artifact.ref} was trained on withdrawn cohort {c!r}" for c in bad]

    def last_unaffected(self, model: str, number: int, *, verify: bool = False) -> Artifact | None:
        """The newest model version on ``model@number``'s parent chain free of every withdrawn cohort."""
        withdrawn = self.withdrawn_cohorts(verify=verify)
        memo: dict[str, set[str]] = {}  # shared along the chain: each version's lineage is walked once
        for cur in [self.get(model, number), *self.lineage(self.get(model, number))]:
            if cur.kind == "model" and not withdrawn_among(self.contributors(cur, memo), withdrawn):
                return cur
        return None

    # -- integrity -------------------------------------------------------------------------------------
    def verify(
        self, *, signatures: bool = True, expect_head: str | eventlog.Head | None = None
    ) -> IntegrityReport:
        """Check every blob's hash, that every row points to an existing blob, and (optionally) signatures.

        Also replays the signed state log (:mod:`~deltaplane.registry.eventlog`): its hash chain, its signatures
        (with ``signatures``) and that ``tags``, ``tag_history`` and ``withdrawals`` equal what it replays to.
        ``expect_head`` (``INDEX:SHA256``, a ``log_head`` recorded from an earlier verify and kept elsewhere) must
        still be in the log: the one check that catches a log whose newest entries were removed.
        """
        if isinstance(expect_head, str):
            expect_head = eventlog.Head.parse(expect_head)  # a bad value is a ConfigError, before any work
        report = IntegrityReport()
        try:
            con = self._connect()
            check = con.execute("PRAGMA integrity_check").fetchone()[0]
            con.execute("SELECT * FROM artifacts LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            report.problems.append(f"registry.db is not a readable SQLite database: {exc}")
            return report
        if check != "ok":
            report.problems.append(f"sqlite integrity_check: {check}")
        referenced: set[str] = set()
        sizes: dict[str, int] = {}  # a version's blob is read no further than its recorded size
        unsigned_metadata: list[str] = []
        for row in con.execute("SELECT * FROM artifacts ORDER BY id").fetchall():
            report.rows_checked += 1
            try:
                a = _artifact(row)
            except IntegrityError as exc:  # an edited row: reported, and the other rows still checked
                report.problems.append(str(exc))
                continue
            if a.statement_version == 1:
                unsigned_metadata.append(a.ref)
            referenced.add(a.sha256)
            sizes[a.sha256] = a.size
            try:  # a version's companion files are its blobs too: kept by gc, checked here
                for name, (sha, size) in _companion_entries(a).items():
                    referenced.add(sha)
                    sizes[sha] = size
                    if len(self.get_blob(sha, size=size)) != size:
                        report.problems.append(f"{a.ref}: file {name} is shorter than its lineage says")
            except IntegrityError as exc:
                report.problems.append(str(exc) if a.ref in str(exc) else f"{a.ref}: {exc}")
            try:
                data = self.get_blob(a.sha256, size=a.size)
                if len(data) != a.size:
                    report.problems.append(f"{a.ref}: blob has {len(data)} bytes, row says {a.size}")
                if signatures:
                    self.verifier.verify_bytes(data, a.statement(), a.signature)
            except (IntegrityError, SignatureError) as exc:
                report.problems.append(f"{a.ref}: {exc}")
        if signatures and unsigned_metadata:
            refs = ", ".join(unsigned_metadata[:10]) + (", …" if len(unsigned_metadata) > 10 else "")
            report.notes.append(
                f"{len(unsigned_metadata)} artifacts were signed before metadata was signed ({refs}): their "
                "bytes, version and base/target are verified, their parent, codec, lineage and governance are "
                "not covered by the signature"
            )
        for sha, owner_model, owner_number in con.execute(
            "SELECT cards.sha256, artifacts.model, artifacts.number FROM cards "
            "LEFT JOIN artifacts ON artifacts.id = cards.artifact"
        ).fetchall():
            referenced.add(sha)
            if not self.blob_path(sha).exists():
                report.problems.append(f"card blob {sha} is missing")
                continue
            with contextlib.suppress(DeltaplaneError):  # a corrupt blob is reported by the blob walk below
                mismatch = _card_mismatch(
                    _stored_json(self.get_blob(sha), f"card blob {sha}", dict), owner_model, owner_number
                )
                if mismatch:
                    report.problems.append(mismatch)
        # the uploads of a device round still open (deltaplane.serve.rounds_store): a restarted service
        # replays them, so they are no orphans (a closed round's rows keep only the hashes, for replays)
        with contextlib.suppress(sqlite3.OperationalError):  # no such tables: never served device rounds
            for sha, size, state in con.execute(
                "SELECT u.sha256, u.size, r.state FROM round_uploads u "
                "JOIN rounds r ON r.model = u.model AND r.number = u.round"
            ):
                sizes.setdefault(sha, int(size))  # a closed round's upload, if still stored, is an orphan
                if state != "open":
                    continue
                referenced.add(sha)
                if not self.blob_path(sha).exists():
                    report.problems.append(f"blob {sha} of an open round's upload is missing")
        for table, col in (("tags", "number"), ("tag_history", "number")):
            for model, number in con.execute(f"SELECT model, {col} FROM {table} WHERE {col} IS NOT NULL"):
                if not con.execute(
                    "SELECT 1 FROM artifacts WHERE model=? AND number=?", (model, number)
                ).fetchone():
                    report.problems.append(f"{table} points to missing version {model}@{number}")
        with self._snapshot() as snap:
            log = eventlog.verify(snap, self.verifier if signatures else None, expect_head=expect_head)
        report.problems += log.problems
        report.notes += log.notes
        report.log_head = None if log.head is None else str(log.head)
        blobs = self.home / "blobs"
        # a blob of unknown size (an orphan, a model card) is read no further than the longest this registry
        # records, or 64 MiB: a file longer than both is none of its blobs
        largest = max(max(sizes.values(), default=0), _UNKNOWN_BLOB_FLOOR)
        for sub in sorted(p for p in blobs.iterdir() if p.is_dir() and p.name != "tmp"):
            for f in sorted(sub.iterdir()):
                sha = sub.name + f.name
                report.blobs_checked += 1
                try:  # AES-GCM tags first (encrypted), then the SHA-256
                    self._read_blob_file(f, sha, sizes.get(sha), largest=largest)
                except FileNotFoundError:  # deleted meanwhile (a discarded upload, gc)
                    continue
                except (IntegrityError, NotFound) as exc:
                    report.problems.append(f"{exc}" if "blob" in str(exc) else f"blob {sha}: {exc}")
                    continue
                if sha not in referenced:
                    report.orphans.append(sha)
        report.temp_files = sorted(p.name for p in (blobs / "tmp").glob("*.tmp"))
        return report

    def repair_from_log(
        self, expect_head: str | eventlog.Head | None = None, *, dry_run: bool = False
    ) -> RepairReport:
        """Rewrite ``tags``, ``tag_history`` and ``withdrawals`` to what the signed state log replays to.

        The log is the source of truth only when it verifies: its whole chain and every signature are checked
        against the trusted keys (a pin applies) and, given ``expect_head`` (``INDEX:SHA256`` recorded from an
        earlier verify), it must still contain that head; otherwise :class:`IntegrityError` and nothing changes.
        Only the rows that differ are rewritten, in one transaction that re-checks the tables against the log
        before it commits. Artifacts, blobs, rollback records and the log itself are not touched, and nothing is
        signed (no key needed). ``dry_run`` only reports the differences. Cards, evaluations and promotion
        verdicts that differ from the log are listed in ``unrepaired``, not rewritten: the log binds them by
        SHA-256 only, so it cannot say what an edited or deleted row held (and the registry never deletes from
        these append-only tables, so a row inserted behind its back is left for the operator to judge).

        The limit: a log whose newest entries were removed is still a valid chain, and repairing from it reverts
        the tables to its older state; only ``expect_head`` catches that.
        """
        if isinstance(expect_head, str):
            expect_head = eventlog.Head.parse(expect_head)  # a bad value is a ConfigError, before any work
        verifier = self.verifier  # before the write lock: loading the keys reads files
        with self._snapshot() if dry_run else self.transaction() as con:
            signed = self._verified_log(con, verifier, expect_head)
            tables = eventlog.read_tables(con)
            assert signed.head is not None  # a log without entries was refused above
            report = RepairReport(str(signed.head), eventlog.differences(signed, tables))
            report.unrepaired = eventlog.record_problems(con, signed)[0]
            gone = sorted(set(tables.withdrawals) - set(signed.withdrawals))
            report.notes += [
                f"cohort {c!r} is withdrawn in the table but not in the signed log, so the repair removes its "
                f"withdrawal: if it did withdraw consent, record it again (`deltaplane registry withdraw {c}`)"
                for c in gone
            ]
            if expect_head is None and report.differences:
                report.notes.append(
                    "no --expect-head given: a log whose newest entries were removed also verifies, and repairing "
                    "from it reverts the tables to its older state; pass the head recorded from an earlier verify"
                )
            if dry_run or not report.differences:
                return report
            eventlog.rewrite_tables(con, signed, tables)
            self._signed = eventlog.check(con, verifier, signed)  # raises, so rolls back, unless equal now
            report.applied = True
        return report

    @staticmethod
    def _verified_log(
        con: sqlite3.Connection, verifier: Verifier, expect_head: eventlog.Head | None
    ) -> eventlog.SignedState:
        """The whole log replayed, every signature checked, containing ``expect_head``; IntegrityError if not."""
        try:
            signed = eventlog.signed_state(con, verifier, exhaustive=True)  # every signature is verified
        except (IntegrityError, SignatureError) as exc:
            raise IntegrityError(
                f"the signed state log does not verify, so it cannot be the source of a repair: {exc}. Nothing "
                "was changed; restore registry.db from a backup"
            ) from None
        problem = None if expect_head is None else eventlog.head_problem(con, signed.head, expect_head)
        if problem is not None:
            raise IntegrityError(
                f"{problem}. Nothing was changed: repairing from this log would revert the tables to its state; "
                "restore registry.db from a backup"
            )
        return signed

    def discard_blob(self, sha256: str) -> bool:
        """Delete blob ``sha256`` unless a row names it (a version, a card, an upload of a device round): what a
        write refused after its blob was stored leaves behind. Returns whether it was deleted."""
        con = self._connect()
        for table in ("artifacts", "cards", "round_uploads"):
            try:
                if con.execute(f"SELECT 1 FROM {table} WHERE sha256=? LIMIT 1", (sha256,)).fetchone():
                    return False
            except sqlite3.OperationalError:  # no such table: this registry never served device rounds
                continue
        path = self.blob_path(sha256)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def gc(self, *, min_age_s: float = 3600.0) -> int:
        """Delete orphan blobs and temp files older than ``min_age_s`` (left by interrupted writes).

        Raises:
            ConfigError: ``min_age_s`` is negative or not a finite number (a negative age would also delete
                the temp files of writes still in progress in another process).
        """
        if (
            isinstance(min_age_s, bool)
            or not isinstance(min_age_s, int | float)
            or not 0 <= min_age_s < math.inf
        ):
            raise ConfigError(
                f"min_age_s must be a finite number of seconds >= 0 (younger files may belong to writes in "
                f"progress). Found {min_age_s!r}"
            )
        cutoff = time.time() - min_age_s
        report = self.verify(signatures=False)
        paths = [self.blob_path(s) for s in report.orphans]
        paths += [self.home / "blobs" / "tmp" / n for n in report.temp_files]
        removed = 0
        for p in paths:
            try:
                if p.stat().st_mtime <= cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def lineage(self, artifact: Artifact) -> Sequence[Artifact]:
        """The chain of ancestors (parent, grandparent, …) of a model version, newest first.

        A parent is always older than its child (it must exist when the child is registered, and a new version
        gets the next number), so each step goes to a smaller number and the walk ends. A row whose parent is
        not older (only an edited ``registry.db`` holds one: a loop would walk forever) is an
        :class:`IntegrityError`.
        """
        chain, cur = [], artifact
        while cur.parent is not None:
            if cur.parent >= cur.number:
                raise IntegrityError(
                    f"{cur.ref} names parent version {cur.parent}, which is not older than it: registry.db was "
                    "edited (`deltaplane registry verify` names the rows whose signatures fail); restore it from "
                    "a backup"
                )
            cur = self.get(cur.model, cur.parent)
            chain.append(cur)
        return chain

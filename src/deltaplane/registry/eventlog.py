"""The signed state log: an append-only, hash-chained record of every change to tags, tag history and withdrawals.

Artifact rows are signed one by one, but tags move and withdrawals accumulate, so no row can carry a signature
that says "this is the current state": whoever could write ``registry.db`` could move ``production`` back to an
old version, rewrite a tag's history or delete a consent withdrawal, and every artifact signature would still
verify. So every change to those tables (:meth:`Registry.set_tag`, :meth:`Registry.withdraw_cohort`) appends
an entry to ``state_log`` in the same transaction as the change itself:

* an entry is canonical JSON (:func:`~deltaplane.registry.signing.canonical_json`) holding its index ``seq``,
  ``prev`` — the SHA-256 of the entry before it (editing, removing or inserting an entry breaks every later
  link) — and the change with every column value it wrote;
* the registry's Ed25519 key signs ``{"kind": "state-log", "seq": n, "sha256": SHA-256(entry)}``, the same
  domain-separated statement as artifacts (:func:`~deltaplane.registry.signing.statement`).

Replaying the log from entry 1 gives the tables' exact content. :meth:`Registry.verify` checks the chain, every
signature against the trusted keys (a pin applies) and that the tables equal the replay; verified reads
(``tags(model, verify=True)``, promotion, rollback, the service's downloads) refuse a registry where they differ.
A verified read in a new process re-hashes, rather than re-verifies, the entries a trusted seal covers
(:mod:`~deltaplane.registry.seal`); :meth:`Registry.verify` and repair verify every signature.

Rows of the append-only :data:`RECORD_TABLES` (model cards, evaluations, promotion verdicts) are bound too: each
insert appends a ``record`` entry with the row's SHA-256 (:func:`record_change`). The rows a table held when
binding began (a registry from an older release) are bound as found, once: the checkpoint of a new log, or one
``legacy`` entry appended to a log started by an older release, lists every such row's id and SHA-256
(:func:`ensure_started`). From then on each row is accounted for: signed, legacy, or a finding
(:func:`record_status`) — a row inserted into an id gap is neither. :meth:`Registry.verify` reports every row
edited, deleted or inserted behind the registry's back (:func:`record_problems`); ``card()``, ``evaluations()``
and ``promotion_decisions()`` check the rows they return the same way (the verified replay is cached on the
handle, so a read costs one row digest once the log was replayed). Rows of a log not yet bound (opened since
only without the signing key) fall back to the older rule: a row without an entry below its table's first
signed id is unsigned, labelled so.

A card or evaluation row names its version by artifact row id, which no signature covers, so its ``record``
entry also carries ``of``: ``[model, number, weights SHA-256]`` of that version (:data:`VERSIONED_TABLES`);
reads and verify refuse a row whose id now names another version. The registry's :data:`SIGNED_SETTINGS`
(whether blobs are encrypted) are signed too. A log started before either gets one ``versions`` entry (the
versions its rows point at, as found) and one ``settings`` entry on its first open with the signing key
(:func:`_bind_versions`); a new log's checkpoint carries both.

What a chain cannot show: a log cut short (its newest entries removed — or all of them, with the marker the
first entry leaves in ``settings``) is still a valid chain of validly signed entries. The head (index and hash of
the newest entry) is in verify's output; an operator who keeps it elsewhere can check that a later log still
contains it (``deltaplane registry verify --expect-head INDEX:SHA256``). Detecting it without the operator needs a
second key, outside the registry, that regularly signs the current head with an expiry — TUF's timestamp role
(https://theupdateframework.github.io/specification/latest/#timestamp-role); deltaplane does not implement one.

Tables that differ from a log that verifies are rewritten from it by :meth:`Registry.repair_from_log`
(:func:`rewrite_tables`; CLI ``deltaplane registry repair``): a replay holds every column the tables have, so
the rows come back as they were signed; a log that does not verify is refused, as it cannot be the source.

Registries made before the log get a ``checkpoint`` entry of the state they hold on their first open with the
signing key: what happened before it is unsigned, and verify says so.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from deltaplane.errors import ConfigError, IntegrityError, SignatureError
from deltaplane.registry import seal as _seal
from deltaplane.registry.signing import Signer, Verifier, canonical_json

__all__ = [
    "PARTS",
    "Head",
    "LogReport",
    "SignedState",
    "append",
    "check",
    "ensure_started",
    "head_problem",
    "read_head",
    "rewrite_tables",
    "verify",
]

FORMAT = 1
GENESIS_PREV = "0" * 64  # what entry 1 names as its predecessor
MARKER = "state_log"  # a settings row written with entry 1: an emptied log is then a finding, not a new start
# a settings row written once the log binds the record tables' rows from before signing (checkpoint or "legacy"):
# only a shortcut (whether it is bound is read from the log itself), so deleting it cannot make rows bound twice
RECORDS_MARKER = "state_log_records"
PARTS = ("tags", "tag_history", "withdrawals")
# append-only tables whose rows the log binds one by one: each insert appends a "record" entry carrying the
# SHA-256 of the row's canonical JSON (see :func:`record_change`), which verify compares (:func:`record_problems`)
RECORD_TABLES = ("cards", "evaluations", "promotion_decisions")
# record tables whose rows point at a version by its artifact row id: an id is no identity (swapping two artifact
# rows' ids in registry.db moves their cards and evaluations with every row digest intact), so each such row is
# bound to the version it is of, ``[model, number, weights SHA-256]`` (a ``record`` entry's ``of``)
VERSIONED_TABLES = ("cards", "evaluations")
# a settings row written once the log binds the versions of the rows from before ``of`` and the registry's
# settings (a ``versions`` and a ``settings`` entry, or the checkpoint): a shortcut, as RECORDS_MARKER
VERSIONS_MARKER = "state_log_versions"
# the settings the log signs: what the registry is, not what a blob's first bytes look like
SIGNED_SETTINGS = ("encryption",)
_HISTORY_COLUMNS = ("model", "tag", "number", "previous", "action", "reason", "at")
_HEAD = re.compile(r"(?P<index>[0-9]{1,18}):(?P<sha>[0-9a-f]{64})")

_DDL = (
    """CREATE TABLE IF NOT EXISTS state_log (
        seq INTEGER PRIMARY KEY, prev TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL UNIQUE,
        entry TEXT NOT NULL, signature TEXT NOT NULL
    )""",
    # accidents, not attackers (a writer of the file can drop them): the signatures are what an attacker meets
    "CREATE TRIGGER IF NOT EXISTS state_log_append_only_u BEFORE UPDATE ON state_log "
    "BEGIN SELECT RAISE(ABORT, 'the state log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS state_log_append_only_d BEFORE DELETE ON state_log "
    "BEGIN SELECT RAISE(ABORT, 'the state log is append-only'); END",
    "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


@dataclass(frozen=True)
class Head:
    """The newest entry of the log: its index and SHA-256 (``INDEX:SHA256`` as text)."""

    index: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.index}:{self.sha256}"

    @classmethod
    def parse(cls, text: str) -> Head:
        """Parse ``INDEX:SHA256`` (what verify prints); :class:`ConfigError` otherwise."""
        m = _HEAD.fullmatch((text or "").strip().lower())
        if not m or int(m.group("index")) < 1:
            raise ConfigError(
                f"a state log head is INDEX:SHA256 (e.g. 12:{'ab' * 32}), as `deltaplane registry verify` "
                f"prints it. Found {text!r:.100}"
            )
        return cls(int(m.group("index")), m.group("sha"))


@dataclass
class SignedState:
    """The content of ``tags``, ``tag_history`` and ``withdrawals``: as the log replays to, or as the tables hold.

    ``tags`` maps (model, tag) to (number, updated_at); ``tag_history`` maps a row id to its columns
    (:data:`_HISTORY_COLUMNS`); ``withdrawals`` maps a cohort to (reason, at).
    """

    tags: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    tag_history: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    withdrawals: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    records: dict[tuple[str, int], str] = field(default_factory=dict)  # (table, row id) -> row SHA-256
    first_record: dict[str, int] = field(default_factory=dict)  # table -> lowest row id with a record entry
    # table -> row id -> SHA-256 of the rows found when binding began; None until the log binds them
    legacy: dict[str, dict[int, str]] | None = None
    legacy_seq: int | None = None  # the entry that bound them
    # (table, row id) -> [model, number, SHA-256] of the version the row is of (VERSIONED_TABLES)
    record_of: dict[tuple[str, int], tuple[Any, ...]] = field(default_factory=dict)
    versions_seq: int | None = None  # the entry that bound the versions of rows from before ``of``, as found
    settings: dict[str, str] | None = (
        None  # the signed settings (SIGNED_SETTINGS); None until the log has them
    )
    head: Head | None = None
    checkpoint_at: float | None = None  # set when the log starts from a non-empty checkpoint (a migration)
    # what a seal of this state would say (deltaplane.registry.seal): the running digest of the signature texts
    # (None unless every entry's signature was verified) and the keys that verified them (id -> SHA-256)
    signatures: str | None = _seal.GENESIS
    keys: dict[str, str] = field(default_factory=dict)
    sealed: int = 0  # the newest entry a stored seal covers, as far as this state knows

    def copy(self) -> SignedState:
        return replace(
            self,
            tags=dict(self.tags),
            tag_history=dict(self.tag_history),
            withdrawals=dict(self.withdrawals),
            records=dict(self.records),
            first_record=dict(self.first_record),
            record_of=dict(self.record_of),
            keys=dict(self.keys),
        )

    def due_seal(self) -> _seal.Seal | None:
        """The seal to store for this verified state, when :data:`~deltaplane.registry.seal.AFTER` entries or more
        were verified one by one since the last one (None otherwise, and for a replay without signatures)."""
        if self.signatures is None or self.head is None or self.head.index - self.sealed < _seal.AFTER:
            return None
        return _seal.Seal(self.head.index, self.head.sha256, self.signatures, dict(self.keys))

    def restricted(self, model: str | None, tag: str | None) -> SignedState:
        """Only the tags and history rows of ``model`` (and ``tag``), when given."""

        def keep(m: str, t: str) -> bool:
            return (model is None or m == model) and (tag is None or t == tag)

        return replace(
            self,
            tags={k: v for k, v in self.tags.items() if keep(*k)},
            tag_history={k: v for k, v in self.tag_history.items() if keep(v[0], v[1])},
        )


@dataclass
class LogReport:
    """What :func:`verify` found: failures, notes, and the head to record elsewhere."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head: Head | None = None


def _statement(seq: int, sha256: str) -> dict[str, Any]:
    """What an entry's signature covers (the entry names its predecessor, so the signature covers the chain)."""
    return {"kind": "state-log", "seq": seq, "sha256": sha256}


# -- reading the tables ----------------------------------------------------------------------------------
def read_tables(
    con: sqlite3.Connection, *, model: str | None = None, tag: str | None = None, parts: Iterable[str] = PARTS
) -> SignedState:
    """The tables' current content (of ``model``/``tag`` when given; withdrawals are registry-wide)."""
    where, args = "", []
    if model is not None:
        where, args = " WHERE model=?", [model]
        if tag is not None:
            where, args = where + " AND tag=?", [model, tag]
    parts, out = set(parts), SignedState()
    if "tags" in parts:
        rows = con.execute(f"SELECT model, tag, number, updated_at FROM tags{where}", args)
        out.tags = {(r[0], r[1]): (r[2], r[3]) for r in rows}
    if "tag_history" in parts:
        cols = ", ".join(_HISTORY_COLUMNS)
        rows = con.execute(f"SELECT id, {cols} FROM tag_history{where}", args)
        out.tag_history = {r[0]: tuple(r[1:]) for r in rows}
    if "withdrawals" in parts:
        out.withdrawals = {
            r[0]: (r[1], r[2]) for r in con.execute("SELECT cohort, reason, at FROM withdrawals")
        }
    return out


def read_head(con: sqlite3.Connection) -> Head | None:
    """The newest entry, or None when the log is empty or does not exist (a registry from before it)."""
    try:
        row = con.execute("SELECT seq, sha256 FROM state_log ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return None
    return None if row is None else Head(int(row[0]), str(row[1]))


def marked(con: sqlite3.Connection, name: str = MARKER) -> bool:
    """Whether the registry recorded that its log was started (so an empty log means a deleted one)."""
    try:
        return con.execute("SELECT 1 FROM settings WHERE name=?", (name,)).fetchone() is not None
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return False


def _deleted(what: str = "") -> IntegrityError:
    return IntegrityError(
        "the signed state log is empty, but this registry recorded that it was started: its entries were "
        f"deleted{what}; restore registry.db from a backup"
    )


# -- writing ---------------------------------------------------------------------------------------------
def _write(con: sqlite3.Connection, signer: Signer, head: Head | None, change: Mapping[str, Any]) -> Head:
    seq = 1 if head is None else head.index + 1
    prev = GENESIS_PREV if head is None else head.sha256
    text = canonical_json({**change, "log": FORMAT, "seq": seq, "prev": prev}).decode()
    digest = hashlib.sha256(text.encode()).hexdigest()
    signature = signer.sign(_statement(seq, digest)).to_text()
    con.execute(
        "INSERT INTO state_log (seq, prev, sha256, entry, signature) VALUES (?,?,?,?,?)",
        (seq, prev, digest, text, signature),
    )
    return Head(seq, digest)


def ensure_started(con: sqlite3.Connection, signer: Signer) -> Head:
    """The log's head, after starting the log with a checkpoint of the current tables if it has no entries.

    Call inside a write transaction. The checkpoint is how a registry made before the log is migrated (for a
    new registry it is empty); it also binds the rows of :data:`RECORD_TABLES` found (see :func:`_bind_legacy`
    for a log started by an older release, whose checkpoint did not). :class:`IntegrityError` when the log was
    started once and is now empty: a new checkpoint would vouch for whatever state its deleter left.
    """
    for ddl in _DDL:
        con.execute(ddl)
    head = read_head(con)
    if head is not None:
        if not marked(con, RECORDS_MARKER):
            head = _bind_legacy(con, signer, head)
        return head if marked(con, VERSIONS_MARKER) else _bind_versions(con, signer, head)
    if marked(con):
        raise _deleted()
    now = read_tables(con)
    checkpoint = {
        "op": "checkpoint",
        "at": time.time(),
        "tags": [[m, t, *v] for (m, t), v in sorted(now.tags.items())],
        "tag_history": [[i, *v] for i, v in sorted(now.tag_history.items())],
        "withdrawals": [[c, *v] for c, v in sorted(now.withdrawals.items())],
        "records": _unbound_rows(con, SignedState()),
        "versions": _unbound_versions(con, SignedState()),
        "settings": current_settings(con),
    }
    head = _write(con, signer, None, checkpoint)
    for name in (MARKER, RECORDS_MARKER, VERSIONS_MARKER):
        con.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, str(FORMAT)))
    return head


def current_settings(con: sqlite3.Connection) -> dict[str, str]:
    """The :data:`SIGNED_SETTINGS` as the database's ``settings`` table holds them (``encryption`` ``"none"``
    when it records none: a registry from before encryption, whose blobs are plaintext)."""
    out = {}
    for name in SIGNED_SETTINGS:
        row = con.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        out[name] = "none" if row is None else str(row[0])
    return out


def row_version(con: sqlite3.Connection, artifact_id: object) -> list[Any] | None:
    """``[model, number, weights SHA-256]`` of the artifact row ``artifact_id`` (None when there is none)."""
    row = con.execute("SELECT model, number, sha256 FROM artifacts WHERE id=?", (artifact_id,)).fetchone()
    return None if row is None else [row[0], row[1], row[2]]


def _unbound_versions(con: sqlite3.Connection, state: SignedState) -> dict[str, list[list[Any]]]:
    """``[id, model, number, SHA-256]`` of every row of :data:`VERSIONED_TABLES` whose version ``state`` does not
    bind: the rows recorded before ``record`` entries carried ``of`` (or before rows were signed at all)."""
    out: dict[str, list[list[Any]]] = {}
    for table in VERSIONED_TABLES:
        out[table] = [
            [row["id"], *(row_version(con, row["artifact"]) or [None, None, None])]
            for row in _row(con, table)
            if (table, row["id"]) not in state.record_of
        ]
    return out


def _bind_versions(con: sqlite3.Connection, signer: Signer, head: Head) -> Head:
    """The upgrade of a log written before rows were bound to their versions and the settings were signed:
    append one ``versions`` entry binding, as found, the version each such row of :data:`VERSIONED_TABLES` is of,
    and one ``settings`` entry with the registry's :data:`SIGNED_SETTINGS`; returns the new head.

    As :func:`_bind_legacy`, this vouches for what the rows point at when it runs (a row moved before is not
    caught) and leaves a log that does not replay for verify to report.
    """
    try:
        state = replay(con, None)
    except IntegrityError:
        return head
    if state.versions_seq is None:
        change = {"op": "versions", "at": time.time(), "versions": _unbound_versions(con, state)}
        head = _write(con, signer, head, change)
    if state.settings is None:
        head = _write(
            con, signer, head, {"op": "settings", "at": time.time(), "settings": current_settings(con)}
        )
    con.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (VERSIONS_MARKER, str(FORMAT)))
    return head


def _unbound_rows(con: sqlite3.Connection, state: SignedState) -> dict[str, list[list[Any]]]:
    """``[id, SHA-256]`` of every row of :data:`RECORD_TABLES` that ``state`` has no ``record`` entry for."""
    return {
        table: [
            [row["id"], row_digest(table, row)]
            for row in _row(con, table)
            if (table, row["id"]) not in state.records
        ]
        for table in RECORD_TABLES
    }


def _bind_legacy(con: sqlite3.Connection, signer: Signer, head: Head) -> Head:
    """Append one ``legacy`` entry binding, as found, the rows of :data:`RECORD_TABLES` that a log started by an
    older release has no entries for; returns the new head (``head`` when the log binds them already).

    Before it, a row inserted into an id gap below a table's first signed row could not be told from one written
    before rows were signed. The log is read unverified (only which rows it binds matters here); a log that does
    not even replay is left as it is, for verify to report.
    """
    try:
        state = replay(con, None)
    except IntegrityError:
        return head
    if state.legacy is None:
        head = _write(
            con, signer, head, {"op": "legacy", "at": time.time(), "records": _unbound_rows(con, state)}
        )
    con.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (RECORDS_MARKER, str(FORMAT)))
    return head


def append(con: sqlite3.Connection, signer: Signer, change: Mapping[str, Any]) -> Head:
    """Sign and append ``change`` (see :func:`tag_change`, :func:`withdraw_change`) after the current head.

    Call inside the write transaction that makes the change: it commits, or rolls back, with it. The
    transaction's write lock (``BEGIN IMMEDIATE``) is what keeps the chain linear across processes; the
    table's UNIQUE ``prev`` refuses a fork even so.
    """
    return _write(con, signer, ensure_started(con, signer), change)


def tag_change(
    model: str, tag: str, number: int, previous: int | None, action: str, reason: str, at: float, row: int
) -> dict[str, Any]:
    """A tag move: the ``tags`` row it sets and the ``tag_history`` row (id ``row``) it adds."""
    return {
        "op": "tag",
        "model": model,
        "tag": tag,
        "number": number,
        "previous": previous,
        "action": action,
        "reason": reason,
        "at": at,
        "history_id": row,
    }


def withdraw_change(cohort: str, reason: str, at: float) -> dict[str, Any]:
    """A consent withdrawal: the ``withdrawals`` row it sets."""
    return {"op": "withdraw", "cohort": cohort, "reason": reason, "at": at}


def _row(
    con: sqlite3.Connection, table: str, where: str = "", args: tuple[Any, ...] = ()
) -> list[dict[str, Any]]:
    """The rows of ``table`` (one of :data:`RECORD_TABLES`) as column -> value dicts, by id; [] when no table."""
    try:
        cur = con.execute(f"SELECT * FROM {table}{where} ORDER BY id", args)
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []  # promotion_decisions is created on first use
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, values, strict=True)) for values in cur]


def row_digest(table: str, row: Mapping[str, Any]) -> str:
    """The SHA-256 of a row's canonical JSON (every column, its id and the table's name included), so moving a
    row to another artifact, editing a score or swapping two rows' contents all change it."""
    return hashlib.sha256(canonical_json({"table": table, "row": dict(row)})).hexdigest()


def record_change(con: sqlite3.Connection, table: str, row_id: int) -> dict[str, Any]:
    """The entry binding row ``row_id`` of ``table`` (just inserted, in the same transaction) to the log; for
    :data:`VERSIONED_TABLES`, also to the version it is of (``of``: model, number, weights SHA-256)."""
    if table not in RECORD_TABLES:
        raise ValueError(f"{table!r} is not a table the state log records rows of")
    (row,) = _row(con, table, " WHERE id=?", (row_id,))
    change = {"op": "record", "table": table, "row": row_id, "sha256": row_digest(table, row)}
    if table in VERSIONED_TABLES:
        change["of"] = row_version(con, row["artifact"])
    return change


def _version_text(of: object) -> str:
    if not isinstance(of, list | tuple) or len(of) != 3 or of[0] is None:
        return "no version"
    return f"{of[0]}@{of[1]} (weights {str(of[2])[:12]}…)"


def record_status(
    signed: SignedState | None, table: str, row: Mapping[str, Any], of: list[Any] | None = None
) -> str:
    """How row ``row`` of ``table`` is vouched for: ``"signed"`` (its own ``record`` entry), ``"legacy"`` (written
    before rows were signed, bound as found) or ``"unsigned"`` (written before, in a log that does not bind such
    rows yet, or a registry without a log: ``signed`` None). Raises :class:`IntegrityError` naming the row when it
    differs from its entry or when the log accounts for no such row (inserted behind the registry's back).

    ``of``: for :data:`VERSIONED_TABLES`, the version (``[model, number, weights SHA-256]``) the row's artifact id
    names now; it must be the one the log binds the row to (a row whose artifact ids were swapped in registry.db
    is an :class:`IntegrityError`). A row the log binds to no version yet (a log not upgraded since, see
    :func:`_bind_versions`) is checked as before; verify notes it.
    """
    kind = _record_kind(signed, table, row)
    if signed is None or table not in VERSIONED_TABLES or kind == "unsigned":
        return kind
    want = signed.record_of.get((table, row["id"]))
    if want is None and signed.versions_seq is not None:
        raise IntegrityError(
            f"{table} row {row['id']} is bound to no version in the signed state log: written behind the "
            "registry's back"
        )
    if want is not None and list(want) != list(of or []):
        raise IntegrityError(
            f"{table} row {row['id']} was recorded for {_version_text(list(want))}, but registry.db now links it "
            f"to {_version_text(of)}: artifact rows or the row's artifact id were changed behind the registry's back"
        )
    return kind


def _record_kind(signed: SignedState | None, table: str, row: Mapping[str, Any]) -> str:
    """:func:`record_status` without the version check."""
    rid = row["id"]
    key = (table, rid)
    want = None if signed is None else signed.records.get(key)
    kind = "signed"
    if signed is not None and want is None and signed.legacy is not None:
        want, kind = signed.legacy.get(table, {}).get(rid), "legacy"
        if want is None:
            raise IntegrityError(
                f"{table} row {rid} is not in the signed state log: written behind the registry's back"
            )
    if want is None:
        first = None if signed is None else signed.first_record.get(table)
        if first is not None and isinstance(rid, int) and rid > first:
            raise IntegrityError(
                f"{table} row {rid} is not in the signed state log: written behind the registry's back"
            )
        return "unsigned"
    if row_digest(table, row) != want:
        raise IntegrityError(
            f"{table} row {rid} differs from the signed state log: edited behind the registry's back"
        )
    return kind


def record_problems(con: sqlite3.Connection, signed: SignedState) -> tuple[list[str], list[str]]:
    """Problems and notes from comparing the rows of :data:`RECORD_TABLES` with the log (:func:`record_status`
    for each row; an entry, or a legacy row, whose row is gone is a problem too)."""
    problems: list[str] = []
    notes: list[str] = []
    for table in RECORD_TABLES:
        bound = {r for t, r in signed.records if t == table} | set((signed.legacy or {}).get(table, {}))
        seen: set[int] = set()
        found: dict[str, list[int]] = {"legacy": [], "unsigned": []}
        unversioned: list[int] = []
        for row in _row(con, table):
            seen.add(row["id"])
            of = row_version(con, row["artifact"]) if table in VERSIONED_TABLES else None
            try:
                status = record_status(signed, table, row, of)
            except IntegrityError as exc:
                problems.append(str(exc))
                continue
            found.get(status, []).append(row["id"])
            if (
                table in VERSIONED_TABLES
                and status != "unsigned"
                and (table, row["id"]) not in signed.record_of
            ):
                unversioned.append(row["id"])
        if unversioned:
            notes.append(
                f"{len(unversioned)} {table} rows are not bound to the version they are of (recorded before the "
                "state log bound them): a swap of artifact ids would move them unnoticed; open the registry once "
                "with its signing key to bind them as found"
            )
        problems += [
            f"{table} row {rid} is missing; the signed state log records it (deleted)"
            for rid in sorted(bound - seen)
        ]
        for status, ids in found.items():
            if not ids:
                continue
            shown = ", ".join(map(str, ids[:10])) + (", …" if len(ids) > 10 else "")
            notes.append(
                f"{len(ids)} {table} rows are unsigned (written before {table} rows were signed in the state log; "
                + (
                    f"ids {shown}): bound as found by state log entry {signed.legacy_seq}, so edited, deleted or "
                    "inserted rows are caught, but not what they held before"
                    if status == "legacy"
                    else f"ids {shown}): not verified; open the registry once with its signing key to bind them"
                )
            )
    return problems, notes


# -- replaying -------------------------------------------------------------------------------------------
def _apply(state: SignedState, entry: Mapping[str, Any], seq: int) -> None:
    op = entry["op"]
    if op == "checkpoint":
        if seq != 1:
            raise IntegrityError(f"state log entry {seq} is a checkpoint; only entry 1 may be one")
        state.tags = {(m, t): (n, u) for m, t, n, u in entry["tags"]}
        state.tag_history = {int(r[0]): tuple(r[1:]) for r in entry["tag_history"]}
        state.withdrawals = {c: (r, a) for c, r, a in entry["withdrawals"]}
        if state.tags or state.tag_history or state.withdrawals:
            state.checkpoint_at = float(entry["at"])
        if "records" in entry:  # absent from a checkpoint written by an older release
            _bind(state, entry["records"], seq)
        if "versions" in entry:  # absent from a checkpoint written by an older release, as "settings"
            _bind_of(state, entry["versions"], seq)
        if "settings" in entry:
            state.settings = {str(k): str(v) for k, v in entry["settings"].items()}
    elif seq == 1:
        raise IntegrityError(f"state log entry 1 is a {op!r} change; the log must start with a checkpoint")
    elif op == "tag":
        row = int(entry["history_id"])
        if row in state.tag_history:
            raise IntegrityError(f"state log entry {seq} adds tag_history row {row} a second time")
        state.tags[(entry["model"], entry["tag"])] = (entry["number"], entry["at"])
        state.tag_history[row] = tuple(entry[c] for c in _HISTORY_COLUMNS)
    elif op == "withdraw":
        state.withdrawals[entry["cohort"]] = (entry["reason"], entry["at"])
    elif op == "record":
        key = (entry["table"], int(entry["row"]))
        if (
            key[0] not in RECORD_TABLES
            or key in state.records
            or key[1] in (state.legacy or {}).get(key[0], {})
        ):
            raise IntegrityError(f"state log entry {seq} records {key[0]} row {key[1]}, which it cannot")
        state.records[key] = str(entry["sha256"])
        state.first_record[key[0]] = min(key[1], state.first_record.get(key[0], key[1]))
        if "of" in entry:  # absent from the entries of an older release (bound later by a ``versions`` entry)
            state.record_of[key] = tuple(entry["of"] or ())
    elif op == "versions":
        if state.versions_seq is not None:
            raise IntegrityError(f"state log entry {seq} binds rows' versions a second time")
        _bind_of(state, entry["versions"], seq)
    elif op == "settings":
        if state.settings is not None:
            raise IntegrityError(f"state log entry {seq} signs the registry's settings a second time")
        state.settings = {str(k): str(v) for k, v in entry["settings"].items()}
    elif op == "legacy":
        if state.legacy is not None:
            raise IntegrityError(f"state log entry {seq} binds rows from before signing a second time")
        _bind(state, entry["records"], seq)
    else:
        raise IntegrityError(
            f"state log entry {seq} has unknown operation {op!r} (written by a newer release?)"
        )


def _bind(state: SignedState, records: Mapping[str, Any], seq: int) -> None:
    """Take the rows a checkpoint or ``legacy`` entry binds as found (``{table: [[id, SHA-256], ...]}``)."""
    legacy: dict[str, dict[int, str]] = {}
    for table, rows in records.items():
        if table not in RECORD_TABLES:
            raise IntegrityError(f"state log entry {seq} binds rows of {table!r}, which it cannot")
        legacy[table] = {int(rid): str(sha) for rid, sha in rows}
        if set(legacy[table]) & {r for t, r in state.records if t == table}:
            raise IntegrityError(f"state log entry {seq} binds {table} rows that have record entries")
    state.legacy, state.legacy_seq = legacy, seq


def _bind_of(state: SignedState, versions: Mapping[str, Any], seq: int) -> None:
    """Take the versions a checkpoint or ``versions`` entry binds rows to (``{table: [[id, model, number,
    SHA-256], ...]}``)."""
    for table, rows in versions.items():
        if table not in VERSIONED_TABLES:
            raise IntegrityError(f"state log entry {seq} binds versions of {table!r} rows, which it cannot")
        for rid, *of in rows:
            if (table, int(rid)) in state.record_of:
                raise IntegrityError(f"state log entry {seq} binds {table} row {rid}'s version a second time")
            state.record_of[(table, int(rid))] = tuple(of)
    state.versions_seq = seq


class _Unsealed(Exception):
    """The log differs from its seal: the replay starts again checking every signature."""


def replay(
    con: sqlite3.Connection,
    verifier: Verifier | None,
    base: SignedState | None = None,
    *,
    seal: _seal.Seal | None = None,
) -> SignedState:
    """Replay the log (the entries after ``base.head`` onto ``base``, when given), checking as it goes.

    Every entry must be the next index, hash to its recorded SHA-256, name the previous entry's hash and (with a
    ``verifier``) carry a trusted key's signature. Raises :class:`IntegrityError` (broken chain, altered or
    malformed entry) or :class:`SignatureError` (bad or untrusted signature), naming the entry.

    With a ``seal`` (verified by :func:`deltaplane.registry.seal.read`), the signatures of the entries it covers
    are re-hashed instead of verified; on any difference or error the replay is done again checking every
    signature, so what it refuses, and the message, are those of the exhaustive check.
    """
    if seal is not None and verifier is not None:
        try:
            return _replay(con, verifier, base, seal)
        except (_Unsealed, IntegrityError, SignatureError):
            pass
    return _replay(con, verifier, base, None)


def _replay(
    con: sqlite3.Connection, verifier: Verifier | None, base: SignedState | None, seal: _seal.Seal | None
) -> SignedState:
    state = base.copy() if base is not None else SignedState()
    head = state.head
    rows = con.execute(
        "SELECT seq, prev, sha256, entry, signature FROM state_log WHERE seq > ? ORDER BY seq",
        (head.index if head else 0,),
    )
    for seq, prev, digest, text, signature in rows:
        want_seq, want_prev = (1, GENESIS_PREV) if head is None else (head.index + 1, head.sha256)
        if seq != want_seq:
            raise IntegrityError(
                f"state log entry {want_seq} is missing (the next one is {seq}): entries were removed"
            )
        actual = hashlib.sha256(str(text).encode()).hexdigest()
        if actual != digest:
            raise IntegrityError(
                f"state log entry {seq} was altered: it hashes to {actual[:16]}…, its row says {str(digest)[:16]}…"
            )
        _check_signature(state, verifier, seal, seq, digest, signature)
        try:
            entry = json.loads(text)
            if entry.get("seq") != seq or entry.get("prev") != want_prev or prev != want_prev:
                raise IntegrityError(
                    f"state log entry {seq} does not follow entry {seq - 1}: the hash chain is broken (an entry "
                    "was edited, removed or inserted)"
                )
            _apply(state, entry, seq)
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            # RecursionError: JSON nested past what json reads (only reachable unsigned: gc, verify(signatures=False))
            raise IntegrityError(f"state log entry {seq} is malformed: {exc!r:.200}") from None
        head = Head(seq, digest)
    if seal is not None and (head is None or head.index < seal.index):
        raise _Unsealed  # the log ends before what the seal covers
    state.head = head
    return state


def _check_signature(
    state: SignedState,
    verifier: Verifier | None,
    seal: _seal.Seal | None,
    seq: int,
    digest: str,
    signature: object,
) -> None:
    """Check entry ``seq``'s signature (re-hash it, when ``seal`` covers it) and fold it into ``state``'s digest."""
    if verifier is None:
        state.signatures = None  # nothing verified: this state can never be sealed
        return
    kid = _seal.key_id(signature)
    if seal is not None and seq <= seal.index:
        if kid not in seal.keys:
            raise _Unsealed
        state.keys[kid] = seal.keys[kid]
    else:
        try:
            verifier.verify(_statement(seq, digest), signature)
        except SignatureError as exc:
            raise SignatureError(f"state log entry {seq}: {exc}") from None
        assert kid is not None  # a signature that verified is key_id:base64 text
        state.keys[kid] = verifier.fingerprint(kid) or ""
    if state.signatures is not None:
        state.signatures = _seal.fold(state.signatures, str(signature))
    if seal is not None and seq == seal.index:
        if (digest, state.signatures) != (seal.sha256, seal.signatures):
            raise _Unsealed
        state.sealed = seal.index


def _hash_at(con: sqlite3.Connection, index: int) -> str | None:
    row = con.execute("SELECT sha256 FROM state_log WHERE seq=?", (index,)).fetchone()
    return None if row is None else str(row[0])


def signed_state(
    con: sqlite3.Connection,
    verifier: Verifier,
    cached: SignedState | None = None,
    *,
    exhaustive: bool = False,
) -> SignedState:
    """The verified replay of the log; ``cached`` (an earlier result) is reused while the log only grew after it.

    Only the new entries are then checked: edits to entries before ``cached.head`` that leave it in place do not
    change what this returns (the tables are compared with the state verified earlier); :func:`verify` checks
    the whole chain. Without ``cached``, the signatures a trusted seal covers are re-hashed rather than verified
    (:mod:`~deltaplane.registry.seal`; ``exhaustive`` verifies every one), and a log that no longer holds the
    sealed entry is refused (:class:`IntegrityError`).
    """
    head = read_head(con)
    if head is None:
        if marked(con):
            raise _deleted()
        raise IntegrityError(
            "this registry has no signed state log yet, so its tags and withdrawals cannot be verified: open it "
            "once with its signing key (any `deltaplane registry` command on the home that holds the key) to "
            "start it"
        )
    if cached is not None and cached.head == head:
        return cached
    if (
        cached is not None
        and cached.head is not None
        and cached.head.index < head.index
        and _hash_at(con, cached.head.index) == cached.head.sha256
    ):
        return replay(con, verifier, cached)
    sealed = _seal.read(con, verifier)
    state = replay(con, verifier, seal=None if exhaustive else sealed)
    problem = _seal_problem(con, sealed, state.head)
    if problem is not None:
        raise IntegrityError(problem)
    return state


def _seal_problem(con: sqlite3.Connection, sealed: _seal.Seal | None, head: Head | None) -> str | None:
    """Why a log whose newest entry is ``head`` cannot be the one ``sealed`` was made of (None when it can)."""
    if sealed is None:
        return None
    problem = head_problem(con, head, Head(sealed.index, sealed.sha256))
    if problem is None:
        return None
    return (
        f"{problem}; the head was recorded by the state log's seal, which a trusted key signed "
        "(`deltaplane registry verify --expect-head` with a head kept elsewhere tells which state is right)"
    )


def check(
    con: sqlite3.Connection,
    verifier: Verifier,
    cached: SignedState | None = None,
    *,
    model: str | None = None,
    tag: str | None = None,
    parts: Iterable[str] = PARTS,
) -> SignedState:
    """Verify the log and that the tables (``parts``, of ``model``/``tag`` when given) equal its replay.

    Run inside one transaction, so the log and the tables are read from the same snapshot. Returns the verified
    state (pass it back as ``cached``); raises :class:`IntegrityError` naming what differs.
    """
    parts = tuple(parts)
    signed = signed_state(con, verifier, cached)
    diffs = differences(
        signed.restricted(model, tag), read_tables(con, model=model, tag=tag, parts=parts), parts
    )
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise IntegrityError(
            f"the registry's {', '.join(parts)} differ from its signed state log, so they were changed outside "
            f"deltaplane: {'; '.join(diffs[:3])}{more}. `deltaplane registry verify` lists every difference; "
            "`deltaplane registry repair` rewrites them from the log once it verifies"
        )
    return signed


# -- comparing -------------------------------------------------------------------------------------------
def _differing(signed: dict[Any, Any], tables: dict[Any, Any]) -> Iterator[tuple[Any, Any, Any]]:
    """``(key, signed value, table value)`` for every key whose values differ (None where one side lacks it)."""
    for key in sorted(set(signed) | set(tables), key=str):
        s, t = signed.get(key), tables.get(key)
        if s != t:
            yield key, s, t


def differences(signed: SignedState, tables: SignedState, parts: Iterable[str] = PARTS) -> list[str]:
    """How ``tables`` differ from the ``signed`` state, one line per row (empty when they are equal)."""
    parts, out = set(parts), []
    if "tags" in parts:
        for key, s, t in _differing(signed.tags, tables.tags):
            name = f"{key[0]}:{key[1]}"
            if t is None:
                out.append(f"tags: {name} is missing; the signed log has it at version {s[0]}")
            elif s is None:
                out.append(f"tags: {name} -> {t[0]} is not in the signed log")
            elif s[0] != t[0]:
                out.append(f"tags: {name} points to version {t[0]}, the signed log says {s[0]}")
            else:
                out.append(f"tags: {name} was updated at {t[1]!r}, the signed log says {s[1]!r}")
    if "tag_history" in parts:
        for row, s, t in _differing(signed.tag_history, tables.tag_history):
            if t is None:
                out.append(f"tag_history: row {row} ({s[0]}:{s[1]} -> {s[2]}) is missing")
            elif s is None:
                out.append(f"tag_history: row {row} ({t[0]}:{t[1]} -> {t[2]}) is not in the signed log")
            else:
                cols = ", ".join(
                    f"{c} {b!r} (signed: {a!r})"
                    for c, a, b in zip(_HISTORY_COLUMNS, s, t, strict=True)
                    if a != b
                )
                out.append(f"tag_history: row {row} ({s[0]}:{s[1]}) differs from the signed log: {cols}")
    if "withdrawals" in parts:
        for cohort, s, t in _differing(signed.withdrawals, tables.withdrawals):
            if t is None:
                out.append(
                    f"withdrawals: cohort {cohort!r} is missing; the signed log records its withdrawal"
                )
            elif s is None:
                out.append(f"withdrawals: cohort {cohort!r} is not in the signed log")
            else:
                out.append(
                    f"withdrawals: cohort {cohort!r} is ({t[0]!r}, at {t[1]!r}), the signed log says {s!r}"
                )
    return out


def verify(
    con: sqlite3.Connection, verifier: Verifier | None, *, expect_head: Head | None = None
) -> LogReport:
    """Check the whole log (signatures too, given a ``verifier``) and that the tables equal its replay.

    ``expect_head`` (recorded by the operator from an earlier verify) must still be in the log with the same hash:
    this is what catches a log cut short, which the chain alone cannot. Run inside one transaction.
    """
    report = LogReport(head=read_head(con))
    if report.head is None:
        if marked(con):
            report.problems.append(str(_deleted(": tags, tag history and withdrawals cannot be verified")))
        else:
            report.notes.append(
                "this registry has no signed state log yet (it is started on the first open with the signing "
                "key): its tags, tag history and withdrawals are not verified"
            )
    else:
        try:
            signed = replay(con, verifier)
        except (IntegrityError, SignatureError) as exc:
            report.problems.append(
                f"{exc} (so tags, tag history and withdrawals could not be checked against it)"
            )
        else:
            report.problems += differences(signed, read_tables(con))
            if verifier is not None:
                problem = _seal_problem(con, _seal.read(con, verifier), signed.head)
                report.problems += [] if problem is None else [problem]
            problems, notes = record_problems(con, signed)
            report.problems += problems
            report.notes += notes
            report.problems += settings_problems(con, signed)
            if signed.checkpoint_at is not None:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(signed.checkpoint_at))
                report.notes.append(
                    f"tags, tag history and withdrawals are signed from state log entry 1 on, a checkpoint of the "
                    f"state this registry held when the log was started ({when}): their history before it is "
                    "unsigned; the checkpoint vouches for that state as it was found"
                )
    if expect_head is not None:
        problem = head_problem(con, report.head, expect_head)
        if problem is not None:
            report.problems.append(problem)
    return report


def settings_problems(con: sqlite3.Connection, signed: SignedState) -> list[str]:
    """Where the registry's recorded settings differ from the signed ones (none for a log that signs none yet)."""
    if signed.settings is None:
        return []
    found = current_settings(con)
    return [
        f"registry.db records {name} {found.get(name)!r}, but the signed state log says {value!r}: the setting was "
        "changed behind the registry's back; restore registry.db and registry.json from a backup"
        for name, value in sorted(signed.settings.items())
        if found.get(name) != value
    ]


def head_problem(con: sqlite3.Connection, head: Head | None, expect_head: Head) -> str | None:
    """Why the log whose newest entry is ``head`` does not contain ``expect_head`` (None when it does)."""
    have = _hash_at(con, expect_head.index) if head is not None else None
    if have is None:
        ends = f"ends at entry {head.index}" if head else "has no entries"
        return (
            f"the state log {ends}, but the recorded head {expect_head} is entry {expect_head.index}: "
            "entries were removed since it was recorded (or the log was replaced)"
        )
    if have != expect_head.sha256:
        return (
            f"state log entry {expect_head.index} hashes to {have}, not to the recorded {expect_head.sha256}: "
            "the log was rewritten since the head was recorded"
        )
    return None


# -- repairing -------------------------------------------------------------------------------------------
def rewrite_tables(con: sqlite3.Connection, signed: SignedState, tables: SignedState) -> int:
    """Make ``tags``, ``tag_history`` and ``withdrawals`` hold exactly ``signed`` (a verified replay); returns the
    number of rows written or deleted.

    ``tables`` is their current content (:func:`read_tables`, same transaction): only rows that differ are
    touched. Every column comes from the log (a replay holds each column its entry wrote), so nothing is made up.
    Call inside the write transaction that also re-checks the result.
    """
    writes = (
        (
            signed.tags,
            tables.tags,
            "DELETE FROM tags WHERE model=? AND tag=?",
            "INSERT OR REPLACE INTO tags (model, tag, number, updated_at) VALUES (?,?,?,?)",
        ),
        (
            signed.tag_history,
            tables.tag_history,
            "DELETE FROM tag_history WHERE id=?",
            f"INSERT OR REPLACE INTO tag_history (id, {', '.join(_HISTORY_COLUMNS)}) VALUES (?,?,?,?,?,?,?,?)",
        ),
        (
            signed.withdrawals,
            tables.withdrawals,
            "DELETE FROM withdrawals WHERE cohort=?",
            "INSERT OR REPLACE INTO withdrawals (cohort, reason, at) VALUES (?,?,?)",
        ),
    )
    count = 0
    for want, have, delete, upsert in writes:
        for key, s, _ in _differing(want, have):
            keys = key if isinstance(key, tuple) else (key,)
            if s is None:
                con.execute(delete, keys)
            else:
                con.execute(upsert, (*keys, *s))
            count += 1
    return count

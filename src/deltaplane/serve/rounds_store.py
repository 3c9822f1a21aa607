"""Durable training rounds: rounds and accepted uploads live in the registry database, closed in one transaction.

Why: an in-memory round dies with the process (numbers restart at 1, accepted uploads are lost) and a round
that is deleted before its version is published disappears when publishing fails. Here

* ``open`` allocates the next round number for the model from the database (never reused) and a random
  ``nonce``; uploads must name both (path + ``X-Deltaplane-Round-Nonce``), so a captured upload cannot be
  replayed into a later round — and every accepted payload's SHA-256 is unique per model *and device*, so a
  device's bytes are refused a second time in any round (a replay needs that device's token anyway; two
  honest devices whose updates compress to the same bytes, both zero say, are both accepted);
* ``add_upload`` stores the payload as a blob (durable before its row commits) and records device, cohort
  and weight; :meth:`RoundStore.restore` rebuilds the streaming aggregate of every open round after a
  restart by decoding the stored payloads in acceptance order;
* ``close`` runs the caller's publish step *inside* one registry transaction together with marking the
  round closed: if publishing raises (a non-finite aggregate, a full disk), nothing is committed and the
  round stays open with all its uploads;
* ``abort`` closes a round without publishing (empty or unwanted rounds);
* the server step's learned state (:meth:`~deltaplane.engine.ServerStep.state_dict`: optimizer moments, DP
  accountant, adaptive clip, generators, downlink residual) is stored with every published round, in the
  same transaction, so a restarted service continues bit for bit (:meth:`RoundStore.step_snapshot`);
* each closed round keeps its close's measurements (ε spent, clipped fraction, noise...) as JSON in a
  ``measurements`` column (added to older stores on start), so an operator whose answer to a close was lost
  reads them back with the round;
* SecAgg rounds are numbered here too (:meth:`RoundStore.open_secagg`), and their outcome recorded: their
  protocol state (keys, shares, masked inputs) lives in the service's memory only, but their numbers bind
  every key and AAD of the round (``SecAggConfig.round_id``) and name the round in lineage and logs, so they
  must never be reused after a restart. A round open when the service stopped is marked ``lost`` on the next
  start (:meth:`RoundStore.lose_open_secagg`): it cannot go on, and devices asking for it are told so.

Interface used by the service (``serve/app.py``): ``open``, ``current``, ``record``, ``add_upload``,
``close``, ``abort``, ``restore``, ``cohorts``; SecAgg's (``serve/secagg_routes.py``): ``open_secagg``,
``finish_secagg``, ``secagg_record``, ``lose_open_secagg``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from deltaplane.codecs import Layout, WireSession, decompress, is_compact
from deltaplane.delta import Delta
from deltaplane.errors import Conflict, IntegrityError, NotFound
from deltaplane.registry import Registry
from deltaplane.serve.fleet_history import bounded_reason, stored_adjacency

__all__ = ["SECAGG_OUTCOMES", "RoundConflict", "RoundRecord", "RoundStore"]

#: how a SecAgg round ended: published, aborted by the operator, or lost (the service stopped while it was open)
SECAGG_OUTCOMES = ("published", "aborted", "lost")

T = TypeVar("T")

# Replays are refused per device: UNIQUE (model, device_id, sha256). Stores made before had UNIQUE (model,
# sha256), which refused the second of two honest devices sending identical bytes; RoundStore migrates them.
_UPLOADS = """CREATE TABLE IF NOT EXISTS {name} (
        id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, round INTEGER NOT NULL,
        device_id TEXT NOT NULL, cohort TEXT NOT NULL, weight REAL NOT NULL, sha256 TEXT NOT NULL,
        size INTEGER NOT NULL, at REAL NOT NULL,
        UNIQUE (model, round, device_id), UNIQUE (model, device_id, sha256))"""
_UPLOAD_COLUMNS = "id, model, round, device_id, cohort, weight, sha256, size, at"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rounds (
        model TEXT NOT NULL, number INTEGER NOT NULL, base_version INTEGER NOT NULL, nonce TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'closed', 'aborted')), excluded TEXT NOT NULL,
        opened_at REAL NOT NULL, closed_at REAL, version INTEGER, measurements TEXT,
        PRIMARY KEY (model, number))""",
    _UPLOADS.format(name="round_uploads"),
    "CREATE INDEX IF NOT EXISTS rounds_open ON rounds (model, state)",
    # the server step's learned state after the model's last published round (ServerStep.state_dict)
    """CREATE TABLE IF NOT EXISTS server_steps (
        model TEXT PRIMARY KEY, round INTEGER NOT NULL, version INTEGER, sha256 TEXT NOT NULL,
        state BLOB NOT NULL, at REAL NOT NULL)""",
    # SecAgg rounds' numbers and outcomes (their protocol state is in memory only: never stored)
    """CREATE TABLE IF NOT EXISTS secagg_rounds (
        model TEXT NOT NULL, number INTEGER NOT NULL, base_version INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'published', 'aborted', 'lost')),
        invited INTEGER NOT NULL, opened_at REAL NOT NULL, closed_at REAL, version INTEGER, measurements TEXT,
        PRIMARY KEY (model, number))""",
)
#: columns added since the tables were first made: (table, column, declaration), added to older stores on start
_ADDED_COLUMNS = (
    # the round's close measurements (ε spent, clipped fraction, noise...) as JSON; NULL: none recorded
    ("rounds", "measurements", "TEXT"),
    ("secagg_rounds", "measurements", "TEXT"),
    # why a round ended without publishing (bounded: fleet_history.bounded_reason); NULL: it did not, or it
    # ended before reasons were recorded here
    ("rounds", "reason", "TEXT"),
    ("secagg_rounds", "reason", "TEXT"),
    # the neighbours its measurements' ε is stated under (aggregation.dp: add/remove, zero-out); NULL: no ε, or
    # closed before the label was stored here (read back as "unknown", fleet_history.stored_adjacency)
    ("rounds", "dp_adjacency", "TEXT"),
    ("secagg_rounds", "dp_adjacency", "TEXT"),
)


def _unique_keys(con: Any, table: str) -> set[tuple[str, ...]]:
    """The column lists of ``table``'s UNIQUE constraints and indexes."""
    keys = set()
    for index in con.execute(f"PRAGMA index_list({table})").fetchall():
        if index[2]:  # unique
            cols = con.execute(f"PRAGMA index_info({index[1]})").fetchall()  # (seqno, cid, name)
            keys.add(tuple(str(c[2]) for c in sorted(cols, key=lambda c: int(c[0]))))
    return keys


def _migrate_uploads(con: Any) -> None:
    """Rebuild a ``round_uploads`` table of a store made when replays were refused per model (UNIQUE (model,
    sha256)) with the per-device key, in the caller's transaction: SQLite cannot drop a constraint. Every row
    is copied with its id (acceptance order, which a restart replays in), so no round loses an upload."""
    if ("model", "sha256") not in _unique_keys(con, "round_uploads"):
        return
    con.execute(_UPLOADS.format(name="round_uploads_migrated"))
    con.execute(
        f"INSERT INTO round_uploads_migrated ({_UPLOAD_COLUMNS}) SELECT {_UPLOAD_COLUMNS} FROM round_uploads"
    )
    con.execute("DROP TABLE round_uploads")
    con.execute("ALTER TABLE round_uploads_migrated RENAME TO round_uploads")


def _add_columns(con: Any) -> None:
    """Add :data:`_ADDED_COLUMNS` missing from a store made before them, in the caller's transaction (under the
    write lock: two starting workers add each once). Existing rows read NULL there: nothing was recorded."""
    for table, column, decl in _ADDED_COLUMNS:
        if column not in {str(r[1]) for r in con.execute(f"PRAGMA table_info({table})").fetchall()}:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def _stored(measurements: Mapping[str, float] | None) -> str | None:
    """Measurements as the ``measurements`` column stores them (JSON of floats; None: none)."""
    return None if measurements is None else json.dumps({k: float(v) for k, v in measurements.items()})


def _measured(text: str | None) -> dict[str, float]:
    """A stored ``measurements`` column as a dict ({} when none was recorded)."""
    return {str(k): float(v) for k, v in json.loads(text).items()} if text else {}


def _put_snapshot(con: Any, model: str, round_number: int, version: int | None, data: bytes) -> None:
    con.execute(
        "INSERT OR REPLACE INTO server_steps (model, round, version, sha256, state, at) VALUES (?,?,?,?,?,?)",
        (model, round_number, version, hashlib.sha256(data).hexdigest(), data, time.time()),
    )


class RoundConflict(Conflict):
    """A round operation conflicts with the stored state (HTTP 409); the message says what to do."""


@dataclass
class RoundRecord:
    """One round as stored: number, base version, nonce, and cohorts it must exclude (consent rebuilds)."""

    model: str
    number: int
    base_version: int
    nonce: str
    excluded: tuple[str, ...] = ()
    opened_at: float = field(default_factory=time.time)


class RoundStore:
    """Rounds and uploads in ``registry``'s database (tables created on first use)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        with registry.transaction() as con:
            for stmt in _SCHEMA:
                con.execute(stmt)
            _migrate_uploads(con)  # under the same write lock: two starting workers migrate once
            _add_columns(con)

    # -- rounds ----------------------------------------------------------------------------------------
    def open(self, model: str, base_version: int, *, excluded: tuple[str, ...] = ()) -> RoundRecord:
        """Open the model's next round on ``base_version``; :class:`RoundConflict` if one is still open."""
        with self.registry.transaction() as con:
            row = con.execute("SELECT number FROM rounds WHERE model=? AND state='open'", (model,)).fetchone()
            if row is not None:
                raise RoundConflict(f"round {row[0]} of {model!r} is still open; close or abort it first")
            number = con.execute(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM rounds WHERE model=?", (model,)
            ).fetchone()[0]
            rec = RoundRecord(
                model, int(number), base_version, secrets.token_hex(16), tuple(sorted(excluded))
            )
            con.execute(
                "INSERT INTO rounds (model, number, base_version, nonce, state, excluded, opened_at) "
                "VALUES (?,?,?,?,'open',?,?)",
                (model, rec.number, base_version, rec.nonce, json.dumps(list(rec.excluded)), rec.opened_at),
            )
        return rec

    def current(self, model: str) -> RoundRecord | None:
        """The model's open round, if any."""
        rows = self.registry.query(
            "SELECT number, base_version, nonce, excluded, opened_at FROM rounds WHERE model=? AND state='open'",
            (model,),
        )
        if not rows:
            return None
        n, base, nonce, excluded, at = rows[0]
        return RoundRecord(model, int(n), int(base), nonce, tuple(json.loads(excluded)), float(at))

    def open_rounds(self) -> list[RoundRecord]:
        models = [r[0] for r in self.registry.query("SELECT DISTINCT model FROM rounds WHERE state='open'")]
        return [rec for m in models if (rec := self.current(m)) is not None]

    # -- uploads ---------------------------------------------------------------------------------------
    def store_payload(self, payload: bytes) -> str:
        """Write the payload's blob durably (before taking any lock); returns its SHA-256."""
        return self.registry.put_blob(payload)

    def has_payload(self, digest: str) -> bool:
        """Whether the blob of a payload :meth:`store_payload` wrote is (still) in the registry."""
        return self.registry.blob_path(digest).exists()

    def discard_payload(self, digest: str) -> None:
        """Remove the blob :meth:`store_payload` wrote for an upload that was then refused (unless a row names
        the same bytes): refused uploads must not fill the disk."""
        self.registry.discard_blob(digest)

    def add_upload(
        self,
        rec: RoundRecord,
        *,
        device_id: str,
        cohort: str,
        weight: float,
        payload: bytes,
        stored: bool = False,
    ) -> int:
        """Record an accepted upload durably; returns the round's upload count.

        ``stored``: the caller already wrote the blob with :meth:`store_payload`. Raises
        :class:`RoundConflict` for a second upload of the device in this round, or for bytes this device
        already had accepted in any round of this model (a replay). The same bytes from another device are
        accepted: honest devices can send identical updates (both zero, say), and replaying a device's
        upload needs that device's token.
        """
        digest = hashlib.sha256(payload).hexdigest()
        seen = self.registry.query(
            "SELECT round FROM round_uploads WHERE model=? AND device_id=? AND sha256=?",
            (rec.model, device_id, digest),
        )
        if seen:
            raise RoundConflict(
                f"device {device_id} already had this exact update accepted in round {seen[0][0]}; "
                f"replays are refused (send the update computed for this round)"
            )
        if not stored:
            self.registry.put_blob(payload)  # durable before the row that names it
        with self.registry.transaction() as con:
            state = con.execute(
                "SELECT state FROM rounds WHERE model=? AND number=?", (rec.model, rec.number)
            ).fetchone()
            if state is None or state[0] != "open":
                raise RoundConflict(f"round {rec.number} of {rec.model!r} is not open")
            if con.execute(
                "SELECT 1 FROM round_uploads WHERE model=? AND round=? AND device_id=?",
                (rec.model, rec.number, device_id),
            ).fetchone():
                raise RoundConflict(f"device {device_id} already uploaded to round {rec.number}")
            con.execute(
                "INSERT INTO round_uploads (model, round, device_id, cohort, weight, sha256, size, at) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (rec.model, rec.number, device_id, cohort, weight, digest, len(payload), time.time()),
            )
            return int(
                con.execute(
                    "SELECT COUNT(*) FROM round_uploads WHERE model=? AND round=?", (rec.model, rec.number)
                ).fetchone()[0]
            )

    def uploads(self, rec: RoundRecord) -> list[dict[str, Any]]:
        rows = self.registry.query(
            "SELECT device_id, cohort, weight, sha256, size FROM round_uploads WHERE model=? AND round=? ORDER BY id",
            (rec.model, rec.number),
        )
        return [dict(r) for r in rows]

    def cohorts(self, rec: RoundRecord) -> list[str]:
        """The cohorts whose devices contributed to the round (governance of the version it publishes)."""
        return sorted({str(u["cohort"]) for u in self.uploads(rec)})

    def released(self, model: str) -> int:
        """How many rounds of ``model`` closed with a published version (each one a DP release)."""
        rows = self.registry.query(
            "SELECT COUNT(*) FROM rounds WHERE model=? AND state='closed' AND version IS NOT NULL", (model,)
        )
        return int(rows[0][0])

    def restore(
        self, rec: RoundRecord, session: WireSession | None = None, *, local_keys: Iterable[str] = ()
    ) -> Iterator[tuple[Delta, float, str]]:
        """The round's accepted updates, in acceptance order, decoded from their stored payloads (compact
        ones in ``session``, the server step's wire session; all of them leave out ``local_keys``, the
        tensors a personalized federation keeps on the devices)."""
        base = self.registry.load_state(self.registry.get(rec.model, rec.base_version))
        layout = Layout.of(base).without(local_keys)
        for u in self.uploads(rec):
            payload = self.registry.get_blob(str(u["sha256"]), size=int(u["size"]))  # read no further
            yield (
                decompress(
                    payload,
                    expect_base=(rec.model, rec.base_version),
                    expect_layout=layout,
                    session=session if is_compact(payload) else None,
                ),
                float(u["weight"]),
                str(u["device_id"]),
            )

    # -- closing ---------------------------------------------------------------------------------------
    def close(
        self,
        rec: RoundRecord,
        publish: Callable[[], tuple[int | None, T]],
        *,
        snapshot: Callable[[], bytes] | None = None,
        measured: Callable[[T], Mapping[str, float] | None] | None = None,
        adjacency: str | None = None,
    ) -> T:
        """Run ``publish`` and mark the round closed in one transaction (all or nothing).

        ``publish`` returns ``(version number or None, anything)`` and may write to the registry (its writes
        join this transaction); any exception it raises rolls everything back and leaves the round open with
        its uploads. When a version is published, ``snapshot()`` (the server step's state after the round)
        is stored in the same transaction (:meth:`step_snapshot`). ``measured(anything)``, the round's
        measurements (ε spent...), is stored with the round in the same transaction, so an operator whose
        answer to the close was lost reads them back (:meth:`record`), with ``adjacency``, the neighbours their
        ε is stated under (kept only beside measurements). Returns the second element.
        """
        with self.registry.transaction() as con:
            state = con.execute(
                "SELECT state FROM rounds WHERE model=? AND number=?", (rec.model, rec.number)
            ).fetchone()
            if state is None:
                raise NotFound(f"round {rec.number} of {rec.model!r} does not exist")
            if state[0] != "open":
                raise RoundConflict(f"round {rec.number} of {rec.model!r} is already {state[0]}")
            version, result = publish()
            measurements = _stored(measured(result)) if measured is not None else None
            con.execute(
                "UPDATE rounds SET state='closed', closed_at=?, version=?, measurements=?, dp_adjacency=? "
                "WHERE model=? AND number=?",
                (
                    time.time(), version, measurements, None if measurements is None else adjacency,
                    rec.model, rec.number,
                ),
            )  # fmt: skip
            if version is not None and snapshot is not None:
                _put_snapshot(con, rec.model, rec.number, version, snapshot())
        return result

    def save_step(self, model: str, round_number: int, version: int | None, data: bytes) -> None:
        """Store the server step's state after a round closed elsewhere (a SecAgg round), atomically."""
        with self.registry.transaction() as con:
            _put_snapshot(con, model, round_number, version, data)

    def step_snapshot(self, model: str) -> bytes | None:
        """The server step's state stored with the model's last published round (None if there is none).

        Raises:
            IntegrityError: the stored bytes do not match the hash recorded with them.
        """
        rows = self.registry.query("SELECT sha256, state FROM server_steps WHERE model=?", (model,))
        if not rows:
            return None
        digest, data = rows[0][0], bytes(rows[0][1])
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"the stored server-step state of {model!r} does not match its hash")
        return data

    def record(self, model: str, number: int) -> dict[str, Any] | None:
        """Round ``number`` of ``model`` as stored (``state``: open, closed or aborted; ``version`` it published,
        ``uploads`` accepted and the ``devices`` they came from, in arrival order; ``measurements`` of its close:
        {} when none were recorded; ``dp_adjacency``, the neighbours their ε is stated under: "unknown" for a
        round closed before it was stored, None without ε), or None if it never existed: what an operator re-reads after losing an
        answer, and whose devices ``fleet coordinate`` names as dropped out."""
        rows = self.registry.query(
            "SELECT base_version, state, version, opened_at, closed_at, measurements, reason, dp_adjacency "
            "FROM rounds WHERE model=? AND number=?",
            (model, number),
        )
        if not rows:
            return None
        base, state, version, opened, closed, measurements, reason, adjacency = rows[0]
        measured = _measured(measurements)
        devices = [
            str(d)
            for (d,) in self.registry.query(
                "SELECT device_id FROM round_uploads WHERE model=? AND round=? ORDER BY id", (model, number)
            )
        ]
        return {
            "model": model, "round": number, "base_version": int(base), "state": str(state),
            "version": version, "uploads": len(devices), "devices": devices, "opened_at": opened,
            "closed_at": closed, "measurements": measured, "reason": reason,
            "dp_adjacency": stored_adjacency(adjacency, has_epsilon="epsilon" in measured),
        }  # fmt: skip

    def abort(self, rec: RoundRecord, reason: str) -> None:
        """Close the round without publishing, recording why (``reason``, cut to
        :data:`~deltaplane.serve.fleet_history.MAX_REASON`); its uploads stay recorded (and their hashes stay
        refused)."""
        with self.registry.transaction() as con:
            con.execute(
                "UPDATE rounds SET state='aborted', closed_at=?, reason=? WHERE model=? AND number=? "
                "AND state='open'",
                (time.time(), bounded_reason(reason), rec.model, rec.number),
            )

    # -- SecAgg rounds: numbers and outcomes only ----------------------------------------------------------
    def open_secagg(
        self, model: str, base_version: int, invited: int, make: Callable[[int], T]
    ) -> tuple[int, T]:
        """Allocate ``model``'s next SecAgg round number and record the round open, in one transaction with
        ``make(number)`` (which builds the round and may refuse it: then nothing is recorded and the number is
        not taken). Numbers are never reused, across restarts too: each binds the round's keys and AAD."""
        with self.registry.transaction() as con:
            number = self._next_secagg(con, model)
            made = make(number)
            con.execute(
                "INSERT INTO secagg_rounds (model, number, base_version, state, invited, opened_at) "
                "VALUES (?,?,?,'open',?,?)",
                (model, number, base_version, invited, time.time()),
            )
        return number, made

    @staticmethod
    def _next_secagg(con: Any, model: str) -> int:
        """One more than the highest SecAgg round number ``model`` ever had. A store from before SecAgg numbers
        were recorded has none: its published versions' lineage (``secagg_round``) says how far it got."""
        last = con.execute("SELECT MAX(number) FROM secagg_rounds WHERE model=?", (model,)).fetchone()[0]
        if last is None:
            last = con.execute(
                "SELECT MAX(CAST(json_extract(lineage, '$.secagg_round') AS INTEGER)) FROM artifacts "
                "WHERE model=? AND kind='model'",
                (model,),
            ).fetchone()[0]
        return int(last or 0) + 1

    def finish_secagg(
        self,
        model: str,
        number: int,
        outcome: str,
        version: int | None = None,
        measurements: Mapping[str, float] | None = None,
        reason: str | None = None,
        adjacency: str | None = None,
    ) -> None:
        """Record how SecAgg round ``number`` ended (:data:`SECAGG_OUTCOMES`) and, when it published, its close's
        ``measurements`` (and ``adjacency``, the neighbours their ε is stated under), else why not (``reason``,
        bounded); called inside the transaction that publishes or
        aborts it, so a version is never published by a round still recorded open."""
        if outcome not in SECAGG_OUTCOMES:
            raise ValueError(f"unknown SecAgg outcome {outcome!r}")
        with self.registry.transaction() as con:
            con.execute(
                "UPDATE secagg_rounds SET state=?, closed_at=?, version=?, measurements=?, reason=?, "
                "dp_adjacency=? WHERE model=? AND number=?",
                (
                    outcome,
                    time.time(),
                    version,
                    _stored(measurements),
                    None if reason is None else bounded_reason(reason),
                    None if measurements is None else adjacency,
                    model,
                    number,
                ),
            )

    def secagg_record(self, model: str, number: int) -> dict[str, Any] | None:
        """SecAgg round ``number`` of ``model`` as recorded (None if it never existed): ``finished`` is its
        outcome, or None while it is open; ``published`` the version, the close's measurements and the neighbours
        their ε is stated under (``dp_adjacency``: "unknown" if closed before it was stored, None without ε)."""
        rows = self.registry.query(
            "SELECT base_version, state, invited, opened_at, closed_at, version, measurements, reason, "
            "dp_adjacency FROM secagg_rounds WHERE model=? AND number=?",
            (model, number),
        )
        if not rows:
            return None
        base, state, invited, opened, closed, version, measurements, reason, adjacency = rows[0]
        measured = _measured(measurements)
        return {
            "model": model, "round": number, "base_version": int(base), "invited": int(invited),
            "finished": None if state == "open" else str(state),
            "published": (
                None
                if version is None
                else {
                    "version": int(version), "measurements": measured,
                    "dp_adjacency": stored_adjacency(adjacency, has_epsilon="epsilon" in measured),
                }
            ),
            "opened_at": opened, "closed_at": closed, "reason": reason,
        }  # fmt: skip

    def lose_open_secagg(self, reason: str) -> list[tuple[str, int, int]]:
        """On a service's start: every SecAgg round recorded open was open when the service stopped; its
        protocol state died with that process, so it can never complete. Mark it lost, saying so (``reason``);
        returns which (model, number, devices invited)."""
        with self.registry.transaction() as con:
            lost = con.execute(
                "SELECT model, number, invited FROM secagg_rounds WHERE state='open'"
            ).fetchall()
            con.execute(
                "UPDATE secagg_rounds SET state='lost', closed_at=?, reason=? WHERE state='open'",
                (time.time(), bounded_reason(reason)),
            )
        return [(str(m), int(n), int(i)) for m, n, i in lost]

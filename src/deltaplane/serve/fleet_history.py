"""The fleet's history in the registry database: closed rounds, the devices' reports, uploads by outcome.

Why: the dashboard's Fleet page and ``GET /admin/rounds/closed`` list the last closed rounds with the held-out
accuracy their devices reported; kept in the service's memory only, a restart (an upgrade, a crash) wiped that
history although the registry kept every version those rounds published. These tables sit beside the
service's others (:mod:`~deltaplane.serve.service_store`, :mod:`~deltaplane.serve.rounds_store`) in the
registry's database, so one transaction covers a round's close and its summary, and they hold what memory
holds, with the same bounds:

* ``fleet_rounds``: one row per closed round (plain or SecAgg), the last :data:`MAX_CLOSED_ROUNDS`; each
  insert prunes older rows in its own transaction. A round's row is written *inside* the transaction that
  publishes its version and marks the round closed (:meth:`FleetHistory.add_round` joins the caller's
  :meth:`~deltaplane.registry.Registry.transaction`), so after a crash either both committed or neither: a
  published round is never left unrecorded, and ``UNIQUE (model, kind, number)`` refuses a second row for
  the same round (a close is refused before that for a round no longer open).
* ``fleet_reports``: the devices' reports (``POST /v1/models/{m}/report``: metrics such as
  ``holdout_accuracy``), one per device per version (a later report replaces it), the last
  :data:`MAX_REPORTS` per model.
* ``fleet_counters``: uploads accepted and refused by reason, saved with each round's close (one write
  per close, none per refusal: a flood of refused requests costs no disk write); a crash loses the counts
  since the last close.

Rows carry a ``format`` number; a row this code cannot read (a newer format, damaged JSON) is refused with
:class:`HistoryRowError` naming it, and :meth:`FleetHistory.load` leaves it out and says so: a damaged row
never stops the service.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deltaplane.errors import IntegrityError
from deltaplane.registry import Registry

__all__ = [
    "FORMAT",
    "MAX_CLOSED_ROUNDS",
    "MAX_REPORTS",
    "FleetHistory",
    "HistoryRowError",
    "LoadedHistory",
    "kept_counter",
]

#: the fleet page's "closed rounds" table: the last this many closed rounds, plain and SecAgg together
MAX_CLOSED_ROUNDS = 200
#: reports kept per model (in memory, and one per device per version in the database)
MAX_REPORTS = 1000
#: the layout of a row's JSON this code writes and reads
FORMAT = 1
#: a closed round's summary fields, as stored (the row's model, kind, number and closed_at are columns)
_ROUND_FIELDS = ("version", "contributors", "epsilon", "authenticated", "revoked")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fleet_rounds (
        id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL,
        kind TEXT NOT NULL, number INTEGER NOT NULL, summary TEXT NOT NULL, closed_at REAL NOT NULL,
        UNIQUE (model, kind, number))""",
    """CREATE TABLE IF NOT EXISTS fleet_reports (
        id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL,
        device TEXT NOT NULL, version INTEGER NOT NULL, report TEXT NOT NULL, at REAL NOT NULL,
        UNIQUE (model, device, version))""",
    "CREATE INDEX IF NOT EXISTS fleet_reports_model ON fleet_reports (model, id)",
    "CREATE TABLE IF NOT EXISTS fleet_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


class HistoryRowError(IntegrityError):
    """A stored fleet-history row cannot be read (written by a newer deltaplane, or damaged)."""


def kept_counter(name: str) -> bool:
    """Whether counter ``name`` is saved with the history: uploads by outcome, as the Fleet page lists them."""
    return name in ("uploads.accepted", "secagg.masked") or name.startswith("rejected.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


#: what each stored field must be for the Fleet page and ``GET /admin/rounds/closed`` to show it (the service
#: wrote it so; a row that is still JSON but holds something else is damaged, and refused as such)
_FIELD_CHECKS: dict[str, Any] = {
    "version": lambda v: v is None or _is_int(v),
    "contributors": _is_int,
    "epsilon": lambda v: v is None or _is_int(v) or isinstance(v, float),  # inf: a round without noise
    "authenticated": lambda v: isinstance(v, bool),
    "revoked": lambda v: isinstance(v, list) and all(isinstance(d, str) for d in v),
    "cohort": lambda v: isinstance(v, str),
    "round": lambda v: v is None or _is_int(v),
    "metrics": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items())
    ),
}


def _decode(table: str, row_id: int, fmt: int, text: str, fields: Iterable[str]) -> dict[str, Any]:
    """A row's JSON as a dict holding ``fields``, each of the type the service writes
    (:data:`_FIELD_CHECKS`); :class:`HistoryRowError` naming the row if it cannot be."""
    where = f"fleet history row {row_id} of {table}"
    if fmt != FORMAT:
        newer = "a newer deltaplane" if fmt > FORMAT else "an unknown writer"
        raise HistoryRowError(f"{where} has format {fmt}, written by {newer}; this one reads format {FORMAT}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HistoryRowError(f"{where} is not valid JSON ({exc})") from None
    missing = [f for f in fields if not isinstance(data, dict) or f not in data]
    if missing:
        raise HistoryRowError(f"{where} lacks {', '.join(missing)}")
    wrong = [f for f in fields if f in _FIELD_CHECKS and not _FIELD_CHECKS[f](data[f])]
    if wrong:
        raise HistoryRowError(f"{where} holds {', '.join(wrong)} of the wrong type")
    return data


@dataclass
class LoadedHistory:
    """What :meth:`FleetHistory.load` read: closed rounds (oldest first), reports by model (oldest first),
    counters, and one line per row it refused."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


class FleetHistory:
    """The fleet's history tables in ``registry``'s database (created on first use)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        with registry.transaction() as con:
            for stmt in _SCHEMA:
                con.execute(stmt)

    def add_round(self, summary: Mapping[str, Any], counters: Mapping[str, int] | None = None) -> None:
        """Store a closed round's summary (``model``, ``round``, ``kind``, ``closed_at`` and
        :data:`_ROUND_FIELDS`) and the kept ``counters``, pruning rounds past :data:`MAX_CLOSED_ROUNDS`.

        Call it inside the transaction that closes the round: it joins it, so the row commits with the
        version or not at all. A second row for the same round fails that transaction (``sqlite3``'s
        ``IntegrityError``), rolling the close back.
        """
        body = json.dumps({k: summary[k] for k in _ROUND_FIELDS})
        with self.registry.transaction() as con:
            con.execute(
                "INSERT INTO fleet_rounds (format, model, kind, number, summary, closed_at) VALUES (?,?,?,?,?,?)",
                (FORMAT, summary["model"], summary["kind"], summary["round"], body, summary["closed_at"]),
            )
            con.execute(
                "DELETE FROM fleet_rounds WHERE id <= "
                "(SELECT id FROM fleet_rounds ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (MAX_CLOSED_ROUNDS,),
            )
            con.executemany(
                "INSERT OR REPLACE INTO fleet_counters (name, value) VALUES (?,?)",
                [(k, int(v)) for k, v in (counters or {}).items() if kept_counter(k)],
            )

    def add_report(self, model: str, report: Mapping[str, Any]) -> None:
        """Store a device's report (``device``, ``version``, ``cohort``, ``round``, ``metrics``, ``at``),
        replacing its earlier one on the same version, and prune the model's past :data:`MAX_REPORTS`."""
        body = json.dumps({k: report[k] for k in ("cohort", "round", "metrics")})
        with self.registry.transaction() as con:
            # REPLACE deletes the earlier row and inserts a new id: the newest report is the last kept
            con.execute(
                "INSERT OR REPLACE INTO fleet_reports (format, model, device, version, report, at) "
                "VALUES (?,?,?,?,?,?)",
                (FORMAT, model, report["device"], report["version"], body, report.get("at", time.time())),
            )
            con.execute(
                "DELETE FROM fleet_reports WHERE model=? AND id <= "
                "(SELECT id FROM fleet_reports WHERE model=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (model, model, MAX_REPORTS),
            )

    def load(self) -> LoadedHistory:
        """Everything stored, as memory holds it; rows it cannot read are left out and listed in ``refused``."""
        out = LoadedHistory()
        rows = self.registry.query(
            "SELECT id, format, model, kind, number, summary, closed_at FROM fleet_rounds ORDER BY id"
        )
        for row_id, fmt, model, kind, number, text, closed_at in rows:
            try:
                data = _decode("fleet_rounds", row_id, fmt, text, _ROUND_FIELDS)
            except HistoryRowError as exc:
                out.refused.append(f"{exc} (closed round {number} of {model!r}, {kind}); left out")
                continue
            out.rounds.append(
                {"model": model, "round": int(number), "kind": kind}
                | {k: data[k] for k in _ROUND_FIELDS}
                | {"revoked": list(data["revoked"]), "closed_at": float(closed_at)}
            )
        rows = self.registry.query(
            "SELECT id, format, model, device, version, report, at FROM fleet_reports ORDER BY id"
        )
        for row_id, fmt, model, device, version, text, at in rows:
            try:
                data = _decode("fleet_reports", row_id, fmt, text, ("cohort", "round", "metrics"))
            except HistoryRowError as exc:
                out.refused.append(f"{exc} (report of {device!r} on {model}@{version}); left out")
                continue
            out.reports.setdefault(model, []).append(
                {"device": device, "version": int(version), "at": float(at)}
                | {k: data[k] for k in ("cohort", "round", "metrics")}
            )
        out.counters = {
            str(k): int(v) for k, v in self.registry.query("SELECT name, value FROM fleet_counters")
        }
        return out

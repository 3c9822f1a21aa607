"""The fleet's history in the registry database: closed rounds, the devices' reports, uploads by outcome.

Why: the dashboard's Fleet page and ``GET /admin/rounds/closed`` list the last closed rounds with the held-out
accuracy their devices reported; kept in the service's memory only, a restart (an upgrade, a crash) wiped that
history although the registry kept every version those rounds published. These tables sit beside the
service's others (:mod:`~deltaplane.serve.service_store`, :mod:`~deltaplane.serve.rounds_store`) in the
registry's database, so one transaction covers a round's close and its summary, and they hold what memory
holds, with the same bounds:

* ``fleet_rounds``: one row per ended round (plain or SecAgg), its ``outcome`` a column: ``published`` (a
  close; an empty plain close, with no version, too), or ended without publishing: ``aborted`` (by the
  coordinator or an operator: nobody uploaded, too few devices for a SecAgg stage, a close refused) or
  ``lost`` (a SecAgg round open when the service stopped), with its reason. Published rounds and rounds
  that ended without publishing are bounded each on their own, the last :data:`MAX_CLOSED_ROUNDS` of each,
  so a burst of aborted rounds never pushes the published history out; each insert prunes its group in its
  own transaction. A round's row is written *inside* the transaction that publishes its version, or
  aborts it, and marks the round so (:meth:`FleetHistory.add_round` and :meth:`FleetHistory.add_unpublished`
  join the caller's :meth:`~deltaplane.registry.Registry.transaction`), so after a crash either both
  committed or neither: a round is never left recorded open and ended, nor ended and unrecorded, and
  ``UNIQUE (model, kind, number)`` refuses a second row for the same round (a close or abort is refused
  before that for a round no longer open).
* ``fleet_reports``: the devices' reports (``POST /v1/models/{m}/report``: metrics such as
  ``holdout_accuracy``), one per device per version (a later report replaces it), the last
  :data:`MAX_REPORTS` per model.
* ``fleet_evaluations``: a published version's accuracy on the task's test set (and that set's size) and
  whether the divergence check warned on it, as the trusted coordinator (``fleet coordinate --trusted``)
  measured it on the weights it fetched verified (``PUT /admin/models/{m}/rounds/{kind}/{n}/evaluation``),
  one per version (a later one replaces it), the last :data:`MAX_CLOSED_ROUNDS`: the one figure on the Fleet
  page measured on the same data ``deltaplane run`` scores, where the devices' held-out sets are a few samples.
* ``fleet_counters``: uploads accepted and refused by reason (:func:`kept_counter`), saved inside the
  transactions the service makes anyway: each round's close or abort, each report and each accepted upload (no
  sync of their own, none per refusal: a flood of refused requests costs no disk write), else by the running
  service's periodic flush (``ServiceState.flush_watch``: at most one transaction a period, none while nothing
  changed). A crash loses only what was counted since the last of those.

Rows carry a ``format`` number: 1 for a published round's row (this morning's layout, still written, so an
older deltaplane keeps reading them), 2 for a round that ended without publishing (an older deltaplane refuses
it rather than list it as a round that published nothing). A database from before the ``outcome`` column is
migrated on open: its rows are published ones. A row this code cannot read (a newer format, damaged JSON) is refused with
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
    "MAX_ABORT_REASON",
    "MAX_CLOSED_ROUNDS",
    "MAX_REASON",
    "MAX_REPORTS",
    "UNKNOWN_ADJACENCY",
    "UNPUBLISHED_OUTCOMES",
    "FleetHistory",
    "HistoryRowError",
    "LoadedHistory",
    "bounded_reason",
    "decode_row",
    "is_int",
    "is_number",
    "kept_counter",
    "stored_adjacency",
]

#: the fleet page's "closed rounds" table: the last this many published rounds, plain and SecAgg together; and,
#: bounded on its own, its "ended without publishing" table: the last this many rounds that ended unpublished
MAX_CLOSED_ROUNDS = 200
#: a stored reason's length at most (characters; a longer one is cut, ending in "…")
MAX_REASON = 500
#: the longest ``reason`` an abort request takes (a longer one is refused, 422; the client cuts it to this)
MAX_ABORT_REASON = 2000
#: how a round can end without publishing: given up (coordinator, operator), or lost in a service restart
UNPUBLISHED_OUTCOMES = ("aborted", "lost")
#: reports kept per model (in memory, and one per device per version in the database)
MAX_REPORTS = 1000
#: the newest layout of a row's JSON this code writes and reads (it reads every older one too)
FORMAT = 2
#: a device's report's row layout (unchanged since format 1)
_REPORT_FORMAT = 1
#: a published round's row: its layout number and summary fields (model, kind, number and closed_at are columns)
_PUBLISHED = (1, ("version", "contributors", "epsilon", "authenticated", "revoked"))
#: a published round's fields a row may lack: ``dp_adjacency``, the neighbours its ε is stated under, written
#: beside ε since it was stored (an older deltaplane reads the row and ignores it); a row with an ε and no
#: label reads "unknown" (:func:`stored_adjacency`), never a guess
_PUBLISHED_OPTIONAL = ("dp_adjacency",)
#: a trusted coordinator's evaluation of a published version: the round that published it, its accuracy on the
#: task's test set, that set's size, and whether the coordinator's divergence check warned on it
_EVALUATION = (1, ("kind", "round", "test_accuracy", "test_samples", "diverged"))
#: a round that ended without publishing: ``invited`` (None: a plain round invites every device),
#: ``contributors`` (the devices that took part: uploaded, or spoke in a SecAgg stage), ``stage`` (a SecAgg
#: round's stage when it ended), ``reason``
_UNPUBLISHED = (FORMAT, ("invited", "contributors", "stage", "reason", "authenticated", "revoked"))

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fleet_rounds (
        id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL,
        kind TEXT NOT NULL, number INTEGER NOT NULL, summary TEXT NOT NULL, closed_at REAL NOT NULL,
        outcome TEXT NOT NULL DEFAULT 'published', UNIQUE (model, kind, number))""",
    """CREATE TABLE IF NOT EXISTS fleet_reports (
        id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL,
        device TEXT NOT NULL, version INTEGER NOT NULL, report TEXT NOT NULL, at REAL NOT NULL,
        UNIQUE (model, device, version))""",
    "CREATE INDEX IF NOT EXISTS fleet_reports_model ON fleet_reports (model, id)",
    """CREATE TABLE IF NOT EXISTS fleet_evaluations (
        model TEXT NOT NULL, version INTEGER NOT NULL, format INTEGER NOT NULL, evaluation TEXT NOT NULL,
        at REAL NOT NULL, PRIMARY KEY (model, version))""",
    "CREATE TABLE IF NOT EXISTS fleet_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


class HistoryRowError(IntegrityError):
    """A stored fleet-history row cannot be read (written by a newer deltaplane, or damaged)."""


#: the counters kept besides ``rejected.*``: accepted plain uploads and SecAgg masked inputs, and the SecAgg
#: messages the protocol refused (out of order: 409; cannot go on: 422)
_KEPT = ("uploads.accepted", "secagg.masked", "secagg.refused", "secagg.refused_order")


def kept_counter(name: str) -> bool:
    """Whether counter ``name`` is saved with the history: uploads by outcome, as the Fleet page lists them."""
    return name in _KEPT or name.startswith("rejected.")


def _migrate(con: Any) -> None:
    """Give a ``fleet_rounds`` table from before outcomes were recorded its ``outcome`` column (every row it
    holds was a published round's), and the index each outcome's pruning reads."""
    columns = {row[1] for row in con.execute("PRAGMA table_info(fleet_rounds)")}
    if "outcome" not in columns:
        con.execute("ALTER TABLE fleet_rounds ADD COLUMN outcome TEXT NOT NULL DEFAULT 'published'")
    con.execute("CREATE INDEX IF NOT EXISTS fleet_rounds_outcome ON fleet_rounds (outcome, id)")


#: a stored round's ε whose record predates its label (``dp_adjacency``, one of
#: :mod:`deltaplane.aggregation.dp`'s): read so, never guessed from today's configuration, which may not be
#: the one that spent it
UNKNOWN_ADJACENCY = "unknown"


def stored_adjacency(label: str | None, *, has_epsilon: bool) -> str | None:
    """The ``dp_adjacency`` of a stored round as read back (here and in
    :mod:`~deltaplane.serve.rounds_store`): its stored ``label``; :data:`UNKNOWN_ADJACENCY` for a record with
    an ε but no label (an older record); None where there is no ε to qualify."""
    if not has_epsilon:
        return None
    return label if label is not None else UNKNOWN_ADJACENCY


def bounded_reason(reason: str) -> str:
    """``reason`` on one line, at most :data:`MAX_REASON` characters (what a device or an error said can be
    long); the page escapes it, this only bounds it."""
    line = " ".join(str(reason).split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON and SQLite give both; a stored count or number is never a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


#: what each stored field must be for the Fleet page and ``GET /admin/rounds/closed`` to show it (the service
#: wrote it so; a row that is still JSON but holds something else is damaged, and refused as such)
_FIELD_CHECKS: dict[str, Any] = {
    "version": lambda v: v is None or is_int(v),
    "contributors": is_int,
    "epsilon": lambda v: v is None or is_int(v) or isinstance(v, float),  # inf: a round without noise
    "dp_adjacency": lambda v: v is None or isinstance(v, str),
    "authenticated": lambda v: isinstance(v, bool),
    "revoked": lambda v: isinstance(v, list) and all(isinstance(d, str) for d in v),
    "cohort": lambda v: isinstance(v, str),
    "round": lambda v: v is None or is_int(v),
    "test_accuracy": lambda v: is_number(v) and 0 <= v <= 1,
    "test_samples": lambda v: is_int(v) and v >= 1,
    "diverged": lambda v: isinstance(v, bool),
    "kind": lambda v: isinstance(v, str),
    "metrics": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and is_number(x) for k, x in v.items())
    ),
}


#: a round that ended without publishing: as a published round's, and its own fields (a lost round's
#: ``contributors`` is unknown: None)
_UNPUBLISHED_CHECKS: dict[str, Any] = _FIELD_CHECKS | {
    "invited": lambda v: v is None or is_int(v),
    "contributors": lambda v: v is None or is_int(v),
    "stage": lambda v: v is None or isinstance(v, str),
    "reason": lambda v: isinstance(v, str),
}


def decode_row(
    table: str,
    row_id: int | str,
    fmt: int,
    text: str,
    fields: Iterable[str],
    expected: int = 1,
    checks: Mapping[str, Any] = _FIELD_CHECKS,
) -> dict[str, Any]:
    """A row's JSON as a dict holding ``fields``, each of the type the service writes (``checks``);
    :class:`HistoryRowError` naming the row if it cannot be (or has a format other than ``expected``: newer
    than this code, or not the layout its outcome is written in)."""
    where = f"fleet history row {row_id} of {table}"
    if fmt != expected:
        newer = "a newer deltaplane" if fmt > FORMAT else "an unknown writer"
        raise HistoryRowError(
            f"{where} has format {fmt}, written by {newer}; this one reads format {expected} there"
        )
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HistoryRowError(f"{where} is not valid JSON ({exc})") from None
    except RecursionError:  # a damaged row nested past the parser's depth: as damaged as invalid JSON
        raise HistoryRowError(f"{where} is not valid JSON (nested too deep)") from None
    missing = [f for f in fields if not isinstance(data, dict) or f not in data]
    if missing:
        raise HistoryRowError(f"{where} lacks {', '.join(missing)}")
    wrong = [f for f in data if f in checks and not checks[f](data[f])]  # the optional fields too
    if wrong:
        raise HistoryRowError(f"{where} holds {', '.join(wrong)} of the wrong type")
    return data


@dataclass
class LoadedHistory:
    """What :meth:`FleetHistory.load` read: published rounds and rounds that ended without publishing (each
    oldest first), reports by model (oldest first), the trusted coordinator's evaluations by (model, version)
    (oldest first), counters, and one line per row it refused."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    unpublished: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    evaluations: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


class FleetHistory:
    """The fleet's history tables in ``registry``'s database (created on first use)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        with registry.transaction() as con:
            for stmt in _SCHEMA:
                con.execute(stmt)
            _migrate(con)

    def add_round(self, summary: Mapping[str, Any], counters: Mapping[str, int] | None = None) -> None:
        """Store a published round's summary (``model``, ``round``, ``kind``, ``closed_at`` and its fields:
        version, contributors, epsilon, authenticated, revoked; ``dp_adjacency`` beside ε) and the kept ``counters``, pruning the
        published rounds past :data:`MAX_CLOSED_ROUNDS`.

        Call it inside the transaction that closes the round: it joins it, so the row commits with the
        version or not at all. A second row for the same round fails that transaction (``sqlite3``'s
        ``IntegrityError``), rolling the close back.
        """
        self._insert("published", _PUBLISHED, summary, counters)

    def add_unpublished(self, summary: Mapping[str, Any], counters: Mapping[str, int] | None = None) -> None:
        """Store a round that ended without publishing: ``outcome`` (:data:`UNPUBLISHED_OUTCOMES`), ``model``,
        ``round``, ``kind``, ``closed_at`` (when it ended), ``invited``, ``contributors``, ``stage``,
        ``reason`` (cut to :data:`MAX_REASON`), ``authenticated``, ``revoked``; prunes that group past
        :data:`MAX_CLOSED_ROUNDS`. Call it inside the transaction that records the round aborted or lost,
        for the same all-or-nothing as :meth:`add_round`."""
        outcome = summary["outcome"]
        if outcome not in UNPUBLISHED_OUTCOMES:
            raise HistoryRowError(f"a round that ended without publishing cannot be {outcome!r}")
        self._insert(
            outcome, _UNPUBLISHED, dict(summary) | {"reason": bounded_reason(summary["reason"])}, counters
        )

    def _insert(
        self,
        outcome: str,
        layout: tuple[int, tuple[str, ...]],
        summary: Mapping[str, Any],
        counters: Mapping[str, int] | None,
    ) -> None:
        """One row of ``outcome`` in ``layout`` (format, fields), then prune its group (published, or ended
        without publishing) to :data:`MAX_CLOSED_ROUNDS`, and save the kept counters."""
        fmt, fields = layout
        # one of two literals, never a caller's text
        group = "outcome = 'published'" if outcome == "published" else "outcome != 'published'"
        with self.registry.transaction() as con:
            con.execute(
                "INSERT INTO fleet_rounds (format, model, kind, number, summary, closed_at, outcome) "
                "VALUES (?,?,?,?,?,?,?)",
                (
                    fmt,
                    summary["model"],
                    summary["kind"],
                    summary["round"],
                    json.dumps(
                        {k: summary[k] for k in fields}
                        | {k: summary[k] for k in _PUBLISHED_OPTIONAL if summary.get(k) is not None}
                    ),
                    summary["closed_at"],
                    outcome,
                ),
            )
            con.execute(
                f"DELETE FROM fleet_rounds WHERE {group} AND id <= "
                f"(SELECT id FROM fleet_rounds WHERE {group} ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (MAX_CLOSED_ROUNDS,),
            )
            self.save_counters(counters or {})

    def save_counters(self, counters: Mapping[str, int]) -> None:
        """Store the kept ``counters`` (:func:`kept_counter`); joins the caller's transaction, so it costs no
        sync of its own there (the service calls it with each close, abort, report and accepted upload, and
        its periodic flush). A counter only grows, so a stored value is never lowered: two writers whose
        snapshots commit out of order (a flush taken before an upload, committed after it) keep the larger."""
        with self.registry.transaction() as con:
            con.executemany(
                "INSERT INTO fleet_counters (name, value) VALUES (?,?) ON CONFLICT (name) "
                "DO UPDATE SET value = max(value, excluded.value)",
                [(k, int(v)) for k, v in counters.items() if kept_counter(k)],
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
                (
                    _REPORT_FORMAT,
                    model,
                    report["device"],
                    report["version"],
                    body,
                    report.get("at", time.time()),
                ),
            )
            con.execute(
                "DELETE FROM fleet_reports WHERE model=? AND id <= "
                "(SELECT id FROM fleet_reports WHERE model=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (model, model, MAX_REPORTS),
            )

    def add_evaluation(self, model: str, version: int, evaluation: Mapping[str, Any]) -> None:
        """Store the trusted coordinator's ``evaluation`` of ``model``'s ``version`` (``kind`` and ``round``: the
        round that published it; ``test_accuracy``, ``test_samples``, ``diverged``), replacing an earlier one of
        that version, and prune past :data:`MAX_CLOSED_ROUNDS` (the closed rounds it sits beside)."""
        _, fields = _EVALUATION
        with self.registry.transaction() as con:
            # REPLACE deletes the earlier row and inserts a new rowid: the newest evaluation is the last kept
            con.execute(
                "INSERT OR REPLACE INTO fleet_evaluations (model, version, format, evaluation, at) "
                "VALUES (?,?,?,?,?)",
                (model, version, _EVALUATION[0], json.dumps({k: evaluation[k] for k in fields}), time.time()),
            )
            con.execute(
                "DELETE FROM fleet_evaluations WHERE rowid <= "
                "(SELECT rowid FROM fleet_evaluations ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                (MAX_CLOSED_ROUNDS,),
            )

    def load(self) -> LoadedHistory:
        """Everything stored, as memory holds it; rows it cannot read are left out and listed in ``refused``."""
        out = LoadedHistory()
        rows = self.registry.query(
            "SELECT id, format, model, kind, number, summary, closed_at, outcome FROM fleet_rounds ORDER BY id"
        )
        for row_id, fmt, model, kind, number, text, closed_at, outcome in rows:
            published = outcome == "published"
            expected, fields = _PUBLISHED if published else _UNPUBLISHED
            try:
                if not published and outcome not in UNPUBLISHED_OUTCOMES:
                    raise HistoryRowError(
                        f"fleet history row {row_id} of fleet_rounds has outcome {outcome!r}"
                    )
                checks = _FIELD_CHECKS if published else _UNPUBLISHED_CHECKS
                data = decode_row("fleet_rounds", row_id, fmt, text, fields, expected, checks)
            except HistoryRowError as exc:
                what = "closed" if published else "unpublished"
                out.refused.append(f"{exc} ({what} round {number} of {model!r}, {kind}); left out")
                continue
            row = (
                {"model": model, "round": int(number), "kind": kind}
                | ({} if published else {"outcome": outcome})
                | {k: data[k] for k in fields}
                | {"revoked": list(data["revoked"]), "closed_at": float(closed_at)}
            )
            if published:
                row["dp_adjacency"] = stored_adjacency(
                    data.get("dp_adjacency"), has_epsilon=data["epsilon"] is not None
                )
            (out.rounds if published else out.unpublished).append(row)
        rows = self.registry.query(
            "SELECT id, format, model, device, version, report, at FROM fleet_reports ORDER BY id"
        )
        for row_id, fmt, model, device, version, text, at in rows:
            try:
                data = decode_row("fleet_reports", row_id, fmt, text, ("cohort", "round", "metrics"))
            except HistoryRowError as exc:
                out.refused.append(f"{exc} (report of {device!r} on {model}@{version}); left out")
                continue
            out.reports.setdefault(model, []).append(
                {"device": device, "version": int(version), "at": float(at)}
                | {k: data[k] for k in ("cohort", "round", "metrics")}
            )
        rows = self.registry.query(
            "SELECT rowid, format, model, version, evaluation FROM fleet_evaluations ORDER BY rowid"
        )
        for row_id, fmt, model, version, text in rows:
            try:
                data = decode_row("fleet_evaluations", row_id, fmt, text, _EVALUATION[1], _EVALUATION[0])
            except HistoryRowError as exc:
                out.refused.append(f"{exc} (evaluation of {model}@{version}); left out")
                continue
            out.evaluations[(model, int(version))] = {k: data[k] for k in _EVALUATION[1]}
        out.counters = {
            str(k): int(v) for k, v in self.registry.query("SELECT name, value FROM fleet_counters")
        }
        return out

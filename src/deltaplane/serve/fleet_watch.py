"""The fleet's live watch in the registry database: devices seen, drift monitors and their windows, alerts.

Why: the dashboard's Fleet page, ``GET /admin/alerts`` and ``GET /admin/models/{m}/drift`` read these; kept in the
service's memory only, a restart (an upgrade, a crash) showed an empty fleet until devices came back, forgot
every drift reference (reports then fed no monitor) and dropped every drift alarm. They sit beside the fleet's
history (:mod:`~deltaplane.serve.fleet_history`, whose row checks they share) with the same discipline: the
bounds memory keeps, typed checks on load, an unreadable row left out with a log line and counted, and writes
that join the caller's transaction so they commit with what caused them or not at all.

What each write costs matters: every device report is one synced SQLite transaction already, so nothing here
adds a transaction per report:

* ``fleet_devices``: one row per device (cohort, authenticated requests, last contact), the
  :data:`MAX_DEVICES_SEEN` most recently seen. A request is counted in memory; the devices seen since the last
  save are written *inside the next transaction the service makes anyway* (a report, an accepted upload), else
  by the running service's periodic flush (every ``ServiceConfig.flush_every_s``, 5 s, only when something
  changed: at most one sync a period, none while idle) and when the service stops cleanly, so a device that
  only downloads adds no write of its own. A crash loses at most the contacts of the last period (a restart
  then shows such a device's earlier contact). The fleet history's kept counters ride along the same way.
* ``drift_monitors``: a model's monitor (spec, reference, parameters: ``PUT .../drift-reference``, its own
  transaction) and the open window's report counts; ``drift_live``: the open window's merged summary of each
  device in it and how many reports it merges (written in the report's transaction: one row per report, never
  the whole window; a summary that cannot be read is left out with its reports, so the window's count and
  contents agree);
  ``drift_windows``: each closed window's report (the last :data:`MAX_DRIFT_HISTORY` per model), written in the
  transaction of the report that closed it. A new reference drops the model's window and history, as in memory.
* ``fleet_alerts``: the drift alerts raised, the last :data:`MAX_ALERTS` of each model, in the same transaction
  (:class:`AlertLog` in memory): a model's alerts make room only for its own newer ones.

Every row carries ``format`` 1; a row of another format, with damaged JSON or holding values of the wrong type
is refused with :class:`~deltaplane.serve.fleet_history.HistoryRowError` naming it and left out by
:meth:`FleetWatch.load`.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from deltaplane.errors import DeltaplaneError
from deltaplane.monitor import DriftMonitor, DriftReport, Summary
from deltaplane.monitor.drift import WindowSummary
from deltaplane.registry import Registry
from deltaplane.serve.fleet_history import HistoryRowError, decode_row, is_int, is_number
from deltaplane.wording import count

__all__ = ["MAX_ALERTS", "MAX_DEVICES_SEEN", "MAX_DRIFT_HISTORY", "AlertLog", "FleetWatch", "LoadedWatch"]

#: the fleet page remembers at most this many devices (the least recently seen are forgotten)
MAX_DEVICES_SEEN = 10_000
#: drift alerts kept per model (each entry is bounded: names <= 128 chars, text from the monitor); alerts come
#: only from the models an admin set a drift reference for, so all of them are bounded by the admin's choice
MAX_ALERTS = 10_000
#: closed drift windows kept per monitored model
MAX_DRIFT_HISTORY = 1_000
#: the layout of every row these tables hold
_FORMAT = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS fleet_devices (
        device TEXT PRIMARY KEY, format INTEGER NOT NULL, cohort TEXT NOT NULL, requests INTEGER NOT NULL,
        last_seen REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS fleet_devices_seen ON fleet_devices (last_seen)",
    """CREATE TABLE IF NOT EXISTS drift_monitors (
        model TEXT PRIMARY KEY, format INTEGER NOT NULL, settings TEXT NOT NULL, reports INTEGER NOT NULL,
        anonymous INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS drift_live (
        model TEXT NOT NULL, device TEXT NOT NULL, format INTEGER NOT NULL, summary TEXT NOT NULL,
        reports INTEGER, PRIMARY KEY (model, device))""",
    """CREATE TABLE IF NOT EXISTS drift_windows (
        id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL, report TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS drift_windows_model ON drift_windows (model, id)",
    """CREATE TABLE IF NOT EXISTS fleet_alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL, alert TEXT NOT NULL,
        version INTEGER NOT NULL, at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS fleet_alerts_model ON fleet_alerts (model, id)",
)

_SETTINGS = ("spec", "reference", "psi_threshold", "alpha", "window", "min_samples", "min_devices")
_SUMMARY = tuple(Summary.__dataclass_fields__)
_REPORT = ("n_reference", "n_live", "rows", "alerts", "devices")
#: a closed window's report as the service wrote it (DriftReport.to_dict)
_REPORT_CHECKS: dict[str, Any] = {
    "n_reference": is_int,
    "n_live": is_number,
    "rows": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
    "alerts": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
    "devices": is_int,
}


def _seen_at(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


class AlertLog:
    """The drift alerts the service keeps: the last :data:`MAX_ALERTS` of each model, read oldest first.

    Why per model: one log of the last 10,000 alerts of all models let one model's windows (a real drift, or
    devices colluding on its reports) push every other model's alerts out, the ones an operator had not read
    yet among them. Alerts are raised only by models an admin set a drift reference for, so the models, and
    with them the log, stay bounded.
    """

    def __init__(self, alerts: Iterable[Mapping[str, Any]] = ()) -> None:
        self._by_model: dict[str, deque[dict[str, Any]]] = {}
        self._added = 0  # the order alerts came in, across models (their times may tie)
        self.extend(alerts)

    def extend(self, alerts: Iterable[Mapping[str, Any]]) -> None:
        """Add alerts (each with its ``model``), oldest first; a model's oldest make room for its newest."""
        for a in alerts:
            kept = self._by_model.setdefault(a["model"], deque(maxlen=MAX_ALERTS))
            kept.append({**a, "_order": self._added})
            self._added += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        merged = heapq.merge(*self._by_model.values(), key=lambda a: a["_order"])
        return ({k: v for k, v in a.items() if k != "_order"} for a in merged)

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._by_model.values())

    def of(self, model: str) -> list[dict[str, Any]]:
        """``model``'s alerts, oldest first."""
        return [{k: v for k, v in a.items() if k != "_order"} for a in self._by_model.get(model, ())]


@dataclass
class LoadedWatch:
    """What :meth:`FleetWatch.load` read: devices (least recently seen first, as (device, cohort, requests,
    last seen)), monitors by model (their windows and history resumed), alerts (oldest first), and one line per
    row it refused."""

    devices: list[tuple[str, str, int, float]] = field(default_factory=list)
    monitors: dict[str, DriftMonitor] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    #: models whose monitor could not be rebuilt (its spec, reference or parameters unreadable) -> why
    unreadable_monitors: dict[str, str] = field(default_factory=dict)
    #: models whose monitor was rebuilt but whose open window's counts could not be read: it starts empty
    restarted_windows: list[str] = field(default_factory=list)
    #: models whose open window lost reports at start -> what was lost (a device's summary that could not be
    #: read, or the window's counts): the service shows it until the window closes or a reference is set
    window_losses: dict[str, str] = field(default_factory=dict)
    #: models -> the devices whose unreadable summaries were left out of the open window, and the window's
    #: report count without theirs: :meth:`FleetWatch.drop_window_rows` stores that, so a restart reads it
    dropped_rows: dict[str, tuple[list[str], int]] = field(default_factory=dict)


class FleetWatch:
    """The fleet's live tables in ``registry``'s database (created on first use). Each write joins the caller's
    :meth:`~deltaplane.registry.Registry.transaction` when there is one."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        with registry.transaction() as con:
            for stmt in _SCHEMA:
                con.execute(stmt)
            if "reports" not in {row[1] for row in con.execute("PRAGMA table_info(drift_live)")}:
                # a database from before each device's report count was kept: its rows' counts are unknown
                con.execute("ALTER TABLE drift_live ADD COLUMN reports INTEGER")

    def save_devices(self, rows: Iterable[tuple[str, str, int, float]]) -> None:
        """Upsert (device, cohort, requests, last seen) rows, keeping the :data:`MAX_DEVICES_SEEN` most recent.
        A row older than the stored one is not written: two writers whose snapshots commit out of order (the
        periodic flush and a report) leave the newer contact."""
        rows = list(rows)
        if not rows:
            return
        with self.registry.transaction() as con:
            con.executemany(
                "INSERT INTO fleet_devices (device, format, cohort, requests, last_seen) VALUES (?,?,?,?,?) "
                "ON CONFLICT (device) DO UPDATE SET format=excluded.format, cohort=excluded.cohort, "
                "requests=excluded.requests, last_seen=excluded.last_seen "
                "WHERE excluded.last_seen >= fleet_devices.last_seen",
                [(d, _FORMAT, c, int(n), float(t)) for d, c, n, t in rows],
            )
            con.execute(
                "DELETE FROM fleet_devices WHERE last_seen < (SELECT last_seen FROM fleet_devices "
                "ORDER BY last_seen DESC LIMIT 1 OFFSET ?)",
                (MAX_DEVICES_SEEN - 1,),
            )

    def set_monitor(self, model: str, monitor: DriftMonitor) -> None:
        """Store ``model``'s new monitor (empty window, no history: its earlier window and history are dropped)."""
        with self.registry.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO drift_monitors (model, format, settings, reports, anonymous) "
                "VALUES (?,?,?,0,0)",
                (model, _FORMAT, json.dumps(monitor.settings())),
            )
            con.execute("DELETE FROM drift_live WHERE model=?", (model,))
            con.execute("DELETE FROM drift_windows WHERE model=?", (model,))

    def save_settings(self, model: str, monitor: DriftMonitor) -> None:
        """Store ``model``'s monitor's settings (a version's prediction reference added), keeping its open window
        and closed windows."""
        with self.registry.transaction() as con:
            con.execute(
                "UPDATE drift_monitors SET settings=? WHERE model=?", (json.dumps(monitor.settings()), model)
            )

    def restart_window(self, model: str) -> None:
        """Empty ``model``'s stored open window (its counts and devices' summaries), keeping its monitor and
        closed windows: at start, when the window's counts could not be read (:attr:`LoadedWatch.
        restarted_windows`), so the next restart reads the window the service then holds."""
        with self.registry.transaction() as con:
            con.execute("UPDATE drift_monitors SET reports=0, anonymous=0 WHERE model=?", (model,))
            con.execute("DELETE FROM drift_live WHERE model=?", (model,))

    def drop_window_rows(self, model: str, devices: Iterable[str], reports: int) -> None:
        """Delete the unreadable summaries of ``devices`` from ``model``'s stored open window and store its
        report count without theirs (``reports``): at start (:attr:`LoadedWatch.dropped_rows`), so the next
        restart neither counts their reports again nor leaves them out a second time."""
        with self.registry.transaction() as con:
            con.executemany(
                "DELETE FROM drift_live WHERE model=? AND device=?", [(model, d) for d in devices]
            )
            con.execute("UPDATE drift_monitors SET reports=? WHERE model=?", (reports, model))

    def save_window(self, model: str, monitor: DriftMonitor, device: str, closed: DriftReport | None) -> None:
        """After ``monitor`` took a report from ``device``: that device's merged summary in the open window and
        how many reports it merges (so a summary that cannot be read at start takes its reports out of the
        window's count), or, when the report closed the window (``closed``), the window's report (pruned to
        :data:`MAX_DRIFT_HISTORY` per model) and an empty window."""
        live, reports, anonymous = monitor.live_window()
        with self.registry.transaction() as con:
            con.execute(
                "UPDATE drift_monitors SET reports=?, anonymous=? WHERE model=?", (reports, anonymous, model)
            )
            if closed is None:
                # a row from before the count was kept holds NULL, and NULL + 1 stays unknown
                con.execute(
                    "INSERT INTO drift_live (model, device, format, summary, reports) VALUES (?,?,?,?,1) "
                    "ON CONFLICT (model, device) DO UPDATE SET format=excluded.format, "
                    "summary=excluded.summary, reports=drift_live.reports + 1",
                    (model, device, _FORMAT, json.dumps(live[device].to_dict())),
                )
                return
            con.execute("DELETE FROM drift_live WHERE model=?", (model,))
            con.execute(
                "INSERT INTO drift_windows (format, model, report) VALUES (?,?,?)",
                (_FORMAT, model, json.dumps(closed.to_dict())),
            )
            con.execute(
                "DELETE FROM drift_windows WHERE model=? AND id <= "
                "(SELECT id FROM drift_windows WHERE model=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (model, model, MAX_DRIFT_HISTORY),
            )

    def add_alerts(self, alerts: Iterable[Mapping[str, Any]]) -> None:
        """Store alerts (``model``, ``alert``, ``version``, ``at``), keeping the last :data:`MAX_ALERTS` of each
        model (as :class:`AlertLog` does in memory)."""
        rows = [(_FORMAT, a["model"], a["alert"], a["version"], a["at"]) for a in alerts]
        if not rows:
            return
        with self.registry.transaction() as con:
            con.executemany(
                "INSERT INTO fleet_alerts (format, model, alert, version, at) VALUES (?,?,?,?,?)", rows
            )
            con.executemany(
                "DELETE FROM fleet_alerts WHERE model=? AND id <= "
                "(SELECT id FROM fleet_alerts WHERE model=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                [(m, m, MAX_ALERTS) for m in sorted({r[1] for r in rows})],
            )

    # -- reading back ------------------------------------------------------------------------------------
    def load(self) -> LoadedWatch:
        """Everything stored, as memory holds it; rows it cannot read are left out and listed in ``refused``."""
        out = LoadedWatch()
        for row_id, device, fmt, cohort, requests, seen in self.registry.query(
            "SELECT rowid, device, format, cohort, requests, last_seen FROM fleet_devices ORDER BY last_seen"
        ):
            where = f"fleet history row {row_id} of fleet_devices"
            if fmt != _FORMAT:
                out.refused.append(f"{where} has format {fmt}; this one reads format {_FORMAT}; left out")
            elif not (
                isinstance(device, str) and isinstance(cohort, str) and is_int(requests) and requests >= 0
            ):
                out.refused.append(f"{where} holds values of the wrong type (device {device!r}); left out")
            elif not _seen_at(seen):
                out.refused.append(
                    f"{where} holds a last contact that is not a time (device {device!r}); left out"
                )
            else:
                out.devices.append((device, cohort, int(requests), float(seen)))
        self._load_monitors(out)
        for row_id, fmt, model, alert, version, at in self.registry.query(
            "SELECT id, format, model, alert, version, at FROM fleet_alerts ORDER BY id"
        ):
            where = f"fleet history row {row_id} of fleet_alerts"
            if fmt != _FORMAT:
                out.refused.append(f"{where} has format {fmt}; this one reads format {_FORMAT}; left out")
            elif not (isinstance(model, str) and isinstance(alert, str) and is_int(version) and _seen_at(at)):
                out.refused.append(f"{where} holds values of the wrong type; left out")
            else:
                out.alerts.append({"model": model, "alert": alert, "at": float(at), "version": int(version)})
        return out

    def _load_monitors(self, out: LoadedWatch) -> None:
        """Each model's monitor with its open window and closed windows. A monitor whose settings (spec,
        reference, parameters) cannot be read is left out with its window and history, and named in
        ``unreadable_monitors`` (its reports feed nothing until a new reference is set: the service shows it);
        one whose open window's counts cannot be read keeps its reference and history and starts an empty
        window (named in ``restarted_windows``): the reports of that window are lost, not the monitor."""
        for model, fmt, text, reports, anonymous in self.registry.query(
            "SELECT model, format, settings, reports, anonymous FROM drift_monitors ORDER BY model"
        ):
            try:
                settings = decode_row("drift_monitors", model, fmt, text, _SETTINGS, checks={})
                mon = DriftMonitor.from_settings(settings)
            except (HistoryRowError, DeltaplaneError, KeyError, TypeError, ValueError) as exc:
                why = f"{exc} (the drift monitor of {model!r})"
                out.refused.append(f"{why}; left out")
                out.unreadable_monitors[model] = why
                continue
            if is_int(reports) and is_int(anonymous) and reports >= 0 and anonymous >= 0:
                self._load_window(out, model, mon, reports, anonymous)
            else:
                out.refused.append(
                    f"fleet history row {model} of drift_monitors holds bad counts ({reports!r}, {anonymous!r}) "
                    f"(the open drift window of {model!r}); its reference is kept, its open window restarted"
                )
                out.restarted_windows.append(model)
                out.window_losses[model] = (
                    "its open window's report counts could not be read at start: the window restarted empty"
                )
            self._load_history(out, model, mon)
            out.monitors[model] = mon

    def _load_window(
        self, out: LoadedWatch, model: str, mon: DriftMonitor, reports: int, anonymous: int
    ) -> None:
        """Resume ``mon``'s open window from its stored devices' summaries. A summary it cannot read is left
        out with the reports it merged, so the window's count and contents agree: its report count is taken
        out of the window's (the row and the new count are stored so at start, :attr:`LoadedWatch.dropped_rows`);
        a row whose count is unknown too (written before counts were kept, or damaged) restarts the window
        empty, as unreadable counts do. Either way the loss is named in :attr:`LoadedWatch.window_losses`."""
        live: dict[str, Summary] = {}
        counts: dict[
            str, int
        ] = {}  # reports each device merged, where known (see DriftMonitor.resume_window)
        dropped: list[str] = []
        lost: int | None = 0  # None: some left-out row's report count is unknown
        for device, fmt, text, held in self.registry.query(
            "SELECT device, format, summary, reports FROM drift_live WHERE model=? ORDER BY device", (model,)
        ):
            try:
                data = decode_row("drift_live", device, fmt, text, (), checks={})
                # a report that named its model version holds its predictions per version
                summary = WindowSummary.from_dict(data) if "version_predictions" in data else Summary(**data)
                summary.validate(mon.spec)
            except (HistoryRowError, DeltaplaneError, TypeError, ValueError) as exc:
                out.refused.append(f"{exc} (the open drift window of {model!r}); left out")
                dropped.append(device)
                lost = lost + int(held) if lost is not None and is_int(held) and held >= 1 else None
                continue
            live[device] = summary
            if is_int(held) and held >= 1:
                counts[device] = int(held)
        if not dropped:
            mon.resume_window(live, reports, anonymous, counts)
            return
        if lost is None or lost > reports:
            out.restarted_windows.append(model)
            out.window_losses[model] = (
                f"{count(len(dropped), 'device summary', 'device summaries')} of its open window could not be "
                "read at start, with reports it could not count: the window restarted empty"
            )
            return
        mon.resume_window(live, reports - lost, anonymous, counts)
        out.dropped_rows[model] = (dropped, reports - lost)
        out.window_losses[model] = (
            f"{count(len(dropped), 'device summary', 'device summaries')} of its open window could not be read "
            f"at start and {'was' if len(dropped) == 1 else 'were'} left out with {count(lost, 'report')}: "
            f"the window holds {count(reports - lost, 'report')}"
        )

    def _load_history(self, out: LoadedWatch, model: str, mon: DriftMonitor) -> None:
        """``mon``'s closed windows, oldest first (a row it cannot read is left out)."""
        for row_id, fmt, text in self.registry.query(
            "SELECT id, format, report FROM drift_windows WHERE model=? ORDER BY id", (model,)
        ):
            try:
                data = decode_row("drift_windows", row_id, fmt, text, _REPORT, checks=_REPORT_CHECKS)
            except HistoryRowError as exc:
                out.refused.append(f"{exc} (a drift window of {model!r}); left out")
                continue
            mon.history.append(DriftReport(**{k: data[k] for k in _REPORT}))

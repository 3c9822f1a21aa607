"""What the service watches survives a restart: the devices seen, the drift monitors with their open and closed
windows, the drift alerts, and the upload counts since the last close; unreadable rows are left out, the tables
keep memory's bounds, and a crash inside a report's transaction leaves none of its writes. Also: an abort's
reason in the round's status, and ``GET /admin/rounds/closed``'s outcome and limit filters."""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deltaplane.monitor import DriftSpec, summarize
from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig
from deltaplane.serve.client import DeviceClient, ServiceError

from .conftest import ADMIN, Service
from .test_rounds import payload, restart

BEARER = {"Authorization": f"Bearer {ADMIN}"}
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(reg: Registry, table: str) -> int:
    return int(reg.query(f"SELECT COUNT(*) FROM {table}")[0][0])


def _monitored(svc, window: int = 2, model: str = "cnn"):
    """A drift reference on ``model`` (window reports per window, one device enough) and two summaries: one like
    the reference, one shifted far enough that every feature alerts."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 3))
    spec = DriftSpec.fit(ref)
    svc.admin.set_drift_reference(
        model, spec.to_dict(), summarize(spec, ref).to_dict(), window=window, min_devices=1
    )
    same = summarize(spec, rng.normal(size=(500, 3))).to_dict()
    shifted = summarize(spec, rng.normal(size=(500, 3)) + 3.0).to_dict()
    return same, shifted


def _watch(svc) -> dict:
    snap = svc.state.fleet_snapshot()
    return {k: snap[k] for k in ("devices", "drift", "alerts")}


def test_a_restarted_service_shows_its_devices_drift_and_alerts(tmp_path) -> None:
    """The devices seen, each closed drift window, the alerts and the open window were in memory only: a restart
    showed an empty fleet and no alarm, and the drift reference was gone. They read the same after a restart, on
    the admin API and the Fleet page, and the open window goes on where it was."""
    svc = Service(tmp_path / "home")
    same, shifted = _monitored(svc)
    d0, d1, d2 = (svc.device(f"d{i}", "eu") for i in range(3))
    d0.report("cnn", version=1, summary=shifted)
    closed = d1.report("cnn", version=1, summary=shifted)
    assert closed["drift_evaluated"] and closed["alerts"]
    d2.report("cnn", version=1, summary=same)  # opens the next window
    before = _watch(svc)
    alerts = svc.admin._get("/admin/alerts")
    assert [d["device"] for d in before["devices"]] == ["d2", "d1", "d0"] and len(alerts) == 3

    restart(svc)
    assert _watch(svc) == before  # every field: requests, last contact, the windows' rows and alerts
    assert svc.admin._get("/admin/alerts") == alerts
    page = svc.http.get("/ui/fleet", headers=BEARER).text
    devices = page.split('id="devices"')[1].split("</table>")[0]
    assert all(f"<td>d{i}</td><td>eu</td>" in devices for i in range(3))
    shown = page.split('id="alerts"')[1].split("</table>")[0]
    assert alerts[0]["alert"].split(":")[0] in shown and shown.count("<tr>") == 4  # head and 3 alerts

    # the open window held d2's report: one more closes it (window 2), without drift
    after = svc.device("d0", "eu").report("cnn", version=1, summary=same)
    assert after["drift_evaluated"] and after["alerts"] == []
    assert len(svc.admin._get("/admin/models/cnn/drift")) == 2
    assert svc.state.fleet_snapshot()["devices"][0]["requests"] == 2  # d0: counted on from its kept count


def test_a_clean_stop_saves_the_contacts_no_write_carried(tmp_path) -> None:
    """A device that only downloads adds no disk write: its contact is saved with the next report or upload,
    or when the service stops cleanly (the app's shutdown), so an upgrade forgets no device."""
    svc = Service(tmp_path / "home")
    svc.state.flush_every_s = 3600  # the periodic flush would save it too: here, only the stop does
    with TestClient(svc.app):
        svc.device("reader").fetch("cnn", channel="production")
        assert _rows(svc.reg, "fleet_devices") == 0  # no write of its own
    restart(svc)
    (seen,) = svc.state.fleet_snapshot()["devices"]
    assert (seen["device"], seen["requests"]) == ("reader", 1)


def test_upload_counts_survive_a_crash_before_the_close(tmp_path) -> None:
    """Accepted uploads were counted on disk only at each close: a crash lost them. Each is now saved in its
    upload's transaction (with the devices seen since the last save); refusals ride along with the next."""
    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {TESTS!r})
        from serve.conftest import Service
        from serve.test_rounds import payload
        svc = Service({str(home)!r})
        svc.admin.open_round("cnn")
        try:
            svc.device("bad").upload("cnn", 1, b"not a delta", num_examples=1)
        except Exception:
            pass
        for i in range(2):
            svc.device(f"d{{i}}").upload("cnn", 1, payload(svc, i), num_examples=1)
        os._exit(17)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32)
    svc = restart(SimpleNamespace(reg=Registry(home), config=config))
    snap = svc.app.state.deltaplane.fleet_snapshot()
    assert snap["uploads"]["accepted"] == 2 and snap["uploads"]["DecodeError"] == 1
    assert {d["device"] for d in snap["devices"]} == {"bad", "d0", "d1"}


_CRASH = """
import os, sys
sys.path.insert(0, {tests!r})
import numpy as np
from serve.conftest import Service
from serve.test_fleet_watch import _monitored
from deltaplane.serve import fleet_watch

svc = Service({home!r})
same, shifted = _monitored(svc, window=2)
svc.device("d0").report("cnn", version=1, summary=shifted)
real = fleet_watch.FleetWatch.add_alerts

def crash(self, *args, **kwargs):
    real(self, *args, **kwargs)  # the report, the closed window and its alerts are written: die before the commit
    os._exit(17)

fleet_watch.FleetWatch.add_alerts = crash
svc.device("d1").report("cnn", version=1, summary=shifted)
"""


def test_a_crash_inside_a_report_leaves_none_of_its_writes(tmp_path) -> None:
    """A process killed after the report closing a window wrote the report, the window and its alerts, before
    the commit: after the restart none of them is there, the window still holds the first report, and sending
    the report again closes it as it would have."""
    home = tmp_path / "home"
    script = textwrap.dedent(_CRASH).format(tests=TESTS, home=str(home))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    reg = Registry(home)
    assert [_rows(reg, t) for t in ("fleet_reports", "drift_live", "drift_windows", "fleet_alerts")] == [
        1,
        1,
        0,
        0,
    ]
    reg.close()
    config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32)
    svc = restart(SimpleNamespace(reg=Registry(home), config=config))
    assert svc.admin._get("/admin/models/cnn/drift") == [] and svc.admin._get("/admin/alerts") == []
    token = svc.admin.issue_token("d1", "default")
    d1 = DeviceClient("http://testserver", token, verifier=svc.reg.verifier, client=svc.http)
    _, shifted = _monitored_summaries()
    again = d1.report("cnn", version=1, summary=shifted)
    assert again["drift_evaluated"] and len(again["alerts"]) == 3
    assert [d["device"] for d in svc.app.state.deltaplane.fleet_snapshot()["devices"]] == ["d1", "d0"]


def _monitored_summaries():
    """The summaries :func:`_monitored` makes, without setting a reference (same generator, same draws)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 3))
    spec = DriftSpec.fit(ref)
    return summarize(spec, rng.normal(size=(500, 3))).to_dict(), summarize(
        spec, rng.normal(size=(500, 3)) + 3.0
    ).to_dict()


def test_a_failed_report_write_puts_the_window_back(tmp_path, monkeypatch) -> None:
    """The monitor takes the report in memory as its rows are written: a write that fails (a full disk) puts
    the window back as it was, so memory and the database agree and a retry is counted once."""
    from deltaplane.serve.fleet_watch import FleetWatch  # here: the old source's tests fail one by one

    svc = Service(tmp_path / "home")
    _, shifted = _monitored(svc, window=2)
    svc.device("d0").report("cnn", version=1, summary=shifted)

    def full(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(FleetWatch, "add_alerts", full)
    with pytest.raises(OSError, match="disk full"):
        svc.device("d1").report("cnn", version=1, summary=shifted)
    assert svc.state.monitors["cnn"].live_window()[1] == 1 and svc.state.monitors["cnn"].history == []
    monkeypatch.undo()
    assert svc.device("d1").report("cnn", version=1, summary=shifted)["drift_evaluated"]
    restart(svc)
    assert len(svc.admin._get("/admin/models/cnn/drift")) == 1 and len(svc.admin._get("/admin/alerts")) == 3


def test_unreadable_or_forged_rows_are_left_out_with_a_message(tmp_path, caplog) -> None:
    """A row of another format, damaged, or holding values the service never writes (a forged summary with
    negative counts, a device's request count as text) is left out with a line naming it and counted; the
    service starts and shows the rest."""
    svc = Service(tmp_path / "home")
    same, shifted = _monitored(svc, window=3)
    for i in range(3):
        svc.device(f"d{i}").report("cnn", version=1, summary=shifted)
    svc.device("d3").report("cnn", version=1, summary=same)
    svc.device("d4").report("cnn", version=1, summary=same)
    with svc.reg.transaction() as con:
        con.execute("UPDATE fleet_devices SET requests='many' WHERE device='d0'")
        con.execute("UPDATE fleet_devices SET format=2 WHERE device='d1'")
        con.execute("UPDATE fleet_alerts SET version='v1' WHERE id=(SELECT MIN(id) FROM fleet_alerts)")
        con.execute(
            "UPDATE drift_live SET summary=json_set(summary, '$.n', -5) WHERE device='d3'"
        )  # a forged count
        con.execute("INSERT INTO drift_monitors VALUES ('other', 1, '{\"spec\": ', 0, 0)")
    with caplog.at_level(logging.WARNING, logger="deltaplane.serve.app"):
        restart(svc)
    snap = svc.state.fleet_snapshot()
    assert [d["device"] for d in snap["devices"]] == ["d4", "d3", "d2"]
    assert len(snap["alerts"]) == 2 and set(svc.state.monitors) == {"cnn"}
    assert list(svc.state.monitors["cnn"].live_window()[0]) == ["d4"]
    assert svc.admin.stats()["counters"]["errors.history_unreadable"] == 5
    for said in ("fleet_devices holds values of the wrong type (device 'd0')", "has format 2", "fleet_alerts",
                 "the open drift window of 'cnn'", "the drift monitor of 'other'"):  # fmt: skip
        assert said in caplog.text


def test_the_watch_keeps_the_memorys_bounds(tmp_path, monkeypatch) -> None:
    """The most recently seen MAX_DEVICES_SEEN devices, the last MAX_DRIFT_HISTORY windows per model and the last
    MAX_ALERTS alerts, in the database as in memory; a new reference drops the model's window and history."""
    from deltaplane.serve import fleet_watch

    monkeypatch.setattr(fleet_watch, "MAX_DEVICES_SEEN", 3)
    monkeypatch.setattr(fleet_watch, "MAX_DRIFT_HISTORY", 2)
    monkeypatch.setattr(fleet_watch, "MAX_ALERTS", 4)
    svc = Service(tmp_path / "home")
    watch = fleet_watch.FleetWatch(svc.reg)
    watch.save_devices([(f"d{i}", "eu", i + 1, 100.0 + i) for i in range(5)])
    watch.save_devices([("d0", "eu", 9, 200.0)])  # seen again: the most recent
    assert [d[0] for d in watch.load().devices] == ["d3", "d4", "d0"]
    watch.add_alerts([{"model": "cnn", "alert": f"a{i}", "version": 1, "at": 1.0 * i} for i in range(6)])
    assert [a["alert"] for a in watch.load().alerts] == ["a2", "a3", "a4", "a5"]

    _, shifted = _monitored(svc, window=1)
    for i in range(4):
        svc.device(f"r{i}").report("cnn", version=1, summary=shifted)
    assert _rows(svc.reg, "drift_windows") == 2 and len(watch.load().monitors["cnn"].history) == 2
    _monitored(svc, window=1)
    assert _rows(svc.reg, "drift_windows") == 0 and _rows(svc.reg, "drift_live") == 0


def test_an_aborted_rounds_status_says_why(tmp_path) -> None:
    """The reason of an abort was on the Fleet page only: the round's own status (what an operator reads back)
    now keeps it too, bounded, after a restart as well."""
    svc = Service(tmp_path / "home")
    svc.admin.open_round("cnn")
    svc.admin.abort_round("cnn", 1, reason="devices  offline\nfor the night " + "x" * 1500)
    restart(svc)
    status = svc.admin.round_status("cnn", 1)
    assert status["state"] == "aborted" and status["reason"].startswith("devices offline for the night xx")
    assert len(status["reason"]) == 500 and status["reason"].endswith("…")
    svc.admin.open_round("cnn")
    assert svc.admin.round_status("cnn", 2)["reason"] is None


def test_closed_rounds_filters_by_outcome_and_limit(tmp_path) -> None:
    """``?outcome=published|aborted|lost`` keeps the rounds that ended so, ``?limit=`` the newest of each list
    (up to the 200 kept); anything else is refused with a message saying what is taken."""
    svc = Service(tmp_path / "home")
    for n in range(1, 5):
        svc.admin.open_round("cnn")
        if n % 2:
            svc.admin.abort_round("cnn", n, reason=f"why {n}")
        else:
            svc.admin.close_round("cnn", n)
    get = svc.admin._get
    aborted = get("/admin/rounds/closed", outcome="aborted")
    assert aborted["closed_rounds"] == [] and [r["round"] for r in aborted["unpublished_rounds"]] == [3, 1]
    assert aborted["unpublished_rounds"][0]["reason"] == "why 3"
    assert get("/admin/rounds/closed", outcome="lost")["unpublished_rounds"] == []
    published = get("/admin/rounds/closed", outcome="published", limit=1)
    assert [r["round"] for r in published["closed_rounds"]] == [4] and published["unpublished_rounds"] == []
    assert [r["round"] for r in svc.admin.unpublished_rounds(limit=1)] == [3]
    for bad in ({"outcome": "failed"}, {"limit": 0}, {"limit": 201}):
        with pytest.raises(ServiceError) as e:
            get("/admin/rounds/closed", **bad)
        assert e.value.status == 422
    with pytest.raises(ServiceError, match="outcome: Input should be 'published', 'aborted' or 'lost'"):
        get("/admin/rounds/closed", outcome="failed")


def test_a_secagg_rounds_status_says_why_it_ended_unpublished(tmp_path) -> None:
    """A SecAgg round's admin status said ``finished: aborted`` or ``lost`` but not why: it keeps the reason,
    in this process and, from the store, after a restart (where an open round becomes lost, saying so)."""
    from .test_secagg_http import _walk

    svc = Service(tmp_path / "home")
    aborted, _ = _walk(svc, ["a", "b", "c"], stages=("advertise",))
    svc.admin.abort_secagg("cnn", aborted, reason="two devices went offline")
    assert svc.admin.secagg_status("cnn", aborted)["reason"] == "two devices went offline"
    lost = svc.admin.open_secagg("cnn", ["a", "b", "c"], weight_scale=0)["round"]
    restart(svc)
    assert svc.admin.secagg_status("cnn", aborted)["reason"] == "two devices went offline"
    status = svc.admin.secagg_status("cnn", lost)
    assert status["finished"] == "lost" and status["reason"].startswith(
        "lost: the service stopped while the round was open"
    )


def test_concurrent_reports_and_uploads_keep_memory_and_database_in_step(tmp_path) -> None:
    """Reports (drift windows written in their transaction) and uploads (counts written in theirs) at once: none
    waits on the other's locks in the opposite order, every report lands in exactly one window, and a restart
    reads back the windows and the open window memory held."""
    import threading

    svc = Service(tmp_path / "home")
    same, _ = _monitored(svc, window=5)
    svc.admin.open_round("cnn")
    reporters = [svc.device(f"r{i}") for i in range(4)]
    uploads = [(svc.device(f"u{i}"), payload(svc, i)) for i in range(4)]
    errors: list[BaseException] = []

    def run(fn) -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(
            target=run, args=(lambda d=d: [d.report("cnn", version=1, summary=same) for _ in range(6)],)
        )
        for d in reporters
    ] + [
        threading.Thread(target=run, args=(lambda d=d, p=p: d.upload("cnn", 1, p, num_examples=1),))
        for d, p in uploads
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    mon = svc.state.monitors["cnn"]
    live, reports, _ = mon.live_window()
    assert len(mon.history) * 5 + reports == 24
    before = (_watch(svc), sorted(live))
    restart(svc)
    mon = svc.state.monitors["cnn"]
    assert (_watch(svc), sorted(mon.live_window()[0])) == before and mon.live_window()[1] == reports
    assert svc.state.fleet_snapshot()["uploads"]["accepted"] == 4


def _secagg_traffic(svc) -> None:
    """Three masked inputs of an open SecAgg round, one key advertisement sent again after its stage closed
    (refused: 409, ``secagg.refused_order``), a refused plain upload (``rejected.NotFound``: no round open) and
    a device that only downloads: none of it writes to the database."""
    from deltaplane.serve.secagg_client import SecAggDevice

    from .test_secagg_http import _walk

    sent: dict = {}
    real = SecAggDevice.post

    def keep(self, what, body):
        sent.setdefault((self.client_id, what), body)
        real(self, what, body)

    SecAggDevice.post = keep
    try:
        _, devs = _walk(svc, ["a", "b", "c"], stages=("advertise", "share", "upload"))
    finally:
        SecAggDevice.post = real
    with pytest.raises(ServiceError) as exc:
        devs[0].post("keys", sent[(0, "keys")])
    assert exc.value.status == 409
    with pytest.raises(ServiceError):
        svc.device("bad").upload("cnn", 1, b"x", num_examples=1)
    svc.device("reader").fetch("cnn", channel="production")


_WATCHED = {"accepted_secagg_masked": 3, "secagg_refused_order": 1, "NotFound": 1}


def _watched(snap) -> dict:
    return {k: snap["uploads"].get(k) for k in _WATCHED}


def test_a_report_carries_the_counts_and_contacts_no_write_carried(tmp_path) -> None:
    """Refused uploads and SecAgg messages and accepted masked inputs were counted on disk only at the next
    close, abort or accepted plain upload (a SecAgg federation makes none of the latter until its round closes),
    and a report did not carry them: a crash lost them. A report now writes them in its transaction."""
    svc = Service(tmp_path / "home")
    _secagg_traffic(svc)
    svc.device("r").report("cnn", version=1)
    restart(svc)  # no clean stop: what reached the disk is what the report's transaction wrote
    snap = svc.state.fleet_snapshot()
    assert _watched(snap) == _WATCHED
    assert {d["device"] for d in snap["devices"]} == {"a", "b", "c", "bad", "reader", "r"}


_FLUSHED = """
import os, sys, time
sys.path.insert(0, {tests!r})
from fastapi.testclient import TestClient
from serve.conftest import Service
from serve.test_fleet_watch import _secagg_traffic

svc = Service({home!r})
svc.state.flush_every_s = 0.05
with TestClient(svc.app):  # the app's lifespan runs: its periodic flush
    _secagg_traffic(svc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not svc.reg.query(
        "SELECT 1 FROM fleet_counters WHERE name='secagg.refused_order'"
    ):
        time.sleep(0.05)
    time.sleep(0.2)
    os._exit(17)  # killed: no clean stop
"""


def test_a_crash_keeps_what_the_periodic_flush_wrote(tmp_path) -> None:
    """A device that only downloads, a refused upload or SecAgg message and a masked input reached the disk
    only with a later write or a clean stop: a service killed meanwhile forgot them. The running service now
    writes them every ``flush_every_s`` in a transaction of its own, so a crash loses at most that period."""
    home = tmp_path / "home"
    script = textwrap.dedent(_FLUSHED).format(tests=TESTS, home=str(home))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32)
    svc = restart(SimpleNamespace(reg=Registry(home), config=config))
    snap = svc.app.state.deltaplane.fleet_snapshot()
    assert _watched(snap) == _WATCHED
    assert {d["device"] for d in snap["devices"]} == {"a", "b", "c", "bad", "reader"}


def test_the_flush_writes_only_what_changed(tmp_path, monkeypatch) -> None:
    """The periodic flush opens a transaction (a sync) only when a contact or a kept count changed since the
    last write that carried them: none when idle, none after a report that carried everything."""
    svc = Service(tmp_path / "home")
    state = svc.state
    reader, r = svc.device("reader"), svc.device("r")  # tokens issued first: their own writes
    txns = []
    real = type(svc.reg).transaction

    def counted(self):
        if not getattr(self._local, "depth", 0):  # the outermost: a commit, a sync; nested ones join it
            txns.append(1)
        return real(self)

    monkeypatch.setattr(type(svc.reg), "transaction", counted)
    reader.fetch("cnn", channel="production")
    txns.clear()
    assert state.flush_watch() and len(txns) == 1
    assert not state.flush_watch() and len(txns) == 1  # idle: nothing written
    r.report("cnn", version=1)
    txns.clear()
    assert not state.flush_watch() and txns == []  # the report's transaction carried its contact
    with pytest.raises(ServiceError):
        r.upload("cnn", 1, b"x", num_examples=1)  # a refusal: a count, and a contact
    txns.clear()
    assert state.flush_watch() and len(txns) == 1


def _counting_transactions(svc, monkeypatch) -> list[int]:
    """One entry per outermost registry transaction (a commit, a sync) from now on; nested ones join it."""
    txns: list[int] = []
    real = type(svc.reg).transaction

    def counted(self):
        if not getattr(self._local, "depth", 0):
            txns.append(1)
        return real(self)

    monkeypatch.setattr(type(svc.reg), "transaction", counted)
    return txns


def test_a_close_or_an_abort_leaves_the_flush_nothing_to_write(tmp_path, monkeypatch) -> None:
    """A close and an abort save the kept counters in their own transaction, but did not tell the periodic
    flush, so each was followed by one more transaction writing the same counts. Now the flush sees them saved."""
    svc = Service(tmp_path / "home")
    state = svc.state
    d0, d1 = svc.device("d0"), svc.device("d1")
    for close in (False, True):  # the abort first: a close publishes v2, and payload() deltas v1
        number = svc.admin.open_round("cnn")["round"]
        d0.upload("cnn", number, payload(svc, int(close)), num_examples=1)  # another update: no replay
        with pytest.raises(ServiceError):
            d1.upload("cnn", number, b"x", num_examples=1)  # a refusal: a kept count no upload carried
        assert state.flush_watch()  # the contacts and the refusal: saved now, so only the close's remain
        with pytest.raises(ServiceError):
            d1.upload("cnn", number, b"x", num_examples=1)  # counted in memory only
        state.unsaved.clear()  # the contact aside: the counters are what the close or abort carries
        txns = _counting_transactions(svc, monkeypatch)
        if close:
            svc.admin.close_round("cnn", number)
        else:
            svc.admin.abort_round("cnn", number)
        assert txns == [1]  # the close's or abort's own
        assert not state.flush_watch() and txns == [1], "close" if close else "abort"  # before: a second
        monkeypatch.undo()
    stored = dict(svc.reg.query("SELECT name, value FROM fleet_counters"))
    assert stored["rejected.DecodeError"] == state.counters["rejected.DecodeError"] == 4


def test_an_unreadable_monitor_keeps_what_it_can_and_says_so(tmp_path) -> None:
    """A drift monitor whose row could not be read was dropped at start with a log line only: its reports fed
    nothing, and the Fleet page and ``GET .../drift`` read as if no reference had ever been set. Now a row whose
    open window's counts are unreadable keeps its reference and closed windows and restarts the window (stored
    so); one whose reference is unreadable is named on the Fleet page, in ``/admin/stats`` and by a 409 on
    ``GET .../drift`` until the reference is set again."""
    from .conftest import cnn_state

    svc = Service(tmp_path / "home")
    _, shifted = _monitored(svc, window=2)
    svc.reg.register_model("other", cnn_state(1))
    for i in range(3):  # one closed window (alerting), one report in the open window
        svc.device(f"d{i}").report("cnn", version=1, summary=shifted)
    _monitored(svc, model="other")
    with svc.reg.transaction() as con:
        con.execute("UPDATE drift_monitors SET reports='two' WHERE model='cnn'")
        con.execute("UPDATE drift_monitors SET settings='{\"spec\": ' WHERE model='other'")
    restart(svc)

    mon = svc.state.monitors["cnn"]
    assert len(mon.history) == 1 and mon.live_window()[1] == 0
    # stored so: the next restart reads the window the service holds, not the unreadable counts
    assert _rows(svc.reg, "drift_monitors WHERE model='cnn' AND reports=0") == 1
    assert _rows(svc.reg, "drift_live WHERE model='cnn'") == 0
    for i in range(2):  # the restarted window closes after two more reports, on the kept reference
        last = svc.device(f"e{i}").report("cnn", version=1, summary=shifted)
    assert last["drift_evaluated"] and len(last["alerts"]) == 3
    assert len(svc.admin._get("/admin/models/cnn/drift")) == 2

    with pytest.raises(ServiceError) as exc:
        svc.admin._get("/admin/models/other/drift")
    assert exc.value.status == 409 and "could not be read at start" in exc.value.detail
    assert "drift_monitors" in svc.admin.stats()["drift_unreadable"]["other"]
    page = svc.http.get("/ui/fleet", headers=BEARER).text
    shown = page.split("data-field='drift-unreadable'")[1].split("</p>")[0]
    assert "could not be read at start" in shown and "/admin/models/other/drift-reference" in shown
    _monitored(svc, model="other")
    assert svc.admin._get("/admin/models/other/drift") == []
    assert "drift-unreadable" not in svc.http.get("/ui/fleet", headers=BEARER).text


def test_an_unreadable_window_row_takes_its_reports_out_of_the_count(tmp_path) -> None:
    """A device's summary in the open drift window that could not be read was left out while the window's count
    still held its reports: the window closed early, on fewer reports than it counted, and nothing but a log
    line said so. Now its reports leave the count with it (stored so: a second restart counts the same), and
    the Fleet page and ``/admin/stats`` say what the window lost until it closes."""
    svc = Service(tmp_path / "home")
    same, _ = _monitored(svc, window=4)
    d0, d1 = svc.device("d0"), svc.device("d1")
    for dev in (d0, d0, d1):  # three reports, two of them merged in d0's summary
        assert not dev.report("cnn", version=1, summary=same)["drift_evaluated"]
    with svc.reg.transaction() as con:
        con.execute("UPDATE drift_live SET summary='{\"n\": ' WHERE device='d0'")
    restart(svc)

    live, reports, _ = svc.state.monitors["cnn"].live_window()
    assert list(live) == ["d1"] and reports == 1  # before: d1's summary alone, counted as 3 reports
    why = svc.admin.stats()["drift_window_losses"]["cnn"]
    assert (
        why
        == "1 device summary of its open window could not be read at start and was left out with 2 reports: the window holds 1 report"
    )
    page = svc.http.get("/ui/fleet", headers=BEARER).text
    assert "data-field='drift-window-loss'>cnn: 1 device summary" in page
    restart(svc)  # stored so: the row is gone and the count is the window's
    assert svc.state.monitors["cnn"].live_window()[1] == 1
    assert [tuple(r) for r in svc.reg.query("SELECT device FROM drift_live")] == [("d1",)]
    e = [svc.device(f"e{i}") for i in range(3)]
    assert not e[0].report("cnn", version=1, summary=same)["drift_evaluated"]  # before: closed here, on 2
    assert not e[1].report("cnn", version=1, summary=same)["drift_evaluated"]
    assert e[2].report("cnn", version=1, summary=same)["drift_evaluated"]  # four reports: d1, e0, e1, e2
    assert svc.admin._get("/admin/models/cnn/drift")[-1]["devices"] == 4
    assert "cnn" not in svc.admin.stats()["drift_window_losses"]


def test_an_unreadable_window_row_of_unknown_count_restarts_the_window(tmp_path) -> None:
    """A summary written before each row's report count was kept (or whose count is damaged) that cannot be
    read leaves a count that cannot be corrected: the window restarts empty, as with unreadable counts, and
    says so."""
    svc = Service(tmp_path / "home")
    same, _ = _monitored(svc, window=4)
    for name in ("d0", "d1"):
        svc.device(name).report("cnn", version=1, summary=same)
    with svc.reg.transaction() as con:
        con.execute("UPDATE drift_live SET summary='[]', reports=NULL WHERE device='d0'")
    restart(svc)
    assert svc.state.monitors["cnn"].live_window()[:2] == ({}, 0)
    assert _rows(svc.reg, "drift_live") == 0
    assert "restarted empty" in svc.state.fleet_snapshot()["drift_window_losses"]["cnn"]


def test_the_periodic_flush_survives_an_unexpected_error(tmp_path, monkeypatch) -> None:
    """Only a database error was caught around the periodic flush: any other exception (a bug, a value the
    watch could not encode) ended its task for good, silently, and no later period saved anything. Now the
    error is logged and counted, and the next period tries again."""
    svc = Service(tmp_path / "home")
    state = svc.state
    state.flush_every_s = 0.02
    calls = []

    def failing_once() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("an unexpected failure")
        return False

    monkeypatch.setattr(state, "flush_watch", failing_once)
    errors = state.counters["errors.database"]
    with TestClient(svc.app):
        deadline = time.monotonic() + 20
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(calls) >= 3  # the periodic flush went on after the failure (the clean stop adds one more)
    assert state.counters["errors.database"] == errors + 1


def test_a_stale_snapshot_committed_last_never_lowers_what_is_stored(tmp_path) -> None:
    """The periodic flush takes its snapshot under the lock and writes it outside: a report or another flush may
    commit a newer one in between. The stale one, committed last, must not lower a kept count or set a device's
    contact back (counters upserted with max(), device rows only by a newer last contact)."""
    svc = Service(tmp_path / "home")
    state = svc.state
    reader, r = svc.device("reader"), svc.device("r")
    reader.fetch("cnn", channel="production")
    with pytest.raises(ServiceError):
        r.upload("cnn", 1, b"x", num_examples=1)  # a refusal: a kept count
    with state.lock:
        stale = state._unsaved()  # the flush's snapshot ...
    reader.fetch("cnn", channel="production")
    with pytest.raises(ServiceError):
        r.upload("cnn", 1, b"x", num_examples=1)
    assert state.flush_watch()  # ... a newer one commits first ...
    with state.registry.transaction():
        state._save_unsaved(*stale)  # ... then the stale one
    rejected = {k: v for k, v in state.counters.items() if k.startswith("rejected.")}
    assert sum(rejected.values()) == 2
    restart(svc)
    devices = {d["device"]: d["requests"] for d in svc.state.fleet_snapshot()["devices"]}
    assert devices["reader"] == 2
    assert {k: v for k, v in svc.state.counters.items() if k.startswith("rejected.")} == rejected


def test_a_clean_stop_waits_for_the_periodic_flush_under_way(tmp_path, monkeypatch) -> None:
    """The stop cancelled the periodic flush's task, which returns at once while the flush's worker thread goes
    on: the stop's last flush then ran beside it (two transactions saving the same contacts and counts). The
    task is stopped by an event now, and the stop awaits a flush under way before the last one."""
    svc = Service(tmp_path / "home")
    state = svc.state
    state.flush_every_s = 0.02
    running, most, order = [0], [0], []
    lock, started, release = threading.Lock(), threading.Event(), threading.Event()

    def slow_first() -> bool:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            order.append("start")
        if not started.is_set():
            started.set()
            release.wait(20)  # the periodic flush is under way when the service stops
        with lock:
            running[0] -= 1
            order.append("end")
        return False

    monkeypatch.setattr(state, "flush_watch", slow_first)
    with TestClient(svc.app):
        assert started.wait(20)
        threading.Timer(0.5, release.set).start()
    release.wait(20)  # before the fix the stop returned first: let the in-flight flush end before asserting
    time.sleep(0.05)
    assert most[0] == 1, order  # before: 2 (the last flush ran beside the periodic one)
    assert order == ["start", "end", "start", "end"], order


def test_prediction_references_and_a_windows_versioned_predictions_survive_a_restart(tmp_path) -> None:
    svc = Service(tmp_path / "home")
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 2))
    spec = DriftSpec.fit(ref, n_classes=3)
    svc.admin.set_drift_reference(
        "cnn", spec.to_dict(), summarize(spec, ref).to_dict(), window=2, min_devices=1
    )
    svc.device("d0").report("cnn", version=1, summary=summarize(spec, ref[:300], np.full(300, 2)).to_dict())
    svc.admin.set_prediction_reference("cnn", 1, [2000, 0, 0])  # registered while the window is open: kept
    restart(svc)
    mon = svc.state.monitors["cnn"]
    assert mon.prediction_references == {1: [2000, 0, 0]}
    assert mon.live_window()[0]["d0"].version_predictions == {1: [0, 0, 300]}
    out = svc.device("d1").report(
        "cnn", version=1, summary=summarize(spec, ref[300:600], np.full(300, 2)).to_dict()
    )
    (row,) = [r for r in svc.admin._get("/admin/models/cnn/drift")[-1]["rows"] if r["kind"] == "prediction"]
    # both devices' predictions moved (one device's alone raises nothing: an alert must hold without it)
    assert row["n"] == 600 and row["devices"] == 2 and out["alerts"]

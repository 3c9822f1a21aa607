"""Rounds that end without publishing are on the Fleet page and in ``GET /admin/rounds/closed``, durably.

A newcomer's walk found aborted and failed rounds reported by the coordinator's terminal only: a plain round no
device uploaded to, a SecAgg round aborted at key advertisement with 2 of 3 devices, a close refused. Each is
now recorded with the abort (or, for a SecAgg round a restart lost, with the start), in the same transaction,
with its kind, number, devices invited and taking part, and why; a restart keeps them, and a database from
before (no ``outcome`` column) still loads."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig, fleet, fleet_history
from deltaplane.serve.client import ServiceError
from deltaplane.serve.fleet_history import FleetHistory
from deltaplane.serve.secagg_client import SecAggDevice

from .conftest import ADMIN
from .test_fleet import ADMIN as FLEET_ADMIN
from .test_fleet import MODEL, Fleet, _config, _threads
from .test_rounds import payload, restart
from .test_secagg_http import _deltas

BEARER = {"Authorization": f"Bearer {ADMIN}"}


def _fleet_page(f: Fleet) -> str:
    """The Fleet page of ``f``'s service, as an operator's browser gets it (over TLS)."""
    return httpx.get(
        f.url + "/ui/fleet", headers={"Authorization": f"Bearer {FLEET_ADMIN}"}, verify=f.ctx
    ).text


def _row(page: str, table: str) -> str:
    """The HTML of ``table`` (its id) on a page."""
    assert f'id="{table}"' in page, page[:2000]
    start = page.index(f'id="{table}"')
    return page[start : page.index("</table>", start)]


def test_a_plain_round_nobody_uploaded_to_is_shown_aborted_after_a_restart(byo_task, tmp_path) -> None:
    """``fleet coordinate`` aborts a plain round no device uploaded to: the Fleet page listed nothing (the
    terminal said it failed). It is now an "ended without publishing" row naming why, after a restart too."""
    cfg = _config(byo_task)
    with Fleet(tmp_path, cfg) as f:
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=0.3, poll=0.05, drift=False)
        assert out[0].version is None and f.admin.round_status(MODEL, 1)["state"] == "aborted"
        f.stop()
        f.start_again()
        page = _fleet_page(f)  # what the operator watching the dashboard sees, first
        assert "no device uploaded within the deadline" in _row(page, "unpublished-rounds")
        (ended,) = f.admin.unpublished_rounds()
        assert f.admin.closed_rounds() == []  # a published round's table: nothing was published
    assert {
        k: ended[k] for k in ("model", "round", "kind", "outcome", "invited", "contributors", "stage")
    } == {
        "model": MODEL,
        "round": 1,
        "kind": "plain",
        "outcome": "aborted",
        "invited": None,  # a plain round invites no list: every device may upload
        "contributors": 0,
        "stage": None,
    }
    assert ended["reason"] == "no device uploaded within the deadline (0.3 s; 3 devices run)"
    table = _row(page, "unpublished-rounds")
    assert "data-field='reason'>no device uploaded within the deadline" in table
    assert 'data-field="unpublished_round">1</td>' in table and 'data-field="took_part">0</td>' in table


def test_a_secagg_round_aborted_below_threshold_says_at_which_stage_and_why(byo_task, tmp_path) -> None:
    """docs/fleet.md walked with 2 of 3 devices: the coordinator aborted the round at key advertisement (the
    threshold needs 3). The row says so: SecAgg, stage "advertise keys", 3 invited, 2 took part, the refusal."""
    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing")
    with Fleet(tmp_path, cfg) as f:
        threads = _threads([f.device(0), f.device(1)], rounds=1, stage_wait=5)
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=3, poll=0.05)
        for t in threads:
            t.join(30)
        assert out[0].failed and out[0].version is None
        f.stop()
        f.start_again()
        page = _fleet_page(f)
        assert "secagg (advertise keys)" in _row(page, "unpublished-rounds")
        (ended,) = f.admin.unpublished_rounds(model=MODEL)
    assert (ended["kind"], ended["round"], ended["outcome"]) == ("secagg", out[0].number, "aborted")
    assert (ended["invited"], ended["contributors"], ended["stage"]) == (3, 2, "advertise keys")
    assert ended["reason"].startswith("only 2 clients advertised keys; threshold 3")


def test_an_abort_without_a_reason_records_the_refusal_it_gave_up_on(service) -> None:
    """An operator's bare ``POST .../abort`` after a refused stage: the row says what was refused."""
    names = ["a", "b", "c"]
    rnd = service.admin.open_secagg("cnn", names, weight_scale=0)["round"]
    devs = [SecAggDevice(service.device(d), "cnn", rnd) for d in names[:2]]
    for i, (dev, delta) in enumerate(zip(devs, _deltas(service.reg.load_state("cnn@1"), 2, 3), strict=True)):
        dev.set_update(delta, 1, np.random.default_rng([3, i]))
        dev.advertise()
    with pytest.raises(ServiceError, match="only 2 clients advertised keys"):
        service.admin.advance_secagg("cnn", rnd)
    service.admin.abort_secagg("cnn", rnd)
    (ended,) = service.admin.unpublished_rounds()
    assert (
        ended["reason"]
        == "aborted by the operator after a refusal: only 2 clients advertised keys; threshold 3"
    )
    service.admin.open_round("cnn")
    service.admin.abort_round("cnn", 1)
    assert service.admin.unpublished_rounds()[0]["reason"] == "aborted by the operator (no reason given)"


def test_a_reason_is_escaped_on_the_page_and_bounded(service) -> None:
    """The reason is an operator's or an error's text (it can name a device, a cohort): escaped, one line,
    cut to MAX_REASON."""
    service.admin.open_round("cnn")
    service.admin.abort_round("cnn", 1, reason='<script>alert("x")</script> & <b>bold</b>')
    service.admin.open_round("cnn")
    service.admin.abort_round("cnn", 2, reason="long\n" + "y" * 1500)
    page = service.http.get("/ui/fleet", headers=BEARER).text
    assert "<script>alert" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    long = service.admin.unpublished_rounds()[0]["reason"]
    assert len(long) == fleet_history.MAX_REASON and long.startswith("long yyy") and long.endswith("…")
    # a reason past what an abort takes is refused before anything is recorded; the round stays open
    service.admin.open_round("cnn")
    resp = service.http.post(
        "/admin/models/cnn/rounds/3/abort", params={"reason": "z" * 2001}, headers=BEARER
    )
    assert resp.status_code == 422 and service.admin.round_status("cnn", 3)["state"] == "open"


def test_the_row_commits_with_the_abort_or_neither(service, monkeypatch) -> None:
    """A history write that fails rolls the abort back: the round stays open (in memory and stored) with no
    row; the retried abort records the round aborted and its row once."""
    service.admin.open_round("cnn")
    service.device("d0").upload("cnn", 1, payload(service, 0), num_examples=1)
    real = FleetHistory.add_unpublished

    def fail_once(self, *args, **kwargs):
        real(self, *args, **kwargs)  # the row is written: the failure after it must take it back
        monkeypatch.setattr(FleetHistory, "add_unpublished", real)
        raise OSError("disk full")

    monkeypatch.setattr(FleetHistory, "add_unpublished", fail_once)
    with pytest.raises(OSError, match="disk full"):
        service.admin.abort_round("cnn", 1, reason="first try")
    assert (
        service.admin.round_status("cnn", 1)["state"] == "open" and service.admin.unpublished_rounds() == []
    )
    assert service.reg.query("SELECT COUNT(*) FROM fleet_rounds")[0][0] == 0
    service.admin.abort_round("cnn", 1, reason="second try")
    assert service.admin.round_status("cnn", 1)["state"] == "aborted"
    restart(service)
    assert [(e["reason"], e["contributors"]) for e in service.admin.unpublished_rounds()] == [
        ("second try", 1)
    ]


_CRASH = """
import os, sys
sys.path.insert(0, {tests!r})
from serve.conftest import Service
from deltaplane.serve import fleet_history

svc = Service({home!r})
svc.admin.open_round("cnn")
real = fleet_history.FleetHistory.add_unpublished

def crash(self, *args, **kwargs):
    real(self, *args, **kwargs)  # the round marked aborted and its row written: die before the commit
    os._exit(17)

fleet_history.FleetHistory.add_unpublished = crash
svc.admin.abort_round("cnn", 1, reason="crashed")
"""


def test_a_crash_during_the_abort_leaves_the_round_open_and_unrecorded(tmp_path) -> None:
    """A process killed after the abort marked the round aborted and wrote its row, before the commit: after the
    restart the round is open and unlisted (never open and listed, nor aborted and unlisted); aborting it then
    records it once."""
    home = tmp_path / "home"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(_CRASH).format(tests=tests, home=str(home))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32)
    svc = restart(SimpleNamespace(reg=Registry(home), config=config))
    assert svc.admin.round_status("cnn", 1)["state"] == "open" and svc.admin.unpublished_rounds() == []
    svc.admin.abort_round("cnn", 1, reason="after the crash")
    assert [e["reason"] for e in svc.admin.unpublished_rounds()] == ["after the crash"]
    assert svc.reg.query("SELECT COUNT(*) FROM fleet_rounds")[0][0] == 1


def test_a_secagg_round_lost_in_a_restart_is_recorded_lost(service) -> None:
    """A SecAgg round open when the service stopped is marked lost at the start, and listed so."""
    rnd = service.admin.open_secagg("cnn", ["a", "b", "c"], weight_scale=0)["round"]
    restart(service)
    (ended,) = service.admin.unpublished_rounds()
    assert (ended["round"], ended["outcome"], ended["invited"]) == (rnd, "lost", 3)
    assert ended["reason"].startswith("lost: the service stopped while the round was open")
    restart(service)
    assert len(service.admin.unpublished_rounds()) == 1  # recorded once, not at every start


_MORNING = """CREATE TABLE fleet_rounds (
    id INTEGER PRIMARY KEY AUTOINCREMENT, format INTEGER NOT NULL, model TEXT NOT NULL,
    kind TEXT NOT NULL, number INTEGER NOT NULL, summary TEXT NOT NULL, closed_at REAL NOT NULL,
    UNIQUE (model, kind, number))"""


def test_a_database_of_this_mornings_format_loads_and_is_migrated(tmp_path) -> None:
    """``fleet_rounds`` as 2026-12-06's service wrote it (no ``outcome`` column): its rows load as published
    rounds, the column is added, and rounds that end unpublished are stored beside them."""
    home = tmp_path / "home"
    Registry.create(home).close()
    summary = {"version": 4, "contributors": 3, "epsilon": None, "authenticated": False, "revoked": []}
    con = sqlite3.connect(home / "registry.db")
    con.execute(_MORNING)
    con.execute(
        "INSERT INTO fleet_rounds (format, model, kind, number, summary, closed_at) VALUES (1,'cnn','plain',3,?,9.0)",
        (json.dumps(summary),),
    )
    con.commit()
    con.close()
    reg = Registry(home)
    history = FleetHistory(reg)
    loaded = history.load()
    assert loaded.refused == [] and loaded.unpublished == []
    # no ε, so no neighbours to name (a row of this layout with an ε reads dp_adjacency "unknown")
    assert loaded.rounds == [
        {"model": "cnn", "round": 3, "kind": "plain", "closed_at": 9.0} | summary | {"dp_adjacency": None}
    ]
    history.add_unpublished(
        {"model": "cnn", "round": 4, "kind": "plain", "outcome": "aborted", "invited": None, "contributors": 0,
         "stage": None, "reason": "r", "authenticated": False, "revoked": [], "closed_at": 10.0}
    )  # fmt: skip
    again = FleetHistory(reg).load()
    assert [r["round"] for r in again.rounds] == [3] and [r["round"] for r in again.unpublished] == [4]
    rows = reg.query("SELECT outcome, format FROM fleet_rounds ORDER BY id")
    assert [tuple(r) for r in rows] == [("published", 1), ("aborted", 2)]


def test_published_and_unpublished_rounds_are_bounded_each_on_their_own(tmp_path, monkeypatch) -> None:
    """A burst of aborted rounds never pushes the published history out: each group keeps its last
    MAX_CLOSED_ROUNDS."""
    monkeypatch.setattr(fleet_history, "MAX_CLOSED_ROUNDS", 3)
    history = FleetHistory(Registry.create(tmp_path / "home"))
    base = {"model": "cnn", "kind": "plain", "authenticated": False, "revoked": [], "closed_at": 1.0}
    for n in range(1, 5):
        history.add_round(base | {"round": n, "version": n, "contributors": 1, "epsilon": None})
    for n in range(5, 15):
        history.add_unpublished(
            base
            | {
                "round": n,
                "outcome": "aborted",
                "invited": None,
                "contributors": 0,
                "stage": None,
                "reason": "x",
            }
        )
    loaded = history.load()
    assert [r["round"] for r in loaded.rounds] == [2, 3, 4]
    assert [r["round"] for r in loaded.unpublished] == [12, 13, 14]
    assert fleet_history.MAX_CLOSED_ROUNDS == 3  # (patched) the module's bound, as memory keeps it


def test_a_damaged_unpublished_row_is_left_out_with_a_message(tmp_path) -> None:
    """An unpublished row whose fields are not of the types the service writes (a reason that is not text) is
    refused like a damaged published row; a lost round's unknown ``contributors`` (None) is not damage."""
    history = FleetHistory(Registry.create(tmp_path / "home"))
    base = {"model": "cnn", "kind": "secagg", "authenticated": False, "revoked": [], "closed_at": 1.0}
    for n in (1, 2):
        history.add_unpublished(
            base
            | {
                "round": n,
                "outcome": "lost",
                "invited": 3,
                "contributors": None,
                "stage": None,
                "reason": "x",
            }
        )
    with history.registry.transaction() as con:
        con.execute("UPDATE fleet_rounds SET summary=json_set(summary, '$.reason', 7) WHERE number=1")
    loaded = history.load()
    assert [r["round"] for r in loaded.unpublished] == [2] and loaded.unpublished[0]["contributors"] is None
    assert "holds reason of the wrong type (unpublished round 1 of 'cnn', secagg)" in loaded.refused[0]

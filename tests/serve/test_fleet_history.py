"""The fleet's history survives a restart: closed rounds, the devices' reports and refusal counts are kept in the
registry database, bounded, written with the round's close (never published but unrecorded), and a row that
cannot be read is left out with a clear message instead of stopping the service."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig, fleet_history
from deltaplane.serve import rounds as rounds_module
from deltaplane.serve.fleet_history import MAX_CLOSED_ROUNDS, FleetHistory, HistoryRowError

from .conftest import ADMIN, Service
from .test_rounds import payload, restart
from .test_secagg_http import _walk

BEARER = {"Authorization": f"Bearer {ADMIN}"}


def _fleet_page(svc) -> str:
    return svc.http.get("/ui/fleet", headers=BEARER).text


def _rows(reg: Registry, table: str) -> int:
    return int(reg.query(f"SELECT COUNT(*) FROM {table}")[0][0])


def test_a_restarted_service_shows_the_rounds_reports_and_refusals_it_had(tmp_path) -> None:
    """docs/dashboard.md said a restarted service lists only the rounds closed since: an upgrade or a crash wiped
    the fleet's history. Plain and SecAgg rounds, the devices' reports on their versions and the uploads refused
    by reason now read the same after a restart, on the admin API and on the Fleet page."""
    svc = Service(tmp_path / "home", downlink_codec="identity")
    svc.admin.open_round("cnn")
    for i in range(3):
        svc.device(f"d{i}").upload("cnn", 1, payload(svc, i), num_examples=1 + i)
    with pytest.raises(Exception, match="decode|payload|magic"):
        svc.device("bad").upload("cnn", 1, b"not a delta", num_examples=1)
    version = svc.admin.close_round("cnn", 1)["version"]
    for device, acc in (("d0", 0.9), ("d1", 0.5), ("d0", 0.7)):  # d0 reports twice: its last counts
        svc.device(device).report("cnn", version=version, metrics={"holdout_accuracy": acc}, round_id=1)
    secagg, _ = _walk(svc, ["a", "b", "c"])
    secagg_version = svc.admin.close_secagg("cnn", secagg)["published"]["version"]
    svc.admin.open_round("cnn")
    assert svc.admin.close_round("cnn", 2)["version"] is None  # an empty round: closed, nothing published

    before = svc.admin.closed_rounds()
    uploads = svc.state.fleet_snapshot()["uploads"]
    assert [(c["kind"], c["round"], c["version"], c["contributors"]) for c in before] == [
        ("plain", 2, None, 0),
        ("secagg", secagg, secagg_version, 3),
        ("plain", 1, version, 3),
    ]
    assert before[2]["reports"] == 2 and before[2]["holdout_accuracy_min"] == 0.5
    assert uploads["accepted"] == 3 and uploads["accepted_secagg_masked"] == 3 and uploads["DecodeError"] == 1

    restart(svc)
    assert svc.admin.closed_rounds() == before  # every field, closed_at and the reports' mean included
    assert svc.admin.closed_rounds(model="other") == []
    assert svc.state.fleet_snapshot()["uploads"] == uploads
    page = _fleet_page(svc)
    assert f'data-field="version">{version}</td>' in page and f'data-field="round">{secagg}</td>' in page
    assert 'data-field="holdout_accuracy_mean">0.600</td>' in page and 'data-field="reports">2</td>' in page
    assert 'data-field="uploads.DecodeError">1</td>' in page

    # what comes after the restart adds to what was kept
    svc.device("d2").report("cnn", version=version, metrics={"holdout_accuracy": 0.2})
    svc.admin.open_round("cnn")
    svc.device("d0").upload("cnn", 3, payload(svc, 7, base=secagg_version), num_examples=1)
    svc.admin.close_round("cnn", 3)
    restart(svc)
    after = svc.admin.closed_rounds()
    assert [c["round"] for c in after] == [3, 2, secagg, 1]
    assert after[-1]["reports"] == 3 and after[-1]["holdout_accuracy_min"] == 0.2
    assert svc.state.fleet_snapshot()["uploads"]["accepted"] == 4


def test_a_close_that_fails_records_nothing_and_its_retry_records_once(tmp_path, monkeypatch) -> None:
    """The round's summary is written inside the close's transaction: a close that fails after writing it (here
    storing the server step's state) leaves no row, the round open and no version; the retried close leaves
    exactly one row, in memory and in the database."""
    svc = Service(tmp_path / "home")
    svc.admin.open_round("cnn")
    svc.device("d0").upload("cnn", 1, payload(svc, 0), num_examples=1)
    real = rounds_module.step_bytes

    def fail_once(step):
        monkeypatch.setattr(rounds_module, "step_bytes", real)
        raise OSError("disk full")

    monkeypatch.setattr(rounds_module, "step_bytes", fail_once)
    with pytest.raises(OSError, match="disk full"):
        svc.admin.close_round("cnn", 1)
    assert _rows(svc.reg, "fleet_rounds") == 0 and svc.admin.closed_rounds() == []
    assert [a.number for a in svc.reg.versions("cnn")] == [1]
    closed = svc.admin.close_round("cnn", 1)
    assert _rows(svc.reg, "fleet_rounds") == 1 and len(svc.admin.closed_rounds()) == 1
    restart(svc)
    assert [(c["round"], c["version"]) for c in svc.admin.closed_rounds()] == [(1, closed["version"])]


_CRASH = """
import os, sys
sys.path.insert(0, {tests!r})
from serve.conftest import Service
from serve.test_rounds import payload
from deltaplane.serve import fleet_history

svc = Service({home!r})
svc.admin.open_round("cnn")
svc.device("d0").upload("cnn", 1, payload(svc, 0), num_examples=1)
real = fleet_history.FleetHistory.add_round

def crash(self, *args, **kwargs):
    real(self, *args, **kwargs)  # the summary row is written, the version registered: die before the commit
    os._exit(17)

fleet_history.FleetHistory.add_round = crash
svc.admin.close_round("cnn", 1)
"""


def test_a_crash_during_the_close_leaves_the_round_open_and_unrecorded(tmp_path) -> None:
    """A process killed after the close wrote the version and the summary but before the commit: after the
    restart the round is open with its upload, no version was published and no summary was recorded; closing
    it then publishes and records it once."""
    home = tmp_path / "home"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent(_CRASH).format(tests=tests, home=str(home))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    reg = Registry(home)
    assert [a.number for a in reg.versions("cnn")] == [1] and _rows(reg, "fleet_rounds") == 0
    reg.close()
    # the restart: a fresh app over the same home, with the crashed process's settings
    config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32)
    svc = restart(SimpleNamespace(reg=Registry(home), config=config))
    assert svc.admin.round_status("cnn", 1)["state"] == "open"
    assert svc.admin.close_round("cnn", 1)["version"] == 2
    assert [(c["round"], c["version"]) for c in svc.admin.closed_rounds()] == [(1, 2)]
    assert _rows(svc.reg, "fleet_rounds") == 1


def _summary(n: int, model: str = "cnn", **extra) -> dict:
    fields = {
        "model": model,
        "round": n,
        "kind": "plain",
        "version": n + 1,
        "contributors": 3,
        "epsilon": 0.5,
        "dp_adjacency": "add/remove",
    }
    return fields | {"authenticated": False, "revoked": [], "closed_at": 1000.0 + n} | extra


def test_the_history_keeps_the_memorys_bounds(tmp_path, monkeypatch) -> None:
    """The last MAX_CLOSED_ROUNDS closed rounds (all models together) and the last MAX_REPORTS reports per model,
    one per device per version (a later report replaces the earlier), as the service's memory keeps them."""
    reg = Registry.create(tmp_path / "home")
    history = FleetHistory(reg)
    for n in range(1, MAX_CLOSED_ROUNDS + 6):
        history.add_round(_summary(n, revoked=["dev-9"] if n == 7 else []))
    loaded = history.load()
    assert [r["round"] for r in loaded.rounds] == list(range(6, MAX_CLOSED_ROUNDS + 6))
    assert _rows(reg, "fleet_rounds") == MAX_CLOSED_ROUNDS
    assert loaded.rounds[1] == _summary(7, revoked=["dev-9"])

    monkeypatch.setattr(fleet_history, "MAX_REPORTS", 4)
    for i in range(6):
        history.add_report(
            "cnn", {"device": f"d{i}", "version": 2, "cohort": "eu", "round": 1, "metrics": {}}
        )
    history.add_report("other", {"device": "d0", "version": 2, "cohort": "eu", "round": 1, "metrics": {}})
    again = {"device": "d5", "version": 2, "cohort": "eu", "round": 1, "metrics": {"holdout_accuracy": 0.25}}
    history.add_report("cnn", again)
    reports = history.load().reports
    assert [r["device"] for r in reports["cnn"]] == ["d2", "d3", "d4", "d5"]
    assert reports["cnn"][-1]["metrics"] == {"holdout_accuracy": 0.25}
    assert [r["device"] for r in reports["other"]] == ["d0"]


def test_an_unreadable_row_is_left_out_with_a_message(tmp_path, caplog) -> None:
    """A row written by a newer deltaplane (a downgrade) or damaged is refused with HistoryRowError naming it;
    the service starts anyway, shows the other rows, says which it left out and counts them."""
    svc = Service(tmp_path / "home")
    history = FleetHistory(svc.reg)
    for n in (1, 2, 3):
        history.add_round(_summary(n))
    with svc.reg.transaction() as con:
        con.execute("UPDATE fleet_rounds SET format=3 WHERE number=1")
        con.execute("UPDATE fleet_rounds SET summary='{\"version\": 3' WHERE number=2")
    history.add_report("cnn", {"device": "d0", "version": 1, "cohort": "eu", "round": None, "metrics": {}})
    with svc.reg.transaction() as con:
        con.execute("UPDATE fleet_reports SET report='[]'")
    loaded = history.load()
    assert [r["round"] for r in loaded.rounds] == [3] and loaded.reports == {}
    assert "format 3, written by a newer deltaplane; this one reads format 1 there" in loaded.refused[0]
    assert "is not valid JSON" in loaded.refused[1] and "lacks cohort, round, metrics" in loaded.refused[2]
    with pytest.raises(HistoryRowError, match="row 1 of fleet_rounds has format 2"):
        fleet_history.decode_row("fleet_rounds", 1, 2, "{}", ())

    with caplog.at_level(logging.WARNING, logger="deltaplane.serve.app"):
        restart(svc)
    assert [c["round"] for c in svc.admin.closed_rounds()] == [3]
    assert svc.admin.stats()["counters"]["errors.history_unreadable"] == 3
    assert "closed round 1 of 'cnn', plain); left out" in caplog.text
    assert _fleet_page(svc).count('data-field="round">') == 1


def test_closed_rounds_is_admin_only(service) -> None:
    assert service.http.get("/admin/rounds/closed").status_code == 401
    empty = {"closed_rounds": [], "unpublished_rounds": []}
    assert service.http.get("/admin/rounds/closed", headers=BEARER).json() == empty
    assert json.loads(service.http.get("/admin/rounds/closed?model=..", headers=BEARER).text)["detail"]


def test_the_fleet_page_says_how_many_revoked_devices_a_round_left_out(tmp_path) -> None:
    """A SecAgg round's summary keeps the devices its open left out as revoked; the page counts them."""
    from deltaplane.ui import pages

    history = FleetHistory(Registry.create(tmp_path / "home"))
    history.add_round(_summary(1, kind="secagg", authenticated=True, revoked=["dev-3", "dev-7"]))
    page = pages.fleet_page({"closed_rounds": history.load().rounds})
    assert "secagg, authenticated (2 revoked, left out)" in page


@pytest.mark.parametrize(
    "table, column, text",
    [
        ("fleet_rounds", "summary", '{"version": 1, "contributors": 2, "epsilon": null, "authenticated": false, '
         '"revoked": 5}'),
        ("fleet_rounds", "summary", '{"version": [1], "contributors": 2, "epsilon": null, "authenticated": false, '
         '"revoked": []}'),
        ("fleet_reports", "report", '{"cohort": "eu", "round": null, "metrics": {"holdout_accuracy": "high"}}'),
        ("fleet_reports", "report", '{"cohort": "eu", "round": null, "metrics": ["holdout_accuracy"]}'),
        ("fleet_rounds", "summary", "[" * 100_000 + "]" * 100_000),  # past json's depth: a RecursionError
    ],
)  # fmt: skip
def test_a_row_of_valid_json_with_the_wrong_types_is_left_out_too(tmp_path, table, column, text) -> None:
    """A damaged row that is still JSON with every field present, but of the wrong type (``revoked`` a number,
    ``version`` a list, a metric a string): the module's rule is that a damaged row never stops the service,
    yet ``list(5)`` stopped the start with a TypeError, and an unhashable version or a metric ``float()``
    refuses stopped every Fleet page and ``GET /admin/rounds/closed`` with a 500. Refused at load now, as a
    row of the wrong format is, and the others are shown."""
    svc = Service(tmp_path / "home")
    history = FleetHistory(svc.reg)
    history.add_round(_summary(1) | {"version": 1})
    history.add_round(_summary(2) | {"version": 1})
    for d in ("d0", "d1"):
        history.add_report(
            "cnn",
            {"device": d, "version": 1, "cohort": "eu", "round": None, "metrics": {"holdout_accuracy": 0.5}},
        )
    with svc.reg.transaction() as con:
        con.execute(f"UPDATE {table} SET {column}=? WHERE id=1", (text,))
    loaded = history.load()
    assert len(loaded.refused) == 1 and "left out" in loaded.refused[0], loaded.refused
    restart(svc)
    closed = svc.admin.closed_rounds()
    assert [c["round"] for c in closed] == ([2] if table == "fleet_rounds" else [2, 1])
    assert closed[0]["reports"] == (2 if table == "fleet_rounds" else 1)
    assert svc.admin.stats()["counters"]["errors.history_unreadable"] == 1
    assert _fleet_page(svc).count('data-field="round">') == len(closed)


def test_each_closed_round_carries_its_own_neighbours_and_an_older_row_reads_unknown(tmp_path) -> None:
    """Every stored ε carries the neighbours it is stated under, per round (the federation's label, on the Fleet
    page only, is today's configuration, not necessarily the one that spent an older round's ε). A row written
    before the label was stored reads "unknown", never a guess; a round without ε has no label."""
    reg = Registry.create(tmp_path / "home")
    history = FleetHistory(reg)
    history.add_round(_summary(1, dp_adjacency="zero-out"))
    with reg.transaction() as con:  # a published row as the code before the label wrote it: no such key
        old = {"version": 3, "contributors": 3, "epsilon": 1.25, "authenticated": False, "revoked": []}
        con.execute(
            "INSERT INTO fleet_rounds (format, model, kind, number, summary, closed_at) VALUES (1,?,?,?,?,?)",
            ("cnn", "plain", 2, json.dumps(old), 1002.0),
        )
    history.add_round(_summary(3, epsilon=None, dp_adjacency=None))  # no DP: nothing to label
    loaded = history.load()
    assert [(r["round"], r["epsilon"], r["dp_adjacency"]) for r in loaded.rounds] == [
        (1, 0.5, "zero-out"),
        (2, 1.25, "unknown"),
        (3, None, None),
    ]
    # the label is an added key of the same format-1 layout, so an older deltaplane still reads the row
    (fmt, text), *_ = reg.query("SELECT format, summary FROM fleet_rounds ORDER BY id")
    assert fmt == 1 and json.loads(text)["dp_adjacency"] == "zero-out"
    with reg.transaction() as con:
        con.execute(
            "UPDATE fleet_rounds SET summary=? WHERE number=1", (json.dumps(old | {"dp_adjacency": 7}),)
        )
    assert "holds dp_adjacency of the wrong type" in history.load().refused[0]


def test_a_dp_rounds_status_and_closed_list_say_its_neighbours_after_a_restart(tmp_path) -> None:
    """A central-DP plain round: its status (GET /admin/models/{m}/rounds/{n}), the closed list and the Fleet page's
    row say add/remove beside its ε, after a restart too; a round closed before the label was stored (its
    column NULL, as the migration leaves older rows) reads "unknown"."""
    from deltaplane.engine import RunConfig

    run = RunConfig(clients=2, dp_noise=1.0, clip="1.0", downlink_codec="identity")
    svc = Service(tmp_path / "home", federation=run, max_update_norm_ratio=None)
    for number in (1, 2):
        base = svc.admin.open_round("cnn")["base_version"]
        for i in range(2):
            svc.device(f"d{i}").upload("cnn", number, payload(svc, i + 2 * number, base=base), num_examples=1)
        assert svc.admin.close_round("cnn", number)["dp_adjacency"] == "add/remove"
    assert svc.admin.round_status("cnn", 2)["dp_adjacency"] == "add/remove"
    assert [c["dp_adjacency"] for c in svc.admin.closed_rounds()] == ["add/remove", "add/remove"]
    # the published version's lineage holds no exact count ε would not cover (the round's status keeps it)
    lineage = svc.reg.get("cnn", svc.admin.round_status("cnn", 2)["version"]).lineage
    assert lineage["dp"]["adjacency"] == "add/remove" and not {"uploads", "examples"} & set(lineage)
    assert svc.admin.round_status("cnn", 2)["uploads"] == 2
    assert _fleet_page(svc).count("data-field='epsilon_neighbours'>add/remove<") == 2
    with svc.reg.transaction() as con:
        con.execute("UPDATE rounds SET dp_adjacency=NULL WHERE number=1")
    restart(svc)
    assert svc.admin.round_status("cnn", 1)["dp_adjacency"] == "unknown"
    assert svc.admin.round_status("cnn", 2)["dp_adjacency"] == "add/remove"
    assert [c["dp_adjacency"] for c in svc.admin.closed_rounds()] == ["add/remove", "add/remove"]


def test_a_trusted_coordinators_test_accuracy_is_shown_validated_and_kept_across_a_restart(tmp_path) -> None:
    """Walking docs/fleet.md, ``fleet coordinate --trusted`` printed each published version's test accuracy
    ("test accuracy 0.341 on 88 samples") and its divergence warning on its own terminal only; the Fleet page
    showed the devices' few-sample held-out figures alone. The coordinator now stores them on the service
    (admin only, validated), the closed-rounds table and ``GET /admin/rounds/closed`` show them ("—" where no
    trusted coordinator measured a version), and a restart keeps them."""
    svc = Service(tmp_path / "home", downlink_codec="identity")
    svc.admin.open_round("cnn")
    svc.device("d0").upload("cnn", 1, payload(svc, 0), num_examples=1)
    version = svc.admin.close_round("cnn", 1)["version"]
    svc.admin.open_round("cnn")
    svc.device("d0").upload("cnn", 2, payload(svc, 1, base=version), num_examples=1)
    unmeasured = svc.admin.close_round("cnn", 2)["version"]
    first = svc.admin.closed_rounds()
    assert [(c["test_accuracy"], c["test_samples"], c["diverged"]) for c in first] == [(None, None, None)] * 2
    assert "data-field='diverged'>—</td>" in _fleet_page(svc)

    url = "/admin/models/cnn/rounds/plain/1/evaluation"
    good = {"version": version, "test_accuracy": 0.341, "test_samples": 88, "diverged": True}
    assert svc.http.put(url, json=good).status_code == 401  # the admin's alone
    device = {"Authorization": f"Bearer {svc.admin.issue_token('d9')}"}
    assert svc.http.put(url, json=good, headers=device).status_code in (401, 403)
    refused = {
        "test_accuracy": ({"test_accuracy": 1.5}, "less than or equal to 1"),
        "nan": ({"test_accuracy": float("nan")}, "finite"),
        "samples": ({"test_samples": 0}, "greater than or equal to 1"),
        "unknown version": ({"version": 99}, "'cnn' has no version 99"),
        "another round's": (
            {"version": unmeasured},
            f"published version {version}, not version {unmeasured}",
        ),
    }
    for what, (change, said) in refused.items():
        body = json.dumps(good | change)  # NaN as Python's json writes it: a client could send it
        r = svc.http.put(url, content=body, headers=BEARER | {"Content-Type": "application/json"})
        assert r.status_code == 422 and said in r.json()["detail"], (what, r.text)
    r = svc.http.put("/admin/models/cnn/rounds/secagg/1/evaluation", json=good, headers=BEARER)
    assert r.status_code == 422 and "no closed secagg round 1" in r.json()["detail"]
    assert svc.admin.closed_rounds() == first  # nothing refused was kept

    svc.admin.set_evaluation("cnn", "plain", 1, version, test_accuracy=0.341, test_samples=88, diverged=True)
    rows = svc.admin.closed_rounds()
    assert [(c["round"], c["test_accuracy"], c["test_samples"], c["diverged"]) for c in rows] == [
        (2, None, None, None),
        (1, 0.341, 88, True),
    ]
    restart(svc)
    assert svc.admin.closed_rounds() == rows
    page = _fleet_page(svc)
    assert "<th>test accuracy (coordinator)</th>" in page
    assert 'data-field="test_accuracy">0.341</td>' in page and 'data-field="test_samples">88</td>' in page
    assert "class='bad' data-field='diverged'>yes</td>" in page
    assert (
        'data-field="test_accuracy">—</td>' in page
    )  # round 2's version: no trusted coordinator measured it

"""Rounds a coordinator left open when it died (docs/fleet.md): a SecAgg round a killed coordinator left is aborted,
as abandoned, by the coordinator started next, and devices do not count it towards their ``--rounds``; one whose
coordinator may still run it stops the new coordinator with how to abort it; a plain round is taken over.

The service runs in this process over TLS (:class:`tests.serve.test_fleet.Fleet`); the killed coordinator is a real
``deltaplane fleet coordinate`` process, killed with SIGKILL (no handler runs: nothing aborts its round).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from deltaplane import errors
from deltaplane.engine import RunConfig
from deltaplane.processes import place_and_boot, start_ticks
from deltaplane.serve import fleet

from .test_fleet import MODEL, Fleet, _config, _env, _threads, _waiting_for

FLEET_YAML = """task: {{path: '{task}'}}
clients: {{count: 3}}
seed: 3
downlink_codec: identity
secagg: {{enabled: true}}
clip: 2.0
wire: self-describing
"""


def test_a_round_left_by_a_killed_coordinator_is_aborted_by_the_next_and_not_counted(
    byo_task, tmp_path
) -> None:
    """A coordinator killed with SIGKILL left its SecAgg round open. Devices started later joined it and counted
    it towards their --rounds 1, so the next coordinator's round found them stopped (*only 0 clients advertised
    keys*) and the stray stayed open. The next coordinator now finds the round's coordinator gone (its pid, on
    this host, no longer runs), aborts the round as abandoned with the reason, and the devices, told so, do not
    count it: its own round publishes with all three."""
    (tmp_path / "fleet.yaml").write_text(FLEET_YAML.format(task=byo_task))
    cfg = RunConfig.from_yaml(tmp_path / "fleet.yaml")
    with Fleet(tmp_path / "svc", cfg) as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deltaplane.cli", "fleet", "coordinate", "--url", f.url, "--ca",
             str(f.tls.ca_cert), "--federation", "fleet.yaml", "--model", MODEL, "--rounds", "1",
             "--deadline", "300"],
            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _waiting_for(lambda: f.app.state.secagg_rounds or proc.poll() is not None, timeout=120)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        ((_, stray),) = f.app.state.secagg_rounds
        stamp = f.admin.secagg_status(MODEL, stray)["coordinator"]
        place, boot = place_and_boot()
        assert (
            stamp
            == {
                "host": socket.gethostname(),
                "place": place,
                "boot": boot,
                "pid": proc.pid,
                "start": stamp["start"],
            }
            and stamp["start"] > 0
        )
        devices = [f.device(i) for i in range(3)]
        lines: list[str] = []
        devices[0].log = lines.append
        threads = _threads(devices, rounds=1, stage_wait=60)
        _waiting_for(lambda: f.admin.secagg_status(MODEL, stray)["advertised"] == 3)  # all wait in the stray
        said: list[str] = []
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=30, poll=0.05, say=said.append)
        for t in threads:
            t.join(60)
        status = f.admin.secagg_status(MODEL, stray)
        (ended,) = f.admin.unpublished_rounds(MODEL)
    who = f"pid {proc.pid} on host {socket.gethostname()}"
    assert f"SecAgg round {stray} was left open by a coordinator that is gone ({who}); aborted it" in said
    assert status["finished"] == "aborted" and status["abandoned"] is True
    assert ended["round"] == stray and ended["reason"].startswith(f"its coordinator ({who}) is gone")
    assert out[0].failed is None and out[0].number > stray and out[0].contributors == 3, out[0]
    assert not any(t.is_alive() for t in threads)
    assert [[(r["round"], r["took_part"]) for r in d.rounds] for d in devices] == [
        [(out[0].number, True)]
    ] * 3
    assert f"SecAgg round {stray} was abandoned by its coordinator; not counted towards --rounds" in lines


@pytest.mark.parametrize(
    "where", ["alive here", "another host", "another machine of the same name", "not told"]
)
def test_a_round_whose_coordinator_may_still_run_it_stops_the_new_coordinator(
    byo_task, tmp_path, where
) -> None:
    """Aborting a round its coordinator still runs would destroy that run, so a coordinator that cannot tell the
    other one gone (alive on this host; on another host, unknowable from here) stops before anything, naming
    the round, the coordinator and how to abort the round if that coordinator is gone; the round stays open."""
    cfg = _config(byo_task, secagg=True, clip="2.0", wire="self-describing")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        host = "elsewhere.example" if where == "another host" else socket.gethostname()
        place, boot = place_and_boot()
        stamp = {
            "host": host,
            "place": place,
            "boot": boot,
            "pid": alive.pid,
            "start": start_ticks(alive.pid),
        }
        if where in ("another host", "another machine of the same name"):  # a pid there means nothing here
            stamp["place"] = "0123abcd" if place != "0123abcd" else "abcd0123"
        if where == "another machine of the same name":  # its pid, unknown here, is no sign that it ended
            stamp["pid"], stamp["start"] = 2**31 - 1, 1
        elif where == "not told":  # a stamp without its place cannot be judged gone
            stamp = {"host": host, "pid": 2**31 - 1}
        with Fleet(tmp_path, cfg) as f:
            names = [fleet.device_id(i) for i in range(3)]
            opened = f.admin.open_secagg(MODEL, names, weight_scale=0, coordinator=stamp)["round"]
            with pytest.raises(errors.Conflict) as caught:
                fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=5, poll=0.05)
            assert f.admin.secagg_status(MODEL, opened)["finished"] is None  # untouched
            assert len(f.app.state.secagg_rounds) == 1  # and no round of its own opened
    finally:
        alive.kill()
        alive.wait()
    said = str(caught.value)
    assert type(caught.value).__name__ == "CoordinatorRunning"
    assert (
        f"SecAgg round {opened} of {MODEL!r} is open under the coordinator pid {stamp['pid']} on host {host}"
        in said
    )
    assert f"/admin/models/{MODEL}/secagg/{opened}/abort?abandoned=true" in said


def test_a_plain_round_left_open_is_taken_over_by_the_next_coordinator(byo_task, tmp_path) -> None:
    """A plain round its coordinator left open (killed; plain rounds are durable) made every round of the next
    coordinator fail: the service refuses a second open (409, *round 1 of 'mytask' is still open*). The next
    coordinator now takes it over as its round, and the devices, which counted it, take part in it."""
    cfg = _config(byo_task, rounds=1)
    with Fleet(tmp_path, cfg) as f:
        left = f.admin.open_round(MODEL)["round"]
        threads = _threads([f.device(i) for i in range(3)], rounds=1)
        said: list[str] = []
        out = fleet.coordinate(f.admin, cfg, model=MODEL, rounds=1, deadline=30, poll=0.05, say=said.append,
                               drift=False)  # fmt: skip
        for t in threads:
            t.join(60)
    assert out[0].failed is None and out[0].number == left and out[0].contributors == 3, out[0]
    assert any(line.startswith(f"plain round {left} of {MODEL!r} was open already") for line in said), said

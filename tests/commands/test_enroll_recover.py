"""`fleet enroll --recover`: the ids a run killed while the service answered left reserved (`enrollment.reserved`)
are taken back by a command, not by hand: each reservation names its run (pid, host, boot, start time), the
tokens the service may have issued for a provably dead run's ids are revoked, then the ids recorded as spent,
all or nothing under the folder's lock; a live run's reservation is never taken back without `--abandoned`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltaplane.aggregation.secagg.enrollment as enrollment
from deltaplane.aggregation.secagg.reservations import Owner, run_state, this_run
from deltaplane.cli import app
from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig, create_app
from deltaplane.serve.server import BackgroundServer

ADMIN = "admin-token-for-recover-tests"


def _flat(output: str) -> str:
    return " ".join(output.split())


class HeldService:
    """A real service on loopback (plain HTTP) whose ``hold``-th token answer (1-based) waits until released:
    the service has issued that token, its answer is not yet sent. Every token it issues is kept in ``tokens``
    (device id → token text), delivered or not."""

    def __init__(self, root: Path, hold: int) -> None:
        Registry.create(root / "home")
        config = ServiceConfig(home=str(root / "home"), admin_token=ADMIN, device_secret="s" * 32)
        self.app = create_app(config)
        self.hold, self.seen = hold, 0
        self.reached, self.release = threading.Event(), threading.Event()
        self.tokens: dict[str, str] = {}
        self.revoked: list[str] = []

        async def wrapped(scope, receive, send):
            return await self._wrap(scope, receive, send)

        wrapped.state = self.app.state  # type: ignore[attr-defined]  # the server reads the limits there
        self.server = BackgroundServer(wrapped)

    async def _wrap(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if path.endswith("/revoke"):
            self.revoked.append(path.split("/")[3])
            return await self.app(scope, receive, send)
        if path != "/admin/devices":
            return await self.app(scope, receive, send)
        self.seen += 1
        held = self.seen == self.hold
        start: dict = {}
        body: list[bytes] = []

        async def spy(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
                return None
            body.append(msg.get("body", b""))
            if msg.get("more_body"):
                return None
            doc = json.loads(b"".join(body))
            self.tokens[doc["device_id"]] = doc["token"]
            if held:  # issued, its answer not sent: the run is killed now
                self.reached.set()
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
            await send(start)
            await send({"type": "http.response.body", "body": b"".join(body)})
            return None

        return await self.app(scope, receive, spy)

    def valid(self, token: str) -> bool:
        return self.app.state.authority.check(token) is not None

    def __enter__(self) -> HeldService:
        self.server.__enter__()
        self.url = self.server.url
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.__exit__(*exc)


def _recover(out: Path, url: str, *more: str):
    return CliRunner().invoke(app, ["fleet", "enroll", "--url", url, "--out", str(out), "--recover", *more])


def test_a_run_killed_while_the_service_answers_is_recovered_and_a_live_ones_reservation_is_left(
    tmp_path, monkeypatch
) -> None:
    """A `fleet enroll --devices 3` process, SIGKILLed once the service issued device-0's and device-1's
    tokens (device-1's answer never sent), left device-0..device-2 reserved and refused forever; the docs said
    to revoke by hand and edit the file. While it runs, `--recover` leaves its reservation (a live run) and
    revokes nothing; once it is dead, `--recover` revokes the tokens of its three ids on the service (both
    issued tokens are then refused), records the ids as spent and removes the reservation, and `--add 1` takes
    device-3. On the old source there is no --recover (exit 2) and the reservation stays."""
    if this_run().start is None:
        pytest.skip("a live run is told only where /proc gives a process's start time")
    out = tmp_path / "tokens"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DELTAPLANE_ADMIN_TOKEN": ADMIN}
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    with HeldService(tmp_path, hold=2) as service:
        cmd = [sys.executable, "-m", "deltaplane", "fleet", "enroll", "--url", service.url, "--out", str(out)]
        run = subprocess.Popen(
            [*cmd, "--devices", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            assert service.reached.wait(120), run.communicate(timeout=5)[0]
            line = (out / "enrollment.reserved").read_text()
            assert line.startswith(f"device-0..device-2 pid={run.pid} "), line
            live = _recover(out, service.url)  # the run is alive, waiting for its answer
            assert live.exit_code == 0, live.output
            assert "device-0..device-2:" in _flat(live.output) and "still going" in _flat(live.output)
            assert service.revoked == [] and (out / "enrollment.reserved").read_text() == line
        finally:
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=60)
        service.release.set()
        assert sorted(service.tokens) == ["device-0", "device-1"]
        assert all(service.valid(t) for t in service.tokens.values())
        assert sorted(p.name for p in out.iterdir()) == ["enrollment.reserved"]  # no token written
        refused = CliRunner().invoke(app, [*cmd[3:], "--add", "1"])
        assert refused.exit_code == 2 and "holds no device-I.token" in _flat(refused.output)

        r = _recover(out, service.url)
        flat = _flat(r.output)
        assert r.exit_code == 0, r.output
        assert (
            f"device-0..device-2: service tokens revoked on {service.url}, ids recorded as spent" in flat
        ), flat
        assert "that process has ended" in flat, flat
        assert service.revoked == ["device-0", "device-1", "device-2"]
        assert not any(service.valid(t) for t in service.tokens.values())
        assert (out / "enrollment.ledger").read_text() == "device-0..device-2\n"
        assert not (out / "enrollment.reserved").exists()
        again = _recover(out, service.url)
        assert again.exit_code == 0 and "nothing to recover" in _flat(again.output), again.output
        fresh = CliRunner().invoke(app, [*cmd[3:], "--devices", "3"])  # the spent ids are never issued again
        assert fresh.exit_code == 2 and "already issued or revoked" in _flat(fresh.output), fresh.output


def test_a_reservation_that_cannot_be_told_dead_needs_abandoned_naming_it(tmp_path, monkeypatch) -> None:
    """A live run's reservation (this process's) and an earlier release's line (no run named) are left by
    `--recover`: with nothing provably dead, it is refused (exit 2) naming `--abandoned RANGE`, revoking
    nothing; `--abandoned` naming a range that is not reserved is refused too. `--abandoned device-5` takes
    back exactly that one, revoking its token; the live run's stays."""
    if this_run().start is None:
        pytest.skip("a live run is told only where /proc gives a process's start time")
    out = tmp_path / "tokens"
    out.mkdir()
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    with HeldService(tmp_path, hold=0) as service:
        enrollment.reserve_ids(out, ["device-2", "device-3"])  # this process: a live run
        mine = (out / "enrollment.reserved").read_text()
        (out / "enrollment.reserved").write_text("device-0\n" + mine + "device-5\n")
        r = _recover(out, service.url)
        flat = _flat(r.output)
        assert r.exit_code == 2 and "--abandoned device-0" in flat and "names no run" in flat, flat
        assert service.revoked == []
        r = _recover(out, service.url, "--abandoned", "device-4")
        assert r.exit_code == 2 and "--abandoned device-4 is not a reservation" in _flat(r.output), r.output
        r = _recover(out, service.url, "--abandoned", "device-5")
        flat = _flat(r.output)
        assert r.exit_code == 0 and "device-5: service tokens revoked" in flat, flat
        assert "device-2..device-3:" in flat and "still going" in flat, flat
        assert service.revoked == ["device-5"]
        assert (out / "enrollment.ledger").read_text() == "device-5\n"
        assert (out / "enrollment.reserved").read_text() == "device-0\n" + mine


def test_a_failed_revocation_leaves_the_folder_as_it_was(tmp_path, monkeypatch) -> None:
    """All or nothing: the service gone while `--recover` revokes leaves every reservation and no ledger
    (exit 1, naming the ids whose tokens are not revoked); the same command later finishes the job."""
    out = tmp_path / "tokens"
    out.mkdir()
    dead = Owner(
        pid=2**22 + 17, host=this_run().host, boot=this_run().boot, pidns=this_run().pidns, start=1, at=0
    )
    assert run_state(dead)[0] == "dead"
    enrollment._write_reservations(out, [enrollment.Reservation(0, 1, dead)])
    before = (out / "enrollment.reserved").read_bytes()
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    r = _recover(out, "http://127.0.0.1:9")
    assert r.exit_code == 1 and "device-0, device-1 are NOT revoked" in _flat(r.output), r.output
    assert sorted(p.name for p in out.iterdir()) == ["enrollment.reserved"]
    assert (out / "enrollment.reserved").read_bytes() == before


def test_run_state_tells_a_reused_pid_and_another_host_apart() -> None:
    """A pid now held by another process (another start time) is a dead run; a restarted host is one too;
    another host, or a system that cannot say, is never taken for dead."""
    me = this_run()
    if me.start is None:
        pytest.skip("a live run is told only where /proc gives a process's start time")
    assert run_state(me)[0] == "live"
    assert run_state(Owner(me.pid, me.host, me.boot, me.pidns, me.start + 1, me.at))[0] == "dead"
    if me.boot is not None:
        assert run_state(Owner(me.pid, me.host, "other-boot", me.pidns, me.start, me.at))[0] == "dead"
    assert run_state(Owner(me.pid, "elsewhere", me.boot, me.pidns, 1, me.at))[0] == "unknown"
    assert run_state(None)[0] == "unknown"


def test_older_reservation_lines_still_read_and_the_new_ones_round_trip(tmp_path) -> None:
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "enrollment.reserved").write_text("device-0..device-2\ndevice-7\n")  # an earlier release's file
    assert enrollment._reserved(out) == [(0, 2), (7, 7)]
    assert enrollment.next_device_ids(out, 1) == ["device-8"]
    enrollment.reserve_ids(out, ["device-8", "device-9"])
    held = enrollment.read_reservations(out)
    assert [(r.first, r.last, r.owner is None) for r in held] == [(0, 2, True), (7, 7, True), (8, 9, False)]
    assert held[-1].owner == Owner(**{**held[-1].owner.__dict__})  # all its fields read back
    assert held[-1].owner.pid == os.getpid() and abs(held[-1].owner.at - time.time()) < 60
    enrollment.release_ids(out, ["device-8"])
    assert (out / "enrollment.reserved").read_text().splitlines()[:2] == ["device-0..device-2", "device-7"]
    assert enrollment._reserved(out)[-1] == (9, 9)
    (out / "enrollment.reserved").write_text("device-0 pid=x host=h at=1\n")
    with pytest.raises(enrollment.ConfigError, match="line 1: .* is not a reservation"):
        enrollment.read_reservations(out)


def test_a_failure_at_the_first_token_leaves_an_earlier_releases_folder_as_it_was(
    tmp_path, monkeypatch
) -> None:
    """Giving back a reservation with no token issued records nothing: a folder of the earlier release (tokens
    and its mark, no ledger) gets no ledger from a run that issued nothing."""
    from deltaplane.serve.client import AdminClient, ServiceError

    def refuse(self, d, c, **kw):
        raise ServiceError(503, "busy")

    monkeypatch.setattr(AdminClient, "issue_token", refuse)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    out = tmp_path / "tokens"
    out.mkdir()
    for name, text in [
        ("device-0.token", "t0"),
        ("device-1.token", "t1"),
        ("enrollment.issued", "device-1\n"),
    ]:
        (out / name).write_text(text)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = CliRunner().invoke(
        app, ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", str(out), "--add", "1"]
    )
    assert r.exit_code == 1, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

"""An enrollment folder's ids: an id its ledger (`enrollment.ledger`) records, or at or below an earlier release's
`enrollment.issued` mark, never gets a second key silently (`keys certify --device I [--force]`, `fleet enroll
--devices N`) while an id never issued is free, concurrent runs issuing ids there take turns on a lock on the
folder (`fleet enroll` not while the service answers: its ids are reserved), and a `keys certify` run that fails
or is interrupted part-way leaves the folder as it found it (the ledger, the mark, and the files a `--force` run
replaced, included)."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltaplane.aggregation.secagg.enrollment as enrollment
from deltaplane.aggregation.secagg.enrollment import record_issued
from deltaplane.cli import app


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(folder.iterdir())}


def test_an_issued_id_never_gets_a_second_key_silently(cli, authority, tmp_path) -> None:
    """`keys certify --device 1` re-keyed device-1 once its files were removed, and `--device 2 --force` replaced
    device-2's key while its first certificate stayed valid: now both are refused (exit 2, nothing written,
    saying to enrol a new id with --add, or --reissue-ids), `--add` takes a new id, and `--reissue-ids` is the
    one way to give an issued id a new key."""
    _, key = authority
    out = tmp_path / "nodes"
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--devices", 3).exit_code == 0
    for p in out.glob("device-1.*"):
        p.unlink()
    before = _snapshot(out)
    for args in (["--device", 1], ["--device", 1, "--force"], ["--device", 2, "--force"]):
        r = cli("keys", "certify", "--authority-key", key, "--out", out, *args)
        flat = _flat(r.output)
        assert r.exit_code == 2, (args, flat)
        assert "already issued or revoked" in flat and "--add" in flat and "--reissue-ids" in flat, flat
        assert _snapshot(out) == before, args
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1)
    assert r.exit_code == 0 and "device-3: flower-supernode" in r.output, r.output
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 1, "--reissue-ids")
    assert r.exit_code == 0 and (out / "device-1.cert").exists(), r.output
    # a request of a new key for an issued id is refused too; one for the key OUT holds is a renewal
    node = tmp_path / "node"
    assert cli("keys", "identity", "--device", 0, "--out", node).exit_code == 0
    (out / "device-0.identity.pem").unlink()  # device-0's certificate stays: it names the key issued first
    req = node / "device-0.request"

    def certify_request(folder: Path, *force: str) -> int:
        return cli(
            "keys", "certify", "--authority-key", key, "--out", folder, "--request", req, *force
        ).exit_code

    assert certify_request(out, "--force") == 2  # device-0's issued certificate names another key
    assert not (out / "device-0.identity.pem").exists()
    assert certify_request(node) == 0  # the node's own folder: its key, then a renewal of it
    r = cli("keys", "certify", "--authority-key", key, "--out", node, "--request", req, "--force")
    assert r.exit_code == 0, r.output


def test_fleet_enroll_refuses_ids_below_the_folders_mark(tmp_path, monkeypatch) -> None:
    """`fleet enroll --devices 3` into a folder whose mark is device-4 (its files removed) asked the service for
    device-0 … device-2's tokens again; now a usage error before any token, naming --add."""
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out = tmp_path / "fleet"
    out.mkdir()
    (out / "enrollment.issued").write_text("device-4\n")
    r = CliRunner().invoke(
        app, ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", str(out), "--devices", "3"]
    )
    flat = _flat(r.output)
    assert r.exit_code == 2 and "device-0, device-1, device-2 were already issued or revoked" in flat, flat
    assert "--add K" in flat and sorted(p.name for p in out.iterdir()) == ["enrollment.issued"]


def _waiting_on_flock(pid: int) -> bool:
    """Whether process ``pid`` is blocked waiting for a flock (Linux's /proc/locks lists waiters with '->');
    False where it cannot be told (no /proc/locks, another pid namespace): the caller then waits its deadline."""
    locks = Path("/proc/locks")
    for line in locks.read_text().splitlines() if locks.exists() else []:
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and str(pid) in fields:
            return True
    return False


def test_a_concurrent_add_waits_for_the_folders_lock_and_takes_ids_past_the_other_runs(
    authority, tmp_path
) -> None:
    """Two `--add` runs chose their ids and raised the mark without a lock: the later one could take the same
    ids, or write the mark back below the other's. Another process holding the folder's lock (here this test,
    issuing device-7 as a concurrent run would) now makes `keys certify --add 1` wait, then take device-8. The
    lock is released once the run is seen waiting, or after a deadline: a run that does not wait has then ended
    with device-2 (as on main)."""
    _, key = authority
    out = tmp_path / "nodes"
    cmd = [
        sys.executable,
        "-m",
        "deltaplane",
        "keys",
        "certify",
        "--authority-key",
        str(key),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this test's deltaplane
    assert subprocess.run([*cmd, "--devices", "2"], env=env, capture_output=True, timeout=120).returncode == 0
    # the lock every run issuing ids in OUT takes (enrollment_lock): a flock of the folder itself
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        other = subprocess.Popen(
            [*cmd, "--add", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while not _waiting_on_flock(other.pid) and other.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        record_issued(out, ["device-7"])  # the run holding the lock issues device-7 meanwhile
    finally:
        os.close(fd)
    said = other.communicate(timeout=120)[0].decode()
    assert other.returncode == 0 and "device-8: flower-supernode" in said, said
    assert (out / "enrollment.issued").read_text() == "device-8\n"


def test_an_interrupted_certify_leaves_the_folder_as_it_found_it(
    cli, authority, tmp_path, monkeypatch
) -> None:
    """`keys certify --devices 3` stopped by ctrl-C after device-0 and device-1 were written left their files
    with no mark raised; now every file is taken back (the run is all or nothing)."""
    _, key = authority
    out = tmp_path / "nodes"
    written = enrollment.write_identity

    def stopped(folder, identity, **kw):
        if identity.device_id == "device-2":
            raise KeyboardInterrupt
        return written(folder, identity, **kw)

    monkeypatch.setattr(enrollment, "write_identity", stopped)
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--devices", 3)
    assert r.exit_code != 0 and isinstance(r.exception, KeyboardInterrupt | SystemExit), (
        r.exception,
        r.output,
    )
    assert not out.exists() or list(out.iterdir()) == []


def test_a_failed_force_run_restores_every_file_it_replaced(cli, authority, tmp_path, monkeypatch) -> None:
    """A multi-device `--force` run whose write failed part-way kept the keys and certificates it had already
    replaced (only the failing device's own new key was taken back): the nodes' files no longer matched the
    certificates they had been sent. Now every replaced file is put back, bytes and mode, and the mark too."""
    _, key = authority
    out, node = tmp_path / "nodes", tmp_path / "node"
    for i in range(2):
        assert cli("keys", "identity", "--device", i, "--out", node).exit_code == 0
    requests = ["--request", node / "device-0.request", "--request", node / "device-1.request"]
    assert cli("keys", "certify", "--authority-key", key, "--out", out, *requests).exit_code == 0
    before = _snapshot(out)
    certified = enrollment.write_certificate

    def failing(folder, certificate, **kw):
        if certificate.device_id == "device-1":
            raise PermissionError(13, "Permission denied", str(folder / "device-1.cert"))
        return certified(folder, certificate, **kw)

    monkeypatch.setattr(enrollment, "write_certificate", failing)
    r = cli("keys", "certify", "--authority-key", key, "--out", out, *requests, "--force", "--valid-days", 2)
    assert r.exit_code == 1 and "device-1.cert" in r.output, r.output
    assert _snapshot(out) == before


def test_only_the_ids_issued_are_refused_not_every_id_below_the_highest(cli, authority, tmp_path) -> None:
    """`keys certify --device 7` on an empty folder raised the mark to device-7, and device-0 … device-6, never
    issued, were refused too (`--reissue-ids` the only way out). The ledger now records exactly the ids issued:
    device-3 is certified, device-3 and device-7 are refused then, `--add 1` still takes device-8. A folder of
    the previous release (its mark alone, device-4) keeps refusing every id up to its mark."""
    _, key = authority
    out = tmp_path / "nodes"

    def certify(*args: object) -> int:
        return cli("keys", "certify", "--authority-key", key, "--out", out, *args).exit_code

    assert certify("--device", 7) == 0
    assert certify("--device", 3) == 0  # before: exit 2, device-3 at or below device-7
    assert (out / "enrollment.ledger").read_text() == "device-3\ndevice-7\n"
    for p in [*out.glob("device-3.*"), *out.glob("device-7.*")]:
        p.unlink()
    assert certify("--device", 3) == 2 and certify("--device", 7) == 2
    assert certify("--add", 1) == 0 and (out / "device-8.cert").exists()
    assert (out / "enrollment.issued").read_text() == "device-8\n"  # what an earlier release reads
    shutil.rmtree(out)
    out.mkdir()
    (out / "enrollment.issued").write_text("device-4\n")  # the previous release's folder
    assert certify("--device", 3) == 2
    assert certify("--device", 6) == 0
    assert certify("--device", 5) == 0  # before: exit 2, device-5 at or below device-6
    assert (out / "enrollment.ledger").read_text() == "device-0..device-6\n"
    (out / "enrollment.issued").write_text(
        "device-9\n"
    )  # the previous release issued device-7 … device-9 since
    assert certify("--device", 8) == 2 and certify("--device", 12) == 0
    assert (out / "enrollment.ledger").read_text() == "device-0..device-9\ndevice-12\n"


def test_the_ledger_is_bounded_and_a_damaged_one_is_refused(cli, authority, tmp_path, monkeypatch) -> None:
    """A ledger past its bound (LEDGER_MAX_BYTES) is refused before anything is written, and one that is not
    ranges of device ids (edited by hand) is refused naming its file and line: guessing could reissue an id."""
    _, key = authority
    out = tmp_path / "nodes"
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 0).exit_code == 0
    before = _snapshot(out)
    monkeypatch.setattr(enrollment, "LEDGER_MAX_BYTES", len("device-0\ndevice-2\n") - 1)
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 2)
    assert r.exit_code == 2 and "separate id ranges" in _flat(r.output), r.output
    assert _snapshot(out) == before
    # fleet enroll: refused before it asks the service for any token (once issued, their ids must be recorded)
    from deltaplane.serve.client import AdminClient

    asked: list[str] = []
    monkeypatch.setattr(AdminClient, "issue_token", lambda self, d, c, **kw: asked.append(d) or f"tok-{d}")
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "enrollment.ledger").write_text("device-9\n")
    monkeypatch.setattr(enrollment, "LEDGER_MAX_BYTES", len("device-0..device-1\ndevice-9\n") - 1)
    args = ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", str(tokens), "--devices", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "separate id ranges" in _flat(r.output), r.output
    assert asked == [] and sorted(p.name for p in tokens.iterdir()) == ["enrollment.ledger"]
    monkeypatch.undo()
    (out / "enrollment.ledger").write_text("device-0\ndevice-x\n")
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 2)
    flat = _flat(r.output)
    assert r.exit_code == 2 and "enrollment.ledger, line 2: 'device-x' is not a device id range" in flat, flat


def test_fleet_enroll_does_not_hold_the_folders_lock_while_the_service_answers(tmp_path, monkeypatch) -> None:
    """`fleet enroll` held OUT's lock while it asked the service for each token: a slow service kept every other
    run on OUT waiting. Now its ids are reserved (`enrollment.reserved`) under the lock, the tokens asked for
    without it, then recorded under it: while the service answers, the lock is free, another run refuses the
    reserved ids and `--add` takes ids past them; the reservation is gone once the run is done."""
    from deltaplane.serve.client import AdminClient

    out = tmp_path / "tokens"
    seen: list[object] = []

    def issue(self, d, c, **kw):
        if not seen:
            fd = os.open(out, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the run holds it
                seen.append(enrollment.next_device_ids(out, 1))
                for check in (enrollment.check_not_reserved, enrollment.check_not_issued):
                    try:
                        check(out, ["device-1"])
                        seen.append(f"{check.__name__} passed")
                    except enrollment.ConfigError as exc:
                        seen.append(str(exc))
            finally:
                os.close(fd)
        return f"tok-{d}"

    monkeypatch.setattr(AdminClient, "issue_token", issue)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    args = ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", str(out), "--devices", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, (r.output, r.exception)
    assert seen[0] == ["device-2"] and "being issued by another run" in str(seen[1]), seen
    assert seen[2] == "check_not_issued passed", seen  # reserved, not issued: only the reservation refuses it
    assert sorted(p.name for p in out.iterdir()) == [
        "device-0.token",
        "device-1.token",
        "enrollment.issued",
        "enrollment.ledger",
    ]


def _run_waiting_on_the_folders_lock(out: Path, cmd: list[str], meanwhile) -> tuple[bool, subprocess.Popen]:
    """Start ``cmd`` while this process holds ``out``'s lock (what enrollment_lock takes: a flock of the folder),
    wait until it is seen waiting for that lock (or a deadline, or its end), call ``meanwhile()``, then release
    the lock; returns whether it was seen waiting, still running, and the process. Skips where a waiter cannot
    be told (no /proc/locks)."""
    if not Path("/proc/locks").exists():
        pytest.skip("cannot tell a process waiting on a flock here (no /proc/locks)")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this test's deltaplane
        other = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not _waiting_on_flock(other.pid) and other.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        waited = _waiting_on_flock(other.pid) and other.poll() is None
        meanwhile()
    finally:
        os.close(fd)
    return waited, other


def test_a_requests_held_key_is_checked_under_the_folders_lock(authority, tmp_path) -> None:
    """`keys certify --request` checked the identity key OUT holds for the device before taking OUT's lock: a
    key written there meanwhile (another run, the node sharing the folder) ended up beside a certificate for
    another key. The check now runs under the lock: the run refuses it (exit 2) and writes no certificate."""
    _, key = authority
    out, node = tmp_path / "nodes", tmp_path / "node"
    base = [sys.executable, "-m", "deltaplane", "keys"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for folder in (node, tmp_path / "other"):
        made = subprocess.run(
            [*base, "identity", "--device", "0", "--out", str(folder)],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert made.returncode == 0, made.stderr
    out.mkdir()
    certify = [*base, "certify", "--authority-key", str(key), "--out", str(out)]
    stale = (tmp_path / "other" / "device-0.identity.pem").read_bytes()
    waited, other = _run_waiting_on_the_folders_lock(
        out,
        [*certify, "--request", str(node / "device-0.request")],
        lambda: (out / "device-0.identity.pem").write_bytes(stale),
    )
    said = other.communicate(timeout=120)[0].decode()
    assert waited, said
    assert other.returncode == 2 and "holds another identity key" in " ".join(said.split()), said
    assert not (out / "device-0.cert").exists()


def test_revoke_enrolled_records_its_ids_under_the_folders_lock(authority, tmp_path) -> None:
    """`keys revoke --enrolled OUT` records the ids it revokes in OUT's ledger under OUT's lock, as issuing there
    does: a run holding the lock (here this test, issuing device-7) makes it wait, and the ledger ends with both
    runs' ids (without the lock, a read-modify-write could drop the other run's)."""
    _, key = authority
    out = tmp_path / "nodes"
    run = [sys.executable, "-m", "deltaplane", "keys"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    certify = [*run, "certify", "--authority-key", str(key), "--out", str(out), "--devices", "2"]
    assert subprocess.run(certify, env=env, capture_output=True, timeout=120).returncode == 0
    revoke = [*run, "revoke", "--authority-key", str(key), "--out", str(tmp_path / "crl.bin")]
    waited, other = _run_waiting_on_the_folders_lock(
        out, [*revoke, "--device", "3", "--enrolled", str(out)], lambda: record_issued(out, ["device-7"])
    )
    said = other.communicate(timeout=120)[0].decode()
    assert waited, said  # it waited for the lock, not ran past it
    assert other.returncode == 0, said
    assert (out / "enrollment.ledger").read_text() == "device-0..device-1\ndevice-3\ndevice-7\n"


def test_a_reservation_leaves_room_in_the_ledger_for_the_runs_in_flight(tmp_path, monkeypatch) -> None:
    """Before, reserve_ids checked that the ledger could hold its own ids, not those other runs had reserved
    and not yet recorded: two concurrent fleet enroll runs each passed, and the second's record_issued was
    refused once the service had issued its tokens (valid there, never written). Now the second is refused
    when it reserves, before it asks for any token."""
    from deltaplane.aggregation.secagg.enrollment import release_ids, reserve_ids
    from deltaplane.errors import ConfigError

    out = tmp_path / "tokens"
    out.mkdir()
    (out / "enrollment.ledger").write_text("device-0\n")
    monkeypatch.setattr(enrollment, "LEDGER_MAX_BYTES", len("device-0\ndevice-2\ndevice-4\n") - 1)
    reserve_ids(out, ["device-2"])  # run A: the ledger can hold device-2
    with pytest.raises(ConfigError, match="separate id ranges"):
        reserve_ids(out, ["device-4"])  # run B: not device-2 and device-4 together
    record_issued(out, ["device-2"])  # run A's tokens are issued: its record holds
    release_ids(out, ["device-2"])
    assert (out / "enrollment.ledger").read_text() == "device-0\ndevice-2\n"
    assert not (out / "enrollment.reserved").exists()


def test_keys_certify_leaves_room_in_the_ledger_for_a_fleet_enroll_in_flight(
    cli, authority, tmp_path, monkeypatch
):
    """Before, `keys certify` checked that the ledger could hold its own ids, not those a `fleet enroll` run had
    reserved while the service issued their tokens: certifying device-4 beside a run that reserved device-2 took
    the ledger's last room, and that run's record_issued was refused once its tokens were issued (valid on the
    service, never written). Both now go through one capacity check (check_ledger_room) counting the ledger,
    every reservation and the run's own ids: `keys certify` is refused, leaving the folder as it was, and the
    enroll run records its tokens."""
    from deltaplane.aggregation.secagg.enrollment import release_ids, reserve_ids

    _, key = authority
    out = tmp_path / "nodes"
    out.mkdir()
    (out / "enrollment.ledger").write_text("device-0\n")
    monkeypatch.setattr(enrollment, "LEDGER_MAX_BYTES", len("device-0\ndevice-2\ndevice-4\n") - 1)
    reserve_ids(out, ["device-2"])  # fleet enroll: reserved under the lock, now asking the service
    before = _snapshot(out)
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 4)
    assert r.exit_code == 2 and "separate id ranges" in _flat(r.output), r.output  # before: exit 0
    assert _snapshot(out) == before
    record_issued(out, ["device-2"])  # the enroll run's tokens are issued: its record holds
    release_ids(out, ["device-2"])
    assert (out / "enrollment.ledger").read_text() == "device-0\ndevice-2\n"


@pytest.mark.parametrize("name", ["enrollment.ledger", "enrollment.reserved", "enrollment.issued"])
def test_the_id_files_are_read_bounded_and_a_fifo_or_link_to_one_is_refused(cli, authority, tmp_path, name):
    """The ledger, the reservations and the mark are read as the other enrolment files are (read_bounded_text):
    a FIFO there, or a link to one, is refused naming its kind (never an open that waits for a writer), and a
    file past its bound is refused unread, each a usage error (exit 2) leaving the folder as it was."""
    _, key = authority
    out = tmp_path / "nodes"
    out.mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for make in (lambda p: os.mkfifo(p), lambda p: p.symlink_to(fifo)):
        make(out / name)
        r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1)
        assert r.exit_code == 2 and "must be a regular file, not a FIFO" in _flat(r.output), r.output
        assert sorted(p.name for p in out.iterdir()) == [name]
        (out / name).unlink()
    # the reservations' lines name their run too: that file's own bound (RESERVED_MAX_BYTES)
    limit = enrollment.RESERVED_MAX_BYTES if name == "enrollment.reserved" else enrollment.LEDGER_MAX_BYTES
    (out / name).write_bytes(b"device-0\n" * (limit // 9 + 1))
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--add", 1)
    assert r.exit_code == 2 and "over the" in _flat(r.output), r.output
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_an_earlier_releases_revocation_of_an_id_in_a_gap_is_never_handed_out_by_add(
    cli, authority, tmp_path
):
    """An earlier release knew only the mark: `keys revoke --device 5 --enrolled OUT` there, on a folder whose
    ledger holds device-3 and device-7 (mark device-7), left the ledger and the mark as they were, so nothing
    in OUT says device-5 was revoked. No folder-only check can tell, and none needs to: `--add` takes ids past
    the ledger's last (device-8), never one in a gap; an id chosen by hand is refused when the list is given
    (--revocations); without it, the service and the devices match the list by id, so a key or token issued to
    device-5 is refused in every round (it fails closed), and its earlier key, if any, stays revoked by
    fingerprint. A folder the earlier release wrote alone (its mark, no ledger) refuses every id up to it."""
    _, key = authority
    out = tmp_path / "nodes"
    crl = tmp_path / "crl.bin"

    def certify(*args: object) -> int:
        return cli("keys", "certify", "--authority-key", key, "--out", out, *args).exit_code

    assert certify("--device", 3) == 0 and certify("--device", 7) == 0
    before = _snapshot(out)
    # the earlier release's revocation: the list names device-5, the folder is left exactly as it was
    assert cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 5).exit_code == 0
    assert _snapshot(out) == before and (out / "enrollment.issued").read_text() == "device-7\n"
    assert certify("--add", 1) == 0 and (out / "device-8.cert").exists()
    assert certify("--add", 1, "--revocations", crl) == 0 and (out / "device-9.cert").exists()
    r = cli("keys", "certify", "--authority-key", key, "--out", out, "--device", 5, "--revocations", crl)
    assert r.exit_code == 2 and "device-5 is revoked" in _flat(r.output), r.output
    assert not (out / "device-5.cert").exists()
    assert (out / "enrollment.ledger").read_text() == "device-3\ndevice-7..device-9\n"
    old = tmp_path / "old"
    old.mkdir()
    (old / "enrollment.issued").write_text("device-7\n")  # the earlier release's own folder
    r = cli("keys", "certify", "--authority-key", key, "--out", old, "--device", 5)
    assert r.exit_code == 2 and "already issued or revoked" in _flat(r.output), r.output


def test_a_part_way_enroll_near_the_bound_is_refused_before_any_token_not_after(
    tmp_path, monkeypatch
) -> None:
    """A reservation was counted merged with its neighbours: `fleet enroll --devices 7` beside a ledger holding
    device-7 counted one line (device-0..device-7). Failing part-way (the service refused device-3), the run
    records device-0..device-2 alone, a second line: past the bound, that record was refused once the service
    had issued three tokens, which were then neither recorded nor written. A reserved run now counts as its own
    line until recorded, so the run is refused when it reserves, before it asks for any token."""
    from deltaplane.serve.client import AdminClient, ServiceError

    asked: list[str] = []

    def issue(self, d, c, **kw):
        asked.append(d)
        if d == "device-3":
            raise ServiceError(503, "busy")
        return f"tok-{d}"

    monkeypatch.setattr(AdminClient, "issue_token", issue)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "a" * 20)
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "enrollment.ledger").write_text("device-7\n")
    monkeypatch.setattr(enrollment, "LEDGER_MAX_BYTES", len("device-0..device-7\n"))
    args = ["fleet", "enroll", "--url", "http://127.0.0.1:9", "--out", str(out), "--devices", "7"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "separate id ranges" in _flat(r.output), r.output
    assert asked == [], asked  # before: device-0 … device-3 asked, three tokens issued and lost
    assert sorted(p.name for p in out.iterdir()) == ["enrollment.ledger"]


def test_revoke_enrolled_near_the_bound_is_refused_before_writing_its_list(
    cli, authority, tmp_path, monkeypatch
):
    """`keys revoke --enrolled DIR` wrote the revocation list, then found DIR's ledger could not hold the revoked
    id (exit 2 with the list written: a list revoking an id the folder does not record). The ledger's room is
    now checked first, under DIR's lock: refused, nothing written."""
    _, key = authority
    out = tmp_path / "nodes"
    assert cli("keys", "certify", "--authority-key", key, "--out", out, "--devices", 2).exit_code == 0
    monkeypatch.setattr(enrollment, "LEDGER_MAX_BYTES", len("device-0..device-1\n"))
    before = _snapshot(out)
    crl = tmp_path / "crl.bin"
    r = cli("keys", "revoke", "--authority-key", key, "--out", crl, "--device", 5, "--enrolled", out)
    assert r.exit_code == 2 and "separate id ranges" in _flat(r.output), r.output
    assert not crl.exists() and _snapshot(out) == before

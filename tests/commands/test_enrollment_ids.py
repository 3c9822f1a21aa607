"""An enrollment folder's ids: an id at or below `enrollment.issued` never gets a second key silently (`keys
certify --device I [--force]`, `fleet enroll --devices N`), concurrent runs issuing ids there take turns on a lock
on the folder, and a `keys certify` run that fails or is interrupted part-way leaves the folder as it found it
(the mark, and the files a `--force` run replaced, included)."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

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
        assert "highest id issued or revoked" in flat and "--add" in flat and "--reissue-ids" in flat, flat
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
    assert r.exit_code == 2 and "device-0, device-1, device-2 are at or below device-4" in flat, flat
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

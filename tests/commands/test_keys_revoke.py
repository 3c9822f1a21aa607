"""``deltaplane keys revoke``: the enrollment authority's revocation list, appended to with a growing sequence,
signed so devices verify it, refused when it is another authority's or not a list at all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from deltaplane.aggregation.secagg import DeviceCertificate, EnrollmentAuthority, SecAggAuthError
from deltaplane.aggregation.secagg.revocation import (
    DEFAULT_VALID_DAYS,
    MAX_VALID_DAYS,
    RevocationList,
    load_revocations,
)
from deltaplane.commands.fleet import _credentials
from deltaplane.commands.ops import REVOCATION_MAX_VALID_DAYS, REVOCATION_VALID_DAYS
from deltaplane.errors import ConfigError


def _cert(auth: EnrollmentAuthority, device: str, cohort: str = "fleet") -> DeviceCertificate:
    return auth.issue(device, bytes(32), cohort=cohort, expires=2**40)


def test_revoke_appends_with_a_growing_sequence(cli, authority, tmp_path) -> None:
    auth, key = authority
    out = tmp_path / "crl" / "revoked.bin"
    out.parent.mkdir()
    r = cli("keys", "revoke", "--authority-key", key, "--device", 3, "--device", 3, "--out", out)
    assert r.exit_code == 0, r.output
    assert "number 1" in r.output and "1 device revoked" in r.output
    first = load_revocations(out, auth.trust())
    assert first.sequence == 1 and first.names(_cert(auth, "device-3"))
    r = cli("keys", "revoke", "--authority-key", key, "--device", 5, "--cohort", "lab", "--out", out)
    assert r.exit_code == 0, r.output
    second = load_revocations(out, auth.trust())
    assert second.sequence == 2 and second.revoked == {("device-3", "fleet"), ("device-5", "lab")}
    assert not second.names(_cert(auth, "device-5")) and second.names(_cert(auth, "device-5", "lab"))
    assert not second.names(_cert(EnrollmentAuthority.generate(), "device-3"))  # another authority's cert
    assert second.supersedes(first) is True
    # no temp file left; the lock file of concurrent runs stays (removing it would let two runs lock two files)
    assert sorted(p.name for p in out.parent.iterdir()) == ["revoked.bin", "revoked.bin.lock"]


def test_revoke_refuses_another_authoritys_list_and_garbage(cli, authority, tmp_path) -> None:
    _, key = authority
    other = tmp_path / "other.pem"
    other.write_bytes(EnrollmentAuthority.generate().to_pem())
    out = tmp_path / "revoked.bin"
    assert cli("keys", "revoke", "--authority-key", other, "--device", 1, "--out", out).exit_code == 0
    before = out.read_bytes()
    # usage errors in the operator's words (they were exit 1 saying "which this device does not trust")
    r = cli("keys", "revoke", "--authority-key", key, "--device", 2, "--out", out)
    assert r.exit_code == 2 and "authority" in r.output and "not this key's" in r.output, r.output
    assert out.read_bytes() == before
    out.write_bytes(before[:-3])
    r = cli("keys", "revoke", "--authority-key", key, "--device", 2, "--out", out)
    assert r.exit_code == 2 and "keys revoke` wrote" in r.output and str(out) in r.output, r.output
    assert out.read_bytes() == before[:-3]  # nothing written over it
    forged = bytearray(before)
    forged[-1] ^= 1  # the other authority's own list, signature altered: refused under its own key too
    out.write_bytes(bytes(forged))
    r = cli("keys", "revoke", "--authority-key", other, "--device", 2, "--out", out)
    assert r.exit_code == 2 and "does not verify under this authority key" in r.output, r.output
    assert out.read_bytes() == bytes(forged)
    r = cli("keys", "revoke", "--authority-key", out, "--device", 2, "--out", tmp_path / "x")
    assert r.exit_code != 0 and "give the enrollment authority's private key" in r.output


def test_fleet_device_reads_revocations_only_with_its_enrollment(cli, authority, tmp_path) -> None:
    auth, key = authority
    out = tmp_path / "ids"
    assert cli("keys", "certify", "--authority-key", key, "--device", 0, "--out", out).exit_code == 0
    crl = tmp_path / "revoked.bin"
    assert cli("keys", "revoke", "--authority-key", key, "--device", 4, "--out", crl).exit_code == 0
    files = out / "device-0.identity.pem", out / "device-0.cert", out / "enrollment.ed25519.pub"
    creds = _credentials(*files, crl)
    assert isinstance(creds.revocations, RevocationList) and creds.revocations.names(_cert(auth, "device-4"))
    with pytest.raises(ConfigError, match="--revocations goes with"):
        _credentials(None, None, None, crl)
    foreign = tmp_path / "foreign.bin"
    other = tmp_path / "other.pem"
    other.write_bytes(EnrollmentAuthority.generate().to_pem())
    assert cli("keys", "revoke", "--authority-key", other, "--device", 4, "--out", foreign).exit_code == 0
    with pytest.raises(SecAggAuthError, match="foreign.bin.*does not trust"):
        _credentials(*files, foreign)
    # a list revoking the device itself: refused at start (it would advertise, and every neighbour holding the
    # list would refuse the roster seating it: the round failing for all)
    assert cli("keys", "revoke", "--authority-key", key, "--device", 0, "--out", crl).exit_code == 0
    with pytest.raises(
        ConfigError, match=r"revoked.bin revokes this device's certificate.*'device-0'.*new device id"
    ):
        _credentials(*files, crl)


def test_valid_days_sets_the_next_update_and_no_device_re_issues(cli, authority, tmp_path) -> None:
    auth, key = authority
    out = tmp_path / "revoked.bin"
    before = int(time.time())
    r = cli("keys", "revoke", "--authority-key", key, "--device", 3, "--valid-days", 2, "--out", out)
    assert r.exit_code == 0 and "current until" in r.output, r.output
    first = load_revocations(out, auth.trust())
    assert before + 172_800 <= first.next_update <= int(time.time()) + 172_800
    r = cli("keys", "revoke", "--authority-key", key, "--out", out)  # no --device: re-issued, default 7 days
    assert r.exit_code == 0, r.output
    again = load_revocations(out, auth.trust())
    assert again.sequence == 2 and again.revoked == first.revoked
    assert before + 604_800 <= again.next_update <= int(time.time()) + 604_800
    for days in (0, 91):
        r = cli("keys", "revoke", "--authority-key", key, "--valid-days", days, "--out", out)
        assert r.exit_code != 0
    assert load_revocations(out, auth.trust()) == again
    # the CLI's literals (kept out of its import path) are the module's
    assert (REVOCATION_VALID_DAYS, REVOCATION_MAX_VALID_DAYS) == (DEFAULT_VALID_DAYS, MAX_VALID_DAYS)


def test_fleet_device_starts_without_its_list_file_and_refuses_a_v1_one(cli, authority, tmp_path) -> None:
    _, key = authority
    out = tmp_path / "ids"
    assert cli("keys", "certify", "--authority-key", key, "--device", 0, "--out", out).exit_code == 0
    files = out / "device-0.identity.pem", out / "device-0.cert", out / "enrollment.ed25519.pub"
    creds = _credentials(*files, out / "device-0.revocations")  # not fetched yet: no list held
    assert creds.revocations is None
    (out / "v1.bin").write_bytes(b"DPRL\x01" + bytes(100))
    with pytest.raises(SecAggAuthError, match="re-issue it with `deltaplane keys revoke"):
        _credentials(*files, out / "v1.bin")


# Run `keys revoke` in its own process, its list built slowly: between reading OUT and writing it, each run marks
# itself and waits (up to 10 s) for the other run to be there too. Without a lock both get there, having read the
# same old list; with it the second waits for the first's write, so the first waits its 10 s alone.
_SLOW_REVOKE = textwrap.dedent(
    """
    import pathlib, sys, time
    import deltaplane.aggregation.secagg.revocation as rev
    from deltaplane.cli import app
    me, other, *args = sys.argv[1:]
    real = rev.revoke
    def slow(*a, **k):
        pathlib.Path(me).touch()
        deadline = time.monotonic() + 10
        while not pathlib.Path(other).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*a, **k)
    rev.revoke = slow
    app(args)
    """
)


def test_concurrent_revokes_on_one_out_take_turns(authority, tmp_path) -> None:
    """Two `keys revoke` runs racing on one --out: the second reads the first's list and numbers its own one past
    it, holding both devices (never two different lists of number 1)."""
    auth, key = authority
    out = tmp_path / "revoked.bin"
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SLOW_REVOKE,
                str(tmp_path / f"in-{i}"),
                str(tmp_path / f"in-{1 - i}"),
                *("keys", "revoke", "--authority-key", str(key), "--device", str(d), "--out", str(out)),
            ],
            env={**os.environ, "COLUMNS": "300"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, d in enumerate((3, 5))
    ]
    outputs = [r.communicate(timeout=120)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outputs
    assert sorted("number 1" in o for o in outputs) == [False, True], outputs  # one run each number
    final = load_revocations(out, auth.trust())
    assert final.sequence == 2 and final.revoked == {("device-3", "fleet"), ("device-5", "fleet")}

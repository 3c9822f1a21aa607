"""The service never goes back to an older revocation list, not even across a restart: it keeps the highest list
of each enrollment authority it has held (number and digest) in its database, and refuses its list file when it
holds an older one — replaced by hand, restored from a backup, or written by someone who has the file but not
the authority key — at start, at each authenticated round open and at each device fetch, naming both numbers.
Before, only an upload was compared (with the file), so a rolled-back file un-revoked devices at the next
round open or restart."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from tests.serve import test_secagg_auth_http
from tests.serve.conftest import Service
from tests.serve.test_rounds import restart
from tests.serve.test_secagg_auth_http import _open
from tests.serve.test_secagg_revocation_http import _BODY, NAMES, REVOKED, _uploading_service

from deltaplane.aggregation.secagg.errors import RevocationRollback
from deltaplane.aggregation.secagg.revocation import revoke, write_revocations
from deltaplane.errors import ConfigError
from deltaplane.registry import Registry
from deltaplane.serve import ServiceError

authority = test_secagg_auth_http.authority  # the module-scoped fixture


@pytest.fixture
def lists(authority):
    """Lists 1 and 2 of the authority (2 revokes dev-4), and another list numbered 2 (revoking dev-5 instead)."""
    now = int(time.time())
    first = revoke(authority, [], issued=now)
    second = revoke(authority, [(NAMES[REVOKED], "fleet")], issued=now, previous=first)
    forked = revoke(authority, [(NAMES[5], "fleet")], issued=now, previous=first)
    return first, second, forked


def _refused(call) -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        call()
    return exc.value


def test_a_list_file_rolled_back_by_hand_is_refused_at_open_fetch_and_restart(
    service_factory, authority, lists, tmp_path
) -> None:
    first, second, forked = lists
    svc, path = _uploading_service(service_factory, authority, tmp_path, held=first)
    svc.admin.upload_revocations(second.to_bytes())
    assert _open(svc, NAMES)  # list 2 held: dev-4 is left out
    write_revocations(path, first)  # the file, rolled back by hand: list 1 seats dev-4 again
    err = _refused(lambda: _open(svc, NAMES))
    assert err.status == 409
    assert "revoked.bin: refused revocation list number 1: this service holds number 2" in err.detail
    assert "keys revoke" in err.detail
    err = _refused(lambda: svc.device(NAMES[0]).request("GET", "/v1/secagg/revocations"))
    assert err.status == 409 and "number 2" in err.detail
    with pytest.raises(RevocationRollback, match="number 1: this service holds number 2") as exc:
        restart(svc)  # a new app over the same home: the mark is in the database, not in memory
    assert (exc.value.sequence, exc.value.held) == (1, 2)
    write_revocations(path, forked)  # number 2 again, other contents (dev-4 not revoked)
    with pytest.raises(RevocationRollback, match="another list of that number"):
        restart(svc)
    write_revocations(path, second)  # the operator puts the newest list back: the service starts and opens
    restart(svc)
    opened = svc.admin._post("/admin/models/cnn/secagg", {**_BODY, "devices": NAMES})
    assert opened["revoked"] == [NAMES[REVOKED]]


def test_an_upload_older_than_the_highest_list_held_is_refused_though_the_file_is_gone(
    service_factory, authority, lists, tmp_path
) -> None:
    first, second, forked = lists
    svc, path = _uploading_service(service_factory, authority, tmp_path, held=second)
    path.unlink()  # the file deleted (or restored from a backup that predates it)
    for older in (first, forked):
        err = _refused(lambda older=older: svc.admin.upload_revocations(older.to_bytes()))
        assert err.status == 409 and "this service holds" in err.detail and "number 2" in err.detail
    assert not path.exists()
    assert svc.admin.upload_revocations(second.to_bytes())["replaced"] is True
    third = revoke(authority, [], issued=int(time.time()), previous=second)
    assert svc.admin.upload_revocations(third.to_bytes())["sequence"] == 3


_START = textwrap.dedent(
    """
    import sys
    from deltaplane.serve import ServiceConfig, create_app
    home, revocations, pub = sys.argv[1:]
    create_app(ServiceConfig(home=home, admin_token="a" * 24, device_secret="s" * 32,
                             secagg_revocations=revocations, secagg_authority=pub))
    print("started", flush=True)
    """
)


def test_the_highest_list_survives_a_restart_of_the_service_process(authority, lists, tmp_path) -> None:
    """Real processes, one after the other, over one registry: the first starts on list 2; its file is then
    rolled back to list 1 (validly signed), and the next process refuses to start, naming both numbers."""
    first, second, _ = lists
    home, path, pub = tmp_path / "home", tmp_path / "revoked.bin", tmp_path / "enrollment.ed25519.pub"
    Registry.create(home).close()
    pub.write_text(authority.public_text() + "\n")

    def start() -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-c", _START, str(home), str(path), str(pub)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    write_revocations(path, second)
    assert start().stdout.strip() == "started"
    write_revocations(path, first)
    refused = start()
    assert refused.returncode != 0 and "RevocationRollback" in refused.stderr, refused.stdout
    assert "refused revocation list number 1: this service holds number 2" in refused.stderr
    write_revocations(path, second)
    assert start().stdout.strip() == "started"


def test_a_service_without_the_authority_key_keeps_no_mark(
    service_factory, authority, lists, tmp_path
) -> None:
    """Unverified (no --secagg-enrollment-authority), a list could have been numbered by anyone: it does not
    raise the mark, so a later verified list is judged against the lists the service verified only."""
    _, second, _ = lists
    write_revocations(tmp_path / "revoked.bin", second)
    svc = Service(tmp_path / "home", secagg_revocations=str(tmp_path / "revoked.bin"))
    assert _open(svc, NAMES)
    from deltaplane.serve.service_store import ServiceStore

    assert ServiceStore(svc.reg).revocation_marks() == {}


def test_a_malformed_authority_key_fails_the_start_before_any_list_exists(service_factory, tmp_path) -> None:
    """The key is read at start whether or not the list file exists yet (the mark's check reads the file only)."""
    (tmp_path / "enrollment.ed25519.pub").write_text("not base64!\n")
    with pytest.raises(ConfigError, match="enrollment.ed25519.pub line 1 is not base64"):
        service_factory(
            secagg_revocations=str(tmp_path / "revoked.bin"),
            secagg_authority=str(tmp_path / "enrollment.ed25519.pub"),
        )


def test_a_fetch_that_read_the_file_just_before_an_upload_replaced_it_is_not_refused(
    service_factory, authority, lists, tmp_path, monkeypatch
) -> None:
    """An open or a device fetch reads the list file, then checks it against the mark; an upload (under its own
    lock, not theirs) may replace the file and raise the mark in between. The reader then held a list older
    than the mark and was refused as a rollback (409, "this service holds number 2"), though the file was not
    rolled back. The reader now reads the file again once before refusing: a real rollback still is."""
    from deltaplane.serve import revocation_routes

    first, second, _ = lists
    svc, path = _uploading_service(service_factory, authority, tmp_path, held=first)
    real = revocation_routes.read_server_revocations
    calls = []

    def upload_lands_after_the_read(*args, **kwargs):
        read = real(*args, **kwargs)
        if not calls:  # the first read sees list 1; the upload of list 2 completes before its check
            svc.admin.upload_revocations(second.to_bytes())
        calls.append(read.sequence)
        return read

    monkeypatch.setattr(revocation_routes, "read_server_revocations", upload_lands_after_the_read)
    got = svc.device(NAMES[0]).request("GET", "/v1/secagg/revocations").content
    assert got == second.to_bytes() and calls == [1, 2]
    write_revocations(path, first)  # a real rollback: refused after the second read too
    err = _refused(lambda: svc.device(NAMES[0]).request("GET", "/v1/secagg/revocations"))
    assert err.status == 409 and "number 2" in err.detail

"""The fleet page's revocation panel: the service's revocation list as the next authenticated round open reads
it, written by ``deltaplane keys revoke`` as an operator writes it (issued now, days ago, or not yet), with the
state the operator must act on (current, expiring, stale, missing, invalid, unchecked, authenticated rounds
without a list), every name from the list HTML-escaped, and the devices a SecAgg round left out as revoked."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import pytest
from tests.serve.test_secagg_auth_http import _creds, _open
from tests.serve.test_secagg_revocation_http import NAMES, REVOKED, _round_without_the_revoked_device
from typer.testing import CliRunner

from deltaplane.aggregation.secagg import DeviceIdentity, EnrollmentAuthority
from deltaplane.aggregation.secagg.revocation import (
    CLOCK_SKEW_S,
    load_revocations,
    revoke,
    write_revocations,
)
from deltaplane.serve import ServiceError
from deltaplane.ui import pages

DAY = 86_400


@pytest.fixture
def authority(tmp_path) -> tuple[EnrollmentAuthority, Path, Path]:
    """An enrollment authority on disk, as ``keys enrollment`` writes it: the private key and the public one."""
    auth = EnrollmentAuthority.generate()
    (tmp_path / "enrollment.ed25519.pem").write_bytes(auth.to_pem())
    (tmp_path / "enrollment.ed25519.pub").write_text(auth.public_text() + "\n")
    return auth, tmp_path / "enrollment.ed25519.pem", tmp_path / "enrollment.ed25519.pub"


def keys_revoke(key: Path, out: Path, *args: object, at: float | None = None) -> str:
    """Run ``deltaplane keys revoke --authority-key KEY --out OUT ARGS``; ``at``: the clock it reads (a list issued
    days ago, as an operator who forgot to re-issue it holds)."""
    import typer

    from deltaplane.commands.ops import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    with pytest.MonkeyPatch.context() as m:
        if at is not None:
            m.setattr(time, "time", lambda: at)
        r = CliRunner().invoke(
            app, ["keys", "revoke", "--authority-key", str(key), "--out", str(out), *map(str, args)]
        )
    assert r.exit_code == 0, r.output
    return r.output


def fleet_html(svc) -> str:
    r = svc.http.get("/ui/fleet", headers={"Authorization": f"Bearer {svc.config.admin_token}"})
    assert r.status_code == 200, r.text
    return r.text


def panel(page: str) -> tuple[str, str]:
    """The revocation panel's state and its HTML."""
    m = re.search(r'<div id="revocations" data-state="([a-z]+)">(.*?)</div>', page, re.S)
    assert m, "the fleet page has no revocation panel"
    return m.group(1), m.group(2)


def field(page: str, name: str) -> str:
    m = re.search(rf'data-field="revocations\.{name}">(.*?)</td>', page, re.S)
    assert m, name
    return html.unescape(re.sub(r"<[^>]+>", "", m.group(1)))


def warnings(page: str) -> dict[str, str]:
    return {
        k: html.unescape(re.sub(r"<[^>]+>", "", v))
        for k, v in re.findall(r'data-warning="([a-z]+)">(.*?)</p>', panel(page)[1], re.S)
    }


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def test_a_current_list_shows_its_authority_number_times_and_revoked_devices(
    service_factory, authority, tmp_path
) -> None:
    auth, key, pub = authority
    out = tmp_path / "revoked.bin"
    keys_revoke(key, out, "--device", 4, "--device", 2)
    said = keys_revoke(key, out, "--device", 3, "--cohort", "lab")
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    page = fleet_html(svc)
    state, body = panel(page)
    assert state == "current" and warnings(page) == {}
    assert field(page, "authority") == auth.id.hex()
    assert field(page, "sequence") == "2"
    issued = int(re.search(r"current until (\d+)", said).group(1)) - 7 * DAY
    assert field(page, "issued") == utc(issued)
    assert field(page, "next_update").startswith(utc(issued + 7 * DAY) + " (in 6 d 23 h")
    assert field(page, "checked") == "verified under the authority key"
    assert field(page, "revoked") == "3"
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", body)
    assert rows == [("device-2", "fleet"), ("device-3", "lab"), ("device-4", "fleet")]
    assert "Current: next update in 6 d 23 h" in body


def test_the_panel_counts_the_revoked_keys_and_names_the_first_digests(
    service_factory, authority, tmp_path
) -> None:
    """The panel counted revoked devices only: a version-3 list's revoked keys (refused under any device id)
    were invisible on the page. It counts them now and names the first few digests, shortened as `keys revoke`
    prints them; a list revoking no key says 0."""
    auth, key, pub = authority
    out = tmp_path / "revoked.bin"
    keys_revoke(key, out, "--device", 1)
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    assert field(fleet_html(svc), "keys") == "0"
    certs = []
    for i in range(7):
        ident = DeviceIdentity.enroll(auth, f"device-{i}", cohort="fleet", expires=4_000_000_000)
        certs += ["--certificate", tmp_path / f"device-{i}.cert"]
        (tmp_path / f"device-{i}.cert").write_bytes(ident.certificate.to_bytes())
    keys_revoke(key, out, *certs)
    digests = sorted(k.hex() for k in load_revocations(out, auth.trust()).keys)
    shown = ", ".join(f"SHA256:{d[:16]}…" for d in digests[:5])
    assert field(fleet_html(svc), "keys") == f"7: {shown} (+2 more)"


def test_a_list_within_a_day_of_its_next_update_says_it_expires(service_factory, authority, tmp_path) -> None:
    _, key, pub = authority
    out = tmp_path / "revoked.bin"
    now = time.time()
    keys_revoke(key, out, "--device", 1, at=now - 6.5 * DAY)  # current for 7 days: 12 h left
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    page = fleet_html(svc)
    assert panel(page)[0] == "expiring"
    (kind, text), *rest = warnings(page).items()
    assert kind == "expiring" and not rest
    assert re.match(
        r"Expires in 1[12] h \d+ min \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\): re-issue it", text
    ), text
    assert "keys revoke" in text and "POST /admin/secagg/revocations" in text
    assert _open(svc, NAMES)  # still current: authenticated rounds open


def test_a_stale_list_warns_that_authenticated_rounds_are_refused_and_they_are(
    service_factory, authority, tmp_path
) -> None:
    _, key, pub = authority
    out = tmp_path / "revoked.bin"
    issued = int(time.time() - 8 * DAY)
    keys_revoke(key, out, "--device", 4, at=issued)  # current for 7 days: a day past it
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    page = fleet_html(svc)
    assert panel(page)[0] == "stale"
    text = warnings(page)["stale"]
    assert text.startswith(f"Stale: past its next update ({utc(issued + 7 * DAY)}, 1 d 0 h ago).")
    assert f"Authenticated rounds are refused from {utc(issued + 7 * DAY + CLOCK_SKEW_S)}" in text
    assert field(page, "next_update") == f"{utc(issued + 7 * DAY)} (1 d 0 h ago)"
    overview = svc.http.get("/ui/", headers={"Authorization": f"Bearer {svc.config.admin_token}"}).text
    assert '<p class="bad" id="revocations-alert">Revocation list: stale; see the' in overview
    with pytest.raises(ServiceError) as err:  # what the panel says is what the round open does
        _open(svc, NAMES)
    assert err.value.status == 422 and "past" in err.value.detail
    keys_revoke(key, out)  # re-issued (no --device): current again, without a restart
    page = fleet_html(svc)
    assert panel(page)[0] == "current" and field(page, "sequence") == "2" and field(page, "revoked") == "1"


def test_a_list_not_written_yet_is_missing_and_a_list_of_no_service_is_said(
    service_factory, authority, tmp_path
) -> None:
    _, key, pub = authority
    out = tmp_path / "state" / "revoked.bin"
    out.parent.mkdir()
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    page = fleet_html(svc)
    assert panel(page)[0] == "missing"
    assert warnings(page)["missing"].startswith(
        f"No list held: {out} (--secagg-revocations) does not exist yet"
    )
    assert 'data-field="revocations.' not in page
    with pytest.raises(ServiceError) as err:
        _open(svc, NAMES)
    assert err.value.status == 422 and "no revocation list yet" in err.value.detail
    keys_revoke(key, out)
    svc.admin.upload_revocations(out.read_bytes())
    assert panel(fleet_html(svc))[0] == "current"


def test_authenticated_rounds_without_a_list_and_a_service_without_either(service_factory) -> None:
    svc = service_factory()
    state, body = panel(fleet_html(svc))
    assert state == "unused" and "keeps no revocation list" in body and "data-warning" not in body
    overview = svc.http.get("/ui/", headers={"Authorization": f"Bearer {svc.config.admin_token}"}).text
    assert "revocations-alert" not in overview
    _open(svc, NAMES)  # an authenticated round: nothing leaves a revoked device out
    page = fleet_html(svc)
    assert panel(page)[0] == "none"
    assert "without a revocation list: the service leaves no revoked device out" in warnings(page)["none"]


def test_a_list_held_without_the_authority_key_is_unchecked(service_factory, authority, tmp_path) -> None:
    _, key, _ = authority
    out = tmp_path / "revoked.bin"
    keys_revoke(key, out, "--device", 4)
    page = fleet_html(service_factory(secagg_revocations=str(out)))
    assert panel(page)[0] == "current"
    assert list(warnings(page)) == ["unchecked"]
    assert "does not verify the list's signature or authority" in warnings(page)["unchecked"]
    assert field(page, "checked") == "unchecked"


def test_names_from_the_list_and_its_file_are_escaped(service_factory, authority, tmp_path) -> None:
    auth, key, pub = authority
    out = tmp_path / "revoked.bin"
    hostile = "<img src=x onerror=alert(1)>"
    keys_revoke(key, out, "--device", 4, "--cohort", hostile)
    # a device id the CLI cannot write (device-I only), signed all the same by the authority
    held = load_revocations(out, auth.trust())
    write_revocations(
        out, revoke(auth, [("<script>alert('dev')</script>", "fleet")], issued=held.issued, previous=held)
    )
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    page = fleet_html(svc)
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;dev&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    # the file's name, in a refusal the panel quotes, is escaped too
    odd = tmp_path / "<b>bold<i>.bin"
    svc = service_factory(secagg_revocations=str(odd), secagg_authority=str(pub))
    odd.write_bytes(b"not a list")  # after the start, which would refuse it
    page = fleet_html(svc)
    assert panel(page)[0] == "invalid" and "<b>bold<i>" not in page
    assert warnings(page)["invalid"].startswith(f"The held list cannot be used: {odd}: ")


def test_a_list_the_authority_did_not_sign_is_invalid(service_factory, authority, tmp_path) -> None:
    _, key, pub = authority
    out = tmp_path / "revoked.bin"
    keys_revoke(key, out)
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    other = tmp_path / "other.pem"
    other.write_bytes(EnrollmentAuthority.generate().to_pem())
    out.unlink()
    keys_revoke(other, out, "--device", 1)  # written over the service's file after its start
    page = fleet_html(svc)
    assert panel(page)[0] == "invalid"
    assert "does not trust" in warnings(page)["invalid"]
    assert 'data-field="revocations.' not in page  # nothing of an unverified list is shown as the service's


def test_a_list_file_rolled_back_below_what_the_service_held_is_invalid(
    service_factory, authority, tmp_path
) -> None:
    """The service held list 2 (at start, which records it), then its file was put back to list 1, validly
    signed: the next open refuses it, so the panel says so."""
    _, key, pub = authority
    out, old = tmp_path / "revoked.bin", tmp_path / "old.bin"
    keys_revoke(key, out, "--device", 1)
    old.write_bytes(out.read_bytes())
    keys_revoke(key, out, "--device", 2)
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    assert panel(fleet_html(svc))[0] == "current"
    out.write_bytes(old.read_bytes())
    page = fleet_html(svc)
    assert panel(page)[0] == "invalid"
    assert "holds number 2, and a list never goes back" in warnings(page)["invalid"]


def test_a_long_list_shows_a_bounded_page_and_counts_the_rest(service_factory, authority, tmp_path) -> None:
    _, key, pub = authority
    out = tmp_path / "revoked.bin"
    keys_revoke(key, out, *(a for i in range(pages.REVOKED_SHOWN + 50) for a in ("--device", i)))
    page = fleet_html(service_factory(secagg_revocations=str(out), secagg_authority=str(pub)))
    body = panel(page)[1]
    assert field(page, "revoked") == f"{pages.REVOKED_SHOWN + 50}"
    assert body.count("<td>fleet</td>") == pages.REVOKED_SHOWN
    assert "and 50 more (the whole list: " in body


def test_secagg_rounds_show_the_invited_devices_left_out_as_revoked(
    service_factory, authority, tmp_path
) -> None:
    auth, _, pub = authority
    out = tmp_path / "revoked.bin"
    crl = revoke(auth, [(NAMES[REVOKED], "fleet")], issued=int(time.time()))
    write_revocations(out, crl)
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    creds = {d: _creds(auth, d).with_revocations(crl) for d in NAMES}
    _round_without_the_revoked_device(svc, creds)  # published: closed, dev-4 left out
    _open(svc, NAMES)  # open, dev-4 left out again
    page = fleet_html(svc)
    for table in ("open-rounds", "closed-rounds"):
        rows = re.search(rf'<table id="{table}">.*?</table>', page, re.S).group(0)
        assert f'<td class="bad" data-field="revoked" data-count="1">{NAMES[REVOKED]}</td>' in rows, table


def test_a_signed_list_dated_past_year_9999_still_shows_the_fleet_page(
    service_factory, authority, tmp_path
) -> None:
    """A list's times are u64 seconds; one its authority signed with an issue time past year 9999 (a clock or
    script gone wrong: ``revoke`` takes any time below 2**64) is current and held, yet formatting its dates
    raised OverflowError and every Fleet page view was a 500. Such a time is shown as its number."""
    from deltaplane.aggregation.secagg.revocation import revoke, write_revocations

    auth, _, pub = authority
    out = tmp_path / "revoked.bin"
    issued = 2**63
    write_revocations(out, revoke(auth, [("device-1", "fleet")], issued=issued))
    svc = service_factory(secagg_revocations=str(out), secagg_authority=str(pub))
    page = fleet_html(svc)
    assert panel(page)[0] == "current"
    assert field(page, "issued") == f"{issued} (unix s)"

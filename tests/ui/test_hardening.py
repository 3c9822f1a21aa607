"""The dashboard against hostile or broken inputs: injected report fields, guessed tokens, malformed reports,
broken registries. Plain HTTP (FastAPI's TestClient), no browser: each test is a request and its answer."""

from __future__ import annotations

import json
import os
import re
import threading
from html import escape, unescape
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from deltaplane.registry import Registry
from deltaplane.report.writer import REPORT_FORMAT
from deltaplane.serve import ServiceConfig, create_app
from deltaplane.ui import create_ui_app

ADMIN = "admin-token-for-the-hardening-test"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
SCRIPT = '1"><script>alert(document.cookie)</script><x y="'


def _ui(runs: Path | None = None, home: Path | None = None) -> TestClient:
    app = create_ui_app(
        admin_token=ADMIN, runs_dir=str(runs) if runs else None, registry_home=str(home) if home else None
    )
    return TestClient(app, raise_server_exceptions=False)


def _report(runs: Path, folder: str, doc: object) -> None:
    (runs / folder).mkdir(parents=True, exist_ok=True)
    (runs / folder / "report.json").write_text(json.dumps(doc))


def _good(name: str = "a") -> dict:
    return {
        "format": REPORT_FORMAT,
        "title": "good",
        "runs": [
            {
                "name": name,
                "config": {"codec": "identity"},
                "final": {"test_accuracy": 0.5, "cumulative_uplink_bytes": 10},
                "rounds": [{"round": 1, "test_accuracy": 0.5, "cumulative_uplink_bytes": 10}],
            }
        ],
    }


# -- 1. injection and defence-in-depth headers ---------------------------------------------------------------


def test_a_string_round_in_a_report_is_escaped(tmp_path):
    runs = tmp_path / "runs"
    _report(runs, "evil", {"format": REPORT_FORMAT, "runs": [{"name": "r", "rounds": [{"round": SCRIPT}]}]})
    r = _ui(runs).get("/ui/run", params={"report": "evil", "name": "r"}, headers=BEARER)
    assert "<script>" not in r.text
    assert r.status_code in (200, 400)


def test_every_ui_response_carries_the_security_headers(tmp_path):
    runs = tmp_path / "runs"
    _report(runs, "demo", _good())
    c = _ui(runs)
    answers = [
        c.get("/ui/login"),
        c.get("/ui/", follow_redirects=False),  # the redirect to the sign-in page
        c.get("/ui/run", params={"report": "demo", "name": "a"}, headers=BEARER),
        c.get("/ui/run", headers=BEARER),  # 422: the query string is incomplete
        c.post("/ui/login", data={"token": "wrong"}),
    ]
    for r in answers:
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, (r.status_code, r.headers)
        assert "script-src" not in csp and "unsafe-" not in csp  # no script at all; one stylesheet, by hash
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
    page = answers[2].text
    assert "<script" not in page  # nothing the CSP would block: the pages are HTML, inline CSS and SVG only
    assert "<svg" in page and "<style>" in page


def test_the_service_sends_the_headers_on_ui_and_not_on_the_device_api(tmp_path):
    Registry.create(tmp_path / "home")
    c = TestClient(create_app(ServiceConfig(home=str(tmp_path / "home"), admin_token=ADMIN)))
    assert c.get("/ui/fleet", headers=BEARER).headers["x-frame-options"] == "DENY"
    assert "x-frame-options" not in c.get("/admin/stats", headers=BEARER).headers


# -- 2. guessing the admin token -----------------------------------------------------------------------------


def test_wrong_bearer_tokens_on_ui_are_throttled_like_sign_ins():
    c = _ui()
    wrong = {"Authorization": "Bearer wrong-guess-xxxxxxxxxxxx"}
    codes = [c.get("/ui/", headers=wrong, follow_redirects=False).status_code for _ in range(7)]
    assert codes[:5] == [303] * 5 and codes[5:] == [429, 429], codes
    r = c.get("/ui/fleet", headers=BEARER, follow_redirects=False)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # no verdict on the real token either
    # the lockout is shared with the sign-in form (and the other way round)
    assert c.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 429


def test_a_sign_in_lockout_lasts_the_full_minute_after_the_fifth_failure(monkeypatch):
    """Five failures spread over 50 s lock the address out for 60 s from the fifth, as docs/dashboard.md says."""
    from types import SimpleNamespace

    import deltaplane.ui.router as router

    now = [1000.0]
    monkeypatch.setattr(router, "time", SimpleNamespace(monotonic=lambda: now[0]))  # the throttle's clock
    c = _ui()

    def sign_in(token: str) -> int:
        return c.post("/ui/login", data={"token": token}, follow_redirects=False).status_code

    for t in (0, 10, 20, 30):
        now[0] = 1000.0 + t
        assert sign_in("wrong") == 401
    now[0] = 1050.0
    assert sign_in("wrong") == 401  # the fifth failure
    now[0] = 1051.0
    assert sign_in("wrong") == 429  # locked out: one failure fewer never locks anything
    now[0] = 1109.0
    assert sign_in(ADMIN) == 429, "the lockout must last 60 s from the fifth failure, not the first"
    now[0] = 1111.0
    assert sign_in(ADMIN) == 303


def test_four_failures_do_not_lock_an_address_out():
    c = _ui()
    assert [c.post("/ui/login", data={"token": "no"}).status_code for _ in range(4)] == [401] * 4
    assert c.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303


# -- 3. malformed reports ------------------------------------------------------------------------------------

ODD_REPORTS = {
    "no-runs": {"format": REPORT_FORMAT},
    "nameless-run": {"format": REPORT_FORMAT, "runs": [{"rounds": []}]},
    "runs-object": {"format": REPORT_FORMAT, "runs": {"x": 1}},
    "run-not-object": {"format": REPORT_FORMAT, "runs": ["r"]},
    "summary-strings": {"format": REPORT_FORMAT, "runs": [], "summary": ["x"]},
    "not-json": "{",
    # json.loads recurses per level: 100,000 nested lists (200 KB) raised RecursionError out of load_report,
    # which only DeltaplaneError is caught from, so every view of the overview was a 500 while the file was there
    "nested-deep": '{"format": 1, "runs": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("odd", sorted(ODD_REPORTS))
def test_one_malformed_report_is_listed_as_skipped_not_a_500(tmp_path, odd):
    runs = tmp_path / "runs"
    _report(runs, "good", _good())
    (runs / "odd").mkdir()
    doc = ODD_REPORTS[odd]
    (runs / "odd" / "report.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    c = _ui(runs)
    for page in ("/ui/", "/ui/runs"):
        r = c.get(page, headers=BEARER)
        assert r.status_code == 200, (page, r.status_code)
        assert "good / a" in r.text  # the good report is still there
        skipped = r.text[r.text.index('id="skipped-reports"') :]
        assert "<code>odd</code>" in skipped, page


@pytest.mark.parametrize(
    ("rounds", "shown"),
    [
        ([{"test_accuracy": 0.5}], 400),  # a round without its number
        ([{"round": "one"}], 400),
        ([{"round": 1, "test_accuracy": 0.5}], 200),  # accuracy but no cumulative bytes: that chart skips it
        ([{"round": 1, "test_accuracy": "n/a", "uplink_bytes": "lots"}], 200),  # shown as written
    ],
)
def test_a_malformed_run_gets_a_clear_page_not_a_500(tmp_path, rounds, shown):
    runs = tmp_path / "runs"
    _report(runs, "odd", {"format": REPORT_FORMAT, "runs": [{"name": "r", "rounds": rounds}]})
    r = _ui(runs).get("/ui/run", params={"report": "odd", "name": "r"}, headers=BEARER)
    assert r.status_code == shown, r.text[-400:]
    if shown == 400:
        assert "report 'odd' is malformed" in unescape(r.text) and "'round'" in unescape(r.text)


@pytest.mark.parametrize(
    "run",
    [
        {"name": "r"},  # no "rounds" at all: check_report allows it, the charts read it as no points
        {
            "name": "r",
            "rounds": [{"round": 1, "test_accuracy": 1e308}, {"round": 2, "test_accuracy": -1e308}],
        },
    ],
    ids=["no-rounds", "span-overflows"],
)
def test_a_run_the_charts_cannot_draw_gets_a_page_not_a_500(tmp_path, run):
    runs = tmp_path / "runs"
    _report(runs, "odd", {"format": REPORT_FORMAT, "runs": [run]})
    r = _ui(runs).get("/ui/run", params={"report": "odd", "name": "r"}, headers=BEARER)
    assert r.status_code == 200, r.text[-400:]


# -- 4. broken registries ------------------------------------------------------------------------------------


def _registry(home: Path) -> Registry:
    reg = Registry.create(home)
    reg.register_model("digits", {"w": torch.zeros(3)}, lineage={"source": "run"})
    return reg


@pytest.mark.parametrize("report", ["a\x00b", "a" * 300, "ok/" + "b" * 300])
def test_a_report_folder_the_filesystem_refuses_is_a_404_not_a_500(tmp_path, report):
    """A ``report=`` with a NUL byte (ValueError from the path calls) or a name longer than the filesystem's
    255 bytes (OSError ENAMETOOLONG from ``is_file``) escaped as a 500, on the run page and the compare page."""
    runs = tmp_path / "runs"
    _report(runs, "ok", _good())
    ui = _ui(runs)
    for r in (
        ui.get("/ui/run", params={"report": report, "name": "a"}, headers=BEARER),
        ui.get("/ui/compare", params={"run": [f"{report}::a", "ok::a"]}, headers=BEARER),
    ):
        assert r.status_code == 404 and "no report" in unescape(r.text), r.text[:300]


def test_a_report_linked_from_outside_the_runs_folder_is_left_out_with_the_reason(tmp_path):
    """A ``report.json`` that is a symbolic link to a file outside ``--runs`` was read and its runs listed,
    while the run page refuses it (404: outside the runs folder), so every link to it was dead. The listing
    applies the same rule and says why it left the report out."""
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    _report(runs, "inside", _good("kept"))
    _report(elsewhere, "x", _good("outside"))
    (runs / "linked").mkdir()
    (runs / "linked" / "report.json").symlink_to(elsewhere / "x" / "report.json")
    c = _ui(runs)
    r = c.get("/ui/runs", headers=BEARER)
    assert "inside / kept" in r.text and "linked / outside" not in r.text
    assert "outside the runs folder" in unescape(r.text.split('id="skipped-reports"')[1])
    assert c.get("/ui/run", params={"report": "linked", "name": "outside"}, headers=BEARER).status_code == 404


def test_a_runs_folder_that_does_not_exist_is_named_not_shown_as_zero_runs(tmp_path):
    """``deltaplane ui`` started elsewhere than the folder ``make run`` ran in (its ``--runs`` defaults to the
    relative ``runs``), or given a typo, showed 0 runs and an empty table with nothing saying why. The overview
    and the runs table now name the folder they looked for; an empty folder that exists says nothing more."""
    missing = tmp_path / "runz"
    for page in ("/ui/", "/ui/runs"):
        text = unescape(_ui(missing).get(page, headers=BEARER).text)
        assert f"The runs folder {missing} does not exist" in text, (page, text[-800:])
    (tmp_path / "empty").mkdir()
    assert "does not exist" not in _ui(tmp_path / "empty").get("/ui/runs", headers=BEARER).text


def test_a_registry_folder_without_a_registry_says_how_to_make_one(tmp_path):
    """``--home`` naming a folder no ``registry init`` has run in showed 'Registry at H.' over an empty table,
    as if the registry held no models; the page now says there is no registry there, and the command."""
    home = tmp_path / "home"

    def text() -> str:  # the page's words, without its markup
        return unescape(re.sub(r"<[^>]+>", "", _ui(home=home).get("/ui/registry", headers=BEARER).text))

    assert f"No registry at {home} yet" in text() and f"deltaplane registry init --home {home}" in text()
    _registry(home)
    assert f"Registry at {home}." in text() and "No registry" not in text()


@pytest.mark.parametrize("damage", ["registry.json deleted", "registry.db corrupt"])
def test_a_broken_registry_gets_an_error_page_with_the_cause(tmp_path, damage):
    home = tmp_path / "home"
    _registry(home)
    if damage == "registry.json deleted":
        (home / "registry.json").unlink()
        cause = "registry.json"
    else:
        (home / "registry.db").write_bytes(b"not sqlite" * 100)
        cause = "database disk image is malformed"
    runs = tmp_path / "runs"
    _report(runs, "demo", _good())
    c = _ui(runs, home)
    for page in ("/ui/registry", "/ui/registry/digits"):
        r = c.get(page, headers=BEARER)
        assert r.status_code == 503, (page, r.status_code)
        assert cause in r.text and "registry verify" in r.text
    home_page = c.get("/ui/", headers=BEARER)  # the overview still shows the runs, and the registry's problem
    assert home_page.status_code == 200 and "demo / a" in home_page.text and cause in home_page.text


# -- signing out ---------------------------------------------------------------------------------------------


def test_signing_out_ends_the_session_on_the_server_too():
    """A copy of the cookie taken before the sign-out (a stolen one, a second tab's) no longer works; another
    browser's session does."""
    app = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=None)
    first, second = TestClient(app), TestClient(app)
    for c in (first, second):
        assert c.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    stolen = first.cookies.get("deltaplane_ui")
    assert first.post("/ui/logout", follow_redirects=False).status_code == 303
    replay = TestClient(app, cookies={"deltaplane_ui": stolen})
    r = replay.get("/ui/fleet", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert second.get("/ui/fleet", follow_redirects=False).status_code == 200
    assert stolen != second.cookies.get("deltaplane_ui")  # every sign-in gets its own session


def test_a_sign_out_survives_a_restart_of_the_dashboard(tmp_path):
    """Revocations were held in memory: a dashboard restarted with the same admin token (a deployment's
    DELTAPLANE_ADMIN_TOKEN, `deltaplane serve`'s) accepted a signed-out cookie again for the rest of its 8 hours.
    With a registry they are kept in its database: after the restart the copy is still refused, a new sign-in
    works, and the database holds no cookie, only its hash."""
    import sqlite3

    home = tmp_path / "home"
    Registry.create(home)
    before = TestClient(create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home)))
    assert before.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    stolen = before.cookies.get("deltaplane_ui")
    assert before.post("/ui/logout", follow_redirects=False).status_code == 303

    restarted = create_ui_app(
        admin_token=ADMIN, runs_dir=None, registry_home=str(home)
    )  # a new process's state
    r = TestClient(restarted, cookies={"deltaplane_ui": stolen}).get("/ui/fleet", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    fresh = TestClient(restarted)
    assert fresh.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    assert fresh.get("/ui/fleet", follow_redirects=False).status_code == 200
    with sqlite3.connect(home / "registry.db") as con:
        dump = "\n".join(con.iterdump())
    assert stolen not in dump and stolen.rsplit(".", 1)[1] not in dump


def test_a_sign_out_ends_the_session_in_every_dashboard_on_the_registry(tmp_path):
    """`deltaplane serve` and `deltaplane ui` on one registry with one DELTAPLANE_ADMIN_TOKEN accept the same
    cookie (a browser sends a host's cookies to every port). Revocations were read from the database once, at
    a dashboard's first request: signing out in one left the cookie (and any copy of it) valid in the other,
    which had already served a page, until it was restarted."""
    home = tmp_path / "home"
    Registry.create(home)
    serve_ui = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    alone_ui = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    browser = TestClient(serve_ui)
    assert browser.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    cookie = browser.cookies.get("deltaplane_ui")
    other = TestClient(alone_ui, cookies={"deltaplane_ui": cookie})
    assert other.get("/ui/fleet", follow_redirects=False).status_code == 200  # both have served it
    assert browser.post("/ui/logout", follow_redirects=False).status_code == 303
    r = other.get("/ui/fleet", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"


def test_a_sign_out_that_cannot_be_saved_answers_503_and_still_ends_the_session_here(tmp_path):
    """The registry refuses the write (a trigger stands in for a full disk or a read-only database): the page
    says 503 with the cause and what it means, clears the cookie, and this process still refuses a copy of it;
    a restarted dashboard, which has only the registry to go on, accepts it again, as the page warns."""
    import sqlite3

    from deltaplane.ui.session import _SCHEMA

    home = tmp_path / "home"
    Registry.create(home)
    with sqlite3.connect(home / "registry.db") as con:
        con.execute(_SCHEMA)
        con.execute(
            "CREATE TRIGGER full_disk BEFORE INSERT ON ui_revoked_sessions "
            "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    app = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    browser = TestClient(app)
    assert browser.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    stolen = browser.cookies.get("deltaplane_ui")
    r = browser.post("/ui/logout", follow_redirects=False)
    assert r.status_code == 503
    text = unescape(r.text)
    assert "the sign-out could not be saved in the registry" in text and "database or disk is full" in text
    assert "would accept this session's cookie again" in text
    assert 'deltaplane_ui=""' in r.headers["set-cookie"]  # the browser's cookie is cleared all the same
    replay = TestClient(app, cookies={"deltaplane_ui": stolen}).get("/ui/fleet", follow_redirects=False)
    assert replay.status_code == 303 and replay.headers["location"] == "/ui/login"  # revoked in this process
    with sqlite3.connect(home / "registry.db") as con:
        assert con.execute("SELECT COUNT(*) FROM ui_revoked_sessions").fetchone() == (0,)
    restarted = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    after = TestClient(restarted, cookies={"deltaplane_ui": stolen}).get("/ui/fleet", follow_redirects=False)
    assert after.status_code == 200  # the documented limit: nothing was saved for a new process to refuse


# -- the session cookie's key ----------------------------------------------------------------------------------


def _sign_in(app, token: str = ADMIN) -> str:
    """Sign in through the app's form and return the cookie it set."""
    browser = TestClient(app)
    assert browser.post("/ui/login", data={"token": token}, follow_redirects=False).status_code == 303
    return browser.cookies.get("deltaplane_ui")


def _accepts(app, cookie: str) -> bool:
    r = TestClient(app, cookies={"deltaplane_ui": cookie}).get("/ui/fleet", follow_redirects=False)
    assert r.status_code in (200, 303), r.status_code
    return r.status_code == 200


def _mac_under_the_token(*fields: str) -> str:
    """What an attacker holding a cookie computes for each guess of the token: one HMAC-SHA256 keyed by it."""
    import hashlib
    import hmac

    return hmac.new(ADMIN.encode(), "|".join(("deltaplane-ui", *fields)).encode(), hashlib.sha256).hexdigest()


def test_a_captured_cookie_gives_no_cheap_offline_test_of_the_admin_token(tmp_path):
    """The cookie's MAC was keyed by the admin token itself: whoever captured one cookie (a shared browser
    profile, a proxy log, a backup) could test token guesses offline at HMAC speed, and the right guess, which
    also opens /admin, made the MAC match. Now even the right token, used as an HMAC key, does not match, and a
    cookie made that way (the old format, or an attacker's) is refused: its users sign in again."""
    home = tmp_path / "home"
    Registry.create(home)
    for app in (
        create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home)),
        create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=None),
    ):
        cookie = _sign_in(app)
        assert _accepts(app, cookie)
        version, issued, seen, sid, mac = cookie.split(".")
        assert (
            _mac_under_the_token(version, issued, seen, sid) != mac
        )  # the right guess does not confirm itself
        assert ADMIN not in cookie
        token_keyed = f"{version}.{issued}.{seen}.{sid}.{_mac_under_the_token(version, issued, seen, sid)}"
        assert not _accepts(app, token_keyed)
        expiry = str(int(issued) + 3600)
        assert not _accepts(app, f"{expiry}.{sid}.{_mac_under_the_token(expiry, sid)}")  # the first format


def test_serve_and_ui_on_one_registry_accept_each_others_cookie_and_sign_outs(tmp_path):
    """`deltaplane serve` and `deltaplane ui` on one registry with one admin token derive the same key (the
    salt is the registry's): a cookie from either works in the other, after a restart too, and a sign-out in
    either ends it in both."""
    home = tmp_path / "home"
    Registry.create(home)
    serve = create_app(ServiceConfig(home=str(home), admin_token=ADMIN))
    alone = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    from_serve, from_ui = _sign_in(serve), _sign_in(alone)
    assert _accepts(alone, from_serve) and _accepts(serve, from_ui)
    restarted = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    assert _accepts(restarted, from_serve) and _accepts(restarted, from_ui)

    for signed_in_at, signed_out_at in ((serve, alone), (alone, serve)):
        cookie = _sign_in(signed_in_at)
        assert _accepts(signed_out_at, cookie)
        out = TestClient(signed_out_at, cookies={"deltaplane_ui": cookie})
        assert out.post("/ui/logout", follow_redirects=False).status_code == 303
        assert not _accepts(signed_in_at, cookie) and not _accepts(signed_out_at, cookie)
    assert _accepts(serve, from_serve) and _accepts(alone, from_ui)  # other sessions go on


def test_rotating_the_admin_token_ends_every_session(tmp_path):
    """The key is derived from the token: a dashboard restarted with a new token refuses the old cookies (the
    same registry, so the same salt), and the new token's cookies are refused by one still on the old."""
    home = tmp_path / "home"
    Registry.create(home)
    old = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    cookie = _sign_in(old)
    rotated = create_ui_app(admin_token=ADMIN + "-rotated", runs_dir=None, registry_home=str(home))
    assert not _accepts(rotated, cookie)
    new_cookie = _sign_in(rotated, ADMIN + "-rotated")
    assert _accepts(rotated, new_cookie) and not _accepts(old, new_cookie)
    back = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    assert _accepts(back, cookie)  # refused for the token, not for the restart


def test_the_key_is_derived_once_per_process_not_per_request(tmp_path, monkeypatch):
    """scrypt costs ~70 ms: once, at the first sign-in or cookie, never again for the process's requests."""
    import hashlib

    calls = []
    real = hashlib.scrypt

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    home = tmp_path / "home"
    Registry.create(home)
    app = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    TestClient(app).get("/ui/fleet", headers=BEARER)  # a bearer token needs no key
    assert calls == []
    cookie = _sign_in(app)
    for _ in range(5):
        assert _accepts(app, cookie)
    assert len(calls) == 1


def test_without_a_registry_sessions_end_with_the_process():
    """`deltaplane ui` without --home has nowhere to keep a salt: each process draws its own, so a restart
    ends every session (a signed-out cookie, remembered only in memory, cannot come back either)."""
    first = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=None)
    cookie = _sign_in(first)
    assert _accepts(first, cookie)
    assert not _accepts(create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=None), cookie)


def test_a_cookie_with_non_ascii_bytes_is_a_sign_in_page_not_a_500():
    """hmac.compare_digest raises TypeError on non-ASCII text: such a cookie (any client can send one) made
    every /ui page and the sign-out answer 500 instead of treating it as no session."""
    c = TestClient(
        create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=None), raise_server_exceptions=False
    )
    raw = [(b"cookie", "deltaplane_ui=9999999999.abc.\u00e9\u00e9".encode())]
    r = c.get("/ui/fleet", headers=raw, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert c.post("/ui/logout", headers=raw, follow_redirects=False).status_code == 303


# -- 5. work per page view -----------------------------------------------------------------------------------


def test_listings_parse_each_report_once_until_it_changes(tmp_path, monkeypatch):
    import deltaplane.ui.sources as sources

    parsed: list[str] = []
    real = sources.load_report
    monkeypatch.setattr(
        sources, "load_report", lambda path: parsed.append(Path(path).parent.name) or real(path)
    )
    runs = tmp_path / "runs"
    for name in ("a", "b", "c"):
        _report(runs, name, _good(name))
    c = _ui(runs)
    for page in ("/ui/", "/ui/runs", "/ui/"):
        assert c.get(page, headers=BEARER).status_code == 200
    assert sorted(parsed) == ["a", "b", "c"], parsed  # three views, each report read once
    _report(runs, "b", _good("renamed"))  # rewritten: a different size, so it is read again
    r = c.get("/ui/runs", headers=BEARER)
    assert sorted(parsed) == ["a", "b", "b", "c"] and "b / renamed" in r.text
    (runs / "c" / "report.json").unlink()
    assert "c / c" not in c.get("/ui/runs", headers=BEARER).text


def test_the_runs_table_is_paged(tmp_path):
    runs = tmp_path / "runs"
    doc = _good()
    doc["runs"] = [dict(doc["runs"][0], name=f"run{i:03d}") for i in range(120)]
    _report(runs, "many", doc)
    c = _ui(runs)
    first = c.get("/ui/runs", headers=BEARER).text
    assert first.count('name="run"') == 50 and "rows 1–50 of 120" in first
    assert 'href="/ui/runs?page=2"' in first
    last = c.get("/ui/runs?page=3", headers=BEARER).text
    assert last.count('name="run"') == 20 and "many / run119" in last and "many / run000" not in last
    assert c.get("/ui/runs?page=0", headers=BEARER).status_code == 422


def test_the_model_page_checks_and_lists_one_page_of_versions(tmp_path, monkeypatch):
    home = tmp_path / "home"
    reg = _registry(home)
    for i in range(64):
        reg.register_model("digits", {"w": torch.full((3,), float(i))}, parent=i + 1)
    for i in range(120):
        reg._move_tag("digits", "production", 1 + i % 60, reason=f"move {i}", action="promote")
    reads: list[int] = []
    real = Registry.read
    monkeypatch.setattr(
        Registry, "read", lambda self, art, **kw: reads.append(art.number) or real(self, art, **kw)
    )
    c = _ui(home=home)
    first = c.get("/ui/registry/digits", headers=BEARER).text
    assert first.count("<tr data-version=") == 50 and "rows 1–50 of 65" in first
    assert sorted(reads) == list(range(16, 66)), "only the shown page's signatures are checked (newest first)"
    assert first.count("move ") == 50  # the tag history, newest first, one page of it
    assert "move 119" in first and "move 0<" not in first
    older = c.get("/ui/registry/digits?page=2&history=3", headers=BEARER).text
    assert older.count("<tr data-version=") == 15 and older.count("move ") == 20 and "move 0<" in older
    # the lineage graph drew every version of the model whatever the page (one box and arrow per version: a
    # model with 100,000 versions made a 32 MB page); it draws the versions of the page shown
    assert first.count("<rect") == 50 and older.count("<rect") == 15
    assert ">@65</text>" in first and ">@15</text>" in older and ">@15</text>" not in first


def test_the_registry_table_is_paged_and_reads_only_its_page(tmp_path, monkeypatch):
    """The registry page listed every model, reading each one's versions and verified tags on every view (and
    the overview did the same to count them): the page grew, and its work too, with the registry."""
    home = tmp_path / "home"
    reg = _registry(home)
    with reg.transaction():
        for i in range(119):
            reg.register_model(f"model-{i:03d}", {"w": torch.zeros(2)})
    looked_up: list[str] = []
    real = Registry.versions
    monkeypatch.setattr(
        Registry,
        "versions",
        lambda self, model, *a, **kw: looked_up.append(model) or real(self, model, *a, **kw),
    )
    c = _ui(home=home)
    first = c.get("/ui/registry", headers=BEARER).text
    assert first.count('<a href="/ui/registry/') == 50 and "rows 1–50 of 120" in first
    assert len(looked_up) == 50
    last = c.get("/ui/registry?page=3", headers=BEARER).text
    assert last.count('<a href="/ui/registry/') == 20 and "model-118" in last and "model-000" not in last
    looked_up.clear()
    overview = c.get("/ui/", headers=BEARER).text
    assert '<div class="v" data-field="models">120</div>' in overview and len(looked_up) == 50


def test_the_per_round_table_of_a_run_is_paged(tmp_path):
    """A run's page printed one table row per round for every round: a report of the allowed 64 MiB made a page
    of about 220 MB (3.4 bytes of HTML per byte of report) built in memory per view. The rounds table is paged
    (500 rows, ``?rounds=N``); the charts still draw every round."""
    runs = tmp_path / "runs"
    doc = _good()
    doc["runs"][0]["rounds"] = [{"round": i, "test_accuracy": 0.5} for i in range(1, 1201)]
    _report(runs, "long", doc)
    c = _ui(runs)
    first = c.get("/ui/run", params={"report": "long", "name": "a"}, headers=BEARER)
    assert first.status_code == 200 and first.text.count("<tr data-round=") == 500
    assert "rows 1–500 of 1200" in first.text and 'data-round="500"' in first.text
    last = c.get("/ui/run", params={"report": "long", "name": "a", "rounds": 3}, headers=BEARER).text
    assert (
        last.count("<tr data-round=") == 200 and 'data-round="1200"' in last and 'data-round="1"' not in last
    )
    assert "rounds=2" in last and "report=long" in last  # the pager keeps the run


def test_the_pagers_name_their_direction_and_a_page_past_the_last(tmp_path):
    """The rounds table (round 1 first) linked its next page, rounds 501 on, as "older →"; and a page past the
    last (``?rounds=2`` of a 120-round run, ``?page=5`` of 6 runs) showed an empty table over "rows 120–120 of
    120" and "rows 6–6 of 6", rows it did not show."""
    runs = tmp_path / "runs"
    doc = _good()
    doc["runs"][0]["rounds"] = [{"round": i, "test_accuracy": 0.5} for i in range(1, 1201)]
    _report(runs, "long", doc)
    c = _ui(runs)

    def page(**params) -> str:
        r = c.get("/ui/run", params={"report": "long", "name": "a", **params}, headers=BEARER)
        return unescape(re.sub(r"<[^>]+>", "", r.text))

    assert "later rounds →" in page() and "older" not in page() and "newer" not in page()
    assert "← earlier rounds" in page(rounds=2) and "later rounds →" in page(rounds=2)
    past = page(rounds=4)
    assert "no rows on page 4: 1200 in all, on 3 page(s)" in past and "rows 1200–1200" not in past
    many = _good()
    many["runs"] = [dict(many["runs"][0], name=f"run{i:03d}") for i in range(60)]
    _report(runs, "many", many)
    text = c.get("/ui/runs?page=5", headers=BEARER).text
    assert "no rows on page 5: 61 in all, on 2 page(s)" in text and 'href="/ui/runs?page=2"' in text
    assert "older →" in c.get("/ui/runs", headers=BEARER).text  # the runs table is newest first


def test_a_run_page_links_to_a_bounded_number_of_runs_to_compare_with(tmp_path):
    """The run page listed a "compare with" link for every other run of its report, however many."""
    runs = tmp_path / "runs"
    doc = _good()
    doc["runs"] = [dict(doc["runs"][0], name=f"run{i:03d}") for i in range(120)]
    _report(runs, "many", doc)
    r = _ui(runs).get("/ui/run", params={"report": "many", "name": "run000"}, headers=BEARER)
    assert r.status_code == 200 and r.text.count("compare with ") == 50
    assert "and 69 more" in r.text and 'href="/ui/runs"' in r.text


@pytest.mark.parametrize(
    ("statement", "cause"),
    [
        ("UPDATE tags SET number=1 WHERE tag='production'", "digits:production points to version 1"),
        ("DELETE FROM withdrawals", "withdrawals"),
    ],
)
def test_tags_and_withdrawals_edited_in_sqlite_are_not_shown_as_fact(tmp_path, statement, cause):
    """The dashboard read tags and withdrawals straight from the tables: a tag moved (or a consent withdrawal
    deleted) in registry.db showed as the registry's state. It reads them verified against the signed state
    log, and says what differs."""
    import sqlite3

    home = tmp_path / "home"
    reg = _registry(home)
    v2 = reg.register_model("digits", {"w": torch.ones(3)}, parent=1, lineage={"source": "run"})
    reg._move_tag("digits", "production", v2.number, action="promote")
    reg.withdraw_cohort("eu", reason="test")
    reg.close()
    con = sqlite3.connect(home / "registry.db", isolation_level=None)
    con.execute(statement)
    con.close()
    c = _ui(None, home)
    r = c.get("/ui/registry/digits", headers=BEARER)
    assert r.status_code == 503, r.status_code
    assert "signed state log" in unescape(r.text) and cause in unescape(r.text)


def test_a_run_still_being_written_is_not_listed(tmp_path):
    """`deltaplane run -o runs/out` writes into a hidden sibling (deploy.publish.staging_dir) and renames it into
    place when complete; the replaced output leaves through a hidden folder too. The dashboard found every
    report.json below its folder, so a half-written run (or the old one on its way out) showed as a report."""
    from deltaplane.deploy.publish import staging_dir

    runs = tmp_path / "runs"
    _report(runs, "done", _good("finished"))
    stage = staging_dir(runs / "out")  # what `deltaplane run -o runs/out` writes into until it is complete
    _report(runs, stage.name, _good("half_written"))
    _report(runs, ".done.old-x/x", _good("replaced"))
    c = _ui(runs)
    page = c.get("/ui/runs", headers=BEARER).text
    assert "done / finished" in page
    assert "half_written" not in page and "replaced" not in page and stage.name not in page
    r = c.get("/ui/run", params={"report": stage.name, "name": "half_written"}, headers=BEARER)
    assert r.status_code == 404
    assert c.get("/ui/run", params={"report": "done", "name": "finished"}, headers=BEARER).status_code == 200


# -- the search for reports: bounded in depth and entries, no linked folders -----------------------------------


def _within(seconds: float, fn):
    """``fn()``'s value, failing the test (rather than hanging it) if it takes longer than ``seconds``."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    assert out, "raised (see the thread's traceback above)"
    return out[0]


class _CountingScandir:
    """``os.scandir`` counting the entries it hands out and the folders it opens; it raises ``error`` (by default
    EACCES) for the folder ``refuse``."""

    def __init__(self, monkeypatch, refuse: Path | None = None, error: OSError | None = None) -> None:
        self.entries = 0
        self.opened: list[str] = []
        real = os.scandir
        outer = self

        class Counted:
            def __init__(self, path) -> None:
                self.it = real(path)

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.it.close()

            def __iter__(self):
                for entry in self.it:
                    outer.entries += 1
                    yield entry

        def scandir(path="."):
            outer.opened.append(os.fspath(path))
            if refuse is not None and os.fspath(path) == os.fspath(refuse):
                raise error or PermissionError(13, "Permission denied", os.fspath(path))
            return Counted(path)

        monkeypatch.setattr(os, "scandir", scandir)


def test_linked_folders_in_the_runs_folder_are_not_entered(tmp_path, monkeypatch):
    """A link to the runs folder itself, to its parent or to ``/`` must not make the search endless, repeat
    runs under a second name, or walk the whole disk."""
    runs = tmp_path / "runs"
    _report(runs, "a", _good("a"))
    (runs / "a" / "loop").symlink_to(runs, target_is_directory=True)
    (runs / "up").symlink_to(tmp_path, target_is_directory=True)
    (runs / "disk").symlink_to("/", target_is_directory=True)
    count = _CountingScandir(monkeypatch)
    page = _within(30, lambda: _ui(runs).get("/ui/runs", headers=BEARER).text)
    assert page.count('name="run"') == 1 and "a / a" in page
    assert not any(("loop" in p or "up" in Path(p).parts or "disk" in p) for p in count.opened), count.opened
    assert 'id="search-notes"' not in page


def test_a_linked_report_json_inside_the_runs_folder_is_listed(tmp_path):
    """docs/dashboard.md: only a report.json linked to a file *outside* --runs is left out; a link inside is
    listed under its own folder, though the search enters no linked folder."""
    runs = tmp_path / "runs"
    _report(runs, "real", _good("r"))
    (runs / "alias").mkdir()
    (runs / "alias" / "report.json").symlink_to(runs / "real" / "report.json")
    c = _ui(runs)
    page = c.get("/ui/runs", headers=BEARER).text
    assert "real / r" in page and "alias / r" in page and 'id="skipped-reports"' not in page
    assert c.get("/ui/run", params={"report": "alias", "name": "r"}, headers=BEARER).status_code == 200


def test_a_run_deeper_than_the_search_depth_is_not_listed(tmp_path):
    """docs/dashboard.md: folders at most six levels below --runs are searched."""
    runs = tmp_path / "runs"
    _report(runs, "l1/l2/l3/l4/l5/l6", _good("deepest"))
    _report(runs, "l1/l2/l3/l4/l5/l6/l7", _good("too_deep"))
    page = _ui(runs).get("/ui/runs", headers=BEARER).text
    assert "l1/l2/l3/l4/l5/l6 / deepest" in page and "too_deep" not in page


def test_a_runs_folder_over_the_entry_limit_is_cut_with_a_note(tmp_path, monkeypatch):
    """Every overview searches the runs folder again: one holding a dataset (or --runs pointed at a home
    folder) was walked to its last file on every view. The search stops at its limit and the page says so."""
    import deltaplane.ui.sources as sources

    monkeypatch.setattr(sources, "MAX_WALK_ENTRIES", 500, raising=False)  # absent before
    runs = tmp_path / "runs"
    _report(runs, "shallow", _good("kept"))
    (runs / "data" / "x").mkdir(parents=True)
    for i in range(3000):
        (runs / "data" / "x" / f"{i}.bin").touch()
    c = _ui(runs)
    count = _CountingScandir(monkeypatch)
    for page in ("/ui/", "/ui/runs"):
        text = unescape(_within(30, lambda page=page: c.get(page, headers=BEARER).text))
        notes = text.split('id="search-notes"')[1]
        assert (
            "stopped after 500 files and folders (the limit" in notes
            and "Point --runs at a smaller folder" in notes
        )
        assert "shallow / kept" in text  # breadth first: the shallow run is found before the cut
    assert count.entries <= 2 * 501, count.entries  # two views, each at most one past the limit


def test_the_search_does_not_enter_hidden_folders(tmp_path, monkeypatch):
    """A hidden folder (a run being written, a .git or .venv beside the runs) is never listed: the search does
    not read it at all."""
    runs = tmp_path / "runs"
    _report(runs, "a", _good("a"))
    (runs / ".venv").mkdir()
    for i in range(2000):
        (runs / ".venv" / f"{i}.py").touch()
    count = _CountingScandir(monkeypatch)
    assert "a / a" in _ui(runs).get("/ui/runs", headers=BEARER).text
    assert not any(".venv" in p for p in count.opened) and count.entries < 10, count.entries


@pytest.mark.parametrize("how", ["chmod", "simulated"])
def test_an_unreadable_folder_is_passed_over_with_a_note(tmp_path, monkeypatch, request, how):
    """A folder the search cannot read is named on the page, not silently passed over. As root (CI containers)
    a chmod 000 folder is still readable, so the refusal is also simulated at os.scandir."""
    runs = tmp_path / "runs"
    _report(runs, "ok", _good("ok"))
    _report(runs, "locked", _good("hidden_by_permissions"))
    if how == "chmod":
        (runs / "locked").chmod(0)
        request.addfinalizer(lambda: (runs / "locked").chmod(0o755))  # so that tmp_path can be removed
        try:
            os.listdir(runs / "locked")
            pytest.skip("this user reads a chmod 000 folder (root)")
        except PermissionError:
            pass
    else:
        _CountingScandir(monkeypatch, refuse=runs / "locked")
    for page in ("/ui/", "/ui/runs"):
        r = _ui(runs).get(page, headers=BEARER)
        assert r.status_code == 200 and "ok / ok" in r.text
        notes = unescape(r.text.split('id="search-notes"')[1])
        assert "1 folder(s) under the runs folder could not be read" in notes
        assert "locked (Permission denied)" in notes and "hidden_by_permissions" not in r.text


def test_a_folder_removed_while_the_search_runs_is_no_error_and_no_note(tmp_path, monkeypatch):
    """`deltaplane run -o runs/out` moves the output it replaces away and deletes it: a folder listed by the search
    may be gone when it is opened. The page must not fail, nor report the vanished folder as unreadable."""
    runs = tmp_path / "runs"
    _report(runs, "ok", _good("ok"))
    (runs / "gone").mkdir()
    _CountingScandir(
        monkeypatch, refuse=runs / "gone", error=FileNotFoundError(2, "No such file or directory")
    )
    r = _ui(runs).get("/ui/runs", headers=BEARER)
    assert r.status_code == 200 and "ok / ok" in r.text and 'id="search-notes"' not in r.text


# -- bad query parameters --------------------------------------------------------------------------------------


def test_a_bad_query_parameter_on_a_page_gets_an_html_422_naming_it(tmp_path):
    runs = tmp_path / "runs"
    _report(runs, "demo", _good())
    c = _ui(runs)
    r = c.get("/ui/runs?page=0", headers=BEARER)
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
    text = unescape(r.text)
    assert "<title>" in r.text and "query parameter 'page'" in text and "greater than or equal to 1" in text
    assert "got '0'" in text
    missing = c.get("/ui/run", params={"name": "a"}, headers=BEARER)
    assert missing.status_code == 422 and "query parameter 'report'" in unescape(missing.text)
    assert "Field required" in unescape(missing.text)


def test_the_service_counts_a_ui_422_and_keeps_json_422_on_its_api(tmp_path):
    Registry.create(tmp_path / "home")
    app = create_app(ServiceConfig(home=str(tmp_path / "home"), admin_token=ADMIN))
    c = TestClient(app)
    counters = app.state.deltaplane.counters
    r = c.get("/ui/runs?page=abc", headers=BEARER)
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
    assert "query parameter 'page'" in unescape(r.text) and counters["rejected.validation"] == 1
    api = c.post("/admin/devices", headers=BEARER, content=b"not json")
    assert api.status_code == 422 and api.headers["content-type"] == "application/json"
    # the route, and why: this body said no Content-Type, so it was never read as JSON ("got JSON of another
    # shape" would send the operator to fix the fields)
    said = api.json()["detail"]
    assert said.startswith("POST /admin/devices: got a body without a Content-Type") and '"device_id"' in said
    assert counters["rejected.validation"] == 2
    typed = c.post("/admin/devices", headers={**BEARER, "Content-Type": "text/plain"}, content=b"not json")
    assert typed.status_code == 422 and "sent as 'text/plain', not read as JSON" in typed.json()["detail"]


# -- long runs -------------------------------------------------------------------------------------------------


def test_a_100000_round_run_page_is_small_and_its_charts_keep_the_extremes(tmp_path):
    """Every chart drew every round: a 100,000-round run page was several MB of SVG. Each line is now at most
    1,000 points (min–max per block), and the global minimum and maximum are still on the line."""
    import math
    import re

    n = 100_000
    lo_round, hi_round = 31_337, 77_777
    acc = {i: 0.5 + 0.1 * math.sin(i / 500) for i in range(1, n + 1)}
    acc[lo_round], acc[hi_round] = 0.01, 0.99  # one dip and one spike a stride would miss
    runs = tmp_path / "runs"
    doc = _good()
    doc["runs"][0]["rounds"] = [
        {"round": i, "test_accuracy": acc[i], "cumulative_uplink_bytes": 10 * i} for i in range(1, n + 1)
    ]
    _report(runs, "long", doc)
    r = _ui(runs).get("/ui/run", params={"report": "long", "name": "a"}, headers=BEARER)
    assert r.status_code == 200 and len(r.content) < 600_000, len(r.content)
    svg = re.search(r'<svg[^>]*id="chart-accuracy".*?</svg>', r.text, re.S)
    assert svg, "no accuracy chart"
    lines = re.findall(r'<polyline points="([^"]*)"', svg.group(0))
    pts = [tuple(map(float, p.split(","))) for p in lines[0].split()]
    assert 900 <= len(pts) <= 1000
    # the plot maps y linearly with a higher value drawn higher (smaller y pixel): the extremes are the ends
    ys = [y for _, y in pts]
    x_of = {y: x for x, y in pts}
    left, width = 64, 760 - 64 - 16
    assert round((x_of[max(ys)] - left) / width * (n - 1) + 1) == pytest.approx(lo_round, abs=150)
    assert round((x_of[min(ys)] - left) / width * (n - 1) + 1) == pytest.approx(hi_round, abs=150)


# -- many addresses --------------------------------------------------------------------------------------------


def _from(app, address: str) -> TestClient:
    return TestClient(app, raise_server_exceptions=False, client=(address, 40000))


def _ui_app():
    return create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=None)


def test_ipv6_addresses_in_one_64_share_one_failure_count():
    """Per-address counting let an IPv6 client rotate through its /64 and try five tokens from each address."""
    app = _ui_app()
    codes = [
        _from(app, f"2001:db8:1:2::{i:x}").post("/ui/login", data={"token": "no"}).status_code
        for i in range(7)
    ]
    assert codes == [401] * 5 + [429] * 2, codes
    other_64 = _from(app, "2001:db8:1:3::1")  # the next /64 is another subscriber
    assert other_64.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303


def test_the_throttle_key_of_an_address():
    from deltaplane.ui.router import throttle_key

    assert throttle_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert throttle_key("2001:DB8:1:2::1%eth0") == "2001:db8:1:2::/64"
    assert throttle_key("::ffff:192.0.2.7") == "192.0.2.7"  # a dual-stack socket's IPv4 client is itself
    assert throttle_key("192.0.2.7") == "192.0.2.7" and throttle_key("testclient") == "testclient"


def test_a_global_failure_budget_refuses_unknown_addresses_but_not_the_operator(monkeypatch):
    """30 failures a minute from 30 addresses (four each would never lock one out) close sign-in to every
    address that has not signed in recently, with 429 and Retry-After, for the rest of the minute."""
    from types import SimpleNamespace

    import deltaplane.ui.router as router

    now = [1000.0]
    monkeypatch.setattr(router, "time", SimpleNamespace(monotonic=lambda: now[0]))
    app = _ui_app()
    operator = _from(app, "192.0.2.1")
    assert operator.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    for i in range(30):
        now[0] = 1000.0 + i  # 30 failures within 30 s, one from each of 30 addresses (each its own /64)
        attacker = _from(app, f"2001:db8:{i:x}::1")
        assert attacker.post("/ui/login", data={"token": "guess"}).status_code == 401
    now[0] = 1030.0
    fresh = _from(app, "198.51.100.9")
    r = fresh.post("/ui/login", data={"token": ADMIN}, follow_redirects=False)
    assert r.status_code == 429 and int(r.headers["retry-after"]) == 30  # until the first failure is 60 s old
    assert "from all addresses together" in unescape(r.text)
    bearer = fresh.get("/ui/runs", headers=BEARER, follow_redirects=False)
    assert (
        bearer.status_code == 429 and "retry-after" in bearer.headers
    )  # no verdict on a bearer token either
    # the operator's address signed in a minute ago: exempt, with the form and with the bearer token
    assert operator.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303
    assert operator.get("/ui/runs", headers=BEARER).status_code == 200
    now[0] = 1060.5  # the first failure is over a minute old: 29 in the window, below the budget
    assert fresh.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303


def test_the_login_throttle_refuses_a_zero_limit():
    from deltaplane.errors import ConfigError
    from deltaplane.ui import LoginThrottle

    with pytest.raises(ConfigError, match="global_limit must be at least 1"):
        LoginThrottle(global_limit=0)


# -- session lifetime ------------------------------------------------------------------------------------------


def _old_format_cookie(key: bytes, expiry: int) -> str:
    """A cookie of the format before idle timeouts (``expiry.nonce.mac``), properly signed with the real key."""
    import hashlib
    import hmac

    mac = hmac.new(key, f"deltaplane-ui|{expiry}|nonce123".encode(), hashlib.sha256).hexdigest()
    return f"{expiry}.nonce123.{mac}"


def test_a_cookie_of_the_earlier_format_is_refused(tmp_path):
    """Cookies made before the idle timeout carried only an expiry: they are refused (sign in again)."""
    import time

    from deltaplane.ui.session import SessionKey

    home = tmp_path / "home"
    Registry.create(home)
    app = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    assert _accepts(app, _sign_in(app))
    key = SessionKey(ADMIN, lambda: Registry(home))()  # the registry's salt: the key the app uses
    assert not _accepts(app, _old_format_cookie(key, int(time.time()) + 3600))


def test_a_session_ends_when_idle_and_at_its_absolute_lifetime(tmp_path, monkeypatch):
    """A session unused for the idle timeout ends; one in use is re-issued and lives on, but not past its
    absolute lifetime counted from the sign-in."""
    import time

    from deltaplane.ui import SessionLimits, router, session

    clock = [time.time()]
    monkeypatch.setattr(session.time, "time", lambda: clock[0])
    monkeypatch.setattr(router, "wall_time", lambda: clock[0])
    app = create_ui_app(
        admin_token=ADMIN,
        runs_dir=None,
        registry_home=None,
        session_limits=SessionLimits(idle_s=30 * 60, max_s=2 * 3600),
    )
    browser = TestClient(app, follow_redirects=False)
    assert browser.post("/ui/login", data={"token": ADMIN}).status_code == 303
    start = clock[0]
    first = browser.cookies.get("deltaplane_ui")
    # in use every 20 minutes: each request moves the idle clock on (a new cookie), the session lives on
    for step in range(1, 6):
        clock[0] = start + step * 20 * 60
        r = browser.get("/ui/fleet")
        assert r.status_code == 200, step
        assert "deltaplane_ui=" in r.headers["set-cookie"] and "Max-Age=" in r.headers["set-cookie"]
    assert browser.cookies.get("deltaplane_ui") != first
    # the first cookie, unused since the sign-in 100 minutes ago, is idle: refused
    assert (
        TestClient(app, cookies={"deltaplane_ui": first}).get("/ui/fleet", follow_redirects=False).status_code
        == 303
    )
    clock[0] = start + 2 * 3600 - 5  # still within the lifetime
    assert browser.get("/ui/fleet").status_code == 200
    clock[0] = start + 2 * 3600 + 5  # used a few seconds ago, but two hours after the sign-in: ended
    r = browser.get("/ui/fleet")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    # idle: a fresh sign-in left alone for 31 minutes
    assert browser.post("/ui/login", data={"token": ADMIN}).status_code == 303
    clock[0] += 31 * 60
    assert browser.get("/ui/fleet").status_code == 303


def test_sign_out_ends_every_reissue_of_the_session_in_every_process(tmp_path, monkeypatch):
    """A sign-out revokes the session, not one cookie value: a copy taken before it, re-issued later or
    earlier, stops working in this process and in another on the same registry."""
    import time

    from deltaplane.ui import router, session

    clock = [time.time()]
    monkeypatch.setattr(session.time, "time", lambda: clock[0])
    monkeypatch.setattr(router, "wall_time", lambda: clock[0])
    home = tmp_path / "home"
    Registry.create(home)
    one = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    other = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    browser = TestClient(one, follow_redirects=False)
    assert browser.post("/ui/login", data={"token": ADMIN}).status_code == 303
    early = browser.cookies.get("deltaplane_ui")
    clock[0] += 120
    assert browser.get("/ui/fleet").status_code == 200
    late = browser.cookies.get("deltaplane_ui")
    assert late != early and _accepts(other, late)
    assert browser.post("/ui/logout").status_code == 303
    for app in (one, other):
        for cookie in (early, late):
            assert not _accepts(app, cookie)


@pytest.mark.parametrize(
    ("idle", "hours", "message"), [("0.5", "12", "idle timeout"), ("30", "0", "lifetime")]
)
def test_the_ui_command_refuses_too_short_sessions(tmp_path, idle, hours, message):
    from typer.testing import CliRunner

    from deltaplane.cli import app

    r = CliRunner().invoke(
        app,
        [
            "ui",
            "--runs",
            str(tmp_path),
            "--session-idle-minutes",
            idle,
            "--session-max-hours",
            hours,
            "--port",
            "1",
        ],
    )
    assert r.exit_code != 0 and message in r.output, r.output


def test_serve_applies_its_session_limits(monkeypatch, tmp_path):
    """`deltaplane serve --session-idle-minutes` reaches the dashboard it mounts, as `deltaplane ui`'s does."""
    import time

    from deltaplane.errors import ConfigError
    from deltaplane.ui import router, session

    clock = [time.time()]
    monkeypatch.setattr(session.time, "time", lambda: clock[0])
    monkeypatch.setattr(router, "wall_time", lambda: clock[0])
    Registry.create(tmp_path / "home")
    app = create_app(ServiceConfig(home=str(tmp_path / "home"), admin_token=ADMIN, session_idle_s=120))
    browser = TestClient(app, follow_redirects=False)
    assert browser.post("/ui/login", data={"token": ADMIN}).status_code == 303
    clock[0] += 100
    assert browser.get("/ui/fleet").status_code == 200
    clock[0] += 121
    assert browser.get("/ui/fleet").status_code == 303
    with pytest.raises(ConfigError, match="idle timeout must be at least 1 minute"):
        ServiceConfig(home=str(tmp_path / "home"), admin_token=ADMIN, session_idle_s=10)


def test_runs_the_search_passes_over_are_counted_on_the_page(tmp_path, monkeypatch):
    """docs/dashboard.md: folders deeper than the search goes, reports past the listing's limit and reports too
    large to load are not listed, and the page says so (before, they vanished without a word)."""
    import deltaplane.ui.sources as sources

    monkeypatch.setattr(sources, "MAX_REPORTS", 3)
    monkeypatch.setattr(sources, "MAX_REPORT_BYTES", 10_000)
    runs = tmp_path / "runs"
    for i in range(5):
        _report(runs, f"r{i}", _good(f"run{i}"))
        os.utime(runs / f"r{i}" / "report.json", ns=(10**18 + i * 10**9,) * 2)  # r4 is the newest
    _report(runs, "l1/l2/l3/l4/l5/l6/l7", _good("too_deep"))
    (runs / "l1/l2/l3/l4/l5/l6/l7b").mkdir()
    (runs / "huge").mkdir()
    (runs / "huge" / "report.json").write_text(json.dumps(_good("huge") | {"pad": "x" * 20_000}))
    text = unescape(_ui(runs).get("/ui/runs", headers=BEARER).text)
    notes = text.split('id="search-notes"')[1]
    assert "2 folder(s) lie more than 6 levels below the runs folder" in notes
    assert "Only the newest 3 of the 5 reports" in notes
    assert "r4 / run4" in text and "r2 / run2" in text and "r1 / run1" not in text
    left_out = text.split('id="skipped-reports"')[1]
    assert "huge" in left_out and "more than the 10,000 a dashboard loads" in left_out


def test_a_service_without_a_runs_folder_says_so_rather_than_count_zero_runs(tmp_path):
    """`deltaplane serve` without --runs (docs/fleet.md's command) showed "runs 0" on the overview, as if the
    folder held no reports; it has no folder. With one, an empty folder still counts 0."""
    home = tmp_path / "home"
    Registry.create(home)
    c = TestClient(create_app(ServiceConfig(home=str(home), admin_token=ADMIN)))
    overview = c.get("/ui/", headers=BEARER)
    assert overview.status_code == 200
    assert '<div class="v" data-field="runs">—</div>' in overview.text
    assert 'id="no-runs-folder"' in overview.text and "--runs FOLDER" in overview.text
    listing = c.get("/ui/runs", headers=BEARER)
    assert listing.status_code == 200 and 'id="no-runs-folder"' in listing.text
    (tmp_path / "runs").mkdir()
    with_runs = TestClient(
        create_app(ServiceConfig(home=str(home), admin_token=ADMIN, runs_dir=str(tmp_path / "runs")))
    )
    overview = with_runs.get("/ui/", headers=BEARER)
    assert (
        '<div class="v" data-field="runs">0</div>' in overview.text and "no-runs-folder" not in overview.text
    )
    assert "no-runs-folder" not in with_runs.get("/ui/runs", headers=BEARER).text


def test_the_versions_table_shows_the_lineage_summary_registry_list_prints(tmp_path):
    """The lineage column showed the first 160 characters of the lineage JSON: a fleet version's run config cut
    mid-key, its round and uploads past the cut. It shows `registry list`'s one-line summary now (escaped, the
    same words), and says where the whole record is."""
    from deltaplane.registry.lineage import summarize_lineage

    home = tmp_path / "home"
    reg = _registry(home)
    lineage = {
        "config": {"model": "cnn", "codec": "topk(ratio=0.01)", "clients": list(range(40))},
        "downlink_codec": "stc(0.006)",
        "note": "<b>hi</b>",
        "round": 5,
        "uploads": 18,
    }
    reg.register_model("digits", {"w": torch.ones(3)}, parent=1, lineage=lineage)
    reg.close()
    page = _ui(None, home).get("/ui/registry/digits", headers=BEARER).text
    summary, omitted = summarize_lineage(lineage)
    assert "round 5" in summary and "18 uploads" in summary and omitted == 1, summary
    assert f"<td data-field='lineage'>{escape(summary)}</td>" in page
    assert "<b>hi</b>" not in page and '{"config"' not in unescape(page)
    assert "the whole record: <code>deltaplane registry show REF</code>" in page


def test_model_page_walks_the_lineage_once_for_all_its_versions(tmp_path, monkeypatch):
    """With a withdrawal recorded, the page asked governance_problems of each shown version, each walking the whole
    parent chain again: 50 rows on a 120-version chain looked up ~6,000 versions (10 s at 3,000 versions)."""
    from deltaplane.ui.sources import RegistryView

    reg = Registry.create(tmp_path / "h", encrypt=False)
    with reg.transaction():
        reg.register_model("m", {"w": torch.zeros(2)}, governance={"cohorts": ["eu"]})
        for i in range(2, 121):
            reg.register_model("m", {"w": torch.full((2,), float(i))}, parent=i - 1)
    reg.withdraw_cohort("eu", reason="consent withdrawn")
    view = RegistryView(tmp_path / "h")
    lookups: list[int] = []
    real = Registry.get
    monkeypatch.setattr(Registry, "get", lambda self, m, n: lookups.append(n) or real(self, m, n))
    page = view.model("m")
    assert len(page["versions"]) == 50  # one page
    assert all(
        r["governance_problems"] == [f"m@{r['artifact'].number} was trained on withdrawn cohort 'eu'"]
        for r in page["versions"]
    )
    assert len(lookups) <= 2 * 120, len(lookups)  # each parent looked up once (was 50 walks of the chain)


def test_a_sign_in_that_waits_exactly_the_lockout_retry_after_is_let_in(monkeypatch):
    """The lockout's Retry-After was rounded to the nearest second: with 29.4 s of it left it said 29, and a
    client that waited exactly that was refused again. Rounded up (30), the wait covers the lockout."""
    from types import SimpleNamespace

    import deltaplane.ui.router as router

    now = [1000.0]
    monkeypatch.setattr(router, "time", SimpleNamespace(monotonic=lambda: now[0]))
    app = _ui_app()
    for i in range(30):  # the global failure budget, spent from 30 addresses within 30 s
        now[0] = 1000.0 + i
        assert _from(app, f"2001:db8:{i:x}::1").post("/ui/login", data={"token": "guess"}).status_code == 401
    now[0] = 1030.6  # 29.4 s until the first failure is a minute old
    fresh = _from(app, "198.51.100.9")
    r = fresh.post("/ui/login", data={"token": ADMIN}, follow_redirects=False)
    assert r.status_code == 429 and "try again in 30 s" in unescape(r.text)
    now[0] += int(r.headers["retry-after"])  # exactly what it was told
    assert fresh.post("/ui/login", data={"token": ADMIN}, follow_redirects=False).status_code == 303

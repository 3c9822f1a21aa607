"""The dashboard in a real browser (headless Chromium driven by Playwright) against a live service.

Every page is opened as a person would (sign in, follow links, tick two runs and compare), and the numbers on
the page are checked against the documents they come from: report.json, the registry and the service's fleet.
Screenshots go to ``tmp_path``, and to ``docs/img/`` when ``DELTAPLANE_SCREENSHOTS=docs/img`` is set.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from tests.serve.test_revocations_dashboard import keys_revoke

from deltaplane import Compressor, Delta
from deltaplane.aggregation.secagg import EnrollmentAuthority
from deltaplane.aggregation.secagg.revocation import load_revocations
from deltaplane.monitor import DriftSpec, summarize
from deltaplane.registry import Registry, Tolerance, promote
from deltaplane.report import write_report
from deltaplane.serve import AdminClient, DeviceClient, ServiceConfig, create_app
from deltaplane.serve.client import ServiceError
from deltaplane.serve.server import BackgroundServer
from deltaplane.sim import run_simulation
from deltaplane.sim.config import RunConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


ADMIN = "admin-token-for-the-dashboard-test"


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - CI installs it (dev extra)
        if os.environ.get("CI"):
            raise
        pytest.skip("playwright is not installed (pip install '.[dev]')")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is missing at {CHROMIUM}; .ci/run installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    runs = root / "runs"
    base = RunConfig(clients=6, rounds=4, seed=1)
    results = {
        "baseline": run_simulation(base),
        "topk": run_simulation(base.replace(codec="topk(0.05) | quant(bits=8)")),
        "dp": run_simulation(base.replace(clip="adaptive", dp_noise=0.8)),
    }
    report = write_report(
        [{"name": n, **r.to_dict()} for n, r in results.items()], runs / "demo", baseline="baseline"
    ).report
    home = root / "home"
    reg = Registry.create(home)
    s = {"w": torch.zeros(3)}
    v1 = reg.register_model("digits", s, lineage={"source": "run"}, governance={"cohorts": ["eu", "us"]})
    reg.register_model("digits", {"w": torch.ones(3)}, parent=v1.number, lineage={"source": "round"})
    reg.register_model("digits", {"w": torch.full((3,), 2.0)}, parent=2, lineage={"source": "merge"})
    scores = {1: 0.90, 2: 0.93, 3: 0.50}

    def evaluator(state):
        return {"accuracy": scores[int(state["w"][0]) + 1]}

    promote(reg, "digits@1", evaluator=evaluator, tolerance=Tolerance({"accuracy": 0.01}))
    promote(reg, "digits@2", evaluator=evaluator, tolerance=Tolerance({"accuracy": 0.01}))
    refused = promote(
        reg, "digits@3", evaluator=evaluator, tolerance=Tolerance({"accuracy": 0.01}), raise_on_refusal=False
    )
    assert not refused.promoted
    # a second model whose rounds the fleet page lists as closed (one published) and ended without publishing
    reg.register_model("keywords", {"w": torch.zeros(3)}, lineage={"source": "run"})
    # the enrollment authority's revocation list, written by `keys revoke`: device-4's identity key leaked
    authority = EnrollmentAuthority.generate()
    (root / "enrollment.ed25519.pem").write_bytes(authority.to_pem())
    (root / "enrollment.ed25519.pub").write_text(authority.public_text() + "\n")
    (root / "secagg").mkdir()
    keys_revoke(root / "enrollment.ed25519.pem", root / "secagg" / "revoked.bin", "--device", 4)
    # the service runs in `root` and names its list relative to it, as an operator's `serve --secagg-revocations
    # secagg/revoked.bin` does: the fleet page (and its screenshot in docs/img) shows that, not a temp folder
    cwd = pytest.MonkeyPatch()
    cwd.chdir(root)
    app = create_app(
        ServiceConfig(
            home=str(home),
            admin_token=ADMIN,
            runs_dir=str(runs),
            secagg_revocations="secagg/revoked.bin",
            secagg_authority=str(root / "enrollment.ed25519.pub"),
        )
    )
    with BackgroundServer(app) as server:
        admin = AdminClient(server.url, ADMIN)
        devices = [
            DeviceClient(server.url, admin.issue_token(f"phone-{i}", "us"), verifier=reg.verifier)
            for i in range(5)
        ]
        # drift: devices report summaries of shifted inputs; the service raises an alert on feature f2
        rng = np.random.default_rng(0)
        ref_x = rng.normal(size=(2000, 3))
        spec = DriftSpec.fit(ref_x, n_classes=10)
        admin.set_drift_reference(
            "digits", spec.to_dict(), summarize(spec, ref_x, rng.integers(0, 10, 2000)).to_dict(), window=5
        )
        for d in devices:
            x = rng.normal(size=(200, 3))
            x[:, 2] += 1.5
            d.report("digits", version=2, summary=summarize(spec, x, rng.integers(0, 10, 200)).to_dict())
        # keywords: a round published (one upload, closed) and one ended without publishing (aborted)
        done = admin.open_round("keywords", base_version=1)
        update = Compressor("identity").compress(
            Delta({"w": torch.full((3,), 0.2)}), base_id="keywords", base_version=1
        )
        devices[2].upload("keywords", done["round"], update)
        assert admin.close_round("keywords", done["round"])["version"] == 2
        idle = admin.open_round("keywords", base_version=2)
        admin.abort_round(
            "keywords", idle["round"], reason="no device uploaded within the deadline (60 s; 5 devices run)"
        )
        # a round with one accepted upload and one refused (not a deltaplane payload)
        rnd = admin.open_round("digits", base_version=2)
        delta = Delta({"w": torch.full((3,), 0.1)})
        payload = Compressor("identity").compress(delta, base_id="digits", base_version=2)
        devices[0].upload("digits", rnd["round"], payload)
        with pytest.raises(ServiceError):
            devices[1].upload("digits", rnd["round"], b"not a payload")
        # an authenticated SecAgg round invites six devices: the list's device-4 is left out
        secagg = admin.open_secagg(
            "digits",
            [f"device-{i}" for i in range(6)],
            base_version=2,
            bits=16,
            clip_range=0.5,
            weight_scale=0,
            authenticated=True,
        )
        assert secagg["revoked"] == ["device-4"]
        # consent withdrawn after the round opened: versions trained on 'eu' stop being served and promoted
        reg.withdraw_cohort("eu", reason="consent withdrawn")
        try:
            yield {"url": server.url, "report": report, "registry": reg, "root": root, "authority": authority}
        finally:
            cwd.undo()


def _shots(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path]
    extra = os.environ.get("DELTAPLANE_SCREENSHOTS")
    if extra:
        dirs.append(Path(extra))
    return dirs


def test_dashboard_pages_show_the_sources_numbers(world, tmp_path):
    sync_playwright = _browser_or_skip()
    url, report = world["url"], world["report"]
    runs = {r["name"]: r for r in report["runs"]}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        external: list[str] = []
        page.on(
            "request",
            lambda r: None if r.url.startswith(url) or r.url.startswith("data:") else external.append(r.url),
        )

        # the pages must render under their own Content-Security-Policy: the browser reports what it blocks
        blocked: list[str] = []
        page.on(
            "console",
            lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None,
        )

        def shot(name: str) -> None:
            for d in _shots(tmp_path):
                d.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(d / f"dashboard-{name}.png"), full_page=True)

        # a browser without a session lands on the sign-in page; a wrong token is refused
        page.goto(f"{url}/ui/runs")
        assert page.url.endswith("/ui/login")
        page.fill("input[name=token]", "not-the-admin-token")
        page.click("button[type=submit]")
        assert "wrong admin token" in page.content()
        page.fill("input[name=token]", ADMIN)
        page.click("button[type=submit]")
        assert page.url.endswith("/ui/")
        assert page.text_content("[data-field=runs]") == "3"
        assert page.text_content("[data-field=open_rounds]") == "2"
        assert page.text_content("[data-field=devices]") == "5"
        shot("overview")

        # runs: every run of report.json with its final figures
        page.click("header >> text=Runs")
        rows = page.locator("#runs tbody tr")
        assert rows.count() == 3
        for i in range(3):
            row = rows.nth(i)
            name = row.locator("a").text_content().split(" / ")[1]
            final = runs[name]["final"]
            assert row.locator("[data-field=test_accuracy]").text_content() == f"{final['test_accuracy']:.4f}"
            assert (
                row.locator("[data-field=uplink_bytes]").text_content()
                == f"{final['cumulative_uplink_bytes']:,}"
            )
        shot("runs")

        # one run: the per-round table equals report.json, round by round; charts are drawn
        page.click("text=demo / dp")
        dp_rounds = runs["dp"]["rounds"]
        trs = page.locator("#rounds tbody tr")
        assert trs.count() == len(dp_rounds)
        for tr, rnd in zip(trs.all(), dp_rounds, strict=True):
            assert tr.locator("[data-field=test_accuracy]").text_content() == f"{rnd['test_accuracy']:.4f}"
            assert tr.locator("[data-field=epsilon]").text_content() == f"{rnd['epsilon']:.3f}"
            assert (
                tr.locator("[data-field=client_accuracy_p90]").text_content()
                == f"{rnd['client_accuracy_p90']:.4f}"
            )
        assert page.text_content("[data-field='final.epsilon']") == f"{runs['dp']['final']['epsilon']:.3f}"
        for chart in (
            "accuracy",
            "clients",
            "accuracy-bytes",
            "bytes",
            "epsilon",
            "clipped_fraction",
            "seconds",
        ):
            assert page.locator(f"#chart-{chart} polyline").count() >= 1, chart
        shot("run")

        # compare two runs: metric differences and the config diff
        page.goto(f"{url}/ui/runs")
        page.check("input[value='demo::baseline']")
        page.check("input[value='demo::topk']")
        page.click("button:has-text('compare')")
        a, b = runs["baseline"]["final"], runs["topk"]["final"]
        assert page.text_content("[data-field='a.test_accuracy']") == f"{a['test_accuracy']:.4f}"
        assert page.text_content("[data-field='b.test_accuracy']") == f"{b['test_accuracy']:.4f}"
        diff = page.text_content("#config-diff")
        assert "codec" in diff and "topk(0.05)" in diff
        assert "seed" not in diff  # same in both
        shot("compare")

        # registry: versions with verified signatures, tags, promotions and refusals with the gate's numbers
        page.click("header >> text=Registry")
        assert page.locator("#models tbody tr").count() == 2  # digits, and keywords of the fleet's rounds
        page.click("#models >> text=digits")
        assert page.locator("#versions [data-field=signature]:has-text('verified')").count() == 3
        refused = page.locator("#decisions tr[data-promoted=false]")
        assert refused.count() == 1
        text = refused.text_content()
        assert "accuracy: 0.5000 (was 0.9300)" in text and "drops by 0.4300" in text
        assert page.locator("#decisions tr[data-promoted=true]").count() == 2
        assert page.text_content("[data-field=withdrawn]") == "eu"
        assert "withdrawn cohort 'eu'" in page.text_content("#versions")
        assert page.locator("#lineage rect").count() == 3
        shot("registry")

        # fleet: the open rounds (the plain one's upload, the device the SecAgg one left out as revoked), the
        # revocation list, refusals by reason, devices, drift per feature and the alert
        page.click("header >> text=Fleet")
        assert page.locator("#open-rounds tbody tr").count() == 2
        plain = page.locator("#open-rounds tr:has-text('plain')")
        assert plain.locator("[data-field=round]").text_content() == "1"
        assert plain.locator("[data-field=uploads]").text_content() == "1"
        assert plain.locator("[data-field=revoked]").text_content() == "—"
        secagg = page.locator("#open-rounds tr:has-text('secagg, authenticated')")
        assert secagg.locator("[data-field=revoked]").text_content() == "device-4"
        closed = page.locator("#closed-rounds tbody tr")
        assert closed.count() == 1 and "keywords" in closed.text_content()
        ended = page.locator("#unpublished-rounds tbody tr")
        assert ended.count() == 1 and "no device uploaded within the deadline" in ended.text_content()
        held = load_revocations(world["root"] / "secagg" / "revoked.bin", world["authority"].trust())
        assert page.text_content("[data-field='revocations.file']") == "secagg/revoked.bin"
        assert page.get_attribute("#revocations", "data-state") == "current"
        assert page.text_content("[data-field='revocations.authority']") == held.authority.hex()
        assert page.text_content("[data-field='revocations.sequence']") == "1"
        assert page.text_content("[data-field='revocations.issued']") == _utc(held.issued)
        assert page.text_content("[data-field='revocations.next_update']").startswith(
            f"{_utc(held.next_update)} (in 6 d 23 h"
        )
        assert page.text_content("[data-field='revocations.checked']") == "verified under the authority key"
        assert page.locator("#revoked-devices tbody tr").all_text_contents() == ["device-4fleet"]
        assert page.locator("#revocations [data-warning]").count() == 0
        assert (
            page.text_content("[data-field='uploads.accepted']") == "2"
        )  # digits' open round, keywords' closed
        assert page.text_content("[data-field='uploads.DecodeError']") == "1"
        assert page.locator("#devices tbody tr").count() == 5
        assert page.locator("#drift-digits polyline").count() >= 1
        f2 = page.locator("#drift-table-digits tr:has-text('f2')")
        assert "yes" in f2.text_content() and "2.036" in f2.text_content()  # PSI of the shifted feature
        assert "feature drift on f2" in page.text_content("#alerts")
        shot("fleet")

        assert external == [], f"the dashboard requested outside addresses: {external}"
        assert blocked == [], f"the Content-Security-Policy blocked part of a page: {blocked}"
        browser.close()
    assert (tmp_path / "dashboard-run.png").stat().st_size > 10_000


def test_pages_need_the_admin_token(world):
    url = world["url"]
    with httpx.Client(base_url=url, follow_redirects=False) as c:
        for path in ("/ui/", "/ui/runs", "/ui/registry/digits", "/ui/fleet", "/ui/run?report=demo&name=dp"):
            r = c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
        # a device token is not an admin session (and counts as a failed sign-in of this address)
        assert c.get("/ui/fleet", headers={"Authorization": "Bearer x" * 3}).status_code == 303
        assert c.get("/ui/fleet", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        # a successful sign-in clears the address's failures (the later throttle test counts from zero)
        assert c.post("/ui/login", data={"token": ADMIN}).status_code == 303
        c.cookies.clear()
        # a forged or expired cookie does not pass
        c.cookies.set("deltaplane_ui", "9999999999.deadbeef", path="/ui")
        assert c.get("/ui/").status_code == 303


def test_report_outside_the_runs_folder_is_not_served(world):
    with httpx.Client(base_url=world["url"], headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        r = c.get("/ui/run", params={"report": "../../..", "name": "x"})
        assert r.status_code == 404
        assert c.get("/ui/run", params={"report": "demo", "name": "nope"}).status_code == 404
        assert c.get("/ui/registry/unknown-model").status_code == 404
        assert c.get("/ui/compare", params={"run": "demo::dp"}).status_code == 400


def test_failed_sign_ins_are_throttled(world):
    with httpx.Client(base_url=world["url"], follow_redirects=False) as c:
        codes = [c.post("/ui/login", data={"token": f"wrong-{i}"}).status_code for i in range(7)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
        assert c.post("/ui/login", content=b"token=" + b"x" * 10_000).status_code in (413, 429)


def test_the_dashboard_works_over_tls_with_a_secure_cookie(tmp_path):
    """Loopback over TLS (`deltaplane keys tls` + `serve --tls-cert/--tls-key`): the sign-in cookie is Secure,
    and a client that does not trust the CA cannot talk to it."""
    import ssl

    from deltaplane.serve.tls import client_context, make_tls_bundle, server_ssl_options

    Registry.create(tmp_path / "home")
    bundle = make_tls_bundle(tmp_path / "tls")
    app = create_app(ServiceConfig(home=str(tmp_path / "home"), admin_token=ADMIN))
    ssl_options = server_ssl_options(bundle.server_cert, bundle.server_key)
    with BackgroundServer(app, ssl_options=ssl_options) as server:
        assert server.url.startswith("https://")
        with httpx.Client(
            base_url=server.url, verify=client_context(bundle.ca_cert), follow_redirects=False
        ) as c:
            r = c.post("/ui/login", data={"token": ADMIN})
            assert r.status_code == 303
            cookie = r.headers["set-cookie"].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
            assert c.get("/ui/fleet").status_code == 200  # the cookie travels back over TLS
        with (
            pytest.raises(httpx.ConnectError),
            httpx.Client(verify=ssl.create_default_context()) as untrusting,
        ):
            untrusting.get(f"{server.url}/ui/login")

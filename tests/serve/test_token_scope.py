"""What a device token may reach on the service's ``/v1`` routes: the models its scope names (all of them for a
token issued without one, as every token before scopes), and reports only under consent, as downloads."""

import re

import httpx
import pytest

from deltaplane.serve import DeviceClient, ServiceError

from .conftest import Service, cnn_state

#: a value for each path parameter of a device route other than ``model``
_FILL = {"round_id": "1", "number": "1", "path": "x"}


def _device_routes(app) -> list[tuple[str, str]]:
    """Every ``(method, path)`` of the app's ``/v1/models/{model}/…`` routes (from its OpenAPI document, which
    lists the included routers' routes too), other path parameters filled in."""
    out = []
    for path, ops in app.openapi()["paths"].items():
        if path.startswith("/v1/models/{model}"):
            path = re.sub(r"\{(\w+)\}", lambda m: _FILL.get(m.group(1), "{model}"), path)
            out.extend((method.upper(), path) for method in sorted(ops))
    return out


@pytest.fixture
def two_models(tmp_path):
    """A service with models "cnn" and "lm" (both in production) and admin-issued tokens."""
    svc = Service(tmp_path / "h")
    v = svc.reg.register_model("lm", cnn_state(1), lineage={"round": 0})
    svc.reg._move_tag("lm", "production", v.number, action="promote")
    return svc


def _token_for(
    svc: Service, device_id: str, models: list[str] | None, cohort: str = "default"
) -> DeviceClient:
    info = svc.admin.issue_token_info(device_id, cohort, models=models)
    assert info["models"] == models
    return DeviceClient("http://testserver", info["token"], verifier=svc.verifier, client=svc.http)


def test_every_model_route_refuses_a_token_scoped_to_another_model(two_models):
    svc = two_models
    routes = _device_routes(svc.app)
    # downloads, round status, uploads, reports and the SecAgg stages: all take the model from the path
    assert (
        len(routes) >= 10 and any("secagg" in p for _, p in routes) and any("report" in p for _, p in routes)
    )
    scoped = svc.admin.issue_token("only-cnn", models=["cnn"])
    unscoped = svc.admin.issue_token("any")
    for method, path in routes:
        url = path.replace("{model}", "lm")
        r = svc.http.request(method, url, headers={"Authorization": f"Bearer {scoped}"}, json={})
        assert r.status_code == 403, (method, url, r.status_code, r.text)
        detail = r.json()["detail"]
        assert "scoped to model(s) ['cnn']" in detail and "'lm'" in detail and "POST /admin/devices" in detail
        # the unscoped token passes the scope check on the same request (whatever the route answers then)
        r = svc.http.request(method, url, headers={"Authorization": f"Bearer {unscoped}"}, json={})
        assert "scoped to model" not in r.text, (method, url)
    assert svc.state.counts()["rejected.model_scope"] == len(routes)


def test_scoped_token_works_on_its_model_and_stores_nothing_on_another(two_models):
    svc = two_models
    dev = _token_for(svc, "d0", ["cnn"])
    assert dev.fetch("cnn")[0] == 1
    assert dev.report("cnn", version=1, metrics={"accuracy": 0.9})["accepted"]
    for call in (lambda: dev.fetch("lm"), lambda: dev.report("lm", version=1, metrics={"accuracy": 0.1})):
        with pytest.raises(ServiceError) as e:
            call()
        assert e.value.status == 403 and "'lm'" in e.value.detail
    assert [r["device"] for r in svc.state.reports.get("cnn", [])] == ["d0"]
    assert "lm" not in svc.state.reports


def test_unscoped_token_reaches_every_model_as_before(two_models):
    """Compatibility: tokens issued without ``models`` (every token issued before scopes) keep every model."""
    svc = two_models
    token = svc.admin.issue_token_info("old")["token"]
    for model in ("cnn", "lm"):  # a DeviceClient follows one model's versions: one client per model
        dev = DeviceClient("http://testserver", token, verifier=svc.verifier, client=svc.http)
        assert dev.fetch(model)[0] == 1
        assert dev.report(model, version=1, metrics={"accuracy": 0.5})["accepted"]


def test_scope_is_signed_and_checked_by_the_authority(two_models):
    auth = two_models.app.state.authority
    token = auth.issue_token("d1", "eu", models=("lm", "cnn", "lm"))
    assert token.models == ("cnn", "lm")
    ident = auth.check(token.token)
    assert ident is not None and ident.models == ("cnn", "lm") and not ident.may_use("other")
    assert auth.check(auth.issue("d2")).models is None  # type: ignore[union-attr]


def test_empty_scope_is_refused_at_issue(two_models):
    with pytest.raises(ServiceError) as e:
        two_models.admin.issue_token("d3", models=[])
    assert e.value.status in (400, 422)


def test_report_refused_for_a_version_with_a_withdrawn_cohort(tmp_path):
    svc = Service(tmp_path / "h")
    v = svc.reg.register_model("cnn", cnn_state(2), governance={"cohorts": ["eu"], "data_sources": ["app"]})
    dev = svc.device("us-a", "us")
    assert dev.report("cnn", version=v.number, metrics={"accuracy": 0.8})["accepted"]
    svc.admin.withdraw("eu")
    with pytest.raises(ServiceError) as e:
        dev.report("cnn", version=v.number, metrics={"accuracy": 0.8})
    # the status a download of that version gets
    assert (
        e.value.status == 451
        and "withdrawn cohort(s) ['eu']" in e.value.detail
        and "rebuild" in e.value.detail
    )
    assert len(svc.state.reports["cnn"]) == 1  # the refused report is not stored
    assert dev.report("cnn", version=1, metrics={"accuracy": 0.8})["accepted"]  # v1 has no eu data


def test_report_refused_from_a_cohort_that_withdrew_consent(tmp_path):
    svc = Service(tmp_path / "h")
    eu = svc.device("eu-a", "eu")
    svc.admin.withdraw("eu")
    with pytest.raises(ServiceError) as e:
        eu.report("cnn", version=1, metrics={"accuracy": 0.8})
    assert e.value.status == 403 and "cohort 'eu' withdrew consent" in e.value.detail
    assert "cnn" not in svc.state.reports


def test_fleet_enroll_model_scopes_the_tokens_on_a_running_service(two_models, tmp_path, monkeypatch):
    """``fleet enroll --model cnn`` against a service listening on loopback (uvicorn): its tokens download
    ``cnn`` and are refused, 403 naming the fix, on ``lm``; enrolled without ``--model`` they reach both."""
    from typer.testing import CliRunner

    from deltaplane.cli import app as cli
    from deltaplane.serve.server import BackgroundServer

    from .conftest import ADMIN

    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", ADMIN)
    with BackgroundServer(two_models.app, port=0) as server:
        for out, scope in (("scoped", ["--model", "cnn"]), ("open", [])):
            args = ["fleet", "enroll", "--url", server.url, "--devices", "1", "--out", str(tmp_path / out)]
            done = CliRunner().invoke(cli, [*args, *scope])
            assert done.exit_code == 0, done.output
        for out, lm_status in (("scoped", 403), ("open", 200)):
            token = (tmp_path / out / "device-0.token").read_text().strip()
            headers = {"Authorization": f"Bearer {token}"}
            assert httpx.get(f"{server.url}/v1/models/cnn/download", headers=headers).status_code == 200
            r = httpx.get(f"{server.url}/v1/models/lm/download", headers=headers)
            assert r.status_code == lm_status, r.text
            if lm_status == 403:
                assert "scoped to model(s) ['cnn']" in r.json()["detail"]

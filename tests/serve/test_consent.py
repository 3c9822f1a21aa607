"""Consent withdrawal end to end on the HTTP service: rounds record cohorts, withdrawal blocks serving and
promotion of every affected version, a rebuild retrains from the last unaffected version without the cohort."""

import pytest
import torch
from typer.testing import CliRunner

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.registry import Registry
from deltaplane.serve import ServiceError

from .conftest import Service, cnn_state


def upload(svc, device, rnd, seed):
    base = rnd["base_version"]
    g = torch.Generator().manual_seed(seed)
    state = svc.reg.load_state(f"cnn@{base}")
    payload = Compressor("topk(0.2) | quant(bits=8)", seed=seed).compress(
        Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}),
        base_id="cnn",
        base_version=base,
    )
    return device.upload("cnn", rnd["round"], payload, nonce=rnd["nonce"])


def test_withdrawal_and_rebuild_over_http(tmp_path):
    svc = Service(tmp_path / "h")
    svc.state.evaluator = lambda state: {"accuracy": 0.9, "ood_accuracy": 0.9}
    devices = {name: svc.device(name, name.split("-")[0]) for name in ("eu-a", "eu-b", "us-a", "us-b")}
    viewer = svc.device("viewer", "us")
    # two rounds with eu and us devices
    r1 = svc.admin.open_round("cnn")
    upload(svc, devices["eu-a"], r1, 1)
    upload(svc, devices["us-a"], r1, 2)
    v2 = svc.admin.close_round("cnn", r1["round"])["version"]
    assert svc.admin.promote("cnn", v2)["promoted"]
    r2 = svc.admin.open_round("cnn")
    upload(svc, devices["eu-b"], r2, 3)
    upload(svc, devices["us-b"], r2, 4)
    v3 = svc.admin.close_round("cnn", r2["round"])["version"]
    assert viewer.fetch("cnn")[0] == v2
    # eu withdraws: every version trained on it is listed and blocked
    out = svc.admin.withdraw("eu", reason="GDPR art. 7(3)")
    assert out["affected"] == [f"cnn@{v2}", f"cnn@{v3}"]
    with pytest.raises(ServiceError) as e:
        svc.device("new", "us").fetch("cnn")  # production is v2: not served any more
    assert e.value.status == 451 and "eu" in e.value.detail
    refused = svc.admin.promote("cnn", v3)
    assert not refused["promoted"] and "withdrawn cohort 'eu'" in refused["regressions"][0]
    with pytest.raises(ServiceError) as e:
        svc.admin.open_round("cnn")  # a normal round on the affected training version
    assert e.value.status == 409 and "rebuild" in e.value.detail
    # rebuild: a round on the last unaffected version (v1), eu devices refused
    rb = svc.admin.rebuild("cnn")
    assert rb["base_version"] == 1
    with pytest.raises(ServiceError) as e:
        upload(svc, devices["eu-a"], rb, 5)
    assert e.value.status in (403, 409)
    upload(svc, devices["us-a"], rb, 6)
    upload(svc, devices["us-b"], rb, 7)
    v4 = svc.admin.close_round("cnn", rb["round"])["version"]
    art = svc.reg.get("cnn", v4)
    assert art.parent == 1 and "eu" not in art.governance.cohorts
    assert "eu" in art.governance.excluded_cohorts and art.lineage["excluded_cohorts"] == ["eu"]
    assert not svc.reg.governance_problems(art)
    assert svc.admin.promote("cnn", v4)["promoted"]
    assert svc.device("new2", "us").fetch("cnn")[0] == v4
    # later rounds on the rebuilt version keep the exclusion in their lineage
    r5 = svc.admin.open_round("cnn")
    assert r5["base_version"] == v4
    upload(svc, devices["us-a"], r5, 8)
    v5 = svc.reg.get("cnn", svc.admin.close_round("cnn", r5["round"])["version"])
    assert "eu" in v5.governance.excluded_cohorts and not svc.reg.governance_problems(v5)


def test_withdrawal_reaches_merges_and_deploys_through_lineage(tmp_path):
    reg = Registry.create(tmp_path / "h")
    a = reg.register_model("a", cnn_state(0), governance={"cohorts": ["eu"], "data_sources": ["app"]})
    b = reg.register_model("b", cnn_state(1), governance={"cohorts": ["us"]})
    merged = reg.register_model("m", cnn_state(2), sources=[a, b.ref], lineage={"merge": "ties"})
    assert merged.governance.cohorts == ("eu", "us") and merged.lineage["sources"] == ["a@1", "b@1"]
    deployed = reg.register_model("m", cnn_state(3), parent=merged.number, lineage={"deploy_recipe": "int8"})
    assert "eu" in deployed.governance.cohorts
    affected = {x.ref for x in reg.withdraw_cohort("eu")}
    assert affected == {"a@1", "m@1", "m@2"}


def test_cli_withdraw_lists_affected_versions_and_the_rebuild_base(tmp_path):
    from deltaplane.cli import app

    home = tmp_path / "h"
    reg = Registry.create(home)
    reg.register_model("cnn", cnn_state(0), governance={"cohorts": ["us"]})
    reg.register_model("cnn", cnn_state(1), parent=1, governance={"cohorts": ["eu"]})
    r = CliRunner().invoke(app, ["registry", "withdraw", "--cohort", "eu", "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert "affected versions: cnn@2" in r.output and "rebuild from cnn@1" in r.output


def test_the_service_refuses_to_serve_from_tags_or_withdrawals_edited_in_the_database(tmp_path):
    """Downloads decide on tags and withdrawals verified against the registry's signed state log: a withdrawal
    deleted, or production moved, in registry.db is a 409, not a served model."""
    import sqlite3

    svc = Service(tmp_path / "h")
    v2 = svc.reg.register_model("cnn", cnn_state(1), parent=1, governance={"cohorts": ["eu"]})
    svc.reg._move_tag("cnn", "production", v2.number, action="promote")
    svc.reg.withdraw_cohort("eu")
    device = svc.device("d", "us")
    with pytest.raises(ServiceError) as e:
        device.fetch("cnn")
    assert e.value.status == 451
    db = sqlite3.connect(tmp_path / "h" / "registry.db", isolation_level=None)
    db.execute("DELETE FROM withdrawals")
    with pytest.raises(ServiceError) as e:
        device.fetch("cnn")
    assert e.value.status == 409 and "withdrawals: cohort 'eu' is missing" in e.value.detail
    db.execute(
        "INSERT INTO withdrawals SELECT json_extract(entry, '$.cohort'), json_extract(entry, '$.reason'), "
        "json_extract(entry, '$.at') FROM state_log WHERE json_extract(entry, '$.op') = 'withdraw'"
    )
    with pytest.raises(ServiceError) as e:
        device.fetch("cnn")
    assert e.value.status == 451  # restored: the withdrawal holds again
    db.execute("UPDATE tags SET number=1 WHERE tag='production'")  # serve the version before it instead
    db.close()
    with pytest.raises(ServiceError) as e:
        device.fetch("cnn")
    assert e.value.status == 409 and "tags: cnn:production points to version 1" in e.value.detail


@pytest.mark.parametrize("withdrawn", ["uploader", "base"])
def test_a_round_open_when_a_cohort_withdraws_is_not_published(tmp_path, withdrawn):
    """A plain round published a version after a cohort withdrew while it was open: one whose device had
    uploaded to it, or one its base was built from. Its close is refused (409) and nothing is published; the
    round is aborted instead, as a SecAgg round's is."""
    svc = Service(tmp_path / "h")
    if withdrawn == "base":
        v2 = svc.reg.register_model("cnn", cnn_state(1), parent=1, governance={"cohorts": ["eu"]})
        svc.reg.set_tag("cnn", "training", v2.number)
    rnd = svc.admin.open_round("cnn")
    if withdrawn == "uploader":
        upload(svc, svc.device("eu-a", "eu"), rnd, 1)
    upload(svc, svc.device("us-a", "us"), rnd, 2)
    before, tags = [v.ref for v in svc.reg.versions()], svc.reg.tags("cnn")
    svc.admin.withdraw("eu")
    with pytest.raises(ServiceError) as e:
        svc.admin.close_round("cnn", rnd["round"])
    assert e.value.status == 409 and "'eu'" in e.value.detail and "abort" in e.value.detail
    assert [v.ref for v in svc.reg.versions()] == before and svc.reg.tags("cnn") == tags
    assert svc.admin.abort_round("cnn", rnd["round"])["aborted"]


def test_a_withdrawal_reaches_its_cohort_whatever_the_case_it_is_spelled_in(tmp_path):
    """`withdraw EU` recorded a cohort nobody was in: versions trained on "eu" stayed served and promotable,
    "eu" devices kept uploading. Cohort names are ASCII, so case is the one spelling that can differ: every
    consent check matches without it."""
    svc = Service(tmp_path / "h")
    v2 = svc.reg.register_model("cnn", cnn_state(1), parent=1, governance={"cohorts": ["eu"]})
    svc.reg._move_tag("cnn", "production", v2.number, action="promote")
    assert svc.admin.withdraw("EU")["affected"] == [f"cnn@{v2.number}"]
    assert svc.reg.governance_problems(v2) == [f"cnn@{v2.number} was trained on withdrawn cohort 'eu'"]
    with pytest.raises(ServiceError) as e:
        svc.device("us-a", "us").fetch("cnn")
    assert e.value.status == 451
    rebuild = svc.admin.rebuild("cnn", tag="production")
    assert rebuild["base_version"] == 1
    with pytest.raises(ServiceError) as e:
        upload(svc, svc.device("eu-a", "Eu"), rebuild, 1)
    assert e.value.status in (403, 409) and "consent" in e.value.detail

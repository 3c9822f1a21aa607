"""The service's drift routes: the reference PUT and device reports feeding it."""

import numpy as np
import pytest

from deltaplane.monitor import DriftSpec, summarize
from deltaplane.serve.client import ServiceError

from .conftest import ADMIN


def test_reference_without_feature_names_monitors_every_feature(service):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 3))
    spec = DriftSpec.fit(ref)
    d = spec.to_dict()
    del d["feature_names"]
    out = service.admin.set_drift_reference("cnn", d, summarize(spec, ref).to_dict(), window=1)
    assert out["features"] == 3
    report = service.device("d0").report(
        "cnn", version=1, summary=summarize(spec, rng.normal(size=(500, 3)) + 3.0).to_dict()
    )
    assert sorted(a.split(":")[0] for a in report["alerts"]) == [f"feature drift on f{j}" for j in range(3)]
    with pytest.raises(ServiceError) as e:
        service.admin.set_drift_reference(
            "cnn", {**d, "feature_names": ["f0"]}, summarize(spec, ref).to_dict()
        )
    assert e.value.status == 422 and "feature_names" in e.value.detail
    with pytest.raises(ServiceError) as e:
        service.admin.set_drift_reference("cnn", d, summarize(spec, ref).to_dict(), psi_threshold=25)
    assert e.value.status == 422 and "psi_threshold" in e.value.detail


def _liar(spec, x):
    """A device claiming 1e9 samples: counts of 5000 real ones, each multiplied by 200,000 (n consistent)."""
    s = summarize(spec, x).to_dict()
    s["feature_counts"] = [[v * 200_000 for v in row] for row in s["feature_counts"]]
    s["n"] = 10**9
    return s


def test_one_device_can_neither_hide_drift_nor_raise_an_alert(service):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 2))
    spec = DriftSpec.fit(ref)
    devs = [service.device(f"d{i}") for i in range(10)]

    def window(honest_shift, liar_shift):
        service.admin.set_drift_reference("cnn", spec.to_dict(), summarize(spec, ref).to_dict(), window=10)
        for d in devs[:9]:
            x = rng.normal(size=(300, 2)) + honest_shift
            out = d.report("cnn", version=1, summary=summarize(spec, x).to_dict())
            assert not out["drift_evaluated"]
        return devs[9].report("cnn", version=1, summary=_liar(spec, rng.normal(size=(5000, 2)) + liar_shift))

    hidden = window(honest_shift=2.0, liar_shift=0.0)  # 9 devices see a 2-sigma shift, the liar says "none"
    assert hidden["drift_evaluated"] and len(hidden["alerts"]) == 2, hidden
    framed = window(honest_shift=0.0, liar_shift=3.0)  # 9 devices see nothing, the liar claims a big shift
    assert framed["drift_evaluated"] and framed["alerts"] == [], framed


def test_a_window_needs_distinct_devices_and_counts_must_match_n(service):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(2000, 2))
    spec = DriftSpec.fit(ref)
    out = service.admin.set_drift_reference("cnn", spec.to_dict(), summarize(spec, ref).to_dict(), window=5)
    assert out["min_devices"] == 3
    one = service.device("solo")
    for _ in range(6):  # one device fills the window alone: no verdict, however shifted its data
        out = one.report("cnn", version=1, summary=summarize(spec, rng.normal(size=(300, 2)) + 3).to_dict())
        assert not out["drift_evaluated"]
    # a device's reports count up to ceil(window / min_devices) = 2: the flood's 6 and two devices' make 4 of 5
    # (before, the window closed on them, 8 reports, 6 of them one device's)
    others = [service.device(f"d{i}") for i in range(2)]
    for device in others:
        out = device.report(
            "cnn", version=1, summary=summarize(spec, rng.normal(size=(300, 2)) + 3).to_dict()
        )
        assert not out["drift_evaluated"]
    out = others[0].report("cnn", version=1, summary=summarize(spec, rng.normal(size=(300, 2)) + 3).to_dict())
    assert out["drift_evaluated"] and len(out["alerts"]) == 2
    bad = summarize(spec, rng.normal(size=(300, 2))).to_dict()
    bad["n"] = 10  # counts claim 300 samples
    with pytest.raises(ServiceError) as e:
        one.report("cnn", version=1, summary=bad)
    assert e.value.status == 422 and "n=10" in e.value.detail


def test_absurd_embedding_sums_are_422_and_the_history_stays_readable(service):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 4)) + 1
    spec = DriftSpec.fit(embeddings=ref, n_projections=2)
    out = service.admin.set_drift_reference(
        "cnn",
        spec.to_dict(),
        summarize(spec, embeddings=ref).to_dict(),
        window=2,
        embedding_shift_threshold=0.5,
    )
    assert service.state.monitors["cnn"].embedding_shift_threshold == 0.5 and out["window"] == 2
    for i in range(2):
        with pytest.raises(ServiceError) as e:
            service.device(f"d{i}").report(
                "cnn", version=1, summary={"n": 1, "embedding_sum": [1e308] * 4, "embedding_n": 1}
            )
        assert e.value.status == 422 and "embedding_sum" in e.value.detail
    # finite but absurd for its n: refused by the library check (|mean| > 1e6)
    with pytest.raises(ServiceError) as e:
        service.device("d9").report(
            "cnn", version=1, summary={"n": 1, "embedding_sum": [1e12] * 4, "embedding_n": 1}
        )
    assert e.value.status == 422
    assert service.http.get("/admin/models/cnn/drift", headers=service.admin._headers).status_code == 200


def test_a_device_reporting_missing_feature_values_gets_a_missing_values_alert(service):
    """The service's schema refused the new missing_counts (422); now the NaN inputs a device counted apart
    raise a "missing values" alert instead of passing for a shift to high values."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 2))
    spec = DriftSpec.fit(ref)
    service.admin.set_drift_reference("cnn", spec.to_dict(), summarize(spec, ref).to_dict(), window=1)
    x = rng.normal(size=(300, 2))
    x[:150, 1] = np.nan
    out = service.device("d0").report("cnn", version=1, summary=summarize(spec, x).to_dict())
    assert out["drift_evaluated"] and out["alerts"] and all("missing values" in a for a in out["alerts"])
    assert "f1" in out["alerts"][0]


@pytest.mark.parametrize(
    "spec",
    [
        '{"feature_edges": [[0, 1]], "n_classes": 1e400}',
        '{"feature_edges": [[0, 1]], "embedding_trace": 1' + "0" * 400 + "}",
    ],
)
def test_a_reference_whose_numbers_overflow_is_a_422_not_a_server_error(service, spec):
    resp = service.http.put(
        "/admin/models/cnn/drift-reference",
        content='{"spec": ' + spec + ', "reference": {"n": 1, "feature_counts": [[0, 1, 0]]}}',
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 422 and "drift spec is malformed" in resp.json()["detail"], resp.text


def test_a_device_reporting_one_sample_cannot_hide_the_fleets_drift(service):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 2))
    spec = DriftSpec.fit(ref)
    service.admin.set_drift_reference("cnn", spec.to_dict(), summarize(spec, ref).to_dict(), window=3)
    for i in range(2):
        x = rng.normal(size=(300, 2)) + 1.0
        assert not service.device(f"d{i}").report("cnn", version=1, summary=summarize(spec, x).to_dict())[
            "drift_evaluated"
        ]
    out = service.device("liar").report("cnn", version=1, summary=summarize(spec, np.zeros((1, 2))).to_dict())
    assert out["drift_evaluated"] and len(out["alerts"]) == 2, out


def _predictions_monitored(service):
    """A reference of 2 features and 3 classes (windows of 3 devices) and a summary maker: 300 inputs like the
    reference, predicted with the given class shares."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(2000, 2))
    spec = DriftSpec.fit(ref, n_classes=3)
    # the reference PUT carries the label prior, as before: the service never compares predictions with it
    prior = summarize(spec, ref, rng.integers(0, 3, 2000)).to_dict()
    service.admin.set_drift_reference("cnn", spec.to_dict(), prior, window=3)

    def summary(shares):
        return summarize(spec, rng.normal(size=(300, 2)), rng.choice(3, size=300, p=shares)).to_dict()

    return summary


def test_reports_predictions_are_tested_against_their_versions_registered_predictions(service):
    summary = _predictions_monitored(service)
    devs = [service.device(f"d{i}") for i in range(3)]
    early = [
        0.8,
        0.15,
        0.05,
    ]  # an early model: far from the labels' shares, like its own reference predictions
    for d in devs:  # no prediction reference for version 1 yet: predictions untested, and the row says why
        out = d.report("cnn", version=1, summary=summary(early))
    (row,) = [
        r for r in service.admin._get("/admin/models/cnn/drift")[-1]["rows"] if r["kind"] == "prediction"
    ]
    assert (
        out["alerts"] == [] and row["psi"] is None and "no prediction reference for version 1" in row["note"]
    )

    got = service.admin.set_prediction_reference("cnn", 1, [1600, 300, 100])
    assert got == {"model": "cnn", "version": 1, "versions": [1]}
    for d in devs:  # the same model predicting as it did on the reference data: no drift
        out = d.report("cnn", version=1, summary=summary(early))
    (row,) = [
        r for r in service.admin._get("/admin/models/cnn/drift")[-1]["rows"] if r["kind"] == "prediction"
    ]
    assert out["alerts"] == [] and row["psi"] < 0.05 and row["version"] == 1
    for d in devs:  # its predictions moving: prediction drift
        out = d.report("cnn", version=1, summary=summary([0.1, 0.2, 0.7]))
    assert [a.split(":")[0] for a in out["alerts"]] == ["prediction drift on predicted class (version 1)"]


def test_a_prediction_reference_is_checked(service):
    _predictions_monitored(service)
    for counts, what in [([1, 2], "3 whole counts"), ([0, 0, 0], "holds no inputs"), ([], "at least 1")]:
        with pytest.raises(ServiceError) as e:
            service.admin.set_prediction_reference("cnn", 1, counts)
        assert e.value.status == 422 and what in e.value.detail, e.value.detail
    with pytest.raises(ServiceError) as e:
        service.admin.set_prediction_reference("cnn", 7, [1, 1, 1])
    assert e.value.status == 404
    r = service.http.put(
        "/admin/models/cnn/drift-reference/predictions/1",
        json={"prediction_counts": [1, -1, 1]},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 422
    assert service.state.monitors["cnn"].prediction_references == {}  # nothing refused was kept


def test_a_prediction_reference_needs_a_drift_reference(service):
    with pytest.raises(ServiceError) as e:
        service.admin.set_prediction_reference("cnn", 1, [1, 1, 1])
    assert e.value.status == 404 and "drift-reference first" in e.value.detail


def test_a_liar_in_an_honest_fleet_raises_no_alert_over_http(service):
    """Nine honest devices and one reporting every input missing, through the report route: before, each
    feature's missing-values signal alerted (one device's 10% share of the window); now an alert must hold
    without any one device."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 3))
    spec = DriftSpec.fit(ref)
    service.admin.set_drift_reference("cnn", spec.to_dict(), summarize(spec, ref).to_dict(), window=10)
    for i in range(9):
        service.device(f"d{i}").report(
            "cnn", version=1, summary=summarize(spec, rng.normal(size=(200, 3))).to_dict()
        )
    out = service.device("liar").report(
        "cnn", version=1, summary=summarize(spec, np.full((200, 3), np.nan)).to_dict()
    )
    assert out["drift_evaluated"] and out["alerts"] == [], out
    (window,) = service.admin._get("/admin/models/cnn/drift")
    missing = [r for r in window["rows"] if r["kind"] == "missing values"]
    assert len(missing) == 3 and all(r["psi"] > 0.2 and r["psi_without_one"] == 0.0 for r in missing)


def test_one_models_flood_of_alerts_keeps_another_models_alerts(service, monkeypatch):
    """The last 10,000 alerts were kept for all models together: one model's windows pushed every other model's
    alerts out, in memory and in the database. Each model now keeps its last MAX_ALERTS."""
    import torch

    from deltaplane.serve import fleet_watch

    monkeypatch.setattr(fleet_watch, "MAX_ALERTS", 4)
    service.reg.register_model("other", {"w": torch.zeros(2)})
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 3))
    spec = DriftSpec.fit(ref)
    shifted = summarize(spec, rng.normal(size=(500, 3)) + 3.0).to_dict()
    for model in ("cnn", "other"):
        service.admin.set_drift_reference(
            model, spec.to_dict(), summarize(spec, ref).to_dict(), window=1, min_devices=1
        )
    assert len(service.device("d0").report("cnn", version=1, summary=shifted)["alerts"]) == 3
    for _ in range(5):  # 15 alerts of "other"
        service.device("d1").report("other", version=1, summary=shifted)
    models = [a["model"] for a in service.admin.alerts()]
    assert models.count("cnn") == 3 and models.count("other") == 4
    assert [a["model"] for a in service.admin.alerts("cnn")] == ["cnn"] * 3
    stored = fleet_watch.FleetWatch(service.reg).load().alerts
    assert [a["model"] for a in stored].count("cnn") == 3 and len(stored) == 7

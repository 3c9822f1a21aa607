"""The service's drift routes: the reference PUT and device reports feeding it."""

import numpy as np
import pytest

from deltaplane.monitor import DriftSpec, summarize
from deltaplane.serve.client import ServiceError


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

import numpy as np
import pytest

from deltaplane.monitor import DriftSpec, summarize
from deltaplane.serve.client import ServiceError


@pytest.mark.parametrize("n_classes", [65_537, 10**30])
def test_a_reference_no_report_could_match_is_a_422(service, n_classes):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 2))
    spec = DriftSpec.fit(ref)
    d = {**spec.to_dict(), "n_classes": n_classes}
    with pytest.raises(ServiceError) as e:
        service.admin.set_drift_reference("cnn", d, summarize(spec, ref).to_dict(), window=1)
    assert e.value.status == 422 and "n_classes" in e.value.detail and "65536" in e.value.detail

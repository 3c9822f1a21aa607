"""SecAgg+ on the service side: a ``--federation`` with ``secagg_neighbours`` opens its rounds on that graph when
the operator leaves ``neighbours`` out, and the fleet coordinator opens each round with its config's degree."""

from __future__ import annotations

from typing import Any

import pytest

from deltaplane.aggregation.secagg import default_threshold
from deltaplane.engine import RunConfig
from deltaplane.serve.client import ServiceError
from deltaplane.serve.fleet import coordinate

FEDERATION = RunConfig(clients=16, secagg=True, clip="1.0", secagg_neighbours=8, downlink_codec="identity")


def test_the_service_opens_its_federation_degree_unless_the_operator_says_otherwise(service_factory) -> None:
    svc = service_factory(federation=FEDERATION)
    names = [f"d{i}" for i in range(40)]
    for d in names:
        svc.device(d)

    def opened(devices: list[str], **params: Any) -> tuple[int | None, int]:
        cfg = svc.admin.open_secagg("cnn", devices, weight_scale=0, **params)["config"]
        return cfg["neighbours"], cfg["threshold"]

    # the federation's degree for a round of 16, with the neighbourhood's threshold (⌊2·9/3⌋ + 1)
    assert opened(names[:16]) == (8, default_threshold(9))
    # a round of 40: neighbourhoods of 9 are below what its devices accept (13), so the least they accept
    assert opened(names) == (12, default_threshold(13))
    # the operator's own choice wins: an explicit null is the complete graph, a degree is taken as given
    assert opened(names[:16], neighbours=None) == (None, default_threshold(16))
    assert opened(names[:16], neighbours=10) == (10, default_threshold(11))
    with pytest.raises(ServiceError) as refused:  # ... and refused when its devices would refuse it
        opened(names, neighbours=8)
    assert refused.value.status == 422 and "neighbours=8" in refused.value.detail


class _Admin:
    """Stands in for the service: records each SecAgg open and refuses it (the coordinator reports the round
    failed and goes on), so only what the coordinator asks for is checked."""

    base_url = "http://stand-in"

    def __init__(self) -> None:
        self.opens: list[dict[str, Any]] = []

    def open_secagg(self, model: str, devices: list[str], **params: Any) -> dict[str, Any]:
        self.opens.append({"devices": len(devices), **params})
        raise ServiceError(422, "recorded")


@pytest.mark.parametrize(("devices", "degree"), [(16, 8), (40, 12), (9, None)])
def test_the_fleet_coordinator_opens_each_round_with_its_config_degree(devices, degree) -> None:
    """16 enrolled devices: the config's degree; 40: the least their devices accept (13 per neighbourhood);
    9: a neighbourhood of 9 holds every device, the complete graph (null, not the service's default)."""
    admin = _Admin()
    names = [f"device-{i}" for i in range(devices)]
    done = coordinate(
        admin, FEDERATION, model="cnn", rounds=1, deadline=1, devices=names, weight_scale=0, drift=False
    )  # type: ignore[arg-type]
    assert admin.opens == [{"devices": devices, "weight_scale": 0, "neighbours": degree}]
    assert done[0].failed == "recorded"

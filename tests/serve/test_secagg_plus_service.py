"""SecAgg+ on the service side: a ``--federation`` with ``secagg_neighbours`` opens its rounds on that graph when
the operator leaves ``neighbours`` out, and the fleet coordinator opens each round with its config's degree."""

from __future__ import annotations

from typing import Any

import pytest

from deltaplane.aggregation.secagg import default_threshold
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError
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
    failed and stops), so only what the coordinator asks for is checked."""

    base_url = "http://stand-in"

    def __init__(self) -> None:
        self.opens: list[dict[str, Any]] = []

    def open_secagg(self, model: str, devices: list[str], **params: Any) -> dict[str, Any]:
        from deltaplane.serve.coordinator import this_coordinator

        assert params.pop("coordinator") == this_coordinator()  # every open names its coordinator
        self.opens.append({"devices": len(devices), **params})
        raise ServiceError(422, "recorded")

    def stats(self) -> dict[str, Any]:  # no round open: none left by a coordinator that is gone
        return {"rounds": {}, "secagg_rounds": {}}


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
    assert done[0].failed.startswith("recorded (the service refuses this open")


class _CliAdmin(_Admin):
    """:class:`_Admin` behind ``deltaplane fleet coordinate``, which also reads the model's versions (for the
    reference `fleet init` stores: none here, so it builds the task) and sets the drift reference first."""

    def __init__(self, *_: Any, **__: Any) -> None:
        super().__init__()

    def versions(self, model: str) -> dict[str, Any]:
        return {"model": model, "versions": []}

    def set_drift_reference(self, *_: Any, **__: Any) -> None:
        pass


@pytest.fixture
def coordinate_cli(monkeypatch, tmp_path):
    """``coordinate_cli(federation_yaml, *args)``: `deltaplane fleet coordinate` against a stand-in service; its
    exit code, its output on one line and the SecAgg opens it asked for."""
    from typer.testing import CliRunner

    from deltaplane import cli
    from deltaplane.serve import client

    admins: list[_CliAdmin] = []

    def admin(*args: Any, **kwargs: Any) -> _CliAdmin:
        admins.append(_CliAdmin())
        return admins[-1]

    monkeypatch.setattr(client, "AdminClient", admin)
    monkeypatch.setenv("DELTAPLANE_ADMIN_TOKEN", "x" * 24)

    def run(federation: str, *args: str) -> tuple[int, str, list[dict[str, Any]]]:
        path = tmp_path / "fleet.yaml"
        path.write_text(federation)
        base = [
            "fleet",
            "coordinate",
            "--url",
            "http://127.0.0.1:9",
            "--federation",
            str(path),
            "--model",
            "cnn",
        ]
        r = CliRunner().invoke(
            cli.app,
            [*base, "--rounds", "1", "--deadline", "1", "--weight-scale", "0", *args],
            terminal_width=200,
        )
        return r.exit_code, " ".join(r.output.split()), [o for a in admins for o in a.opens]

    return run


SECAGG_16 = "clients: {count: 16}\nprivacy: {clip: 1.0}\nsecagg: {enabled: true, neighbours: 8}\n"


@pytest.mark.parametrize(
    ("flag", "degree"), [([], 8), (["--secagg-neighbours", "10"], 10), (["--secagg-neighbours", "0"], None)]
)
def test_fleet_coordinate_opens_the_degree_of_its_flag_over_the_federation(
    coordinate_cli, flag, degree
) -> None:
    """`--secagg-neighbours K` sets the degree of the rounds the coordinator opens, over the federation's (the
    devices check each invitation's graph against their own policy, not against the file's degree). 0 opens
    the complete graph (neighbours null: the service's open then takes no degree from its own federation)."""
    code, output, opens = coordinate_cli(SECAGG_16, *flag)
    assert code == 1 and "1 of 1 rounds failed" in output, output  # the stand-in refused the round it opened
    assert opens == [{"devices": 16, "weight_scale": 0, "neighbours": degree}]


@pytest.mark.parametrize(
    ("federation", "degree", "says"),
    [
        (SECAGG_16, "9", "secagg_neighbours=9 must be even"),
        (SECAGG_16, "6", "devices refuse fewer than 9"),
        (SECAGG_16, "16", "a round of the 16 clients this run expects gives each device at most 15"),
        ("clients: {count: 16}\n", "8", "fleet.yaml runs plain rounds: set secagg.enabled: true there"),
    ],
    ids=["odd", "too-sparse", "too-dense", "no-secagg"],
)
def test_fleet_coordinate_refuses_a_degree_the_config_refuses(
    coordinate_cli, federation, degree, says
) -> None:
    """The degree is checked as the YAML key is (the same message), before any round is opened; a federation
    without SecAgg has no degree to set (the service and the devices read SecAgg from the same file)."""
    code, output, opens = coordinate_cli(federation, "--secagg-neighbours", degree)
    assert code == 2 and not opens, output
    assert says in output
    if "plain rounds" not in says:  # the config layer's own message, word for word
        with pytest.raises(ConfigError) as expected:
            FEDERATION.replace(secagg_neighbours=int(degree))
        assert " ".join(str(expected.value).split()) in output

"""The engine's uplink uses compact frames: same decoded updates as self-describing ones, fewer bytes."""

import pytest
import torch

import deltaplane as dp
from deltaplane.codecs import Compressor, WireSession, is_compact
from deltaplane.codecs.wire import read_table
from deltaplane.engine import RunConfig
from deltaplane.errors import SessionMismatch
from deltaplane.sim import run_simulation

SMALL = {"clients": 4, "rounds": 2, "local_epochs": 1, "codec": "topk(0.003) | quant(bits=4)"}


def _run(engine: str, wire: str, **kw):
    return run_simulation(RunConfig(**{**SMALL, **kw}).replace(engine=engine, wire=wire)).to_dict()


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_compact_uplink_trains_the_same_model_with_fewer_bytes(engine: str) -> None:
    compact = _run(engine, "compact", entropy_coding=False)
    full = _run(engine, "self-describing")
    # compact frames decode to exactly what the self-describing payloads decode to: the same run
    for a, b in zip(compact["rounds"], full["rounds"], strict=True):
        assert a["test_accuracy"] == b["test_accuracy"]
    # and each payload is smaller by (self-describing header) - (compact framing)
    up_c = [r["uplink_bytes"] for r in compact["rounds"]]
    up_f = [r["uplink_bytes"] for r in full["rounds"]]
    assert all(c < f for c, f in zip(up_c, up_f, strict=True))


def test_per_round_uplink_drops_by_exactly_the_header_difference() -> None:
    """Counted independently: frame one device's update both ways and compare with the engine's count."""
    from deltaplane.apps.digits import DigitsCNN

    state = DigitsCNN().state_dict()
    g = torch.Generator().manual_seed(0)
    delta = dp.Delta({k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()})
    spec = SMALL["codec"]
    session = WireSession.create(state, spec, base_id="digits", entropy=False)
    full = Compressor(spec, error_feedback=False).compress(delta, base_id="digits", base_version=0)
    compact = Compressor(spec, error_feedback=False).compress(delta, base_version=0, session=session)
    table, _ = session.read_table(compact)
    body = read_table(full).size
    assert table.size == body  # the same bodies, byte for byte
    saved = len(full) - len(compact)
    header_full = len(full) - body
    header_compact = len(compact) - body
    assert saved == header_full - header_compact and header_compact < 40 < header_full


def test_server_step_refuses_another_session_and_accepts_self_describing() -> None:
    from deltaplane.engine import ServerStep, make_task

    cfg = RunConfig(**SMALL)
    task = make_task(cfg)
    model = task.build_model(0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server = ServerStep.for_run(cfg, task, state, base_id="digits")
    server.open(1)
    delta = dp.Delta({k: torch.full_like(v, 0.01) for k, v in state.items()})
    good = Compressor(cfg.codec).compress(delta, base_version=0, session=server.session)
    assert is_compact(good) and server.receive_payload("a", good, 1.0)
    other = WireSession.create(state, "topk(0.01) | quant(bits=4)", base_id="digits")
    bad = Compressor(other.codec).compress(delta, base_version=0, session=other)
    assert not server.receive_payload("b", bad, 1.0)
    assert isinstance(server.last_rejection.error, SessionMismatch)
    plain = Compressor(cfg.codec).compress(delta, base_id="digits", base_version=0)
    assert server.receive_payload("c", plain, 1.0)
    stale = Compressor(cfg.codec).compress(delta, base_version=7, session=server.session)
    assert not server.receive_payload("d", stale, 1.0)
    assert isinstance(server.last_rejection.error, dp.VersionMismatch)


def test_http_devices_fetch_the_session_once_and_upload_compact_frames(monkeypatch) -> None:
    """Over HTTP the device takes the server's session (GET .../session) and its uploads are compact: the
    same bytes per round as in process (a compact frame names no base id), fewer than self-describing."""
    from deltaplane.serve import client as client_mod
    from deltaplane.serve.federation import run_http_simulation

    fetched = []
    original = client_mod.DeviceClient.session

    def spy(self, model):
        fetched.append(model)
        return original(self, model)

    monkeypatch.setattr(client_mod.DeviceClient, "session", spy)
    cfg = RunConfig(**{**SMALL, "clients": 3}).replace(engine="sequential")
    http = run_http_simulation(cfg)
    inproc = run_simulation(cfg)
    assert len(fetched) == 1  # once per run, not per upload
    assert [r.uplink_bytes for r in http.rounds] == [r.uplink_bytes for r in inproc.rounds]
    assert [r.test_accuracy for r in http.rounds] == [r.test_accuracy for r in inproc.rounds]
    full = run_http_simulation(cfg.replace(wire="self-describing"))
    assert all(a.uplink_bytes < b.uplink_bytes for a, b in zip(http.rounds, full.rounds, strict=True))

import json

import pytest

import deltaplane.sim.client as client_module
from deltaplane.codecs import Compressor
from deltaplane.sim import RunConfig, run_simulation, sample_clients
from deltaplane.sim.seeding import Stream, numpy_rng

TINY = RunConfig(clients=4, rounds=2, local_epochs=1, lr=0.1)


def _metrics(result) -> list[dict]:
    """Per-round metrics without the wall-clock fields, which are the only ones allowed to vary."""
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in result.rounds]


def test_same_seed_same_metrics_and_weights_other_seed_differs() -> None:
    cfg = TINY.replace(codec="topk(0.05) | quant(bits=8)")
    a, b = run_simulation(cfg), run_simulation(cfg)
    assert _metrics(a) == _metrics(b)
    assert all((a.final_state[k] == v).all() for k, v in b.final_state.items())
    c = run_simulation(cfg.replace(seed=1))
    assert _metrics(c) != _metrics(a)


def test_bytes_are_the_real_payload_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    uploads: list[int] = []
    everything: list[int] = []
    real_upload, real_compress = client_module.Client.upload, Compressor.compress

    def upload(self, *args, **kwargs):
        payload = real_upload(self, *args, **kwargs)
        uploads.append(len(payload))
        return payload

    def compress(self, *args, **kwargs):
        payload = real_compress(self, *args, **kwargs)
        everything.append(len(payload))
        return payload

    monkeypatch.setattr(client_module.Client, "upload", upload)
    monkeypatch.setattr(Compressor, "compress", compress)
    cfg = TINY.replace(codec="topk(0.01) | quant(bits=8)", downlink_codec="quant(bits=8)")
    result = run_simulation(cfg)

    assert len(uploads) == 2 * 4  # two rounds of four clients
    assert len(everything) == len(uploads) + 2  # plus one downlink payload per round
    downlinks = [n for n in everything if n not in uploads]
    r1, r2 = result.rounds
    assert r1.uplink_bytes == sum(uploads[:4]) and r2.uplink_bytes == sum(uploads[4:])
    assert [r1.downlink_bytes, r2.downlink_bytes] == [n * 4 for n in downlinks]
    assert r2.cumulative_uplink_bytes == sum(uploads) == result.total_uplink_bytes
    assert r2.cumulative_downlink_bytes == 4 * sum(downlinks)
    # 1% top-k of 18,346 floats with 8-bit values: > 50x below the raw float32 update, header included
    assert result.raw_update_bytes == 18_346 * 4
    assert max(uploads) * 50 < result.raw_update_bytes


def test_fp32_run_learns_and_reports_client_accuracy() -> None:
    result = run_simulation(TINY.replace(rounds=6, clients=5, local_epochs=2, lr=0.2))
    accs = [r.test_accuracy for r in result.rounds]
    assert accs[-1] > 0.6 and accs[-1] > accs[0]
    final = result.final
    assert 0 <= final.client_accuracy_min <= final.client_accuracy_mean <= 1
    # identity payloads carry every float32 plus a small header
    assert result.raw_update_bytes * 5 < final.uplink_bytes < result.raw_update_bytes * 5 * 1.01
    # the identity downlink sends one such payload to each of the 5 devices
    assert result.raw_update_bytes * 5 < final.downlink_bytes < result.raw_update_bytes * 5 * 1.01


def test_sample_fraction_and_progress_callback() -> None:
    seen = []
    result = run_simulation(TINY.replace(sample_fraction=0.5, rounds=3), progress=seen.append)
    assert [r.round for r in seen] == [1, 2, 3]
    assert seen == result.rounds
    assert all(r.clients == 2 for r in result.rounds)


def test_sample_clients() -> None:
    assert sample_clients(10, 1.0, numpy_rng(0, Stream.CLIENT_SAMPLING, 1)) == list(range(10))
    picked = sample_clients(10, 0.3, numpy_rng(0, Stream.CLIENT_SAMPLING, 1))
    assert len(picked) == 3 and picked == sorted(set(picked))
    assert picked == sample_clients(10, 0.3, numpy_rng(0, Stream.CLIENT_SAMPLING, 1))
    assert len(sample_clients(10, 0.01, numpy_rng(0, Stream.CLIENT_SAMPLING, 1))) == 1


def test_result_serializes_to_json() -> None:
    result = run_simulation(TINY.replace(rounds=1))
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["config"]["clients"] == 4
    assert doc["num_params"] == 18_346
    assert len(doc["rounds"]) == 1 and doc["final"] == doc["rounds"][0]
    assert set(doc["final"]) >= {
        "test_accuracy",
        "client_accuracy_mean",
        "client_accuracy_min",
        "uplink_bytes",
        "downlink_bytes",
        "cumulative_uplink_bytes",
        "cumulative_downlink_bytes",
        "seconds",
    }


def test_diverging_training_is_refused_with_where_and_why() -> None:
    from deltaplane.errors import InvalidUpdate

    with pytest.raises(InvalidUpdate, match=r"round 1, client \d+: .*NaN or Inf.*lower lr"):
        run_simulation(TINY.replace(lr=1e30, momentum=0.0))


def test_a_bucketed_defence_gives_the_same_model_at_any_thread_count() -> None:
    """median buckets by 2 by default. With a second share the caller delivers share by share (its share's
    clients, then the worker's): when buckets were drawn over arrival positions the buckets, and the model,
    changed with `threads` (final weights 0.19 apart). Buckets are now drawn over client ids, so the delivery
    order no longer picks them."""
    import torch

    runs = [
        run_simulation(
            RunConfig(clients=6, rounds=2, seed=1, lr=0.05, defense="median", engine="batched", threads=t)
        )
        for t in (1, 2)
    ]
    assert [m.test_accuracy for m in runs[0].rounds] == [m.test_accuracy for m in runs[1].rounds]
    one, two = runs[0].final_state, runs[1].final_state
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert all(torch.isfinite(v).all() for v in two.values())


def test_a_failing_round_still_reports_the_round_before_and_stops_the_workers(monkeypatch) -> None:
    """With a second share a round's scores arrive with the next round; a next round that raises used to
    take the finished round's report with it (threads=1 reported it), and the worker process lived on while
    anything held the exception's traceback."""
    import os
    from pathlib import Path

    import deltaplane.engine.server as server_module

    close = server_module.ServerStep.close

    def failing(self):
        if self._round == 3:
            raise RuntimeError("boom at round 3")
        return close(self)

    monkeypatch.setattr(server_module.ServerStep, "close", failing)
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    for threads in (1, 2):
        seen: list[int] = []
        with pytest.raises(RuntimeError, match="boom") as caught:
            run_simulation(
                RunConfig(clients=4, rounds=5, seed=1, engine="batched", threads=threads),
                progress=lambda m, seen=seen: seen.append(m.round),
            )
        assert seen == [1, 2], threads
        if children.exists():  # the traceback (held by `caught`) no longer keeps a worker alive
            assert caught.value is not None and children.read_text().split() == []


@pytest.mark.parametrize("engine", ["sequential", "batched", "population"])
def test_run_simulation_refuses_another_transport_on_every_engine(engine: str) -> None:
    """run_simulation is the in-process driver: transport='http' belongs to run_federation. The population
    engine was dispatched before that check and ran in process, silently ignoring the transport."""
    from deltaplane.errors import UnsupportedOption

    with pytest.raises(UnsupportedOption, match="transport='http'"):
        run_simulation(RunConfig(clients=2, rounds=1, local_epochs=1, engine=engine, transport="http"))

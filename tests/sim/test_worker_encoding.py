"""The forked worker encodes its share's payloads only where a copy of each device's compressor gives the very
bytes the device's own would, and the run is then the run this process encoding them gives, bit for bit."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from deltaplane.codecs import Compressor, Layout, available_codecs
from deltaplane.delta import Delta
from deltaplane.errors import CodecError
from deltaplane.sim import RunConfig, run_simulation

forking = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="workers are threads here"
)


def _run(cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, *, in_worker: bool) -> tuple[object, list, dict]:
    """A run, the payloads the server received (in order) and each device's compressor round count; with
    ``in_worker=False`` no round is encoded in the worker."""
    import deltaplane.sim.simulation as simulation
    from deltaplane.sim.worker_encoding import WorkerEncoding

    received: list[tuple[int, bytes | None]] = []
    encoded_in_worker: list[int] = []
    real_deliver, real_uploads, real_covers = (
        simulation.deliver,
        WorkerEncoding.uploads,
        WorkerEncoding.covers,
    )
    clients: list = []

    def deliver(config, server, uploads, rnd, enrollment=None):
        received.extend((u.cid, u.payload) for u in uploads)
        return real_deliver(config, server, uploads, rnd, enrollment)

    def uploads(share, finished):
        encoded_in_worker.append(len(share))
        return real_uploads(share, finished)

    def covers(self, batch):
        clients[:] = batch  # the run's devices (full participation)
        return in_worker and real_covers(self, batch)

    with monkeypatch.context() as m:
        m.setattr(simulation, "deliver", deliver)
        m.setattr(WorkerEncoding, "uploads", staticmethod(uploads))
        m.setattr(WorkerEncoding, "covers", covers)
        result = run_simulation(cfg)
    rounds = {c.cid: c.compressor.state.rounds for c in clients}
    return result, received, {"rounds": rounds, "encoded_in_worker": encoded_in_worker}


@forking
def test_the_worker_encodes_memoryless_updates_to_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Identity codec (the default): the worker encodes its share every round; the server receives the same
    payloads in the same order, the runs end in the same weights and metrics, and every device's own
    compressor counts every round, as when this process encodes all of them."""
    cfg = RunConfig(clients=8, rounds=3, engine="batched", threads=2)
    there, got_there, state_there = _run(cfg, monkeypatch, in_worker=True)
    here, got_here, state_here = _run(cfg, monkeypatch, in_worker=False)
    assert state_there["encoded_in_worker"] and all(state_there["encoded_in_worker"])
    assert len(state_there["encoded_in_worker"]) == cfg.rounds and state_here["encoded_in_worker"] == []
    assert got_there == got_here and all(p for _, p in got_there)
    assert state_there["rounds"] == state_here["rounds"] and set(state_there["rounds"].values()) == {3}
    for a, b in zip(there.rounds, here.rounds, strict=True):
        assert {**vars(a), "seconds": 0} == {**vars(b), "seconds": 0}
    assert all(torch.equal(there.final_state[k], here.final_state[k]) for k in there.final_state)


@forking
def test_lossy_codecs_with_error_feedback_are_encoded_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose compressor carries a residual encodes with it, here: the worker never encodes."""
    cfg = RunConfig(clients=8, rounds=3, engine="batched", threads=2, codec="topk(0.1) | quant(bits=8)")
    _, got, state = _run(cfg, monkeypatch, in_worker=True)
    assert state["encoded_in_worker"] == [] and len(got) == 8 * 3


def test_memoryless_compressors_and_counting_a_copys_round() -> None:
    """Only an exact, stateless codec with nothing carried is memoryless; counting a copy's round leaves the
    compressor as compressing would, and is refused for any other."""
    delta = Delta({"w": torch.randn(4, 5), "b": torch.randn(5)})
    own, copy = Compressor("identity", seed=1), Compressor("identity", seed=2)
    assert own.memoryless
    assert own.compress(delta, base_id="m", base_version=3) == copy.compress(
        delta, base_id="m", base_version=3
    )
    counted = Compressor("identity", seed=1)
    counted.count_encoded_copy()
    assert counted.state_dict()["rounds"] == own.state_dict()["rounds"] == 1
    assert torch.equal(counted.state_dict()["rng_state"], own.state_dict()["rng_state"])
    lossy = Compressor("topk(0.5)", seed=1)
    assert not lossy.memoryless
    with pytest.raises(CodecError, match="carries state"):
        lossy.count_encoded_copy()


EXACT = sorted(n for n, c in available_codecs().items() if c.exact)


@pytest.mark.parametrize("spec", [*EXACT, *(f"{n} | zstd" for n in EXACT)])
def test_exact_codecs_draw_no_randomness(spec: str) -> None:
    """memoryless trusts that an exact codec (and one behind a lossless stage) draws nothing from its
    generator: checked for every registered exact codec."""
    compressor = Compressor(spec)
    assert compressor.memoryless
    before = compressor._rng.get_state()
    compressor.compress(Delta({"w": torch.randn(64, 16)}))
    assert torch.equal(before, compressor._rng.get_state()) and compressor.memoryless


@pytest.mark.parametrize("compact", [True, False])
def test_an_identity_payload_fits_the_arenas_room_per_client(compact: bool) -> None:
    """A worker's arena holds a chunk's payloads (so they skip the pipe) if an identity payload is at most its
    delta's bytes plus the framing allowance, in either wire format, also for a model of many tensors."""
    from deltaplane.engine.wire import Sessions
    from deltaplane.sim.batched import framing_allowance

    for n in (8, 200):
        delta = Delta({f"layer{i:03d}.attention.output.dense.weight": torch.randn(3, 5) for i in range(n)})
        session = Sessions("identity", "sim/some-base-model", compact=compact).get(Layout.of(delta))
        payload = Compressor("identity").compress(
            delta, base_id="sim/some-base-model", base_version=123_456, session=session
        )
        assert len(payload) + 64 <= delta.nbytes + framing_allowance(n), (n, len(payload) - delta.nbytes)

"""The batched engine compresses all clients' updates on the stack: same payloads as one client at a time."""

from __future__ import annotations

import pytest
import torch

import deltaplane.engine.client as client_step
from deltaplane.delta import Delta
from deltaplane.errors import DeltaplaneError
from deltaplane.sim import RunConfig, run_simulation


def _one_by_one(
    compressors, stacked, *, base_id, base_version, return_exceptions=False, meta=None, session=None
):
    """The per-client path: each compressor on its own row, as Client.upload would."""
    out: list[bytes | DeltaplaneError] = []
    for i, c in enumerate(compressors):
        delta = Delta({k: v[i] for k, v in stacked.items()})
        try:
            if session is not None:
                out.append(c.compress(delta, base_version=base_version, session=session))
                continue
            out.append(c.compress(delta, base_id=base_id, base_version=base_version, meta=meta))
        except DeltaplaneError as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out


@pytest.mark.parametrize("feedback", [True, False])
def test_batched_run_has_the_same_bytes_and_accuracy(monkeypatch: pytest.MonkeyPatch, feedback: bool) -> None:
    cfg = RunConfig(
        clients=6, rounds=3, engine="batched", codec="topk(0.01) | quant(bits=8)", error_feedback=feedback
    )
    calls: list[int] = []
    real = client_step.compress_many

    def counting(compressors, *args, **kwargs):
        calls.append(len(compressors))
        return real(compressors, *args, **kwargs)

    monkeypatch.setattr(client_step, "compress_many", counting)
    stacked = run_simulation(cfg)
    assert calls == [6, 6, 6]  # every round's uploads went through the stacked path
    monkeypatch.setattr(client_step, "compress_many", _one_by_one)
    loop = run_simulation(cfg)
    assert [r.uplink_bytes for r in stacked.rounds] == [r.uplink_bytes for r in loop.rounds]
    assert [r.test_accuracy for r in stacked.rounds] == [r.test_accuracy for r in loop.rounds]
    assert all(torch.equal(stacked.final_state[k], loop.final_state[k]) for k in loop.final_state)
    # top-k 1% + 8-bit values of a ~6k-parameter model: far below 1/50 of the raw fp32 update per client
    assert 0 < stacked.rounds[0].uplink_bytes < 6 * stacked.raw_update_bytes / 50


def test_local_dp_keeps_the_per_client_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local DP changes each update on its own before compressing: compress_many is not used."""

    def refuse(*args, **kwargs):
        raise AssertionError("compress_many must not run with local DP")

    monkeypatch.setattr(client_step, "compress_many", refuse)
    cfg = RunConfig(clients=4, rounds=1, engine="batched", clip="1.0", local_dp_noise=0.5)
    assert run_simulation(cfg).final.clients == 4


def test_stacked_upload_failure_is_one_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client whose compression fails is refused, as in the per-client loop; the round goes on."""
    real = client_step.compress_many

    def poison_first(compressors, stacked, **kwargs):
        stacked = {k: v.clone() for k, v in stacked.items()}
        next(iter(stacked.values()))[0].fill_(float("nan"))
        return real(compressors, stacked, **kwargs)

    monkeypatch.setattr(client_step, "compress_many", poison_first)
    result = run_simulation(RunConfig(clients=4, rounds=1, engine="batched", codec="quant(bits=8)"))
    assert result.final.rejected == 1 and result.final.clients == 4

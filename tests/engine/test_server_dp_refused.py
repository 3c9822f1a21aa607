"""Under central DP a round whose every update is refused still releases its noise and spends ε."""

from __future__ import annotations

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from deltaplane.aggregation import build_aggregator
from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.engine.server import MemoryPublisher, ServerStep
from deltaplane.errors import InvalidUpdate

Z, Q, DELTA = 1.0, 0.5, 1e-5


def _reference_epsilon(steps: int) -> float:
    """dp_accounting's ε of ``steps`` Poisson-subsampled Gaussian rounds (independent of deltaplane)."""
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z))
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(DELTA)


def _step(dp_noise: float) -> ServerStep:
    agg = build_aggregator(
        dp_noise=dp_noise, clip=1.0, expected_clients=2, sampling_rate=Q, dp_delta=DELTA, max_norm=10.0
    )
    return ServerStep(agg, MemoryPublisher(Compressor("identity"), "b"), {"w": torch.zeros(2)}, base_id="b")


def test_a_round_with_every_update_refused_releases_noise_and_spends_epsilon() -> None:
    s = _step(Z)
    s.open(1)
    s.receive_delta("c1", Delta({"w": torch.tensor([0.5, 0.0])}), 1.0)
    first = s.close()
    s.open(2)
    s.receive_delta("c1", Delta({"w": torch.tensor([1e6, 0.0])}), 1.0)  # refused: norm > max_norm
    second = s.close()  # used to raise InvalidUpdate: abort vs publish revealed the refused update
    assert second.accepted == 0 and len(second.rejections) == 1
    assert not torch.equal(second.state["w"], first.state["w"])  # noise was released
    assert second.measurements["epsilon"] == pytest.approx(_reference_epsilon(2), rel=1e-6)


def test_without_dp_a_round_with_every_update_refused_still_fails() -> None:
    s = _step(0.0)
    s.open(1)
    s.receive_delta("c1", Delta({"w": torch.tensor([1e6, 0.0])}), 1.0)
    with pytest.raises(InvalidUpdate, match="every update of the round was refused"):
        s.close()

"""The in-process federated simulator: rounds of sample → local train → compress → decode → FedAvg → apply.

Every byte counted is a real payload: each client's delta goes through its own
:class:`~deltaplane.codecs.Compressor`, the server decodes the bytes with
:func:`~deltaplane.codecs.decompress` (strictly, checking the base model version), and the averaged update is
sent back down through a server-side compressor. Runs are deterministic given ``config.seed``: every random
choice draws from a stream derived from ``(seed, purpose, round, client)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deltaplane.aggregation import FedAvg
from deltaplane.codecs import Compressor, decompress
from deltaplane.data.digits import Dataset, load_digits, train_test_split
from deltaplane.data.domains import shift
from deltaplane.delta import Delta
from deltaplane.errors import InvalidUpdate
from deltaplane.sim.client import make_clients
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import accuracy, build_model
from deltaplane.sim.seeding import Stream, derive_seed, numpy_rng, torch_generator

__all__ = ["RoundMetrics", "RunResult", "federation_data", "run_simulation", "sample_clients"]

#: Identifies the lineage of global models in payload headers; the version is the round it was made from.
BASE_ID = "sim/digits-cnn"


@dataclass(frozen=True)
class RoundMetrics:
    """What one round cost and achieved. Accuracies are of the global model after the round's update."""

    round: int
    clients: int
    test_accuracy: float
    client_accuracy_mean: float
    client_accuracy_min: float
    uplink_bytes: int
    downlink_bytes: int
    cumulative_uplink_bytes: int
    cumulative_downlink_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunResult:
    """The outcome of :func:`run_simulation`: its config, per-round metrics and the final global model."""

    config: RunConfig
    rounds: list[RoundMetrics]
    num_params: int
    #: bytes of one update as raw float32 tensors (the size compression ratios are measured against)
    raw_update_bytes: int
    wall_time_s: float
    final_state: dict[str, Tensor] = field(repr=False, default_factory=dict)

    @property
    def final(self) -> RoundMetrics:
        return self.rounds[-1]

    @property
    def total_uplink_bytes(self) -> int:
        return self.final.cumulative_uplink_bytes

    @property
    def total_downlink_bytes(self) -> int:
        return self.final.cumulative_downlink_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the final model weights are left out)."""
        return {
            "config": self.config.to_dict(),
            "num_params": self.num_params,
            "raw_update_bytes": self.raw_update_bytes,
            "wall_time_s": self.wall_time_s,
            "final": self.final.to_dict(),
            "rounds": [r.to_dict() for r in self.rounds],
        }


#: The one-pixel translations ``train_shifts`` adds, in order: the 4 axis neighbours, then the 4 diagonals.
_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def federation_data(config: RunConfig) -> tuple[Dataset, Dataset]:
    """The (train, test) sets of a run: the digits split, plus ``config.train_shifts`` shifted copies of train.

    Digits has 1,437 training images: enough for 20 clients, not for 1,000 with a holdout each. Shifted
    copies (a standard augmentation) give every client a few images of its own; the test set is untouched.
    Every engine builds its data here, so they partition the very same samples.
    """
    train, test = train_test_split(load_digits(), test_fraction=config.test_fraction, seed=config.split_seed)
    if config.train_shifts:
        copies = [train.x] + [shift(train.x, dx, dy) for dx, dy in _SHIFTS[: config.train_shifts]]
        train = Dataset(torch.cat(copies), train.y.repeat(len(copies)))
    return train, test


def sample_clients(n_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """The sorted ids of ``max(1, round(fraction · n_clients))`` clients drawn without replacement."""
    m = max(1, min(n_clients, round(fraction * n_clients)))
    if m == n_clients:
        return list(range(n_clients))
    return sorted(int(i) for i in rng.choice(n_clients, size=m, replace=False))


def run_simulation(config: RunConfig, *, progress: Callable[[RoundMetrics], None] | None = None) -> RunResult:
    """Run ``config.rounds`` rounds of federated averaging on non-IID digits with compressed updates.

    Per round: sample clients; each trains from the current global model and uploads its delta through its
    own compressor; the server decodes every payload, averages them weighted by sample count (streaming
    :class:`~deltaplane.aggregation.FedAvg`), scales by ``server_lr``, and sends the update down through the
    downlink compressor to all clients. The global model is the base plus the *decoded* downlink update, so
    the server and every device hold the same weights even with a lossy downlink.

    Args:
        config: the run's hyperparameters.
        progress: called with each round's metrics as soon as the round ends.

    Returns:
        The per-round metrics and the final global weights. Identical given the same config, except the
        wall-clock fields ``seconds`` and ``wall_time_s``.

    Example:
        >>> from deltaplane.sim import RunConfig, run_simulation
        >>> cfg = RunConfig(clients=4, rounds=2, codec="topk(0.01) | quant(bits=8)")
        >>> result = run_simulation(cfg)
        >>> [r.round for r in result.rounds], result.final.clients
        ([1, 2], 4)
        >>> result.raw_update_bytes * 4 > 50 * result.final.uplink_bytes  # 4 clients' raw fp32 vs payloads
        True
    """
    prev_threads = torch.get_num_threads()
    # Fixed thread count: CPU kernels may reduce in a different order with a different number of threads.
    torch.set_num_threads(config.threads)
    try:
        return _run(config, progress)
    finally:
        torch.set_num_threads(prev_threads)


def _run(config: RunConfig, progress: Callable[[RoundMetrics], None] | None) -> RunResult:
    start = time.perf_counter()
    train, test = federation_data(config)
    clients = make_clients(config, train)
    model = build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    downlink = Compressor(
        config.downlink_codec,
        error_feedback=config.downlink_error_feedback,
        seed=derive_seed(config.seed, Stream.DOWNLINK_CODEC),
    )
    raw_bytes = Delta.zeros_like(global_state).nbytes

    history: list[RoundMetrics] = []
    cum_up = cum_down = 0
    for rnd in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        version = rnd - 1  # the global model every client trains from this round
        chosen = sample_clients(
            config.clients, config.sample_fraction, numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd)
        )
        agg = FedAvg()
        uplink = 0
        for cid in chosen:
            client = clients[cid]
            gen = torch_generator(config.seed, Stream.LOCAL_TRAINING, rnd, cid)
            delta = client.local_update(model, global_state, config, gen, lr=config.client_lr(rnd))
            try:
                payload = client.upload(delta, base_id=BASE_ID, base_version=version)
            except InvalidUpdate as exc:  # NaN/Inf: say where, and the usual cause
                raise InvalidUpdate(
                    f"round {rnd}, client {cid}: {exc} (local training diverged; try a lower lr)"
                ) from exc
            uplink += len(payload)
            agg.add(decompress(payload, expect_base=(BASE_ID, version)), weight=client.num_samples)
        update = agg.result() * config.server_lr
        payload = downlink.compress(update, base_id=BASE_ID, base_version=version)
        global_state = decompress(payload, expect_base=(BASE_ID, version)).apply(global_state)
        down = len(payload) * len(clients)  # every device applies the update to stay in sync
        cum_up += uplink
        cum_down += down

        model.load_state_dict(global_state)
        # Until personalization exists every device runs the global model: this is how it serves each one.
        client_acc = [c.evaluate(model) for c in clients]
        metrics = RoundMetrics(
            round=rnd,
            clients=len(chosen),
            test_accuracy=accuracy(model, test),
            client_accuracy_mean=float(np.mean(client_acc)),
            client_accuracy_min=float(np.min(client_acc)),
            uplink_bytes=uplink,
            downlink_bytes=down,
            cumulative_uplink_bytes=cum_up,
            cumulative_downlink_bytes=cum_down,
            seconds=time.perf_counter() - t0,
        )
        history.append(metrics)
        if progress is not None:
            progress(metrics)
    return RunResult(
        config=config,
        rounds=history,
        num_params=sum(v.numel() for v in global_state.values()),
        raw_update_bytes=raw_bytes,
        wall_time_s=time.perf_counter() - start,
        final_state=global_state,
    )

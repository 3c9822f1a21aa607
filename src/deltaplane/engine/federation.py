"""The devices of a run: each one's data shards, uplink compressor and personal state, built from a Task.

A :class:`Client` is what one phone would hold: private training and held-out data, and a
:class:`~deltaplane.codecs.Compressor` whose residual carries the compression error from one round into the
next. That state lives with the client, never in a shared codec, so each device's error feedback is its own.
Every driver builds its devices here (:func:`build_clients`), so they partition the very same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import nn

from deltaplane.aggregation.sampling import sample_round
from deltaplane.codecs import Compressor, WireSession
from deltaplane.data.dataset import Dataset
from deltaplane.data.partition import dirichlet_partition, split_holdout
from deltaplane.delta import Delta, StateDict
from deltaplane.engine.config import RunConfig
from deltaplane.engine.dgc import NormHistory
from deltaplane.engine.metrics import accuracy
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng
from deltaplane.engine.task import Loss, Task
from deltaplane.engine.training import local_train
from deltaplane.errors import ConfigError
from deltaplane.personalization import PersonalState

__all__ = ["Client", "build_clients", "make_clients", "sample_clients"]


@dataclass(eq=False)
class Client:
    """One device: ``train`` and ``holdout`` shards of its own data, its uplink :class:`Compressor`, its
    personalization state, its DGC velocity and its update-norm history (all kept on the device, never sent)."""

    cid: int
    train: Dataset
    holdout: Dataset
    compressor: Compressor
    personal: PersonalState = field(default_factory=PersonalState)
    #: DGC momentum correction's velocity of this device's updates (``None`` until its first round with it)
    velocity: Delta | None = None
    #: its own earlier update norms, for DGC's relative local clip (``None`` until its first round with it)
    norms: NormHistory | None = None

    @property
    def num_samples(self) -> int:
        """Local training samples; FedAvg weighs this client's update by it."""
        return len(self.train)

    def local_update(
        self,
        model: nn.Module,
        global_state: StateDict,
        config: RunConfig,
        generator: torch.Generator,
        *,
        lr: float,
        data: Dataset | None = None,
        loss: Loss = nn.functional.cross_entropy,
    ) -> Delta:
        """Train ``model`` from ``global_state`` with ``config``'s local SGD at ``lr``; return the change
        (:func:`~deltaplane.engine.training.local_train`). ``data`` replaces the client's own training data
        (a malicious client's poisoned copy)."""
        return local_train(
            model,
            global_state,
            data if data is not None else self.train,
            generator,
            epochs=config.local_epochs,
            batch_size=config.batch_size,
            lr=lr,
            momentum=config.momentum,
            prox_mu=config.prox_mu,
            loss=loss,
        )

    def upload(
        self, delta: Delta, *, base_id: str, base_version: int, session: WireSession | None = None
    ) -> bytes:
        """Compress ``delta`` into the wire payload this device would send (updating its EF residual): a
        compact frame of ``session`` if given, else self-describing."""
        if session is not None:
            return self.compressor.compress(delta, base_version=base_version, session=session)
        return self.compressor.compress(delta, base_id=base_id, base_version=base_version)

    def evaluate(self, model: nn.Module) -> float:
        """Accuracy of ``model`` on this client's held-out data."""
        return accuracy(model, self.holdout)


def _uplink(config: RunConfig, cid: int) -> Compressor:
    return Compressor(
        config.codec,
        error_feedback=config.error_feedback,
        seed=derive_seed(config.seed, Stream.UPLINK_CODEC, cid),
    )


def make_clients(config: RunConfig, train: Dataset) -> list[Client]:
    """Partition ``train`` across ``config.clients`` devices (Dirichlet label skew), each with a compressor.

    Raises:
        ConfigError: no partition gives every device ``min_client_samples`` samples; the message names the
            run options that change that (as CLI flags and YAML keys).
    """
    try:
        shards = dirichlet_partition(
            train.y.numpy(),
            config.clients,
            config.alpha,
            numpy_rng(config.seed, Stream.PARTITION),
            min_size=config.min_client_samples,
        )
    except ConfigError:
        # the partition's own words (n_clients, min_size) are not the run's: say which options to change
        raise ConfigError(
            f"cannot partition {len(train)} training samples across {config.clients} devices of at least "
            f"{config.min_client_samples} samples each (Dirichlet label skew, alpha={config.alpha:g}); use fewer "
            "devices (--clients; YAML clients.count), a larger alpha (--alpha; clients.alpha) or a smaller "
            "min_client_samples (clients.min_samples)"
        ) from None
    clients = []
    for cid, shard in enumerate(shards):
        local, held = split_holdout(
            shard, config.holdout_fraction, numpy_rng(config.seed, Stream.HOLDOUT, cid)
        )
        clients.append(Client(cid, train.subset(local), train.subset(held), _uplink(config, cid)))
    return clients


def build_clients(config: RunConfig, task: Task) -> list[Client]:
    """The run's devices: ``task.train`` partitioned by :func:`make_clients`, or the task's own per-device
    datasets (a natural split), each split into train and holdout by the same seeded streams."""
    if task.clients is None:
        # a Task without clients has train (__post_init__ refuses neither and both)
        return make_clients(config, cast(Dataset, task.train))
    if config.clients != len(task.clients):
        raise ConfigError(
            f"task {task.name!r} brings its own {len(task.clients)} devices; set clients to {len(task.clients)} "
            f"(--clients {len(task.clients)}; YAML clients.count)"
        )
    clients = []
    for cid, data in enumerate(task.clients):
        if len(data) < 2:
            raise ConfigError(f"task {task.name!r}: device {cid} holds {len(data)} samples; each needs 2")
        local, held = split_holdout(
            np.arange(len(data)), config.holdout_fraction, numpy_rng(config.seed, Stream.HOLDOUT, cid)
        )
        clients.append(Client(cid, data.subset(local), data.subset(held), _uplink(config, cid)))
    return clients


def sample_clients(
    n_clients: int, fraction: float, rng: np.random.Generator, *, central_dp: bool = False
) -> list[int]:
    """The sorted ids of a round's clients: :func:`deltaplane.aggregation.sampling.sample_round` (Poisson at
    the accountant's rate under central DP, else ``max(1, round(fraction · n_clients))`` without replacement)."""
    return sample_round(n_clients, fraction, rng, central_dp=central_dp)

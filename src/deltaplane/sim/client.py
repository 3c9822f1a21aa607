"""A simulated device: its data shard, its compressor (with its error-feedback memory) and local training.

A :class:`Client` is what one phone would hold: private training and held-out data, and a
:class:`~deltaplane.codecs.Compressor` whose residual carries the compression error from one round into the
next. That state lives with the client, never in a shared codec, so each device's error feedback is its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deltaplane.codecs import Compressor
from deltaplane.data.digits import Dataset
from deltaplane.data.partition import dirichlet_partition, split_holdout
from deltaplane.delta import Delta, StateDict
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import accuracy, logits
from deltaplane.sim.seeding import Stream, derive_seed, numpy_rng

__all__ = ["Client", "evaluate_clients", "make_clients", "round_scores"]


@dataclass(eq=False)
class Client:
    """One device: ``train`` and ``holdout`` shards of its own data and its uplink :class:`Compressor`."""

    cid: int
    train: Dataset
    holdout: Dataset
    compressor: Compressor

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
    ) -> Delta:
        """Train ``model`` from ``global_state`` for ``config.local_epochs`` epochs of SGD at ``lr``; return
        the change.

        ``model`` is a scratch module shared by all clients (its weights are overwritten); ``generator`` alone
        decides the batch order, so an update is a pure function of the global state and the generator.
        ``data`` replaces the client's own training data (a malicious client's poisoned copy). With
        ``config.prox_mu > 0`` the loss gets FedProx's proximal term ``μ/2 ‖w − w_global‖²`` (Li et al. 2020,
        https://arxiv.org/abs/1812.06127), which keeps non-IID clients from drifting far from the global model.
        """
        train = data if data is not None else self.train
        # A private copy of the start point: callers may pass the model's own state_dict, whose tensors
        # training would otherwise change under us (and the delta would come out as zero).
        start = {k: v.detach().clone() for k, v in global_state.items()}
        model.load_state_dict(start)
        model.train()
        # A fresh optimizer per round: momentum is not carried over, as a device would not keep it either.
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)
        n = len(train)
        anchors = [start[name] for name, _ in model.named_parameters()] if config.prox_mu > 0 else []
        for _ in range(config.local_epochs):
            order = torch.randperm(n, generator=generator)
            for first in range(0, n, config.batch_size):
                idx = order[first : first + config.batch_size]
                loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
                if anchors:
                    prox = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchors, strict=True))
                    loss = loss + 0.5 * config.prox_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return Delta.between(start, model.state_dict())

    def upload(self, delta: Delta, *, base_id: str, base_version: int) -> bytes:
        """Compress ``delta`` into the wire payload this device would send (updating its EF residual)."""
        return self.compressor.compress(delta, base_id=base_id, base_version=base_version)

    def evaluate(self, model: nn.Module) -> float:
        """Accuracy of ``model`` on this client's held-out data."""
        return accuracy(model, self.holdout)


@torch.no_grad()
def evaluate_clients(model: nn.Module, clients: list[Client]) -> list[float]:
    """:meth:`Client.evaluate` of every client, in one forward pass over all their held-out data.

    Each device would score only its own data; the simulator scores them all every round, and one batched
    pass costs about what a single client's pass costs. Every engine (in-process, HTTP, Flower) calls this,
    so their per-client figures stay identical.
    """
    sizes = [len(c.holdout) for c in clients]
    if not any(sizes):
        return [0.0] * len(clients)
    model.eval()
    x = torch.cat([c.holdout.x for c in clients])
    y = torch.cat([c.holdout.y for c in clients])
    correct = (logits(model, x).argmax(dim=1) == y).float()
    return [float(part.mean()) if len(part) else 0.0 for part in correct.split(sizes)]


def round_scores(model: nn.Module, test: Dataset, client_acc: list[float]) -> dict[str, float]:
    """The accuracy fields of a round's metrics: ``model`` on the test set, and the mean, worst, quantiles
    (10%, median, 90%) and best of the per-client accuracies (:func:`evaluate_clients`). One function for every engine, so their figures are
    computed alike."""
    return {
        "test_accuracy": accuracy(model, test),
        "client_accuracy_mean": float(np.mean(client_acc)),
        "client_accuracy_min": float(np.min(client_acc)),
        # the spread across devices, not only its mean and worst (the dashboard draws p10–p90 as a band)
        "client_accuracy_p10": float(np.quantile(client_acc, 0.1)),
        "client_accuracy_median": float(np.median(client_acc)),
        "client_accuracy_p90": float(np.quantile(client_acc, 0.9)),
        "client_accuracy_max": float(np.max(client_acc)),
    }


def make_clients(config: RunConfig, train: Dataset) -> list[Client]:
    """Partition ``train`` across ``config.clients`` devices (Dirichlet label skew), each with a compressor."""
    shards = dirichlet_partition(
        train.y.numpy(),
        config.clients,
        config.alpha,
        numpy_rng(config.seed, Stream.PARTITION),
        min_size=config.min_client_samples,
    )
    clients = []
    for cid, shard in enumerate(shards):
        local, held = split_holdout(
            shard, config.holdout_fraction, numpy_rng(config.seed, Stream.HOLDOUT, cid)
        )
        compressor = Compressor(
            config.codec,
            error_feedback=config.error_feedback,
            seed=derive_seed(config.seed, Stream.UPLINK_CODEC, cid),
        )
        clients.append(Client(cid, train.subset(local), train.subset(held), compressor))
    return clients

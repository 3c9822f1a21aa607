"""Cross-device scale: thousands of registered clients, a hundred sampled per round, compact client state.

A real fleet registers far more devices than train in any one round (Bonawitz et al. 2019,
https://arxiv.org/abs/1902.01046). Holding 10,000 :class:`~deltaplane.sim.client.Client` objects, each with a
live fp32 error-feedback residual the size of the model, would cost 10,000 × 73 kB = 734 MB for DigitsCNN before
any training. Here instead:

* a client is *materialized lazily* when sampled: :meth:`ClientPopulation.client` rebuilds its shard from its
  own random stream ``(seed, PARTITION, cid)``, so it is the same every time and costs nothing while idle;
* per-client state (the error-feedback residual) lives in :class:`ResidualStore`, one fp16 row per client
  in a zero-initialised ``(clients, params)`` tensor whose pages the OS only backs once a client has trained;
* sampled clients train at once with :class:`~deltaplane.sim.batched.BatchedTrainer`, and every update still
  goes through the client's compressor into a real wire payload that the server decodes.

The digits training set has 1,437 images, far fewer than 10,000 clients × 20 samples, so shards here are
*virtual*: each client draws its label mix from ``Dirichlet(alpha)`` and its samples (with replacement) from
the pool of that label. Clients overlap in images, not in label mix or order; this measures the simulator's
cost at fleet scale, not what 10,000 disjoint devices would learn.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from deltaplane.aggregation import FedAvg
from deltaplane.codecs import Compressor, compress_many, decompress
from deltaplane.data.digits import NUM_CLASSES, Dataset, load_digits, train_test_split
from deltaplane.data.partition import split_holdout
from deltaplane.delta import Delta
from deltaplane.errors import ConfigError
from deltaplane.sim.batched import BatchedTrainer
from deltaplane.sim.client import Client
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import accuracy, build_model
from deltaplane.sim.seeding import Stream, derive_seed, numpy_rng
from deltaplane.sim.simulation import BASE_ID, train_batched

__all__ = ["ClientPopulation", "PopulationResult", "ResidualStore", "run_population"]


class ResidualStore:
    """Error-feedback residuals of many clients as one ``(clients, params)`` fp16 tensor.

    fp16 halves the memory of fp32 state; the residual is a small correction (what the codec did not send),
    and its rounding error (relative 2⁻¹¹) is far below the codec's own. Rows start at zero: memory from
    ``torch.zeros`` is mapped lazily by the OS, so only the rows of clients that have trained take RAM.
    """

    def __init__(self, *, clients: int, like: dict[str, Tensor]) -> None:
        if clients < 1:
            raise ConfigError(f"clients must be at least 1. Found {clients}")
        self.clients = clients
        self.names = list(like)
        self.shapes = [tuple(t.shape) for t in like.values()]
        self.sizes = [t.numel() for t in like.values()]
        self.data = torch.zeros((clients, sum(self.sizes)), dtype=torch.float16)
        self._seen = np.zeros(clients, dtype=bool)

    @property
    def nbytes(self) -> int:
        """Bytes the store may occupy once every client has trained."""
        return self.data.numel() * self.data.element_size()

    def get(self, cid: int) -> Delta | None:
        """Client ``cid``'s residual in fp32 (``None`` before its first round)."""
        if not self._seen[cid]:
            return None
        parts = self.data[cid].float().split(self.sizes)
        return Delta({n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)})

    def put(self, cid: int, residual: Delta) -> None:
        """Store client ``cid``'s residual (rounded to fp16)."""
        self.data[cid] = torch.cat([residual[n].reshape(-1) for n in self.names]).to(torch.float16)
        self._seen[cid] = True


class ClientPopulation:
    """``size`` registered clients over one training set, each built on demand from its own seed stream."""

    def __init__(self, config: RunConfig, train: Dataset, *, size: int, max_samples: int = 100) -> None:
        if size < 1:
            raise ConfigError(f"size must be at least 1. Found {size}")
        if max_samples < config.min_client_samples:
            raise ConfigError(
                f"max_samples must be at least min_client_samples ({config.min_client_samples}). "
                f"Found {max_samples}"
            )
        self.config = config
        self.train = train
        self.size = size
        self.max_samples = max_samples
        labels = train.y.numpy()
        self._by_label = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]

    def client(self, cid: int) -> Client:
        """Client ``cid`` (same shard every call): Dirichlet label mix, size in [min_client_samples, max]."""
        if not 0 <= cid < self.size:
            raise ConfigError(f"client id must be in [0, {self.size}). Found {cid}")
        rng = numpy_rng(self.config.seed, Stream.PARTITION, cid)
        n = int(rng.integers(self.config.min_client_samples, self.max_samples + 1))
        mix = rng.dirichlet(np.full(NUM_CLASSES, self.config.alpha))
        counts = rng.multinomial(n, mix)
        idx = np.sort(
            np.concatenate([rng.choice(self._by_label[c], size=k) for c, k in enumerate(counts) if k > 0])
        )
        local, held = split_holdout(idx, self.config.holdout_fraction, rng)
        return Client(cid, self.train.subset(local), self.train.subset(held), compressor=None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PopulationResult:
    """Per-round wall time and test accuracy, bytes sent, and the process's peak resident memory."""

    registered: int
    per_round: int
    seconds: list[float]
    test_accuracy: list[float]
    sampled_accuracy: list[float]
    uplink_bytes: int
    residual_store_bytes: int
    peak_rss_bytes: int
    wall_time_s: float


def run_population(config: RunConfig, *, registered: int, per_round: int) -> PopulationResult:
    """FedAvg over ``registered`` lazily built clients, ``per_round`` of them sampled each round.

    Each round: sample without replacement from the stream ``(seed, CLIENT_SAMPLING, round)``; build the
    sampled clients; train them at once (:class:`BatchedTrainer`); compress every update with the client's
    codec and its residual from the :class:`ResidualStore` into a real payload (all at once,
    :func:`~deltaplane.codecs.compress_many`); decode and average; apply.
    The uplink codec's random stream is ``(seed, UPLINK_CODEC, client, round)`` because no compressor
    object outlives a round. Reports accuracy on the global test set and on the sampled clients' held-out
    data (evaluating all registered clients every round would dominate the cost).
    """
    if not 1 <= per_round <= registered:
        raise ConfigError(f"per_round must be in [1, registered={registered}]. Found {per_round}")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, registered, per_round)
    finally:
        torch.set_num_threads(prev_threads)


def _run(config: RunConfig, registered: int, per_round: int) -> PopulationResult:
    start = time.perf_counter()
    train, test = train_test_split(load_digits(), test_fraction=config.test_fraction, seed=config.split_seed)
    population = ClientPopulation(config, train, size=registered)
    model = build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = BatchedTrainer(model, memory_budget=int(config.memory_budget_mb * 2**20))
    store = ResidualStore(clients=registered, like=global_state)
    seconds, test_acc, sampled_acc = [], [], []
    uplink = 0
    for rnd in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        version = rnd - 1
        rng = numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd)
        chosen = sorted(int(i) for i in rng.choice(registered, size=per_round, replace=False))
        clients = [population.client(cid) for cid in chosen]
        stacked = train_batched(config, trainer, global_state, clients, rnd)
        agg = FedAvg()
        comps = []
        for client in clients:
            comp = Compressor(
                config.codec,
                error_feedback=config.error_feedback,
                seed=derive_seed(config.seed, Stream.UPLINK_CODEC, client.cid, rnd),
            )
            comp.state.residual = store.get(client.cid) if config.error_feedback else None
            comps.append(comp)
        # every sampled update compressed on the stack, each with its own residual and generator
        payloads = compress_many(comps, stacked, base_id=BASE_ID, base_version=version)
        for client, comp, payload in zip(clients, comps, payloads, strict=True):
            if comp.state.residual is not None:  # an exact codec (identity) leaves nothing to carry
                store.put(client.cid, comp.state.residual)
            uplink += len(payload)
            decoded = decompress(payload, expect_base=(BASE_ID, version), expect_layout=global_state)
            agg.add(decoded, weight=client.num_samples)
        global_state = (agg.result() * config.server_lr).apply(global_state)
        model.load_state_dict(global_state)
        test_acc.append(accuracy(model, test))
        holdout = Dataset(
            torch.cat([c.holdout.x for c in clients]), torch.cat([c.holdout.y for c in clients])
        )
        sampled_acc.append(accuracy(model, holdout))
        seconds.append(time.perf_counter() - t0)
    return PopulationResult(
        registered=registered,
        per_round=per_round,
        seconds=seconds,
        test_accuracy=test_acc,
        sampled_accuracy=sampled_acc,
        uplink_bytes=uplink,
        residual_store_bytes=store.nbytes,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        wall_time_s=time.perf_counter() - start,
    )

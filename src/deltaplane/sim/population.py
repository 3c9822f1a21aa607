"""Cross-device scale: thousands of registered clients, a hundred sampled per round, compact client state.

A real fleet registers far more devices than train in any one round (Bonawitz et al. 2019,
https://arxiv.org/abs/1902.01046). Holding 10,000 :class:`~deltaplane.sim.client.Client` objects, each with a
live fp32 error-feedback residual the size of the model, would cost 10,000 × 73 kB = 734 MB for DigitsCNN before
any training. Here instead:

* a client is *materialized lazily* when sampled: :meth:`ClientPopulation.client` rebuilds its shard from its
  own random stream ``(seed, PARTITION, cid)``, so it is the same every time and costs nothing while idle;
* per-client state (the error-feedback residual) lives in :class:`ResidualStore`, one fp16 row per client
  that has trained (a registered client that never trained holds nothing);
* sampled clients train at once with :class:`~deltaplane.sim.batched.BatchedTrainer` (attackers too, on their
  poisoned data, as the batched engine trains them), and every update still goes through the client's
  compressor into a real wire payload that the server decodes.

The digits training set has 1,437 images, far fewer than 10,000 clients × 20 samples, so shards here are
*virtual*: each client draws its label mix from ``Dirichlet(alpha)`` and its samples (with replacement) from
the pool of that label. Clients overlap in images, not in label mix or order; this measures the simulator's
cost at fleet scale, not what 10,000 disjoint devices would learn.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from deltaplane.codecs import Compressor
from deltaplane.data.dataset import Dataset
from deltaplane.data.partition import split_holdout
from deltaplane.delta import Delta
from deltaplane.engine import (
    Client,
    ClientStep,
    RoundMetrics,
    RunConfig,
    RunResult,
    ServerStep,
    Upload,
    accuracy,
    deliver,
    evaluate_clients,
    make_task,
    round_scores,
    sample_clients,
)
from deltaplane.engine.dgc import NormHistory
from deltaplane.engine.divergence import DivergenceWatch
from deltaplane.engine.metrics import TEST_LOSS, accuracy_and_loss
from deltaplane.engine.results import budget_stop, raw_upload_bytes
from deltaplane.engine.scoring import backdoor_success, dp_adjacency, round_epsilon
from deltaplane.engine.secure import run_enrollment
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng
from deltaplane.errors import ConfigError, PrivacyBudgetExceeded, UnsupportedOption
from deltaplane.sim.batched import BatchedTrainer, task_blocker
from deltaplane.sim.simulation import BASE_ID, _upload_stacked, start_batched, trainer_workers
from deltaplane.threads import torch_threads

__all__ = [
    "ClientPopulation",
    "PopulationResult",
    "ResidualStore",
    "check_supported",
    "run_population",
    "run_population_rounds",
]


class ResidualStore:
    """Error-feedback residuals of many clients, one fp16 row each, held only for clients that have trained.

    fp16 halves the memory of fp32 state; the residual is a small correction (what the codec did not send),
    and its rounding error (relative 2⁻¹¹) is far below the codec's own. A client that never trained has no
    row: the store grows with the clients that took part, not with those registered. (It was one zeroed
    ``(clients, params)`` tensor, assumed to be backed lazily; ``torch.zeros`` writes every page, so 10,000
    clients of DigitsCNN took 350 MiB before a round and a million asked for 34 GiB at once.)
    """

    def __init__(self, *, clients: int, like: dict[str, Tensor]) -> None:
        if clients < 1:
            raise ConfigError(f"clients must be at least 1. Found {clients}")
        self.clients = clients
        self.names = list(like)
        self.shapes = [tuple(t.shape) for t in like.values()]
        self.sizes = [t.numel() for t in like.values()]
        self._rows: dict[int, Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes the store may occupy once every client has trained."""
        return self.clients * sum(self.sizes) * 2

    @property
    def stored_bytes(self) -> int:
        """Bytes of the rows held now (the clients that have trained)."""
        return len(self._rows) * sum(self.sizes) * 2

    def _check(self, cid: int) -> None:
        if not 0 <= cid < self.clients:
            raise ConfigError(f"client id must be in [0, {self.clients}). Found {cid}")

    def get(self, cid: int) -> Delta | None:
        """Client ``cid``'s residual in fp32 (``None`` before its first round)."""
        self._check(cid)
        row = self._rows.get(cid)
        if row is None:
            return None
        parts = row.float().split(self.sizes)
        return Delta({n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)})

    def put(self, cid: int, residual: Delta) -> None:
        """Store client ``cid``'s residual (rounded to fp16)."""
        self._check(cid)
        self._rows[cid] = torch.cat([residual[n].reshape(-1) for n in self.names]).to(torch.float16)


#: draws of a client's samples before giving up on two distinct ones (ClientPopulation.client)
_MAX_DRAWS = 100
#: The most samples a synthesized device draws (its training set is at most this many).
MAX_DEVICE_SAMPLES = 100


class ClientPopulation:
    """``size`` registered clients over one training set, each built on demand from its own seed stream."""

    def __init__(
        self,
        config: RunConfig,
        train: Dataset,
        *,
        size: int,
        max_samples: int = MAX_DEVICE_SAMPLES,
        num_classes: int | None = None,
    ) -> None:
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
        self.num_classes = num_classes or int(labels.max()) + 1
        self._by_label = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        # a client's label mix covers the labels the pool holds: a task's class count may include one only its
        # test set has, and no sample of it could be drawn (the same draws as before when every label is there)
        self._labels = [c for c in range(self.num_classes) if len(self._by_label[c])]
        if not self._labels:
            raise ConfigError("the training pool is empty: the population engine has no samples to deal out")
        if len(train) < 2:
            raise ConfigError(
                "the training pool holds 1 sample: each device needs one to train on and another to hold out"
            )

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """One client's sample indices (sorted, with repeats): its size, its Dirichlet label mix, its samples."""
        n = int(rng.integers(self.config.min_client_samples, self.max_samples + 1))
        mix = rng.dirichlet(np.full(len(self._labels), self.config.alpha))
        counts = rng.multinomial(n, mix)
        return np.sort(
            np.concatenate(
                [
                    rng.choice(self._by_label[c], size=k)
                    for c, k in zip(self._labels, counts, strict=True)
                    if k > 0
                ]
            )
        )

    def client(self, cid: int) -> Client:
        """Client ``cid`` (same shard every call): Dirichlet label mix, size in [min_client_samples, max].

        Its held-out samples are distinct samples of its draw, none of them in its training data: drawn with
        replacement, a sample can appear several times in a draw, and splitting the draw by position put
        copies of one sample on both sides (half of the digits clients scored some of their own training
        images as held out).
        """
        if not 0 <= cid < self.size:
            raise ConfigError(f"client id must be in [0, {self.size}). Found {cid}")
        rng = numpy_rng(self.config.seed, Stream.PARTITION, cid)
        for _ in range(_MAX_DRAWS):
            idx = self._draw(rng)
            distinct = np.unique(idx)
            # a draw of one sample repeated (a label with one sample, a mix all on it) cannot hold one out
            if len(distinct) >= 2:
                break
        else:
            raise ConfigError(
                f"client {cid}: {_MAX_DRAWS} draws gave no two distinct samples; raise alpha or add samples "
                "to the labels that have only one"
            )
        _, held = split_holdout(distinct, self.config.holdout_fraction, rng)
        local = idx[~np.isin(idx, held)]
        # no compressor yet: the round that trains the client attaches one (none outlives a round)
        return Client(
            cid, self.train.subset(local), self.train.subset(held), compressor=cast(Compressor, None)
        )


@dataclass(frozen=True)
class PopulationResult:
    """Per-round wall time and test accuracy, bytes sent, and the process's peak resident memory."""

    registered: int
    per_round: int
    seconds: list[float]
    test_accuracy: list[float]
    #: the round's sampled devices' pooled held-out accuracy; NaN in a round that scored none (nobody sampled, or
    #: a round ``client_eval_every`` leaves unscored)
    sampled_accuracy: list[float]
    uplink_bytes: int
    #: bytes the error-feedback residual store holds at the end: one fp16 row per client that trained
    residual_store_bytes: int
    peak_rss_bytes: int
    wall_time_s: float
    #: ε spent after each round (None without DP)
    epsilon: list[float | None] = field(default_factory=list)
    #: the same rounds as every other driver reports them (client accuracies: the sampled devices')
    rounds: list[RoundMetrics] = field(default_factory=list)
    final_state: dict[str, Tensor] = field(default_factory=dict, repr=False)
    num_params: int = 0
    raw_update_bytes: int = 0
    #: why the run ended before ``config.rounds`` (the privacy budget), else None
    stopped: str | None = None
    #: bytes the residual store would hold had every registered client trained (its ceiling)
    residual_store_max_bytes: int = 0


#: Options the population driver refuses, with the physical reason (everything else runs as in process).
_REFUSED = {
    "personalization": (
        "none",
        "personalization keeps a personal model per device between rounds; the population driver holds "
        "only an fp16 error-feedback row per registered device (10,000 personal models would not fit)",
    ),
}


def check_supported(config: RunConfig) -> None:
    """Raise :class:`UnsupportedOption` for what the population driver cannot run, with the reason."""
    for name, (off, why) in _REFUSED.items():
        if getattr(config, name) != off:
            raise UnsupportedOption(
                f"the population engine cannot run {name}={getattr(config, name)!r}: {why}"
            )
    if make_task(config).train is None:
        raise UnsupportedOption(
            f"the population engine synthesizes devices from one pooled training set; task "
            f"{make_task(config).name!r} brings its own devices: use the sequential or batched engine"
        )
    _check_ring(config)
    # checked here, before any run starts: the trainer itself would refuse the model only in round 1
    task = make_task(config)
    blocker = task_blocker(task.build_model(derive_seed(config.seed, Stream.MODEL_INIT)), task)
    if blocker is not None:
        raise UnsupportedOption(
            f"the population engine trains its devices stacked, and {blocker}: use the sequential engine"
        )


def _check_ring(config: RunConfig) -> None:
    """A weighted SecAgg ring must carry every count a synthesized device may hold (up to
    :data:`MAX_DEVICE_SAMPLES`): its devices are drawn lazily, so the bound is checked, not each device."""
    from deltaplane.engine.secure import check_ring_carries

    check_ring_carries(config, [MAX_DEVICE_SAMPLES], bound=True)


def _population_config(config: RunConfig, registered: int | None, per_round: int | None) -> RunConfig:
    """``config`` with ``clients = registered`` and a sample fraction giving ``per_round`` devices a round."""
    registered = config.clients if registered is None else registered
    if per_round is None:
        return config.replace(clients=registered)
    if not 1 <= per_round <= registered:
        raise ConfigError(f"per_round must be in [1, registered={registered}]. Found {per_round}")
    return config.replace(clients=registered, sample_fraction=per_round / registered)


def run_population(
    config: RunConfig,
    *,
    registered: int | None = None,
    per_round: int | None = None,
    progress: Callable[[RoundMetrics], None] | None = None,
) -> PopulationResult:
    """The engine's rounds over ``registered`` lazily built devices, ``per_round`` of them sampled each round.

    Each round: sample (``sample_clients``, the in-process stream); build the sampled devices; train them
    at once (:class:`BatchedTrainer`); the rest of the client step (:class:`~deltaplane.engine.ClientStep`)
    and the server step (:class:`~deltaplane.engine.ServerStep`: the full aggregator chain, DP and its
    accountant, robust rules, downlink codec) are the engine's. A device's error-feedback residual lives in
    the :class:`ResidualStore`, a stateful codec's state (PowerSGD's warm start) in a dict of the devices that
    trained; its uplink codec's random stream is ``(seed, UPLINK_CODEC, client, round)`` because no compressor
    object outlives a round. Reports accuracy on the global test set and on the sampled
    devices' held-out data (evaluating all registered devices every round would dominate the cost).

    ``registered`` and ``per_round`` default to ``config.clients`` and ``config.clients_per_round()``.

    Raises:
        UnsupportedOption: personalization (see ``_REFUSED`` for why), or a task that brings its own devices.
        ConfigError: a weighted SecAgg ring (``secagg_bits``) too narrow for a device's example count, or an
            attack whose fraction of the ``registered`` devices rounds to no attacker.
    """
    config = _population_config(config, registered, per_round)
    # an attack's fraction applies to the registered devices (config.clients now): ClientStep draws
    # round(fraction · registered) attackers, fixed for the run, before any sampling; none is refused here
    config.attacker_count(
        counted="registered devices", fix="register more devices (run_population's registered, or clients)"
    )
    for name, (off, why) in _REFUSED.items():
        if getattr(config, name) != off:
            raise UnsupportedOption(
                f"the population engine cannot run {name}={getattr(config, name)!r}: {why}"
            )
    _check_ring(config)
    # `threads` workers of the batched trainer (this thread and forked processes), one torch thread each; the
    # rest runs on this thread
    # (as in deltaplane.sim.simulation: no intra-op pool whose stragglers stall every small kernel)
    with torch_threads(1):
        return _run(config, progress)


def _run(config: RunConfig, progress: Callable[[RoundMetrics], None] | None) -> PopulationResult:
    start = time.perf_counter()
    task = make_task(config)
    if task.train is None:
        raise UnsupportedOption(
            f"the population engine synthesizes devices from one pooled training set; task {task.name!r} "
            "brings its own devices: use the sequential or batched engine"
        )
    registered = config.clients
    population = ClientPopulation(config, task.train, size=registered, num_classes=task.num_classes)
    model = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = BatchedTrainer(
        model,
        memory_budget=int(config.memory_budget_mb * 2**20),
        loss=task.loss,
        workers=trainer_workers(config),
    )
    # its forked workers stop now, also when a round raises (a traceback holding this frame would keep them)
    try:
        step = ClientStep(config, task, base_id=BASE_ID)
        server = ServerStep.for_run(config, task, initial, base_id=BASE_ID)
        # the whole test set, as each round's scoring, which hands the watch its loss (accuracy_and_loss)
        watch = DivergenceWatch(task, initial, config=config, samples=None)
        # one wire session per run, built once (both sides would build the same)
        step.sessions = server.sessions
        enrollment = run_enrollment(config)  # authenticated SecAgg: each device enrolled when first sampled
        store = ResidualStore(clients=registered, like=initial)
        # DGC momentum correction's per-device velocity, kept like the residual (one fp16 row per device)
        velocities = (
            ResidualStore(clients=registered, like=initial) if config.momentum_correction > 0 else None
        )
        # DGC's relative local clip: each device's history of its own update norms (two numbers a device)
        norm_histories: dict[int, NormHistory] = {}
        # a stateful codec's per-device state (PowerSGD's warm-start Q, a few values per matrix), for the
        # devices that have trained: no compressor object outlives a round, without it every round starts cold
        codec_states: dict[int, dict[str, dict[str, Any]]] = {}
        seconds, test_acc, sampled_acc, epsilon = [], [], [], []
        history: list[RoundMetrics] = []
        stopped: str | None = None
        per_round = 0
        uplink = cum_down = 0
        for rnd in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            version, global_state = server.version, server.state
            chosen = sample_clients(
                registered,
                config.sample_fraction,
                numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd),
                central_dp=config.dp_noise > 0,
            )
            clients = [population.client(cid) for cid in chosen]
            per_round = len(chosen)
            for client in clients:
                comp = Compressor(
                    config.codec,
                    error_feedback=config.error_feedback,
                    seed=derive_seed(config.seed, Stream.UPLINK_CODEC, client.cid, rnd),
                )
                comp.state.residual = store.get(client.cid) if config.error_feedback else None
                comp.state.codec = codec_states.pop(client.cid, {})
                client.compressor = comp
                if velocities is not None:
                    client.velocity = velocities.get(client.cid)
                client.norms = norm_histories.get(client.cid)
            server.open(rnd)
            ordered: list[Upload] = []
            if clients:  # Poisson sampling (central DP) may choose nobody
                # Every sampled device trains in the stack, a malicious one on its poisoned data
                # (ClientStep.training_data: drawn from its stream (seed, ATTACK, round, cid), which keeps the
                # generator for the update's poisoning), as the batched engine trains it; each device's batch
                # order is its own stream, so no row depends on its stack-mates (beyond float32 rounding).
                # Every attack of deltaplane.engine.attacks changes only the data before training and the
                # update after it (poison_update: boost, sign flip, noise, norm scaling), so none needs its own
                # training loop; one with per-device control flow inside training would have to run
                # ClientStep.run for its devices here (docs/sim-speed.md, "Attackers in the stack").
                data = [step.training_data(c, rnd) for c in clients]
                stacked = start_batched(config, trainer, global_state, clients, rnd, data).result()
                # the honest rows compressed on the stack (unless local DP or SecAgg), each with its own
                # residual and generator (and DGC's velocity); an attacker's row poisoned (its own generator)
                # and compressed on its own (ClientStep.finish_stacked), in the sampled order
                ordered = _upload_stacked(
                    step, clients, stacked, version, rnd, model=model, global_state=global_state
                )
            for client in clients:
                if client.compressor.state.residual is not None:  # an exact codec leaves nothing to carry
                    store.put(client.cid, client.compressor.state.residual)
                if velocities is not None and client.velocity is not None:
                    velocities.put(client.cid, client.velocity)
                if client.norms is not None:
                    norm_histories[client.cid] = client.norms
                if client.compressor.state.codec:
                    codec_states[client.cid] = client.compressor.state.codec
            deliver(config, server, ordered, rnd, enrollment)
            try:
                outcome = server.close()  # raises PrivacyBudgetExceeded before a round that would exceed it
            except PrivacyBudgetExceeded as exc:
                stopped = budget_stop(exc, rnd, len(history))  # keeps every round done so far
                break
            uplink += outcome.uplink_bytes
            model.load_state_dict(outcome.state)
            scores = accuracy_and_loss(model, task.test, task.loss)
            watch.check_loss(rnd, scores[TEST_LOSS])
            test_acc.append(scores["test_accuracy"])
            # Poisson sampling (central DP) may choose nobody: the round still released its noise, and there is
            # no sampled device to score (NaN, as round_scores gives); nor in a round that
            # config.client_eval_every leaves unscored (the test set only)
            scored = clients if config.scores_clients(rnd) else []
            if scored:
                holdout = Dataset(
                    torch.cat([c.holdout.x for c in scored]), torch.cat([c.holdout.y for c in scored])
                )
                sampled_acc.append(accuracy(model, holdout))
            else:
                sampled_acc.append(float("nan"))
            eps = round_epsilon(config, step, outcome.measurements)
            epsilon.append(eps)
            seconds.append(time.perf_counter() - t0)
            down = len(outcome.downlink_payload) * registered  # every device applies it, when it next syncs
            cum_down += down
            history.append(
                RoundMetrics(
                    round=rnd,
                    clients=len(chosen),
                    **round_scores(model, task.test, evaluate_clients(model, scored)),
                    uplink_bytes=outcome.uplink_bytes,
                    downlink_bytes=down,
                    cumulative_uplink_bytes=uplink,
                    cumulative_downlink_bytes=cum_down,
                    seconds=seconds[-1],
                    epsilon=eps,
                    epsilon_vs_server=outcome.measurements.get("epsilon_vs_server"),
                    dp_adjacency=dp_adjacency(config),
                    rejected=len(outcome.rejections),
                    backdoor_success=backdoor_success(model, task.test, getattr(step.attack, "target", None)),
                    clipped_fraction=outcome.measurements.get("clipped_fraction"),
                )
            )
            if progress is not None:
                progress(history[-1])
        return PopulationResult(
            registered=registered,
            per_round=per_round,
            seconds=seconds,
            test_accuracy=test_acc,
            sampled_accuracy=sampled_acc,
            uplink_bytes=uplink,
            residual_store_bytes=store.stored_bytes,  # what it holds, not what it could
            residual_store_max_bytes=store.nbytes,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
            wall_time_s=time.perf_counter() - start,
            epsilon=epsilon,
            rounds=history,
            final_state=server.state,
            num_params=sum(v.numel() for v in initial.values()),
            raw_update_bytes=raw_upload_bytes(initial),  # no personalization: every tensor travels
            stopped=stopped,
        )
    finally:
        trainer.close()


def run_population_rounds(
    config: RunConfig, *, progress: Callable[[RoundMetrics], None] | None = None
) -> RunResult:
    """``--engine population``: :func:`run_population` over ``config.clients`` registered devices,
    ``config.clients_per_round()`` a round, reported as the :class:`RunResult` every driver returns."""
    r = run_population(config, progress=progress)
    return RunResult(
        config=config,
        rounds=r.rounds,
        num_params=r.num_params,
        raw_update_bytes=r.raw_update_bytes,
        wall_time_s=r.wall_time_s,
        final_state=r.final_state,
        stopped=r.stopped,
    )

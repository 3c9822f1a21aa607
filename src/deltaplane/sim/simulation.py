"""The in-process federated simulator: rounds of sample → local train → compress → decode → FedAvg → apply.

Every byte counted is a real payload: each client's delta goes through its own
:class:`~deltaplane.codecs.Compressor`, the server decodes the bytes with
:func:`~deltaplane.codecs.decompress` (strictly, checking the base model version), and the averaged update is
sent back down through a server-side compressor. Runs are deterministic given ``config.seed``: every random
choice draws from a stream derived from ``(seed, purpose, round, client)``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.aggregation import FLTrust, Rejection, local_epsilon, privatize
from deltaplane.codecs import Compressor, compress_many, decompress
from deltaplane.data.digits import NUM_CLASSES, Dataset, load_digits, train_test_split
from deltaplane.data.domains import shift
from deltaplane.delta import Delta
from deltaplane.errors import DeltaplaneError, InvalidUpdate
from deltaplane.personalization import PersonalState
from deltaplane.sim.attacks import Attack, add_trigger, choose_malicious, parse_attack
from deltaplane.sim.batched import BatchedTrainer, batching_blocker
from deltaplane.sim.client import Client, evaluate_clients, make_clients, round_scores
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import accuracy, build_model
from deltaplane.sim.seeding import Stream, derive_seed, numpy_rng, torch_generator

__all__ = [
    "RoundMetrics",
    "RunResult",
    "federation_data",
    "label_mix_accuracy",
    "run_simulation",
    "sample_clients",
]

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
    #: ε spent so far at ``config.dp_delta`` (None without DP)
    epsilon: float | None = None
    #: client updates refused this round (NaN/Inf, wrong layout or version, norm above the bound)
    rejected: int = 0
    #: share of triggered test images of other classes classified as the backdoor target (backdoor attacks)
    backdoor_success: float | None = None
    #: share of client updates clipped this round (with clipping)
    clipped_fraction: float | None = None
    #: With personalization: accuracy on each client's own label mix (per-class accuracy on the global test
    #: set weighted by the client's class shares) of the global model and of the client's personal model.
    client_mix_accuracy_mean: float | None = None
    personal_accuracy_mean: float | None = None
    personal_accuracy_min: float | None = None
    #: the largest drop of a client's accuracy from the global to its personal model (negative: a loss)
    personal_gain_min: float | None = None

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
    #: With personalization: per client, accuracy (on its label mix) of the global and of its personal model.
    clients: list[dict[str, Any]] = field(default_factory=list)

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
            "clients": self.clients,
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


#: Fallback reasons already reported, so that a sweep of many runs says each one once.
_REPORTED_FALLBACKS: set[str] = set()


def _batched_trainer(config: RunConfig, model: nn.Module, *, personalized: bool) -> BatchedTrainer | None:
    """The batched engine for this run, or ``None`` (sequential loop), warning once when it must fall back."""
    if config.engine != "batched":
        return None
    reason = batching_blocker(model)
    if reason is None and config.attack:
        reason = "an attack poisons some clients' data or updates"
    if reason is None and personalized:
        reason = f"personalization '{config.personalization}' starts each client from its own weights"
    if reason is not None:
        if reason not in _REPORTED_FALLBACKS:
            _REPORTED_FALLBACKS.add(reason)
            warnings.warn(
                f"engine='batched' falls back to the sequential client loop: {reason}",
                UserWarning,
                stacklevel=3,
            )
        return None
    return BatchedTrainer(model, memory_budget=int(config.memory_budget_mb * 2**20))


def train_batched(
    config: RunConfig,
    trainer: BatchedTrainer,
    global_state: dict[str, Tensor],
    clients: list[Client],
    rnd: int,
) -> dict[str, Tensor]:
    """Every client's local update this round, trained at once, stacked ``{name: (clients, *shape)}``; equal
    to ``Client.local_update``'s up to float rounding because each client's batches come from the same stream
    ``(seed, LOCAL_TRAINING, rnd, cid)`` in the same way (tests/sim/test_batched.py)."""
    return trainer.train(
        global_state,
        [c.train for c in clients],
        [torch_generator(config.seed, Stream.LOCAL_TRAINING, rnd, c.cid) for c in clients],
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.client_lr(rnd),
        momentum=config.momentum,
        prox_mu=config.prox_mu,
    )


def _upload_stacked(
    clients: list[Client], stacked: dict[str, Tensor], version: int
) -> dict[int, bytes | DeltaplaneError]:
    """Every trained client's payload, compressed on the stack (:func:`~deltaplane.codecs.compress_many`).

    The same bytes, and the same compressor states, as each client's :meth:`Client.upload` one by one; a
    client whose compression fails gets its error, to be refused like any bad update.
    """
    payloads = compress_many(
        [c.compressor for c in clients],
        stacked,
        base_id=BASE_ID,
        base_version=version,
        return_exceptions=True,
    )
    return {c.cid: p for c, p in zip(clients, payloads, strict=True)}


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


def _backdoor_success(model: torch.nn.Module, test: Dataset, target: int | None) -> float | None:
    if target is None:
        return None
    keep = test.y != target
    triggered = Dataset(add_trigger(test.x[keep]), torch.full_like(test.y[keep], target))
    return accuracy(model, triggered)


@torch.no_grad()
def label_mix_accuracy(
    model: torch.nn.Module, state: dict[str, Tensor], test: Dataset, client: Client
) -> float:
    """Accuracy of ``state`` on the client's own label mix: per-class accuracy on the global test set weighted by
    the client's class shares. Scores a device on what it will see, with the 360 test images rather than the
    dozen it holds out (which personalization already uses to choose α)."""
    model.load_state_dict(state)
    model.eval()
    pred = model(test.x).argmax(1)
    per_class = np.array([float((pred[test.y == c] == c).float().mean()) for c in range(NUM_CLASSES)])
    shares = client.train.class_counts() / max(1, len(client.train))
    return float(shares @ per_class)


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

    attack, fraction = parse_attack(config.attack) if config.attack else (Attack(), 0.0)
    malicious = choose_malicious(config.clients, fraction, numpy_rng(config.seed, Stream.ATTACK))
    agg = config.build_aggregator(seed=derive_seed(config.seed, Stream.AGGREGATION) % 2**31)
    fltrust = agg.find(FLTrust)
    server_trainer = None
    if isinstance(fltrust, FLTrust):  # the server's own small clean dataset, as in Cao et al. 2021
        idx = numpy_rng(config.seed, Stream.ROOT_DATA).choice(
            len(train), size=min(config.root_samples, len(train)), replace=False
        )
        root = train.subset(np.sort(idx))
        server_trainer = Client(-1, root, root, Compressor("identity"))
    backdoor_target = getattr(attack, "target", None)
    personalizer = config.make_personalizer()
    local_keys = personalizer.local_keys(model)  # FedBN on a model without batch-norm raises here
    trainer = _batched_trainer(config, model, personalized=bool(local_keys))
    personal = [PersonalState() for _ in clients]  # per-device state, kept on the device
    client_rows: list[dict[str, Any]] = []

    participations: dict[int, int] = {}  # rounds each device released a locally privatized update in
    history: list[RoundMetrics] = []
    cum_up = cum_down = 0
    for rnd in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        version = rnd - 1  # the global model every client trains from this round
        chosen = sample_clients(
            config.clients, config.sample_fraction, numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd)
        )
        agg.reset()
        if server_trainer is not None:
            gen = torch_generator(config.seed, Stream.ROOT_DATA, rnd)
            reference = server_trainer.local_update(
                model, global_state, config, gen, lr=config.client_lr(rnd)
            )
            fltrust.set_reference(reference)  # type: ignore[union-attr]
        uplink = 0
        rejections: list[Rejection] = []
        secure_inputs: list[Delta] = []
        secure_weights: list[int] = []
        trained: dict[int, Delta] = {}
        uploads: dict[int, bytes | DeltaplaneError] = {}
        if trainer is not None:
            batch = [clients[c] for c in chosen]
            stacked = train_batched(config, trainer, global_state, batch, rnd)
            # the batched engine trains neither attacked nor personalized clients; with local DP or on-device
            # clipping each update is still changed on its own before it is compressed
            if config.local_dp_noise == 0 and not (config.secagg and config.clip is not None):
                uploads = _upload_stacked(batch, stacked, version)
            else:
                trained = {c.cid: Delta({k: t[i] for k, t in stacked.items()}) for i, c in enumerate(batch)}
        for cid in chosen:
            client = clients[cid]
            data = None
            if cid in malicious:
                attack_gen = torch_generator(config.seed, Stream.ATTACK, rnd, cid)
                data = Dataset(*attack.poison_data(client.train.x, client.train.y, attack_gen))
            # the global model with this device's local layers (FedPer's head, FedBN's norms), if any
            origin = personalizer.start_state(global_state, personal[cid]) if local_keys else global_state
            if cid in uploads:
                pass  # compressed with the others on the stack, untransformed (see above)
            elif cid in trained:
                delta = trained[cid]
            else:
                gen = torch_generator(config.seed, Stream.LOCAL_TRAINING, rnd, cid)
                delta = client.local_update(model, origin, config, gen, lr=config.client_lr(rnd), data=data)
            if local_keys:
                personalizer.keep_local(delta.apply(origin), personal[cid], model)
                delta = personalizer.shared(delta, model)  # local layers never leave the device
            if cid in malicious:
                delta = attack.poison_update(delta, attack_gen)
            if config.local_dp_noise > 0:  # local DP: the device clips and noises its own update
                delta = privatize(
                    delta,
                    clip=float(config.clip),  # type: ignore[arg-type]
                    noise_multiplier=config.local_dp_noise,
                    generator=torch_generator(config.seed, Stream.LOCAL_DP, rnd, cid),
                )
                participations[cid] = participations.get(cid, 0) + 1
            if config.secagg and config.clip is not None:  # with secagg, clipping happens on the device
                norm, bound = delta.norm(), float(config.clip)
                delta = delta * (bound / norm) if norm > bound else delta
            try:
                upload = uploads.get(cid)
                if isinstance(upload, DeltaplaneError):
                    raise upload
                payload = (
                    client.upload(delta, base_id=BASE_ID, base_version=version) if upload is None else upload
                )
                decoded = decompress(payload, expect_base=(BASE_ID, version))
            except DeltaplaneError as exc:  # one bad client is refused, the round goes on
                rejections.append(Rejection(str(cid), exc))
                continue
            if config.secagg:
                # Still on the device: it decoded its own payload (so its codec and error feedback shape what
                # it contributes) and will feed that into the ring and mask it; the payload never leaves it.
                secure_inputs.append(decoded)
                secure_weights.append(client.num_samples)
                continue
            uplink += len(payload)
            if not agg.add(decoded, client.num_samples, base_version=version, client_id=str(cid)):
                rejections.append(agg.rejections[-1])
        accepted = len(secure_inputs) if config.secagg else len(chosen) - len(rejections)
        if accepted == 0:
            first = rejections[0]
            raise InvalidUpdate(
                f"round {rnd}, client {first.client_id}: {first.error} (every update of the round was refused; "
                "if local training diverged, try a lower lr)"
            ) from first.error
        if config.secagg:
            from deltaplane.aggregation.secagg import secure_mean

            # The SecAgg messages run between the devices and the server (in process, as bytes): each device
            # quantizes its update scaled by its example count into the ring and masks it; the server object
            # only ever sees masked messages and unmasks their sum, the example-weighted mean.
            mean, report = secure_mean(
                secure_inputs,
                weights=secure_weights,
                bits=config.secagg_bits,
                clip_range=config.secagg_range,
                round_id=rnd,
                seed=derive_seed(config.seed, Stream.SECAGG, rnd),
            )
            uplink = sum(report.upload_bytes.values())  # what actually crossed the wire: SecAgg messages
            agg.add(mean, 1.0)
        update = agg.result()  # raises PrivacyBudgetExceeded before a round that would exceed the budget
        if config.aggregator == "fedavg":
            update = update * config.server_lr
        measurements = agg.measurements
        payload = downlink.compress(update, base_id=BASE_ID, base_version=version)
        decoded = decompress(payload, expect_base=(BASE_ID, version))
        # a partial update (local layers excluded) changes only the shared tensors
        global_state = {**global_state, **decoded.apply({k: global_state[k] for k in decoded})}
        down = len(payload) * len(clients)  # every device applies the update to stay in sync
        cum_up += uplink
        cum_down += down

        personal_metrics: dict[str, float] = {}
        if personalizer.name != "none":
            for c in clients:  # every device received the new global model and adapts its personal state
                g = torch_generator(config.seed, Stream.PERSONALIZATION, rnd, c.cid)
                personalizer.personalize(
                    model, global_state, personal[c.cid], c.train, c.holdout, generator=g
                )
            glob = [label_mix_accuracy(model, global_state, test, c) for c in clients]
            pers = [
                label_mix_accuracy(model, personalizer.personal_state(global_state, personal[c.cid]), test, c)
                for c in clients
            ]
            personal_metrics = {
                "client_mix_accuracy_mean": float(np.mean(glob)),
                "personal_accuracy_mean": float(np.mean(pers)),
                "personal_accuracy_min": float(np.min(pers)),
                "personal_gain_min": float(np.min(np.subtract(pers, glob))),
            }
            if rnd == config.rounds:
                client_rows = [
                    {
                        "client": c.cid,
                        "global_accuracy": gl,
                        "personal_accuracy": pe,
                        "alpha": personal[c.cid].alpha,
                    }
                    for c, gl, pe in zip(clients, glob, pers, strict=True)
                ]

        model.load_state_dict(global_state)
        # the global model on each device's held-out data; personalized figures are in personal_metrics
        client_acc = evaluate_clients(model, clients)
        metrics = RoundMetrics(
            round=rnd,
            clients=len(chosen),
            **round_scores(model, test, client_acc),
            uplink_bytes=uplink,
            downlink_bytes=down,
            cumulative_uplink_bytes=cum_up,
            cumulative_downlink_bytes=cum_down,
            seconds=time.perf_counter() - t0,
            epsilon=(
                local_epsilon(
                    noise_multiplier=config.local_dp_noise,
                    rounds=max(participations.values()),
                    delta=config.dp_delta,
                )
                if participations
                else measurements.get("epsilon")
            ),
            rejected=len(rejections),
            backdoor_success=_backdoor_success(model, test, backdoor_target),
            clipped_fraction=measurements.get("clipped_fraction"),
            **personal_metrics,
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
        clients=client_rows,
    )

"""The in-process drivers: sequential (one device after another) and batched (a round's devices stacked).

Both are thin drivers over the engine's two steps (:mod:`deltaplane.engine`): per round, sample devices; run
the client step on each (:class:`~deltaplane.engine.ClientStep`: train → personalize → [attack] → clip /
local DP → compress | SecAgg); hand the uploads to the server step (:class:`~deltaplane.engine.ServerStep`:
decode + validate → aggregator chain → downlink compress → publish); score the new global model. The batched
driver only changes *how* training runs (all devices at once, :class:`~deltaplane.sim.batched.BatchedTrainer`)
and compresses a round's honest uploads on the stack when no later stage touches them.

Every byte counted is a real payload; runs are deterministic given ``config.seed``: every random choice draws
from a stream derived from ``(seed, purpose, round, client)``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.engine import (
    ClientStep,
    RoundMetrics,
    RunConfig,
    RunResult,
    ServerStep,
    Task,
    Upload,
    deliver,
    make_task,
    sample_clients,
)
from deltaplane.engine.divergence import DivergenceWatch
from deltaplane.engine.federation import Client, build_clients
from deltaplane.engine.metrics import TEST_LOSS, score_round
from deltaplane.engine.metrics import label_mix_accuracy as _label_mix
from deltaplane.engine.results import budget_stop, raw_upload_bytes
from deltaplane.engine.scoring import backdoor_success, dp_adjacency, personal_metrics, round_epsilon
from deltaplane.engine.secure import run_enrollment
from deltaplane.engine.seeding import Stream, derive_seed, numpy_rng
from deltaplane.errors import PrivacyBudgetExceeded, UnsupportedOption
from deltaplane.sim.batched import (
    PREFETCH_CALLER_SHARE,
    BatchedTrainer,
    FinishedShare,
    PendingTraining,
    batching_blocker,
    task_blocker,
)
from deltaplane.sim.worker_encoding import WorkerEncoding
from deltaplane.sim.worker_scoring import WorkerScoring
from deltaplane.threads import torch_threads

__all__ = [
    "BASE_ID",
    "RoundMetrics",
    "RunResult",
    "batching_fallback",
    "federation_data",
    "label_mix_accuracy",
    "run_simulation",
    "sample_clients",
]

#: Identifies the lineage of global models in payload headers; the version is the round it was made from.
BASE_ID = "sim/digits-cnn"


def federation_data(config: RunConfig) -> tuple[Dataset, Dataset]:
    """The (train, test) sets of a run's task (digits: the split plus ``train_shifts`` shifted copies)."""
    task = make_task(config)
    if task.train is None:
        assert task.clients is not None  # a Task has train or clients (Task.__post_init__)
        return Dataset(
            torch.cat([d.x for d in task.clients]), torch.cat([d.y for d in task.clients])
        ), task.test
    return task.train, task.test


#: Start a round's training while the last one is scored (see _run); off only to compare against in tests.
_PREFETCH = True

#: Fallback reasons already reported, so that a sweep of many runs says each one once.
_REPORTED_FALLBACKS: set[str] = set()


def _fallback_reason(
    config: RunConfig, model: nn.Module, *, personalized: bool, task: Task | None = None
) -> str | None:
    """Why the batched engine trains ``config``'s devices one at a time (the sequential loop), or ``None``."""
    reason = task_blocker(model, task) if task is not None else batching_blocker(model)
    if reason is None and personalized:
        reason = f"personalization '{config.personalization}' starts each client from its own weights"
    return reason


def batching_fallback(config: RunConfig) -> str | None:
    """Why ``engine='batched'`` would fall back to the sequential client loop for ``config``, or ``None`` when it
    trains the run's devices stacked: the reason its ``UserWarning`` would give (a model with buffers or random
    layers, FedPer / FedBN devices that start from their own layers). Whatever ``config.engine`` says; it loads
    the task (cached) and builds its model, as the run would.

    Raises:
        TaskError: the task does not load.
        ConfigError: the personalization cannot run on the task's model (a FedBN model without norms).
    """
    task = make_task(config)
    model = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    personalized = bool(config.make_personalizer().local_keys(model))
    return _fallback_reason(config, model, personalized=personalized, task=task)


def _batched_trainer(
    config: RunConfig, model: nn.Module, *, personalized: bool, task: Task | None = None
) -> BatchedTrainer | None:
    """The batched engine for this run, or ``None`` (sequential loop), warning once when it must fall back."""
    if config.engine != "batched":
        return None
    reason = _fallback_reason(config, model, personalized=personalized, task=task)
    if reason is not None:
        if reason not in _REPORTED_FALLBACKS:
            _REPORTED_FALLBACKS.add(reason)
            warnings.warn(
                f"engine='batched' falls back to the sequential client loop: {reason}",
                UserWarning,
                stacklevel=3,
            )
        return None
    loss = task.loss if task is not None else nn.functional.cross_entropy
    return BatchedTrainer(
        model, memory_budget=int(config.memory_budget_mb * 2**20), loss=loss, workers=trainer_workers(config)
    )


def trainer_workers(config: RunConfig) -> int:
    """The batched trainer's workers: ``threads``, but no more than the most clients a round trains (every
    client under central DP's Poisson sampling, else ``clients_per_round``). A round splits its clients over
    at most that many workers, so more would be forked processes that never train (threads=24 on 4 clients
    forked 23); the split, and so every result, is the same."""
    most = config.clients if config.dp_noise > 0 else config.clients_per_round()
    return max(1, min(config.threads, most))


def start_batched(
    config: RunConfig,
    trainer: BatchedTrainer,
    global_state: dict[str, Tensor],
    clients: list[Client],
    rnd: int,
    data: list[Dataset] | None = None,
    *,
    caller_share: float = 1.0,
    encoding: WorkerEncoding | None = None,
    version: int = 0,
) -> PendingTraining:
    """Every client's local update this round, trained at once: ``.result()`` gives them stacked
    ``{name: (clients, *shape)}``, equal to ``Client.local_update``'s up to float rounding because each client's
    batches come from the same stream ``(seed, LOCAL_TRAINING, rnd, cid)`` in the same way
    (tests/sim/test_batched.py). Begun with :meth:`BatchedTrainer.start`: the forked workers train while the
    caller does something else until it asks for the result. With ``encoding`` (and every device of the round
    covered by it) the workers also encode their shares' payloads for global version ``version``
    (:mod:`deltaplane.sim.worker_encoding`)."""
    return trainer.start(
        global_state,
        data if data is not None else [c.train for c in clients],
        # each client's batch-order stream as its seed: a forked worker draws its own clients' batch orders
        [derive_seed(config.seed, Stream.LOCAL_TRAINING, rnd, c.cid) for c in clients],
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.client_lr(rnd),
        momentum=config.momentum,
        prox_mu=config.prox_mu,
        caller_share=caller_share,
        worker_finish=encoding.finish(version) if encoding is not None and encoding.covers(clients) else None,
    )


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
    # before any in-process engine runs: the population engine too would otherwise ignore the transport
    if config.engine == "flower" or config.transport != "inproc":
        raise UnsupportedOption(
            f"run_simulation runs the in-process engines; engine={config.engine!r} transport={config.transport!r} "
            "run through deltaplane.apps.runner.run_federation (or deltaplane run)"
        )
    if config.engine == "population":
        from deltaplane.sim.population import run_population_rounds

        return run_population_rounds(config, progress=progress)
    # Fixed thread count: CPU kernels may reduce in a different order with a different number of threads.
    # The batched engine spends its threads on workers of one torch thread each (see _run).
    with torch_threads(config.threads):
        return _run(config, progress)


def _upload_stacked(
    step: ClientStep,
    clients: list[Client],
    stacked: dict[str, Tensor],
    version: int,
    rnd: int,
    *,
    model: nn.Module,
    global_state: dict[str, Tensor],
) -> list[Upload]:
    """Every trained client's upload, in the clients' order (:meth:`ClientStep.finish_stacked`): the honest
    ones' made together on the stack when :attr:`ClientStep.stacks_uplink` holds (DGC's stage and
    :func:`~deltaplane.codecs.compress_many`), an attacker's poisoned and compressed on its own.

    The same bytes, and the same compressor states and DGC velocities, as each client's own
    :meth:`ClientStep.finish` one by one; a client whose compression fails gets its error, to be refused like
    any bad update.
    """
    return step.finish_stacked(
        clients, stacked, model=model, global_state=global_state, rnd=rnd, version=version
    )


def label_mix_accuracy(model: nn.Module, state: dict[str, Tensor], test: Dataset, client: Client) -> float:
    """Accuracy of ``state`` on the client's own label mix (:func:`deltaplane.engine.label_mix_accuracy`)."""
    return _label_mix(model, state, test, client.train, int(test.y.max()) + 1)


def _run(config: RunConfig, progress: Callable[[RoundMetrics], None] | None) -> RunResult:
    start = time.perf_counter()
    task = make_task(config)
    clients = build_clients(config, task)
    model = task.build_model(derive_seed(config.seed, Stream.MODEL_INIT))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = ClientStep(config, task, base_id=BASE_ID)
    server = ServerStep.for_run(config, task, initial, base_id=BASE_ID)
    local_keys = step.local_keys(model)  # the server step leaves the same tensors out (ServerStep.for_run)
    raw_bytes = raw_upload_bytes(initial, step.left_out(model))
    # the whole test set, as each round's scoring, which hands the watch its loss (report, below): the watch
    # runs the initial model's forward pass, and none of its own in a round
    watch = DivergenceWatch(task, initial, config=config, samples=None)
    step.sessions = server.sessions  # one wire session per run, built once (both sides would build the same)
    enrollment = run_enrollment(config)  # authenticated SecAgg: the devices' identities, enrolled once a run
    trainer = _batched_trainer(config, model, personalized=bool(local_keys), task=task)
    if trainer is not None:
        # `threads` workers (this thread and forked processes, BatchedTrainer._executor) train groups of
        # clients side by side, one torch thread each; everything else (scoring, the server's element-wise
        # work on one model) runs on this thread alone. An intra-op pool would make
        # each of the thousands of small kernels of a round wait for its slowest thread: on a busy machine a
        # descheduled pool thread stalls them all (docs/sim-speed.md, benchmarks/busy_machine.py).
        torch.set_num_threads(1)
    backdoor_target = getattr(step.attack, "target", None)
    client_rows: list[dict[str, Any]] = []
    history: list[RoundMetrics] = []
    stopped: str | None = None
    cum_up = cum_down = 0

    def chosen_in(rnd: int) -> list[int]:
        return sample_clients(
            config.clients,
            config.sample_fraction,
            numpy_rng(config.seed, Stream.CLIENT_SAMPLING, rnd),
            central_dp=config.dp_noise > 0,
        )

    # With worker processes, the next round's training starts (its workers' shares) as soon as the new global
    # model exists, before the round just done is scored; nothing that training reads (the global state it is
    # given, the sampled clients, their data and batch orders, each from its own stream) depends on the
    # scoring or on what the rest of the round does:
    # * attackers: a malicious device trains on data poisoned from its stream (seed, ATTACK, round, cid), drawn
    #   afresh each round (ClientStep.training_data, called for round r+1 once round r has closed); the
    #   generator it keeps for poisoning the update (_attack_streams) is taken by round r+1's finish, and every
    #   one of round r's was taken before round r closed. The backdoor's success is scored with the round.
    # * α-mix / Ditto: after_round adapts each device's personal state (stacked, in this process, with the
    #   trainer's train_from, which reads none of the weights the workers train with); the devices still train
    #   from the global model on their own data.
    # Not for FedPer / FedBN (their devices train from their own layers, which after_round may change): the
    # batched trainer falls back to the sequential loop for them anyway (trainer is None).
    overlap = trainer is not None and config.threads > 1 and not local_keys
    prefetch = _PREFETCH and overlap
    # This process's share (PREFETCH_CALLER_SHARE): it also frames and delivers its share's updates before it
    # needs the worker's. The split can change the float rounding of a client's delta, so every round of the
    # run uses the same one, prefetched or not (and _PREFETCH=False gives the very same run).
    caller_share = PREFETCH_CALLER_SHARE if overlap else 1.0
    # Share by share delivery (below) reaches the server in share order, not the sampled order: a bucketed
    # rule draws its buckets over client ids, not arrival positions (robust._Buffered._bucketed), so only
    # float sums see the difference, as with any other delivery order.
    share_by_share = overlap and step.stackable
    # The forked worker scores each round's model after it has trained its share of the next round, instead
    # of this process before its own share (deltaplane.sim.worker_scoring); set up before the first start()
    # forks the worker. Such a round's metrics are reported once the next round has closed.
    scoring = (
        WorkerScoring(trainer, model, task.test, clients, backdoor_target=backdoor_target, loss=task.loss)
        if prefetch and trainer is not None
        else None
    )
    # The forked worker encodes its share's payloads where the devices' compressors are memoryless (the
    # default identity codec): the same bytes, and this process no longer frames them after its own share
    # (deltaplane.sim.worker_encoding); registered before the first start() forks the worker.
    encoding = WorkerEncoding(trainer, step, clients) if share_by_share and trainer is not None else None
    # the round being scored in the worker: its other metrics, its start, and the scores to come
    deferred: tuple[dict[str, Any], float, Future] | None = None

    def report(fields: dict[str, Any], seconds: float, scores: dict[str, Any]) -> None:
        """Record a round and check it for divergence, by the test loss its scoring computed (no metric)."""
        loss = scores.pop(TEST_LOSS)
        history.append(RoundMetrics(**fields, **scores, seconds=seconds))
        watch.check_loss(fields["round"], loss)
        if progress is not None:
            progress(history[-1])

    def report_deferred(until: float) -> None:
        """The round scored in the worker, which took until ``until`` (the next round's start)."""
        nonlocal deferred
        if deferred is not None:
            fields, began, scores = deferred
            deferred = None
            report(fields, until - began, scores.result())

    try:
        pending: tuple[int, dict[str, Tensor], PendingTraining] | None = None
        for rnd in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            version = server.version  # the global model every client trains from this round
            global_state = server.state
            chosen = chosen_in(rnd)
            server.open(rnd)
            batch = [clients[c] for c in chosen]
            if trainer is not None and batch:  # Poisson sampling (central DP) may choose nobody
                # a malicious device trains on its poisoned data (ClientStep.training_data), as in the loop
                if pending is not None and pending[0] == rnd and pending[1] is global_state:
                    training = pending[2]
                else:
                    data = [step.training_data(c, rnd) for c in batch]
                    training = start_batched(
                        config,
                        trainer,
                        global_state,
                        batch,
                        rnd,
                        data,
                        caller_share=caller_share,
                        encoding=encoding,
                        version=version,
                    )
                pending = None
                if share_by_share:
                    # Share by share: this process encodes and delivers its own share's updates while the workers
                    # still train theirs, so only the last share's framing waits for training to end. The
                    # server receives the updates in share order (deterministic, the same prefetched or not).
                    for positions, stacked in training.parts():
                        share = [batch[i] for i in positions]
                        deliver(
                            config,
                            server,
                            WorkerEncoding.uploads(share, stacked)
                            if isinstance(stacked, FinishedShare)
                            else _upload_stacked(
                                step, share, stacked, version, rnd, model=model, global_state=global_state
                            ),
                            rnd,
                            enrollment,
                        )
                    uploads = []
                else:  # the honest updates on the stack; an attacker's, local DP's, SecAgg's one by one
                    uploads = _upload_stacked(
                        step, batch, training.result(), version, rnd, model=model, global_state=global_state
                    )
            else:
                uploads = [step.run(c, model, global_state, rnd, version) for c in batch]
            deliver(config, server, uploads, rnd, enrollment)
            try:
                outcome = server.close()  # raises PrivacyBudgetExceeded before a round that would exceed it
            except PrivacyBudgetExceeded as exc:
                report_deferred(t0)
                stopped = budget_stop(exc, rnd, len(history))  # keeps every round done so far
                break
            global_state = outcome.state
            if prefetch and rnd < config.rounds:
                assert trainer is not None
                upcoming = [clients[c] for c in chosen_in(rnd + 1)]
                if upcoming:
                    pending = (
                        rnd + 1,
                        global_state,
                        start_batched(
                            config,
                            trainer,
                            global_state,
                            upcoming,
                            rnd + 1,
                            [step.training_data(c, rnd + 1) for c in upcoming],
                            caller_share=caller_share,
                            encoding=encoding,
                            version=server.version,
                        ),
                    )
            down = len(outcome.downlink_payload) * len(
                clients
            )  # every device applies the update to stay in sync
            cum_up += outcome.uplink_bytes
            cum_down += down

            personal: dict[str, Any] = {}
            if step.personalizer.name != "none":
                # on the batched engine every device's personal training is one stacked computation, trained
                # here: the worker is training its share of the next round and scoring this one meanwhile
                step.after_round(
                    clients,
                    model,
                    global_state,
                    rnd,
                    train_many=trainer.train_from if trainer is not None else None,
                )
                personal, rows = personal_metrics(
                    step,
                    model,
                    global_state,
                    task.test,
                    clients,
                    task.num_classes,
                    stacked=trainer is not None,
                )
                if rnd == config.rounds:
                    client_rows = rows
            fields = dict(
                round=rnd,
                clients=len(chosen),
                uplink_bytes=outcome.uplink_bytes,
                downlink_bytes=down,
                cumulative_uplink_bytes=cum_up,
                cumulative_downlink_bytes=cum_down,
                epsilon=round_epsilon(config, step, outcome.measurements),
                epsilon_vs_server=outcome.measurements.get("epsilon_vs_server"),
                dp_adjacency=dp_adjacency(config),
                rejected=len(outcome.rejections),
                clipped_fraction=outcome.measurements.get("clipped_fraction"),
                **personal,
            )
            # scored in the worker when it trains the next round (its share sent above, the scoring queued after it)
            # the devices' held-out data only on the rounds config.client_eval_every names (NaN on the others)
            scored_clients = config.scores_clients(rnd)
            scores = (
                scoring.submit(global_state, clients=scored_clients)
                if scoring is not None and pending is not None
                else None
            )
            report_deferred(t0)  # the previous round: the worker scored it while this process closed this one
            if scores is not None:
                deferred = (fields, t0, scores)
                continue
            # here: the global model on the test set and on each device's held-out data (personalized figures
            # are in `personal`); the round's time includes its scoring
            scored: dict[str, Any] = score_round(
                model, global_state, task.test, clients if scored_clients else [], loss=task.loss
            )
            scored["backdoor_success"] = backdoor_success(model, task.test, backdoor_target)
            report(fields, time.perf_counter() - t0, scored)
        assert deferred is None  # the last round is scored here, and a budget stop reports the deferred one
        if scoring is not None:
            scoring.close()
        if encoding is not None:
            encoding.close()
        return RunResult(
            config=config,
            rounds=history,
            num_params=sum(v.numel() for v in server.state.values()),
            raw_update_bytes=raw_bytes,
            wall_time_s=time.perf_counter() - start,
            final_state=server.state,
            clients=client_rows,
            stopped=stopped,
            personal_states=(
                {c.cid: step.personal_state(c, server.state) for c in clients}
                if step.personalizer.name != "none"
                else {}
            ),
        )
    except Exception:
        # a later round failed after the one before it finished: that one is reported, as without overlap
        # (its scores come from the worker, which may be what failed)
        if deferred is not None:
            with contextlib.suppress(Exception):
                report_deferred(time.perf_counter())
        raise
    finally:
        if trainer is not None:  # its workers stop now, not when a traceback holding this frame goes
            trainer.close()

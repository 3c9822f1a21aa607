"""The service's training rounds: a thin HTTP driver over the engine's server step.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)

Device and admin endpoints for rounds live here, out of :func:`~deltaplane.serve.app.create_app`:

* ``GET  /v1/models/{model}/round`` — the open round and its base version;
* ``POST /v1/models/{model}/rounds/{round}/update?num_examples=N`` — a compressed update (wire format),
  checked for its claimed example count (at most ``max_examples``: 422), size (413), round and duplicate
  (409), base version (409 stale), format (400), shape (422), then handed to the server step, whose chain
  validates it (NaN/Inf, norm bound: 422);
* ``GET /admin/models/{model}/rounds/{round}`` — a round as stored (open, closed with its version and its
  close's measurements, aborted);
* ``POST /admin/models/{model}/rounds`` and ``.../rounds/{round}/close`` — open a round; close it: the
  server step aggregates (the configured chain: robust rule, clipping, DP-FedAvg with its accountant and
  budget, FedAdam & co. or server SGD), compresses the downlink and publishes a signed version; the response
  carries the round's measurements (ε spent, clipped fraction, clip norm, noise...).

One :class:`~deltaplane.engine.ServerStep` per model lives across rounds (server optimizer moments, the DP
accountant and the downlink residual are state of the federation, not of one round).

Rounds are durable (:class:`~deltaplane.serve.rounds_store.RoundStore`): a round's record and every accepted
upload are in the registry database before the upload is acknowledged; an upload names its round's nonce
(``X-Deltaplane-Round-Nonce``), so a captured upload cannot be replayed into a later round, and a device's
bytes are never accepted twice (two devices may send identical bytes). After a restart the open rounds come back and their uploads are replayed into a fresh
server step, which continues from the state stored with the last published round (server optimizer moments,
DP accountant, adaptive clip, random generators, downlink residual: :meth:`ServerStep.state_dict`, written in
the round's closing transaction), so a restarted service publishes bit for bit what an uninterrupted one
would. Closing is transactional: the new version, its
delta, the ``training`` tag and the round's closed state commit together, or none of them (the server step is
put back as it was and the round stays open with its uploads).
"""

import io
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from deltaplane.aggregation import DPFedAvg, build_aggregator
from deltaplane.codecs import Compressor, Layout, decompress, is_compact
from deltaplane.codecs.wire import read_table
from deltaplane.delta import Delta
from deltaplane.engine import ServerStep, make_task
from deltaplane.engine.admission import MAX_EXAMPLES, check_examples
from deltaplane.engine.seeding import Stream, derive_seed
from deltaplane.engine.server import released_lineage
from deltaplane.engine.tied import equal_twins
from deltaplane.errors import ConfigError, Conflict, DecodeError, InvalidUpdate, NotFound, ShapeMismatch
from deltaplane.registry import Governance, Registry, publish_update, withdrawn_among
from deltaplane.serve.bodies import NAME, ModelName
from deltaplane.serve.fleet_history import MAX_ABORT_REASON, MAX_CLOSED_ROUNDS
from deltaplane.serve.rounds_store import RoundRecord, RoundStore

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from deltaplane.aggregation.dp import DistributedDP
    from deltaplane.engine import RunConfig
    from deltaplane.serve.app import ServiceConfig, ServiceState

__all__ = [
    "DEFAULT_NORM_RATIO",
    "MAX_EXAMPLES",
    "NormRatio",
    "RegistryPublisher",
    "RoundState",
    "abort_reason",
    "check_examples",
    "check_guard_admits_distributed_dp",
    "check_guard_admits_local_dp",
    "check_guard_admits_noise",
    "check_round_binding",
    "check_update_norm",
    "distributed_dp_honest_bound",
    "guard_bound",
    "honest_norm_bound",
    "local_dp_honest_bound",
    "publisher_of",
    "refusal_of",
    "refuse_plaintext_under_secagg",
    "remembering_refusal",
    "restore_rounds",
    "resume_step",
    "round_router",
    "server_step_for",
    "step_bytes",
    "undo_on_failure",
]


@dataclass
class RoundState:
    """One open training round: its stored record, who has uploaded to it and their cohorts."""

    model: str
    number: int
    base_version: int
    record: RoundRecord | None = None
    devices: set[str] = field(default_factory=set)
    cohorts: set[str] = field(default_factory=set)
    examples: float = 0.0
    opened_at: float = field(default_factory=time.time)
    #: set while the round is being closed: uploads are refused, and reopened if publishing fails
    closing: bool = False
    #: why its last close was refused (a spent ε budget, a non-finite aggregate): what an abort without a
    #: reason records, so the Fleet page says why the round ended unpublished
    refused: str | None = None


@dataclass
class RegistryPublisher:
    """The service's downlink: register ``base + decode(compress(update))`` as a signed model version and the
    payload as its delta (:func:`~deltaplane.registry.publish_update`)."""

    registry: Registry
    model: str
    compressor: Compressor
    published: list[int] = field(default_factory=list)
    #: set by the round before it closes: the cohorts the new version contains or excludes, extra lineage
    governance: Governance | None = None
    lineage: dict[str, Any] = field(default_factory=dict)

    def publish(self, update: Delta, *, base_version: int, lineage: dict) -> tuple[bytes, Delta]:
        norm = float(update.norm())
        if not math.isfinite(norm):
            raise InvalidUpdate(f"the round's aggregate has norm {norm}; not published, the round stays open")
        version, delta = publish_update(
            self.registry,
            self.model,
            base_version,
            update,
            compressor=self.compressor,
            lineage={**lineage, **self.lineage},
            governance=self.governance,
        )
        self.published.append(version.number)
        payload = self.registry.read(delta)
        return payload, decompress(payload, expect_base=(self.model, base_version), expect_layout=update)


def untied_upload_refusal(
    exc: ShapeMismatch, payload: bytes, base: dict[str, torch.Tensor], model: str
) -> ShapeMismatch:
    """The refusal (422) of an upload whose tensors differ from the layout on a service without a federation:
    ``exc`` itself, or, when every name the update leaves out equals a tensor it holds in the round's base, a
    :class:`~deltaplane.errors.ShapeMismatch` that says what to do.

    Such an update is what a device of a model with tied weights sends (its aliases left out,
    :mod:`deltaplane.engine.tied`). This service has no task, so it cannot know which names are one parameter,
    and it does not learn them from the device or from equal values (see :mod:`deltaplane.engine.tied`: a device
    could tie any two equal tensors of the global model for good)."""
    try:
        names = set(read_table(payload).trees)
    except DecodeError:  # a compact payload, or one decompress refused for its layout before its table
        return exc
    missing = [n for n in base if n not in names]
    twins = equal_twins(missing, names, base)
    if not missing or len(twins) != len(missing):
        return exc
    pairs = ", ".join(f"{a!r} (equal to {k!r})" for a, k in list(twins.items())[:5])
    return ShapeMismatch(
        f"{exc}. The update leaves out {pairs}, as a device of a model with tied weights leaves out each "
        "tied parameter's other names (deltaplane.engine.tied). This service runs without a federation, so it "
        f"has no task to tell which names of {model!r} are one parameter, and equal values do not make them one. "
        "Fix: restart it as `deltaplane serve --federation <file>` with the federation file the devices use "
        "(its task builds the model and ties them), or have the devices upload every name of the state dict"
    )


def server_step_for(config: "ServiceConfig", registry: Registry, model: str, base_version: int) -> ServerStep:
    """The server step of ``model``: ``config.federation``'s chain and downlink when set, else plain FedAvg with
    ``config.server_lr`` and ``config.downlink_codec``."""
    run = config.federation
    initial = registry.load_state(registry.get(model, base_version))
    if run is None:
        compressor = Compressor(
            config.downlink_codec, error_feedback=config.downlink_error_feedback, seed=config.downlink_seed
        )
        return ServerStep(
            build_aggregator(server_lr=config.server_lr),
            RegistryPublisher(registry, model, compressor),
            initial,
            base_id=model,
        )
    compressor = Compressor(
        run.downlink_codec,
        error_feedback=run.downlink_error_feedback,
        seed=derive_seed(run.seed, Stream.DOWNLINK_CODEC),
    )
    return ServerStep.for_run(
        run,
        make_task(run),
        initial,
        base_id=model,
        publisher=RegistryPublisher(registry, model, compressor),
        simulation=False,  # the service's devices are real: its DP noise must not derive from the config
    )


def publisher_of(step: ServerStep) -> RegistryPublisher:
    """``step``'s publisher, as the service's own: every step it runs is built by :func:`server_step_for`,
    which gives it a :class:`RegistryPublisher` (the engine's step knows only the :class:`Publisher` protocol)."""
    publisher = step.publisher
    assert isinstance(publisher, RegistryPublisher), f"a service step publishes through {publisher!r}"
    return publisher


def abort_reason(given: str, refused: str | None) -> str:
    """Why an aborted round ended unpublished, as its history row says: the abort's ``reason``; without one,
    the refusal of its last close or stage (what the operator gave up on), or that an operator aborted it."""
    if given.strip():
        return given
    if refused:
        return f"aborted by the operator after a refusal: {refused}"
    return "aborted by the operator (no reason given)"


def refusal_of(exc: BaseException) -> str:
    """The text of a refused close or stage (an HTTP error's detail, a deltaplane error's message)."""
    return str(getattr(exc, "detail", None) or exc or type(exc).__name__)


@contextmanager
def remembering_refusal(r: Any) -> Iterator[None]:
    """Keep the refusal of a close or stage of round ``r`` (a plain or SecAgg round: its ``refused``) and
    re-raise it: an abort without a reason then says what was given up on."""
    try:
        yield
    except Exception as exc:
        r.refused = refusal_of(exc)
        raise


def check_round_binding(r: RoundState, nonce: str, cohort: str) -> None:
    """An upload names its round's nonce (so a captured upload cannot be replayed into a later round)."""
    if r.record is None:
        return
    if not secrets.compare_digest(nonce.encode(), r.record.nonce.encode()):
        raise Conflict(
            f"upload is not bound to round {r.number}: send the round's nonce (GET /v1/models/{r.model}/round) "
            "as X-Deltaplane-Round-Nonce"
        )
    if withdrawn_among([cohort], r.record.excluded):
        raise Conflict(f"round {r.number} excludes cohort {cohort!r} (consent withdrawn)")


def refuse_withdrawn_round(
    reg: Registry, model: str, base: int, cohorts: Iterable[str], *, what: str, abort: str
) -> None:
    """409 before a round publishes when a cohort withdrew consent while it was open: a cohort whose devices'
    updates are in it, or one the base was built from (the base passed the check when the round opened).

    Either way the version would contain the cohort's data, and nothing can take it out of an aggregate, so
    the round is left unpublished: the operator aborts it (``abort``, the route) and opens a new one, or
    rebuilds. Read inside the close's transaction, a withdrawal cannot land between this check and the
    publication. Plain and SecAgg closes both call it, so both refuse alike.
    """
    withdrawn = reg.withdrawn_cohorts(verify=True)  # a deleted withdrawal is a 409, never a pass
    late = withdrawn_among(cohorts, withdrawn)
    if late:
        raise HTTPException(
            409,
            f"cohort {late[0]!r} withdrew consent after its devices' inputs entered {what}; leave this round "
            f"unpublished (abort it: POST {abort}) and open a new one",
        )
    problems = reg.governance_problems(reg.get(model, base), verify=True) if withdrawn else []
    if problems:
        raise HTTPException(
            409,
            f"{problems[0]}, withdrawn after {what} opened on it; leave this round unpublished (abort it: POST "
            f"{abort}) and rebuild: POST /admin/models/{model}/rebuild",
        )


def _base_norm(base: dict[str, Any]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in base.values() if v.is_floating_point()))


#: the update-norm guard's ratio when the operator sets none (``ServiceConfig.max_update_norm_ratio`` "auto"):
#: an update may reach this many times the base model's norm (at least 1), or, in a federation whose devices
#: add DP noise, the norm an honest noised update reaches (:func:`honest_norm_bound`) if that is larger
DEFAULT_NORM_RATIO = 10.0

#: ``max_update_norm_ratio``: a ratio, None (no guard) or "auto" (:data:`DEFAULT_NORM_RATIO`, widened to the
#: honest bound of the federation's DP noise)
NormRatio = float | Literal["auto"] | None


def guard_bound(base_norm: float, ratio: NormRatio, honest: float = 0.0) -> float | None:
    """The update-norm guard's bound: ``ratio`` × the base model's norm (at least 1); under "auto",
    :data:`DEFAULT_NORM_RATIO` × that, or ``honest`` (what an honest update of the federation's DP noise reaches,
    0 without DP) if larger. An explicit ratio is the operator's: it is not widened (the round opens check it
    admits the honest noise instead: :func:`check_guard_admits_noise`). None: no guard."""
    if ratio is None:
        return None
    if isinstance(ratio, str):  # "auto"
        return max(DEFAULT_NORM_RATIO * max(base_norm, 1.0), honest)
    return ratio * max(base_norm, 1.0)


def check_update_norm(delta: Delta, base: dict[str, Any], ratio: NormRatio, *, honest: float = 0.0) -> None:
    """Refuse updates that are not finite or absurdly large relative to the model they change (the bound:
    :func:`guard_bound`; ``honest`` is the norm an honest update of the federation's DP noise reaches)."""
    norm = float(delta.norm())
    if not math.isfinite(norm):
        raise InvalidUpdate(f"update norm is {norm}; refusing a non-finite update")
    base_norm = _base_norm(base) if ratio is not None else 0.0
    bound = guard_bound(base_norm, ratio, honest)
    if bound is not None and norm > bound:
        if ratio == "auto" and honest > DEFAULT_NORM_RATIO * max(base_norm, 1.0):
            raise InvalidUpdate(
                f"update norm {norm:.4g} exceeds {bound:.4g}, the norm an honest update reaches with this "
                f"federation's DP noise (the base model's norm is {base_norm:.4g}); refused"
            )
        shown = DEFAULT_NORM_RATIO if ratio == "auto" else ratio
        raise InvalidUpdate(
            f"update norm {norm:.4g} exceeds {shown:g}x the base model's norm ({base_norm:.4g}); refused"
        )


#: how far above its mean (σ·√d) the admission checks place the norm of an honest update's noise, in noise stds:
#: the norm of d independent N(0, σ²) values is 1-Lipschitz in them, so it exceeds σ·(√d + t) with probability
#: at most exp(−t²/2) (Gaussian concentration), about 1.5·10⁻⁸ at t = 6. The norm's spread (about σ/√2) does
#: not shrink with d: a bound at its mean plus the clip refused a few percent of honest updates near its edge
NOISE_NORM_SIGMAS = 6.0


def honest_norm_bound(signal: float, noise_std: float, shared: int) -> float:
    """The largest norm an honest noised update (or mean) reaches, except with probability ≤ 1.5·10⁻⁸: a
    signal of norm at most ``signal`` plus independent noise of std ``noise_std`` on each of ``shared`` values
    (triangle inequality, then :data:`NOISE_NORM_SIGMAS`)."""
    return signal + noise_std * (math.sqrt(shared) + NOISE_NORM_SIGMAS)


def check_guard_admits_noise(
    bound_needed: float,
    base: dict[str, Any],
    ratio: NormRatio,
    *,
    what: str,
    unguarded: str,
    fix: str = "",
) -> None:
    """Refuse (ConfigError) to open a round whose honest noised updates can reach ``bound_needed``
    (:func:`honest_norm_bound`) while the update-norm guard (:func:`check_update_norm`: ``ratio`` × the base
    model's norm, at least 1) is below that: the guard would refuse them, after all of the round's work.

    ``what`` says whose noise and what it checks, ``unguarded`` what still bounds updates without the guard,
    ``fix`` another way out than widening the guard (or ""). The default guard ("auto") widens to the honest
    bound by itself (:func:`guard_bound`): only an operator's explicit ratio can be too tight."""
    if not isinstance(ratio, float | int):  # None: no guard; "auto" widens to the honest bound
        return
    base_norm = _base_norm(base)
    floor = max(base_norm, 1.0)
    bound = ratio * floor
    if bound_needed > bound:
        raise ConfigError(
            f"{what} can reach a norm of {bound_needed:.4g}, above the service's update-norm guard of "
            f"{bound:.4g} ({ratio:g}x the base model's norm {base_norm:.4g}), which would refuse it. Restart the "
            f"service with --max-update-norm-ratio {math.floor(bound_needed / floor) + 1} or 0 (no guard; "
            f"{unguarded}){fix}"
        )


def local_dp_honest_bound(run: "RunConfig | None", base: dict[str, Any], local_keys: frozenset[str]) -> float:
    """The norm an honest device's update reaches under local DP (0 without it): clipped to ``clip``, plus
    Gaussian noise of std ``local_dp_noise·clip`` on each of its shared values (:func:`honest_norm_bound`)."""
    if run is None or run.local_dp_noise <= 0:
        return 0.0
    clip = float(run.clip)  # type: ignore[arg-type]  # local DP needs a numeric clip (RunConfig checks)
    return honest_norm_bound(clip, run.local_dp_noise * clip, _shared(base, local_keys))


def _shared(base: dict[str, Any], local_keys: frozenset[str]) -> int:
    return sum(v.numel() for k, v in base.items() if v.is_floating_point() and k not in local_keys)


def check_guard_admits_local_dp(
    run: "RunConfig | None", base: dict[str, Any], local_keys: frozenset[str], ratio: NormRatio
) -> None:
    """Refuse to open a round of a local-DP federation whose noised updates the norm guard would refuse.

    Under local DP each device clips its update to ``clip`` and adds Gaussian noise of std ``z·clip`` per
    coordinate itself, so an honest update's norm is about ``clip·(1 + z·√d)`` (``d`` shared parameters), and
    below ``clip·(1 + z·(√d + 6))`` but with probability 1.5·10⁻⁸ (:func:`local_dp_honest_bound`): far above
    10x the norm of a small model. The default guard widens to it; an explicit ratio below it would refuse
    every update of the round, so the operator must widen or remove it (the federation's ``max_update_norm``,
    if set, still bounds updates).
    """
    if run is None or run.local_dp_noise <= 0 or ratio is None:
        return
    clip = float(run.clip)  # type: ignore[arg-type]  # local DP needs a numeric clip (RunConfig checks)
    check_guard_admits_noise(
        local_dp_honest_bound(run, base, local_keys),
        base,
        ratio,
        what=(
            f"this federation's devices add local DP noise (local_dp_noise={run.local_dp_noise:g}, "
            f"clip={clip:g}, {_shared(base, local_keys)} shared parameters): an honest update"
        ),
        unguarded="the federation's max_update_norm, if set, still bounds each update",
    )


def distributed_dp_honest_bound(
    ddp: "DistributedDP", shared: int, *, contributors: int, ring_step: float
) -> float:
    """The norm the honest noisy mean of ``contributors`` devices of distributed DP reaches: each clips to C and
    adds N(0, σ_d²), then rounds stochastically to the ring's step (variance at most step²/4); the mean divides
    their sum by their number, so each of its ``shared`` values carries noise of std √((σ_d² + step²/4)/m),
    and the mean of clipped updates has norm at most C (:func:`honest_norm_bound`)."""
    clip = float(ddp.clipper.estimator.value)
    std = math.sqrt((ddp.device_noise_std**2 + ring_step**2 / 4) / contributors)
    return honest_norm_bound(clip, std, shared)


def check_guard_admits_distributed_dp(
    ddp: "DistributedDP",
    base: dict[str, Any],
    shared: int,
    ratio: NormRatio,
    *,
    fewest: int,
    ring_step: float,
    group: int,
) -> None:
    """Refuse to open a SecAgg round of a distributed-DP federation whose honest noisy mean the guard would refuse.

    Each device clips to C and adds N(0, σ_d²), σ_d = z·C/√m_min, then rounds its values stochastically to
    the ring's step (unbiased, variance at most step²/4); the close divides the sum of the m survivors by m,
    so each value of the mean carries noise of std √((σ_d² + step²/4)/m), largest for the fewest survivors
    the round can publish: ``fewest`` = max(m_min, SecAgg's threshold) (the server unmasks no fewer). The
    mean of clipped updates has norm at most C; :func:`distributed_dp_honest_bound` adds the noise's. On a
    small model that is above 10x its norm (the docs' fleet file on ``digits``: 77.4 against 57.6), so the
    default guard widens to it at close; an explicit ratio below it would refuse every round at close.
    """
    if not isinstance(ratio, float | int):  # None: no guard; "auto" widens to the honest bound
        return
    clip = float(ddp.clipper.estimator.value)
    sigma = ddp.device_noise_std
    std = math.sqrt((sigma**2 + ring_step**2 / 4) / fewest)
    needed = distributed_dp_honest_bound(ddp, shared, contributors=fewest, ring_step=ring_step)
    # the fewest survivors whose mean would pass: (noise std)² falls as 1/m
    room = ratio * max(_base_norm(base), 1.0) - clip
    enough = (
        math.floor((sigma**2 + ring_step**2 / 4) / (room / (math.sqrt(shared) + NOISE_NORM_SIGMAS)) ** 2) + 1
        if room > 0
        else None
    )
    fix = (
        f", or open the round with a threshold of at least {enough} (the server then unmasks the mean of no fewer "
        "devices, and a mean of more devices carries less noise)"
        if enough is not None and enough <= group
        else ""
    )
    check_guard_admits_noise(
        needed,
        base,
        ratio,
        what=(
            f"this federation's devices add distributed DP noise (dp_noise={ddp.noise_multiplier:g}, "
            f"clip={clip:g}, σ_d={sigma:.4g} per device, calibrated to secagg_min_contributors={ddp.min_contributors}"
            f"): the unmasked mean of the fewest devices this round can publish ({fewest}, the larger of m_min and "
            f"the round's threshold), over {shared} shared parameters, with noise std {std:.4g} per value,"
        ),
        unguarded="the SecAgg decoder still refuses a mean outside the ring's range",
        fix=fix,
    )


def refuse_plaintext_under_secagg(config: "ServiceConfig", model: str, who: str) -> None:
    """409 for a plain round or an individual upload when the federation aggregates through SecAgg.

    Such a federation's devices clip their updates before masking and its chain expects only the unmasked
    sum: a plaintext update would reach the published model unclipped and individually visible. Under distributed
    DP (``dp_noise`` with ``secagg``) the admin may open a plain round all the same: devices still cannot upload
    into it, so it closes with no sum, which is how a round that sampled too few devices for SecAgg publishes
    nothing and spends its ε (as every driver does).
    """
    run = config.federation
    if run is None or not run.secagg or (who == "admin" and run.dp_noise > 0):
        return
    where = (
        f"open a SecAgg round at POST /admin/models/{model}/secagg"
        if who == "admin"
        else f"send your update masked, in the SecAgg round you are invited to (GET /v1/models/{model}/secagg/N)"
    )
    raise HTTPException(
        409,
        "this federation aggregates through SecAgg (secagg: true): it takes no plain rounds and no plaintext "
        f"updates; {where}",
    )


def resume_step(
    config: "ServiceConfig", state: "ServiceState", store: RoundStore, model: str, base: int
) -> ServerStep:
    """The model's server step; a new one (after a restart) continues from the state stored with the last
    published round (:meth:`RoundStore.step_snapshot`), else resumes its DP accountant from the rounds
    already released."""
    step = state.steps.get(model)
    if step is None:
        step = server_step_for(config, state.registry, model, base)
        saved = store.step_snapshot(model)
        if saved is not None:
            try:
                step.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
            except ConfigError as exc:
                raise ConfigError(
                    f"the server state stored for {model!r} (optimizer moments, DP accountant, residuals) was "
                    f"saved under another federation configuration than this service's: {exc}. Start the "
                    "service with the configuration the federation ran with; a changed one cannot continue "
                    "its stored state (start a new federation under another model name instead)"
                ) from None
        else:
            dp = step.aggregator.find(DPFedAvg)
            if isinstance(dp, DPFedAvg) and dp.accountant is not None:
                released = store.released(model)
                dp.accountant.state.steps = released  # ε already spent is never forgotten
                if released:
                    forget_noise_seed(dp)
        state.steps[model] = step
    return step


def forget_noise_seed(dp: DPFedAvg) -> None:
    """Draw ``dp``'s noise (and its adaptive clip's count noise) from the OS CSPRNG from now on.

    A seeded step resumed without its snapshot would restart its generators from the seed and release the
    noise of its first rounds again: the difference of two such releases cancels the noise (and the noise
    itself is then known to whoever saw the first round's inputs). Fresh entropy never repeats."""
    dp.state.generator = None
    est_state = getattr(dp.clipper.estimator, "state", None)
    if est_state is not None and hasattr(est_state, "rng"):
        est_state.rng = None
    log.warning(
        "server step of a DP federation resumed without its stored snapshot: its seeded noise would repeat "
        "earlier rounds' noise, so its noise now comes from the OS CSPRNG (runs are no longer reproducible)"
    )


@contextmanager
def undo_on_failure(step: ServerStep) -> Iterator[None]:
    """Put the server step and its publisher (downlink residual, published versions) back as they were if the
    block raises: a round close that fails in the registry (whose transaction rolls its own writes back) must
    not leave the step a round ahead of the registry."""
    checkpoint = step.checkpoint()
    publisher = publisher_of(step)
    saved = (publisher.compressor.state_dict(), list(publisher.published))
    try:
        yield
    except BaseException:
        step.restore(checkpoint)
        publisher.compressor.load_state_dict(saved[0])
        publisher.published[:] = saved[1]
        raise


def step_bytes(step: ServerStep) -> bytes:
    """The server step's state (:meth:`~deltaplane.engine.ServerStep.state_dict`) as bytes to store."""
    buf = io.BytesIO()
    torch.save(step.state_dict(), buf)
    return buf.getvalue()


def restore_rounds(config: "ServiceConfig", state: "ServiceState", store: RoundStore) -> None:
    """Bring back the open rounds after a restart: their records, and their uploads replayed into the step."""
    for rec in store.open_rounds():
        step = resume_step(config, state, store, rec.model, rec.base_version)
        step.open(rec.number, version=rec.base_version, state=state.base_state(rec.model, rec.base_version))
        r = RoundState(rec.model, rec.number, rec.base_version, record=rec, opened_at=rec.opened_at)
        for delta, weight, device_id in store.restore(rec, step.session, local_keys=step.local_keys):
            if step.receive_delta(device_id, delta, weight):
                r.devices.add(device_id)
                r.examples += weight
        r.cohorts.update(store.cohorts(rec))
        state.rounds[rec.model] = r


# -- schemas ------------------------------------------------------------------------------------------------
class OpenRoundRequest(BaseModel):
    model_config = {"extra": "forbid"}
    base_version: int | None = Field(
        default=None, ge=1, le=2**31 - 1, description="defaults to the training (else production) tag"
    )


class RoundInfo(BaseModel):
    model: str
    round: int
    base_version: int
    uploads: int
    open: bool
    nonce: str = Field(description="send it back as X-Deltaplane-Round-Nonce with each upload")


class UploadAccepted(BaseModel):
    accepted: bool
    round: int
    uploads: int


class CloseRoundResponse(BaseModel):
    model: str
    round: int
    uploads: int
    version: int | None = Field(description="null when the round had no uploads (closed without a version)")
    delta_bytes: int
    full_bytes: int
    #: updates the server step refused while the round was open (NaN/Inf, norm bound...)
    rejected: int = 0
    #: the aggregator chain's measurements: epsilon, clipped_fraction, clip, noise_std, server_step...
    measurements: dict[str, float] = Field(default_factory=dict)
    dp_adjacency: str | None = Field(
        default=None,
        description="the neighbouring relation measurements.epsilon is stated under: 'add/remove' (central DP), "
        "'zero-out' (distributed DP under SecAgg); null without DP noise",
    )


class RoundRecordInfo(BaseModel):
    model: str
    round: int
    base_version: int
    state: str = Field(description="'open', 'closed' or 'aborted'")
    version: int | None = Field(description="the version its close published (null: none, or not closed)")
    uploads: int
    devices: list[str] = Field(
        default_factory=list,
        description="the device ids whose uploads it accepted (their tokens' ids), in arrival order",
    )
    opened_at: float
    closed_at: float | None
    #: the measurements its close answered with (epsilon...), kept with the round: {} if none were recorded
    measurements: dict[str, float] = Field(
        default_factory=dict,
        description="its close's measurements (epsilon, clipped_fraction...): empty while open, for an aborted "
        "round, a close without a version, or a round closed before they were stored",
    )
    reason: str | None = Field(
        default=None,
        description="why an aborted round ended unpublished (at most 500 characters; null: not aborted, or "
        "aborted before reasons were kept with the round)",
    )
    dp_adjacency: str | None = Field(
        default=None,
        description="the neighbouring relation measurements.epsilon is stated under: 'add/remove' (central DP), "
        "'zero-out' (distributed DP under SecAgg), 'unknown' for a round closed before it was stored with "
        "the round; null without an epsilon",
    )


class AbortRoundResponse(BaseModel):
    model: str
    round: int
    uploads: int
    aborted: bool


def round_router(
    config: "ServiceConfig",
    state: "ServiceState",
    *,
    device: Any,
    admin: Any,
    resolve_tag: Callable[[str, str, str], int],
    errors: dict[int, dict[str, Any]],
    rounds_store: RoundStore,
) -> APIRouter:
    """The round endpoints (see the module docstring) over ``state``; ``device``/``admin`` are the app's
    auth dependencies."""
    router = APIRouter()
    reg = state.registry

    def upload_layout(model: str, base_version: int) -> Layout:
        """The layout of a round's uploads (and of its wire session): the base's, less the layers a
        personalized federation's devices keep to themselves (FedPer's head, FedBN's norms)."""
        return Layout.of(state.base_state(model, base_version)).without(state.steps[model].local_keys)

    @router.get(
        "/v1/models/{model}/round", tags=["device"], response_model=RoundInfo, responses={404: errors[404]}
    )
    def round_info(model: ModelName, ident: device) -> RoundInfo:
        r = state.rounds.get(model)
        if r is None:
            raise NotFound(f"no open round for {model!r}")
        return RoundInfo(
            model=model,
            round=r.number,
            base_version=r.base_version,
            uploads=len(r.devices),
            open=True,
            nonce=r.record.nonce if r.record else "",
        )

    @router.get(
        "/v1/models/{model}/session",
        tags=["device"],
        responses={404: errors[404]},
        summary="The wire session of the open round's uploads (fetch once; compress with it)",
    )
    def wire_session(model: ModelName, ident: device) -> dict[str, Any]:
        """The :class:`~deltaplane.codecs.WireSession` (layout, codec, base id, template) the open round's
        compact uploads are framed in: a device fetches it once per model layout and codec, then each of its
        updates carries a few bytes of framing instead of a tensor table (docs/wire-format.md)."""
        r = state.rounds.get(model)
        if r is None:
            raise NotFound(f"no open round for {model!r}")
        session = state.steps[model].sessions.get(upload_layout(model, r.base_version))
        if session is None:
            raise NotFound(f"{model!r} takes self-describing uploads: it has no wire session")
        return session.to_json()

    upload_body = {
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }

    @router.post(
        "/v1/models/{model}/rounds/{round_id}/update",
        tags=["device"],
        status_code=202,
        response_model=UploadAccepted,
        openapi_extra=upload_body,
        responses={k: errors[k] for k in (400, 404, 409, 413, 422)},
    )
    async def upload(
        model: ModelName,
        round_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        request: Request,
        ident: device,
        num_examples: Annotated[float, Query(gt=0, le=MAX_EXAMPLES)] = 1.0,
    ) -> UploadAccepted:
        try:
            check_examples(num_examples, config.max_examples, fix="deltaplane serve --max-examples")
        except InvalidUpdate:
            state.count("rejected.too_many_examples")
            raise
        limit = config.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > 4 * limit):
            state.count("rejected.too_large")
            raise HTTPException(413, f"upload of {declared} bytes exceeds the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():  # enforce the limit while reading: Content-Length can lie
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 4 * limit:
                break
        if size > limit:
            # A moderately oversized body was drained (up to 4x the limit) before answering, so the client
            # reads a clean 413 instead of a connection reset while it is still sending.
            state.count("rejected.too_large")
            raise HTTPException(
                413, f"upload of {declared or 'more than ' + str(limit)} bytes exceeds the {limit}-byte limit"
            )
        payload = b"".join(chunks)
        refuse_plaintext_under_secagg(config, model, "device")
        r = state.rounds.get(model)
        if r is None:
            raise HTTPException(409, f"no open round for {model!r}; wait for the next round")
        if r.number != round_id:
            raise HTTPException(
                409, f"round {round_id} is not open; the open round of {model!r} is {r.number}"
            )
        check_round_binding(r, request.headers.get("x-deltaplane-round-nonce", ""), ident.cohort)
        # a signed-log read that can wait on the registry's write lock: off the event loop (as SecAgg's)
        if withdrawn_among([ident.cohort], await run_in_threadpool(reg.withdrawn_cohorts, verify=True)):
            raise HTTPException(
                403, f"cohort {ident.cohort!r} withdrew consent; its updates are not accepted"
            )
        if not payload:
            raise DecodeError("empty upload; send a wire-format payload made by deltaplane.Compressor")

        def validate() -> Delta:
            # strict against the base's layout *before* decoding: a small payload that claims a huge shape
            # must not make the server allocate it; then finite and of a sane norm. A compact payload
            # decodes in the round's wire session (GET .../session), a self-describing one on its own.
            base = state.base_state(model, r.base_version)
            layout = upload_layout(model, r.base_version)
            session = None
            if is_compact(payload):
                session = state.steps[model].sessions.get(layout)
                if session is None:
                    raise DecodeError(
                        f"{model!r} takes self-describing payloads (no wire session); compress without one"
                    )
            try:
                delta = decompress(
                    payload, expect_base=(model, r.base_version), expect_layout=layout, session=session
                )
            except ShapeMismatch as exc:
                if config.federation is not None:  # the task's tied names are left out of the layout already
                    raise
                raise untied_upload_refusal(exc, payload, base, model) from None
            honest = local_dp_honest_bound(config.federation, base, state.steps[model].local_keys)
            check_update_norm(delta, base, config.max_update_norm_ratio, honest=honest)
            return delta

        delta = await run_in_threadpool(validate)

        def commit() -> int:
            # In a worker thread: the payload's blob is fsynced before the lock, the row under it, and the
            # event loop never waits on the disk. What would be refused anyway is refused before the blob is
            # written, and a blob written for an upload then refused is removed: refused uploads (a device
            # re-sending, a rule refusing it) must not fill the disk.
            with state.lock:
                refused()
            if r.record is None:
                return accept(None)
            digest = rounds_store.store_payload(payload)
            try:
                return accept(digest)
            except BaseException:
                # under the lock, as accept() checks the blob: identical bytes of another upload (another
                # device, another model) stored meanwhile either have their row already, which keeps the
                # blob, or find it gone in accept() and write it again
                with state.lock:
                    rounds_store.discard_payload(digest)
                raise

        def refused() -> None:
            """Under the lock: 409 if the round closed or the device already uploaded to it."""
            if state.rounds.get(model) is not r or r.closing:
                raise HTTPException(409, f"round {round_id} closed while the upload was being checked")
            if ident.device_id in r.devices:
                raise HTTPException(409, f"device {ident.device_id} already uploaded to round {round_id}")

        def accept(digest: str | None) -> int:
            with state.lock:
                refused()  # again: another upload may have got in while the blob was written
                step = state.steps[model]
                # the chain validates first (NaN/Inf, norm bound); only an accepted update is made durable,
                # and a durable write that fails (a replay, a full disk) takes the update back out
                checkpoint = step.checkpoint()
                if not step.receive_delta(ident.device_id, delta, num_examples):
                    refusal = step.last_rejection
                    assert refusal is not None  # receive_delta recorded why it said no
                    raise InvalidUpdate(f"update refused: {refusal.error}")
                if r.record is not None:  # durable before it counts: refuses replays of accepted bytes
                    if digest is not None and not rounds_store.has_payload(digest):
                        # a refused upload of the same bytes discarded the blob after this one stored it
                        rounds_store.store_payload(payload)
                    try:
                        # the upload counts and the devices seen since their last save ride in the row's
                        # transaction (no sync of their own): a crash keeps every accepted upload's count
                        with reg.transaction():
                            rounds_store.add_upload(
                                r.record,
                                device_id=ident.device_id,
                                cohort=ident.cohort,
                                weight=num_examples,
                                payload=payload,
                                stored=True,
                            )
                            saved = state.save_counts({"uploads.accepted": 1})
                    except BaseException:
                        step.restore(checkpoint)
                        raise
                    state.mark_saved(saved)
                r.devices.add(ident.device_id)
                r.cohorts.add(ident.cohort)
                r.examples += num_examples
                state.count("uploads.accepted")
                state.count("uploads.bytes", len(payload))
                return len(r.devices)

        n = await run_in_threadpool(commit)
        return UploadAccepted(accepted=True, round=round_id, uploads=n)

    @router.post(
        "/admin/models/{model}/rounds",
        tags=["admin"],
        dependencies=[admin],
        response_model=RoundInfo,
        responses={k: errors[k] for k in (404, 409)},
    )
    def open_round(model: ModelName, body: OpenRoundRequest) -> RoundInfo:
        base = body.base_version if body.base_version is not None else resolve_tag(model, "training", "")
        art = reg.get(model, base)
        if art.kind != "model":
            raise ConfigError(f"{art.ref} is a delta; a round needs a model version as its base")
        problems = reg.governance_problems(art, verify=True)
        if problems:
            raise HTTPException(409, f"{problems[0]}; rebuild instead: POST /admin/models/{model}/rebuild")
        return start_round(model, base, excluded=())

    def start_round(model: str, base: int, *, excluded: tuple[str, ...]) -> RoundInfo:
        refuse_plaintext_under_secagg(config, model, "admin")
        with state.lock:
            if model in state.rounds:
                raise HTTPException(
                    409, f"round {state.rounds[model].number} of {model!r} is still open; close it first"
                )
            step = resume_step(config, state, rounds_store, model, base)
            check_guard_admits_local_dp(
                config.federation,
                state.base_state(model, base),
                step.local_keys,
                config.max_update_norm_ratio,
            )
            # numbered from the database: never reused after a restart
            rec = rounds_store.open(model, base, excluded=excluded)
            step.open(rec.number, version=base, state=state.base_state(model, base))
            state.rounds[model] = RoundState(model, rec.number, base, record=rec)
        return RoundInfo(
            model=model, round=rec.number, base_version=base, uploads=0, open=True, nonce=rec.nonce
        )

    @router.get(
        "/admin/models/{model}/rounds/{round_id}",
        tags=["admin"],
        dependencies=[admin],
        response_model=RoundRecordInfo,
        responses={404: errors[404]},
    )
    def round_record(
        model: ModelName, round_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)]
    ) -> RoundRecordInfo:
        """A plain round as stored: open, closed (with the version it published, if any) or aborted. What an
        operator whose connection broke reads back to learn whether its open or close went through."""
        rec = rounds_store.record(model, round_id)
        if rec is None:
            raise NotFound(f"no round {round_id} for {model!r}")
        return RoundRecordInfo(**rec)

    @router.get("/admin/rounds/closed", tags=["admin"], dependencies=[admin])
    def closed_rounds(
        model: Annotated[str | None, Query(pattern=NAME, max_length=128)] = None,
        outcome: Annotated[
            Literal["published", "aborted", "lost"] | None,
            Query(
                description="only rounds that ended so (published: closed_rounds; else unpublished_rounds)"
            ),
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=MAX_CLOSED_ROUNDS, description="at most this many rounds in each list")
        ] = MAX_CLOSED_ROUNDS,
    ) -> dict[str, Any]:
        """The last closed rounds, plain and SecAgg, newest first, with the held-out accuracy their devices
        reported (the Fleet page's table), and apart (``unpublished_rounds``, newest first) the last rounds that
        ended without publishing: aborted or lost, with how many devices were invited and took part and why;
        kept in the registry database, so a restart keeps them. ``outcome`` keeps the rounds that ended so (the
        other list is then empty; anything else is refused, 422), ``limit`` the newest of each list."""
        closed = state.closed_snapshot() if outcome in (None, "published") else []
        ended = state.unpublished_snapshot() if outcome != "published" else []
        return {
            "closed_rounds": [c for c in closed if model is None or c["model"] == model][:limit],
            "unpublished_rounds": [
                e for e in ended if (model is None or e["model"] == model) and outcome in (None, e["outcome"])
            ][:limit],
        }

    @router.post(
        "/admin/models/{model}/rounds/{round_id}/close",
        tags=["admin"],
        dependencies=[admin],
        response_model=CloseRoundResponse,
        responses={k: errors[k] for k in (404, 409)},
    )
    def close_round(
        model: ModelName, round_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)]
    ) -> CloseRoundResponse:
        with state.lock:
            r = state.rounds.get(model)
            if r is None or r.number != round_id or r.closing:
                raise HTTPException(409, f"round {round_id} of {model!r} is not open")
            r.closing = True  # uploads are refused from here on; reopened if publishing fails
        step = state.steps[model]
        publisher = publisher_of(step)
        parent = reg.get(model, r.base_version)
        gov = parent.governance
        cohorts = tuple(sorted(set(gov.cohorts) | r.cohorts))
        excluded = set(gov.excluded_cohorts) | set(r.record.excluded if r.record else ())
        publisher.governance = Governance(
            gov.data_sources, cohorts, tuple(sorted(excluded - set(cohorts))), gov.notes
        )
        publisher.lineage = released_lineage(  # under central DP, without the exact example count
            {
                # which numbering `round` is in: plain and SecAgg rounds are numbered each on their own
                "plain_round": r.number,
                "examples": r.examples,
                "round_cohorts": sorted(r.cohorts),
                **({"excluded_cohorts": list(r.record.excluded)} if r.record and r.record.excluded else {}),
            },
            step.dp_adjacency,
        )

        def publish() -> tuple[int | None, Any]:
            """Publish the round's version and store its fleet summary; inside the close's transaction, so
            the round is recorded closed, published and summarised together or not at all."""
            if not r.devices and not isinstance(step.aggregator.find(DPFedAvg), DPFedAvg):
                # an empty round closes without a version
                return None, (None, None, *state.close_summary(model, r.number, "plain", None, 0, {}))
            refuse_withdrawn_round(
                reg,
                model,
                r.base_version,
                r.cohorts,
                what=f"round {r.number}",
                abort=f"/admin/models/{model}/rounds/{r.number}/abort",
            )
            # under central DP a round that sampled nobody still releases its noise (the accountant counts it)
            outcome = step.close()  # PrivacyBudgetExceeded (409), a non-finite aggregate (422): nothing kept
            version = reg.get(model, publisher.published[-1])
            reg.set_tag(model, "training", version.number, action="round", reason=f"round {r.number}")
            summary, saved = state.close_summary(
                model, r.number, "plain", version.number, len(r.devices), outcome.measurements,
                dp_adjacency=step.dp_adjacency,
            )  # fmt: skip
            return version.number, (version, outcome, summary, saved)

        try:
            with undo_on_failure(step):
                version, outcome, summary, saved = (
                    rounds_store.close(
                        r.record,
                        publish,
                        snapshot=lambda: step_bytes(step),
                        measured=lambda result: None if result[1] is None else result[1].measurements,
                        adjacency=step.dp_adjacency,
                    )
                    if r.record is not None
                    else publish()[1]
                )
        except BaseException as exc:
            r.closing, r.refused = False, refusal_of(exc)
            raise
        with state.lock:
            state.rounds.pop(model, None)
        state.remember_closed(summary, saved)
        if version is None:
            return CloseRoundResponse(
                model=model, round=r.number, uploads=0, version=None, delta_bytes=0, full_bytes=0
            )
        return CloseRoundResponse(
            model=model,
            round=r.number,
            uploads=len(r.devices),
            version=version.number,
            delta_bytes=len(outcome.downlink_payload),
            full_bytes=version.size,
            rejected=len(outcome.rejections),
            measurements={k: float(v) for k, v in outcome.measurements.items()},
            dp_adjacency=step.dp_adjacency,
        )

    @router.post(
        "/admin/models/{model}/rounds/{round_id}/abort",
        tags=["admin"],
        dependencies=[admin],
        response_model=AbortRoundResponse,
        responses={k: errors[k] for k in (404, 409)},
    )
    def abort_round(
        model: ModelName,
        round_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)],
        reason: Annotated[str, Query(max_length=MAX_ABORT_REASON)] = "",
    ) -> AbortRoundResponse:
        """Close a round without publishing a version (its uploads are discarded). The round, how many devices
        uploaded to it and why (``reason``; without one, its last refused close) are recorded with the abort,
        in one transaction: the Fleet page's "ended without publishing" table and ``GET /admin/rounds/closed``
        list it, after a restart too."""
        with state.lock:
            r = state.rounds.get(model)
            if r is None or r.number != round_id or r.closing:
                raise HTTPException(409, f"round {round_id} of {model!r} is not open")
            why = abort_reason(reason, r.refused)
            with reg.transaction():
                if r.record is not None:
                    rounds_store.abort(r.record, why)
                ended, saved = state.end_summary(
                    model,
                    round_id,
                    "plain",
                    outcome="aborted",
                    reason=why,
                    invited=None,
                    contributors=len(r.devices),
                )
            del state.rounds[model]
        state.remember_ended(ended, saved)
        return AbortRoundResponse(model=model, round=round_id, uploads=len(r.devices), aborted=True)

    @router.post(
        "/admin/models/{model}/rebuild",
        tags=["admin"],
        dependencies=[admin],
        response_model=RoundInfo,
        responses={k: errors[k] for k in (404, 409)},
    )
    def rebuild(
        model: ModelName, tag: Annotated[str, Query(pattern=NAME, max_length=128)] = "training"
    ) -> RoundInfo:
        """Open a round on the last version (on ``tag``'s lineage) free of withdrawn cohorts, excluding them.

        Devices of withdrawn cohorts are refused in that round; the version it publishes records the
        exclusion (governance ``excluded_cohorts`` and lineage), and later rounds on it inherit it.
        """
        withdrawn = tuple(sorted(reg.withdrawn_cohorts(verify=True)))
        if not withdrawn:
            raise HTTPException(409, "no cohort has withdrawn consent; nothing to rebuild")
        head = (
            resolve_tag(model, tag, "")
            if tag in ("training", "production", "staging")
            else reg.tag(model, tag, verify=True)
        )
        base = reg.last_unaffected(model, head)
        if base is None:
            raise NotFound(
                f"no version of {model} on {tag}'s lineage is free of {list(withdrawn)}; register a new base"
            )
        # the federation's step continues on the rebuilt base (its accountant keeps counting)
        return start_round(model, base.number, excluded=withdrawn)

    return router

"""The client step: what one device does with a round's global model, written once for every driver.

```
train (FedProx option) ─► personalize ─► [attack: simulation only] ─► clip / local DP ─► [DGC] ─► compress | SecAgg
```

Each stage is one small function below, applied in this order by :meth:`ClientStep.finish`; a driver only
decides *where* the step runs (one device after another, stacked, behind HTTP, in a Flower ClientApp) and how
the resulting :class:`Upload` travels. The batched driver trains many devices at once and hands each trained
delta to :meth:`ClientStep.finish`, or, when no stage before the uplink changes an honest device's delta
(:attr:`ClientStep.stacks_uplink`), runs the uplink of the honest ones together on the stack
(:meth:`ClientStep.finish_stacked` → :meth:`ClientStep.uplink_stacked`: DGC's stage and
:func:`~deltaplane.codecs.compress_many`) and each attacker's poisoning and uplink on its own.

The last stage either compresses the delta into a wire payload (the device's own
:class:`~deltaplane.codecs.Compressor`, error feedback included) or, with SecAgg, hands the clipped delta
to the secure-aggregation stage (:attr:`Upload.secure`): that stage, not the server step, turns it into
masked messages (``deltaplane.engine.secure``), so the server step only ever sees decoded deltas or an
unmasked *sum*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltaplane.aggregation import privatize
from deltaplane.aggregation.dp import distributed_noise
from deltaplane.codecs import Compressor, Layout, compress_many, decompress
from deltaplane.codecs.compressor import compress_many_sent
from deltaplane.data.dataset import Dataset
from deltaplane.delta import Delta, StateDict
from deltaplane.engine.attacks import Attack, choose_malicious, parse_attack
from deltaplane.engine.config import RunConfig
from deltaplane.engine.dgc import NormHistory
from deltaplane.engine.federation import Client
from deltaplane.engine.seeding import Stream, numpy_rng, torch_generator
from deltaplane.engine.task import Task
from deltaplane.engine.tied import tied_aliases, untie
from deltaplane.engine.training import local_train
from deltaplane.engine.wire import Sessions
from deltaplane.errors import DeltaplaneError, UnsupportedOption
from deltaplane.personalization import Personalizer, TrainMany

__all__ = ["ClientStep", "Upload", "clip_to", "local_privacy", "personalize", "poison", "require_simulation"]


def require_simulation(config: RunConfig, *, simulation: bool) -> None:
    """Refuse, for devices that are not simulated, the options only a simulation may run on them.

    Raises:
        UnsupportedOption: ``config.attack`` is set and ``simulation`` is False.
    """
    if config.attack and not simulation:
        raise UnsupportedOption(
            f"attack={config.attack!r} runs only on simulated devices; real devices choose their own updates"
        )


@dataclass
class Upload:
    """What one device sends at the end of its client step.

    Exactly one of ``payload`` (a compressed wire payload), ``secure`` (the delta handed to secure
    aggregation, which masks it before anything leaves the device) and ``error`` (the device could not
    produce an update: it is refused like any bad one) is set.
    """

    cid: int
    num_samples: int
    payload: bytes | None = None
    secure: Delta | None = None
    error: DeltaplaneError | None = None


def _upload(client: Client, payload: bytes | DeltaplaneError) -> Upload:
    """A device's upload of a payload, or of the error that stopped it (refused like any bad update)."""
    if isinstance(payload, DeltaplaneError):
        return Upload(client.cid, client.num_samples, error=payload)
    return Upload(client.cid, client.num_samples, payload=payload)


# -- the stages, in order -----------------------------------------------------------------------------------
def personalize(
    personalizer: Personalizer, client: Client, delta: Delta, origin: StateDict, model: nn.Module
) -> Delta:
    """Keep the device's local layers (FedPer's head, FedBN's norms) on the device; return what is shared."""
    personalizer.keep_local(delta.apply(origin), client.personal, model)
    return personalizer.shared(delta, model)


def poison(attack: Attack, delta: Delta, generator: torch.Generator) -> Delta:
    """A malicious device's update (simulation only: a real device's behaviour is not ours to choose)."""
    return attack.poison_update(delta, generator)


def local_privacy(
    delta: Delta, *, clip: float, noise_multiplier: float, generator: torch.Generator | None
) -> Delta:
    """Local DP: the device clips its update to ``clip`` and adds Gaussian noise ``z·clip`` itself (from the OS
    CSPRNG when ``generator`` is None, so the server cannot reproduce it)."""
    return privatize(delta, clip=clip, noise_multiplier=noise_multiplier, generator=generator)


def clip_to(delta: Delta, bound: float) -> Delta:
    """Scale ``delta`` down to L2 norm ``bound`` if it is longer (the device clips before SecAgg masks it)."""
    norm = delta.norm()
    return delta * (bound / norm) if norm > bound else delta


class ClientStep:
    """The device side of a round, configured once per run (see the module docstring for the stages).

    Args:
        config: the run's options (local training, codec, clip, local DP, SecAgg, attack, personalization).
        task: the model and data; its loss drives local training.
        base_id: the model lineage every payload header names.
        simulation: whether the driver simulates its devices (an attack may only run in a simulation).
    """

    def __init__(self, config: RunConfig, task: Task, *, base_id: str, simulation: bool = True) -> None:
        self.config = config
        #: local DP noise from the run's seed (simulation) or from the OS CSPRNG (a real device)
        self.seeded_dp_noise = config.seeded_dp_noise(simulation=simulation)
        self.task = task
        self.base_id = base_id
        self.personalizer: Personalizer = config.make_personalizer()
        attack, fraction = parse_attack(config.attack) if config.attack else (Attack(), 0.0)
        require_simulation(config, simulation=simulation)
        self.attack = attack.fit(task)  # one that cannot poison this task's data is refused here
        self.dgc = config.make_dgc()
        # refuses a fraction that gives no attacker (on every driver: each builds its devices' step here)
        self.malicious = choose_malicious(
            config.clients, fraction, numpy_rng(config.seed, Stream.ATTACK), spec=config.attack
        )
        #: devices that released a locally privatized update, and in how many rounds (local ε)
        self.participations: dict[int, int] = {}
        self._local_keys: frozenset[str] | None = None
        self._tied: dict[str, str] | None = None
        self._attack_streams: dict[int, torch.Generator] = {}
        #: the uplink's wire sessions (compact frames unless ``config.wire`` is self-describing)
        self.sessions = Sessions.for_config(config, base_id)

    def local_keys(self, model: nn.Module) -> frozenset[str]:
        """State-dict names the personalizer keeps on the device (FedBN on a model without norms raises)."""
        if self._local_keys is None:
            self._local_keys = self.personalizer.local_keys(model)
        return self._local_keys

    def tied(self, model: nn.Module) -> dict[str, str]:
        """``{alias: kept}`` of the model's tied parameters (:func:`~deltaplane.engine.tied.tied_aliases`): the
        aliases are left out of every upload, so the update holds a tied parameter once."""
        if self._tied is None:
            self._tied = tied_aliases(model)
        return self._tied

    def left_out(self, model: nn.Module) -> frozenset[str]:
        """State-dict names an upload leaves out: :meth:`local_keys` and the aliases of :meth:`tied` (the server
        step's ``local_keys`` holds the same names)."""
        return self.local_keys(model) | frozenset(self.tied(model))

    @property
    def stackable(self) -> bool:
        """Whether every stage after training leaves every device's delta as it is (no attacker either), so
        that a round's updates can be compressed together on the stack (:func:`~deltaplane.codecs.compress_many`)."""
        return self.stacks_uplink and not self.malicious and not self.dgc.active

    @property
    def stacks_uplink(self) -> bool:
        """Whether a round's honest devices' trained deltas can go through stage 5 together
        (:meth:`uplink_stacked`, as :meth:`finish_stacked` runs them): no local DP or SecAgg changes one
        device's delta on its own, and personalization keeps no layer on the device (α-mix and Ditto share
        the whole delta and adapt after the round; FedPer's and FedBN's devices also train from their own
        weights, which the batched trainer does not stack). A malicious device's delta is poisoned on its
        own: :meth:`finish_stacked` takes those rows out. DGC may be on: its clip, momentum correction,
        warm-up codec and masking run on the stack too."""
        c = self.config
        return not (c.local_dp_noise > 0 or c.secagg or self._keeps_layers())

    def _keeps_layers(self) -> bool:
        """Whether the personalizer keeps some layers on the device (FedPer, FedBN): stage 2 then changes each
        delta and stores the device's own layers."""
        if self.personalizer.name == "none":
            return False
        if self._local_keys is None:  # the names depend on the architecture only, not on the weights
            self.local_keys(self.task.build_model(0))
        return bool(self._local_keys)

    def honest_rows(self, clients: list[Client]) -> list[int]:
        """The positions in ``clients`` of the devices that run the client step as it is (not malicious)."""
        return [i for i, c in enumerate(clients) if c.cid not in self.malicious]

    def finish_stacked(
        self,
        clients: list[Client],
        stacked: dict[str, torch.Tensor],
        *,
        model: nn.Module,
        global_state: StateDict,
        rnd: int,
        version: int,
    ) -> list[Upload]:
        """Stages 2–5 (:meth:`finish`) of a round's devices, row ``i`` of ``stacked`` (``{name: (C, *shape)}``)
        being ``clients[i]``'s trained delta: the same uploads, in the same order (the server's float sums
        and some robust rules depend on it), payloads and device states as ``[finish(c, row i) ...]``.

        With :attr:`stacks_uplink`, the honest devices' rows go through :meth:`uplink_stacked` together (for
        them stages 2–4 leave the delta as it is) and each malicious device's row through :meth:`finish`
        (its poisoning, with its own generator, then its uplink); otherwise every device through
        :meth:`finish`, one by one.
        """

        def row(i: int) -> Delta:
            return Delta({k: t[i] for k, t in stacked.items()})

        def one(i: int) -> Upload:
            return self.finish(
                clients[i], row(i), model=model, global_state=global_state, rnd=rnd, version=version
            )

        if not self.stacks_uplink:
            return [one(i) for i in range(len(clients))]
        honest = self.honest_rows(clients)
        if len(honest) == len(clients):
            return self.uplink_stacked(clients, stacked, version=version, rnd=rnd)
        uploads: dict[int, Upload] = {}
        if honest:
            index = torch.tensor(honest)
            rows = {k: t.index_select(0, index) for k, t in stacked.items()}
            together = self.uplink_stacked([clients[i] for i in honest], rows, version=version, rnd=rnd)
            uploads = dict(zip(honest, together, strict=True))
        return [uploads[i] if i in uploads else one(i) for i in range(len(clients))]

    def compress_stacked(
        self, compressors: list[Compressor], stacked: dict[str, torch.Tensor], *, version: int
    ) -> list[bytes | DeltaplaneError]:
        """Stage 5 of a :attr:`stackable` round's devices at once: row ``i`` of the deltas ``stacked``
        (``{name: (C, *shape)}``) compressed by ``compressors[i]`` for global version ``version``, in the
        session of their layout (:func:`~deltaplane.codecs.compress_many`: the same bytes and compressor
        states as one by one); a device whose compression fails gets its error, to be refused like any bad
        update."""
        return compress_many(
            compressors,
            stacked,
            base_id=self.base_id,
            base_version=version,
            return_exceptions=True,
            session=self.sessions.get(Layout.of({k: v[0] for k, v in stacked.items()})),
        )

    def uplink_stacked(
        self, clients: list[Client], stacked: dict[str, torch.Tensor], *, version: int, rnd: int = 1
    ) -> list[Upload]:
        """Stage 5 (:meth:`uplink`) of a :attr:`stacks_uplink` round's devices at once: row ``i`` of
        ``stacked`` (``{name: (C, *shape)}``) is ``clients[i]``'s trained delta.

        The same payloads, compressor states (residual, generator, codec) and DGC velocities as
        ``[uplink(c, row i) ...]``: local clipping scales a row by ``clip / norm`` with the norm taken as
        :meth:`~deltaplane.delta.Delta.norm` takes it (row by row), the velocity ``u = m·v + Δ`` is one
        multiply-add on the stack (a device without a velocity sends its delta as it is), every compressor
        takes the round's (warm-up) codec, :func:`~deltaplane.codecs.compressor.compress_many_sent`
        compresses the rows (a warm-up round's payloads self-describing, as :meth:`uplink` makes them),
        and momentum masking zeroes the velocity where the decoded payloads carry a value, all rows at
        once. A device whose compression (or, for masking, decoding) fails gets its error and keeps its
        velocity, as in :meth:`uplink`.
        """
        dgc = self.dgc
        compressors = [c.compressor for c in clients]
        if not dgc.active:
            payloads = self.compress_stacked(compressors, stacked, version=version)
            return [_upload(c, p) for c, p in zip(clients, payloads, strict=True)]
        n = len(clients)
        velocities = [c.velocity for c in clients] if dgc.momentum else []
        if not self._dgc_stacks(stacked, velocities, n):
            return [
                self.uplink(c, Delta({k: t[i] for k, t in stacked.items()}), version=version, rnd=rnd)
                for i, c in enumerate(clients)
            ]
        x = stacked
        norms: list[NormHistory | None] = [None] * n
        if dgc.clipping:
            # the norm of each row as Delta.norm takes it (its own float64 sum per tensor): a reduction over
            # the stack might sum in another order
            scales = []
            for i, client in enumerate(clients):
                scale, norms[i] = dgc.clip_scale(
                    Delta({k: t[i] for k, t in stacked.items()}).norm(), client.norms
                )
                scales.append(scale)
            clipped = [(i, scale) for i, scale in enumerate(scales) if scale is not None]
            if clipped:
                x = {k: t.clone() for k, t in stacked.items()}
                for i, scale in clipped:
                    for k, t in x.items():
                        t[i] = stacked[k][i] * scale  # Delta.__mul__: each float tensor times the scalar
        u = x
        if dgc.momentum:
            held = {i: v for i, v in enumerate(velocities) if v is not None}
            carried = list(held)
            if carried:
                u = {}
                for k, t in x.items():
                    moved = torch.stack([held[i][k] for i in carried]) * dgc.momentum
                    if len(carried) == n:
                        u[k] = moved + t
                    else:  # a device without a velocity sends its delta untouched (as DGC.prepare does)
                        rows = torch.tensor(carried)
                        u[k] = t.clone()
                        u[k][rows] = moved + t[rows]
        spec = dgc.codec_for(self.config.codec, rnd)
        for comp in compressors:
            comp.use_codec(spec)
        # a warm-up round's codec is not the session's: its payloads describe themselves (as in uplink)
        session = None if dgc.warming(rnd) else self.sessions.get(Layout.of({k: t[0] for k, t in u.items()}))
        payloads, sent = compress_many_sent(
            compressors,
            u,
            base_id=self.base_id,
            base_version=version,
            return_exceptions=True,
            session=session,
            want_sent=dgc.masking,
        )
        if dgc.relative_clip is not None:  # a device whose compression failed keeps its history, as in uplink
            for client, payload, history in zip(clients, payloads, norms, strict=True):
                if not isinstance(payload, DeltaplaneError):
                    client.norms = history
        if not dgc.momentum:
            return [_upload(c, p) for c, p in zip(clients, payloads, strict=True)]
        kept = u
        if dgc.masking and sent is not None:
            kept = {k: torch.where(sent[k] != 0, torch.zeros_like(t), t) for k, t in u.items()}
        uploads = []
        for i, (client, payload) in enumerate(zip(clients, payloads, strict=True)):
            if isinstance(payload, DeltaplaneError):  # compression failed: the velocity stays as it was
                uploads.append(_upload(client, payload))
                continue
            row = Delta({k: t[i].clone() for k, t in kept.items()})  # its own tensors, not views of the stack
            if dgc.masking and sent is None:  # compressed one by one: decode this payload as uplink does
                try:
                    decoded = decompress(
                        payload, expect_base=(self.base_id, version), expect_layout=row, session=session
                    )
                except DeltaplaneError as exc:
                    uploads.append(_upload(client, exc))
                    continue
                row = dgc.settle(row, decoded)
            client.velocity = row
            uploads.append(_upload(client, payload))
        return uploads

    @staticmethod
    def _dgc_stacks(stacked: dict[str, torch.Tensor], velocities: list[Delta | None], n: int) -> bool:
        """Whether DGC's stage can run on this stack: float tensors only (Delta's arithmetic leaves other
        kinds alone) and every velocity laid out like the rows, dtypes included (a velocity in another
        dtype would promote the sum row by row)."""
        if not n or not all(t.is_floating_point() for t in stacked.values()):
            return False
        for v in velocities:
            if v is None:
                continue
            if v.keys() != stacked.keys():
                return False
            if any(v[k].shape != t.shape[1:] or v[k].dtype != t.dtype for k, t in stacked.items()):
                return False
        return True

    def origin(self, client: Client, global_state: StateDict, model: nn.Module) -> StateDict:
        """The state the device trains from: the global model with its local layers, if any."""
        if self.local_keys(model):
            return self.personalizer.start_state(global_state, client.personal)
        return global_state

    def training_data(self, client: Client, rnd: int) -> Dataset:
        """The data the device trains on this round: its own, poisoned for a malicious device (the attack's
        generator is kept for :meth:`transform`, so a batched driver poisons exactly as the sequential one)."""
        if client.cid not in self.malicious:
            return client.train
        g = torch_generator(self.config.seed, Stream.ATTACK, rnd, client.cid)
        attack = self.attack.for_attacker(sorted(self.malicious).index(client.cid))
        data = Dataset(*attack.poison_data(client.train.x, client.train.y, g))
        self._attack_streams[client.cid] = g
        return data

    def train(self, client: Client, model: nn.Module, global_state: StateDict, rnd: int) -> Delta:
        """Stage 1: local SGD (FedProx with ``prox_mu``), on poisoned data for a malicious device."""
        c = self.config
        return local_train(
            model,
            self.origin(client, global_state, model),
            self.training_data(client, rnd),
            torch_generator(c.seed, Stream.LOCAL_TRAINING, rnd, client.cid),
            epochs=c.local_epochs,
            batch_size=c.batch_size,
            lr=c.client_lr(rnd),
            momentum=c.momentum,
            prox_mu=c.prox_mu,
            loss=self.task.loss,
        )

    def transform(
        self, client: Client, delta: Delta, *, model: nn.Module, global_state: StateDict, rnd: int
    ) -> Delta:
        """Stages 2–4 on a trained ``delta``: personalize, untie tied weights, attack (simulation only), clip /
        local DP."""
        c = self.config
        if self.local_keys(model):
            delta = personalize(
                self.personalizer, client, delta, self.origin(client, global_state, model), model
            )
        # before the clip and DP: the norm and the noise count a tied parameter once (engine.tied)
        delta = untie(delta, self.tied(model))
        if client.cid in self.malicious:
            # the attack's generator continues where data poisoning left it: one stream per device and round
            g = self._attack_streams.pop(client.cid, None)
            delta = poison(self.attack, delta, g or torch_generator(c.seed, Stream.ATTACK, rnd, client.cid))
        if c.local_dp_noise > 0:
            delta = local_privacy(
                delta,
                clip=c.numeric_clip(),  # local DP has a numeric clip (RunConfig checks)
                noise_multiplier=c.local_dp_noise,
                generator=(
                    torch_generator(c.seed, Stream.LOCAL_DP, rnd, client.cid)
                    if self.seeded_dp_noise
                    else None
                ),
            )
            self.participations[client.cid] = self.participations.get(client.cid, 0) + 1
        if c.secagg and c.clip is not None:
            # not clip_value: RunConfig refuses 'adaptive' with secagg, and float(str) types where it would not
            delta = clip_to(delta, float(c.clip))
        return delta

    def uplink(self, client: Client, delta: Delta, *, version: int, rnd: int = 1) -> Upload:
        """Stage 5: [DGC: local clip, momentum correction, warm-up density], compress with the device's own
        compressor (error feedback), [DGC: momentum factor masking], or hand to SecAgg."""
        dgc = self.dgc
        try:
            velocity = None
            if dgc.active:
                delta, velocity, norms = dgc.prepare(
                    client.compressor,
                    delta,
                    client.velocity,
                    spec=self.config.codec,
                    rnd=rnd,
                    norms=client.norms,
                )
            # a warm-up round's codec is not the session's: its payload describes itself (the server accepts both)
            session = None if dgc.warming(rnd) else self.sessions.get(Layout.of(delta))
            payload = client.upload(delta, base_id=self.base_id, base_version=version, session=session)
            sent = None
            if self.config.secagg or dgc.masking:
                # what the codec sent: the device masks it for SecAgg (its error feedback keeps the rest)
                sent = decompress(
                    payload, expect_base=(self.base_id, version), expect_layout=delta, session=session
                )
            if velocity is not None:
                client.velocity = dgc.settle(velocity, sent)
            if dgc.relative_clip is not None:
                client.norms = norms
            if self.config.secagg:
                assert sent is not None  # decompressed above whenever secagg is on
                return Upload(
                    client.cid, client.num_samples, secure=self.distributed_privacy(client.cid, sent, rnd)
                )
            if client.cid in self.malicious and self.attack.forges_frames:
                payload = self.attack.forge(payload, session)  # a protocol-level attacker: its own bytes
        except DeltaplaneError as exc:
            return Upload(client.cid, client.num_samples, error=exc)
        return Upload(client.cid, client.num_samples, payload=payload)

    def distributed_privacy(self, cid: int, sent: Delta, rnd: int) -> Delta:
        """Distributed DP's device share (``dp_noise`` with SecAgg): what the codec sent, clipped to ``clip`` and
        noised with σ_d = z·clip/√m_min (:meth:`RunConfig.device_noise_std`) before SecAgg encodes it into
        the ring (its rounding and range clip act per device, before the sum: ``secagg_range`` ≥ clip + 6σ_d,
        which RunConfig enforces, keeps the clip from binding; docs/aggregation.md). The noise comes from the
        OS CSPRNG on a real device, from the run's seed in a simulation (device ``cid``'s stream of round ``rnd``). Without
        distributed DP, ``sent`` as it is. Every driver calls it: in process and over HTTP through
        :meth:`uplink`, on Flower from :func:`~deltaplane.flower.secagg.secagg_mod` on the node."""
        c = self.config
        if not (c.secagg and c.dp_noise > 0):
            return sent
        g = torch_generator(c.seed, Stream.DISTRIBUTED_DP, rnd, cid) if self.seeded_dp_noise else None
        # distributed DP has a numeric clip (RunConfig checks)
        return distributed_noise(sent, clip=c.numeric_clip(), std=c.device_noise_std(), generator=g)

    def finish(
        self,
        client: Client,
        delta: Delta,
        *,
        model: nn.Module,
        global_state: StateDict,
        rnd: int,
        version: int,
    ) -> Upload:
        """Stages 2–5 on a trained ``delta``: :meth:`transform`, then :meth:`uplink`."""
        delta = self.transform(client, delta, model=model, global_state=global_state, rnd=rnd)
        return self.uplink(client, delta, version=version, rnd=rnd)

    def run(
        self, client: Client, model: nn.Module, global_state: StateDict, rnd: int, version: int
    ) -> Upload:
        """The whole client step for one device: :meth:`train`, then :meth:`finish`."""
        delta = self.train(client, model, global_state, rnd)
        return self.finish(client, delta, model=model, global_state=global_state, rnd=rnd, version=version)

    def after_round(
        self,
        clients: list[Client],
        model: nn.Module,
        global_state: StateDict,
        rnd: int,
        *,
        train_many: TrainMany | None = None,
    ) -> None:
        """Every device that received the new global model adapts its personal state (α-mix, Ditto).

        Each device's training draws from its own stream ``(seed, PERSONALIZATION, rnd, cid)``; with
        ``train_many`` (the batched engine's ``BatchedTrainer.train_from``) all of them train as one stacked
        computation, with the same result up to float rounding."""
        if self.personalizer.name == "none":
            return
        self.personalizer.personalize_many(
            model,
            global_state,
            [c.personal for c in clients],
            [c.train for c in clients],
            [c.holdout for c in clients],
            generators=[
                torch_generator(self.config.seed, Stream.PERSONALIZATION, rnd, c.cid) for c in clients
            ],
            train_many=train_many,
        )

    def personal_state(self, client: Client, global_state: StateDict) -> StateDict:
        """The model the device uses after a round (the global one without personalization)."""
        return self.personalizer.personal_state(global_state, client.personal)

"""The service's SecAgg rounds under random sequences of HTTP requests, against a plain-Python model.

Hypothesis drives opening a SecAgg round (the complete graph, or SecAgg+ neighbourhoods; weighted or not), each
invited device's four stage messages (advertise keys, share keys, masked input, unmasking) in any order across
devices, with any device falling silent at any stage, the operator's ``advance``/``close``/``abort``, messages
replayed, sent to the wrong stage's endpoint, signed as another device, sent by a device not invited or to a
finished or lost round, and restarts of the service over the same registry. After every step the service must
agree with the model written here (not with the protocol's own objects):

* a refused request is 4xx (409 for an order or a finished round, 400/413 for another stage's message, 403 for
  a stranger) and changes nothing: the round's stage, who advertised, shared, uploaded and answered;
* a stage closes iff at least ``threshold`` devices spoke in it (422 naming the threshold otherwise, and the stage
  stays open); the survivors are exactly the devices whose masked input was accepted before unmasking;
* a close succeeds iff every survivor's self-mask and every dropped device's mask key has ``threshold`` answering
  holders of its shares (their neighbourhood and, for its own self-mask, the survivor itself); otherwise 422 and
  nothing is published (the round stays closable);
* a published version is the base plus the example-weighted mean (unweighted: the plain mean) of the survivors'
  plaintext updates, computed here from those updates, within the ring's documented rounding (docs/aggregation.md:
  at most one step ``2·clip_range/(2^bits−1)`` per device, scaled by ``weight_scale/Σw``);
* round numbers never repeat, restarts included; a round open at a restart is ``lost`` and refuses everything;
* no request body the service received and nothing it holds carries a device's plaintext codes or update
  (:class:`tests.conftest.PlaintextWatch`);
* consent: each round's devices belong to two cohorts, and the operator may withdraw any cohort at any time. A
  device of a withdrawn cohort is refused (403) at every request to an open round and changes nothing (to the
  protocol it has dropped out); a round whose sum holds a withdrawn cohort's input is never published (409 at
  close, after the unmasking answers are counted); a version whose lineage holds a withdrawn cohort is named in
  the withdrawal's answer, and no round opens on it (409), so the operator opens the next one on the newest
  version of the training lineage free of withdrawn cohorts;
* a plain round may be opened beside (it survives restarts, as plain rounds do) and closed or aborted: while
  it is open a SecAgg close is refused (409) and changes nothing, and a second plain round is refused.

CI runs a few short runs; ``DP_STATEFUL_EXAMPLES=200`` searches longer. Checked against planted bugs (not in the
source): a masked input accepted twice, an unmasking that leaves one dropped device's pairwise masks in, a
withdrawn cohort's device still taken in (found by CI's 5 runs), and a close that publishes a sum holding a
withdrawn cohort's input (found in 150 runs: about 4% of runs withdraw a cohort after its input entered the sum).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from tests.conftest import PlaintextWatch, stateful_settings

from deltaplane.aggregation.secagg import RingEncoding, SecAggError, neighbours
from deltaplane.delta import Delta
from deltaplane.serve import AdminClient, ServiceError, create_app
from deltaplane.serve.secagg_client import SecAggDevice

from .conftest import ADMIN, Service, record_bodies

ADVERTISE, SHARE, MASKED, UNMASK = "advertise keys", "share keys", "masked input", "unmasking"
DONE = (
    "done"  # unmasked, and the close refused after it (consent, a plain round open): a close may be retried
)
ENDPOINTS = ("keys", "shares", "masked", "unmask")
STAGE_OF = dict(
    zip(ENDPOINTS, (ADVERTISE, SHARE, MASKED, UNMASK), strict=True)
)  # the stage each message is for
MAX_EXAMPLES = 40  # a weighted 16-bit ring carries every count the service admits
CLIP_RANGE = 0.5
WEIGHT_SCALE = 20.0


OPEN = dict(
    plus=st.booleans(),
    n=st.integers(3, 6),
    weighted=st.booleans(),
    bits=st.sampled_from([8, 16]),
    extra_threshold=st.sampled_from([0, 0, 0, 1]),
)


@dataclass(repr=False)
class Round:
    """The model of one SecAgg round: its public parameters, each device's plaintext and what the server took."""

    number: int
    base: int
    names: list[str]
    threshold: int
    graph: dict[int, frozenset[int]]
    bits: int
    weighted: bool
    deltas: list[dict[str, torch.Tensor]]
    weights: list[int]
    devices: list[SecAggDevice] = field(repr=False)
    stage: str = ADVERTISE
    advertised: set[int] = field(default_factory=set)
    shared: set[int] = field(default_factory=set)
    uploaded: set[int] = field(default_factory=set)
    responded: set[int] = field(default_factory=set)
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()
    outcome: str | None = None  # "published", "aborted", "lost"
    next: list[int] = field(default_factory=list)  # each device's next stage (0: advertise ... 4: done)
    last: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # each device's last accepted message
    cohorts: list[str] = field(default_factory=list)  # each device's cohort

    def __repr__(self) -> str:  # falsifying examples print it: keep them short
        return f"Round({self.number}, {len(self.names)} devices, threshold {self.threshold}, {self.stage})"

    def inbox(self, u: int) -> set[int]:
        """Whose shares reach ``u``: its neighbours that shared (to everyone in the roster, ``u`` included)."""
        return self.graph[u] & self.shared

    def stuck(self) -> bool:
        """Too few devices spoke at this stage and none can still speak at it (they spoke, gave up or came too
        late): the round can never advance, or close."""
        if self.stage in (UNMASK, DONE) and self.holds_withdrawn(self.survivors):
            return True  # never published: the operator can only abort it
        if self.stage == DONE:
            return False  # unmasked: the close can be retried
        i = (ADVERTISE, SHARE, MASKED, UNMASK).index(self.stage)
        if any(k == i for k in self.next):
            return False
        if self.stage == UNMASK:
            return not self.recoverable()
        return len((self.advertised, self.shared, self.uploaded)[i]) < self.threshold

    withdrawn: set[str] = field(default_factory=set)  # the machine's withdrawn cohorts (shared, not copied)

    def cut_off(self, u: int) -> bool:
        """Device ``u``'s cohort withdrew consent: the service refuses it everything in this round."""
        return self.cohorts[u] in self.withdrawn

    def holds_withdrawn(self, devices: tuple[int, ...]) -> bool:
        return any(self.cut_off(u) for u in devices)

    def recoverable(self) -> bool:
        """Every survivor's self-mask seed and every dropped device's mask key has ``threshold`` holders that
        answered: a holder of ``v``'s share is a neighbour that received it, or ``v`` itself (its own share)."""
        t = self.threshold
        for v in self.survivors:
            if sum(1 for r in self.responded if r == v or v in self.inbox(r)) < t:
                return False
        return all(sum(1 for r in self.responded if v in self.inbox(r)) >= t for v in self.dropped)


class SecAggMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        self.svc = Service(
            Path(self._tmp.name) / "home", downlink_codec="identity", max_examples=MAX_EXAMPLES
        )
        self.watch = PlaintextWatch()
        self._wire()
        self.rounds: list[Round] = []  # every round the service gave out, in order
        self.open: Round | None = None
        self.base = 1
        self.versions = 1
        self.seed = 0
        # every message the service accepted: (round, client id, endpoint, body), for replays
        self.history: list[tuple[Round, int, str, bytes]] = []
        self.cohort_of: dict[str, str] = {}  # device name -> its cohort (its tokens carry it)
        self.withdrawn: set[str] = set()
        # every model version: its parent and the cohorts its lineage holds (version 1: registered, none)
        self.parent: dict[int, int | None] = {1: None}
        self.holds: dict[int, set[str]] = {1: set()}
        self.plain: int | None = None  # the open plain round's number

    # -- plumbing ---------------------------------------------------------------------------------------
    def _wire(self) -> None:
        """Route every request through a recorder of the bodies the service receives."""
        recorder, bodies = record_bodies(self.svc.app)
        self.bodies_of_app = bodies
        self.svc.http = TestClient(recorder, raise_server_exceptions=True)
        self.svc.admin = AdminClient("http://testserver", ADMIN, client=self.svc.http)
        self.clients: dict[str, Any] = {}  # device name -> its DeviceClient on the current process

    def client(self, name: str):
        if name not in self.clients:
            self.clients[name] = self.svc.device(name, self.cohort_of.get(name, "default"))
        return self.clients[name]

    def teardown(self) -> None:
        self.svc.reg.close()
        self._tmp.cleanup()

    def refused(self, call, statuses: tuple[int, ...], match: str | None = None) -> ServiceError:
        with pytest.raises(ServiceError) as e:
            call()
        assert e.value.status in statuses, (e.value.status, e.value.detail, statuses)
        if match is not None:
            assert match in e.value.detail, (match, e.value.detail)
        return e.value

    def path(self, r: Round, what: str = "") -> str:
        return f"/v1/models/cnn/secagg/{r.number}" + (f"/{what}" if what else "")

    def post(self, r: Round, u: int, what: str, body: bytes, *, as_name: str | None = None) -> None:
        self.client(as_name or r.names[u]).request("POST", self.path(r, what), content=body)

    def get(self, r: Round, u: int, what: str) -> bytes:
        return self.client(r.names[u]).request("GET", self.path(r, what)).content

    def unaffected(self, version: int) -> int:
        """The newest version on ``version``'s lineage whose cohorts hold none that withdrew (version 1 holds
        none)."""
        v: int | None = version
        while v is not None and self.holds[v] & self.withdrawn:
            v = self.parent[v]
        assert v is not None
        return v

    # -- rules ------------------------------------------------------------------------------------------
    @initialize(**OPEN, governance=st.booleans())
    def first_round(self, plus, n, weighted, bits, extra_threshold, governance) -> None:
        # half the runs also withdraw cohorts and open plain rounds beside (the other half keep the protocol's
        # own coverage: those steps cut devices off and block closes, so fewer rounds publish)
        self.extra = ["withdraw", "plain"] if governance else []
        self.open_round(plus, n, weighted, bits, extra_threshold)

    def open_round(self, plus, n, weighted, bits, extra_threshold) -> None:
        """Open a SecAgg round: the complete graph of 3-6 devices, or SecAgg+ over 8 (degree 6); weighted by
        example counts or not; 8- or 16-bit codes; the least threshold devices accept, or one more."""
        if plus:  # SecAgg+: 8 devices, degree 6 (neighbourhoods of 7, the least devices accept for 8)
            n, degree = 8, 6
            group = 7
        else:
            degree, group = None, n
        threshold = min(group, 2 * group // 3 + 1 + extra_threshold)
        names = [f"r{len(self.rounds)}-d{i}" for i in range(n)]
        cohorts = [f"r{len(self.rounds)}-c{i % 2}" for i in range(n)]
        for d, c in zip(names, cohorts, strict=True):
            self.cohort_of[d] = c
            self.client(d)
        params = dict(
            bits=bits,
            clip_range=CLIP_RANGE,
            weight_scale=WEIGHT_SCALE if weighted else 0,
            threshold=threshold,
            neighbours=degree,
        )
        base = self.base
        if self.holds[base] & self.withdrawn:  # the training head holds a withdrawn cohort: no round on it
            event("open refused: withdrawn cohort in the base")
            self.refused(
                lambda: self.svc.admin.open_secagg("cnn", names, **params), (409,), "withdrawn cohort"
            )
            base = self.unaffected(base)
            opened = self.svc.admin.open_secagg("cnn", names, base_version=base, **params)
        else:
            opened = self.svc.admin.open_secagg("cnn", names, **params)
        number = opened["round"]
        assert opened["base_version"] == base and opened["stage"] == ADVERTISE
        assert all(number > r.number for r in self.rounds), (number, [r.number for r in self.rounds])
        cfg = opened["config"]
        assert cfg["num_clients"] == n and cfg["threshold"] == threshold and cfg["neighbours"] == degree
        devices = [SecAggDevice(self.client(d), "cnn", number) for d in names]
        graph = neighbours(devices[0].config)
        # the graph is public: check what the docs promise of it (symmetric, degree, no self-loops)
        for u, nb in graph.items():
            assert u not in nb and len(nb) == group - 1 and all(u in graph[v] for v in nb)
        state = self.svc.reg.load_state(f"cnn@{base}")
        deltas, weights = [], []
        enc = RingEncoding(bits=bits, clip_range=CLIP_RANGE, weight_scale=WEIGHT_SCALE if weighted else 0)
        for i, dev in enumerate(devices):
            self.seed += 1
            g = torch.Generator().manual_seed(self.seed)
            # |values · w / weight_scale| ≤ 0.05 · 40 / 20 = 0.1 < clip_range: nothing is clipped
            delta = {k: 0.1 * torch.rand(v.shape, generator=g) - 0.05 for k, v in state.items()}
            w = int(torch.randint(1, MAX_EXAMPLES + 1, (1,), generator=g)) if weighted else 1
            dev.set_update(Delta(delta), w, np.random.default_rng(self.seed))
            # what the device keeps to itself: its codes (as the device computes them) and its float update
            codes = enc.encode(Delta(delta), w, np.random.default_rng(self.seed))
            self.watch.add_codes(codes, bits=bits, ring_bits=dev.config.ring_bits, label=f"{names[i]} codes")
            self.watch.add_floats(Delta(delta).flatten(), label=f"{names[i]} update")
            deltas.append(delta)
            weights.append(w)
        self.open = Round(
            number,
            base,
            names,
            threshold,
            graph,
            bits,
            weighted,
            deltas,
            weights,
            devices,
            next=[0] * n,
            cohorts=cohorts,
            withdrawn=self.withdrawn,
        )
        self.rounds.append(self.open)

    # One rule draws every step, weighted towards the protocol's progress: Hypothesis's swarm testing switches
    # whole rules off for a run, and a run without devices speaking, or without deadlines, never publishes.
    @rule(data=st.data())
    def step(self, data) -> None:
        r = self.open
        if r is None:
            what = data.draw(
                st.sampled_from(["open"] * 4 + ["misbehave", "restart", *self.extra]), label="step"
            )
        elif r.stage in (UNMASK, DONE) and r.holds_withdrawn(r.survivors):  # never published: closes refused
            what = data.draw(
                st.sampled_from(["deadline", "abort", "misbehave", "restart", *self.extra]), label="step"
            )
        elif r.stage == DONE and not r.stuck():  # unmasked: the close is retried (the plain round closed?)
            what = data.draw(
                st.sampled_from(["deadline"] * 2 + ["misbehave", "abort", "restart", *self.extra]),
                label="step",
            )
        elif r.stuck():  # no device left can bring it to its threshold: the operator gives it up, mostly
            what = data.draw(
                st.sampled_from(["abort"] * 3 + ["deadline", "misbehave", "restart", *self.extra]),
                label="step",
            )
        else:
            late = r.stage == UNMASK  # at unmasking, a close (or a plain round beside) decides
            what = data.draw(
                st.sampled_from(
                    ["speak", "speak+deadline"] * (3 if late else 6)
                    + ["deadline", "misbehave", "abort", "restart"] * (1 if late else 2)
                    + self.extra
                ),
                label="step",
            )
        if what == "open":
            self.open_round(**{k: data.draw(v, label=k) for k, v in OPEN.items()})
        elif what.startswith("speak"):
            self.devices_speak(data, deadline=what.endswith("deadline"))
        elif what == "deadline":
            self.close() if r.stage in (UNMASK, DONE) else self.advance()
        elif what == "misbehave":
            if self.rounds:
                self.misbehave(data)
        elif what == "withdraw":
            if self.rounds:
                self.withdraw(data)
        elif what == "plain":
            self.plain_round(data)
        else:
            self.disrupt(what)

    # each device's next stage; a stage returns True once the device is done with it (its message accepted,
    # refused as too late, or refused by the device itself), False while it must wait (409: not open yet)
    def _advertise(self, r: Round, u: int) -> bool:
        body = r.devices[u].endpoint.advertise()
        if r.stage != ADVERTISE:
            self.refused(lambda: self.post(r, u, "keys", body), (409,), "too late")
            return True
        self.post(r, u, "keys", body)
        r.advertised.add(u)
        self.history.append((r, u, "keys", body))
        r.last[u] = ("keys", body)
        return True

    def _share(self, r: Round, u: int) -> bool:
        if r.stage == ADVERTISE:
            self.refused(lambda: self.get(r, u, "roster"), (409,))
            return False
        roster = self.get(r, u, "roster")
        if u not in r.advertised or len(r.graph[u] & r.advertised) + 1 < r.threshold:
            with pytest.raises(SecAggError):  # the device refuses: the roster lacks it, or too few neighbours
                r.devices[u].endpoint.share(roster)
            return True
        body = r.devices[u].endpoint.share(roster)
        if r.stage != SHARE:
            self.refused(lambda: self.post(r, u, "shares", body), (409,), "too late")
            return True
        self.post(r, u, "shares", body)
        r.shared.add(u)
        self.history.append((r, u, "shares", body))
        r.last[u] = ("shares", body)
        return True

    def _upload(self, r: Round, u: int) -> bool:
        if r.stage in (ADVERTISE, SHARE) or u not in r.shared:
            self.refused(lambda: self.get(r, u, "inbox"), (409,))
            return r.stage not in (ADVERTISE, SHARE)  # it did not share in time: it never will
        inbox = self.get(r, u, "inbox")
        if len(r.inbox(u)) + 1 < r.threshold:
            with pytest.raises(SecAggError):  # the device refuses: too few neighbours left
                r.devices[u].endpoint.masked_input(inbox)
            return True
        body = r.devices[u].endpoint.masked_input(inbox)
        if r.stage != MASKED:
            self.refused(lambda: self.post(r, u, "masked", body), (409,), "too late")
            return True
        self.post(r, u, "masked", body)
        r.uploaded.add(u)
        self.history.append((r, u, "masked", body))
        r.last[u] = ("masked", body)
        return True

    def _unmask(self, r: Round, u: int) -> bool:
        if r.stage != UNMASK:
            self.refused(lambda: self.get(r, u, "unmask"), (409,))
            return False
        request = self.get(r, u, "unmask")
        if u not in r.survivors:  # not in the sum (its masked input never arrived): it refuses to answer
            with pytest.raises(SecAggError):
                r.devices[u].endpoint.unmask(request)
            return True
        body = r.devices[u].endpoint.unmask(request)
        self.post(r, u, "unmask", body)
        r.responded.add(u)
        self.history.append((r, u, "unmask", body))
        r.last[u] = ("unmask", body)
        return True

    def devices_speak(self, data, deadline: bool) -> None:
        """Some invited devices, in a random order, each take their next step (the others are silent: a device
        never drawn again has dropped out); then, maybe, the stage's deadline passes (advance, or close at
        unmasking)."""
        r = self.open
        n = len(r.names)
        # in a governance run, one of the round's cohorts may withdraw first (1 in 8), at whatever stage
        if self.extra and data.draw(st.sampled_from([False] * 7 + [True]), label="withdraw first"):
            self.withdraw(data, r)
        order = data.draw(st.permutations(range(n)), label="order")
        # each device silent this time with probability 1/8 (shrinking towards everyone speaking)
        silent = data.draw(st.lists(st.sampled_from([False] * 7 + [True]), min_size=n, max_size=n))
        who = [u for u in order if not silent[u]]
        # and each speaking device, with probability 1/8, first sends its last accepted message again (a retry)
        retry = data.draw(st.lists(st.sampled_from([False] * 7 + [True]), min_size=n, max_size=n))
        stages = (self._advertise, self._share, self._upload, self._unmask)
        for u in who:
            if r.cut_off(u):  # refused from now on, whatever it sends: it has dropped out
                self.refused(lambda: self.client(r.names[u]).request("GET", self.path(r)), (403,), "consent")  # noqa: B023
                if u in r.last:
                    what, body = r.last[u]
                    self.refused(lambda: self.post(r, u, what, body), (403,), "consent")  # noqa: B023
                r.next[u] = len(stages)
                continue
            if retry[u] and u in r.last:
                what, body = r.last[u]
                match = "already" if STAGE_OF[what] == r.stage else "too late"
                self.refused(lambda: self.post(r, u, what, body), (409,), match)  # noqa: B023
            if r.next[u] < len(stages) and stages[r.next[u]](r, u):
                r.next[u] += 1
        if deadline:
            self.close() if r.stage == UNMASK else self.advance()

    def advance(self) -> None:
        r = self.open
        call = lambda: self.svc.admin.advance_secagg("cnn", r.number)  # noqa: E731
        spoke = {ADVERTISE: r.advertised, SHARE: r.shared, MASKED: r.uploaded}[r.stage]
        if len(spoke) < r.threshold:  # too few to go on: refused, and the stage stays open
            event(f"advance refused at {r.stage}")
            self.refused(call, (422,), f"threshold {r.threshold}")
            return
        status = call()
        r.stage = {ADVERTISE: SHARE, SHARE: MASKED, MASKED: UNMASK}[r.stage]
        if r.stage == UNMASK:
            r.survivors = tuple(sorted(r.uploaded))
            r.dropped = tuple(sorted(r.shared - r.uploaded))
        assert status["stage"] == r.stage

    def close(self) -> None:
        r = self.open
        call = lambda: self.svc.admin.close_secagg("cnn", r.number)  # noqa: E731
        if (
            r.stage == UNMASK and not r.recoverable()
        ):  # some secret lacks threshold shares: refused, nothing published
            event("close refused: too few unmasking answers")
            self.refused(call, (422,), f"threshold {r.threshold}")
            return
        r.stage = DONE  # unmasked: the sum is kept, and a refused close below may be retried
        if r.holds_withdrawn(r.survivors):  # a withdrawn cohort's input is in the sum: never published
            event("close refused: withdrawn cohort in the sum")
            refusal = self.refused(call, (409,))
            # with a plain round open too, the service may name either reason (it checks the plain round first)
            reasons = (
                ("withdrew consent",)
                if self.plain is None
                else ("withdrew consent", f"plain round {self.plain}")
            )
            assert any(why in refusal.detail for why in reasons), (reasons, refusal.detail)
            return
        if self.plain is not None:
            event("close refused: plain round open")
            self.refused(call, (409,), f"plain round {self.plain}")
            return
        closed = call()
        assert closed["finished"] == "published" and tuple(closed["survivors"]) == r.survivors
        version = closed["published"]["version"]
        assert version > self.base
        self.versions += 1
        surv = r.survivors
        total = sum(r.weights[u] for u in surv)
        assert closed["published"]["total_weight"] == total
        # the documented rounding: at most one ring step per device, scaled by weight_scale / Σw (unweighted:
        # the mean of the devices' values, 1/n each); plus float32 rounding of the stored version
        step = 2 * CLIP_RANGE / ((1 << r.bits) - 1)
        tol = len(surv) * step * (WEIGHT_SCALE / total if r.weighted else 1 / len(surv)) + 1e-6
        base = self.svc.reg.load_state(f"cnn@{r.base}")
        got = self.svc.reg.load_state(f"cnn@{version}")
        for k, b in base.items():
            mean = sum(r.deltas[u][k].double() * r.weights[u] for u in surv) / total
            err = (got[k].double() - (b.double() + mean)).abs().max().item()
            assert err <= tol, (k, err, tol, surv)
        kind = "SecAgg+" if len(r.names) == 8 else "complete"
        event(f"published: {kind}, {'weighted' if r.weighted else 'unweighted'}, {len(r.dropped)} dropped")
        self.parent[version] = r.base
        self.holds[version] = self.holds[r.base] | {r.cohorts[u] for u in surv}
        self.base = version
        r.outcome, r.stage = "published", "done"
        self.open = None

    def misbehave(self, data) -> None:
        """A request the service must refuse, changing nothing: a message it accepted before sent again (to
        its own round, open or not: 409), to another stage's endpoint (400: another message type, 413: above
        that stage's cap; 409 once its round is finished), by another invited device (409: signed as another
        client); a device not invited (403 for an open round, 409 for a finished one, 404 for a round that
        never existed); the operator advancing or closing at the wrong stage or a finished round (409)."""
        what = data.draw(st.sampled_from(["replay", "wrong endpoint", "impostor", "stranger", "admin"]))
        if what == "admin":
            r = data.draw(st.sampled_from(self.rounds), label="round")
            if r.outcome is None and r.stage == UNMASK:
                self.refused(lambda: self.svc.admin.advance_secagg("cnn", r.number), (409,), "close it")
            elif r.outcome is None and r.stage == DONE:
                self.refused(lambda: self.svc.admin.advance_secagg("cnn", r.number), (409,))
            elif r.outcome is None:
                self.refused(lambda: self.svc.admin.close_secagg("cnn", r.number), (409,), "advance to")
            else:
                act = data.draw(st.sampled_from(["advance", "close", "abort"]), label="admin")
                call = getattr(self.svc.admin, f"{act}_secagg")
                self.refused(lambda: call("cnn", r.number), (409,))
            return
        if what == "stranger":
            r = data.draw(st.sampled_from(self.rounds), label="round")
            statuses = (409,) if r.outcome else (403,)
            self.refused(lambda: self.client("stranger").request("GET", self.path(r)), statuses)
            for e in ENDPOINTS:
                if self.history:
                    body = self.history[data.draw(st.integers(0, len(self.history) - 1), label="message")][3]
                    self.refused(lambda: self.post(r, 0, e, body, as_name="stranger"), statuses)  # noqa: B023
            never = f"/v1/models/cnn/secagg/{self.rounds[-1].number + 7}"
            self.refused(lambda: self.client("stranger").request("GET", never), (404,))
            return
        if not self.history:
            return
        r, u, sent, body = self.history[data.draw(st.integers(0, len(self.history) - 1), label="message")]
        # a device of a withdrawn cohort is refused before its message is read, in an open round
        cut = (403,) if r.outcome is None and r.cut_off(u) else None
        if what == "replay":
            self.refused(lambda: self.post(r, u, sent, body), cut or (409,))
        elif what == "wrong endpoint":
            other = data.draw(st.sampled_from([e for e in ENDPOINTS if e != sent]), label="endpoint")
            self.refused(lambda: self.post(r, u, other, body), cut or ((409,) if r.outcome else (400, 413)))
        else:
            v = (u + 1) % len(r.names)
            cut = (403,) if r.outcome is None and r.cut_off(v) else None
            self.refused(lambda: self.post(r, u, sent, body, as_name=r.names[v]), cut or (409,))

    def withdraw(self, data, r: Round | None = None) -> None:
        """The operator records that one of some round's two cohorts withdrew consent (again, maybe): the answer
        names every version whose lineage holds it."""
        if r is None:
            r = data.draw(st.sampled_from(self.rounds), label="round")
        cohort = r.cohorts[data.draw(st.integers(0, 1), label="cohort")]
        answer = self.svc.admin.withdraw(cohort)
        self.withdrawn.add(cohort)
        event(f"withdrawal: {'the open round at ' + r.stage if r is self.open else 'another round'}")
        assert sorted(answer["affected"]) == sorted(f"cnn@{v}" for v, c in self.holds.items() if cohort in c)

    def plain_round(self, data) -> None:
        """The operator opens a plain round beside (none open; refused on a version holding a withdrawn
        cohort, or when one is open already), or closes or aborts the open one (no device uploads to it: it
        closes without a version)."""
        if self.plain is None:
            call = lambda: self.svc.admin.open_round("cnn")  # noqa: E731
            if self.holds[self.base] & self.withdrawn:
                self.refused(call, (409,), "rebuild")
                return
            opened = call()
            assert opened["base_version"] == self.base and opened["open"]
            self.plain = opened["round"]
            event("plain round opened")
            return
        act = data.draw(st.sampled_from(["close", "abort", "open again"]), label="plain")
        if act == "open again":
            self.refused(lambda: self.svc.admin.open_round("cnn"), (409,), "still open")
        elif act == "close":
            closed = self.svc.admin.close_round("cnn", self.plain)
            assert closed["version"] is None and closed["uploads"] == 0
            self.plain = None
        else:
            assert self.svc.admin.abort_round("cnn", self.plain)["aborted"]
            self.plain = None

    def disrupt(self, what: str) -> None:
        """The operator aborts the open round, or the service restarts over the same home (the open round is
        lost; numbers continue)."""
        if what == "abort" and self.open is not None:
            assert self.svc.admin.abort_secagg("cnn", self.open.number)["finished"] == "aborted"
            self.open.outcome = "aborted"
            self.open = None
        elif what == "restart":
            self.svc.reg.close()
            self.svc.app = create_app(self.svc.config)
            self._wire()
            if self.open is not None:
                self.open.outcome = "lost"
                self.open = None

    # -- invariants -------------------------------------------------------------------------------------
    @invariant()
    def agrees_with_the_model(self) -> None:
        for r in self.rounds[-3:]:
            status = self.svc.admin.secagg_status("cnn", r.number)
            assert status["finished"] == r.outcome, (r.number, status["finished"], r.outcome)
            if r.outcome is None:
                assert status["stage"] == r.stage, (status["stage"], r.stage)
                assert status["advertised"] == len(r.advertised)
                assert status["shared"] == len(r.shared)
                assert status["uploaded"] == len(r.uploaded)
                assert status["responded"] == len(r.responded)
                assert tuple(status["survivors"]) == r.survivors and tuple(status["dropped"]) == r.dropped
        assert len(self.svc.reg.versions("cnn", kind="model")) == self.versions
        assert self.svc.reg.withdrawn_cohorts() == self.withdrawn
        assert self.svc.reg.tags("cnn").get("training", 1) == self.base
        for v, held in self.holds.items():
            assert self.svc.reg.contributors(self.svc.reg.get("cnn", v)) == held, (v, held)

    @invariant()
    def no_plaintext_at_the_server(self) -> None:
        for path, body in self.bodies_of_app:
            self.watch.check_bytes(body, path)
        self.bodies_of_app.clear()
        self.watch.check_object(self.svc.app.state.secagg_rounds, "secagg rounds")


SecAggMachine.TestCase.settings = stateful_settings(5, 25)
test_secagg_rounds_under_random_requests = SecAggMachine.TestCase

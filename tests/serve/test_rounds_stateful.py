"""The service's plain rounds under random sequences of requests, against a plain-Python model of the protocol.

Hypothesis drives opening, uploading (fresh updates, a device's second upload in a round, a device replaying an
update it had accepted before, an upload to a round that is not open), closing, aborting and restarting the
service over the same registry, in any order. After every step the service must agree with the model: which
round is open and its uploads, which requests are refused (409, and nothing changes), round numbers that never
repeat across restarts, and each published version equal to FedAvg of the accepted updates (weighted by their
example counts, applied to the round's base), computed here from the updates themselves.

15 runs of up to 20 steps here; ``DP_STATEFUL_EXAMPLES=200`` searches longer. Checked against a planted bug: a
restart that replays the open round's uploads with weight 1 instead of their example counts is found.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tests.conftest import stateful_settings

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.serve import ServiceError

from .conftest import Service
from .test_rounds import restart

DEVICES = ("d0", "d1", "d2", "d3")


@dataclass
class Open:
    number: int
    base: int
    nonce: str
    uploads: dict[str, tuple[dict[str, torch.Tensor], int]] = field(default_factory=dict)


class RoundsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        # the identity downlink: a published version is then the round's aggregate itself (the default downlink
        # codec publishes what devices reconstruct from its compressed delta)
        self.svc = Service(Path(self._tmp.name) / "home", downlink_codec="identity")
        self.devices = {d: self.svc.device(d) for d in DEVICES}
        self.open: Open | None = None
        self.numbers: list[int] = []  # every round number the service gave out, in order
        self.base = 1  # the version the next round trains on (the newest published)
        self.versions = 1
        self.accepted: dict[str, list[bytes]] = {d: [] for d in DEVICES}  # every payload accepted, per device
        self.seed = 0

    def teardown(self) -> None:
        self.svc.reg.close()
        self._tmp.cleanup()

    def _refused(self, call) -> None:
        with pytest.raises(ServiceError) as e:
            call()
        assert e.value.status == 409, (e.value.status, e.value.detail)

    @rule()
    def open_round(self) -> None:
        if self.open is not None:
            self._refused(lambda: self.svc.admin.open_round("cnn"))
            return
        info = self.svc.admin.open_round("cnn")
        assert info["base_version"] == self.base
        assert not self.numbers or info["round"] > self.numbers[-1]  # never reused, restarts included
        self.numbers.append(info["round"])
        self.open = Open(info["round"], info["base_version"], info["nonce"])

    @rule(device=st.sampled_from(DEVICES), examples=st.integers(1, 50))
    def upload_fresh(self, device, examples) -> None:
        self.seed += 1
        g = torch.Generator().manual_seed(self.seed)
        base = self.svc.reg.load_state(f"cnn@{self.base}")
        delta = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        payload = Compressor("identity").compress(Delta(delta), base_id="cnn", base_version=self.base)
        number = self.open.number if self.open else (self.numbers[-1] if self.numbers else 1)
        send = lambda: self.devices[device].upload(  # noqa: E731
            "cnn", number, payload, num_examples=examples, nonce=self.open.nonce if self.open else None
        )
        if self.open is None or device in self.open.uploads:  # no open round; a second upload in this one
            with pytest.raises(ServiceError) as e:
                send()
            assert e.value.status in (404, 409), (e.value.status, e.value.detail)
            return
        assert send()["accepted"]
        self.open.uploads[device] = (delta, examples)
        self.accepted[device].append(payload)

    @rule(device=st.sampled_from(DEVICES), data=st.data())
    def replay(self, device, data) -> None:
        """The device sends again bytes it had accepted before: refused in any round."""
        if self.open is None or not self.accepted[device]:
            return
        payload = data.draw(st.sampled_from(self.accepted[device]))
        self._refused(
            lambda: self.devices[device].upload("cnn", self.open.number, payload, nonce=self.open.nonce)
        )

    @rule()
    def close_round(self) -> None:
        if self.open is None:
            if self.numbers:
                self._refused(lambda: self.svc.admin.close_round("cnn", self.numbers[-1]))
            return
        closed = self.svc.admin.close_round("cnn", self.open.number)
        assert closed["uploads"] == len(self.open.uploads)
        if not self.open.uploads:
            assert closed["version"] is None  # an empty round publishes nothing
        else:
            self.versions += 1
            assert closed["version"] > self.base  # numbered after its base (deltas take numbers too)
            base = self.svc.reg.load_state(f"cnn@{self.open.base}")
            total = sum(n for _, n in self.open.uploads.values())
            got = self.svc.reg.load_state(f"cnn@{closed['version']}")
            for k, b in base.items():
                mean = sum(d[k].double() * n for d, n in self.open.uploads.values()) / total
                torch.testing.assert_close(got[k].double(), b.double() + mean, rtol=0, atol=1e-6)
            self.base = closed["version"]
        self.open = None

    @rule()
    def abort_round(self) -> None:
        if self.open is None:
            if self.numbers:
                self._refused(lambda: self.svc.admin.abort_round("cnn", self.numbers[-1]))
            return
        assert self.svc.admin.abort_round("cnn", self.open.number)["aborted"]
        self.open = None

    @rule()
    def restart_service(self) -> None:
        restart(self.svc)
        self.devices = {d: self.svc.device(d) for d in DEVICES}

    @invariant()
    def agrees_with_the_model(self) -> None:
        stats = self.svc.admin.stats()["rounds"].get("cnn")
        if self.open is None:
            assert stats is None, stats
        else:
            assert stats["round"] == self.open.number and stats["uploads"] == len(self.open.uploads)
        assert len(self.svc.reg.versions("cnn", kind="model")) == self.versions


RoundsMachine.TestCase.settings = stateful_settings(15, 20)
test_rounds_under_random_requests = RoundsMachine.TestCase

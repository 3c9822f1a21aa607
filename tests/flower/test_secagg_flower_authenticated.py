"""Authenticated SecAgg rounds on Flower (Bonawitz et al. 2017 §4–6): the meaning they have on the HTTP service.

Nodes are enrolled in their own ``node_config`` (the identity key, certificate and enrollment authority files
``fleet enroll --authority-key`` and ``keys enrollment`` write); ``task_server_app(..., authenticated=True)``
runs :class:`SecAggStrategy` with signed rosters and the consistency stage. Real Flower app code over the
loopback Grid of ``conftest.py``; the attacks are a server-controlled Grid rewriting what the nodes get.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import ConfigRecord, Context, Message, RecordDict

import deltaplane.flower.secagg as flower_secagg
from deltaplane.aggregation.secagg import (
    DeviceCertificate,
    DeviceCredentials,
    DeviceIdentity,
    EnrollmentAuthority,
    SecAggAuthError,
    SecAggConfig,
    SecAggError,
    SignedAdvertiseKeys,
    SignedKeyRoster,
    UnmaskRequest,
    decode_message,
)
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.aggregation.secagg.revocation import revoke, write_revocations
from deltaplane.errors import ConfigError
from deltaplane.flower import digits_client_app, digits_server_app
from deltaplane.flower.secagg import QUERY_TYPE, REVOCATIONS_NODE_CONFIG_KEY, SECAGG_KEY
from deltaplane.sim import RunConfig, run_simulation

CFG = RunConfig(
    clients=4, rounds=2, local_epochs=1, codec="topk(0.1) | quant(bits=8)", secagg=True, secagg_bits=16,
    secagg_range=1.0, clip="2.0", engine="sequential",
)  # fmt: skip
SIX = CFG.replace(clients=6, rounds=1, clip=None)  # complete graph of 6: threshold 5
EXPIRES = 4_000_000_000
#: the node_config keys of a node's enrollment, as docs/flower.md documents them
NODE_CONFIG_KEYS = ("secagg-identity-key", "secagg-certificate", "secagg-enrollment-authority")


@pytest.fixture(scope="module")
def enrollment(tmp_path_factory) -> dict[int, dict[str, str]]:
    """Partition i → the node_config entries naming device-i's enrollment files (one authority for all)."""
    root = tmp_path_factory.mktemp("enrollment")
    authority = EnrollmentAuthority.generate()
    (root / "enrollment.ed25519.pub").write_text(authority.public_text() + "\n")
    out = {}
    for i in range(6):
        ident = DeviceIdentity.enroll(authority, f"device-{i}", cohort="fleet", expires=EXPIRES)
        (root / f"device-{i}.identity.pem").write_bytes(ident.key_pem())
        (root / f"device-{i}.cert").write_bytes(ident.certificate.to_bytes())
        out[i] = dict(
            zip(
                NODE_CONFIG_KEYS,
                [str(root / f"device-{i}.identity.pem"), str(root / f"device-{i}.cert"),
                 str(root / "enrollment.ed25519.pub")],
                strict=True,
            )
        )  # fmt: skip
    return out


def _enrol(grid, enrollment) -> None:
    for context in grid.contexts.values():
        context.node_config.update(enrollment[int(context.node_config["partition-id"])])


def _context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def _stage(msg: Message) -> str | None:
    rec = msg.content.config_records.get(SECAGG_KEY) if msg.has_content() else None
    return str(rec["stage"]) if rec is not None and "stage" in rec else None


class _Recording:
    """Mixin for loopback grids: keeps every reply with the message it answers, and the round's SecAgg config."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if _stage(m) == "advertise":
                self.config = SecAggConfig.from_dict(json.loads(str(m.content[SECAGG_KEY]["config"])))
        out = super().send_and_receive(self.rewrite(messages), timeout=timeout)
        self.replies = getattr(self, "replies", []) + list(zip(messages, out, strict=True))
        return out

    def rewrite(self, messages):  # what a man in the middle changes (nothing here)
        return messages

    def replies_to(self, stage: str) -> list[Message]:
        return [r for m, r in self.replies if _stage(m) == stage]


def _run(grid, cfg: RunConfig, **server) -> tuple[list, dict]:
    rounds, finals = [], {}
    app = digits_server_app(cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: finals.update(st),
                            **server)  # fmt: skip
    app(grid=grid, context=_context())
    return rounds, finals


def test_an_authenticated_flower_run_gives_the_in_process_sums(loopback_grid, enrollment) -> None:
    """Enrolled nodes, ``authenticated=True``: signed advertisements, a signed roster, a consistency stage, and
    the very models (exact sums) of the in-process engine's semi-honest round."""

    class Grid(_Recording, loopback_grid):
        pass

    grid = Grid(digits_client_app(CFG), CFG.clients)
    _enrol(grid, enrollment)
    rounds, finals = _run(grid, CFG, authenticated=True)

    expected = run_simulation(CFG)
    assert [r.test_accuracy for r in rounds] == [r.test_accuracy for r in expected.rounds]
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)
    assert {_stage(m) for m in grid.sent} == {"advertise", "share", "consistency", "unmask", None}
    adverts = grid.replies_to("advertise")
    assert len(adverts) == CFG.rounds * CFG.clients and not any(r.has_error() for r in adverts)
    cfg = grid.config  # the last round's
    signed = [decode_message(bytes(r.content[SECAGG_KEY]["message"]), cfg) for r in adverts[-CFG.clients :]]
    assert all(isinstance(a, SignedAdvertiseKeys) for a in signed)
    roster = next(m for m in reversed(grid.sent) if _stage(m) == "share").content[SECAGG_KEY]["roster"]
    assert isinstance(decode_message(bytes(roster), cfg), SignedKeyRoster)
    # every survivor signed, and got the signatures with the unmasking request
    assert len(grid.replies_to("consistency")) == CFG.rounds * CFG.clients
    assert all("signatures" in m.content[SECAGG_KEY] for m in grid.sent if _stage(m) == "unmask")


def test_an_authenticated_round_with_a_dropout_unmasks_the_semi_honest_rounds_sum(
    loopback_grid, enrollment
) -> None:
    """Node 3's masked input is lost: five survivors, all sign, the same model as the semi-honest Flower round
    with the same dropout (each node's ring codes are seeded by its device: the sums are equal exactly)."""

    class Flaky(_Recording, loopback_grid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            out = super().send_and_receive(messages, timeout=timeout)
            if {m.metadata.message_type for m in messages} == {"train"}:
                return [r for r in out if r.metadata.src_node_id != 103]
            return out

    grid = Flaky(digits_client_app(SIX), SIX.clients)
    _enrol(grid, enrollment)
    rounds, finals = _run(grid, SIX, authenticated=True)
    _, plain = _run(Flaky(digits_client_app(SIX), SIX.clients), SIX)
    for k, v in plain.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)
    assert rounds[0].clients == 6
    signers = [r.metadata.src_node_id for r in grid.replies_to("consistency")]
    assert signers == [100, 101, 102, 104, 105]  # the survivors; node 3 is not asked


def test_a_node_whose_own_certificate_its_neighbours_would_refuse_sits_out_and_the_round_goes_on(
    loopback_grid, enrollment, tmp_path
) -> None:
    """Node 5's certificate has expired: it refuses the round at key advertisement (SecAggAuthError naming its
    certificate), so the roster seats the five others and the round is exact without it. It used to advertise,
    and every other node refused the roster seating it: one node's stale enrollment failed the whole round."""
    files = enrollment[5]
    cert = DeviceCertificate.from_bytes(Path(files[NODE_CONFIG_KEYS[1]]).read_bytes())
    expired = dataclasses.replace(cert, expires=1)  # its signature stale too: refused either way
    (tmp_path / "device-5.cert").write_bytes(expired.to_bytes())
    stale = {**enrollment, 5: {**files, NODE_CONFIG_KEYS[1]: str(tmp_path / "device-5.cert")}}

    class Grid(_Recording, loopback_grid):
        pass

    grid = Grid(digits_client_app(SIX), SIX.clients)
    _enrol(grid, stale)
    rounds, _ = _run(grid, SIX, authenticated=True)
    adverts = grid.replies_to("advertise")
    refused = [r for r in adverts if r.has_error()]
    assert [r.metadata.src_node_id for r in refused] == [105]
    assert "this node's own certificate would be refused" in refused[0].error.reason
    assert len(grid.replies_to("consistency")) == 5 and rounds[0].clients == 6
    # a node whose own revocation list revokes it sits out likewise
    run = RunEnrollment(cohort="fleet")
    node = run.write_node_config(tmp_path / "run", "device-0")
    write_revocations(
        tmp_path / "revoked.bin", revoke(run.authority, [("device-0", "fleet")], issued=int(time.time()))
    )
    context = _context()
    context.node_config.update({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "revoked.bin")})
    with pytest.raises(SecAggAuthError, match=r"own certificate would be refused.*'device-0'.*is revoked"):
        flower_secagg.secagg_query(_advertise(True), context)


def _substituted(roster: bytes, cfg: SecAggConfig, slot: int) -> bytes:
    """The roster with ``slot``'s public keys replaced by keys the server holds the private halves of."""
    msg = decode_message(roster, cfg)
    raw = [
        X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for _ in "cs"
    ]
    return dataclasses.replace(msg, keys={**msg.keys, slot: (raw[0], raw[1])}).to_bytes()


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "semi-honest"])
def test_nodes_refuse_a_roster_in_which_the_server_substituted_a_nodes_keys(
    loopback_grid, enrollment, authenticated
) -> None:
    """A man in the middle (the server's own Grid) puts keys of its own in slot 2's place, to decrypt the shares
    the others send node 2. Semi-honest nodes 0, 1, 3 cannot tell and share with the substitute; enrolled nodes
    refuse the roster (SecAggAuthError naming slot 2, in Flower's error reply): nobody shares, trains or unmasks,
    and the ServerApp stops with a SecAggError naming the nodes' refusal."""

    class MitM(_Recording, loopback_grid):
        def rewrite(self, messages):
            for m in messages:
                if _stage(m) == "share":
                    rec = m.content[SECAGG_KEY]
                    rec["roster"] = _substituted(bytes(rec["roster"]), self.config, slot=2)
            return messages

    grid = MitM(digits_client_app(CFG.replace(rounds=1)), CFG.clients)
    if authenticated:
        _enrol(grid, enrollment)
        with pytest.raises(
            SecAggError, match=r"only 0 clients shared keys.*AdvertisementUnbound.*roster slot 2"
        ):
            _run(grid, CFG.replace(rounds=1), authenticated=True)
        shares = grid.replies_to("share")
        assert len(shares) == 4 and all(r.has_error() and not r.has_content() for r in shares)
        others = [r for r in shares if r.metadata.src_node_id != 102]
        assert all(
            "AdvertisementUnbound" in r.error.reason and "roster slot 2" in r.error.reason for r in others
        )
        assert (
            "does not carry this client's own keys"
            in next(r for r in shares if r.metadata.src_node_id == 102).error.reason
        )
        assert [m.metadata.message_type for m in grid.sent if _stage(m) in {None, "unmask"}] == [
            "query.device"
        ] * 4
    else:
        _run(grid, CFG.replace(rounds=1))
        accepted = [r.metadata.src_node_id for r in grid.replies_to("share") if not r.has_error()]
        assert accepted == [100, 101, 103]  # they encrypted node 2's shares to the server's key


TARGET = 5


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "semi-honest"])
def test_the_consistency_check_catches_a_server_showing_nodes_different_survivor_sets(
    loopback_grid, enrollment, authenticated
) -> None:
    """Nodes 3 and 4 are told node 5 dropped (they would reveal shares of its mask key), the others that it
    survived (shares of its self-mask seed): with both secrets the server would unmask node 5's update.
    Semi-honest nodes each answer their own view, node 5's share included; enrolled nodes sign their views,
    see that fewer than the threshold (5) signed theirs, and every one refuses to unmask (SecAggAuthError in
    its error reply): no share leaves any node, and the ServerApp stops with a SecAggError saying so."""

    class Splitting(_Recording, loopback_grid):
        def rewrite(self, messages):
            for m in messages:
                if _stage(m) in {"consistency", "unmask"} and m.metadata.dst_node_id in {103, 104}:
                    rec = m.content[SECAGG_KEY]
                    req = UnmaskRequest.from_bytes(bytes(rec["request"]), self.config)
                    rec["request"] = dataclasses.replace(
                        req,
                        survivors=tuple(u for u in req.survivors if u != TARGET),
                        dropped=tuple(sorted({*req.dropped, TARGET})),
                    ).to_bytes()
            return messages

    grid = Splitting(digits_client_app(SIX), SIX.clients)
    if authenticated:
        _enrol(grid, enrollment)
    with pytest.raises(SecAggError, match="refusing to unmask" if authenticated else "client 5's secret"):
        _run(grid, SIX, **({"authenticated": True} if authenticated else {}))
    unmasks = grid.replies_to("unmask")
    assert len(unmasks) == 6
    if authenticated:
        assert len(grid.replies_to("consistency")) == 6
        for r in unmasks:
            assert r.has_error() and not r.has_content()
            told = 2 if r.metadata.src_node_id in {103, 104} else 4
            assert "SecAggAuthError" in r.error.reason
            assert f"refusing to unmask: {told} devices of its neighbourhood" in r.error.reason
    else:  # every node answered its own view: shares of both of node 5's secrets left the nodes
        for r in unmasks:
            assert not r.has_error()
            assert TARGET in decode_message(bytes(r.content[SECAGG_KEY]["message"]), grid.config).shares


def test_an_enrolled_node_refuses_an_unauthenticated_round_before_training(loopback_grid, enrollment) -> None:
    """The node's enrollment, not the server's say-so, decides: enrolled nodes refuse a semi-honest round at
    key advertisement (nothing sent, no training), and the ServerApp says why and what to run instead."""

    class Grid(_Recording, loopback_grid):
        pass

    grid = Grid(digits_client_app(CFG), CFG.clients)
    _enrol(grid, enrollment)
    with pytest.raises(
        SecAggError, match=r"only 0 clients advertised keys.*SecAggAuthError.*authenticated=True"
    ):
        _run(grid, CFG)
    adverts = grid.replies_to("advertise")
    assert len(adverts) == 4 and all(r.has_error() and not r.has_content() for r in adverts)
    assert all("this node authenticates its neighbours' keys" in r.error.reason for r in adverts)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)

    # and a train instruction sent anyway is refused before the node trains: it holds no state for the round
    trained: list[Message] = []
    mod = flower_secagg.secagg_mod()
    context = grid.contexts[100]
    msg = Message(RecordDict({SECAGG_KEY: ConfigRecord({"round": 1, "inbox": b"x"})}), dst_node_id=100,
                  message_type="train")  # fmt: skip
    with pytest.raises(SecAggError, match="holds no SecAgg state for round 1"):
        mod(msg, context, lambda m, c: trained.append(m))
    assert trained == []


def test_a_node_without_credentials_refuses_an_authenticated_round(loopback_grid) -> None:
    class Grid(_Recording, loopback_grid):
        pass

    grid = Grid(digits_client_app(CFG), CFG.clients)
    with pytest.raises(
        SecAggError, match=r"only 0 clients advertised keys.*no enrolled identity.*node_config"
    ):
        _run(grid, CFG, authenticated=True)
    adverts = grid.replies_to("advertise")
    assert len(adverts) == 4 and all("SecAggAuthError" in r.error.reason for r in adverts)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)


def _advertise(authenticated: bool, round_id: int = 1) -> Message:
    cfg = SecAggConfig(num_clients=5, threshold=4, bits=8, vector_size=4, round_id=round_id)
    rec = ConfigRecord({"stage": "advertise", "config": json.dumps(cfg.to_dict()), "encoding": "[8, 1.0, 0.0]",
                        "client-id": 0, "authenticated": authenticated, "secagg-version": 5})  # fmt: skip
    return Message(RecordDict({SECAGG_KEY: rec}), dst_node_id=0, message_type=QUERY_TYPE)


def test_credentials_given_in_code_and_half_an_enrollment_in_node_config(enrollment) -> None:
    """A ClientApp built in code passes ``credentials=`` (add_secagg, secagg_mod); a node_config naming only some
    of the three files is a ConfigError naming the missing keys, not a silently unauthenticated node."""
    assert flower_secagg.NODE_CONFIG_KEYS == NODE_CONFIG_KEYS
    files = enrollment[0]
    creds = DeviceCredentials.from_files(*files.values())
    cfg = SecAggConfig(num_clients=5, threshold=4, bits=8, vector_size=4, round_id=1)
    reply = flower_secagg.secagg_query(_advertise(True), _context(), credentials=creds)
    advert = decode_message(bytes(reply.content[SECAGG_KEY]["message"]), cfg)
    assert isinstance(advert, SignedAdvertiseKeys)
    with pytest.raises(SecAggAuthError, match="this node authenticates"):
        flower_secagg.secagg_query(_advertise(False), _context(), credentials=creds)

    half = Context(run_id=1, node_id=0, node_config={NODE_CONFIG_KEYS[0]: files[NODE_CONFIG_KEYS[0]]},
                   state=RecordDict(), run_config={})  # fmt: skip
    with pytest.raises(ConfigError, match="but not secagg-certificate, secagg-enrollment-authority"):
        flower_secagg.secagg_query(_advertise(True), half)
    missing = Context(run_id=1, node_id=0, node_config={**files, NODE_CONFIG_KEYS[1]: "/nonexistent/device.cert"},
                      state=RecordDict(), run_config={})  # fmt: skip
    with pytest.raises(ConfigError, match="cannot read device certificate"):
        flower_secagg.secagg_query(_advertise(True), missing)


def test_a_node_refuses_a_round_number_it_advertised_in_already(enrollment) -> None:
    """A server that runs a round number of the run again (or an earlier one) is refused at key advertisement:
    the node's signatures bind the run and the round's parameters, which a repeated round would share, so the
    earlier round's signed advertisements and survivor signatures would verify in it (replay)."""
    creds = DeviceCredentials.from_files(*enrollment[0].values())
    context = _context()
    flower_secagg.secagg_query(_advertise(True, round_id=2), context, credentials=creds)
    for again in (2, 1):
        with pytest.raises(
            SecAggError, match=f"refusing SecAgg round {again}: this node advertised keys for round 2"
        ):
            flower_secagg.secagg_query(_advertise(True, round_id=again), context, credentials=creds)
    reply = flower_secagg.secagg_query(_advertise(True, round_id=3), context, credentials=creds)
    assert reply.content[SECAGG_KEY]["message"]
    # another run is another context (Flower keeps a node's state per run): its round 1 is fresh
    flower_secagg.secagg_query(_advertise(True, round_id=1), _context(), credentials=creds)


def test_a_runs_secagg_authenticated_enrolls_the_nodes_and_gives_the_secagg_runs_model(
    run_flower, secagg_servers, loopback_grid
) -> None:
    """``RunConfig.secagg_authenticated`` on Flower: ``task_server_app`` runs authenticated rounds by itself,
    and ``enroll_nodes`` (what ``run_flower`` does on Ray) enrolls each node with the run's own authority
    through its node_config; the models are the unauthenticated SecAgg run's, exactly. Nodes left unenrolled
    refuse such a run at key advertisement, and an explicit ``authenticated=False`` contradicting the config
    is a ConfigError."""
    cfg = CFG.replace(secagg_authenticated=True)
    rounds, finals = run_flower(cfg)
    assert secagg_servers and all(s.authenticated for s in secagg_servers)
    assert all(sorted(s.signatures) == list(s.survivors) for s in secagg_servers)
    plain = run_simulation(CFG)
    assert [r.driver_invariants() for r in rounds] == [r.driver_invariants() for r in plain.rounds]
    for k, v in plain.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)

    with pytest.raises(SecAggError, match="only 0 clients advertised keys.*no enrolled identity"):
        _run(loopback_grid(digits_client_app(cfg), cfg.clients), cfg)
    with pytest.raises(ConfigError, match="authenticated=False, but the run asks for authenticated"):
        digits_server_app(cfg, authenticated=False)

"""A Flower node's revocation list: ``node_config``'s optional ``secagg-revocations`` names the enrollment
authority's list; the node's credentials hold it, verified, only beside its enrollment, and the node refuses
whole rounds seating a device it revokes."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest
import torch
from tests.flower.test_secagg_flower_authenticated import CFG, _Recording, _run, _stage

from deltaplane.aggregation.secagg import EnrollmentAuthority, SecAggAuthError, SecAggError
from deltaplane.aggregation.secagg.enrollment import RunEnrollment
from deltaplane.aggregation.secagg.errors import RevocationRollback, RevocationsStale
from deltaplane.aggregation.secagg.revocation import REVOCATIONS_MAX_BYTES, revoke, write_revocations
from deltaplane.errors import ConfigError
from deltaplane.flower import digits_client_app
from deltaplane.flower.secagg import (
    NODE_CONFIG_KEYS,
    REVOCATIONS_NODE_CONFIG_KEY,
    SECAGG_KEY,
    SecAggStrategy,
    _check_authentication,
    node_credentials,
)


def test_node_config_names_the_revocation_list(tmp_path) -> None:
    run = RunEnrollment(cohort="fleet")
    node = run.write_node_config(tmp_path, "device-0")
    crl = revoke(run.authority, [("device-3", "fleet")], issued=1)
    write_revocations(tmp_path / "revoked.bin", crl)
    creds = node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "revoked.bin")})
    assert creds is not None and creds.revocations == crl
    assert creds.revocations.names(run.credentials("device-3").identity.certificate)
    assert node_credentials(node).revocations is None
    with pytest.raises(ConfigError, match="no enrollment"):
        node_credentials({REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "revoked.bin")})
    with pytest.raises(ConfigError, match="is a file path"):
        node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: 3})
    # a list signed by another authority than the node's: refused when the node reads its config
    write_revocations(tmp_path / "foreign.bin", revoke(EnrollmentAuthority.generate(), [], issued=1))
    with pytest.raises(SecAggAuthError, match="foreign.bin.*does not trust"):
        node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "foreign.bin")})


def test_a_node_refuses_its_list_file_rolled_back_and_takes_a_newer_one(tmp_path) -> None:
    """The node re-reads ``secagg-revocations`` at each stage: a file replaced by an older list (a lower
    sequence, which would un-revoke device-3) is refused by name, while the operator's newer list is taken."""
    run = RunEnrollment(cohort="fleet")
    path = tmp_path / "revoked.bin"
    node = {**run.write_node_config(tmp_path, "device-0"), REVOCATIONS_NODE_CONFIG_KEY: str(path)}
    first = revoke(run.authority, [], issued=int(time.time()))
    second = revoke(run.authority, [("device-3", "fleet")], issued=int(time.time()), previous=first)
    write_revocations(path, first)
    assert node_credentials(node).revocations == first
    write_revocations(path, second)  # the operator's newer list: taken at the next stage
    assert node_credentials(node).revocations == second
    assert node_credentials(node).revocations == second  # the very list again: taken as it is
    write_revocations(path, first)  # rolled back: device-3 would be seated again
    with pytest.raises(RevocationRollback, match=r"revoked\.bin: refused revocation list number 1.*number 2"):
        node_credentials(node)
    forked = revoke(run.authority, [("device-4", "fleet")], issued=int(time.time()), previous=first)
    write_revocations(path, forked)  # number 2 again, other contents: the authority never signs two
    with pytest.raises(RevocationRollback):
        node_credentials(node)
    third = revoke(run.authority, [("device-5", "fleet")], issued=int(time.time()), previous=second)
    write_revocations(path, third)  # the operator repairs it with a newer list: taken again
    assert node_credentials(node).revocations == third


REVOKED = 2  # device-2's identity key leaked: the authority revokes it, the server still seats it


@pytest.mark.parametrize("listed", [True, False], ids=["nodes-hold-the-list", "no-list"])
def test_enrolled_nodes_holding_the_list_refuse_a_round_seating_the_revoked_node(
    loopback_grid, tmp_path, listed
) -> None:
    """A whole authenticated Flower round (loopback Grid, enrolled nodes) in which node 2's certificate is revoked.
    The ServerApp has no list and seats node 2 (which holds none: the leaked key's holder); every other node holds
    it in its node_config (``secagg-revocations``) and refuses the signed roster naming slot 2 before it sends a
    share (SecAggAuthError in its error reply): nothing trains or unmasks, and the ServerApp's SecAggError names
    the nodes' refusals. Without the list on the nodes the very same round runs (what the list changes)."""
    cfg = CFG.replace(rounds=1)
    run = RunEnrollment(cohort="fleet")
    crl = revoke(run.authority, [(f"device-{REVOKED}", "fleet")], issued=1_800_000_000)
    write_revocations(tmp_path / "revoked.bin", crl)

    class Grid(_Recording, loopback_grid):
        pass

    grid = Grid(digits_client_app(cfg), cfg.clients)
    for context in grid.contexts.values():
        i = int(context.node_config["partition-id"])
        context.node_config.update(run.write_node_config(tmp_path, f"device-{i}"))
        if listed and i != REVOKED:
            context.node_config[REVOCATIONS_NODE_CONFIG_KEY] = str(tmp_path / "revoked.bin")
    revoked_node = 100 + REVOKED
    if not listed:
        rounds, _ = _run(grid, cfg, authenticated=True)
        assert len(rounds) == 1 and rounds[0].clients == cfg.clients
        assert not any(r.has_error() for _, r in grid.replies)
        assert len(grid.replies_to("unmask")) == cfg.clients
        return
    with pytest.raises(SecAggError) as exc:
        _run(grid, cfg, authenticated=True)
    slot = next(
        int(m.content[SECAGG_KEY]["client-id"])
        for m in grid.sent
        if _stage(m) == "advertise" and m.metadata.dst_node_id == revoked_node
    )
    refusal = f"roster slot {slot}: device 'device-{REVOKED}' of cohort 'fleet' is revoked"
    assert re.search(rf"only 1 clients shared keys.*SecAggAuthError.*{re.escape(refusal)}", str(exc.value))
    adverts = grid.replies_to("advertise")
    assert len(adverts) == cfg.clients and not any(r.has_error() for r in adverts)  # the server seated node 2
    shares = {r.metadata.src_node_id: r for r in grid.replies_to("share")}
    assert len(shares) == cfg.clients and not shares[revoked_node].has_error()
    for node, r in shares.items():
        if node != revoked_node:
            assert r.has_error() and not r.has_content()
            assert "SecAggAuthError" in r.error.reason and refusal in r.error.reason
    assert not any(_stage(m) in {"consistency", "unmask"} for m in grid.sent)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)


def test_a_server_holding_the_list_leaves_the_revoked_node_out_and_the_round_goes_on_exact(
    loopback_grid, tmp_path
) -> None:
    """The same round with the list on the ServerApp too (``revocations=``, as ``serve --secagg-revocations``):
    it refuses node 2's signed advertisement, so node 2 is not in the roster, gets no share or train message,
    and the round completes with the other nodes, none refusing anything. Its model equals, exactly, the same
    round in which node 2 (not enrolled there) drops out at key advertisement on its own. Node 2 is the leaked
    key's holder: it never sees the list the strategy sends with the advertisement (an honest node 2 would take it
    and sit the round out itself), so the strategy's own refusal is what leaves it out."""
    cfg = CFG.replace(rounds=1)
    run = RunEnrollment(cohort="fleet")
    write_revocations(
        tmp_path / "revoked.bin",
        revoke(run.authority, [(f"device-{REVOKED}", "fleet")], issued=1_800_000_000),
    )

    class Grid(_Recording, loopback_grid):
        def rewrite(self, messages):
            for m in messages:
                if _stage(m) == "advertise" and m.metadata.dst_node_id == 100 + REVOKED:
                    m.content[SECAGG_KEY].pop("revocations", None)
            return messages

    def grid(enrol_revoked: bool) -> Grid:
        g = Grid(digits_client_app(cfg), cfg.clients)
        for context in g.contexts.values():
            i = int(context.node_config["partition-id"])
            if i != REVOKED:
                context.node_config.update(run.write_node_config(tmp_path, f"device-{i}"))
                context.node_config[REVOCATIONS_NODE_CONFIG_KEY] = str(tmp_path / "revoked.bin")
            elif enrol_revoked:
                context.node_config.update(run.write_node_config(tmp_path, f"device-{i}"))
        return g

    revoked_node = 100 + REVOKED
    listed = grid(enrol_revoked=True)
    rounds, finals = _run(listed, cfg, authenticated=True, revocations=str(tmp_path / "revoked.bin"))
    assert len(rounds) == 1
    assert not any(r.has_error() for _, r in listed.replies)  # node 2 advertised; the server refused it
    assert len(listed.replies_to("advertise")) == cfg.clients
    for stage in ("share", "consistency", "unmask"):
        assert {r.metadata.src_node_id for r in listed.replies_to(stage)} == {
            100 + i for i in range(cfg.clients) if i != REVOKED
        }, stage
    to_revoked = [m for m in listed.sent if m.metadata.dst_node_id == revoked_node]
    assert [_stage(m) for m in to_revoked if m.metadata.message_type in {"query.secagg", "train"}] == [
        "advertise"
    ]

    alone = grid(enrol_revoked=False)  # node 2 refuses the authenticated round at key advertisement
    expected_rounds, expected = _run(alone, cfg, authenticated=True)
    assert "SecAggAuthError" in next(r.error.reason for _, r in alone.replies if r.has_error())
    assert [r.test_accuracy for r in rounds] == [r.test_accuracy for r in expected_rounds]
    assert finals.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)


def test_the_strategy_takes_a_list_only_for_authenticated_rounds(loopback_grid, tmp_path) -> None:
    """``revocations=`` without authenticated rounds, or without SecAgg, is a ConfigError (no signed
    advertisement to refuse); a malformed list file is one too, naming it, before any round opens."""
    path = tmp_path / "revoked.bin"
    write_revocations(path, revoke(EnrollmentAuthority.generate(), [("device-1", "fleet")], issued=1))
    with pytest.raises(ConfigError, match="only authenticated rounds"):
        SecAggStrategy(revocations=str(path))
    with pytest.raises(ConfigError, match="set secagg=True"):
        _run(
            loopback_grid(digits_client_app(CFG), CFG.clients),
            CFG.replace(secagg=False),
            revocations=str(path),
        )
    (tmp_path / "bad.bin").write_bytes(b"DPRL" + bytes(200))
    with pytest.raises(ConfigError, match="bad.bin.*keys revoke"):
        _run(loopback_grid(digits_client_app(CFG), CFG.clients), CFG, authenticated=True,
             revocations=str(tmp_path / "bad.bin"))  # fmt: skip


def test_a_stale_list_refuses_authenticated_rounds_on_the_node_and_the_strategy(
    loopback_grid, tmp_path
) -> None:
    """Expiry applies on Flower too: a node whose ``secagg-revocations`` file holds a list past its next update
    (beyond 300 s of clock skew) refuses an authenticated round, typed, saying where a current list comes from
    (the strategy, or its file); a SecAggStrategy given a stale list refuses to start the round."""
    run = RunEnrollment(cohort="fleet")
    node = run.write_node_config(tmp_path, "device-0")
    now = int(time.time())
    stale = revoke(run.authority, [("device-3", "fleet")], issued=now - 3 * 3600, valid_s=3600)
    write_revocations(tmp_path / "stale.bin", stale)
    creds = node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "stale.bin")})
    with pytest.raises(
        RevocationsStale, match=r"the server's SecAggStrategy\(revocations=\) sends a current"
    ):
        _check_authentication(True, creds, 1)
    fresh = revoke(run.authority, [], issued=now, previous=stale)
    write_revocations(tmp_path / "fresh.bin", fresh)
    _check_authentication(
        True, node_credentials({**node, REVOCATIONS_NODE_CONFIG_KEY: str(tmp_path / "fresh.bin")}), 1
    )
    with pytest.raises(RevocationsStale, match="the strategy's"):
        _run(loopback_grid(digits_client_app(CFG), CFG.clients), CFG, authenticated=True, revocations=stale)


def _strategy(**revocations) -> SecAggStrategy:
    """An authenticated SecAggStrategy over CFG's task, given ``revocations`` (and its authority key)."""
    from deltaplane.engine import ServerStep, make_task

    task = make_task(CFG)
    step = ServerStep.for_run(CFG, task, task.build_model(0).state_dict(), base_id="m", simulation=True)
    return SecAggStrategy(server_step=step, clip_range=CFG.secagg_range, authenticated=True, **revocations)


@pytest.fixture
def authority_files(tmp_path):
    """An enrollment authority, its public key file (what ``enrollment_authority=`` names) and a list path."""
    run = RunEnrollment(cohort="fleet")
    pub = tmp_path / "enrollment.ed25519.pub"
    pub.write_text(run.authority.public_text() + "\n")
    return run.authority, str(pub), tmp_path / "revoked.bin"


def test_the_strategy_checks_its_list_at_construction_before_any_round(authority_files) -> None:
    """Signature, authority and staleness are checked when the strategy is built (they were checked at each
    round's start, after the ServerApp had started, and the signature never): a list signed by another
    authority, a forged one, or one past its next update fails the construction, named."""
    authority, pub, path = authority_files
    now = int(time.time())
    good = revoke(authority, [("device-3", "fleet")], issued=now)
    write_revocations(path, good)
    assert _strategy(revocations=str(path), enrollment_authority=pub)._revocations() == good
    rogue = EnrollmentAuthority.generate()
    write_revocations(path, revoke(rogue, [], issued=now))  # re-signed by another authority's key
    with pytest.raises(ConfigError, match=f"revoked.bin.*{rogue.id.hex()}.*enrollment_authority=") as exc:
        _strategy(revocations=str(path), enrollment_authority=pub)
    assert authority.id.hex() in str(exc.value)
    forged = dataclasses.replace(good, sequence=9, signature=revoke(rogue, [], issued=now).signature)
    with pytest.raises(ConfigError, match="forged or altered"):
        _strategy(revocations=forged, enrollment_authority=pub)
    stale = revoke(authority, [], issued=now - 3 * 3600, valid_s=3600, previous=good)
    write_revocations(path, stale)
    with pytest.raises(RevocationsStale, match="revoked.bin"):
        _strategy(revocations=str(path), enrollment_authority=pub)


def test_a_stale_list_file_fails_the_construction_without_the_key_too(authority_files) -> None:
    authority, _, path = authority_files
    write_revocations(path, revoke(authority, [], issued=int(time.time()) - 3 * 3600, valid_s=3600))
    with pytest.raises(RevocationsStale, match="revoked.bin.*next update"):
        _strategy(revocations=str(path))


@pytest.mark.parametrize("keyed", [True, False], ids=["verified", "unverified"])
def test_the_strategy_refuses_its_list_file_rolled_back_as_a_node_does(authority_files, keyed) -> None:
    """The strategy re-reads its file each round under the nodes' rule (one per-process high-water mark per file
    and authority): an older list, validly signed, or another list of the same number, is a RevocationRollback
    naming both numbers — at a round, and at the construction of another strategy in the same process. Without
    the authority key too (the mark is the process's: a bogus number written there lasts until a restart)."""
    authority, pub, path = authority_files
    key = {"enrollment_authority": pub} if keyed else {}
    now = int(time.time())
    first = revoke(authority, [], issued=now)
    second = revoke(authority, [("device-3", "fleet")], issued=now, previous=first)
    write_revocations(path, second)
    strategy = _strategy(revocations=str(path), **key)
    write_revocations(path, first)  # rolled back: device-3 would be seated again
    with pytest.raises(
        RevocationRollback, match="revoked.bin: refused revocation list number 1.*number 2"
    ) as exc:
        strategy._revocations()  # what each round's key advertisement reads
    assert (exc.value.sequence, exc.value.held) == (1, 2) and "keys revoke" in str(exc.value)
    with pytest.raises(RevocationRollback):
        _strategy(revocations=str(path), **key)
    write_revocations(path, revoke(authority, [("device-4", "fleet")], issued=now, previous=first))
    with pytest.raises(RevocationRollback, match="another list of that number"):
        strategy._revocations()
    third = revoke(authority, [], issued=now, previous=second)
    write_revocations(path, third)
    assert strategy._revocations() == third


def _offering_grid(loopback_grid, tmp_path, cfg, run, held, *, filed=lambda i: True, swap=None):
    """A recording loopback grid of ``cfg.clients`` enrolled nodes, node i holding ``held`` in its own
    ``secagg-revocations`` file (``node-i.bin``) when ``filed(i)``, else no file. ``swap``: the bytes a man in the
    middle puts in place of the list each key advertisement carries."""

    class Grid(_Recording, loopback_grid):
        def rewrite(self, messages):
            for m in messages:
                if swap is not None and _stage(m) == "advertise":
                    m.content[SECAGG_KEY]["revocations"] = swap
            return messages

    grid = Grid(digits_client_app(cfg), cfg.clients)
    for context in grid.contexts.values():
        i = int(context.node_config["partition-id"])
        context.node_config.update(run.write_node_config(tmp_path, f"device-{i}"))
        if filed(i):
            write_revocations(tmp_path / f"node-{i}.bin", held)
            context.node_config[REVOCATIONS_NODE_CONFIG_KEY] = str(tmp_path / f"node-{i}.bin")
    return grid


NO_FILE = 3  # a node enrolled without a revocation file: its run state keeps the list it is offered


def test_nodes_take_the_strategys_newer_list_and_the_revoked_node_sits_out_exact(
    loopback_grid, tmp_path
) -> None:
    """The strategy's list reaches the nodes with the round's key advertisement, as the service serves fleet
    devices theirs. Every node starts from an old list past its next update (it alone would refuse the round:
    RevocationsStale); the strategy holds a newer one revoking device-2. Every node takes it (the file-less node in
    its run state, the others in their file, 0600, byte for byte), so node 2 sees its own certificate revoked and
    sits the round out at key advertisement (typed, before it trains), and the round completes with the other
    three, exactly the round in which node 2 is not enrolled at all."""
    cfg = CFG.replace(rounds=1)
    run = RunEnrollment(cohort="fleet")
    now = int(time.time())
    old = revoke(run.authority, [], issued=now - 3 * 3600, valid_s=3600)  # stale: alone it refuses the round
    new = revoke(run.authority, [(f"device-{REVOKED}", "fleet")], issued=now, previous=old)
    write_revocations(tmp_path / "server.bin", new)
    pub = tmp_path / "enrollment.ed25519.pub"
    grid = _offering_grid(loopback_grid, tmp_path, cfg, run, old, filed=lambda i: i != NO_FILE)
    server = {"revocations": str(tmp_path / "server.bin"), "enrollment_authority": str(pub)}
    rounds, finals = _run(grid, cfg, authenticated=True, **server)

    assert len(rounds) == 1
    offered = [bytes(m.content[SECAGG_KEY]["revocations"]) for m in grid.sent if _stage(m) == "advertise"]
    assert offered == [new.to_bytes()] * cfg.clients
    for i in range(cfg.clients):
        if i != NO_FILE:
            assert (tmp_path / f"node-{i}.bin").read_bytes() == new.to_bytes()
            assert (tmp_path / f"node-{i}.bin").stat().st_mode & 0o777 == 0o600
    no_file = grid.contexts[100 + NO_FILE]
    assert bytes(no_file.state.config_records["deltaplane.secagg-revocations"]["list"]) == new.to_bytes()
    revoked_node = 100 + REVOKED
    refusal = next(
        r for m, r in grid.replies if m.metadata.dst_node_id == revoked_node and _stage(m) == "advertise"
    )
    assert refusal.has_error() and "SecAggAuthError" in refusal.error.reason
    assert f"device 'device-{REVOKED}' of cohort 'fleet' is revoked" in refusal.error.reason
    assert [r for _, r in grid.replies if r.has_error()] == [refusal]  # the others refused nothing
    to_revoked = [m for m in grid.sent if m.metadata.dst_node_id == revoked_node]
    assert [_stage(m) for m in to_revoked if m.metadata.message_type in {"query.secagg", "train"}] == [
        "advertise"
    ]
    for stage in ("share", "consistency", "unmask"):
        assert {r.metadata.src_node_id for r in grid.replies_to(stage)} == {
            100 + i for i in range(cfg.clients) if i != REVOKED
        }, stage

    (tmp_path / "alone").mkdir()
    expected_grid = _offering_grid(loopback_grid, tmp_path / "alone", cfg, run, new)
    for key in (
        *NODE_CONFIG_KEYS,
        REVOCATIONS_NODE_CONFIG_KEY,
    ):  # node 2 not enrolled: refuses at advertisement
        del expected_grid.contexts[revoked_node].node_config[key]
    expected_rounds, expected = _run(expected_grid, cfg, authenticated=True, **server)
    assert [r.test_accuracy for r in rounds] == [r.test_accuracy for r in expected_rounds]
    assert finals.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)


def _swapped(held, authority, kind: str) -> bytes:
    """What a man in the middle puts in place of the strategy's list: each would seat device-0 as revoked."""
    now = int(time.time())
    victim = [("device-0", "fleet")]
    if (
        kind == "forged"
    ):  # a higher number and device-0 added, under the authority's signature of another list
        return dataclasses.replace(held, sequence=held.sequence + 1, revoked=frozenset(victim)).to_bytes()
    if kind == "foreign":  # validly signed, by another authority's key
        return revoke(EnrollmentAuthority.generate(), victim, issued=now).to_bytes()
    if kind == "rollback":  # the authority's own, a lower number than the nodes hold
        return revoke(authority, victim, issued=now).to_bytes()
    if kind == "oversized":  # past the largest list there can be: refused before it is parsed
        return held.to_bytes() + bytes(REVOCATIONS_MAX_BYTES)
    return b"DPRL" + bytes(200)  # malformed


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("forged", "forged or altered"),
        ("foreign", "does not trust"),
        ("rollback", "refused revocation list number 1: this device holds number 2"),
        ("malformed", "refused revocation list: "),
        ("oversized", f"to {REVOCATIONS_MAX_BYTES} bytes"),
    ],
)
def test_nodes_ignore_a_list_swapped_in_transit_and_keep_their_own(
    loopback_grid, tmp_path, caplog, kind, reason
) -> None:
    """A man in the middle (or the server) swaps the list in the key advertisement for one that would revoke
    device-0: forged, another authority's, an older one of the nodes' authority, or no list at all (malformed,
    oversized). Every node
    refuses it as a fleet device refuses a bad fetch: the reason logged, its own list kept (its file unchanged),
    and the round goes on with every node."""
    cfg = CFG.replace(rounds=1)
    run = RunEnrollment(cohort="fleet")
    now = int(time.time())
    held = revoke(run.authority, [], issued=now, previous=revoke(run.authority, [], issued=now))  # number 2
    write_revocations(tmp_path / "server.bin", held)
    grid = _offering_grid(loopback_grid, tmp_path, cfg, run, held, swap=_swapped(held, run.authority, kind))
    with caplog.at_level("WARNING", logger="deltaplane.flower.secagg"):
        rounds, _ = _run(grid, cfg, authenticated=True, revocations=str(tmp_path / "server.bin"))
    assert len(rounds) == 1 and not any(r.has_error() for _, r in grid.replies)
    assert len(grid.replies_to("unmask")) == cfg.clients
    for i in range(cfg.clients):
        assert (tmp_path / f"node-{i}.bin").read_bytes() == held.to_bytes()
    refusals = [
        r.getMessage() for r in caplog.records if "refused the server's revocation list" in r.getMessage()
    ]
    assert len(refusals) == cfg.clients and all(reason in m and "keeping this node's" in m for m in refusals)

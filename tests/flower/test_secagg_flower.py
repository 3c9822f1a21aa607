"""`--engine flower --secagg`: the SecAgg stages as Flower messages (real Flower app code, loopback Grid)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

import deltaplane.flower.secagg as flower_secagg
from deltaplane.aggregation.secagg.encoding import RingEncoding
from deltaplane.flower import digits_client_app, digits_server_app
from deltaplane.flower.secagg import SECAGG_KEY, SecAggStrategy
from deltaplane.sim import RunConfig, run_simulation

CFG = RunConfig(
    clients=4, rounds=2, local_epochs=1, codec="topk(0.1) | quant(bits=8)", secagg=True, secagg_bits=16,
    secagg_range=1.0, clip="2.0", engine="sequential",
)  # fmt: skip


def _context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def _reply_bytes(msg) -> list[bytes]:
    out = []
    for record in msg.content.values():
        if isinstance(record, ConfigRecord):
            out += [bytes(v) for v in record.values() if isinstance(v, bytes)]
        elif hasattr(record, "values"):
            for v in record.values():
                if hasattr(v, "numpy"):
                    out.append(v.numpy().tobytes())
    return out


def test_flower_secagg_matches_the_in_process_engine_and_never_shows_plaintext(
    loopback_grid, monkeypatch, plaintext_watch
) -> None:
    encode = RingEncoding.encode

    def spy_encode(self, delta, weight, rng):  # runs on the node: register what must stay there
        codes = encode(self, delta, weight, rng)
        for k in range(self.bits, self.bits + 4):
            plaintext_watch.add_codes(codes, bits=self.bits, ring_bits=k, label="node codes")
        plaintext_watch.add_floats(delta.flatten(), label="node update")
        return codes

    monkeypatch.setattr(RingEncoding, "encode", spy_encode)
    decompress = flower_secagg.decompress

    def spy_decompress(payload, **kw):  # the node decodes its own compressed payload: it must not leave
        mid = len(payload) // 2
        plaintext_watch.patterns[bytes(payload[mid : mid + 48])] = "node's compressed payload"
        return decompress(payload, **kw)

    monkeypatch.setattr(flower_secagg, "decompress", spy_decompress)

    replies: list = []

    class RecordingGrid(loopback_grid):
        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages, timeout=timeout)
            replies.extend(out)
            return out

    strategies: list = []
    rounds, finals = [], {}
    server = digits_server_app(
        CFG,
        on_round=lambda m, t: rounds.append(m),
        on_done=lambda s, st: (finals.update(st), strategies.append(s)),
    )
    grid = RecordingGrid(digits_client_app(CFG), CFG.clients)
    server(grid=grid, context=_context())

    expected = run_simulation(CFG)
    # the same sums in the integer domain give the same models, accuracies and protocol bytes
    assert [r.test_accuracy for r in rounds] == [r.test_accuracy for r in expected.rounds]
    assert [r.uplink_bytes for r in rounds] == [r.uplink_bytes for r in expected.rounds]
    for k, v in expected.final_state.items():
        torch.testing.assert_close(finals[k], v, rtol=0, atol=0)

    (strategy,) = strategies
    assert isinstance(strategy, SecAggStrategy)
    stages = [m.content.config_records[SECAGG_KEY] for m in grid.sent if SECAGG_KEY in m.content]
    assert {str(r["stage"]) for r in stages if "stage" in r} == {"advertise", "share", "unmask"}
    # four messages a node and round, and once per node its device id (partition-id) before the first round
    assert len(plaintext_watch.patterns) > 50 and len(replies) == (CFG.rounds * 4 + 1) * CFG.clients
    for i, reply in enumerate(replies):  # every byte every node sent the server
        assert "arrays" not in reply.content and "num-examples" not in reply.content.metric_records.get(
            "metrics", {}
        )
        for data in _reply_bytes(reply):
            plaintext_watch.check_bytes(data, f"reply {i}")
    assert plaintext_watch.check_object(strategy, "SecAggStrategy") > 10


def test_flower_secagg_survives_a_node_that_fails_a_stage(loopback_grid) -> None:
    cfg = CFG.replace(clients=6, rounds=1, clip=None)
    app = digits_client_app(cfg)

    class FlakyGrid(loopback_grid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            out = super().send_and_receive(messages, timeout=timeout)
            kinds = {m.metadata.message_type for m in messages}
            if kinds == {"train"}:
                return [r for r in out if r.metadata.src_node_id != 103]  # node 3 never uploads
            return out

    rounds, strategies = [], []
    server = digits_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: strategies.append(s)
    )
    server(grid=FlakyGrid(app, cfg.clients), context=_context())
    # six sampled, as in process (clients counts the sampled devices); node 3 dropped out, refused nothing
    assert len(rounds) == 1 and rounds[0].clients == 6 and rounds[0].rejected == 0
    assert sorted(strategies[0].traffic[-1].node_ids) == [100, 101, 102, 104, 105]
    assert np.isfinite(rounds[0].test_accuracy)


@pytest.mark.slow
def test_ray_flower_engine_with_secagg_matches_in_process() -> None:
    """`deltaplane run --engine flower --secagg` on Ray: same accuracies and bytes as in process (measured equal)."""
    from deltaplane.flower import run_flower

    cfg = RunConfig(clients=3, rounds=2, local_epochs=1, secagg=True)
    flower = run_flower(cfg, num_cpus=2)
    expected = run_simulation(cfg)
    assert [r.test_accuracy for r in flower.rounds] == [r.test_accuracy for r in expected.rounds]
    assert [r.uplink_bytes for r in flower.rounds] == [r.uplink_bytes for r in expected.rounds]


@pytest.mark.parametrize(
    ("neighbours", "threshold", "named"),
    [(2, 2, "neighbours=2"), (None, 26, "threshold=26")],  # 50 nodes: a degree-2 graph; a bare majority
)
def test_a_node_refuses_secagg_parameters_that_let_the_server_unmask_it(neighbours, threshold, named) -> None:
    """The server picks the SecAgg+ degree and threshold; nodes took any valid ones, so a server could seat two
    colluders as a node's only neighbours (degree 2, threshold 2). The node now refuses, naming the parameter."""
    import json

    from flwr.app import Message

    from deltaplane.aggregation.secagg import SecAggConfig, SecAggError

    cfg = SecAggConfig(num_clients=50, threshold=threshold, bits=8, vector_size=4, neighbours=neighbours)
    rec = ConfigRecord(
        {
            "stage": "advertise",
            "config": json.dumps(cfg.to_dict()),
            "encoding": "[8, 1.0, 0.0]",
            "client-id": 0,
            "secagg-version": 5,
        }
    )
    msg = Message(RecordDict({SECAGG_KEY: rec}), dst_node_id=0, message_type=flower_secagg.QUERY_TYPE)
    with pytest.raises(SecAggError, match=named):
        flower_secagg.secagg_query(msg, _context())


def test_a_node_refuses_a_ring_narrower_than_its_own_distributed_dp_minimum() -> None:
    """Under distributed DP a node's least ring range is C + 6σ_d from its own config (``add_secagg(app,
    min_range=…)``, what ``digits_client_app`` passes): a server opening a narrower ring would have it clip the
    noised values. The node used to take any range; it now refuses at key advertisement, and joins at it."""
    import json

    from flwr.app import Message

    from deltaplane.aggregation.secagg import SecAggConfig, SecAggRangeError

    cfg = SecAggConfig(num_clients=5, threshold=4, bits=8, vector_size=4)

    def advertise(clip_range: float) -> Message:
        rec = ConfigRecord(
            {
                "stage": "advertise",
                "config": json.dumps(cfg.to_dict()),
                "encoding": json.dumps([8, clip_range, 0.0]),
                "client-id": 0,
                "secagg-version": 5,
            }
        )
        return Message(RecordDict({SECAGG_KEY: rec}), dst_node_id=0, message_type=flower_secagg.QUERY_TYPE)

    with pytest.raises(SecAggRangeError, match="ring range is 3, below the 7.55"):
        flower_secagg.secagg_query(advertise(3.0), _context(), min_range=7.55)
    assert flower_secagg.secagg_query(advertise(7.55), _context(), min_range=7.55)


def test_a_node_refuses_a_share_stage_whose_roster_is_a_number_not_bytes() -> None:
    """The node read the server's roster with ``bytes(value)``, which turns an int into that many zero bytes: a
    server naming 2**62 made every node raise MemoryError (an 8 GiB roster would have been allocated). The roster
    and requests must be bytes; anything else is a typed DecodeError naming the field, before any allocation."""
    import json

    from flwr.app import Message

    from deltaplane.aggregation.secagg import SecAggConfig
    from deltaplane.errors import DecodeError

    cfg = SecAggConfig(num_clients=5, threshold=4, bits=8, vector_size=4)
    context = _context()

    def query(fields: dict) -> Message:
        msg = Message(
            RecordDict({SECAGG_KEY: ConfigRecord(fields)}),
            dst_node_id=0,
            message_type=flower_secagg.QUERY_TYPE,
        )
        return flower_secagg.secagg_query(msg, context)

    advert = {
        "config": json.dumps(cfg.to_dict()),
        "encoding": "[8, 1.0, 0.0]",
        "client-id": 0,
        "secagg-version": 5,
    }
    assert query({"stage": "advertise", **advert})
    for roster in (2**62, 3, "not bytes"):
        with pytest.raises(DecodeError, match="'roster' must be bytes, not (int|str)"):
            query({"stage": "share", "round": cfg.round_id, "roster": roster})


@pytest.mark.parametrize(
    "garbled",
    [ConfigRecord({"message": "not bytes"}), ConfigRecord({"other": b"x"}), MetricRecord({"message": 1.0})],
    ids=["str-message", "no-message", "not-a-config-record"],
)
def test_flower_secagg_drops_a_node_whose_reply_is_malformed(loopback_grid, garbled) -> None:
    """A node's SecAgg record with no bytes 'message' (or not a ConfigRecord) used to raise KeyError /
    TypeError out of the strategy and end the run for every node; it is now that node dropping out."""
    cfg = CFG.replace(clients=6, rounds=1, clip=None)

    class GarblingGrid(loopback_grid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            out = super().send_and_receive(messages, timeout=timeout)
            if {m.metadata.message_type for m in messages} == {"train"}:
                for r in out:
                    if r.metadata.src_node_id == 103:
                        r.content = RecordDict({**r.content, SECAGG_KEY: garbled})
            return out

    rounds, strategies = [], []
    server = digits_server_app(
        cfg, on_round=lambda m, t: rounds.append(m), on_done=lambda s, st: strategies.append(s)
    )
    server(grid=GarblingGrid(digits_client_app(cfg), cfg.clients), context=_context())
    assert len(rounds) == 1 and np.isfinite(rounds[0].test_accuracy)
    assert rounds[0].clients == 6  # sampled; node 3 dropped out of the sum, the others were unmasked


@pytest.mark.parametrize("one_drops", [True, False], ids=["below-m_min", "exactly-m_min"])
def test_nodes_refuse_to_unmask_fewer_than_m_min_when_the_strategy_has_no_floor(
    loopback_grid, monkeypatch, one_drops
) -> None:
    """Distributed DP with m_min = 6 of 6 nodes; the strategy's SecAgg server is built without its floor (a
    misconfigured or protocol-breaking server) and node 3's masked input never arrives: 5 survivors, enough for
    SecAgg's threshold of 5, so the server asks for unmasking. Each node now refuses on its own (the m_min of
    its own config, add_secagg's min_inputs): every unmask reply is an error naming the numbers and carries no
    share, and the sum cannot be unmasked. With all 6 (exactly m_min) they answer and the round publishes."""
    from deltaplane.aggregation.secagg import SecAggError, ServerEndpoint

    cfg = CFG.replace(clients=6, rounds=1, dp_noise=0.5, dp_delta=1e-3, secagg_min_contributors=6,
                      secagg_range=8.0, clip="1.0")  # fmt: skip
    monkeypatch.setattr(
        flower_secagg, "ServerEndpoint", lambda config, min_inputs=0, **kw: ServerEndpoint(config, **kw)
    )
    unmask_replies: list = []

    class DroppingGrid(loopback_grid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            out = super().send_and_receive(messages, timeout=timeout)
            if {m.metadata.message_type for m in messages} == {"train"} and one_drops:
                return [r for r in out if r.metadata.src_node_id != 103]  # node 3's upload is lost
            records = [m.content.config_records.get(SECAGG_KEY) for m in messages]
            if records and all(r is not None and r.get("stage") == "unmask" for r in records):
                unmask_replies.extend(out)
            return out

    rounds: list = []
    server = digits_server_app(cfg, on_round=lambda m, t: rounds.append(m))
    grid = DroppingGrid(digits_client_app(cfg), cfg.clients)
    if not one_drops:
        server(grid=grid, context=_context())
        assert len(unmask_replies) == 6 and not any(r.has_error() for r in unmask_replies)
        assert len(rounds) == 1 and np.isfinite(rounds[0].test_accuracy)
        return
    with pytest.raises(SecAggError, match="shares"):
        server(grid=grid, context=_context())
    assert len(unmask_replies) == 5  # the floorless server asked every survivor
    for r in unmask_replies:
        assert r.has_error() and not r.has_content()  # an error reply: no share
        assert (
            "refusing to unmask a sum of 5 masked inputs" in r.error.reason and "at least 6" in r.error.reason
        )


def test_the_strategy_refuses_a_ring_range_that_would_clip_the_nodes_noised_values() -> None:
    """Distributed DP (z 2, clip 1, m_min 2: clip + 6σ_d = 9.49): SecAggStrategy's clip_range clips each node's
    noised values before the sum, so one below that is a ConfigError naming the least range; digits_server_app
    passes the config's own range, which RunConfig sized so."""
    from deltaplane.engine import ServerStep, make_task
    from deltaplane.errors import ConfigError

    cfg = RunConfig(
        clients=4, secagg=True, clip="1.0", dp_noise=2.0, dp_delta=1e-3, secagg_min_contributors=2
    )
    task = make_task(cfg)
    step = ServerStep.for_run(cfg, task, task.build_model(0).state_dict(), base_id="m", simulation=True)
    with pytest.raises(ConfigError, match=r"at least clip \+ 6·σ_d = 9\.49"):
        SecAggStrategy(server_step=step, clip_range=8.0)
    assert SecAggStrategy(server_step=step, clip_range=cfg.secagg_range).encoding.clip_range == 9.49


def test_flower_secagg_refuses_a_round_of_one_node(monkeypatch) -> None:
    # a round that sampled one node (a strategy allowing one available node) crashed inside SecAggConfig
    # ("num_clients must be at least 2"); it is now the lone-input error every driver gives
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from deltaplane.aggregation.secagg import SecAggError
    from deltaplane.engine import ServerStep, make_task
    from deltaplane.flower.strategy import DeltaStrategy

    cfg = RunConfig(clients=2, secagg=True, clip="1.0")
    task = make_task(cfg)
    state = task.build_model(0).state_dict()
    step = ServerStep.for_run(cfg, task, state, base_id="m", simulation=True)
    strategy = SecAggStrategy(server_step=step, clip_range=cfg.secagg_range)
    one = Message(RecordDict(), dst_node_id=100, message_type="train")
    inner = DeltaStrategy.configure_train

    def sample_one(self, server_round, arrays, config, grid):
        list(inner(self, server_round, arrays, config, grid))  # the real bookkeeping (global model, sampling)
        return [one]

    class NoNodes:
        def get_node_ids(self):
            return [100, 101]

        def send_and_receive(self, messages, *, timeout=None):
            raise AssertionError("nothing may be sent for a round of one node")

    monkeypatch.setattr(DeltaStrategy, "configure_train", sample_one)
    with pytest.raises(SecAggError, match="SecAgg needs at least 2: the sum of a lone masked input"):
        strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), NoNodes())


def test_a_node_that_cannot_take_part_in_a_secagg_round_does_not_train_for_it() -> None:
    """`secagg_mod` used to run the node's training (``call_next``) and only then load the round's SecAgg state:
    a node that missed or refused the round's key advertisement, or got a train instruction without its share
    inbox, spent a full training pass on a round it could not take part in. It now loads and checks the state
    first, fails with a typed SecAggError, and never trains; a node that accepted the round trains as before."""
    import json

    from flwr.app import Message, MessageType

    from deltaplane.aggregation.secagg import SecAggConfig, SecAggError

    class Trained(Exception):
        pass

    trained: list[int] = []

    def train(msg: Message, context: Context) -> Message:  # the spy: the node's training (delta_mod and on)
        trained.append(int(msg.metadata.message_type == MessageType.TRAIN))
        assert (
            SECAGG_KEY not in msg.content
        )  # the mod hands training the instruction without its SecAgg record
        raise Trained

    def advertised(round_id: int) -> Context:
        context = _context()
        cfg = SecAggConfig(num_clients=5, threshold=4, bits=8, vector_size=4, round_id=round_id)
        rec = ConfigRecord(
            {
                "stage": "advertise",
                "config": json.dumps(cfg.to_dict()),
                "encoding": "[8, 1.0, 0.0]",
                "client-id": 0,
                "secagg-version": 5,
            }
        )
        flower_secagg.secagg_query(
            Message(RecordDict({SECAGG_KEY: rec}), dst_node_id=0, message_type=flower_secagg.QUERY_TYPE),
            context,
        )
        return context

    def instruction(**secagg) -> Message:
        return Message(
            RecordDict({SECAGG_KEY: ConfigRecord({"round": 3, **secagg})}), dst_node_id=0,
            message_type=MessageType.TRAIN,
        )  # fmt: skip

    mod = flower_secagg.secagg_mod()
    for context, msg, named in [
        (_context(), instruction(inbox=b"shares"), "holds no SecAgg state for round 3"),
        (advertised(2), instruction(inbox=b"shares"), "state is for round 2, not 3"),
        (advertised(3), instruction(), "carries no share inbox"),
    ]:
        with pytest.raises(SecAggError, match=named):
            mod(msg, context, train)
        assert trained == []
    with pytest.raises(Trained):  # accepted at key advertisement: it trains
        mod(instruction(inbox=b"shares"), advertised(3), train)
    assert trained == [1]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (
            lambda rec: rec.pop("secagg-version"),
            r"node speaks SecAgg message version 5 and the server states none .a SecAggStrategy from before"
            r".*upgrade the server to a release that speaks 5",
        ),
        (
            lambda rec: rec.__setitem__("secagg-version", 4),
            r"server speaks version 4, so every message would be refused; upgrade the server to a release "
            r"that speaks 5",
        ),
        (
            lambda rec: rec.__setitem__("secagg-version", 6),
            r"server speaks version 6, so.*upgrade this node to a release that speaks 6",
        ),
    ],
    ids=["none", "older", "newer"],
)
def test_a_node_refuses_a_server_of_another_secagg_version_at_key_advertisement(
    loopback_grid, change, says
) -> None:
    """The strategy states its SecAgg message version in the advertise record (``secagg-version``, as the HTTP
    invitation's ``secagg_version``); a node refuses a round of another version, or none, at key advertisement
    with a SecAggError saying which side to upgrade: nothing advertised, no node trains, and the ServerApp
    stops naming the nodes' refusal. Forged here by the server's own Grid rewriting the record."""
    from deltaplane.aggregation.secagg import SecAggError

    cfg = CFG.replace(rounds=1)
    stated: list[object] = []

    class Forging(loopback_grid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for m in messages:
                rec = m.content.config_records.get(SECAGG_KEY)
                if rec is not None and rec.get("stage") == "advertise":
                    stated.append(rec.get("secagg-version"))
                    change(rec)
            out = super().send_and_receive(messages, timeout=timeout)
            if stated and len(stated) == len(messages):
                self.adverts = out
            return out

    grid = Forging(digits_client_app(cfg), cfg.clients)
    server = digits_server_app(cfg, on_round=lambda m, t: None)
    with pytest.raises(
        SecAggError, match=r"only 0 clients advertised keys.*SecAggError.*" + says.split(".*")[0]
    ):
        server(grid=grid, context=_context())
    assert stated == [5] * cfg.clients  # what the strategy states
    assert all(r.has_error() and not r.has_content() for r in grid.adverts)
    for r in grid.adverts:
        assert re.search(says, r.error.reason), r.error.reason
    assert not any(m.metadata.message_type == "train" for m in grid.sent)

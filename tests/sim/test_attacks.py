import re

import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.sim.attacks import (
    Backdoor,
    GaussianNoise,
    SignFlip,
    add_trigger,
    choose_malicious,
    parse_attack,
)


def test_parse_specs() -> None:
    atk, frac = parse_attack("backdoor:0.2")
    assert isinstance(atk, Backdoor) and frac == 0.2 and atk.boost == 1.0
    atk, frac = parse_attack("backdoor:0.1:boost=5,target=3")
    assert atk.boost == 5 and atk.target == 3 and frac == 0.1
    assert isinstance(parse_attack("sign_flip:0.3")[0], SignFlip)
    for bad, match in [("nope:0.1", "unknown attack"), ("sign_flip", "needs a malicious fraction"),
                       ("sign_flip:1.5", r"in \(0, 1\)"), ("backdoor:0.2:color=1", "unexpected keyword")]:  # fmt: skip
        with pytest.raises(dp.ConfigError, match=match):
            parse_attack(bad)


def test_update_attacks() -> None:
    g = torch.Generator().manual_seed(0)
    d = dp.Delta({"w": torch.ones(10_000)})
    assert SignFlip(scale=2.0).poison_update(d, g)["w"].unique().tolist() == [-2.0]
    noise = GaussianNoise(std=0.5).poison_update(d, g)["w"]
    assert noise.std().item() == pytest.approx(0.5, rel=0.03)
    assert parse_attack("model_replacement:0.1:boost=8")[0].poison_update(d, g)["w"][0].item() == 8.0


def test_backdoor_and_label_flip_poison_data() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.zeros(10, 1, 8, 8), torch.arange(10)
    px, py = Backdoor(target=7, poison_fraction=0.3).poison_data(x, y, g)
    stamped = (px[:, 0, 5:7, 5:7] == 1.0).all(dim=(1, 2))
    assert stamped.sum() == 3 and (py[stamped] == 7).all() and torch.equal(py[~stamped], y[~stamped])
    assert add_trigger(x)[0, 0].sum().item() == 4.0 and x.sum() == 0  # input untouched
    assert parse_attack("label_flip:0.1")[0].poison_data(x, y, g)[1].tolist() == list(range(9, -1, -1))
    assert len(choose_malicious(100, 0.2, np.random.default_rng(0))) == 20


def test_adaptive_attacks_bounded_backdoor_and_distributed_triggers() -> None:
    from deltaplane.sim.attacks import BoundedBackdoor, DistributedBackdoor

    g = torch.Generator().manual_seed(0)
    atk, frac = parse_attack("bounded_backdoor(0.2, max_norm=1.5, boost=10)")
    assert isinstance(atk, BoundedBackdoor) and frac == 0.2
    for scale in (0.01, 100.0):  # scaled *to* the bound: up from a small update, down from a large one
        d = dp.Delta({"w": torch.full((50,), scale), "b": torch.full((3,), -scale)})
        assert atk.poison_update(d, g).norm() == pytest.approx(1.5, rel=1e-5)
    dba, _ = parse_attack("dba(fraction=0.3)")
    assert isinstance(dba, DistributedBackdoor)
    x, y = torch.zeros(40, 1, 8, 8), torch.arange(40) % 10
    stamps = []
    for rank in range(4):
        px, py = dba.for_attacker(rank).poison_data(x, y, torch.Generator().manual_seed(rank))
        poisoned = px.sum(dim=(1, 2, 3)) > 0
        assert (px[poisoned].sum(dim=(1, 2, 3)) == 1.0).all() and (py[poisoned] == 0).all()  # one pixel each
        stamps.append(px[poisoned][0, 0])
    # the four local triggers are disjoint and together make the global trigger the test images carry
    assert torch.equal(sum(stamps), add_trigger(torch.zeros(1, 1, 8, 8))[0, 0])
    assert dba.for_attacker(5).part == 1


def test_attack_specs_in_the_shared_grammar() -> None:
    a, f = parse_attack("backdoor(0.1, boost=5, target=3)")
    b, g = parse_attack("backdoor:0.1:boost=5,target=3")
    assert (repr(a), f) == (repr(b), g)
    with pytest.raises(dp.ConfigError, match="only the fraction is positional"):
        parse_attack("backdoor(0.1, 5)")
    with pytest.raises(dp.ConfigError, match="must be a number"):
        parse_attack("backdoor(0.1, boost=big)")


def test_an_attack_fraction_that_rounds_to_no_attacker_is_refused() -> None:
    """backdoor(0.1) of 4 clients is round(0.4) = 0 malicious devices: the run went ahead with no attacker at
    all (and reported a backdoor success for an attack that never ran). The config holds it (the population
    engine may apply the fraction to another count); every driver's client step and the CLI's preflight refuse
    it, naming the count."""
    from deltaplane.apps.runner import preflight
    from deltaplane.engine import ClientStep, make_task
    from deltaplane.engine.attacks import choose_malicious
    from deltaplane.errors import ConfigError
    from deltaplane.sim import RunConfig
    from deltaplane.sim.seeding import Stream, numpy_rng

    for spec in ("backdoor:0.1", "sign_flip(0.12)"):
        cfg = RunConfig.from_mapping({"clients": 4, "attack": spec})
        msg = rf"attack '{re.escape(spec)}'.* of 4 clients rounds to no malicious client.*at least 0\.25.*raise clients"
        with pytest.raises(ConfigError, match=msg):
            cfg.attacker_count()
        with pytest.raises(ConfigError, match=msg):
            preflight(
                cfg
            )  # what `deltaplane run` and run_federation ask first, on every engine and transport
        with pytest.raises(ConfigError, match=msg):  # the step every driver builds its devices' rounds with
            ClientStep(cfg, make_task(cfg), base_id="m")
    with pytest.raises(ConfigError, match="rounds to no malicious client"):
        choose_malicious(4, 0.1, numpy_rng(0, Stream.ATTACK))  # it returned no attacker, silently
    cfg = RunConfig(clients=4, attack="backdoor:0.25")  # one of four: accepted, and it attacks
    assert cfg.attacker_count() == 1
    assert len(choose_malicious(cfg.clients, 0.25, numpy_rng(0, Stream.ATTACK))) == 1
    assert RunConfig(clients=4, attack="none").attacker_count() == 0  # no attack at all stays fine
    assert RunConfig(clients=4).attacker_count() == 0


def test_small_mode_keeps_enough_devices_for_one_attacker() -> None:
    """DELTAPLANE_SMALL caps a run at 4 devices, but never below what keeps the attack running: backdoor(0.1)
    needs 6 (round(0.6) = 1). It relied on the config refusing fewer when built; the config no longer does."""
    from deltaplane.cli import _small
    from deltaplane.sim import RunConfig

    small = _small(RunConfig(clients=40, rounds=5, attack="backdoor(0.1)"))
    assert (small.clients, small.rounds, small.attacker_count()) == (6, 2, 1)
    assert _small(RunConfig(clients=40, rounds=5)).clients == 4


def test_the_population_engine_counts_an_attack_fraction_over_its_registered_devices() -> None:
    """The config's message on the population engine names its registered devices (its ``clients``)."""
    from deltaplane.errors import ConfigError
    from deltaplane.sim import RunConfig

    cfg = RunConfig(clients=100, engine="population", attack="sign_flip(0.001)")
    with pytest.raises(ConfigError, match=r"of 100 registered devices \(clients\) .*register more devices"):
        cfg.attacker_count()
    assert cfg.replace(clients=1000).attacker_count() == 1


TABULAR = """
import torch
from torch import nn
from deltaplane.engine import Dataset, Task

X = torch.randn(300, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()  # two classes


def make():
    return Task(
        name="tabular",
        model=lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)),
        train=Dataset(X[60:], Y[60:]),
        test=Dataset(X[:60], Y[:60]),
    )
"""


@pytest.fixture
def tabular(tmp_path, monkeypatch):
    import sys

    (tmp_path / "tabulartask.py").write_text(TABULAR)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tabulartask:make"
    sys.modules.pop("tabulartask", None)


@pytest.mark.parametrize("engine", ["sequential", "batched", "population"])
def test_label_flip_flips_within_the_tasks_classes(tabular: str, engine: str) -> None:
    """label_flip flipped with the digits' 10 classes whatever the task: a 2-class task's labels became 9 and
    8, an index error in the loss in round 1. It now flips within the task's classes (1 ↔ 0)."""
    from deltaplane.apps.runner import run_federation
    from deltaplane.engine import RunConfig, make_task

    cfg = RunConfig(task=tabular, clients=4, rounds=1, engine=engine, attack="label_flip(0.5)")
    assert len(run_federation(cfg).rounds) == 1
    task = make_task(cfg)
    flip = parse_attack("label_flip(0.5)")[0].fit(task)
    y = torch.tensor([0, 1, 1])
    assert flip.poison_data(task.test.x[:3], y, torch.Generator())[1].tolist() == [1, 0, 0]
    with pytest.raises(
        dp.errors.ConfigError, match=r"flips labels into 0..9, but task 'tabular' has 2 classes"
    ):
        parse_attack("label_flip(0.5, num_classes=10)")[0].fit(task)


@pytest.mark.parametrize("attack", ["backdoor(0.5)", "dba(0.5)", "model_replacement(0.5)"])
def test_a_pixel_trigger_on_inputs_that_are_not_images_is_refused_before_the_run(
    tabular: str, attack: str
) -> None:
    """The trigger indexes the last two axes as pixels: on inputs (N, 6) it overwrote two features of two
    samples and the run reported a backdoor success for a backdoor never planted. Refused, with the reason."""
    from deltaplane.apps.runner import preflight
    from deltaplane.engine import RunConfig

    with pytest.raises(dp.errors.UnsupportedOption, match=r"stamps a pixel square on images .*shape \[6\]"):
        preflight(RunConfig(task=tabular, clients=4, rounds=1, attack=attack))
    with pytest.raises(dp.errors.ConfigError, match=r"target 12 is not a class of task 'digits' \(0..9\)"):
        preflight(RunConfig(clients=4, rounds=1, attack="backdoor(0.5, target=12)"))


@pytest.mark.parametrize(
    "spec", ["backdoor:0.2:boost=5:target=3", "sign_flip:0.2::scale=3", "gaussian:0.1:std=2:"]
)
def test_the_legacy_form_refuses_a_third_colon_instead_of_dropping_what_follows(spec) -> None:
    """'name:fraction:key=value,...' was split on every ':' and only the first three parts read: the target of
    'backdoor:0.2:boost=5:target=3' was silently 0, the scale of 'sign_flip:0.2::scale=3' silently 1."""
    with pytest.raises(dp.ConfigError, match="separate the parameters with ','"):
        parse_attack(spec)


@pytest.mark.parametrize("compact", [False, True])
def test_a_forged_frame_is_well_formed_and_refused_for_its_shape_alone(compact: bool) -> None:
    """`malformed_frame`'s bytes pass every check of the frame (magic, lengths, CRC-32C: they decode without a
    layout to expect) and only the tensor table lies: the first asymmetric shape reversed, same element count.
    A server decoding against its model's layout refuses it as a ShapeMismatch."""
    from deltaplane.codecs import Layout, WireSession, decompress, is_compact
    from deltaplane.errors import ShapeMismatch
    from deltaplane.sim.attacks import MalformedFrame
    from deltaplane.sim.model import build_model

    g = torch.Generator().manual_seed(0)
    delta = dp.Delta({k: torch.randn(v.shape, generator=g) for k, v in build_model(0).state_dict().items()})
    spec, layout = "topk(0.05) | quant(bits=8)", dp.Layout.of(delta)
    session = WireSession.create(layout, spec, base_id="m", entropy=True) if compact else None
    compressor = dp.Compressor(spec, error_feedback=False, seed=0)
    if session is not None:
        honest = compressor.compress(delta, base_version=4, session=session)
    else:
        honest = compressor.compress(delta, base_id="m", base_version=4)
    forged = MalformedFrame().forge(honest, session)
    assert forged != honest and is_compact(forged) == compact
    base = ("m", 4)
    sent = decompress(honest, expect_base=base, expect_layout=layout, session=session)
    with pytest.raises(ShapeMismatch, match="conv1.weight.*\\[3, 3, 1, 8\\]"):
        decompress(forged, expect_base=base, expect_layout=Layout.of(delta), session=session)
    if not compact:  # a lax reader (no layout expected) takes it: well-formed, CRC valid, the same base
        lax = decompress(forged, expect_base=base)
        assert lax["conv1.weight"].shape == (3, 3, 1, 8) and torch.equal(
            lax["fc1.weight"], sent["fc1.weight"]
        )


def test_the_server_step_refuses_a_forged_frame_and_closes_the_round_without_it() -> None:
    """The refusal is the update's alone: the round closes on the honest uploads to the very weights of a round
    that never saw the forged one, and names the refusal's reason."""
    from deltaplane.engine import ClientStep, ServerStep, build_clients, make_task
    from deltaplane.errors import ShapeMismatch
    from deltaplane.sim.model import build_model

    cfg = dp.sim.RunConfig(
        clients=3, rounds=1, codec="topk(0.05) | quant(bits=8)", attack="malformed_frame(0.34)"
    )
    task = make_task(cfg)
    state = build_model(0).state_dict()
    step = ClientStep(cfg, task, base_id="b")
    (bad,) = step.malicious
    uploads = [step.run(c, task.build_model(0), state, 1, 0) for c in build_clients(cfg, task)]
    servers = [ServerStep.for_run(cfg, task, state, base_id="b") for _ in range(2)]
    for server in servers:
        server.open(1)
    taken = [servers[0].receive_payload(str(u.cid), u.payload, u.num_samples) for u in uploads]
    assert taken == [u.cid != bad for u in uploads]
    assert isinstance(servers[0].last_rejection.error, ShapeMismatch)
    for u in uploads:
        if u.cid != bad:
            servers[1].receive_payload(str(u.cid), u.payload, u.num_samples)
    with_forged, without = servers[0].close(), servers[1].close()
    assert (with_forged.accepted, len(with_forged.rejections)) == (2, 1)
    assert all(torch.equal(with_forged.state[k], without.state[k]) for k in without.state)


def test_a_forged_frame_under_secagg_is_refused_with_the_reason() -> None:
    with pytest.raises(dp.ConfigError, match="forges a wire frame.*secagg"):
        dp.sim.RunConfig(clients=4, secagg=True, clip="2.0", attack="malformed_frame(0.25)")

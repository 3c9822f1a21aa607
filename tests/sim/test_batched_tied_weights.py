"""The batched and population engines and tied weights (one parameter under two names, as a decoder's output
layer sharing its embedding table): stacked training trains the parameter once, under the name a device's update
carries it (its kept name, engine.tied), and the server copies the aggregate to the aliases as on every driver.

Before, stacked training kept a tied tensor under its *first* name while a device's update carries its last, so
the batched engine fell back to the sequential loop for such a model and the population engine refused it."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import Tensor, nn

import deltaplane.sim.population as population
import deltaplane.sim.simulation as simulation
from deltaplane.engine import make_task
from deltaplane.engine.tied import tied_aliases, untie
from deltaplane.sim import RunConfig, run_simulation
from deltaplane.sim.batched import BatchedTrainer, batching_blocker
from deltaplane.sim.client import Client
from deltaplane.sim.seeding import Stream, torch_generator


class _Tied(nn.Module):
    """A digits MLP whose two hidden layers share one weight matrix (``a.weight`` is the alias, ``b.weight``
    the kept name); the vmap path of the stacked step."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


class _TiedStacked(_Tied):
    """:class:`_Tied` with its own ``forward_stacked`` (the other path), which reads the weight under both
    names, as a user's stacked forward written for the plain module would."""

    def forward_stacked(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        def linear(h: Tensor, layer: str) -> Tensor:  # h (K, B, in) → (K, B, out)
            return torch.baddbmm(
                params[f"{layer}.bias"].unsqueeze(1), h, params[f"{layer}.weight"].transpose(1, 2)
            )

        h = torch.relu(linear(x.flatten(2), "a"))
        return linear(torch.relu(linear(h, "b")), "head")


def _digits_shards(n: int = 3) -> list:
    task = make_task(RunConfig())
    return [task.train.subset(range(60 * i, 60 * i + 40 + 15 * i)) for i in range(n)]


def test_a_tied_model_is_batched_under_its_kept_names() -> None:
    assert batching_blocker(_Tied()) is None
    trainer = BatchedTrainer(_Tied())
    assert tied_aliases(_Tied()) == {"a.weight": "b.weight"}
    assert trainer.names == ["a.bias", "b.weight", "b.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("model", [_Tied, _TiedStacked])
def test_batched_deltas_of_a_tied_model_equal_a_devices_untied_update(model: type[nn.Module]) -> None:
    """Each client's stacked delta equals the sequential loop's delta without its aliases (what a device
    uploads), within the batched tolerance (docs/sim-speed.md: 4e-6), the tied weight included: its gradient
    sums both uses."""
    cfg = RunConfig(local_epochs=2, batch_size=16, lr=0.1, momentum=0.9)
    net = model()
    torch.manual_seed(1)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shards = _digits_shards()
    aliases = tied_aliases(net)
    expected = []
    for cid, shard in enumerate(shards):
        gen = torch_generator(cfg.seed, Stream.LOCAL_TRAINING, 1, cid)
        delta = Client(cid, shard, shard, None).local_update(net, state, cfg, gen, lr=cfg.lr)
        expected.append(untie(delta, aliases))
    gens = [torch_generator(cfg.seed, Stream.LOCAL_TRAINING, 1, cid) for cid in range(len(shards))]
    stacked = BatchedTrainer(model()).train(
        state, shards, gens, epochs=2, batch_size=16, lr=0.1, momentum=0.9
    )
    assert list(stacked) == list(expected[0])  # the same names in the same order: a.weight left out
    for cid, delta in enumerate(expected):
        for name, t in delta.items():
            assert torch.allclose(stacked[name][cid], t, rtol=0, atol=4e-6), (cid, name)
        assert float(delta["b.weight"].abs().max()) > 1e-3  # the tied weight really trained


def test_personal_weights_trained_on_the_stack_hold_a_tied_weight_under_both_names() -> None:
    """train_from (α-mix, Ditto) returns weights a personal model is loaded from: every name, the alias the
    same tensor as its kept name."""
    net = _Tied()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    shards = _digits_shards(2)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = BatchedTrainer(_Tied()).train_from(
        [state, state], shards, gens, epochs=1, batch_size=16, lr=0.1, momentum=0.9
    )
    for weights in out:
        assert weights.keys() == state.keys()
        assert torch.equal(weights["a.weight"], weights["b.weight"])
        _Tied().load_state_dict(weights)


def _with_tied_model(monkeypatch: pytest.MonkeyPatch, module) -> None:
    task = dataclasses.replace(make_task(RunConfig()), model=_Tied)
    monkeypatch.setattr(module, "make_task", lambda _cfg: task)


def test_the_batched_engine_trains_a_tied_model_as_the_sequential_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No fallback any more, and the run the sequential engine's within the batched tolerance
    (docs/sim-speed.md): each round's accuracy within one of the 359 test digits, weights within 2e-2 after
    three rounds (1e-6 after one), every update accepted and the tied names equal in the final state."""
    _with_tied_model(monkeypatch, simulation)
    monkeypatch.setattr(simulation, "_REPORTED_FALLBACKS", set())
    cfg = RunConfig(clients=6, rounds=3, lr=0.1, codec="identity")
    assert simulation.batching_fallback(cfg) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        batched = run_simulation(cfg.replace(engine="batched"))
    sequential = run_simulation(cfg)

    def worst(a, b) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    for s, b in zip(sequential.rounds, batched.rounds, strict=True):
        assert b.rejected == 0
        assert abs(s.test_accuracy - b.test_accuracy) <= 1 / 359
    assert batched.final.test_accuracy > 0.5  # it learned
    assert worst(sequential.final_state, batched.final_state) < 2e-2
    assert torch.equal(batched.final_state["a.weight"], batched.final_state["b.weight"])
    one = cfg.replace(rounds=1)
    assert (
        worst(run_simulation(one).final_state, run_simulation(one.replace(engine="batched")).final_state)
        < 1e-6
    )


def test_the_population_engine_runs_a_tied_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The population engine (stacked training only) took tied weights for a reason to refuse the run."""
    _with_tied_model(monkeypatch, population)
    cfg = RunConfig(clients=4, rounds=2, lr=0.1, engine="population", codec="identity")
    population.check_supported(cfg)
    result = population.run_population(cfg)
    assert [r.rejected for r in result.rounds] == [0, 0]
    assert torch.equal(result.final_state["a.weight"], result.final_state["b.weight"])
    start = _Tied()
    assert not torch.equal(result.final_state["b.weight"], start.state_dict()["b.weight"])

"""The personalization gain the simulator reports, checked against code that shares none of its scoring.

``deltaplane run`` reports each device's global vs personal accuracy on its own label mix and their means and
worst difference. These tests pin that the figure is honest, independently of ``deltaplane.engine.metrics``:

- the rows are what a from-scratch per-example count says (each test image weighted by its class's share of the
  device's training data over the class's count in the test set), for the global and the personal models alike;
- nothing a device chooses (α-mix's α, its personal delta, Ditto's model) depends on the test set the figure is
  computed on: scrambling the test set's labels leaves every device's personal model as it was. A deliberately
  leaky variant (α chosen on the test set) fails that check;
- a device's held-out split, on which α is chosen, never trains its personal model: only α may depend on it.
  A deliberately leaky variant (fine-tuning on train + held-out) fails that check.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import deltaplane.sim.simulation as simulation
from deltaplane.data.dataset import Dataset
from deltaplane.engine import build_clients, make_task
from deltaplane.engine.client import ClientStep
from deltaplane.personalization import AlphaMix, Ditto, PersonalState
from deltaplane.sim import RunConfig, build_model, run_simulation
from deltaplane.sim.batched import BatchedTrainer

#: two rounds reach about a third of the test digits (above chance: a scrambled test set scores lower);
#: one personal epoch keeps each run to a few seconds
SMALL = RunConfig(clients=4, rounds=2, local_epochs=1, lr=0.1, personal_epochs=1)


def _from_scratch(net: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, train_y):
    """Accuracy of ``state`` on the test images ``(x, y)`` re-weighted to a device's label mix, per example:
    image ``i`` weighs ``share(y_i) / count_test(y_i)`` where ``share`` is its class's fraction of ``train_y``."""
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        right = (net(x).argmax(dim=1) == y).double()
    k = int(max(int(y.max()), int(train_y.max()))) + 1
    share = torch.bincount(train_y, minlength=k).double() / len(train_y)
    in_test = torch.bincount(y, minlength=k).double()
    return float((right * share[y] / in_test[y]).sum())


@pytest.mark.parametrize(
    ("engine", "method"),
    [("sequential", "alpha_mix"), ("batched", "alpha_mix"), ("sequential", "ditto"), ("batched", "ditto")],
)
def test_reported_rows_equal_a_from_scratch_count_on_the_test_set(engine: str, method: str) -> None:
    res = run_simulation(SMALL.replace(engine=engine, personalization=method))
    task = make_task(res.config)
    devices = build_clients(res.config, task)
    net = build_model(0)
    glob, pers = [], []
    for row, c in zip(res.clients, devices, strict=True):
        g = _from_scratch(net, res.final_state, task.test.x, task.test.y, c.train.y)
        p = _from_scratch(net, res.personal_states[c.cid], task.test.x, task.test.y, c.train.y)
        # float32 class ratios in the product against float64 sums here; the batched engine's stacked scoring
        # may tip one image whose two best logits tie (one image of a class weighs at most 1/30 of a class)
        tol = 1e-6 if engine == "sequential" else 0.04
        assert row["global_accuracy"] == pytest.approx(g, abs=tol)
        assert row["personal_accuracy"] == pytest.approx(p, abs=tol)
        glob.append(row["global_accuracy"])
        pers.append(row["personal_accuracy"])
    final = res.final
    # per-device means on both sides (the same weighting), and the worst device's own difference
    assert final.client_mix_accuracy_mean == pytest.approx(sum(glob) / len(glob), abs=1e-12)
    assert final.personal_accuracy_mean == pytest.approx(sum(pers) / len(pers), abs=1e-12)
    assert final.personal_gain_min == pytest.approx(
        min(p - g for p, g in zip(pers, glob, strict=True)), abs=1e-12
    )
    assert any(p != g for p, g in zip(pers, glob, strict=True)), "some device must serve a model of its own"


def _scrambled_test(monkeypatch: pytest.MonkeyPatch, config: RunConfig) -> None:
    """Make the simulator see the run's task with the test labels rotated by one class (every label wrong)."""
    task = make_task(config)
    k = int(task.num_classes)
    scrambled = dataclasses.replace(task, test=Dataset(task.test.x, (task.test.y + 1) % k))
    monkeypatch.setattr(simulation, "make_task", lambda _config: scrambled)


def _leak_test_set_into_alpha(monkeypatch: pytest.MonkeyPatch, config: RunConfig) -> None:
    """The leaky variant: every device chooses α on the simulator's test set instead of its held-out split."""
    after_round = ClientStep.after_round

    def leaky(self: ClientStep, clients: list, model: nn.Module, global_state: dict, rnd: int, **kw: Any):
        test = simulation.make_task(config).test
        held = [c.holdout for c in clients]
        for c in clients:
            c.holdout = test
        try:
            after_round(self, clients, model, global_state, rnd, **kw)
        finally:
            for c, h in zip(clients, held, strict=True):
                c.holdout = h

    monkeypatch.setattr(ClientStep, "after_round", leaky)


def _personal_models(res) -> dict[int, dict[str, torch.Tensor]]:
    return {cid: {k: v.clone() for k, v in s.items()} for cid, s in res.personal_states.items()}


def _same(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


def _test_set_changes_personal_models(
    monkeypatch: pytest.MonkeyPatch, config: RunConfig, *, leak: bool
) -> bool:
    """Whether scrambling the test set's labels changes any device's α or personal model."""
    with monkeypatch.context() as m:
        if leak:
            _leak_test_set_into_alpha(m, config)
        plain = run_simulation(config)
    with monkeypatch.context() as m:
        _scrambled_test(m, config)
        if leak:
            _leak_test_set_into_alpha(m, config)
        scrambled = run_simulation(config)
    # the federation itself never sees the test set either
    assert all(torch.equal(plain.final_state[k], v) for k, v in scrambled.final_state.items())
    # and the scrambled run was scored on the scrambled labels (the check has something to miss)
    assert scrambled.final.test_accuracy < plain.final.test_accuracy
    alphas = [c["alpha"] for c in plain.clients], [c["alpha"] for c in scrambled.clients]
    return alphas[0] != alphas[1] or not _same(_personal_models(plain), _personal_models(scrambled))


@pytest.mark.parametrize(
    ("engine", "method"), [("sequential", "alpha_mix"), ("batched", "alpha_mix"), ("batched", "ditto")]
)
def test_no_personal_choice_sees_the_test_set_the_gain_is_reported_on(
    monkeypatch: pytest.MonkeyPatch, engine: str, method: str
) -> None:
    config = SMALL.replace(engine=engine, personalization=method)
    assert not _test_set_changes_personal_models(monkeypatch, config, leak=False)


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_the_test_set_check_catches_alpha_chosen_on_the_test_set(
    monkeypatch: pytest.MonkeyPatch, engine: str
):
    config = SMALL.replace(engine=engine, personalization="alpha_mix")
    assert _test_set_changes_personal_models(monkeypatch, config, leak=True)


class _TrainsOnHeldOut(AlphaMix):
    """The leaky variant: fine-tunes on the device's training and held-out data together."""

    def personalize(self, model, global_state, state, train, val, *, generator) -> None:
        both = Dataset(torch.cat([train.x, val.x]), torch.cat([train.y, val.y]))
        super().personalize(model, global_state, state, both, val, generator=generator)


def _devices() -> tuple[nn.Module, dict[str, torch.Tensor], list[Dataset], list[Dataset]]:
    """Three of the run's devices, each with its first 40 training digits (enough to move a model)."""
    devices = build_clients(SMALL, make_task(SMALL))[:3]
    model = build_model(0)
    trains = [Dataset(c.train.x[:40], c.train.y[:40]) for c in devices]
    return model, dict(model.state_dict()), trains, [c.holdout for c in devices]


def _trained(personalizer, vals: list[Dataset], *, stacked: bool) -> list[dict[str, torch.Tensor]]:
    """What each device's personal training kept (α-mix's delta, Ditto's model) after two rounds."""
    model, glob, trains, _ = _devices()
    states = [PersonalState() for _ in trains]
    for rnd in range(2):
        glob = {k: v + 0.01 * rnd for k, v in glob.items()}
        gens = [torch.Generator().manual_seed(10 * rnd + c) for c in range(len(trains))]
        if stacked:
            personalizer.personalize_many(
                model,
                glob,
                states,
                trains,
                vals,
                generators=gens,
                train_many=BatchedTrainer(build_model(0)).train_from,
            )
        else:
            for s, t, v, g in zip(states, trains, vals, gens, strict=True):
                personalizer.personalize(model, glob, s, t, v, generator=g)
    return [dict(s.personal_delta) if s.personal_delta is not None else s.personal_model for s in states]


def _scrambled(vals: list[Dataset]) -> list[Dataset]:
    """The held-out splits with other images and labels (noise, every label moved by one class)."""
    g = torch.Generator().manual_seed(7)
    return [Dataset(torch.rand(v.x.shape, generator=g), (v.y + 1) % 10) for v in vals]


def _held_out_changes_training(personalizer, *, stacked: bool) -> bool:
    vals = _devices()[3]
    a, b = (
        _trained(personalizer, vals, stacked=stacked),
        _trained(personalizer, _scrambled(vals), stacked=stacked),
    )
    return not all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("stacked", [False, True], ids=["one-by-one", "stacked"])
@pytest.mark.parametrize("personalizer", [AlphaMix(), Ditto(lam=0.5)], ids=["alpha_mix", "ditto"])
def test_the_held_out_split_never_trains_the_personal_model(personalizer, stacked: bool) -> None:
    assert not _held_out_changes_training(personalizer, stacked=stacked)


def test_the_held_out_check_catches_fine_tuning_on_the_held_out_split() -> None:
    assert _held_out_changes_training(_TrainsOnHeldOut(), stacked=False)

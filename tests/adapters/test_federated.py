"""LoRA aggregation: FedIT's bias, FFA-LoRA's exactness, the re-factorizing aggregator against a direct SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltaplane.adapters.federated import LoRARefactor, factor_pairs, fedit_bias
from deltaplane.aggregation import FedAvg
from deltaplane.aggregation.clipping import Clip
from deltaplane.aggregation.dp import DPFedAvg
from deltaplane.aggregation.fedopt import FedAvgM
from deltaplane.aggregation.robust import Krum
from deltaplane.delta import Delta
from deltaplane.errors import AdapterMismatch, ConfigError


def clients(n=5, r=3, seed=0, drift=1.0):
    g = torch.Generator().manual_seed(seed)
    A0, B0 = torch.randn(r, 12, generator=g, dtype=torch.float64), torch.zeros(10, r, dtype=torch.float64)
    head0 = torch.zeros(4, dtype=torch.float64)
    initial = {"l.lora_A.w": A0, "l.lora_B.w": B0, "head": head0}
    deltas = [
        Delta({"l.lora_A.w": drift * torch.randn(r, 12, generator=g, dtype=torch.float64),
               "l.lora_B.w": torch.randn(10, r, generator=g, dtype=torch.float64),
               "head": torch.randn(4, generator=g, dtype=torch.float64)})
        for _ in range(n)
    ]  # fmt: skip
    return initial, deltas, [float(w) for w in range(1, n + 1)]


def test_fedit_is_biased_and_the_bias_grows_with_drift():
    initial, deltas, w = clients(drift=0.1)
    As = [initial["l.lora_A.w"] + d["l.lora_A.w"] for d in deltas]
    Bs = [initial["l.lora_B.w"] + d["l.lora_B.w"] for d in deltas]
    small = fedit_bias(As, Bs, w)
    _, far, _ = clients(drift=2.0)
    As2 = [initial["l.lora_A.w"] + d["l.lora_A.w"] for d in far]
    Bs2 = [initial["l.lora_B.w"] + d["l.lora_B.w"] for d in far]
    assert 0 < small < fedit_bias(As2, Bs2, w)


def test_fedit_through_fedavg_is_off_by_the_factors_covariance_as_documented():
    """What FedIT does (FedAvg of the factor updates, as every driver's default chain computes it) against the exact
    average of the products, in numpy: ``B̄Ā − Σ pᵢBᵢAᵢ = −Σ pᵢ(Bᵢ − B̄)(Aᵢ − Ā)`` (docs/adapters.md), and
    :func:`fedit_bias` is its norm relative to ``‖Σ pᵢBᵢAᵢ‖``."""
    initial, deltas, w = clients(drift=1.0)
    agg = FedAvg()
    for d, wi in zip(deltas, w, strict=True):
        agg.add(d, wi)
    mean = agg.result()
    A_bar = (initial["l.lora_A.w"] + mean["l.lora_A.w"]).numpy()
    B_bar = (initial["l.lora_B.w"] + mean["l.lora_B.w"]).numpy()
    As = [(initial["l.lora_A.w"] + d["l.lora_A.w"]).numpy() for d in deltas]
    Bs = [(initial["l.lora_B.w"] + d["l.lora_B.w"]).numpy() for d in deltas]
    p = np.array(w) / sum(w)
    exact = sum(pi * B @ A for pi, A, B in zip(p, As, Bs, strict=True))
    covariance = sum(pi * (B - B_bar) @ (A - A_bar) for pi, A, B in zip(p, As, Bs, strict=True))
    np.testing.assert_allclose(B_bar @ A_bar - exact, -covariance, atol=1e-12)
    want = np.linalg.norm(covariance) / np.linalg.norm(exact)
    got = fedit_bias([torch.from_numpy(a) for a in As], [torch.from_numpy(b) for b in Bs], w)
    assert got == pytest.approx(want, rel=1e-12) and want > 0.1


def test_ffa_lora_fedavg_of_b_is_exact():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 12, generator=g, dtype=torch.float64)  # frozen, shared
    Bs = [torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    w = [1.0, 2.0, 3.0, 4.0]
    agg = FedAvg()
    for B, wi in zip(Bs, w, strict=True):
        agg.add(Delta({"B": B}), wi)
    exact = sum(wi * B @ A for wi, B in zip(w, Bs, strict=True)) / sum(w)
    assert torch.allclose(agg.result()["B"] @ A, exact, atol=1e-12)
    assert fedit_bias([A] * 4, Bs, w) < 1e-12


@pytest.mark.parametrize("r", [3, 6])
def test_refactor_is_the_best_rank_r_approximation_of_the_average_product(r):
    initial, deltas, w = clients(r=3)
    agg = LoRARefactor(FedAvg(), initial)
    if r != 3:  # a rank-6 global adapter (zero-padded) can hold the average of rank-3 products better
        initial = {**initial, "l.lora_A.w": torch.cat([initial["l.lora_A.w"], torch.zeros(3, 12, dtype=torch.float64)]),
                   "l.lora_B.w": torch.zeros(10, 6, dtype=torch.float64)}  # fmt: skip
        deltas = [Delta({**d, "l.lora_A.w": torch.cat([d["l.lora_A.w"], torch.zeros(3, 12, dtype=torch.float64)]),
                         "l.lora_B.w": torch.cat([d["l.lora_B.w"], torch.zeros(10, 3, dtype=torch.float64)], 1)})
                  for d in deltas]  # fmt: skip
        agg = LoRARefactor(FedAvg(), initial)
    for d, wi in zip(deltas, w, strict=True):
        agg.add(d, wi)
    out = agg.result()
    A = initial["l.lora_A.w"] + out["l.lora_A.w"]
    B = initial["l.lora_B.w"] + out["l.lora_B.w"]
    mean = sum(
        wi * (initial["l.lora_B.w"] + d["l.lora_B.w"]) @ (initial["l.lora_A.w"] + d["l.lora_A.w"])
        for d, wi in zip(deltas, w, strict=True)
    ) / sum(w)
    s = np.linalg.svd(mean.numpy(), compute_uv=False)
    best = float(np.sqrt((s[r:] ** 2).sum()))
    assert float((B @ A - mean).norm()) == pytest.approx(best, abs=1e-9)
    # the head is averaged as usual
    head = sum(wi * d["head"] for d, wi in zip(deltas, w, strict=True)) / sum(w)
    assert torch.allclose(out["head"], head)
    # it tracks the global factors: a second round starts from the re-factored ones
    agg.reset()
    agg.add(Delta({k: torch.zeros_like(v) for k, v in deltas[0].items()}), 1.0)
    again = agg.result()
    assert float(again["l.lora_A.w"].abs().max()) < 1e-9  # no change: the same product re-factors to itself


def test_pairs_must_be_complete():
    with pytest.raises(AdapterMismatch, match="no matching"):
        factor_pairs(["x.lora_A.w"])


@pytest.mark.parametrize(
    ("name", "delta", "error"),
    [
        ("missing B", {"fc.lora_A.weight": torch.randn(2, 16)}, "no factor 'fc.lora_B.weight'"),
        (
            "another rank",
            {"fc.lora_A.weight": torch.randn(3, 16), "fc.lora_B.weight": torch.randn(8, 3)},
            "shape",
        ),
        (
            "NaN",
            {"fc.lora_A.weight": torch.full((2, 16), float("nan")), "fc.lora_B.weight": torch.ones(8, 2)},
            "NaN",
        ),
    ],
)
def test_refactor_refuses_a_bad_update_when_it_arrives(name, delta, error):
    # from a review: a missing factor was a KeyError, another rank a bare RuntimeError, and a NaN factor entered
    # the running sum so the whole round's SVD failed later; each is refused by add(), naming the tensor
    from deltaplane.errors import DeltaplaneError

    initial = {"fc.lora_A.weight": torch.randn(2, 16), "fc.lora_B.weight": torch.zeros(8, 2)}
    agg = LoRARefactor(FedAvg(), initial)
    good = {"fc.lora_A.weight": torch.randn(2, 16) * 0.1, "fc.lora_B.weight": torch.randn(8, 2) * 0.1}
    agg.add(Delta(good))
    with pytest.raises(DeltaplaneError, match=error):
        agg.add(Delta(delta))
    assert set(agg.result()) == set(initial)  # the round still closes on the good update


def _refactored_error(initial: dict, deltas: list[Delta], a: str, b: str) -> tuple[float, float]:
    """``‖B A − mean‖`` after one LoRARefactor round, and the best rank-r error (Eckart–Young) of the exact
    average product: the independent reference."""
    agg = LoRARefactor(FedAvg(), initial)
    for d in deltas:
        agg.add(d, 1.0)
    out = agg.result()
    assert tuple(out[a].shape) == tuple(initial[a].shape) and tuple(out[b].shape) == tuple(initial[b].shape)
    A, B = initial[a] + out[a], initial[b] + out[b]
    mean = sum((initial[b] + d[b]) @ (initial[a] + d[a]) for d in deltas) / len(deltas)
    s = np.linalg.svd(mean.numpy(), compute_uv=False)
    return float((B @ A - mean).norm()), float(np.sqrt((s[initial[a].shape[0] :] ** 2).sum()))


def _random_deltas(initial: dict, n: int, g: torch.Generator) -> list[Delta]:
    """``n`` float64 deltas of ``initial``'s shapes, drawn from ``g``."""
    return [Delta({k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in initial.items()})
            for _ in range(n)]  # fmt: skip


def test_refactor_averages_embedding_factors_too():
    """An embedding's lora_embedding_A/B (PEFT's names in a model's state_dict) used to be left to the inner
    FedAvg: FedIT's biased factor average, silently, next to re-factorized linear layers."""
    g = torch.Generator().manual_seed(0)
    a, b = "emb.lora_embedding_A.default", "emb.lora_embedding_B.default"
    initial = {
        a: torch.randn(2, 10, generator=g, dtype=torch.float64),
        b: torch.zeros(4, 2, dtype=torch.float64),
    }
    deltas = _random_deltas(initial, 3, g)
    assert factor_pairs(initial) == {"emb.default": (a, b)}
    got, best = _refactored_error(initial, deltas, a, b)
    assert got == pytest.approx(best, abs=1e-9)


def test_refactor_keeps_a_rank_above_the_layers_size():
    """PEFT allows r > min(out, in); the re-factored factors used to come back with min(out, in) rows, and the
    update failed with a torch RuntimeError. The extra rows stay zero and the average is exact."""
    g = torch.Generator().manual_seed(1)
    a, b = "fc.lora_A.weight", "fc.lora_B.weight"
    initial = {
        a: torch.randn(8, 6, generator=g, dtype=torch.float64),
        b: torch.zeros(4, 8, dtype=torch.float64),
    }
    deltas = _random_deltas(initial, 2, g)
    got, best = _refactored_error(initial, deltas, a, b)
    assert best == 0.0 and got < 1e-9


@pytest.mark.parametrize(
    "make",
    [
        lambda: Clip(FedAvg(), clip=0.1),
        lambda: DPFedAvg(FedAvg(), clip=0.1, noise_multiplier=1.0, expected_clients=3),
        lambda: FedAvgM(FedAvg(), lr=0.5),
        lambda: Krum(byzantine=1),
    ],
    ids=["clip", "dp", "server-momentum", "krum"],
)
def test_refactor_refuses_an_inner_aggregator_the_factors_would_escape(make):
    """The factors never reach ``inner``: a clip, DP noise, robust rule or server optimizer there acted on the head
    alone while the adapter's average went through untouched (a DP run whose adapter got no noise). Before, with
    ``Clip(FedAvg(), clip=0.1)`` inside, one update's head came out at norm 0.1 and its factors at 2.47 and 3.02."""
    g = torch.Generator().manual_seed(0)
    initial = {"fc.lora_A.weight": torch.randn(2, 6, generator=g), "fc.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(
        ConfigError, match=r"inner must be a plain FedAvg.*LoRARefactor\(FedAvg\(\), initial\)"
    ):
        LoRARefactor(make(), initial)
    LoRARefactor(FedAvg(), initial)  # the documented form

"""Each merge method against a direct, loop-based implementation of its paper's formula (float64, exact)."""

import math

import numpy as np
import pytest
import torch

import deltaplane as dp
from deltaplane.merging import available_methods, diagonal_fisher, get_method, merge

G = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def models3() -> tuple[dict, list[dict]]:
    base = {"w": rand(4, 5), "b": rand(5)}
    ms = [{k: v + rand(*v.shape) for k, v in base.items()} for _ in range(3)]
    return base, ms


def test_registry_names_and_citations() -> None:
    names = set(available_methods())
    assert {
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
        "slerp", "model_stock", "fisher",
    } <= names  # fmt: skip
    for m in available_methods().values():
        assert m.url.startswith("https://"), m.name
        assert m.paper
    # one engine, several paper names (mergekit's GeneralizedTaskArithmeticMerge idea)
    assert type(get_method("ties")) is type(get_method("dare_linear")) is type(get_method("breadcrumbs"))


def test_linear_is_weighted_average() -> None:
    _, ms = models3()
    w = [1.0, 2.0, 5.0]
    out = merge("linear", None, ms, weights=w)
    for k in ms[0]:
        expected = sum(wi * m[k] for wi, m in zip(w, ms, strict=True)) / sum(w)
        assert torch.equal(out[k], expected) or torch.allclose(out[k], expected, rtol=0, atol=1e-15)
    unnorm = merge("linear", None, ms, weights=w, normalize=False)
    assert torch.allclose(unnorm["w"], sum(wi * m["w"] for wi, m in zip(w, ms, strict=True)), atol=1e-15)


def test_task_arithmetic_formula() -> None:
    base, ms = models3()
    out = merge("task_arithmetic", base, ms, weights=[0.5, 1.0, 2.0], **{"lambda": 0.7})
    for k in base:
        tau = [m[k] - base[k] for m in ms]
        expected = base[k] + 0.7 * (0.5 * tau[0] + 1.0 * tau[1] + 2.0 * tau[2])
        assert torch.allclose(out[k], expected, rtol=0, atol=1e-14)


def ties_reference(base: np.ndarray, models: list[np.ndarray], density: float, lam: float) -> np.ndarray:
    """TIES-Merging, Yadav et al. 2023, Algorithm 1, written element by element."""
    n = base.size
    k = max(1, int(density * n))
    trimmed = []
    for m in models:
        tau = (m - base).ravel()
        keep = set(np.argsort(-np.abs(tau))[:k].tolist())  # top-k% magnitudes (distinct in these tests)
        trimmed.append(np.array([tau[j] if j in keep else 0.0 for j in range(n)]))
    out = np.zeros(n)
    for j in range(n):
        total = sum(t[j] for t in trimmed)
        gamma = 1.0 if total >= 0 else -1.0  # elected sign
        agree = [t[j] for t in trimmed if np.sign(t[j]) == gamma]
        out[j] = sum(agree) / len(agree) if agree else 0.0  # disjoint mean
    return base + lam * out.reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_paper(density: float) -> None:
    base, ms = models3()
    out = merge("ties", base, ms, density=density, **{"lambda": 1.3})
    for k in base:
        expected = ties_reference(base[k].numpy(), [m[k].numpy() for m in ms], density, 1.3)
        np.testing.assert_allclose(out[k].numpy(), expected, rtol=0, atol=1e-13)


def test_ties_hand_example() -> None:
    base = {"w": torch.zeros(4, dtype=torch.float64)}
    a = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)}
    b = {"w": torch.tensor([1.5, 2.0, -1.0, 0.5], dtype=torch.float64)}
    # trimmed a = [0, -2, 3, 0], b = [1.5, 2, 0, 0]; signs elected + + + +; disjoint mean
    assert merge("ties", base, [a, b], density=0.5)["w"].tolist() == [1.5, 2.0, 3.0, 0.0]


def test_dare_drops_and_rescales() -> None:
    base = {"w": rand(100, 100)}
    m = {"w": base["w"] + rand(100, 100)}
    out = merge("dare_linear", base, [m], density=0.3, seed=7, rescale_norm="density")["w"]
    tau = m["w"] - base["w"]
    kept = out != base["w"]
    # every entry is either dropped (base) or the task vector rescaled by 1/density (DARE eq. 1)
    assert torch.allclose(out[kept], base["w"][kept] + tau[kept] / 0.3, rtol=0, atol=1e-12)
    frac = kept.double().mean().item()
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 10_000)  # binomial: within 5 standard deviations
    again = merge("dare_linear", base, [m], density=0.3, seed=7, rescale_norm="density")["w"]
    other = merge("dare_linear", base, [m], density=0.3, seed=8, rescale_norm="density")["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)
    no_rescale = merge("dare_linear", base, [m], density=0.3, seed=7, rescale=False)["w"]
    assert torch.allclose(no_rescale[kept], m["w"][kept], rtol=0, atol=1e-12)


def test_dare_ties_is_ties_consensus_on_dropped_vectors() -> None:
    from deltaplane.merging.base import tensor_generator
    from deltaplane.merging.task_arithmetic import sparsify

    base, ms = models3()
    out = merge("dare_ties", base, ms, density=0.5, seed=3, rescale_norm="density")
    for k in base:
        taus = []
        for i, m in enumerate(ms):
            tau = m[k] - base[k]
            # model i's drop mask comes from its own seeded generator (same in memory and streamed)
            d = sparsify(tau, method="random", density=0.5, rescale=True, generator=tensor_generator(3, k, i))
            assert bool(((d == 0) | (d == tau / 0.5)).all())
            taus.append(d)
        stack = torch.stack(taus)
        elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
        agree = stack.sign() == elected
        expected = base[k] + (stack * agree).sum(0)  # dare_ties default: normalize=False
        assert torch.allclose(out[k], expected, rtol=0, atol=1e-13)


def breadcrumbs_reference(
    base: np.ndarray, models: list[np.ndarray], density: float, gamma: float
) -> np.ndarray:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top-γ outliers and the smallest, keep density."""
    n = base.size
    total = np.zeros(n)
    for m in models:
        tau = (m - base).ravel()
        order = np.argsort(np.abs(tau))  # ascending
        keep, top = int(density * n), int(gamma * n)
        bottom = max(0, n - keep - top)
        mask = np.zeros(n)
        mask[order[bottom : bottom + keep]] = 1
        total += tau * mask
    return base + total.reshape(base.shape)


def test_breadcrumbs_matches_paper() -> None:
    base = {"w": rand(20, 10)}
    ms = [{"w": base["w"] + rand(20, 10)} for _ in range(2)]
    out = merge("breadcrumbs", base, ms, density=0.5, gamma=0.1)["w"]
    expected = breadcrumbs_reference(base["w"].numpy(), [m["w"].numpy() for m in ms], 0.5, 0.1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-13)


def slerp_reference(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ub = a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)
    omega = np.arccos(np.clip(ua @ ub, -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_slerp_matches_shoemake_and_falls_back_when_colinear() -> None:
    a, b = {"w": rand(3, 4)}, {"w": rand(3, 4)}
    out = merge("slerp", None, [a, b], t=0.3)["w"]
    np.testing.assert_allclose(out.numpy(), slerp_reference(0.3, a["w"].numpy(), b["w"].numpy()), atol=1e-13)
    # base → model form (mergekit's layout) is the same interpolation
    assert torch.allclose(merge("slerp", a, [b], t=0.3)["w"], out, atol=1e-15)
    # endpoints
    assert torch.allclose(merge("slerp", None, [a, b], t=0.0)["w"], a["w"], atol=1e-14)
    assert torch.allclose(merge("slerp", None, [a, b], t=1.0)["w"], b["w"], atol=1e-14)
    # colinear tensors: sin Ω → 0, so the tensor is interpolated linearly, exactly
    c = {"w": 2.5 * a["w"]}
    assert torch.allclose(merge("slerp", None, [a, c], t=0.4)["w"], 0.6 * a["w"] + 0.4 * c["w"], atol=1e-14)


def test_model_stock_matches_paper() -> None:
    base, ms = models3()
    out = merge("model_stock", base, ms)
    for k in base:
        w0 = base[k].numpy().ravel()
        offs = [m[k].numpy().ravel() - w0 for m in ms]
        cos = [
            offs[i] @ offs[j] / (np.linalg.norm(offs[i]) * np.linalg.norm(offs[j]))
            for i in range(3)
            for j in range(i + 1, 3)
        ]
        c = np.mean(cos)
        t = 3 * c / (1 + 2 * c)  # eq. (2) with N = 3
        expected = t * np.mean([m[k].numpy().ravel() for m in ms], axis=0) + (1 - t) * w0
        np.testing.assert_allclose(out[k].numpy().ravel(), expected, rtol=0, atol=1e-13)


def test_fisher_weighted_average() -> None:
    _, ms = models3()
    fishers = [{k: rand(*v.shape).abs() for k, v in ms[0].items()} for _ in ms]
    out = merge("fisher", None, ms, fishers=fishers, weights=[1.0, 2.0, 0.5], epsilon=1e-6)
    for k in ms[0]:
        num = sum(w * (f[k] + 1e-6) * m[k] for w, f, m in zip([1.0, 2.0, 0.5], fishers, ms, strict=True))
        den = sum(w * (f[k] + 1e-6) for w, f in zip([1.0, 2.0, 0.5], fishers, strict=True))
        assert torch.allclose(out[k], num / den, rtol=0, atol=1e-13)


def test_diagonal_fisher_against_brute_force() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    got = diagonal_fisher(model, x, batch_size=3)
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(7):
        logp = torch.log_softmax(model(x[i : i + 1]), dim=-1)[0]
        for c in range(3):
            grads = torch.autograd.grad(logp[c], list(model.parameters()), retain_graph=True)
            for (k, _), g in zip(model.named_parameters(), grads, strict=True):
                expected[k] += logp[c].exp().detach() * g.pow(2)
    for k in expected:
        assert torch.allclose(got[k], expected[k] / 7, rtol=1e-5, atol=1e-7), k
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    emp = diagonal_fisher(model, x, labels=y)
    g0 = torch.autograd.grad(torch.log_softmax(model(x[:1]), -1)[0, 0], model[0].weight)[0]
    assert emp["0.weight"].shape == g0.shape and bool((emp["0.weight"] >= 0).all())


def test_deltas_merge_as_task_vectors() -> None:
    base, ms = models3()
    deltas = [dp.Delta.between(base, m) for m in ms]
    merged = merge("ties", None, deltas, density=0.4)
    assert isinstance(merged, dp.Delta)
    direct = merge("ties", base, ms, density=0.4)
    for k in base:
        assert torch.allclose(base[k] + merged[k], direct[k], atol=1e-13)
    applied = merge("ties", base, deltas, density=0.4)
    assert torch.allclose(applied["w"], direct["w"], atol=1e-13)


def test_dtype_preserved_and_non_float_copied() -> None:
    base = {"w": torch.randn(4, 4).half(), "n": torch.tensor([5])}
    ms = [{"w": (base["w"].float() + 0.1).half(), "n": torch.tensor([9])} for _ in range(2)]
    out = merge("ties", base, ms, density=0.5)
    assert out["w"].dtype == torch.float16 and out["n"].item() == 5


@pytest.mark.parametrize(
    ("call", "error", "text"),
    [
        (lambda b, m: merge("nope", b, m), dp.ConfigError, "unknown merge method 'nope'"),
        (lambda b, m: merge("ties", None, m), dp.ConfigError, "needs a base model"),
        (lambda b, m: merge("ties", b, m, density=1.5), dp.ConfigError, "density' must be in [0, 1]"),
        (lambda b, m: merge("ties", b, m, densty=0.5), dp.ConfigError, "unknown parameter 'densty'"),
        (lambda b, m: merge("ties", b, m, weights=[1.0]), dp.ConfigError, "one value per model"),
        (lambda b, m: merge("slerp", None, m), dp.ConfigError, "exactly two models"),
        (lambda b, m: merge("slerp", None, m[:2]), dp.ConfigError, "needs parameter 't'"),
        (lambda b, m: merge("model_stock", b, m[:1]), dp.ConfigError, "at least 2"),
        (lambda b, m: merge("fisher", None, m), dp.ConfigError, "needs parameter 'fisher'"),
        (lambda b, m: merge("linear", None, []), dp.ConfigError, "no models"),
    ],
)
def test_bad_arguments(call, error, text) -> None:  # type: ignore[no-untyped-def]
    base, ms = models3()
    with pytest.raises(error) as info:
        call(base, ms)
    assert text in str(info.value)


def test_mismatched_models_name_the_tensor() -> None:
    base, ms = models3()
    bad = dict(ms[1])
    bad["w"] = rand(5, 4)
    with pytest.raises(dp.ShapeMismatch, match="tensor 'w'"):
        merge("ties", base, [ms[0], bad])
    renamed = {"w": ms[1]["w"], "c": ms[1]["b"]}
    with pytest.raises(dp.ShapeMismatch, match="different tensor names"):
        merge("linear", None, [ms[0], renamed])
    with pytest.raises(dp.ShapeMismatch, match="dtype"):
        merge("linear", None, [ms[0], {k: v.float() for k, v in ms[1].items()}])


def test_docstring_examples() -> None:
    import doctest

    import deltaplane.merging.base
    import deltaplane.merging.moe

    for mod in (deltaplane.merging.base, deltaplane.merging.moe):
        res = doctest.testmod(mod)
        assert res.failed == 0 and res.attempted > 0


@pytest.mark.parametrize("where", ["base", "model"])
def test_merge_refuses_non_finite_complex_tensors(where):
    # complex tensors are copied from the base unmerged; a base (or model) holding nan+1j used to yield nan+1j
    good = {"w": torch.ones(2), "z": torch.tensor([1 + 1j], dtype=torch.complex64)}
    bad = {"w": torch.ones(2), "z": torch.tensor([complex(float("nan"), 1.0)], dtype=torch.complex64)}
    base, model = (bad, good) if where == "base" else (good, bad)
    with pytest.raises(dp.InvalidUpdate, match=f"{where}.*tensor 'z' holds NaN or Inf"):
        merge("task_arithmetic", base, [model, good])
    out = merge("task_arithmetic", good, [good, good])
    assert torch.equal(out["z"], good["z"])


def test_merge_names_what_to_pass_for_a_module_or_a_lone_model() -> None:
    """A newcomer's own ``nn.Module`` (or one state dict instead of a list of them) failed with an untyped
    ``AttributeError: ... has no attribute 'keys'``; it is a ConfigError saying what to pass."""
    net = torch.nn.Linear(3, 2)
    sd = net.state_dict()
    with pytest.raises(
        dp.ConfigError, match=r"model 1 is a Linear, not a state dict or Delta: pass its .state_dict"
    ):
        merge("ties", sd, [sd, net], density=0.5)
    with pytest.raises(dp.ConfigError, match=r"base is a Linear.*\.state_dict"):
        merge("ties", net, [sd], density=0.5)
    with pytest.raises(dp.ConfigError, match=r"models must be a list.*Found OrderedDict; pass \[model\]"):
        merge("ties", sd, sd, density=0.5)
    assert merge("linear", None, (x for x in (sd, sd)))["weight"].equal(
        sd["weight"]
    )  # any iterable still works


def test_a_per_model_parameter_given_twice_is_refused_not_half_ignored() -> None:
    """``weight=1`` beside ``weights=[...]`` (or ``density`` beside ``densities``) merged with one of them
    silently dropped; which one depended on how the two were resolved."""
    a, b = {"w": torch.ones(4)}, {"w": torch.zeros(4)}
    with pytest.raises(dp.ConfigError, match="'weight' and 'weights' both set the models' weight"):
        merge("linear", None, [a, b], weight=1, weights=[3, 1])
    with pytest.raises(dp.ConfigError, match="'densities' and 'density' both set the models' density"):
        merge("ties", {"w": torch.zeros(4)}, [a, b], densities=[0.5, 0.5], density=[0.2, 0.2])
    assert merge("linear", None, [a, b], weights=[3, 1])["w"].tolist() == [0.75] * 4

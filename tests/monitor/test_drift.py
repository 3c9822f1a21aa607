import numpy as np
import pytest
from scipy.stats import chi2_contingency, ks_2samp

from deltaplane.errors import ConfigError, InvalidUpdate
from deltaplane.monitor import (
    DriftMonitor,
    DriftSpec,
    ModelCard,
    Summary,
    chi2_from_counts,
    ks_from_counts,
    psi,
    summarize,
)


def test_psi_matches_the_formula_and_is_zero_for_identical():
    r, q = [50, 30, 20], [30, 30, 40]
    expected = sum((b / 100 - a / 100) * np.log((b / 100) / (a / 100)) for a, b in zip(r, q, strict=True))
    assert psi(r, q) == pytest.approx(expected, rel=1e-12)
    assert psi(r, r) == 0.0
    with pytest.raises(ConfigError):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(InvalidUpdate):
        psi([0, 0], [1, 1])


def test_binned_ks_and_chi2_agree_with_scipy_on_raw_data():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 3000), rng.normal(0.3, 1, 2000)
    edges = np.quantile(a, np.linspace(0, 1, 51)[1:-1])
    ca = np.bincount(np.searchsorted(edges, a, side="right"), minlength=50)
    cb = np.bincount(np.searchsorted(edges, b, side="right"), minlength=50)
    d, p = ks_from_counts(ca, cb)
    exact = ks_2samp(a, b)
    assert d <= exact.statistic + 1e-12 and d > 0.9 * exact.statistic  # binning only hides differences
    assert p < 1e-10 and exact.pvalue < 1e-10
    stat, p2 = chi2_from_counts([10, 20, 30], [12, 18, 30])
    ref = chi2_contingency(np.array([[10, 20, 30], [12, 18, 30]]), correction=False)
    assert stat == pytest.approx(ref.statistic) and p2 == pytest.approx(ref.pvalue)


def test_monitor_flags_shifted_feature_and_embeddings_but_not_stable_windows():
    rng = np.random.default_rng(1)
    x_ref, e_ref = rng.normal(size=(4000, 5)), rng.normal(size=(4000, 384)) + 0.5
    spec = DriftSpec.fit(x_ref, n_classes=10, embeddings=e_ref, seed=0)
    ref = summarize(spec, x_ref, rng.integers(0, 10, 4000), e_ref)
    mon = DriftMonitor(spec, ref, window=10)
    for _ in range(10):  # ten devices from the same distribution: no alert
        report = mon.ingest(
            summarize(
                spec, rng.normal(size=(100, 5)), rng.integers(0, 10, 100), rng.normal(size=(100, 384)) + 0.5
            )
        )
    assert report is not None and report.alerts == [], report.alerts
    for _ in range(10):  # feature 3 shifts, predictions collapse onto class 0, embeddings move
        x = rng.normal(size=(100, 5))
        x[:, 3] += 1.0
        e = rng.normal(size=(100, 384)) + 0.5
        e[:, :64] += 1.5
        report = mon.ingest(
            summarize(spec, x, np.where(rng.random(100) < 0.6, 0, rng.integers(0, 10, 100)), e)
        )
    kinds = {(r["kind"], r["name"]) for r in report.rows if r["drifted"]}
    assert ("feature", "f3") in kinds and ("prediction", "predicted class") in kinds
    assert ("embedding", "centroid cosine distance") in kinds
    assert not any(k == ("feature", f"f{j}") for k in kinds for j in (0, 1, 2, 4))
    assert len(mon.history) == 2


def test_untrusted_summaries_are_validated():
    spec = DriftSpec.fit(np.arange(100.0).reshape(50, 2), n_classes=3)
    mon = DriftMonitor(spec, summarize(spec, np.arange(100.0).reshape(50, 2), np.zeros(50, int)))
    with pytest.raises(InvalidUpdate, match="shape"):
        mon.ingest(Summary(n=1, feature_counts=[[1, 2]]))
    with pytest.raises(InvalidUpdate, match="classes"):
        mon.ingest(Summary(n=1, prediction_counts=[1, 2]))
    with pytest.raises(ConfigError):
        DriftMonitor(spec, Summary(), psi_threshold=-1)


def test_model_card_roundtrip_and_markdown():
    card = ModelCard(
        "cnn",
        3,
        "digit recognition on device",
        {"round": 12},
        {"cohorts": ["eu"], "excluded_cohorts": ["us"]},
        {"accuracy": 0.97},
        {"alerts": ["feature drift on f3"]},
        ["8x8 grayscale only"],
    )
    md = card.to_markdown()
    assert "# Model card: cnn@3" in md and "| accuracy | 0.9700 |" in md and "excluded cohorts: us" in md
    assert "feature drift on f3" in md
    assert ModelCard.from_dict(card.to_dict()).to_dict() == card.to_dict()

import json

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
from deltaplane.monitor.drift import WindowSummary


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
    assert ("embedding", "centroid shift") in kinds
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


def _shifted_feature_rows(spec, ref_x, live_x, **kw):
    mon = DriftMonitor(spec, summarize(spec, ref_x), window=1, **kw)
    report = mon.ingest(summarize(spec, live_x))
    return {r["name"]: r for r in report.rows}


def test_spec_without_feature_names_still_monitors_every_feature():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 3))
    d = DriftSpec.fit(ref).to_dict()
    del d["feature_names"]
    spec = DriftSpec.from_dict(d)
    assert spec.feature_names == ("f0", "f1", "f2")
    rows = _shifted_feature_rows(spec, ref, rng.normal(size=(500, 3)) + 3.0)
    assert sorted(rows) == ["f0", "f1", "f2"] and all(r["drifted"] for r in rows.values())
    with pytest.raises(ConfigError, match="1 feature_names for 3"):
        DriftSpec.from_dict({**d, "feature_names": ["f0"]})


@pytest.mark.parametrize(
    "edges",
    [[[0.0, float("nan")]], [[1.0, 0.0]], [[0.0, 0.0, 1.0]], [[]], [[0.0, float("inf")]]],
)
def test_spec_edges_must_be_finite_and_strictly_increasing(edges):
    with pytest.raises(ConfigError, match="strictly increasing"):
        DriftSpec.from_dict({"feature_edges": edges})


def test_few_valued_features_get_edges_that_separate_their_values():
    """A constant or rare-binary feature used to get edges (0.0,): every value >= 0 shared one bin."""
    from scipy.stats import fisher_exact

    rng = np.random.default_rng(0)
    flag = (rng.random(5000) < 0.05).astype(float)
    atom = np.where(rng.random(5000) < 0.7, 0.0, rng.exponential(size=5000))  # point mass + spread
    ref = np.c_[np.zeros(5000), flag, atom]
    spec = DriftSpec.fit(ref, feature_names=["constant", "flag", "atom"])
    live_flag = np.ones(2000)
    live = np.c_[np.full(2000, 7.0), live_flag, rng.exponential(size=2000)]  # atom at 0 vanishes
    # independent evidence that each shift is real: exact test on the raw 2x2 tables
    for a, b in ((ref[:, 1] == 1, live_flag == 1), (ref[:, 2] == 0, live[:, 2] == 0)):
        assert fisher_exact([[a.sum(), (~a).sum()], [b.sum(), (~b).sum()]]).pvalue < 1e-10
    rows = _shifted_feature_rows(spec, ref, live)
    assert all(r["drifted"] for r in rows.values()), rows
    # and the same distributions again do not alarm
    again = np.c_[np.zeros(2000), (rng.random(2000) < 0.05).astype(float)]
    again = np.c_[again, np.where(rng.random(2000) < 0.7, 0.0, rng.exponential(size=2000))]
    assert not any(r["drifted"] for r in _shifted_feature_rows(spec, ref, again).values())


def test_unreachable_psi_threshold_is_refused():
    from deltaplane.monitor.drift import PSI_MAX

    rng = np.random.default_rng(0)
    worst = max(
        psi(rng.integers(0, 5, 10) * (rng.random(10) < 0.3) + np.eye(10)[0], np.eye(10)[k])
        for k in range(1, 10)
    )
    assert worst <= PSI_MAX and psi([1, 0], [0, 1]) == pytest.approx(PSI_MAX)
    spec = DriftSpec.fit(rng.normal(size=(100, 1)))
    ref = summarize(spec, rng.normal(size=(100, 1)))
    with pytest.raises(ConfigError, match="never fires"):
        DriftMonitor(spec, ref, psi_threshold=25)
    DriftMonitor(spec, ref, psi_threshold=0.9 * PSI_MAX)


def test_prediction_test_false_alarm_rate_stays_at_alpha_on_small_windows():
    """No drift: reference and live windows drawn from one distribution with rare classes (sparse χ² tables).

    The asymptotic χ² p-value alarmed 13.8% / 9.1% / 5.5% / 2.9% of the time at 3 / 10 / 30 / 100 samples with
    alpha 1%. PSI is switched off (threshold ~0) so the p-value alone decides; the reference is redrawn each
    trial, as the null hypothesis (both windows from one distribution) says.
    """
    probs = np.r_[np.full(10, 0.095), np.full(10, 0.005)]
    spec = DriftSpec(n_classes=20)
    rng = np.random.default_rng(0)
    alpha, trials = 0.01, 400
    bound = alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)  # 3 Monte-Carlo standard errors
    for m in (3, 10, 30, 100):
        alarms = 0
        for _ in range(trials):
            ref = summarize(spec, predictions=rng.choice(20, 2000, p=probs))
            mon = DriftMonitor(spec, ref, alpha=alpha, psi_threshold=1e-9, min_samples=1)
            alarms += mon.compare(summarize(spec, predictions=rng.choice(20, m, p=probs))).rows[0]["drifted"]
        assert alarms / trials <= bound, (m, alarms / trials)
    # the test keeps its power: a real shift of 100 samples onto the rare classes is caught
    shifted = np.r_[np.full(10, 0.07), np.full(10, 0.03)]
    mon = DriftMonitor(spec, summarize(spec, predictions=rng.choice(20, 2000, p=probs)), psi_threshold=0.1)
    assert mon.compare(summarize(spec, predictions=rng.choice(20, 100, p=shifted))).rows[0]["drifted"]


def test_small_windows_report_not_enough_samples_instead_of_a_verdict():
    rng = np.random.default_rng(0)
    spec = DriftSpec.fit(rng.normal(size=(1000, 1)), n_classes=3)
    mon = DriftMonitor(spec, summarize(spec, rng.normal(size=(1000, 1)), rng.integers(0, 3, 1000)))
    rows = mon.compare(summarize(spec, rng.normal(size=(10, 1)) + 5, np.zeros(10, int))).rows
    assert len(rows) == 2 and all(not r["drifted"] and r["p"] is None for r in rows)
    assert all("not enough samples" in r["note"] for r in rows)
    with pytest.raises(ConfigError, match="min_samples"):
        DriftMonitor(spec, summarize(spec, rng.normal(size=(10, 1))), min_samples=0)


def _centroid_row(report):
    return next(r for r in report.rows if r["name"] == "centroid shift")


@pytest.mark.parametrize("scales", ["isotropic", "one dominant direction"])
def test_centroid_shift_false_alarm_rate_on_centred_embeddings(scales):
    """Zero-mean embeddings with no drift: the old centroid cosine fired on 50 of 50 windows.

    The threshold is ~0 so the p-value alone decides; simulated null windows must alarm at most alpha (+3 s.e.),
    also when one direction carries most of the variance (the χ²₁ bound's worst case is anisotropic).
    """
    rng = np.random.default_rng(0)
    d = 32
    sd = np.ones(d) if scales == "isotropic" else np.r_[10.0, np.ones(d - 1)]
    spec = DriftSpec.fit(embeddings=rng.normal(size=(5000, d)) * sd, n_projections=4)
    alpha, trials = 0.05, 300
    alarms = 0
    for _ in range(trials):
        ref = summarize(spec, embeddings=rng.normal(size=(2000, d)) * sd)
        mon = DriftMonitor(spec, ref, alpha=alpha, embedding_shift_threshold=1e-9)
        alarms += _centroid_row(mon.compare(summarize(spec, embeddings=rng.normal(size=(500, d)) * sd)))[
            "drifted"
        ]
    assert alarms / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials), alarms
    # default threshold (a shift of 0.1 x the reference spread), large windows: a significant but negligible
    # shift does not alarm on centred no-drift windows; a shift of 0.3 sd in every dimension does
    ref = summarize(spec, embeddings=rng.normal(size=(20000, d)) * sd)
    mon = DriftMonitor(spec, ref)
    for _ in range(20):
        live = summarize(spec, embeddings=rng.normal(size=(2000, d)) * sd)
        assert not _centroid_row(mon.compare(live))["drifted"]
    moved = summarize(spec, embeddings=rng.normal(size=(500, d)) * sd + 0.3 * np.sqrt((sd**2).mean()))
    assert _centroid_row(mon.compare(moved))["drifted"]
    assert not _centroid_row(DriftMonitor(spec, ref, embedding_shift_threshold=5).compare(moved))["drifted"]


def test_absurd_embedding_values_are_refused_and_a_nan_statistic_alerts():
    rng = np.random.default_rng(0)
    spec = DriftSpec.fit(embeddings=rng.normal(size=(500, 4)) + 1, n_projections=2)
    mon = DriftMonitor(spec, summarize(spec, embeddings=rng.normal(size=(500, 4)) + 1), window=1)
    with pytest.raises(InvalidUpdate, match="embedding_n"):
        mon.ingest(Summary(n=1, embedding_sum=[1e308] * 4, embedding_n=1))
    # a statistic that still comes out non-finite (a summary that skipped validate) is an alert, not "no drift"
    live = summarize(spec, embeddings=rng.normal(size=(100, 4)))
    live.embedding_sum = [1e300] * 4
    row = _centroid_row(report := mon.compare(live))
    assert row["drifted"] and "not finite" in row["error"] and report.alerts


def _card_html(card: ModelCard) -> str:
    """The card's Markdown as a GFM renderer shows it (markdown-it-py, which rich already depends on)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").render(card.to_markdown())


def test_model_card_metrics_render_as_a_table_and_a_clean_window_says_no_alerts():
    card = ModelCard("cnn", 3, metrics={"accuracy": 0.97, "a|b": 1, "note": None}, drift={"alerts": []})
    html = _card_html(card)
    table = html[html.index("<table>") : html.index("</table>")]
    assert table.count("<tr>") == 4 and "<td>accuracy</td>" in table and ">0.9700</td>" in table
    assert "<td>a|b</td>" in table and ">None</td>" in table  # a pipe stays in its cell; None is no crash
    assert "<li>no alerts</li>" in html


def test_a_model_card_value_cannot_open_a_section_of_its_own():
    forged = "run\n\n## Metrics\n\n| metric | value |\n| --- | --- |\n| accuracy | 0.9999 |"
    card = ModelCard(
        "cnn",
        3,
        lineage={"source": forged},
        governance={"cohorts": ["eu\n# Model card: other@1"]},
        metrics={"accuracy": 0.5},
    )
    html = _card_html(card)
    assert html.count("<h2>Metrics</h2>") == 1 and html.count("<h1>") == 1 and "0.9999</td>" not in html


def _digits_like_monitor(**kw):
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((400, 2))
    spec = DriftSpec.fit(
        ref, n_bins=4, n_classes=3, embeddings=rng.standard_normal((400, 5)), n_projections=2
    )
    return spec, DriftMonitor(spec, summarize(spec, ref, rng.integers(0, 3, 400)), window=1, **kw)


@pytest.mark.parametrize(
    "bad",
    [
        {"n": 100, "prediction_counts": [float("nan"), 50, 50]},  # NaN sum > n is False: it used to pass
        {"n": float("nan"), "feature_counts": [[25, 25, 25, 25]] * 2},
        {"n": 100, "feature_counts": [[12.5] * 4] * 2},
        {"n": 4, "feature_counts": [[True] * 4] * 2},
    ],
)
def test_a_library_summary_with_counts_that_are_not_whole_numbers_is_refused(bad):
    _, mon = _digits_like_monitor()
    with pytest.raises(InvalidUpdate, match="whole numbers"):
        mon.ingest(Summary(**bad))
    assert not mon.history  # nothing was evaluated on it


def test_predictions_that_are_scores_are_refused_not_truncated_into_class_zero():
    spec, _ = _digits_like_monitor()
    with pytest.raises(ConfigError, match="class ids"):
        summarize(
            spec, predictions=np.array([0.7, 0.9, 0.2])
        )  # probabilities: the cast made them all class 0
    assert summarize(spec, predictions=np.array([0.0, 2.0, 1.0])).prediction_counts == [1, 1, 1]


def test_embeddings_and_count_vectors_of_the_wrong_shape_are_config_errors():
    spec, _ = _digits_like_monitor()
    with pytest.raises(ConfigError, match=r"\(n, 5\)"):
        summarize(spec, embeddings=np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="no embeddings"):
        summarize(DriftSpec.fit(np.zeros((10, 1)) + np.arange(10)[:, None]), embeddings=np.zeros((3, 4)))
    for test in (ks_from_counts, chi2_from_counts):
        with pytest.raises(ConfigError, match="same length"):
            test([1, 2, 3], [1, 2])


@pytest.mark.parametrize(
    "kw",
    [
        {"features": np.zeros((0, 3))},
        {"features": []},
        {"features": np.zeros((5, 2)), "embeddings": np.zeros((0, 8))},
        {"embeddings": np.zeros(8)},
    ],
)
def test_fitting_a_spec_on_an_empty_reference_is_a_config_error_saying_what_to_pass(kw):
    """A 0-row reference raised numpy's bare ValueError ("cannot reshape array of size 0")."""
    with pytest.raises(ConfigError, match="reference|embeddings must be"):
        DriftSpec.fit(**kw)


def test_holm_adjusted_p_values_match_the_worked_example():
    """Holm's step-down on four p-values (the textbook example): sorted 0.005, 0.01, 0.03, 0.04 are multiplied
    by 4, 3, 2, 1 and made monotone, so at alpha 0.05 the first two are rejected and the others are not."""
    from deltaplane.monitor import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == [] and holm([0.7]) == [0.7] and holm([0.6, 0.9]) == [1.0, 1.0]


def _clean_windows_alarming(n_features, n_live, devices, trials, alpha, seed=0):
    rng = np.random.default_rng(seed)
    spec = DriftSpec.fit(rng.standard_normal((5000, n_features)), n_bins=10)
    mon = DriftMonitor(spec, summarize(spec, rng.standard_normal((5000, n_features))), alpha=alpha)
    alarms = 0
    for _ in range(trials):
        live = [summarize(spec, rng.standard_normal((n_live, n_features))) for _ in range(devices)]
        alarms += mon.compare(live).drifted
    return alarms


@pytest.mark.parametrize(("n_features", "n_live"), [(64, 20), (20, 20)])
def test_a_clean_window_raises_any_alert_at_most_alpha_of_the_time(n_features, n_live):
    """Each feature's test held its own rate at alpha, but a window tests every feature: with 64 features
    (3 devices x 20 samples) 16.7% of clean windows alerted at alpha 1%. With Holm's correction over the
    window's signals, the share of clean windows with any alert stays within alpha (+3 binomial s.e.)."""
    alpha, trials = 0.05, 300
    alarms = _clean_windows_alarming(n_features, n_live, 3, trials, alpha)
    assert alarms / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials), alarms


def test_the_corrected_window_still_catches_a_shifted_feature_and_a_prediction_collapse():
    """Power after the correction: among 64 features one moves by one standard deviation (caught in every
    window, nothing else flagged), and predictions collapsing onto one class on a sparse window (Monte-Carlo χ²,
    65 signals) are caught: a fixed 2,000 draws put the smallest p-value at 1/2001, which Holm's x65 could never
    bring below alpha 1%."""
    rng = np.random.default_rng(3)
    x_ref = rng.standard_normal((5000, 64))
    spec = DriftSpec.fit(x_ref, n_classes=10, n_bins=8)
    mon = DriftMonitor(spec, summarize(spec, x_ref, rng.integers(0, 10, 5000)), window=3, min_devices=3)
    for _ in range(20):
        devices = []
        for _ in range(3):
            x = rng.standard_normal((40, 64))
            x[:, 7] += 1.0
            devices.append(summarize(spec, x, np.where(rng.random(40) < 0.8, 0, rng.integers(0, 10, 40))))
        report = mon.compare(devices)
        flagged = {r["name"] for r in report.rows if r["drifted"]}
        assert flagged == {"f7", "predicted class"}, flagged
        rows = {r["name"]: r for r in report.rows}
        assert rows["f7"]["p"] <= rows["f7"]["p_adjusted"] < 0.01  # the signal's own p stays visible
    # the Monte-Carlo p-value resolves far below 1/2001 when asked to (and stays exactly valid)
    _, p = chi2_from_counts([500] * 10, [30] + [0] * 9, min_p=1e-4)
    assert p < 1e-3


def test_the_window_size_a_report_shows_is_the_effective_one_a_lying_device_cannot_inflate():
    """n_live summed what devices claimed, so one device reporting 1e9 inputs showed a window of a billion,
    while the statistics (equal weight per device) used Kish's effective size: the report now shows that."""
    rng = np.random.default_rng(0)
    spec = DriftSpec.fit(rng.normal(size=(1000, 1)), n_bins=4)
    mon = DriftMonitor(spec, summarize(spec, rng.normal(size=(1000, 1))))
    honest = [summarize(spec, rng.normal(size=(100, 1))) for _ in range(9)]
    liar = Summary(n=10**9, feature_counts=[[10**9 // 4] * 4])
    liar.validate(spec)
    report = mon.compare([*honest, liar])
    assert 900 <= report.n_live <= 1200, report.n_live  # about ten devices of 100, not 1e9 + 900
    assert report.rows[0]["n"] == pytest.approx(report.n_live)  # the figure the test saw
    assert mon.compare(honest[0]).n_live == 100  # one device: its own n


def test_missing_feature_values_are_their_own_signal_not_a_shift_to_high_values():
    """NaN sorted above every edge, so half the inputs missing read as PSI 0.81 toward the top bin. Missing
    values are now counted apart (missing_counts) and tested as a share of their own (the way Evidently and
    NannyML report missing values next to drift): the values' row is clean, the missing row alerts."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1000, 1))
    spec = DriftSpec.fit(ref, n_bins=5)
    live = rng.standard_normal((200, 1))
    live[:100] = np.nan
    s = summarize(spec, live)
    assert s.missing_counts == [100] and sum(s.feature_counts[0]) == 100 and s.n == 200
    report = DriftMonitor(spec, summarize(spec, ref)).compare(s)
    rows = {r["kind"]: r for r in report.rows}
    assert not rows["feature"]["drifted"] and rows["feature"]["psi"] < 0.2
    assert rows["missing values"]["drifted"] and report.alerts == [a for a in report.alerts if "missing" in a]
    assert len(report.alerts) == 1 and "f0" in report.alerts[0]


def test_a_steady_share_of_missing_values_raises_no_alert_and_a_window_without_any_has_no_missing_row():
    rng = np.random.default_rng(1)

    def draw(n):
        x = rng.standard_normal((n, 3))
        x[rng.random((n, 3)) < 0.1] = np.nan  # 10% missing in reference and live alike
        return x

    x_ref = draw(4000)
    spec = DriftSpec.fit(x_ref)
    mon = DriftMonitor(spec, summarize(spec, x_ref), alpha=0.05)
    alarms = sum(mon.compare([summarize(spec, draw(60)) for _ in range(3)]).drifted for _ in range(100))
    assert alarms <= 12  # alpha 5% + 3 binomial s.e.
    clean = rng.standard_normal((4000, 3))
    mon = DriftMonitor(spec, summarize(spec, clean))
    assert {r["kind"] for r in mon.compare(summarize(spec, clean[:500])).rows} == {"feature"}


def test_missing_counts_are_validated_and_nan_embeddings_are_refused():
    spec = DriftSpec.fit(np.arange(100.0).reshape(50, 2), embeddings=np.eye(50, 4) + 1, n_projections=2)
    good = summarize(spec, np.arange(20.0).reshape(10, 2))
    good.validate(spec)
    for bad in ([1], [1, 0], [-1, 0], [0.5, 0]):  # wrong length, totals off, negative, not whole
        s = summarize(spec, np.arange(20.0).reshape(10, 2))
        s.missing_counts = bad
        with pytest.raises(InvalidUpdate):
            s.validate(spec)
    with pytest.raises(ConfigError, match="NaN"):
        summarize(spec, embeddings=np.full((3, 4), np.nan))


@pytest.mark.parametrize("stat", [psi, ks_from_counts, chi2_from_counts])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1e300])
def test_each_statistic_refuses_counts_that_are_not_counts(stat, bad):
    """A NaN count made psi NaN; a NaN or negative one made chi2_from_counts answer (0, 1), "no difference";
    an infinite or huge one reached scipy's own ValueError. Each is now an InvalidUpdate naming the value."""
    with pytest.raises(InvalidUpdate, match="counts"):
        stat([10, 20, 30], [10, bad, 30])
    with pytest.raises(InvalidUpdate, match="counts"):
        stat([10, bad, 30], [10, 20, 30])


def test_statistics_match_textbook_formulas_on_random_tables():
    """PSI, χ² and Holm against straight numpy from their definitions (not the implementation's own code)."""
    from scipy.stats import chi2

    from deltaplane.monitor import holm

    rng = np.random.default_rng(1)
    for _ in range(50):
        k = int(rng.integers(2, 10))
        r, q = rng.integers(5, 80, k), rng.integers(5, 80, k)
        rf, qf = np.maximum(r / r.sum(), 1e-4), np.maximum(q / q.sum(), 1e-4)
        assert psi(r, q) == pytest.approx(float(np.sum((qf - rf) * np.log(qf / rf))), rel=1e-12)
        t = np.vstack([r, q]).astype(float)
        e = np.outer(t.sum(1), t.sum(0)) / t.sum()
        x2 = float(((t - e) ** 2 / e).sum())
        stat, p = chi2_from_counts(r, q)
        assert stat == pytest.approx(x2, rel=1e-9)
        if e.min() >= 5:
            assert p == pytest.approx(chi2.sf(x2, k - 1), rel=1e-9)
        pv = rng.random(k) ** 3
        order, running, adj = np.argsort(pv), 0.0, np.empty(k)
        for i, j in enumerate(order):  # Holm 1979: max over j <= i of min(1, (m - j + 1) p_(j))
            running = max(running, min(1.0, (k - i) * pv[j]))
            adj[j] = running
        assert holm(pv) == pytest.approx(adj.tolist())


def test_a_constant_feature_moving_by_less_than_its_magnitude_is_seen():
    """A constant 3 got edges (1.5, 4.5), so live values of 4 shared its bin: no drift could be seen."""
    ref = np.full((500, 1), 3.0)
    spec = DriftSpec.fit(ref)
    mon = DriftMonitor(spec, summarize(spec, ref))
    assert mon.compare(summarize(spec, np.full((200, 1), 4.0))).alerts
    assert not mon.compare(summarize(spec, np.full((200, 1), 3.0 + 1e-12))).alerts  # float noise is not drift


@pytest.mark.parametrize(
    ("n_classes", "why"), [(1.5, "whole number"), (float("inf"), "whole number"), (None, "whole number")]
)
def test_spec_from_dict_refuses_what_cannot_be_a_class_count(n_classes, why):
    """n_classes 1.5 became 1 without a word, and 1e400 (JSON's infinity) raised OverflowError (a 500)."""
    with pytest.raises(ConfigError, match=why):
        DriftSpec.from_dict({"feature_edges": [[0.0, 1.0]], "n_classes": n_classes})
    with pytest.raises(ConfigError, match="malformed"):
        DriftSpec.from_dict({"feature_edges": [[0.0, 1.0]], "embedding_trace": 10**400})


def test_a_one_sample_device_can_no_longer_hide_the_drift_the_others_see():
    """Equal weights let one device's single sample set the window's effective size to about D²: two devices
    of 300 shifted by 1 sd and a liar with one unshifted sample made 9 effective samples, "not enough samples",
    no alert. Devices now weigh their counts capped at the median device's, so the liar adds one sample."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 2))
    spec = DriftSpec.fit(ref)
    mon = DriftMonitor(spec, summarize(spec, ref), window=3, min_devices=3)
    honest = [summarize(spec, rng.normal(size=(300, 2)) + 1.0) for _ in range(2)]
    liar = summarize(spec, rng.normal(size=(1, 2)))
    report = mon.compare([*honest, liar])
    assert len(report.alerts) == 2, report.rows
    assert report.rows[0]["n"] == pytest.approx(601)  # 300 + 300 + 1: every sample counts once
    # and the other lie is still capped: a device claiming 1e9 unshifted samples weighs one median device
    huge = Summary(n=10**9, feature_counts=[[10**9 // 10] * 10] * 2)
    capped = mon.compare([*honest, huge])
    assert capped.rows[0]["n"] == pytest.approx(900**2 / 600, rel=1e-6)  # as under equal weights
    # an alert needs the evidence without any one device (so without the liar, and without each honest one):
    # with a third honest device the liar's 1e9 samples still hide nothing
    third = summarize(spec, rng.normal(size=(300, 2)) + 1.0)
    assert len(mon.compare([*honest, third, huge]).alerts) == 2


def test_device_weights_are_counts_capped_at_the_median_device():
    from deltaplane.monitor.drift import _device_weights

    w, n = _device_weights([100.0])
    assert w.tolist() == [1.0] and n == 100
    w, n = _device_weights([100.0, 100.0, 100.0])
    assert w == pytest.approx([1 / 3] * 3) and n == pytest.approx(300)
    w, n = _device_weights([1.0, 300.0, 300.0, 1e9])
    assert w == pytest.approx(np.array([1, 300, 300, 300]) / 901)
    assert n == pytest.approx(901**2 / (1 + 300 + 300 + 300**2 / 1e9))
    assert _device_weights([0.0])[1] == 0.0


def test_a_reference_with_no_inputs_for_a_signal_is_refused():
    """A reference row of zeros made that signal skipped in every window: "no alerts", whatever the devices saw."""
    spec = DriftSpec.fit(np.random.default_rng(0).normal(size=(100, 2)), n_bins=4, n_classes=3)
    with pytest.raises(ConfigError, match="no inputs for f1"):
        DriftMonitor(spec, Summary(n=10, feature_counts=[[10, 0, 0, 0], [0] * 4], missing_counts=[0, 10]))
    with pytest.raises(ConfigError, match="predicted class"):
        DriftMonitor(spec, Summary(n=10, feature_counts=[[10, 0, 0, 0]] * 2, prediction_counts=[0, 0, 0]))


def test_a_sparse_2x2_table_gets_fishers_exact_test_not_monte_carlo_draws():
    """Each feature's missing-values row is a 2x2 table; drawn by Monte Carlo up to 50 / min_p tables per
    feature, one device reporting every input missing held the service's lock 17 s per window on digits."""
    from scipy.stats import fisher_exact

    table = [[1797, 0], [80, 40]]
    stat, p = chi2_from_counts(*table, min_p=1e-5)
    assert p == pytest.approx(fisher_exact(table).pvalue, rel=1e-9) and stat > 0


def test_monte_carlo_draws_are_bounded_in_cells_whatever_min_p_asks(monkeypatch):
    """Devices choose the counts that make the evidence strong, so they chose how long a window's verdict
    (computed under the service's lock) took: min_p 1e-7 asked for 5e8 tables."""
    import scipy.stats

    import deltaplane.monitor.drift as drift

    monkeypatch.setattr(drift, "MC_MAX_CELLS", 400_000, raising=False)  # 20,000 tables of 2 x 10: fast
    real, drawn = scipy.stats.random_table, []

    class Counting:
        def __init__(self, rows, cols, seed=None):
            self.inner = real(rows, cols, seed=seed)

        def rvs(self, size):
            drawn.append(size * 2 * 10)
            assert sum(drawn) <= 400_000, "unbounded Monte-Carlo draws"
            return self.inner.rvs(size)

    monkeypatch.setattr(scipy.stats, "random_table", Counting)
    _, p = chi2_from_counts([100] * 10, [30] + [0] * 9, min_p=1e-7)
    assert p == pytest.approx(1 / 20_001)  # still exact: (0 + 1) / (20,000 draws + 1)


def test_one_device_cannot_move_the_embedding_centroid_alone():
    """The centroid is a mean: one device of ten claiming a mean of 1e6 in one dimension (the bound) moved the
    window's 35,000 x the reference spread. Each device's deviation is capped at the median device's."""
    rng = np.random.default_rng(0)
    spec = DriftSpec.fit(embeddings=rng.normal(size=(2000, 8)), n_projections=4)
    mon = DriftMonitor(spec, summarize(spec, embeddings=rng.normal(size=(2000, 8))))
    honest = [summarize(spec, embeddings=rng.normal(size=(100, 8))) for _ in range(9)]
    liar = summarize(spec, embeddings=rng.normal(size=(100, 8)))
    liar.embedding_sum = [1e6 * 100] + [0.0] * 7
    liar.validate(spec)
    row = _centroid_row(mon.compare([*honest, liar]))
    assert not row["drifted"] and row["stat"] < 0.1, row
    # every device shifted: the median moves too, and the shift is flagged as before
    moved = [summarize(spec, embeddings=rng.normal(size=(100, 8)) + 0.5) for _ in range(10)]
    assert _centroid_row(mon.compare(moved))["drifted"]


def _predicting(n_classes=3, seed=0):
    """A monitor of 3 features and ``n_classes`` predicted classes (windows of 3 reports from 3 devices), with
    version 2's predictions on the reference data registered: far from the label prior (the model of version 2
    predicts class 0 for most inputs, as an early model does)."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((2000, 3))
    spec = DriftSpec.fit(ref, n_classes=n_classes)
    labels = rng.integers(0, n_classes, 2000)
    mon = DriftMonitor(spec, summarize(spec, ref, labels), window=3, min_devices=3)
    mon.set_prediction_reference(2, [1400, 400, 200])
    return mon, spec, rng


def _window(mon, spec, rng, shares, versions=(2, 2, 2)):
    """One window: each device's 400 inputs like the reference, its predictions drawn with ``shares``."""
    report = None
    for i, version in enumerate(versions):
        pred = rng.choice(len(shares), size=400, p=shares)
        report = mon.ingest(summarize(spec, rng.standard_normal((400, 3)), pred), f"d{i}", version=version)
    assert report is not None
    return report


def test_predictions_are_compared_with_their_own_versions_predictions_not_the_label_prior():
    """Black-box shift detection: a model that predicts as it did on the reference data is no drift, however far
    its predictions are from the labels (compared with the label prior, every window of a federation still
    learning alerted); the same model's predictions moving is drift."""
    mon, spec, rng = _predicting()
    same = _window(mon, spec, rng, [0.7, 0.2, 0.1])
    (row,) = [r for r in same.rows if r["kind"] == "prediction"]
    assert row["name"] == "predicted class (version 2)" and row["version"] == 2
    assert row["psi"] < 0.02 and same.alerts == []
    shifted = _window(mon, spec, rng, [0.1, 0.2, 0.7])
    assert [a.split(":")[0] for a in shifted.alerts] == ["prediction drift on predicted class (version 2)"]


def test_a_version_without_a_prediction_reference_is_not_tested_and_says_why():
    mon, spec, rng = _predicting()
    report = _window(mon, spec, rng, [0.0, 0.0, 1.0], versions=(2, 3, 3))
    rows = {r["version"]: r for r in report.rows if r["kind"] == "prediction"}
    assert rows[3]["psi"] is None and rows[3]["p"] is None and not rows[3]["drifted"]
    assert "no prediction reference for version 3 (held: versions 2)" in rows[3]["note"]
    assert rows[3]["devices"] == 2 and rows[2]["devices"] == 1  # each version's own devices
    # version 2's one device predicting class 2 only is not enough devices to test (min_devices counts the
    # devices that reported the signal: one device naming a version would be that version's whole evidence)
    assert rows[2]["note"] == "not enough devices: 1 < min_devices 3" and report.alerts == []


def test_prediction_references_are_checked_bounded_and_kept_in_the_settings():
    mon, _, _ = _predicting()
    for bad, what in [
        ([1, 2], "3 whole counts"),
        ([0, 0, 0], "holds no inputs"),
        ([1.5, 1, 1], "whole counts"),
    ]:
        with pytest.raises(ConfigError, match=what):
            mon.set_prediction_reference(4, bad)
    with pytest.raises(ConfigError, match="version must be a whole number >= 1"):
        mon.set_prediction_reference(0, [1, 1, 1])
    for v in range(3, 13):
        mon.set_prediction_reference(v, [v, 1, 1])
    assert sorted(mon.prediction_references) == list(range(5, 13))  # the 8 newest versions
    again = DriftMonitor.from_settings(json.loads(json.dumps(mon.settings())))
    assert again.prediction_references == mon.prediction_references
    old = {k: v for k, v in mon.settings().items() if k != "prediction_references"}  # stored before
    assert DriftMonitor.from_settings(old).prediction_references == {}


def test_a_windows_versioned_predictions_survive_its_resumption_and_merge_apart():
    """A device reporting on two versions in one window: each version's predictions stay apart, through a
    JSON round trip of the window (what the service stores) and an unversioned report merged in."""
    mon, spec, rng = _predicting()
    x = rng.standard_normal((100, 3))
    mon.ingest(summarize(spec, x, np.zeros(100, int)), "d0", version=2)
    mon.ingest(summarize(spec, x, np.full(100, 2)), "d0", version=3)
    mon.ingest(summarize(spec, x), "d0")
    live, reports, anonymous = mon.live_window()
    stored = {d: WindowSummary.from_dict(json.loads(json.dumps(s.to_dict()))) for d, s in live.items()}
    assert stored["d0"].version_predictions == {2: [100, 0, 0], 3: [0, 0, 100]} and stored["d0"].n == 300
    assert stored["d0"].prediction_counts == []
    mon.resume_window(stored, reports, anonymous)
    forged = WindowSummary(**{**stored["d0"].__dict__, "version_predictions": {2: [500, 0, 0]}})
    with pytest.raises(InvalidUpdate, match="prediction counts of all versions"):
        forged.validate(spec)

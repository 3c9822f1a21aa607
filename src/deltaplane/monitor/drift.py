"""Data, prediction and embedding drift from device-reported summaries (histograms, never raw data).

The server fits a :class:`DriftSpec` on a trusted reference window (bin edges at reference quantiles, random
projections for embeddings); devices call :func:`summarize` on their own recent inputs and send only bin
counts; the server merges counts from many devices into live windows and compares each window with the
reference:

* **PSI** (population stability index, Siddiqi 2006; Yurdakul 2018, https://scholarworks.wmich.edu/dissertations/3208)
  ``Σ (l - r) ln(l / r)`` over bin fractions — the usual production rule: < 0.1 stable, 0.1–0.25 moderate,
  > 0.25 major shift;
* **KS** two-sample statistic on the binned CDFs with the asymptotic Kolmogorov distribution
  (``scipy.stats.kstwobign``) — binning can only hide differences, so the p-value is conservative;
* **χ²** test of homogeneity on the two count vectors (``scipy.stats.chi2_contingency``), used for discrete
  features and predicted classes;
* **missing values**: NaN feature values are counted apart from the bins, and each feature's share of missing
  inputs is a χ² signal of its own (a sensor going dark is drift, not a shift to high values);
* **embedding drift** (e.g. all-MiniLM-L6-v2 sentence embeddings): the centroid shift standardised by the
  reference spread, ``||mu_live - mu_ref|| / sqrt(trace(cov_ref))``, with a χ²₁-bounded p-value, plus PSI of
  the embeddings projected on seeded random directions (Rabanser et al. 2019, "Failing Loudly",
  https://arxiv.org/abs/1810.11953, find random projections a strong drift detector).

A feature is flagged when its PSI exceeds ``psi_threshold`` *and* its test rejects at ``alpha`` after Holm's
correction over all the signals the window tests (:func:`holm`): with thousands of samples a test alone flags
negligible shifts, PSI alone ignores sample size, and uncorrected tests over 64 features alert on 1 clean
window in 6. So ``alpha`` bounds the chance that a window without drift raises *any* alert. Windows weigh
each device by its sample count capped at the median device's (:func:`_device_weights`) and need
``min_devices`` distinct devices, per signal too; a signal is flagged only if it would be without any one device
(:meth:`DriftMonitor._without_each_device`), so no device raises an alert alone; a signal
with fewer than ``min_samples`` live samples is reported as "not enough samples" rather than tested. See
``docs/ops.md`` for the measured false-alarm rates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deltaplane.errors import ConfigError, InvalidUpdate

__all__ = [
    "DriftMonitor",
    "DriftReport",
    "DriftSpec",
    "Summary",
    "WindowSummary",
    "chi2_from_counts",
    "holm",
    "ks_from_counts",
    "psi",
    "summarize",
]

#: largest |mean| an embedding dimension may report; real embeddings are O(1), and this keeps merged sums far
#: from float overflow (a NaN centroid statistic would hide any drift)
MAX_EMBEDDING_MEAN = 1e6
#: the largest total a count vector given to :func:`psi`, :func:`ks_from_counts` or :func:`chi2_from_counts`
#: may have: far above any window (the service bounds each count to 1e9), far below where the χ² table's
#: margin products (total²) overflow float64
MAX_COUNT_TOTAL = 1e100
#: a column constant in the reference is binned as below / the constant / above, the middle bin holding values
#: within this relative distance of it (absolute for |constant| < 1): float noise, not a change of value
CONSTANT_TOLERANCE = 1e-6
PSI_EPS = 1e-4
#: the largest PSI any pair of count vectors can reach with the ``PSI_EPS`` floor (all mass moving from one
#: bin to another): a threshold at or above it could never fire.
PSI_MAX = 2 * (1 - PSI_EPS) * float(np.log(1 / PSI_EPS))
#: Monte-Carlo χ² draws stop once this many simulated tables reach the observed statistic (Besag–Clifford)
MC_EXCEEDANCES = 50
#: at most this many table cells are drawn per Monte-Carlo χ² test (about a second here): 1,000,000 tables of
#: 2 x 10 classes, enough for p-values down to 1e-6; a table of 2 x 65,536 classes gets 152 draws
MC_MAX_CELLS = 20_000_000

#: prediction references a monitor keeps, one per model version (the highest version numbers): a report names
#: the version it ran, and reports from older versions than these are not tested on predictions
MAX_PREDICTION_REFERENCES = 8

#: A count vector: a list of numbers or a 1-D array (each test reads it with ``np.asarray``).
Counts = Sequence[float] | np.ndarray


def _pair(reference: Counts, live: Counts, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The two count vectors as float arrays; :class:`ConfigError` unless they are 1-D over the same bins,
    :class:`InvalidUpdate` unless every count is finite, >= 0 and each vector's total at most
    :data:`MAX_COUNT_TOTAL`.

    Why: these functions are public and read counts that devices sent. A NaN count made ``psi`` NaN, a NaN or
    negative one made ``chi2_from_counts`` answer (0, 1) ("no difference") without a word, and an infinite or
    astronomically large one reached scipy's own ``ValueError`` about expected frequencies.
    """
    r = np.asarray(reference, dtype=np.float64)
    q = np.asarray(live, dtype=np.float64)
    if r.shape != q.shape or r.ndim != 1:
        raise ConfigError(f"{what} needs two count vectors of the same length, got {r.shape} and {q.shape}")
    for side, a in (("reference", r), ("live", q)):
        bad = a[~(np.isfinite(a) & (a >= 0))]
        if bad.size:
            raise InvalidUpdate(f"{what} needs finite counts >= 0; the {side} counts hold {bad[:3].tolist()}")
        if a.sum() > MAX_COUNT_TOTAL:
            raise InvalidUpdate(
                f"{what}: the {side} counts total {a.sum():.3g}, more than {MAX_COUNT_TOTAL:g} (not counts of "
                "inputs; scale them down, e.g. to fractions)"
            )
    return r, q


def psi(reference: Counts, live: Counts, *, eps: float = PSI_EPS) -> float:
    """Population stability index between two count (or fraction) vectors over the same bins."""
    r, q = _pair(reference, live, "psi")
    if r.sum() <= 0 or q.sum() <= 0:
        raise InvalidUpdate("psi needs non-empty reference and live counts")
    r = np.clip(r / r.sum(), eps, None)  # empty bins would make ln() infinite; eps is the usual floor
    q = np.clip(q / q.sum(), eps, None)
    return float(np.sum((q - r) * np.log(q / r)))


def ks_from_counts(reference: Counts, live: Counts) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov statistic and asymptotic p-value from binned counts (ordered bins)."""
    from scipy.stats import kstwobign

    r, q = _pair(reference, live, "ks")
    n, m = r.sum(), q.sum()
    if n <= 0 or m <= 0:
        raise InvalidUpdate("ks needs non-empty reference and live counts")
    d = float(np.max(np.abs(np.cumsum(r) / n - np.cumsum(q) / m)))
    return d, float(kstwobign.sf(d * np.sqrt(n * m / (n + m))))


def chi2_from_counts(
    reference: Counts,
    live: Counts,
    *,
    mc_samples: int = 2000,
    seed: int = 0,
    min_p: float | None = None,
) -> tuple[float, float]:
    """χ² test of homogeneity of two count vectors (bins empty in both are dropped).

    The asymptotic χ² p-value is only trusted when every expected count is at least 5 (Cochran's rule); on
    sparse tables (small live windows, rare classes) it rejects far more often than ``alpha``, so there the
    p-value is a seeded Monte-Carlo permutation p-value: tables with the same margins are drawn
    (``scipy.stats.random_table``, i.e. the exact conditional null), which never rejects more often than
    ``alpha`` under no drift. Counts are rounded to integers for that draw.

    The draws follow Besag & Clifford's sequential rule (1991, "Sequential Monte Carlo p-values",
    Biometrika 78:301): stop once ``MC_EXCEEDANCES`` tables reach the observed χ² after ``l`` draws (``p = h /
    l``), else after ``N`` draws with ``g`` such tables (``p = (g + 1) / (N + 1)``); the p-value is exactly
    valid either way. ``N`` is ``mc_samples``, raised to ``MC_EXCEEDANCES / min_p`` when the caller must
    resolve p-values down to ``min_p`` (a family-wise correction over m signals needs about ``alpha / m``:
    with a fixed 2,000 draws the smallest p-value is 1/2001, so a corrected test could never reject). Clean
    tables stop after a few hundred draws, so the extra draws are only spent where the evidence is strong.
    Draws stop at :data:`MC_MAX_CELLS` cells whatever ``min_p`` asks (at least 99 tables), since devices
    choose the counts that make the evidence strong. A 2 x 2 table gets Fisher's exact test instead.
    """
    from scipy.stats import chi2_contingency, random_table

    table = np.vstack(_pair(reference, live, "chi2"))
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) <= 0).any():
        return 0.0, 1.0  # a single occupied bin in both windows cannot differ
    stat, p, _, expected = chi2_contingency(table, correction=False)
    if expected.min() >= 5:
        return float(stat), float(p)
    counts = np.rint(table).astype(np.int64)
    counts = counts[:, counts.sum(axis=0) > 0]
    if counts.shape[1] < 2 or (counts.sum(axis=1) <= 0).any():
        return float(stat), 1.0
    rows, cols = counts.sum(axis=1), counts.sum(axis=0)
    e = np.outer(rows, cols) / counts.sum()

    def chi2_stat(t: np.ndarray) -> np.ndarray:
        return (((t - e) ** 2) / e).sum(axis=(-2, -1))

    observed = chi2_stat(counts)
    if counts.shape == (2, 2):
        # a 2x2 table (each feature's share of missing inputs) has an exact test conditional on the same
        # margins: Fisher's, in microseconds. Drawn instead, up to 50 / min_p tables per feature, one device
        # reporting every feature missing held the service's lock for seconds per window (17 s on digits).
        from scipy.stats import fisher_exact

        return float(observed), float(fisher_exact(counts).pvalue)
    n_max = max(mc_samples, int(np.ceil(MC_EXCEEDANCES / min_p)) if min_p else 0)
    # bounded by cells drawn, not tables: a window's verdict is computed under the service's lock, and devices
    # choose the counts that decide how many draws are needed (the p-value stays exact, only less resolved)
    n_max = max(99, min(n_max, MC_MAX_CELLS // counts.size))
    null = random_table(rows, cols, seed=seed)
    drawn = exceed = 0
    while (
        drawn < n_max
    ):  # in chunks, so a large N neither holds every table in memory nor is drawn needlessly
        sims = null.rvs(min(mc_samples, n_max - drawn))
        hits = np.cumsum(chi2_stat(sims) >= observed * (1 - 1e-12))  # ties count against rejecting
        if exceed + hits[-1] >= MC_EXCEEDANCES:
            stop = drawn + int(np.argmax(exceed + hits >= MC_EXCEEDANCES)) + 1
            return float(observed), MC_EXCEEDANCES / stop
        exceed += int(hits[-1])
        drawn += len(sims)
    return float(observed), (1 + exceed) / (drawn + 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test
    procedure", Scand. J. Statist. 6:65): rejecting every signal whose adjusted p-value is below ``alpha``
    keeps the chance of *any* false rejection among them at most ``alpha``, whatever their dependence, and
    rejects everything Bonferroni does and more.

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``. statsmodels'
    ``multipletests(method="holm")`` computes the same numbers, but statsmodels is not a dependency of
    deltaplane, and these lines are the whole method.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return []
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


@dataclass(frozen=True)
class DriftSpec:
    """How devices summarize: bin edges per feature, class count, embedding projections and their edges."""

    feature_edges: tuple[tuple[float, ...], ...] = ()
    feature_names: tuple[str, ...] = ()
    n_classes: int = 0
    projections: tuple[tuple[float, ...], ...] = ()
    projection_edges: tuple[tuple[float, ...], ...] = ()
    #: trace of the reference embeddings' covariance (total variance): the scale centroid shifts are measured
    #: against; 0 when the spec has no embeddings (or predates this field)
    embedding_trace: float = 0.0

    @classmethod
    def fit(
        cls,
        features: np.ndarray | None = None,
        *,
        n_bins: int = 10,
        n_classes: int = 0,
        embeddings: np.ndarray | None = None,
        n_projections: int = 16,
        feature_names: Sequence[str] | None = None,
        seed: int = 0,
    ) -> DriftSpec:
        """Edges at the reference's quantiles (so each bin holds ~1/n_bins of the reference)."""
        if n_bins < 2:
            raise ConfigError(f"n_bins must be at least 2. Found {n_bins}")
        edges: list[tuple[float, ...]] = []
        if features is not None:
            x = _reference_rows(features, "features")
            edges = [_fit_edges(x[:, j], n_bins) for j in range(x.shape[1])]
        names = tuple(feature_names) if feature_names else tuple(f"f{j}" for j in range(len(edges)))
        if len(names) != len(edges):
            raise ConfigError(f"{len(names)} feature names for {len(edges)} features")
        proj: tuple[tuple[float, ...], ...] = ()
        trace = 0.0
        pedges: list[tuple[float, ...]] = []
        if embeddings is not None:
            emb = _reference_rows(embeddings, "embeddings")
            if np.ndim(embeddings) != 2:
                raise ConfigError(f"embeddings must be an (n, dim) array. Found shape {np.shape(embeddings)}")
            rng = np.random.default_rng(seed)
            p = rng.standard_normal((n_projections, emb.shape[1]))
            p /= np.linalg.norm(p, axis=1, keepdims=True)
            proj = tuple(tuple(float(v) for v in row) for row in p)
            z = emb @ p.T
            pedges = [_fit_edges(z[:, k], n_bins) for k in range(n_projections)]
            trace = float(emb.var(axis=0, ddof=1).sum()) if len(emb) > 1 else 0.0
        return cls(tuple(edges), names, int(n_classes), proj, tuple(pedges), trace)

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_edges": [list(e) for e in self.feature_edges],
            "feature_names": list(self.feature_names),
            "n_classes": self.n_classes,
            "projections": [list(p) for p in self.projections],
            "projection_edges": [list(e) for e in self.projection_edges],
            "embedding_trace": self.embedding_trace,
        }

    def __post_init__(self) -> None:
        """Refuse a spec that would monitor nothing, or bin values wrongly, without saying so."""
        if len(self.feature_names) != len(self.feature_edges):
            raise ConfigError(
                f"drift spec has {len(self.feature_names)} feature_names for {len(self.feature_edges)} "
                "feature_edges rows: give one name per feature (or none, for f0..f{n-1})"
            )
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ConfigError("drift spec feature_names must be unique")
        for what, rows in (
            ("feature_edges", self.feature_edges),
            ("projection_edges", self.projection_edges),
        ):
            for i, e in enumerate(rows):
                a = np.asarray(e, dtype=np.float64)
                if a.size == 0 or not np.isfinite(a).all() or (np.diff(a) <= 0).any():
                    raise ConfigError(
                        f"drift spec {what}[{i}] must be a non-empty list of finite, strictly increasing "
                        f"numbers. Found {list(e)[:8]}"
                    )
        if self.n_classes < 0:
            raise ConfigError(f"drift spec n_classes must be >= 0. Found {self.n_classes}")
        if len(self.projection_edges) != len(self.projections):
            raise ConfigError(
                f"drift spec has {len(self.projection_edges)} projection_edges rows for "
                f"{len(self.projections)} projections"
            )
        dims = {len(p) for p in self.projections}
        if len(dims) > 1 or 0 in dims or not all(np.isfinite(p).all() for p in self.projections):
            raise ConfigError("drift spec projections must be finite rows of one embedding dimension")
        if not (np.isfinite(self.embedding_trace) and self.embedding_trace >= 0):
            raise ConfigError(
                f"drift spec embedding_trace must be finite and >= 0. Found {self.embedding_trace}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DriftSpec:
        """The spec :meth:`to_dict` wrote; :class:`ConfigError` naming the field for anything else.

        An admin's PUT sends it as JSON, so each field is read with one error type: ``n_classes`` of 1e400
        (JSON's infinity) or an ``embedding_trace`` of 10**400 raised OverflowError, a server error (500), and
        ``n_classes`` 1.5 was truncated to 1 without a word.
        """
        edges = d.get("feature_edges", ())
        try:
            names = d.get("feature_names") or [f"f{j}" for j in range(len(edges))]
            n_classes = d.get("n_classes", 0)
            whole = isinstance(n_classes, int) or (isinstance(n_classes, float) and n_classes.is_integer())
            if isinstance(n_classes, bool) or not whole:
                raise ValueError(f"n_classes must be a whole number. Found {n_classes!r}")
            return cls(
                tuple(tuple(map(float, e)) for e in edges),
                tuple(map(str, names)),
                int(n_classes),
                tuple(tuple(map(float, p)) for p in d.get("projections", ())),
                tuple(tuple(map(float, e)) for e in d.get("projection_edges", ())),
                float(d.get("embedding_trace", 0.0)),
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"drift spec is malformed: {exc}") from None


def _reference_rows(values: Any, what: str) -> np.ndarray:
    """The reference ``values`` as an (n, columns) float array; :class:`ConfigError` when there are no rows.

    Bin edges are reference quantiles, so an empty reference has nothing to fit them on (numpy's own error,
    "cannot reshape array of size 0", says nothing about what to pass instead).
    """
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0 or len(a) == 0:
        raise ConfigError(
            f"DriftSpec.fit got no reference {what} (shape {a.shape}): pass the rows of a trusted reference "
            "window (e.g. the training set), one row per input"
        )
    return a.reshape(len(a), -1)


def _fit_edges(values: np.ndarray, n_bins: int) -> tuple[float, ...]:
    """Bin edges for one reference column, used with ``side="right"`` binning (bin i is [e[i-1], e[i])).

    Edges sit at the reference quantiles, so each bin holds ~1/n_bins of the reference. Quantiles collapse
    on few-valued columns (a constant, a 5% binary flag): ``np.unique`` of them leaves e.g. ``(0.0,)`` and
    every value >= 0 — 0, 1 or 7 alike — falls in one bin, so no shift could ever be seen. A column with at
    most ``n_bins`` distinct values is therefore binned as categorical (edges halfway between the distinct
    values, plus one just outside each end so an unseen value gets its own bin); a column where some
    quantiles coincide (a point mass inside a continuous spread) gets an extra edge just above the atom so the
    atom has a bin of its own. A constant column's bin holds the values within :data:`CONSTANT_TOLERANCE`
    (relative, absolute near 0) of the constant: any other value is a shift.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ConfigError("cannot fit drift bins on a column with no finite values")
    distinct = np.unique(v)
    if len(distinct) <= n_bins:
        # a constant's own bin is just wide enough for float noise (CONSTANT_TOLERANCE): a bin of half its
        # magnitude each side put a constant 3 moving to 4 in the same bin, so the move went unseen
        gap = (
            float(np.min(np.diff(distinct)))
            if len(distinct) > 1
            else 2 * CONSTANT_TOLERANCE * max(abs(float(distinct[0])), 1.0)
        )
        mids = (distinct[:-1] + distinct[1:]) / 2
        e = np.concatenate([[distinct[0] - gap / 2], mids, [distinct[-1] + gap / 2]])
    else:
        q = np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1])
        atoms = q[1:][np.diff(q) == 0]
        e = np.unique(np.concatenate([q, np.nextafter(atoms, np.inf)]))
    return tuple(float(x) for x in np.unique(e))


@dataclass
class Summary:
    """What a device reports: counts per bin (features, predictions, projected embeddings) + embedding sum."""

    n: int = 0
    feature_counts: list[list[int]] = field(default_factory=list)
    prediction_counts: list[int] = field(default_factory=list)
    projection_counts: list[list[int]] = field(default_factory=list)
    embedding_sum: list[float] = field(default_factory=list)
    embedding_n: int = 0
    #: inputs whose feature value was missing (NaN), one count per feature; they are not in feature_counts
    #: (binning NaN put missing inputs in the top bin, a false shift to high values) and form a signal of
    #: their own. Empty (a report from before this field) means none missing.
    missing_counts: list[int] = field(default_factory=list)

    def validate(self, spec: DriftSpec) -> None:
        """Refuse a summary whose shape does not match ``spec`` (devices are untrusted)."""
        self._check_whole_numbers()

        def check(name: str, counts: list[list[int]], edges: tuple[tuple[float, ...], ...]) -> None:
            if counts and (
                len(counts) != len(edges)
                or any(len(c) != len(e) + 1 for c, e in zip(counts, edges, strict=True))
            ):
                raise InvalidUpdate(
                    f"{name} shape does not match the drift spec ({len(edges)} rows of len(edges)+1)"
                )
            if any(v < 0 for row in counts for v in row):
                raise InvalidUpdate(f"{name} holds negative counts")

        check("feature_counts", self.feature_counts, spec.feature_edges)
        if self.missing_counts and len(self.missing_counts) != len(self.feature_counts):
            raise InvalidUpdate(
                f"missing_counts has {len(self.missing_counts)} entries for {len(self.feature_counts)} "
                "feature_counts rows: one count of missing inputs per feature"
            )
        check("projection_counts", self.projection_counts, spec.projection_edges)
        if self.prediction_counts and len(self.prediction_counts) != spec.n_classes:
            raise InvalidUpdate(
                f"prediction_counts has {len(self.prediction_counts)} classes, spec has {spec.n_classes}"
            )
        if any(v < 0 for v in self.prediction_counts) or self.n < 0 or self.embedding_n < 0:
            raise InvalidUpdate("summary holds negative counts")
        if self.embedding_sum and spec.projections and len(self.embedding_sum) != len(spec.projections[0]):
            raise InvalidUpdate("embedding_sum has the wrong dimension for the drift spec")
        if not all(np.isfinite(self.embedding_sum)):
            raise InvalidUpdate("embedding_sum holds NaN or Inf")
        if self.embedding_sum and not spec.projections:
            raise InvalidUpdate("embedding_sum sent but the drift spec has no embeddings")
        if (
            self.embedding_n
            and np.abs(self.embedding_sum).max(initial=0) / self.embedding_n > MAX_EMBEDDING_MEAN
        ):
            raise InvalidUpdate(
                f"embedding_sum / embedding_n exceeds {MAX_EMBEDDING_MEAN:g} in some dimension: not an embedding "
                "mean (and sums that large overflow when windows are merged)"
            )
        self._check_totals()

    def _check_whole_numbers(self) -> None:
        """Every count is a whole number (the service's schema says so; a library caller must too): a NaN
        count compares false with every bound and would drop the device from the window without a word."""
        scalars = {"n": self.n, "embedding_n": self.embedding_n}
        rows = {
            "feature_counts": [v for r in self.feature_counts for v in r],
            "prediction_counts": list(self.prediction_counts),
            "projection_counts": [v for r in self.projection_counts for v in r],
            "missing_counts": list(self.missing_counts),
        }
        for name, values in [*((k, [v]) for k, v in scalars.items()), *rows.items()]:
            bad = [v for v in values if not _is_count(v)]
            if bad:
                raise InvalidUpdate(f"{name} must be whole numbers >= 0 (counts of inputs). Found {bad[:3]}")

    def _check_totals(self) -> None:
        """Counts must add up to the report's own sample counts (every feature row bins the same inputs, less
        those missing that feature)."""
        sums = {sum(r) + m for r, m in zip(self.feature_counts, self._missing(), strict=True)}
        if len(sums) > 1:
            raise InvalidUpdate(
                f"feature_counts rows plus missing_counts sum to different totals {sorted(sums)[:4]}: each "
                "feature bins all n inputs or counts them missing"
            )
        if sums and max(sums) > self.n:
            raise InvalidUpdate(
                f"feature_counts and missing_counts sum to {max(sums)} but the summary says n={self.n}"
            )
        if sum(self.prediction_counts) > self.n:
            raise InvalidUpdate(f"prediction_counts sum to {sum(self.prediction_counts)} > n={self.n}")
        if self.embedding_n > self.n:
            raise InvalidUpdate(f"embedding_n={self.embedding_n} > n={self.n}")
        if any(sum(r) != self.embedding_n for r in self.projection_counts):
            raise InvalidUpdate(f"every projection_counts row must sum to embedding_n={self.embedding_n}")
        if self.embedding_sum and not self.embedding_n:
            raise InvalidUpdate("embedding_sum without embedding_n (the number of embeddings summed)")

    def _missing(self) -> list[int]:
        """Missing inputs per feature (zeros for a report that has no missing_counts)."""
        return list(self.missing_counts) or [0] * len(self.feature_counts)

    def merge(self, other: Summary) -> Summary:
        """Element-wise sum of two summaries (a window is the merge of many device reports)."""

        def add(a: list, b: list) -> list:
            if not a:
                return [list(r) if isinstance(r, list) else r for r in b]
            if not b:
                return a
            return [add(x, y) if isinstance(x, list) else x + y for x, y in zip(a, b, strict=True)]

        return Summary(
            self.n + other.n,
            add(self.feature_counts, other.feature_counts),
            add(self.prediction_counts, other.prediction_counts),
            add(self.projection_counts, other.projection_counts),
            add(self.embedding_sum, other.embedding_sum),
            self.embedding_n + other.embedding_n,
            add(self.missing_counts, other.missing_counts),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WindowSummary(Summary):
    """A device's merged reports in a monitor's open window: a :class:`Summary` whose predicted-class counts are
    kept apart per model version (``version_predictions``), since predictions are compared only with the same
    version's predictions on the reference data (:meth:`DriftMonitor.set_prediction_reference`). A device never
    sends one; the monitor builds it from a report that names its version."""

    version_predictions: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WindowSummary:
        """The summary :meth:`to_dict` wrote (JSON's string keys read back as versions); TypeError or
        ValueError for anything else."""
        data = dict(d)
        by_version = data.pop("version_predictions", None) or {}
        if not isinstance(by_version, Mapping):
            raise TypeError(
                f"version_predictions must map versions to counts. Found {type(by_version).__name__}"
            )
        return cls(**data, version_predictions={int(v): list(c) for v, c in by_version.items()})

    def validate(self, spec: DriftSpec) -> None:
        """The summary's checks, and one count per class for each version, adding up to at most ``n``."""
        super().validate(spec)
        for version, counts in self.version_predictions.items():
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise InvalidUpdate(
                    f"version_predictions keys must be model versions >= 1. Found {version!r}"
                )
            if len(counts) != spec.n_classes or not all(_is_count(v) for v in counts):
                raise InvalidUpdate(
                    f"version_predictions[{version}] must be {spec.n_classes} whole counts >= 0 (one per class)"
                )
        total = sum(self.prediction_counts) + sum(sum(c) for c in self.version_predictions.values())
        if total > self.n:
            raise InvalidUpdate(f"prediction counts of all versions sum to {total} > n={self.n}")

    def merge(self, other: Summary) -> WindowSummary:
        merged = super().merge(other)
        by_version = {v: list(c) for v, c in self.version_predictions.items()}
        for v, c in getattr(other, "version_predictions", {}).items():
            by_version[v] = (
                [a + b for a, b in zip(by_version[v], c, strict=True)] if v in by_version else list(c)
            )
        return WindowSummary(**merged.__dict__, version_predictions=by_version)

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "version_predictions": {str(v): c for v, c in self.version_predictions.items()},
        }


def _is_count(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        return False
    return bool(np.isfinite(v) and v >= 0 and float(v).is_integer())


def _bin(values: np.ndarray, edges: Sequence[float]) -> list[int]:
    return np.bincount(
        np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1
    ).tolist()


def summarize(
    spec: DriftSpec,
    features: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
) -> Summary:
    """Device side: bin counts of local inputs, predicted classes and projected embeddings (no raw values)."""
    s = Summary()
    if features is not None:
        x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
        if x.shape[1] != len(spec.feature_edges):
            raise ConfigError(f"features have {x.shape[1]} columns, the spec has {len(spec.feature_edges)}")
        s.n = len(x)
        missing = np.isnan(x)  # not a value: counted apart, never binned (NaN sorts above every edge)
        s.feature_counts = [_bin(x[~missing[:, j], j], e) for j, e in enumerate(spec.feature_edges)]
        s.missing_counts = missing.sum(axis=0).tolist()
    if predictions is not None:
        raw = np.asarray(predictions).reshape(-1)
        # a cast would truncate probabilities or scores (0.7 -> class 0) into a false prediction drift
        if raw.dtype.kind not in "iub" and not (np.isfinite(raw) & (raw == np.round(raw))).all():
            raise ConfigError(
                "predictions must be class ids (whole numbers), not probabilities or scores: pass argmax(...)"
            )
        p = raw.astype(np.int64)
        if len(p) and (p.min() < 0 or p.max() >= spec.n_classes):
            raise ConfigError(f"predictions must be class ids in [0, {spec.n_classes})")
        s.prediction_counts = np.bincount(p, minlength=spec.n_classes).tolist()
        s.n = max(s.n, len(p))
    if embeddings is not None:
        emb = np.asarray(embeddings, dtype=np.float64)
        dim = len(spec.projections[0]) if spec.projections else 0
        if not dim or emb.ndim != 2 or emb.shape[1] != dim:
            raise ConfigError(
                f"embeddings must be an (n, {dim}) array for this drift spec. Found shape {emb.shape}"
                if dim
                else "the drift spec has no embeddings: fit it with DriftSpec.fit(..., embeddings=...)"
            )
        if not np.isfinite(emb).all():
            raise ConfigError(
                "embeddings hold NaN or Inf: an encoder does not produce missing values, so these inputs "
                "failed upstream; drop them (or fix the encoder) before summarizing"
            )
        z = emb @ np.asarray(spec.projections).T
        s.projection_counts = [_bin(z[:, k], e) for k, e in enumerate(spec.projection_edges)]
        s.embedding_sum = emb.sum(axis=0).tolist()
        s.embedding_n = len(emb)
        s.n = max(s.n, len(emb))
    return s


@dataclass
class DriftReport:
    """Per-signal drift figures for one live window, and the alerts they raise."""

    n_reference: int
    #: the window's effective sample size over the devices' reported ``n`` (:func:`_device_weights`, what the
    #: tests see), not the sum of what devices claim: one device claiming 1e9 inputs adds at most about a
    #: median device's worth, as it does in the statistics
    n_live: float
    rows: list[dict[str, Any]]
    alerts: list[str]
    devices: int = 1  # distinct devices in the live window

    @property
    def drifted(self) -> bool:
        return bool(self.alerts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_reference": self.n_reference,
            "n_live": self.n_live,
            "rows": self.rows,
            "alerts": self.alerts,
            "devices": self.devices,
        }


def _pool(rows: Sequence[Sequence[float]]) -> tuple[np.ndarray, float] | None:
    """Pooling of one signal's counts from several devices, each weighted by :func:`_device_weights`.

    Each device's counts become fractions and the window's distribution is their weighted mean, so a device
    sending huge counts (1e9 per bin) weighs no more than the window's median device. The returned
    pseudo-counts are those fractions times the effective sample size of that weighting, which is what the KS
    and χ² tests should see. ``None`` when no device reported this signal.
    """
    arrs = [np.asarray(r, dtype=np.float64) for r in rows]
    arrs = [a for a in arrs if a.sum() > 0]
    if not arrs:
        return None
    weights, n_eff = _device_weights([a.sum() for a in arrs])
    fractions = weights @ np.array([a / a.sum() for a in arrs])
    return fractions * n_eff, n_eff


def _pools_without_each(rows: Sequence[Sequence[float]], cap: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pool` of the window less each one device, all at once: pseudo-counts ``(devices, bins)`` and
    effective sizes ``(devices,)``, every device weighing its count capped at ``cap`` (the whole window's).
    ``rows`` are the devices' counts of one signal, each with inputs."""
    counts = np.asarray(rows, dtype=np.float64)
    n = counts.sum(axis=1)
    w = np.minimum(n, cap)
    fractions = counts / n[:, None]
    weight = w.sum() - w
    kish = np.sum(w * w / n) - w * w / n
    with np.errstate(divide="ignore", invalid="ignore"):
        sizes = np.where(weight > 0, weight**2 / kish, 0.0)
        pooled = np.maximum((w @ fractions)[None, :] - w[:, None] * fractions, 0) / weight[:, None]
    return np.nan_to_num(pooled * sizes[:, None]), np.nan_to_num(sizes)


def _psi_rows(reference: Counts, live: np.ndarray, eps: float = PSI_EPS) -> np.ndarray:
    """:func:`psi` of ``reference`` against each row of ``live`` (rows with no counts: 0)."""
    r = np.clip(np.asarray(reference, dtype=np.float64) / np.sum(reference), eps, None)
    total = live.sum(axis=1, keepdims=True)
    q = np.clip(live / np.where(total > 0, total, 1.0), eps, None)
    return np.where(total[:, 0] > 0, np.sum((q - r) * np.log(q / r), axis=1), 0.0)


def _ks_rows(reference: Counts, live: np.ndarray) -> np.ndarray:
    """:func:`ks_from_counts`'s p-value of ``reference`` against each row of ``live``."""
    from scipy.stats import kstwobign

    r = np.asarray(reference, dtype=np.float64)
    n, m = r.sum(), np.maximum(live.sum(axis=1), 1e-300)
    d = np.max(np.abs(np.cumsum(r) / n - np.cumsum(live, axis=1) / m[:, None]), axis=1)
    return np.asarray(kstwobign.sf(d * np.sqrt(n * m / (n + m))), dtype=np.float64)


def _chi2_rows(reference: Counts, live: np.ndarray) -> np.ndarray:
    """The asymptotic χ² homogeneity p-value of ``reference`` against each row of ``live`` (bins empty in both
    dropped): the screen that picks which window :func:`chi2_from_counts` tests exactly."""
    from scipy.stats import chi2

    r = np.broadcast_to(np.asarray(reference, dtype=np.float64), live.shape)
    cols = r + live
    total = cols.sum(axis=1, keepdims=True)
    rows = np.stack([r.sum(axis=1), live.sum(axis=1)], axis=1)  # (devices, 2)
    stat = np.zeros(len(live))
    for observed, k in ((r, 0), (live, 1)):
        expected = rows[:, k : k + 1] * cols / total
        with np.errstate(divide="ignore", invalid="ignore"):
            stat += np.where(expected > 0, (observed - expected) ** 2 / expected, 0.0).sum(axis=1)
    df = np.maximum((cols > 0).sum(axis=1) - 1, 1)
    return np.asarray(chi2.sf(stat, df), dtype=np.float64)


def _centroids_without_each(
    deviations: np.ndarray, ns: np.ndarray, cap: float, trace: float, n_reference: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The centroid shift, effective size and p-value (as :meth:`DriftMonitor._centroid_row` computes them) of
    the window less each one device: ``deviations`` already capped at the window's median norm, every device
    weighing its count capped at ``cap``."""
    from scipy.stats import chi2

    w = np.minimum(ns, cap)
    weight = w.sum() - w
    kish = np.sum(w * w / ns) - w * w / ns
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = ((w @ deviations)[None, :] - w[:, None] * deviations) / weight[:, None]
        sizes = np.nan_to_num(np.where(weight > 0, weight**2 / kish, 0.0))
        sq = np.nan_to_num(np.sum(diff * diff, axis=1))
        p = chi2.sf(sq / (trace * (1 / np.maximum(sizes, 1e-300) + 1 / n_reference)), 1)
    return np.sqrt(sq / trace), sizes, np.asarray(p, dtype=np.float64)


def _median_count(counts: Counts) -> float:
    """The (lower) median of the positive ``counts``: the cap :func:`_device_weights` puts on each device."""
    n = np.sort([c for c in np.asarray(counts, dtype=np.float64).tolist() if c > 0])
    return float(n[(n.size - 1) // 2]) if n.size else 0.0


def _device_weights(counts: Sequence[float], cap: float | None = None) -> tuple[np.ndarray, float]:
    """Each device's weight in a window (summing to 1) and the window's effective sample size, for the devices
    with ``n_d > 0`` (empty weights and 0 when there are none).

    A device weighs its sample count capped at that of the window's median device (the lower median):
    ``w_d ∝ min(n_d, c)``, and the effective size is Kish's ``(Σ w_d)² / Σ (w_d² / n_d)`` (the variance of
    a weighted mean of the devices' fractions): n for one device, D·n for D equal ones.

    Why capped, not equal: with equal weights one device claiming 1e9 samples weighed no more than others (it
    still does not: it is capped at the median), but one reporting a *single* sample weighed as much as any,
    and its noise set the effective size, ``D² / Σ 1/n_d``, to about D²: two devices of 300 and one of 1 made
    a window of 9 effective samples, "not enough samples", so one device could hide a drift every other
    device saw. With the cap a one-sample device adds one sample's weight. With three or more devices the
    median lies within the others' counts, so neither kind of lie moves it.
    """
    n = np.asarray([c for c in counts if c > 0], dtype=np.float64)
    if not n.size:
        return n, 0.0
    w = np.minimum(n, _median_count(n) if cap is None else cap)
    return w / w.sum(), float(w.sum() ** 2 / np.sum(w * w / n))


class DriftMonitor:
    """Compares live windows of device summaries against a reference summary.

    A window closes when it holds ``window`` reports, each device's counted up to ``ceil(window /
    min_devices)``, from at least ``min_devices`` distinct devices with inputs; each device weighs its sample
    count capped at the median device's (see :func:`_device_weights`), so one device cannot hide a drift the
    others see (by huge counts or by a single sample), and a signal is flagged only if it would be without any
    one device (:meth:`_without_each_device`), so none raises an alert alone. Reports passed without a device
    id count as distinct devices.

    Args:
        spec: the binning devices use.
        reference: the reference window's summary (``summarize(spec, reference_data...)``).
        psi_threshold: PSI above which a signal may be flagged (0.2 is the common "significant shift" rule).
        alpha: family-wise significance level of a window: a signal's KS / χ² / centroid test must also
            reject after Holm's correction over the window's tested signals, so a window without drift raises
            any alert with probability at most ``alpha`` (rows keep each signal's own ``p`` and its
            ``p_adjusted``).
        window: device reports merged into one live window before it is evaluated.
        embedding_shift_threshold: the standardised centroid shift ``||mu_live - mu_ref|| / sqrt(trace(cov_ref))``
            (the live centroid's distance from the reference one, as a fraction of the reference cloud's RMS
            radius) above which embedding drift may be flagged; the shift must also be significant at
            ``alpha``. Scale-free, and meaningful for centred embeddings (a cosine between centroids near the
            origin is noise).
        min_samples: a signal whose live window holds fewer (effective) samples is reported as "not enough
            samples" (``drifted`` false, no PSI or p-value) rather than tested: a PSI on a handful of samples
            is noise.
        min_devices: distinct devices a window needs before it is evaluated (a window keeps collecting
            reports until it has them), and a signal before it is tested (the devices that reported it).
        prediction_references: each model version's predicted-class counts on the reference data
            (:meth:`set_prediction_reference`).

    Predictions are compared with the *same model's* predictions on the reference data (black-box shift
    detection, Lipton et al. 2018, "Detecting and Correcting for Label Shift with Black Box Predictors",
    https://arxiv.org/abs/1802.03916): a report that names the model version it ran (``ingest(...,
    version=v)``) is tested against version ``v``'s prediction reference, and one whose version has none is not
    tested on predictions (its row says so). ``reference.prediction_counts`` serves the reports that name no
    version (a monitor of one fixed model). Compared with the label prior instead, the test measured how
    inaccurate the model still was: every window of a federation still learning alerted, with no drift at all.
    """

    def __init__(
        self,
        spec: DriftSpec,
        reference: Summary,
        *,
        psi_threshold: float = 0.2,
        alpha: float = 0.01,
        window: int = 20,
        embedding_shift_threshold: float = 0.1,
        min_samples: int = 30,
        min_devices: int = 1,
        prediction_references: Mapping[int, Counts] | None = None,
    ) -> None:
        if not 0 < psi_threshold < PSI_MAX:
            raise ConfigError(
                f"psi_threshold must be in (0, {PSI_MAX:.2f}): PSI cannot exceed {PSI_MAX:.2f} (all mass moving "
                f"between two bins, with the {PSI_EPS:g} floor on empty bins), so a larger threshold never "
                f"fires; 0.1-0.25 is the usual range. Found {psi_threshold}"
            )
        if not (np.isfinite(embedding_shift_threshold) and embedding_shift_threshold > 0):
            raise ConfigError(
                f"embedding_shift_threshold must be positive. Found {embedding_shift_threshold}"
            )
        if not 0 < alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1). Found {alpha}")
        if min_samples < 1:
            raise ConfigError(f"min_samples must be at least 1. Found {min_samples}")
        if window < 1:
            raise ConfigError(f"window must be at least 1. Found {window}")
        if not 1 <= min_devices <= window:
            raise ConfigError(f"min_devices must be in [1, window={window}]. Found {min_devices}")
        reference.validate(spec)
        if spec.feature_edges and not reference.feature_counts:
            raise ConfigError(
                f"the drift spec has {len(spec.feature_edges)} features but the reference summary has no "
                "feature_counts: summarize the reference data with this spec"
            )
        empty = [
            name
            for name, c in [
                *zip(spec.feature_names, reference.feature_counts, strict=False),
                *((f"projection {k}", c) for k, c in enumerate(reference.projection_counts)),
            ]
            if not sum(c)
        ]
        if empty or (reference.prediction_counts and not sum(reference.prediction_counts)):
            # such a signal was skipped in every window: monitored in name, it could never alert
            raise ConfigError(
                "the reference summary holds no inputs for "
                + ", ".join(empty or ["predicted class"])[:200]
                + ": summarize the reference data with this spec (every signal needs reference counts)"
            )
        self.spec = spec
        self.reference = reference
        self.psi_threshold = psi_threshold
        self.alpha = alpha
        self.window = window
        self.min_samples = min_samples
        self.min_devices = min_devices
        self.embedding_shift_threshold = embedding_shift_threshold
        self.prediction_references: dict[int, list[int]] = {}
        for version, counts in (prediction_references or {}).items():
            self.set_prediction_reference(version, counts)
        self._live: dict[str, Summary] = {}
        self._reports = 0
        self._anonymous = 0
        #: reports each device merged in the open window (:meth:`_window_full` caps what one device counts)
        self._device_reports: dict[str, int] = {}
        self.history: list[DriftReport] = []

    def settings(self) -> dict[str, Any]:
        """The monitor's spec, reference and parameters as JSON-ready data (:meth:`from_settings` rebuilds it):
        what a service stores so that a restart monitors as before."""
        return {
            "spec": self.spec.to_dict(),
            "reference": self.reference.to_dict(),
            "psi_threshold": self.psi_threshold,
            "alpha": self.alpha,
            "window": self.window,
            "min_samples": self.min_samples,
            "min_devices": self.min_devices,
            "embedding_shift_threshold": self.embedding_shift_threshold,
            # JSON keys are strings; from_settings reads them back as versions
            "prediction_references": {str(v): c for v, c in self.prediction_references.items()},
        }

    @classmethod
    def from_settings(cls, d: Mapping[str, Any]) -> DriftMonitor:
        """The monitor :meth:`settings` describes (empty windows); the constructor's checks apply, so stored
        settings that no longer make a valid monitor raise :class:`~deltaplane.errors.ConfigError`."""
        return cls(
            DriftSpec.from_dict(d["spec"]),
            Summary(**d["reference"]),
            **{k: d[k] for k in ("psi_threshold", "alpha", "window", "min_samples", "min_devices")},
            embedding_shift_threshold=d["embedding_shift_threshold"],
            # settings stored before prediction references were kept have none
            prediction_references={int(v): c for v, c in (d.get("prediction_references") or {}).items()},
        )

    def set_prediction_reference(self, version: int, counts: Counts) -> None:
        """Register model ``version``'s predicted-class counts on the reference data: reports naming ``version``
        are compared with them. Whoever publishes a version and holds the reference data calls this (the
        service: ``PUT /admin/models/{m}/drift-reference/predictions/{version}``). The
        :data:`MAX_PREDICTION_REFERENCES` highest versions are kept. :class:`ConfigError` unless ``version`` is a
        whole number >= 1 and ``counts`` one whole count >= 0 per class of the spec, not all zero."""
        if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
            raise ConfigError(
                f"a prediction reference's version must be a whole number >= 1. Found {version!r}"
            )
        values: list[Any] = np.asarray(counts, dtype=object).reshape(-1).tolist()
        if len(values) != self.spec.n_classes or not all(_is_count(v) for v in values):
            raise ConfigError(
                f"the prediction reference of version {version} must hold {self.spec.n_classes} whole counts >= 0 "
                f"(one per class of the drift spec). Found {values[:8]}"
            )
        if not sum(values):
            raise ConfigError(
                f"the prediction reference of version {version} holds no inputs: count the version's predicted "
                "classes on the reference data"
            )
        self.prediction_references[int(version)] = [int(v) for v in values]
        for old in sorted(self.prediction_references)[:-MAX_PREDICTION_REFERENCES]:
            del self.prediction_references[old]

    def live_window(self) -> tuple[dict[str, Summary], int, int]:
        """The open window: each device's merged summary, the reports it holds, the anonymous reports counted
        so far (a copy: :meth:`resume_window` puts it back, after a restart or a failed write)."""
        return dict(self._live), self._reports, self._anonymous

    def device_reports(self) -> dict[str, int]:
        """How many reports each device of the open window merged (a copy, for :meth:`resume_window`)."""
        return dict(self._device_reports)

    def resume_window(
        self,
        live: Mapping[str, Summary],
        reports: int,
        anonymous: int,
        device_reports: Mapping[str, int] | None = None,
    ) -> None:
        """Continue the window :meth:`live_window` returned (each summary is checked against the spec), with each
        device's report count (:meth:`device_reports`; a device whose count is not given counts one report)."""
        for summary in live.values():
            summary.validate(self.spec)
        self._live, self._reports, self._anonymous = dict(live), int(reports), int(anonymous)
        given = device_reports or {}
        self._device_reports = {d: max(1, int(given.get(d, 1))) for d in self._live}

    def ingest(
        self, summary: Summary, device: str | None = None, *, version: int | None = None
    ) -> DriftReport | None:
        """Add one report (from ``device``, whose predictions model ``version`` made: they are compared with
        that version's prediction reference); returns the window's report when the window closes, else None."""
        summary.validate(self.spec)
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
                raise InvalidUpdate(
                    f"a report's model version must be a whole number >= 1. Found {version!r}"
                )
            by_version = {int(version): list(summary.prediction_counts)} if summary.prediction_counts else {}
            fields = {**summary.__dict__, "prediction_counts": []}
            fields.pop("version_predictions", None)
            summary = WindowSummary(**fields, version_predictions=by_version)
        if device is None:
            self._anonymous += 1
            device = f"\0anonymous-{self._anonymous}"  # cannot collide with a real device id
        prev = self._live.get(device)
        if prev is None:
            self._live[device] = summary
        else:  # a versioned report's merge keeps its predictions apart, whichever side holds them
            self._live[device] = (
                summary.merge(prev) if isinstance(summary, WindowSummary) else prev.merge(summary)
            )
        self._reports += 1
        self._device_reports[device] = self._device_reports.get(device, 0) + 1
        if not self._window_full():
            return None
        report = self.compare(list(self._live.values()))
        self.history.append(report)
        self._live, self._reports, self._device_reports = {}, 0, {}
        return report

    def _window_full(self) -> bool:
        """Whether the open window holds ``window`` reports, each device's counted up to
        ``ceil(window / min_devices)``, from at least ``min_devices`` devices that sent inputs.

        Why: counted plainly, one device reporting fast (within its rate limit) filled the window alone, and
        closed it as soon as ``min_devices - 1`` others had said anything, an empty summary included: the window
        was decided on a few honest reports. Capped, a window holds at least ``min_devices`` devices' share of
        reports, and the devices counted are those whose summary holds inputs.
        """
        per_device = -(-self.window // self.min_devices)
        counted = sum(min(k, per_device) for k in self._device_reports.values())
        with_inputs = sum(1 for summary in self._live.values() if summary.n > 0)
        return counted >= self.window and with_inputs >= self.min_devices

    def compare(self, live: Summary | Sequence[Summary]) -> DriftReport:
        """Drift figures of a live window against the reference, with alerts for flagged signals.

        ``live`` is one summary or one per device, weighted as in :func:`_device_weights`. Every tested signal's row
        keeps its own p-value (``p``) and gets its Holm-adjusted one (``p_adjusted``, over the window's tested
        signals); a signal is flagged on the adjusted one, so a window without drift raises any alert with
        probability at most ``alpha`` (see :meth:`_decide`).
        """
        devices = [live] if isinstance(live, Summary) else list(live)
        rows: list[dict[str, Any]] = []
        alerts: list[str] = []
        tested: list[_Tested] = []
        versions = sorted({v for d in devices for v in getattr(d, "version_predictions", {})})
        # what a Monte-Carlo p-value must be able to reach
        min_p = self.alpha / max(1, self._n_signals() + len(versions))

        def row(
            kind: str,
            name: str,
            ref: Sequence[float],
            cur: Sequence[Sequence[float]],
            test: str,
            untested: str | None = None,
            **extra: Any,
        ) -> None:
            cur = [c for c in cur if sum(c) > 0]  # the devices that reported this signal
            pooled = _pool(cur)
            if (sum(ref) == 0 and untested is None) or pooled is None:
                return
            counts, n_eff = pooled
            base = {
                "kind": kind,
                "name": name,
                "test": test,
                **extra,
                "devices": len(cur),
                "n": n_eff,  # the effective sample size this signal's test sees
            }
            if untested is None:
                untested = self._too_few(len(cur), n_eff)
            if untested is not None:
                rows.append({**base, **_UNTESTED, "note": untested})
                return

            def verdict(counts: np.ndarray) -> tuple[float, float]:
                stat, p = (
                    ks_from_counts(ref, counts)
                    if test == "ks"
                    else chi2_from_counts(ref, counts, min_p=min_p)
                )
                return stat, p

            value = psi(ref, counts)
            stat, p = verdict(counts)
            if not np.isfinite([value, stat, p]).all():
                _failed(rows, alerts, base, f"{kind} {name}")
                return
            rows.append({**base, "psi": value, "stat": stat, "p": p, "drifted": False})
            effect, p_robust = value, p
            if value > self.psi_threshold and p < self.alpha and len(cur) > 1:
                pools, sizes = _pools_without_each(cur, _median_count([sum(c) for c in cur]))
                effect, p_robust = self._without_each_device(
                    _psi_rows(ref, pools),
                    sizes,
                    _ks_rows(ref, pools) if test == "ks" else _chi2_rows(ref, pools),
                    self.psi_threshold,
                    None if test == "ks" else lambda i: chi2_from_counts(ref, pools[i], min_p=min_p)[1],
                )
                rows[-1].update(psi_without_one=effect, p_without_one=p_robust)
            tested.append(
                _Tested(
                    rows[-1],
                    effect > self.psi_threshold,
                    f"{kind} drift on {name}: PSI {value:.3f} > {self.psi_threshold}, {test} p={p:.2g}",
                    p_robust,
                )
            )

        if self.reference.feature_counts:  # validate() made every non-empty count list match the spec
            for j, name in enumerate(self.spec.feature_names):
                cur = [d.feature_counts[j] for d in devices if d.feature_counts]
                row("feature", name, self.reference.feature_counts[j], cur, "ks")
            self._missing_rows(devices, row)
        if self.reference.prediction_counts:
            cur = [d.prediction_counts for d in devices if d.prediction_counts]
            row("prediction", "predicted class", self.reference.prediction_counts, cur, "chi2")
        for v in versions:  # each version's predictions against that version's on the reference data
            cur = [d.version_predictions.get(v, []) for d in devices if isinstance(d, WindowSummary)]
            ref = self.prediction_references.get(v)
            row(
                "prediction",
                f"predicted class (version {v})",
                ref or [],
                [c for c in cur if c],
                "chi2",
                None if ref else _no_prediction_reference(v, self.prediction_references),
                version=v,
            )
        for k, ref_counts in enumerate(self.reference.projection_counts):
            cur = [d.projection_counts[k] for d in devices if d.projection_counts]
            row("embedding", f"projection {k}", ref_counts, cur, "ks")
        if self.reference.embedding_n:
            self._centroid_row(devices, rows, alerts, tested)
        self._decide(tested, alerts)
        n_live = _device_weights([d.n for d in devices])[1]
        return DriftReport(self.reference.n, n_live, rows, alerts, devices=len(devices))

    def _missing_rows(self, devices: list[Summary], row: Callable[..., None]) -> None:
        """One "missing values" signal per feature that the reference or this window has missing inputs
        for: a χ² test of the share missing (counts [present, missing]), gated by its PSI like any signal.
        A feature never missing on either side has nothing to test and stays out of the window's family."""
        ref_missing = self.reference._missing()
        live = [(d.feature_counts, d._missing()) for d in devices if d.feature_counts]
        for j, name in enumerate(self.spec.feature_names):
            if not ref_missing[j] and not any(m[j] for _, m in live):
                continue
            ref = [sum(self.reference.feature_counts[j]), ref_missing[j]]
            row("missing values", name, ref, [[sum(c[j]), m[j]] for c, m in live], "chi2")

    def _too_few(self, devices: int, n_eff: float) -> str | None:
        """Why a signal reported by ``devices`` devices with ``n_eff`` effective samples is not tested, or None.

        The window's ``min_devices`` counts the devices that reported *this* signal: counted over the window,
        two honest devices sending metrics only (or features only) let one device be the whole of a signal's
        evidence (the embeddings, a version's predictions), and its own median, so nothing capped it.
        """
        if devices < self.min_devices:
            return f"not enough devices: {devices} < min_devices {self.min_devices}"
        if n_eff < self.min_samples:  # too few to test: say so, not a noisy verdict
            return f"not enough samples: {n_eff:.4g} < min_samples {self.min_samples}"
        return None

    def _without_each_device(
        self,
        effects: np.ndarray,
        sizes: np.ndarray,
        pvalues: np.ndarray,
        threshold: float,
        exact: Callable[[int], float] | None = None,
    ) -> tuple[float, float]:
        """The weakest evidence of a signal over the window less each one device: the smallest effect size and the
        largest p-value. ``effects``, ``sizes`` (effective sample sizes) and ``pvalues`` hold one entry per device
        left out (computed together: :func:`_pools_without_each`); ``exact``, when given, is the signal's own test
        of the window less device ``i``, run on the window whose ``pvalues`` entry (an asymptotic screen) is the
        largest. A signal is flagged only if it would be without any one device, so no device raises an alert
        alone.

        Why: a device is capped at the median device's weight, which stops it outweighing the others but not
        moving a window by its own share: one device of ten reporting every input missing moved the window's
        share of missing values by 10%, significant at any alpha on 1,000 samples, and a device reporting a value
        the reference never held (an edge bin) moved the PSI past 0.2. Without the liar, the others' window is
        the honest fleet's, so the signal's smallest effect is no larger than the honest fleet's own: an alert
        needs the evidence of the others. The largest p-value over the windows is at least the honest window's, a
        valid p-value when one device lies, so Holm's correction over these keeps its guarantee (for χ² signals
        the window tested exactly is the one the asymptotic screen finds weakest).

        A window that has too few samples without one device is the weakest possible: (0, 1). The windows less
        one device keep the whole window's caps (the median device's count, and for the centroid its
        deviation): recomputed, two devices left of three are capped at the smaller, so a liar reporting one
        sample made every window without an honest device hold two samples, and hid the drift the honest
        devices saw. All of it is a few array operations per signal: tested one window at a time, 200 devices
        drifting on 64 features took 72 s under the service's lock.
        """
        if not (sizes >= self.min_samples).all():
            return 0.0, 1.0
        smallest = float(effects.min())
        if smallest <= threshold:
            return smallest, 1.0
        weakest = int(np.argmax(pvalues))
        return smallest, exact(weakest) if exact is not None else float(pvalues[weakest])

    def _n_signals(self) -> int:
        """How many signals a window can test at most (the size of the family Holm corrects over)."""
        ref = self.reference
        return (
            2 * len(ref.feature_counts)  # each feature's values, and its share of missing values
            + bool(ref.prediction_counts)
            + len(ref.projection_counts)
            + bool(ref.embedding_n)
        )

    def _decide(self, tested: list[_Tested], alerts: list[str]) -> None:
        """Flag the window's tested signals with Holm's correction over all of them.

        Each signal's own test holds its false-alarm rate at ``alpha``, but a window tests one signal per
        feature, class histogram and projection: with 64 clean features, 3 devices x 20 samples, 16.7% of
        clean windows alerted at ``alpha`` 1%. Holm-adjusted p-values bring the chance that a clean window
        raises *any* alert back to at most ``alpha``. The effect-size gate (PSI, or the centroid shift) is not a
        test and adds no false alarms of its own: a signal must pass it *and* reject after the correction, so
        the alerts are a subset of Holm's rejections.
        """
        adjusted = holm([t.p for t in tested])
        for t, p_adj in zip(tested, adjusted, strict=True):
            t.row["p_adjusted"] = p_adj
            t.row["drifted"] = bool(t.large_effect and p_adj < self.alpha)
            if t.row["drifted"]:
                alerts.append(f"{t.alert} (Holm-adjusted p={p_adj:.2g} over {len(tested)} signals)")

    def _centroid_row(
        self, devices: list[Summary], rows: list[dict[str, Any]], alerts: list[str], tested: list[_Tested]
    ) -> None:
        """Standardised centroid shift of the embeddings, with a p-value calibrated on the reference spread.

        Under no drift the live-minus-reference centroid difference is ~ N(0, Σ (1/n_live + 1/n_ref)) (CLT),
        so ``T = ||diff||² / (trace(Σ) (1/n_live + 1/n_ref))`` is a weighted sum of χ²₁ variables with weights
        summing to 1; its tail is at most that of χ²₁ for p-values below 0.215 (Székely & Bakirov 2003,
        "Extremal probabilities for Gaussian quadratic forms"), so ``chi2.sf(T, 1)`` is a conservative
        p-value whatever the (unknown) shape of Σ. The live centroid is the devices' centroids weighted as in
        :func:`_device_weights`, each device's deviation capped by :func:`_clip_to_median_norm` (which only
        shortens deviations longer than the median's, so under no drift it rarely binds), and n_live that
        weighting's effective n.
        """
        from scipy.stats import chi2

        held = [d for d in devices if d.embedding_n]
        if not held:
            return
        means = np.array([np.asarray(d.embedding_sum) / d.embedding_n for d in held])
        ns = [float(d.embedding_n) for d in held]
        n_eff = _device_weights(ns)[1]
        base = {
            "kind": "embedding",
            "name": "centroid shift",
            "test": "centroid",
            "devices": len(held),
            "n": n_eff,
        }
        note = self._too_few(len(held), n_eff)
        if note is None and self.spec.embedding_trace <= 0:
            note = "the drift spec has no embedding_trace (reference spread): refit it with DriftSpec.fit"
        if note is not None:
            rows.append({**base, **_UNTESTED, "note": note})
            return
        ref_mean = np.asarray(self.reference.embedding_sum) / self.reference.embedding_n

        cap = _median_count(ns)
        deviations = _clip_to_median_norm(means - ref_mean)  # the window's cap, kept without any one device

        trace = self.spec.embedding_trace
        weights = _device_weights(ns, cap)[0]
        diff = weights @ deviations
        sq = float(diff @ diff)
        stat = float(np.sqrt(sq / trace))
        p = float(chi2.sf(sq / (trace * (1 / n_eff + 1 / self.reference.embedding_n)), 1))
        if not np.isfinite([stat, p]).all():
            _failed(rows, alerts, base, "embedding centroid")
            return
        rows.append({**base, "psi": None, "stat": stat, "p": p, "drifted": False})
        effect, p_robust = stat, p
        if stat > self.embedding_shift_threshold and p < self.alpha and len(held) > 1:
            shifts, sizes, pvalues = _centroids_without_each(
                deviations, np.asarray(ns), cap, trace, self.reference.embedding_n
            )
            effect, p_robust = self._without_each_device(
                shifts, sizes, pvalues, self.embedding_shift_threshold
            )
            rows[-1].update(shift_without_one=effect, p_without_one=p_robust)
        tested.append(
            _Tested(
                rows[-1],
                effect > self.embedding_shift_threshold,
                f"embedding drift: centroid shift {stat:.3f} x reference spread > "
                f"{self.embedding_shift_threshold}, p={p:.2g}",
                p_robust,
            )
        )


def _clip_to_median_norm(deviations: np.ndarray) -> np.ndarray:
    """Each device's centroid deviation from the reference, ``(devices, dim)``, its length capped at the
    window's (lower) median device's.

    Why: the centroid is a mean, so one device of ten claiming a centroid of 1e6 (the bound) in one dimension
    moved the window's 35,000 x the reference spread, an alert raised alone. Capped, a device pulls no harder
    than a median device: with no drift elsewhere it cannot alert alone, and when every device sees a shift the
    median does too and nothing changes. One device's window is its own median (nothing capped).
    """
    norms = np.linalg.norm(deviations, axis=1)
    cap = np.sort(norms)[(len(norms) - 1) // 2]
    scale = np.where(norms > cap, cap / np.where(norms > 0, norms, 1.0), 1.0)
    return deviations * scale[:, None]


def _no_prediction_reference(version: int, references: Mapping[int, Any]) -> str:
    """Why a version's predictions were not tested: no reference of that version's predictions (never compared
    with another version's, or with the labels: that measures the model's errors, not drift)."""
    held = f"held: versions {', '.join(map(str, sorted(references)))}" if references else "none held"
    return (
        f"no prediction reference for version {version} ({held}): predictions are compared only with the same "
        f"version's predictions on the reference data; register them (DriftMonitor.set_prediction_reference, "
        f"PUT /admin/models/{{model}}/drift-reference/predictions/{version})"
    )


#: the figures of a row that was not tested (too few samples, no reference spread)
_UNTESTED: dict[str, Any] = {"psi": None, "stat": None, "p": None, "p_adjusted": None, "drifted": False}


@dataclass
class _Tested:
    """A tested signal awaiting the window's multiplicity correction: its row, whether its effect size
    (PSI or centroid shift) passes the threshold without any one device, the alert text if it is flagged, and
    its p-value."""

    row: dict[str, Any]
    large_effect: bool
    alert: str
    #: the p-value the correction sees: the worst of the window's and of every window less one device
    #: (:meth:`DriftMonitor._without_each_device`) for a signal that could be flagged, else the window's own
    p: float


def _failed(rows: list[dict[str, Any]], alerts: list[str], base: dict[str, Any], what: str) -> None:
    """A non-finite statistic is an alert, never a quiet "not drifted" (NaN compares false with any threshold)."""
    msg = f"drift check failed on {what}: the statistic is not finite (check the reports' values)"
    rows.append({**base, **_UNTESTED, "drifted": True, "error": msg})
    alerts.append(msg)

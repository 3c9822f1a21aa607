"""Drift monitoring: how often a window *without* drift alerts, and whether a real shift is still caught.

``DriftMonitor`` tests one signal per feature (and the predictions) in every window. Each test alone holds its
false-alarm rate at ``alpha``, but a window with many signals then alerts far more often than ``alpha``. The
monitor applies Holm–Bonferroni over a window's signals (``p_adjusted``), so a clean window alerts with
probability at most ``alpha``. The baseline, measured on the same windows in the same run, is the per-signal
rule the monitor used before: alert when any signal's own ``p`` is below ``alpha`` and its PSI above the
threshold. Setups: independent Gaussian features (64 and 20 of them, 3 devices of 20 samples a window) and the
digits pixels as ``deltaplane run --transport http`` monitors them (64 features, 10 classes, 3 devices of 40
samples from a held-out half), and devices holding unequal numbers of samples (devices weigh their counts capped
at the median device's). Power: one feature of 64 shifted by one standard deviation, and the digits devices'
images rotated, noised or holding only three labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from sklearn.datasets import load_digits

from deltaplane.monitor import DriftMonitor, DriftSpec, summarize

ALPHA = 0.01
TRIALS = 300


def _per_signal(rep, psi_threshold: float) -> bool:
    """The uncorrected rule: any signal whose own p is below alpha with its PSI above the threshold."""
    return any(
        r.get("p") is not None and r["p"] < ALPHA and r.get("psi") is not None and r["psi"] > psi_threshold
        for r in rep.rows
    )


def gaussian(nfeat: int, sizes: tuple[int, ...], *, shift: float = 0.0, seed: int = 0) -> tuple[int, int]:
    """(windows alerting under Holm, under the per-signal rule) of TRIALS windows of devices holding ``sizes``
    samples each; ``shift`` moves feature 0 on every device."""
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((5000, nfeat))
    spec = DriftSpec.fit(ref, n_bins=10)
    d = len(sizes)
    mon = DriftMonitor(spec, summarize(spec, ref), window=d, min_devices=d, alpha=ALPHA)
    holm = plain = 0
    for _ in range(TRIALS):
        live = []
        for n in sizes:
            x = rng.standard_normal((n, nfeat))
            x[:, 0] += shift
            live.append(summarize(spec, x))
        rep = mon.compare(live)
        holm += bool(rep.drifted)
        plain += _per_signal(rep, mon.psi_threshold)
    return holm, plain


def _shifted(kind: str, x: np.ndarray, y: np.ndarray, pool: np.ndarray, rng: np.random.Generator):
    """One device's 40 inputs under ``kind``: rotated 20°, Gaussian pixel noise (sd 3 of 16), or labels 0–2 only."""
    from scipy.ndimage import rotate

    if kind == "label":
        s = rng.choice(pool[y[pool] < 3], 40)
        return x[s], y[s]
    s = rng.choice(pool, 40, replace=False)
    xs = x[s]
    if kind == "rotate":
        xs = np.stack([rotate(im.reshape(8, 8), 20, reshape=False, order=1).ravel() for im in xs])
    elif kind == "noise":
        xs = np.clip(xs + rng.normal(0, 3, xs.shape), 0, 16)
    return xs, y[s]


def digits(seed: int = 0, *, kind: str = "none", shifted: int = 0) -> tuple[int, int]:
    """The same counts on the digits pixels and labels (reference: a random half; live: 3 devices of 40 from the
    other half, the first ``shifted`` of them shifted by ``kind``, see :func:`_shifted`)."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    a, b = idx[:900], idx[900:]
    spec = DriftSpec.fit(x[a], n_classes=10, n_bins=8)
    mon = DriftMonitor(spec, summarize(spec, x[a], y[a]), window=3, min_devices=3, alpha=ALPHA)
    holm = plain = 0
    for _ in range(TRIALS):
        live = [summarize(spec, *_shifted(kind if i < shifted else "none", x, y, b, rng)) for i in range(3)]
        rep = mon.compare(live)
        holm += bool(rep.drifted)
        plain += _per_signal(rep, mon.psi_threshold)
    return holm, plain


def main() -> None:
    from _record import record, table

    rows = []
    for label, (holm, plain) in (
        ("64 Gaussian features, 3 devices × 20 samples", gaussian(64, (20, 20, 20))),
        ("20 Gaussian features, 3 devices × 20 samples", gaussian(20, (20, 20, 20))),
        ("64 Gaussian features, devices of 5, 40 and 200 samples", gaussian(64, (5, 40, 200))),
        ("64 Gaussian features, devices of 1, 300 and 300 samples", gaussian(64, (1, 300, 300))),
        ("digits: 64 pixels + 10 classes, 3 devices × 40 samples", digits()),
    ):
        rows.append(
            [
                label,
                f"{plain}/{TRIALS} ({plain / TRIALS:.1%})",
                f"{holm}/{TRIALS} ({holm / TRIALS:.1%})",
                "PASS" if holm / TRIALS <= ALPHA else "MISS",
            ]
        )
        print(rows[-1], flush=True)
    power = []
    for label, (caught, _) in (
        (
            "64 Gaussian features, 3 devices × 20, feature 0 shifted by 1 sd",
            gaussian(64, (20,) * 3, shift=1.0, seed=1),
        ),
        (
            "64 Gaussian features, devices of 1, 300, 300, feature 0 shifted by 1 sd",
            gaussian(64, (1, 300, 300), shift=1.0, seed=1),
        ),
        ("digits, all 3 devices' images rotated 20°", digits(1, kind="rotate", shifted=3)),
        ("digits, 1 of 3 devices' images rotated 20°", digits(1, kind="rotate", shifted=1)),
        ("digits, all 3 devices' pixels + noise (sd 3 of 16)", digits(1, kind="noise", shifted=3)),
        ("digits, all 3 devices hold only labels 0–2", digits(1, kind="label", shifted=3)),
        ("digits, 1 of 3 devices holds only labels 0–2", digits(1, kind="label", shifted=1)),
    ):
        power.append([label, f"{caught}/{TRIALS} ({caught / TRIALS:.0%})"])
        print(power[-1], flush=True)
    body = (
        f"{TRIALS} windows without drift per setup, alpha {ALPHA:.0%}; the same windows judged by both rules:\n\n"
        + table(
            ["setup", "per-signal rule (before)", "Holm over the window (now)", f"≤ {ALPHA:.0%} of windows"],
            rows,
        )
        + f"\n\nPower: windows with a real shift flagged by Holm at alpha {ALPHA:.0%} ({TRIALS} each):\n\n"
        + table(["shift", "windows alerting"], power)
    )
    print(body)
    record("drift_alarms", "Drift monitoring: false alarms per window and power", body)


if __name__ == "__main__":
    main()

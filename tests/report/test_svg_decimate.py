"""Min–max decimation of chart lines (deltaplane.report.svg.decimate), against brute force."""

from __future__ import annotations

import random

import pytest

from deltaplane.report.svg import MAX_POINTS, Series, decimate, decimate_band, line_chart


def test_decimate_keeps_the_ends_the_extremes_and_the_order():
    rng = random.Random(0)
    pts = [(float(i), rng.gauss(0, 1)) for i in range(100_000)]
    out = decimate(pts)
    assert len(out) <= MAX_POINTS and out[0] == pts[0] and out[-1] == pts[-1]
    assert [x for x, _ in out] == sorted(x for x, _ in out)  # in order, no duplicates
    assert len({x for x, _ in out}) == len(out)
    assert min(out, key=lambda p: p[1]) == min(pts, key=lambda p: p[1])
    assert max(out, key=lambda p: p[1]) == max(pts, key=lambda p: p[1])
    # each block's min and max: every point kept is one of the input's
    assert set(out) <= set(pts)


def test_decimate_leaves_short_lines_alone_and_keeps_gaps():
    pts = [(float(i), float(i)) for i in range(MAX_POINTS)]
    assert decimate(pts) == pts
    gappy = [(float(i), None if i % 1000 == 500 else float(i % 7)) for i in range(50_000)]
    out = decimate(gappy)
    assert len(out) <= MAX_POINTS and sum(y is None for _, y in out) == 50  # one gap per gap, none invented


def test_decimate_band_covers_every_value():
    rng = random.Random(1)
    band = [(float(i), -abs(rng.gauss(0, 1)), abs(rng.gauss(0, 1))) for i in range(30_000)]
    out = decimate_band(band)
    assert len(out) <= MAX_POINTS and out[0][0] == 0.0 and out[-1][0] == 29_999.0
    assert min(lo for _, lo, _ in out) == min(lo for _, lo, _ in band)
    assert max(hi for _, _, hi in out) == max(hi for _, _, hi in band)


def test_a_chart_of_100000_points_is_small():
    pts = [(float(i), float(i % 97)) for i in range(100_000)]
    svg = line_chart([Series("s", pts)], title="t", x_label="x", y_label="y")
    assert len(svg) < 30_000 and svg.count(",") <= MAX_POINTS + 10


def test_decimate_refuses_a_tiny_limit():
    with pytest.raises(ValueError, match="at least 8"):
        decimate([(0.0, 0.0)] * 10, limit=4)

"""Inline SVG line charts for the dashboard: server-rendered, no JavaScript, no network.

Why not matplotlib (which the HTML report uses): a dashboard page renders on every request, and matplotlib costs
~0.8 s to import and tens of milliseconds per figure; a polyline is a few lines of text. The charts keep the
data honest: the y-axis spans the data (padded), never a range chosen to exaggerate noise, and each series is
also listed in a table on the page, so every plotted number can be read exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["MAX_POINTS", "PALETTE", "Series", "decimate", "decimate_band", "line_chart"]

#: The most points one chart line (or band) is drawn with: a 760-pixel-wide plot cannot show more, and a
#: 100,000-round run drawn point by point made a run page of several MB.
MAX_POINTS = 1000

#: Colour-blind-safe palette (Okabe & Ito), one colour per series in order.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (x, y); ``None`` y values leave a gap. ``band`` draws a shaded (low, high)."""

    label: str
    points: Sequence[tuple[float, float | None]]
    band: Sequence[tuple[float, float, float]] = ()
    dashed: bool = False


def decimate(
    points: Sequence[tuple[float, float | None]], limit: int = MAX_POINTS
) -> list[tuple[float, float | None]]:
    """At most ``limit`` of ``points``, chosen by min–max decimation: the first and the last point, and from each
    of equal blocks of the others its lowest and highest point, in their original order.

    Every spike and dip of the full line is still drawn (a plain stride would skip them), so the chart's extremes
    and its y-axis are those of the data. A gap (a ``None`` y) inside a block is kept as one gap there, so a
    broken line stays broken. Fewer than ``limit`` points are returned unchanged.
    """
    if limit < 8:
        raise ValueError(f"decimate needs a limit of at least 8 points (got {limit})")
    n = len(points)
    if n <= limit:
        return list(points)
    gaps = any(y is None for _, y in points)
    per_block = 3 if gaps else 2  # min, max (and one gap marker)
    blocks = (limit - 2) // per_block
    inner = range(1, n - 1)
    keep: list[int] = [0]
    for b in range(blocks):
        lo_i, hi_i = inner.start + b * len(inner) // blocks, inner.start + (b + 1) * len(inner) // blocks
        chosen: set[int] = set()
        ys = [(points[i][1], i) for i in range(lo_i, hi_i) if points[i][1] is not None]
        if ys:
            chosen.add(min(ys)[1])
            chosen.add(max(ys)[1])
        gap = next((i for i in range(lo_i, hi_i) if points[i][1] is None), None)
        if gap is not None:
            chosen.add(gap)
        keep.extend(sorted(chosen))
    keep.append(n - 1)
    return [points[i] for i in keep]


def decimate_band(
    band: Sequence[tuple[float, float, float]], limit: int = MAX_POINTS
) -> list[tuple[float, float, float]]:
    """At most ``limit`` points of a shaded (x, low, high) band: per block, its lowest low and highest high at the
    block's first and last x, so the drawn band still covers every value of the full one."""
    n = len(band)
    if n <= limit:
        return list(band)
    blocks = limit // 2
    out: list[tuple[float, float, float]] = []
    for b in range(blocks):
        block = band[b * n // blocks : (b + 1) * n // blocks]
        low, high = min(t[1] for t in block), max(t[2] for t in block)
        out += [(block[0][0], low, high), (block[-1][0], low, high)]
    return out


def _ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    raw = (hi - lo) / n
    if not (math.isfinite(raw) and raw > 0):  # hi <= lo, or a span below the float resolution: just the ends
        return [lo] if hi <= lo else [lo, hi]
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:  # rounds and windows are whole numbers: no tick at 1.5
        step = max(1.0, float(math.ceil(step)))
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.2g}"
    return f"{v:.4g}"


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 760,
    height: int = 260,
    y_min: float | None = None,
    y_max: float | None = None,
    chart_id: str = "",
    x_log: bool = False,
) -> str:
    """An ``<svg>`` line chart of ``series`` with axes, ticks and a legend placed *below* the plot area.

    The legend never covers data (the report's old legend hid the baseline curve). ``y_min``/``y_max`` pin an
    axis end when a metric has a natural bound (e.g. 0 for bytes); otherwise the axis spans the data.
    """
    if x_log:  # plot log10(x); ticks are labelled with the original values (bytes span orders of magnitude)
        series = [
            Series(s.label, [(math.log10(x), y) for x, y in s.points if x > 0], (), s.dashed) for s in series
        ]
    series = [Series(s.label, decimate(s.points), decimate_band(s.band), s.dashed) for s in series]
    xs = [x for s in series for x, y in s.points if y is not None]
    ys = [y for s in series for _, y in s.points if y is not None]
    ys += [v for s in series for _, lo, hi in s.band for v in (lo, hi)]
    left, right, top, bottom = 64, 16, 28, 40
    # legend items flow left to right below the plot, wrapping by their (estimated) text width
    legend_pos, lx, ly = [], 0.0, 0
    for s in series:
        w = 28 + 6.6 * len(s.label)
        if lx and left + lx + w > width - right:
            lx, ly = 0.0, ly + 1
        legend_pos.append((left + lx, height + 4 + 18 * ly))
        lx += w + 14
    legend_h = 18 * (ly + 1)
    total_h = height + legend_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" id="{escape(chart_id)}" '
        f'viewBox="0 0 {width} {total_h}" width="100%" preserveAspectRatio="xMinYMin meet">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    if not xs:
        out.append(f'<text x="{left}" y="{height // 2}" font-size="12">no data</text></svg>')
        return "".join(out)
    x0, x1 = min(xs), max(xs)
    lo = min(ys) if y_min is None else y_min
    hi = max(ys) if y_max is None else y_max
    if hi == lo:
        pad = abs(hi) * 0.05 or 1.0
        lo, hi = (lo, hi + pad) if y_min is not None else (lo - pad, hi + pad)
    elif y_min is None or y_max is None:
        pad = (hi - lo) * 0.05
        lo = lo - pad if y_min is None else lo
        hi = hi + pad if y_max is None else hi
    if x1 == x0:
        x1 = x0 + 1
    if not all(map(math.isfinite, (hi - lo, x1 - x0))):
        # finite values so far apart (±1e308) that their span overflows: no axis can place them, say so
        out.append(
            f'<text x="{left}" y="{height // 2}" font-size="12">values out of plottable range</text></svg>'
        )
        return "".join(out)
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (hi - y) / (hi - lo) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _ticks(lo, hi):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{escape(_fmt(t))}</text>'
        )
    x_ticks = (
        [float(k) for k in range(math.ceil(x0), math.floor(x1) + 1)] or [x0]
        if x_log
        else _ticks(x0, x1, 8, integer=all(float(x).is_integer() for x in xs))
    )
    for t in x_ticks:
        x = sx(t)
        label = _fmt(10**t) if x_log else _fmt(t)
        out.append(
            f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="11" text-anchor="middle">{escape(label)}</text>'
        )
    out.append(
        f'<text x="{left + pw / 2:.0f}" y="{top + ph + 32}" font-size="12" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    out.append(
        f'<text x="14" y="{top + ph / 2:.0f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2:.0f})">{escape(y_label)}</text>'
    )
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if s.band:
            upper = " ".join(f"{sx(x):.1f},{sy(h):.1f}" for x, _, h in s.band)
            lower = " ".join(f"{sx(x):.1f},{sy(lo_):.1f}" for x, lo_, _ in reversed(s.band))
            out.append(
                f'<polygon points="{upper} {lower}" fill="{colour}" fill-opacity="0.15" stroke="none"/>'
            )
        segment: list[str] = []
        segments: list[list[str]] = []
        for px, py in s.points:
            if py is None:
                if segment:
                    segments.append(segment)
                segment = []
            else:
                segment.append(f"{sx(px):.1f},{sy(py):.1f}")
        if segment:
            segments.append(segment)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        for seg in segments:
            out.append(
                f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
            )
            if len(seg) <= 40:  # few points: mark each one (a single window would otherwise be invisible)
                for pt in seg:
                    cx, cy = pt.split(",")
                    out.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
        lx, ly = legend_pos[i]
        out.append(f'<rect x="{lx:.0f}" y="{ly}" width="14" height="4" fill="{colour}"/>')
        out.append(f'<text x="{lx + 20:.0f}" y="{ly + 6}" font-size="12">{escape(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)

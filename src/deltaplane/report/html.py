"""Render a report document as one self-contained HTML page (inline CSS, plots embedded as base64 PNGs).

One file that opens anywhere, can be attached to an issue or archived with the run, and needs no server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from html import escape
from typing import Any

from deltaplane.report.plots import accuracy_vs_bytes_png, accuracy_vs_round_png

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; }
"""

_COLUMNS = (
    ("run", "name", "{}"),
    ("codec", "codec", "{}"),
    ("rounds", "rounds", "{}"),
    ("final acc.", "final_accuracy", "{:.4f}"),
    ("client acc. mean", "client_accuracy_mean", "{:.4f}"),
    ("client acc. min", "client_accuracy_min", "{:.4f}"),
    ("uplink bytes", "uplink_bytes", "{:,}"),
    ("downlink bytes", "downlink_bytes", "{:,}"),
    ("ratio vs baseline", "ratio_vs_baseline", "{:.1f}×"),
    ("ratio vs raw fp32", "ratio_vs_raw", "{:.1f}×"),
    ("wall time (s)", "wall_time_s", "{:.1f}"),
)


def _cell(fmt: str, value: Any) -> str:
    if value is None:
        return "<td>—</td>"
    cls = ' class="num"' if isinstance(value, int | float) else ""
    return f"<td{cls}>{escape(fmt.format(value))}</td>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _drift_section(runs: Any) -> str:
    """Per-round drift figures of runs that carry them (``deltaplane run --transport http``), else nothing."""
    parts = []
    for run in runs:
        rows = run.get("drift") or []
        if not rows:
            continue
        body = "".join(
            f"<tr><td>{r['round']}</td><td>{r['prediction_psi']:.3f}</td><td>{r['max_feature_psi']:.3f}</td>"
            f"<td>{escape('; '.join(r['alerts'])) or 'none'}</td></tr>"
            for r in rows
        )
        t = run.get("transport") or {}
        parts.append(
            f"<h3>{escape(run['name'])}</h3><p>Computed by the service from device-reported histograms "
            f"(pixel intensities per feature, predicted-class counts) against the training set and label prior; "
            f"{t.get('requests', '?')} HTTP requests, {t.get('uploads_accepted', '?')} uploads accepted, "
            f"registry integrity {'ok' if t.get('registry_ok') else 'NOT ok'}.</p>"
            "<table><thead><tr><th>round</th><th>prediction PSI</th><th>max feature PSI</th><th>alerts</th>"
            f"</tr></thead><tbody>{body}</tbody></table>"
        )
    return "<h2>Drift</h2>" + "".join(parts) if parts else ""


def render_html(report: Mapping[str, Any]) -> str:
    """The HTML page for a document made by :func:`~deltaplane.report.summary.build_report`."""
    runs = report["runs"]
    head = "".join(f"<th>{escape(h)}</th>" for h, _, _ in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(_cell(fmt, row[key]) for _, key, fmt in _COLUMNS) + "</tr>"
        for row in report["summary"]
    )
    configs = "".join(
        f"<details><summary>config of {escape(run['name'])}</summary>"
        f"<pre>{escape(json.dumps(run['config'], indent=2, sort_keys=True))}</pre></details>"
        for run in runs
    )
    baseline = report.get("baseline")
    note = f"Ratios are against the run <b>{escape(baseline)}</b>." if baseline else "No baseline run."
    title = escape(str(report.get("title", "deltaplane report")))
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head><body>'
        f"<h1>{title}</h1>"
        f"<h2>Summary</h2><p>{note} Bytes are real payload lengths, headers included.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        "<h2>Accuracy</h2>"
        + _img(accuracy_vs_round_png(runs), "global test accuracy per round")
        + _img(accuracy_vs_bytes_png(runs), "global test accuracy against cumulative uplink bytes")
        + _drift_section(runs)
        + f"<h2>Configurations</h2>{configs}</body></html>\n"
    )

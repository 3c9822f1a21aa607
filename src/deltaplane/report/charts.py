"""The charts of a run report, as inline SVG: one chart per question, every run of the report on it.

Shared by ``report.html`` and the dashboard, so both show the same figures: accuracy per round (global and the
spread across clients), accuracy against cumulative uplink bytes (log scale: codecs differ by orders of
magnitude), bytes per round both ways, ε spent, share of updates clipped, refused updates, backdoor success and
time per round. A chart whose metric no run recorded is left out rather than drawn empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from deltaplane.report.svg import Series, line_chart

__all__ = ["report_charts"]


def _ok(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _rounds(run: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    # a report.json edited by hand (the dashboard reads any) may lack "rounds": no points, not a KeyError
    rounds = run.get("rounds")
    return rounds if isinstance(rounds, list) else []


def _series(rounds: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float | None]]:
    return [(r["round"], r.get(key) if _ok(r.get(key)) else None) for r in rounds]


def _label(run: Mapping[str, Any]) -> str:
    codec = run.get("config", {}).get("codec", "?")
    return run["name"] if run["name"] == codec else f"{run['name']} ({codec})"


def _any(runs: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(_ok(r.get(key)) for run in runs for r in _rounds(run))


def report_charts(runs: Sequence[Mapping[str, Any]], *, prefix: str = "") -> list[str]:
    """The report's SVG charts for ``runs`` (``RunResult.to_dict()`` plus ``name``), in reading order."""
    charts = [
        line_chart(
            [Series(_label(run), _series(_rounds(run), "test_accuracy")) for run in runs],
            title="global test accuracy per round",
            x_label="round",
            y_label="accuracy",
            chart_id=f"{prefix}chart-accuracy",
        ),
        line_chart(
            [
                Series(
                    f"{run['name']}: client median (band p10–p90)",
                    _series(_rounds(run), "client_accuracy_median"),
                    band=[
                        (r["round"], r["client_accuracy_p10"], r["client_accuracy_p90"])
                        for r in _rounds(run)
                        if _ok(r.get("client_accuracy_p10")) and _ok(r.get("client_accuracy_p90"))
                    ],
                )
                for run in runs
            ]
            + [
                Series(
                    f"{run['name']}: worst client", _series(_rounds(run), "client_accuracy_min"), dashed=True
                )
                for run in runs
            ],
            title="accuracy across clients (held-out data of each device)",
            x_label="round",
            y_label="accuracy",
            chart_id=f"{prefix}chart-clients",
        ),
        line_chart(
            [
                Series(
                    _label(run),
                    [
                        (r["cumulative_uplink_bytes"], r["test_accuracy"])
                        for r in _rounds(run)
                        if _ok(r.get("test_accuracy")) and _ok(r.get("cumulative_uplink_bytes"))
                    ],
                )
                for run in runs
            ],
            title="accuracy against cumulative uplink bytes (log scale)",
            x_label="cumulative uplink bytes",
            y_label="accuracy",
            x_log=True,
            chart_id=f"{prefix}chart-accuracy-bytes",
        ),
        line_chart(
            [Series(f"{run['name']} uplink", _series(_rounds(run), "uplink_bytes")) for run in runs]
            + [
                Series(f"{run['name']} downlink", _series(_rounds(run), "downlink_bytes"), dashed=True)
                for run in runs
            ],
            title="bytes per round",
            x_label="round",
            y_label="bytes",
            y_min=0,
            chart_id=f"{prefix}chart-bytes",
        ),
    ]
    optional = (
        ("epsilon", "ε spent (at the run's δ)", "ε", None),
        ("clipped_fraction", "share of updates clipped", "share", 1.0),
        ("rejected", "updates refused by validation or the defence", "updates", None),
        ("backdoor_success", "backdoor success (simulated attack)", "share", 1.0),
    )
    for key, title, unit, top in optional:
        if _any(runs, key) and (key != "rejected" or any(r.get(key) for run in runs for r in _rounds(run))):
            charts.append(
                line_chart(
                    [Series(_label(run), _series(_rounds(run), key)) for run in runs],
                    title=title,
                    x_label="round",
                    y_label=unit,
                    y_min=0,
                    y_max=top,
                    chart_id=f"{prefix}chart-{key}",
                )
            )
    charts.append(
        line_chart(
            [Series(_label(run), _series(_rounds(run), "seconds")) for run in runs],
            title="time per round",
            x_label="round",
            y_label="seconds",
            y_min=0,
            chart_id=f"{prefix}chart-seconds",
        )
    )
    return charts

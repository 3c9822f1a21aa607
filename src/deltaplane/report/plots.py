"""Matplotlib figures for a report, rendered to PNG bytes.

matplotlib is imported inside the functions (``import deltaplane`` must stay light), and figures are drawn
on an Agg canvas directly rather than through ``pyplot``, so no global backend or figure registry is touched
in the caller's process.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["accuracy_vs_bytes_png", "accuracy_vs_round_png", "personalization_png"]

_SIZE = (6.4, 4.0)
_DPI = 110


def _render(draw: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    buf = io.BytesIO()
    # No "Software" tag: the same data gives the same PNG bytes whatever matplotlib version drew it.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _label(run: Mapping[str, Any]) -> str:
    codec = run["config"].get("codec", "?")
    return run["name"] if run["name"] == codec else f"{run['name']} ({codec})"


def accuracy_vs_round_png(runs: Sequence[Mapping[str, Any]]) -> bytes:
    """Global test accuracy after each round, one line per run."""

    def draw(ax: Any) -> None:
        for run in runs:
            xs = [r["round"] for r in run["rounds"]]
            ax.plot(xs, [r["test_accuracy"] for r in run["rounds"]], label=_label(run))
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy")
        ax.set_title("Accuracy per round")

    return _render(draw)


def accuracy_vs_bytes_png(runs: Sequence[Mapping[str, Any]]) -> bytes:
    """Global test accuracy against cumulative uplink bytes (log scale): what each byte bought."""

    def draw(ax: Any) -> None:
        for run in runs:
            pts = [(r["cumulative_uplink_bytes"], r["test_accuracy"]) for r in run["rounds"]]
            pts = [(x, y) for x, y in pts if x > 0]  # a log axis cannot show zero bytes
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=_label(run))
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes (log scale)")
        ax.set_ylabel("global test accuracy")
        ax.set_title("Accuracy per uplink byte")

    return _render(draw)


def personalization_png(clients: Sequence[Mapping[str, Any]]) -> bytes:
    """Each device's accuracy on its own label mix: the global model against its personalized model."""

    def draw(ax: Any) -> None:
        xs = [c["global_accuracy"] for c in clients]
        ys = [c["personal_accuracy"] for c in clients]
        lo = min([*xs, *ys]) - 0.02
        ax.plot([lo, 1.0], [lo, 1.0], color="grey", linestyle="--", linewidth=1, label="no change")
        ax.scatter(xs, ys, label="device", zorder=3)
        ax.set_xlabel("global model accuracy on the device's label mix")
        ax.set_ylabel("personalized model accuracy")
        ax.set_title("Personalization per device")

    return _render(draw)

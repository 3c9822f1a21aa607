"""Matplotlib figures for a report, rendered to PNG bytes (the per-device personalization scatter; the
per-round charts are inline SVG, see :mod:`deltaplane.report.charts`).

matplotlib is imported inside the functions (``import deltaplane`` must stay light), and figures are drawn
on an Agg canvas directly rather than through ``pyplot``, so no global backend or figure registry is touched
in the caller's process.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["personalization_png"]

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

"""Write ``report.json`` and ``report.html`` for a set of runs into a folder, atomically."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaplane.errors import ConfigError
from deltaplane.report.html import render_html
from deltaplane.report.summary import REPORT_FORMAT, build_report
from deltaplane.textfile import REPORT_LIMIT, atomic_write_bytes, read_bounded_text

__all__ = ["ReportFiles", "json_safe", "load_report", "write_report"]


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` put its files, and the document it wrote."""

    json_path: Path
    html_path: Path
    report: dict[str, Any]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/Inf float replaced by None, through mappings, lists and tuples: NaN and Inf are
    not JSON, and ``json.dumps`` would write the non-standard tokens ``NaN``/``Infinity`` that strict readers
    refuse (a NaN metric, e.g. the accuracy of a round that sampled nobody, is written as null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_report(
    runs: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    baseline: str | None = None,
    title: str = "deltaplane run",
    followup: Mapping[str, Any] | None = None,
) -> ReportFiles:
    """Write ``report.json`` (all data) and ``report.html`` (plots + summary) for ``runs`` into ``out_dir``.

    Each run is a mapping like ``{"name": "topk", **RunResult.to_dict()}``; ``followup`` adds the
    personalization, merge and deploy sections (plain data, see :func:`~deltaplane.report.summary.build_report`).
    Each file is replaced atomically, so a reader never sees half a file, and both are rendered before either
    is written, so an error (a value a chart cannot draw) leaves the folder as it was.
    """
    report = json_safe(build_report(runs, baseline=baseline, title=title, followup=followup))
    # Both documents are made before either is written: a run that cannot be rendered leaves the folder as it
    # was, never a new report.json beside no (or an older run's) report.html. report.json goes last, as the
    # dashboard lists folders by it.
    doc = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
    page = render_html(report).encode()
    out = Path(out_dir)
    json_path, html_path = out / "report.json", out / "report.html"
    atomic_write_bytes(html_path, page)
    atomic_write_bytes(json_path, doc)
    return ReportFiles(json_path, html_path, report)


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``report.json``; :class:`ConfigError` if it is unreadable or of another format version."""
    try:
        report = json.loads(read_bounded_text(path, limit=REPORT_LIMIT, what="report"))
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read report {path}: {exc}") from None
    except RecursionError:  # json recurses per level: a few hundred KB of '[' (the dashboard reads any file)
        raise ConfigError(f"cannot read report {path}: it is nested too deeply to be a report") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ConfigError(f"{path} is not a deltaplane report of format {REPORT_FORMAT}")
    return report

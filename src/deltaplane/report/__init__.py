"""Run reports: ``report.json`` with every metric, ``report.html`` with plots and a summary table."""

from deltaplane.report.html import render_html
from deltaplane.report.summary import REPORT_FORMAT, SummaryRow, build_report, summarize
from deltaplane.report.writer import ReportFiles, load_report, write_report

__all__ = [
    "REPORT_FORMAT",
    "ReportFiles",
    "SummaryRow",
    "build_report",
    "load_report",
    "render_html",
    "summarize",
    "write_report",
]

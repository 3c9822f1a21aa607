"""Drift monitoring from device-reported summaries, and model cards. See ``docs/ops.md``."""

from deltaplane.monitor.cards import ModelCard
from deltaplane.monitor.drift import (
    DriftMonitor,
    DriftReport,
    DriftSpec,
    Summary,
    chi2_from_counts,
    holm,
    ks_from_counts,
    psi,
    summarize,
)

__all__ = [
    "DriftMonitor",
    "DriftReport",
    "DriftSpec",
    "ModelCard",
    "Summary",
    "chi2_from_counts",
    "holm",
    "ks_from_counts",
    "psi",
    "summarize",
]

"""The report document: runs as plain JSON data, and the summary rows that compare them with a baseline.

The report layer sits below the simulator, so it knows runs only as mappings (``RunResult.to_dict()`` plus a
``name``), never as simulator objects. That keeps ``report.json`` the single source: the HTML page and the
CLI's table are both rendered from it, and a saved report can be re-rendered without re-running anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from deltaplane.errors import ConfigError

__all__ = [
    "FOLLOWUP_KEYS",
    "REPORT_FORMAT",
    "SummaryRow",
    "build_report",
    "check_runs",
    "sent_codec",
    "summarize",
]

#: Version of the report.json layout; bumped when a field changes meaning.
REPORT_FORMAT = 1

#: Sections a ``followup`` mapping must have (personalized devices, merged model, deployed artifact).
FOLLOWUP_KEYS = ("personalization", "merge", "deploy")
_RUN_KEYS = ("name", "config", "raw_update_bytes", "wall_time_s", "final", "rounds")
_ROUND_KEYS = ("round", "clients", "test_accuracy", "cumulative_uplink_bytes")


@dataclass(frozen=True)
class SummaryRow:
    """One run's headline figures. Ratios are ``None`` where they cannot be computed."""

    name: str
    codec: str
    rounds: int
    final_accuracy: float
    client_accuracy_mean: float
    client_accuracy_min: float
    uplink_bytes: int
    downlink_bytes: int
    #: the baseline's uplink bytes divided by this run's (what compression saved on the wire)
    ratio_vs_baseline: float | None
    #: raw float32 update bytes that were sent, divided by this run's uplink bytes (headers included)
    ratio_vs_raw: float | None
    wall_time_s: float
    #: ε spent by the end (None without DP); updates refused over the run; final backdoor success (attacks)
    epsilon: float | None = None
    rejected: int = 0
    backdoor_success: float | None = None
    #: accuracy points below the baseline run (positive: worse), None without a baseline
    accuracy_drop_points: float | None = None
    #: why the run ended early (e.g. "stopped: privacy budget exhausted at round 7 …"), else None
    stopped: str | None = None
    #: estimated energy one mean participating device spent per round (training + radio), µJ per link
    #: (``{"wifi": …, "lte": …}``), None where the run carries no ``device_cost``
    device_round_uj: dict[str, float] | None = None
    #: the neighbouring relation ``epsilon`` holds for ("add/remove", "zero-out" under distributed DP,
    #: "replace-one" under local DP); None without DP or in a report.json written before it was recorded
    dp_adjacency: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_runs(runs: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`ConfigError` unless every run has the fields a report needs and names are unique."""
    if not runs:
        raise ConfigError("a report needs at least one run")
    names = [r.get("name") for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"run names must be unique. Found {names}")
    for run in runs:
        missing = [k for k in _RUN_KEYS if k not in run]
        if missing:
            raise ConfigError(f"run {run.get('name')!r} lacks the field(s) {missing}")
        if not run["rounds"]:
            raise ConfigError(f"run {run['name']!r} has no rounds")
        for rnd in run["rounds"]:
            missing = [k for k in _ROUND_KEYS if k not in rnd]
            if missing:
                raise ConfigError(f"run {run['name']!r}: a round lacks the field(s) {missing}")


def sent_codec(config: Mapping[str, Any]) -> str:
    """What the uplink really carried: the codec, or with SecAgg the masked ring values made from its output."""
    codec = str(config.get("codec", "?"))
    if config.get("secagg"):
        return f"SecAgg masked {config.get('secagg_bits', '?')}-bit ring values (of {codec})"
    return codec


def _scored(value: Any) -> float:
    """A client accuracy of the final round, NaN where it was not scored: absent, or null in a report.json (a
    round that ``client_eval_every`` left unscored, or a Poisson round that sampled nobody, is written as null)."""
    return float("nan") if value is None else float(value)


def summarize(runs: Sequence[Mapping[str, Any]], baseline: str | None = None) -> list[SummaryRow]:
    """One :class:`SummaryRow` per run, in order; ratios against the run named ``baseline`` if given."""
    check_runs(runs)
    by_name = {r["name"]: r for r in runs}
    if baseline is not None and baseline not in by_name:
        raise ConfigError(f"baseline {baseline!r} is not one of the runs {list(by_name)}")
    base_up = by_name[baseline]["final"]["cumulative_uplink_bytes"] if baseline is not None else None
    base_acc = float(by_name[baseline]["final"]["test_accuracy"]) if baseline is not None else None
    rows = []
    for run in runs:
        final = run["final"]
        up = int(final["cumulative_uplink_bytes"])
        raw_sent = int(run["raw_update_bytes"]) * sum(int(r["clients"]) for r in run["rounds"])
        rows.append(
            SummaryRow(
                name=run["name"],
                codec=sent_codec(run["config"]),
                rounds=len(run["rounds"]),
                final_accuracy=float(final["test_accuracy"]),
                client_accuracy_mean=_scored(final.get("client_accuracy_mean")),
                client_accuracy_min=_scored(final.get("client_accuracy_min")),
                uplink_bytes=up,
                downlink_bytes=int(final.get("cumulative_downlink_bytes", 0)),
                ratio_vs_baseline=base_up / up if base_up is not None and up > 0 else None,
                ratio_vs_raw=raw_sent / up if up > 0 else None,
                wall_time_s=float(run["wall_time_s"]),
                epsilon=final.get("epsilon"),
                dp_adjacency=final.get("dp_adjacency"),
                rejected=sum(int(r.get("rejected") or 0) for r in run["rounds"]),
                backdoor_success=final.get("backdoor_success"),
                accuracy_drop_points=(
                    100 * (base_acc - float(final["test_accuracy"])) if base_acc is not None else None
                ),
                stopped=run.get("stopped"),
                device_round_uj=(
                    dict(run["device_cost"]["mean"]["total_uj"]) if run.get("device_cost") else None
                ),
            )
        )
    return rows


def build_report(
    runs: Sequence[Mapping[str, Any]],
    *,
    baseline: str | None = None,
    title: str = "deltaplane run",
    followup: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``report.json`` document: format version, title, baseline name, summary rows and full runs.

    ``followup`` (optional) is what came after the federation, as plain data: ``{"personalization": ...,
    "merge": ..., "deploy": ...}`` (see ``deltaplane.apps.digits.followup.run_followup``); stored under ``"followup"``.
    """
    rows = summarize(runs, baseline)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "title": title,
        "baseline": baseline,
        "summary": [r.to_dict() for r in rows],
        "runs": [dict(r) for r in runs],
    }
    if followup is not None:
        missing = [k for k in FOLLOWUP_KEYS if k not in followup]
        if missing:
            raise ConfigError(f"followup lacks the section(s) {missing}")
        report["followup"] = dict(followup)
    return report

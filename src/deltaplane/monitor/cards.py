"""Model cards (Mitchell et al. 2019, https://arxiv.org/abs/1810.03993) built from what the system knows.

A card gathers a version's lineage, governance (data sources, contributing and excluded cohorts), evaluation
metrics and latest drift report into one JSON document that the registry attaches to the version, and renders
it as Markdown for humans. Plain dicts in, so the monitor layer does not depend on the registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelCard"]


@dataclass
class ModelCard:
    """A model card: what the model is, what it was trained on, how well it does and where it drifts."""

    model: str
    version: int
    intended_use: str = ""
    lineage: Mapping[str, Any] = field(default_factory=dict)
    governance: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    drift: Mapping[str, Any] | None = None
    limitations: Sequence[str] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "intended_use": self.intended_use,
            "lineage": dict(self.lineage),
            "governance": dict(self.governance),
            "metrics": dict(self.metrics),
            "drift": dict(self.drift) if self.drift else None,
            "limitations": list(self.limitations),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        return cls(
            d["model"],
            int(d["version"]),
            d.get("intended_use", ""),
            d.get("lineage", {}),
            d.get("governance", {}),
            d.get("metrics", {}),
            d.get("drift"),
            tuple(d.get("limitations", ())),
        )

    def to_markdown(self) -> str:
        """The card as Markdown (sections: use, lineage, data & consent, metrics, drift, limitations).

        Every value is printed on one line (newlines collapsed): a lineage value or cohort name must not be
        able to open a section of its own, e.g. a forged "## Metrics" with better numbers.
        """
        g = self.governance
        out = [f"# Model card: {_line(self.model)}@{self.version}", ""]
        if self.intended_use:
            out += ["## Intended use", _line(self.intended_use), ""]
        out += ["## Lineage"] + [f"- {_line(k)}: {_line(v)}" for k, v in self.lineage.items()] + [""]
        out += [
            "## Data and consent",
            f"- data sources: {_joined(g.get('data_sources')) or 'not recorded'}",
            f"- contributing cohorts: {_joined(g.get('cohorts')) or 'not recorded'}",
            f"- excluded cohorts: {_joined(g.get('excluded_cohorts')) or 'none'}",
            "",
            "## Metrics",
        ]
        if self.metrics:  # a header row and a delimiter row make it a table (GFM), not one run-on paragraph
            out += ["| metric | value |", "| --- | ---: |"]
            out += [f"| {_cell(k)} | {_cell(_number(v))} |" for k, v in self.metrics.items()]
        else:
            out.append("not evaluated")
        out.append("")
        if self.drift:
            alerts = [f"- {_line(a)}" for a in self.drift.get("alerts", [])]
            out += ["## Drift (latest window)", *(alerts or ["- no alerts"]), ""]
        if self.limitations:
            out += ["## Limitations"] + [f"- {_line(x)}" for x in self.limitations] + [""]
        return "\n".join(out)


def _line(value: Any) -> str:
    """``value`` as one line of text: newlines and runs of spaces become one space."""
    return " ".join(str(value).split())


def _joined(values: Any) -> str:
    return ", ".join(_line(v) for v in values or ())


def _cell(value: Any) -> str:
    """One table cell: one line, with ``|`` escaped so it cannot split the cell."""
    return _line(value).replace("|", "\\|")


def _number(value: Any) -> str:
    """A metric to 4 decimals; anything else (a missing value, a label) as written rather than a crash."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.4f}"
    return str(value)

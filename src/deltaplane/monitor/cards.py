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
        """The card as Markdown (sections: use, lineage, data & consent, metrics, drift, limitations)."""
        g = self.governance
        out = [f"# Model card: {self.model}@{self.version}", ""]
        if self.intended_use:
            out += ["## Intended use", self.intended_use, ""]
        out += ["## Lineage"] + [f"- {k}: {v}" for k, v in self.lineage.items()] + [""]
        out += [
            "## Data and consent",
            f"- data sources: {', '.join(g.get('data_sources', [])) or 'not recorded'}",
            f"- contributing cohorts: {', '.join(g.get('cohorts', [])) or 'not recorded'}",
            f"- excluded cohorts: {', '.join(g.get('excluded_cohorts', [])) or 'none'}",
            "",
            "## Metrics",
        ]
        out += [f"| {k} | {v:.4f} |" for k, v in self.metrics.items()] or ["not evaluated"]
        out.append("")
        if self.drift:
            out += ["## Drift (latest window)"] + [f"- {a}" for a in self.drift.get("alerts", [])] or [
                "- no alerts"
            ]
            out.append("")
        if self.limitations:
            out += ["## Limitations"] + [f"- {x}" for x in self.limitations] + [""]
        return "\n".join(out)

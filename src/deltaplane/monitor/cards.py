"""Model cards (Mitchell et al. 2019, https://arxiv.org/abs/1810.03993) built from what the system knows.

A card gathers a version's lineage, governance (data sources, contributing and excluded cohorts), evaluation
metrics with how they were measured (evaluator, data, gate) and latest drift report into one JSON document that the registry attaches to the version, and renders
it as Markdown for humans. Plain dicts in, so the monitor layer does not depend on the registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NOT_MEASURED", "ModelCard"]

#: the drift entry of a card with no drift report: said outright rather than left blank (a blank reads as
#: "no drift"); a drift mapping without ``alerts`` is read the same way
NOT_MEASURED: dict[str, Any] = {"status": "not measured"}


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
    #: how ``metrics`` were produced: evaluator, data, and for a promotion the gate (tolerances, the version
    #: compared against, the tag it moved)
    evaluation: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "intended_use": self.intended_use,
            "lineage": dict(self.lineage),
            "governance": dict(self.governance),
            "metrics": dict(self.metrics),
            "drift": dict(self.drift) if self.drift else dict(NOT_MEASURED),
            "limitations": list(self.limitations),
            "evaluation": dict(self.evaluation),
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
            d.get("evaluation", {}),
        )

    def to_markdown(self) -> str:
        """The card as Markdown (sections: use, lineage, data & consent, metrics and how they were measured,
        drift — "not measured" when the card has no drift report —, limitations).

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
        if self.evaluation:
            out += (
                ["## Evaluation"] + [f"- {_line(k)}: {_line(v)}" for k, v in self.evaluation.items()] + [""]
            )
        out += ["## Drift (latest window)", *self._drift_lines(), ""]
        if self.limitations:
            out += ["## Limitations"] + [f"- {_line(x)}" for x in self.limitations] + [""]
        return "\n".join(out)

    def _drift_lines(self) -> list[str]:
        """The drift section's lines: a measured window (it has ``alerts``) lists them or says "no alerts";
        anything else says "not measured", never an empty section that reads as a clean bill."""
        if self.drift and "alerts" in self.drift:
            return [f"- {_line(a)}" for a in self.drift["alerts"]] or ["- no alerts"]
        note = (self.drift or {}).get("note")
        return ["- not measured" + (f": {_line(note)}" if note else "")]


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

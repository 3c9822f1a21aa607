"""Quality gates: the numbers a compressed model must meet before ``deploy`` ships it.

A deploy that halves a model's quality and exits 0 is worse than no deploy: the operator reads "wrote
model.dpla" and ships it. Every pipeline therefore summarises what it measured in ``manifest["quality"]``:

- ``cosine_min``: the worst cosine similarity of an output (sentence embedding) to fp32's;
- ``accuracy_drop_points``: clean accuracy lost in points (for unlabeled token models: 100 × (1 − top-1 agreement
  with fp32), i.e. the accuracy drop when fp32's predictions are the labels);
- ``ood_excess_drop_points``: per corruption, the drop *beyond* the clean drop (a gain on clean data counts as
  0, so an OOD split is only blamed for what it loses on its own);
- ``adversarial_drop_points``: per attack and ε, adversarial accuracy lost vs fp32 under the same attack.

:class:`Gates` holds one threshold per quantity (``None`` switches a gate off); :meth:`Gates.check` returns one
:class:`GateResult` per gate that applies. A gate whose quantity was not measured does not apply (an encoder has
no OOD splits). The pipelines raise :class:`~deltaplane.errors.QualityGateFailed` before publishing anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from deltaplane.errors import ConfigError

__all__ = ["GateResult", "Gates", "ood_excess_drops"]


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome: the threshold, the measured value, and by how much it passed (≥ 0) or failed (< 0)."""

    gate: str  # "min-cosine", "max-accuracy-drop", "max-ood-drop", "max-adv-drop"
    what: str  # the measured quantity, e.g. "accuracy drop on rotation (beyond clean)"
    threshold: float
    measured: float
    margin: float  # positive = room left, negative = missed by this much
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``max-ood-drop: shift drop beyond clean 5.01 pts > 3 pts (over by 2.01 pts)``."""
        unit = "" if self.gate == "min-cosine" else " pts"
        cmp = {(True, True): "≥", (True, False): "<", (False, True): "≤", (False, False): ">"}[
            (self.gate == "min-cosine", self.passed)
        ]
        word = "margin" if self.passed else ("short by" if self.gate == "min-cosine" else "over by")
        return (
            f"{self.gate}: {self.what} {self.measured:.4g}{unit} {cmp} {self.threshold:g}{unit} "
            f"({word} {abs(self.margin):.4g}{unit})"
        )


def ood_excess_drops(drops_points: Mapping[str, float]) -> dict[str, float]:
    """Per corruption, its accuracy drop beyond the clean drop (a clean *gain* counts as no drop).

    ``{"clean": -0.3, "shift": 5.0, "rotation": -4.7}`` → ``{"shift": 5.0, "rotation": -4.7}``: only a split that
    loses accuracy on its own, beyond what clean loses, gets a positive value.
    """
    clean = max(float(drops_points.get("clean", 0.0)), 0.0)
    return {k: float(v) - clean for k, v in drops_points.items() if k != "clean"}


@dataclass(frozen=True)
class Gates:
    """Thresholds a compressed model must meet; ``None`` turns a gate off.

    Args:
        min_cosine: lowest allowed cosine similarity of any output (embedding) to fp32's.
        max_accuracy_drop: clean accuracy points the compressed model may lose (a 359-image test set moves in
            steps of 0.28 points).
        max_ood_drop: points any corruption may lose beyond the clean drop.
        max_adv_drop: points adversarial accuracy (any attack, any ε) may lose vs fp32 under the same attack.
    """

    min_cosine: float | None = 0.98
    max_accuracy_drop: float | None = 1.0
    max_ood_drop: float | None = 5.0
    max_adv_drop: float | None = 10.0

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must lie in [-1, 1]. Found {self.min_cosine}")
        for name in ("max_accuracy_drop", "max_ood_drop", "max_adv_drop"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 100.0:
                raise ConfigError(f"--{name.replace('_', '-')} is in points, 0 to 100. Found {v}")

    @classmethod
    def off(cls) -> Gates:
        """No gate at all (what ``--no-gates`` gives)."""
        return cls(None, None, None, None)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def check(self, quality: Mapping[str, Any]) -> list[GateResult]:
        """Every applicable gate's result on a manifest's ``quality`` summary (see the module docstring)."""
        out: list[GateResult] = []
        cos = quality.get("cosine_min")
        if self.min_cosine is not None and cos is not None:
            m = float(cos) - self.min_cosine
            out.append(GateResult("min-cosine", "min cosine to fp32", self.min_cosine, float(cos), m, m >= 0))
        drop = quality.get("accuracy_drop_points")
        if self.max_accuracy_drop is not None and drop is not None:
            m = self.max_accuracy_drop - float(drop)
            what = quality.get("accuracy_label", "clean accuracy drop")
            out.append(GateResult("max-accuracy-drop", what, self.max_accuracy_drop, float(drop), m, m >= 0))
        if self.max_ood_drop is not None:
            for split, d in (quality.get("ood_excess_drop_points") or {}).items():
                m = self.max_ood_drop - float(d)
                out.append(
                    GateResult(
                        "max-ood-drop",
                        f"{split} drop beyond clean",
                        self.max_ood_drop,
                        float(d),
                        m,
                        m >= 0,
                    )
                )
        if self.max_adv_drop is not None:
            for key, d in (quality.get("adversarial_drop_points") or {}).items():
                m = self.max_adv_drop - float(d)
                out.append(
                    GateResult(
                        "max-adv-drop",
                        f"{key} accuracy drop",
                        self.max_adv_drop,
                        float(d),
                        m,
                        m >= 0,
                    )
                )
        return out

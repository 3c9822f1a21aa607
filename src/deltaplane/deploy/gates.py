"""Quality gates: the numbers a compressed model must meet before ``deploy`` ships it.

A deploy that halves a model's quality and exits 0 is worse than no deploy: the operator reads "wrote
model.dpla" and ships it. Every pipeline therefore summarises what it measured in ``manifest["quality"]``:

- ``cosine_min``: the worst cosine similarity of an output (sentence embedding, logits) to fp32's;
- ``r2_min``: for outputs with one value per input, the worst column's R² against fp32 over the batch;
- ``accuracy_drop_points``: clean accuracy lost in points (for unlabeled token models: 100 × (1 − top-1 agreement
  with fp32), i.e. the accuracy drop when fp32's predictions are the labels);
- ``ood_excess_drop_points``: per corruption, the drop *beyond* the clean drop (a gain on clean data counts as
  0, so an OOD split is only blamed for what it loses on its own);
- ``adversarial_drop_points``: per attack and ε, adversarial accuracy lost vs fp32 under the same attack;
- ``disagreement_points``: 100 × the share of evaluation inputs whose top-1 class differs between the shipped
  model and the fp32 model it was exported from (``disagreement_with``: the source, or the fine-tuned model when
  the pipeline trained after pruning); labelled classifiers: a shipped model that computes something else is
  refused even when its accuracy went *up*;
- ``accuracy`` / ``accuracy_fp32``: clean accuracy of the shipped model and of fp32 (fractions), and ``chance``:
  the accuracy of guessing without looking at the input — the better of uniform guessing (1 / classes) and
  always answering the test set's most common label — with ``num_classes``.

:class:`Gates` holds one threshold per quantity (``None`` switches a gate off); :meth:`Gates.check` returns one
:class:`GateResult` per gate that applies. A gate whose quantity was not measured does not apply (an encoder has
no OOD splits). The pipelines raise :class:`~deltaplane.errors.QualityGateFailed` before publishing anything.

Before any gate, two sanity checks that no option turns off (:func:`refuse_non_finite_tensors`,
:func:`refuse_non_finite_outputs`): a model with a NaN/Inf weight, or one that outputs NaN/Inf on the evaluation
set, is refused with a typed error naming the tensor or counting the inputs — a comparison of such a model with
itself (NaN vs NaN, argmax 0 vs argmax 0) would otherwise "pass".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from deltaplane.errors import ConfigError, InvalidUpdate

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "NOT_MEASURED_WHY",
    "GateResult",
    "Gates",
    "batch_r2",
    "chance_accuracy",
    "classifier_quality",
    "ood_excess_drops",
    "refuse_non_finite_outputs",
    "refuse_non_finite_tensors",
]

#: Gates that bound a quantity from below (the rest bound a drop from above).
_LOWER_BOUNDS = ("min-cosine", "min-r2", "min-accuracy", "min-above-chance")

#: The robustness gates apply to every model, whatever its inputs, but are measured only with what they need
#: (corrupted variants of the inputs, an FGSM/PGD budget and the model's gradients): one that is on and was not
#: measured is reported as not evaluated, with why (the pipeline's reason, else this one), never as passed.
NOT_MEASURED_WHY = {
    "max-ood-drop": "No OOD evaluation: no corrupted variants of the evaluation inputs were given.",
    "max-adv-drop": (
        "No adversarial evaluation: no FGSM/PGD budget was given (adversarial_eps empty, or --attack-eps 0)."
    ),
}


def refuse_non_finite_tensors(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`~deltaplane.errors.InvalidUpdate` naming the first floating-point tensor of ``what`` (a
    model, a checkpoint, an ONNX file) that holds NaN or Inf.

    Such a model computes NaN or garbage, and every comparison with fp32 compares it with itself; quantizers
    then fail with messages about scales that do not say why.
    """
    from deltaplane.delta import first_non_finite

    bad = first_non_finite(tensors)
    if bad is not None:
        t = tensors[bad].detach().float()
        n_nan, n_inf = int(t.isnan().sum()), int(t.isinf().sum())
        raise InvalidUpdate(
            f"{what}: tensor '{bad}' holds {n_nan} NaN and {n_inf} Inf values (of {t.numel()}); refusing to "
            "deploy a model with non-finite weights — fix or retrain the source model"
        )


def refuse_non_finite_outputs(outputs: np.ndarray, what: str, error: type[Exception] = InvalidUpdate) -> None:
    """Raise ``error`` if ``outputs`` (one row per evaluation input) hold NaN or Inf, counting the inputs hit.

    The fp32 model outputting NaN/Inf is a broken source (:class:`~deltaplane.errors.InvalidUpdate`); the
    shipped artifact doing so while fp32 does not is a broken export or quantization (the caller passes
    :class:`~deltaplane.errors.ExportError`).
    """
    out = np.asarray(outputs)
    if not np.issubdtype(out.dtype, np.floating) or bool(np.isfinite(out).all()):
        return
    rows = out.reshape(len(out), -1) if out.ndim else out.reshape(1, 1)
    hit = int((~np.isfinite(rows)).any(axis=1).sum())
    raise error(
        f"{what} outputs NaN or Inf on {hit} of {len(rows)} evaluation inputs; refusing to ship a model that "
        "computes non-finite values"
    )


def batch_r2(out: np.ndarray, ref: np.ndarray) -> float:
    """The worst column's coefficient of determination of ``out`` as a prediction of ``ref`` (rows = inputs).

    1 is exact; 0 is no better than always answering fp32's mean; offsets and scale errors count. A column
    that is constant in fp32 is judged against its own magnitude instead (so a shift still counts).
    """
    out, ref = (
        np.asarray(out, np.float64).reshape(len(out), -1),
        np.asarray(ref, np.float64).reshape(len(ref), -1),
    )
    sse = ((out - ref) ** 2).sum(0)
    sst = ((ref - ref.mean(0)) ** 2).sum(0)
    sst = np.where(sst > 0, sst, np.maximum((ref**2).sum(0), 1e-30))
    return float((1.0 - sse / sst).min())


def chance_accuracy(labels: np.ndarray, num_classes: int) -> float:
    """The accuracy of guessing without looking at the input: the better of uniform guessing (1 / classes) and
    always answering the most common label of ``labels``."""
    labels = np.asarray(labels).reshape(-1)
    majority = (
        float(np.bincount(labels.astype(np.int64) - labels.min()).max() / len(labels)) if len(labels) else 0.0
    )
    return max(1.0 / max(num_classes, 1), majority)


def classifier_quality(
    ref_logits: np.ndarray, out_logits: np.ndarray, labels: np.ndarray | None
) -> dict[str, Any]:
    """The gate-readable agreement and accuracy figures of a classifier's shipped logits against fp32's.

    ``disagreement_points`` always; with labels also ``accuracy`` (shipped), ``accuracy_fp32``, ``chance`` and
    ``num_classes`` (for the ``min-accuracy`` and ``min-above-chance`` gates).
    """
    ref_top, out_top = ref_logits.argmax(1), out_logits.argmax(1)
    q: dict[str, Any] = {"disagreement_points": 100.0 * float((ref_top != out_top).mean())}
    if labels is not None:
        k = int(ref_logits.shape[1])
        q |= {
            "accuracy": float((out_top == labels).mean()),
            "accuracy_fp32": float((ref_top == labels).mean()),
            "chance": chance_accuracy(labels, k),
            "num_classes": k,
        }
    return q


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome: the threshold, the measured value, and by how much it passed (≥ 0) or failed (< 0)."""

    gate: str  # "min-cosine", "max-accuracy-drop", "max-ood-drop", "max-adv-drop"
    what: str  # the measured quantity, e.g. "accuracy drop on rotation (beyond clean)"
    threshold: float
    measured: float
    margin: float  # positive = room left, negative = missed by this much
    passed: bool
    unit: str = " pts"  # how measured/threshold read: "" (cosine), " pts" (drops), "%" (accuracies)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``max-ood-drop: shift drop beyond clean 5.01 pts > 3 pts (over by 2.01 pts)``."""
        unit, lower = self.unit, self.gate in _LOWER_BOUNDS
        cmp = {(True, True): "≥", (True, False): "<", (False, True): "≤", (False, False): ">"}[
            (lower, self.passed)
        ]
        word = "margin" if self.passed else ("short by" if lower else "over by")
        return (
            f"{self.gate}: {self.what} {self.measured:.4g}{unit} {cmp} {self.threshold:.4g}{unit} "
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
        max_disagreement: points of evaluation inputs (labelled classifiers) on which the shipped model's top-1
            class may differ from fp32's — whatever happens to accuracy: a model that scores *better* than its
            source computes something else.
        min_accuracy: lowest clean accuracy the shipped model may have, a fraction (0.9 = 90%); off by default.
        min_above_chance: how far above chance fp32's clean accuracy must be, as a fraction of the way from
            chance to 100% (0.1 on 10 balanced classes: at least 19%). Chance is the better of uniform guessing
            and always answering the most common test label (:func:`chance_accuracy`). An untrained or
            collapsed source model has nothing worth shipping, however faithfully it was compressed. A test set
            with a single label (chance 100%) fails this gate whatever the threshold: a model that always answers
            that label would score 100% on it, so no accuracy measured there means anything.
        min_r2: lowest coefficient of determination R² = 1 − Σ(shipped − fp32)² / Σ(fp32 − mean fp32)² over the
            evaluation batch, for outputs with one value per input (a regressor, a score), where a per-input
            cosine is only the sign of a product. Offsets, scale errors and noise all lower it.
    """

    min_cosine: float | None = 0.98
    max_accuracy_drop: float | None = 1.0
    max_ood_drop: float | None = 5.0
    max_adv_drop: float | None = 10.0
    max_disagreement: float | None = 5.0
    min_accuracy: float | None = None
    min_above_chance: float | None = 0.1
    min_r2: float | None = 0.95

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"--min-cosine must lie in [-1, 1]. Found {self.min_cosine}")
        for name in ("max_accuracy_drop", "max_ood_drop", "max_adv_drop", "max_disagreement"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 100.0:
                raise ConfigError(f"--{name.replace('_', '-')} is in points, 0 to 100. Found {v}")
        for name in ("min_accuracy", "min_above_chance", "min_r2"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} is a fraction, 0 to 1 (0.9 = 90%). Found {v}")

    @classmethod
    def off(cls) -> Gates:
        """No gate at all (what ``--no-gates`` gives)."""
        return cls(None, None, None, None, None, None, None, None)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def check(self, quality: Mapping[str, Any]) -> list[GateResult]:
        """Every applicable gate's result on a manifest's ``quality`` summary (see the module docstring)."""
        out: list[GateResult] = []
        cos = quality.get("cosine_min")
        if self.min_cosine is not None and cos is not None:
            m = float(cos) - self.min_cosine
            out.append(
                GateResult("min-cosine", "min cosine to fp32", self.min_cosine, float(cos), m, m >= 0, "")
            )
        drop = quality.get("accuracy_drop_points")
        if self.max_accuracy_drop is not None and drop is not None:
            m = self.max_accuracy_drop - float(drop)
            what = quality.get("accuracy_label", "clean accuracy drop")
            out.append(GateResult("max-accuracy-drop", what, self.max_accuracy_drop, float(drop), m, m >= 0))
        r2 = quality.get("r2_min")
        if self.min_r2 is not None and r2 is not None:
            m = float(r2) - self.min_r2
            what = "R² of the outputs to fp32's over the batch"
            out.append(GateResult("min-r2", what, self.min_r2, float(r2), m, m >= 0, ""))
        dis = quality.get("disagreement_points")
        if self.max_disagreement is not None and dis is not None:
            m = self.max_disagreement - float(dis)
            what = f"top-1 disagreement with the {quality.get('disagreement_with', 'fp32 model')}"
            out.append(GateResult("max-disagreement", what, self.max_disagreement, float(dis), m, m >= 0))
        out += self._accuracy_floors(quality)
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

    def not_evaluated(
        self, quality: Mapping[str, Any], why: Mapping[str, str] | None = None
    ) -> list[dict[str, str]]:
        """``{"gate", "why"}`` for every robustness gate that is on but whose quantity ``quality`` lacks.

        ``why``: the pipeline's reason per gate name (e.g. an ONNX graph gives no gradients for FGSM/PGD);
        :data:`NOT_MEASURED_WHY` otherwise. The fidelity gates (cosine, R², accuracy) are chosen by what the
        output is and are not listed: an encoder has no accuracy to gate.
        """
        measured = {
            "max-ood-drop": (self.max_ood_drop, "ood_excess_drop_points"),
            "max-adv-drop": (self.max_adv_drop, "adversarial_drop_points"),
        }
        why = why or {}
        return [
            {"gate": gate, "why": why.get(gate) or NOT_MEASURED_WHY[gate]}
            for gate, (threshold, key) in measured.items()
            if threshold is not None and not quality.get(key)
        ]

    def _accuracy_floors(self, quality: Mapping[str, Any]) -> list[GateResult]:
        """``min-accuracy`` on the shipped model and ``min-above-chance`` on fp32, when accuracy was measured."""
        out = []
        acc = quality.get("accuracy")
        if self.min_accuracy is not None and acc is not None:
            t, v = 100.0 * self.min_accuracy, 100.0 * float(acc)
            out.append(GateResult("min-accuracy", "clean accuracy", t, v, v - t, v >= t, "%"))
        fp32, chance = quality.get("accuracy_fp32"), quality.get("chance")
        if self.min_above_chance is not None and fp32 is not None and chance is not None:
            c = 100.0 * float(chance)
            t, v = c + self.min_above_chance * (100.0 - c), 100.0 * float(fp32)
            k = quality.get("num_classes")
            what = f"fp32 clean accuracy (chance {c:.4g}%" + (f", {k} classes)" if k else ")")
            passed = v >= t
            if c >= 100.0:  # one label: a constant model scores 100% too, and every accuracy gate is blind
                passed = False
                what += (
                    " — every test label is the same, so no accuracy can tell this model from one that always "
                    "answers it; evaluate on a test set with at least two classes"
                )
            out.append(GateResult("min-above-chance", what, t, v, v - t, passed, "%"))
        return out

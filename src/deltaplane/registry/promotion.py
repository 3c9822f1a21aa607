"""Eval-gated promotion and one-command rollback of tagged model versions.

A promotion evaluates the candidate *and* the version currently holding the tag with the same evaluator in the
same run (never against remembered numbers from another harness), and refuses when any gated metric — clean
accuracy, out-of-distribution accuracy — drops by more than its tolerance, when a gated metric of the candidate
is missing or not finite (the gate fails closed: ``NaN > tolerance`` is False), or when the candidate was
trained on a cohort that has since withdrawn consent. Silent regressions (an over-pruned or backdoored model that
still looks fine on one metric) are what the gate is for. The gate reads the tag and the withdrawals verified
against the registry's signed state log (:mod:`deltaplane.registry.eventlog`): a tag moved or a withdrawal
deleted in the database behind the registry's back is an :class:`~deltaplane.errors.IntegrityError`, not a pass.

Rollback walks the tag's history as a stack: promotions push, rollbacks pop, so two rollbacks in a row go two
versions back (also when they run at once: each is one transaction). Versions are immutable content-addressed blobs, so the restored weights are byte-identical.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, SupportsFloat, cast

from deltaplane.errors import ConfigError, Conflict, DeltaplaneError, NotFound, PromotionRefused
from deltaplane.monitor.cards import NOT_MEASURED, ModelCard
from deltaplane.registry.store import PRODUCTION, Artifact, Registry, _check_name, is_gated_tag

if TYPE_CHECKING:
    import torch

__all__ = ["Evaluator", "PromotionResult", "Tolerance", "production_stack", "promote", "rollback"]

Evaluator = Callable[[dict[str, "torch.Tensor"]], Mapping[str, float]]
"""Takes a state dict, returns metrics such as ``{"accuracy": 0.97, "ood_accuracy": 0.91}`` (fractions)."""


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed drop per metric, in absolute metric units (0.01 = one accuracy point).

    Args:
        limits: metric name -> allowed drop; every named metric must be returned by the evaluator.
    """

    limits: Mapping[str, float] = field(default_factory=lambda: {"accuracy": 0.01, "ood_accuracy": 0.02})

    def __post_init__(self) -> None:
        if not self.limits:
            raise ConfigError("tolerance needs at least one gated metric")
        for k, v in self.limits.items():
            if not isinstance(v, int | float) or v < 0:
                raise ConfigError(f"tolerance for {k!r} must be a non-negative number. Found {v!r}")


@dataclass
class PromotionResult:
    """What a promotion decided and why (``regressions`` is empty when it was promoted).

    ``previous`` is what the tag itself held (None: nothing); ``compared_with`` the version the candidate was
    gated against and the tag holding it. They differ for a cohort's first own ``production.<cohort>``: the tag
    held nothing, and the candidate was gated against ``production``'s holder, which that cohort's devices run.
    """

    promoted: bool
    candidate: str
    tag: str
    previous: str | None
    candidate_metrics: dict[str, float]
    baseline_metrics: dict[str, float] | None
    regressions: list[str]
    compared_with: str | None = None  # "m@1 (production)"

    def summary(self) -> str:
        model = self.candidate.partition("@")[0]
        where = f"{model}:{self.tag}"
        lines = [
            f"{self.candidate} promoted to {where} (it held {self.previous or 'nothing'})"
            if self.promoted
            else f"{self.candidate} REFUSED for {where} (it stays at {self.previous or 'nothing'})"
        ]
        if self.compared_with and not self.compared_with.startswith(f"{self.previous} "):
            lines.append(f"  gated against {self.compared_with}, which that tag's devices were served")
        for k, v in self.candidate_metrics.items():
            base = self.baseline_metrics.get(k) if self.baseline_metrics else None
            lines.append(
                f"  {k}: {v:.4f}"
                + (f" (baseline {base:.4f}, change {v - base:+.4f})" if base is not None else "")
            )
        lines += [f"  ! {r}" for r in self.regressions]
        return "\n".join(lines)


def _number(v: object) -> float:
    try:
        return float(cast("SupportsFloat", v))  # whatever float() refuses is caught: not a number
    except (TypeError, ValueError):
        return math.nan  # a metric that is not a number cannot pass the gate


def _evaluate(registry: Registry, art: Artifact, evaluator: Evaluator, name: str) -> dict[str, float]:
    state = registry.load_state(art)
    try:
        raw = evaluator(state)
    except DeltaplaneError:
        raise
    except Exception as exc:  # the caller's code: say whose and on what, keep the cause for a debugger
        first = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"evaluator {name!r} failed on {art.ref} ({type(exc).__name__}: {first})") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"evaluator {name!r} must return a mapping of metric name to number; it returned {type(raw).__name__}"
        )
    metrics = {str(k): _number(v) for k, v in raw.items()}
    registry.record_evaluation(art, name, metrics)
    return metrics


def _unusable(metrics: Mapping[str, float], gated: list[str], who: str) -> list[str]:
    """The gate fails closed: a gated metric that is missing or not finite blocks the promotion."""
    out = []
    for k in gated:
        if k not in metrics:
            out.append(
                f"{who} evaluation returned no {k!r} (got {sorted(metrics)}); the gate needs it: gate on what "
                f"the evaluator returns (--tolerance {sorted(metrics)[0] if metrics else 'accuracy'}=0.01), or have "
                f"it return {k!r} (an evaluator may declare its gate as `evaluate.tolerance = {{'accuracy': 0.01}}`)"
            )
        elif not math.isfinite(metrics[k]):
            out.append(f"{who} {k} is {metrics[k]}, not a finite number; the gate cannot pass it")
    return out


def promote(
    registry: Registry,
    ref: str,
    *,
    to: str = "production",
    evaluator: Evaluator,
    tolerance: Tolerance | None = None,
    evaluator_name: str = "",
    evaluation_data: str = "",
    raise_on_refusal: bool = True,
) -> PromotionResult:
    """Move tag ``to`` onto version ``ref`` if it passes the evaluation and governance gates.

    A promoted version gets a model card in the same transaction as the tag move, stating the gate's metrics,
    the evaluator, the data it scored (``evaluation_data``, else the evaluator's ``data`` attribute, as in
    ``evaluate.data = "digits test split"``), the tolerances and the version compared against.

    Raises:
        PromotionRefused: the candidate regressed beyond ``tolerance`` or contains a withdrawn cohort (unless
            ``raise_on_refusal`` is False, in which case the refused result is returned).
        IntegrityError: the tags or withdrawals differ from the registry's signed state log (nothing is
            evaluated, recorded or moved).
        Conflict: another process moved tag ``to`` while the candidate was evaluated, so the gate compared it
            with a version the tag no longer holds (nothing is recorded or moved; promote again).
        ConfigError: the evaluator raised (the cause is chained) or returned something else than a mapping
            (nothing is recorded or moved).
    """
    tolerance = tolerance or Tolerance()
    _check_name(
        "tag", to
    )  # before the evaluator runs and its scores are recorded: set_tag would refuse it last
    cand = registry.resolve(ref, verify=True)
    if cand.kind != "model":
        raise ConfigError(f"{cand.ref} is a delta; only model versions can be promoted")
    # the tag's history too, not only its holder: set_tag refuses a tag whose history differs from the log,
    # and it must do so before the evaluator runs and its verdicts are recorded
    registry.check_state(model=cand.model, tag=to)
    name = evaluator_name or getattr(evaluator, "__qualname__", type(evaluator).__name__)
    gated = list(tolerance.limits)
    regressions = registry.governance_problems(cand, verify=True)
    prev, served = _served_before(registry, cand.model, to)
    cand_metrics = _evaluate(registry, cand, evaluator, name)
    regressions += _unusable(cand_metrics, gated, "candidate")
    base_metrics = None
    if prev is not None and prev.number != cand.number:
        base_metrics = _evaluate(registry, prev, evaluator, name)
        for k, allowed in tolerance.limits.items():
            if not math.isfinite(cand_metrics.get(k, math.nan)):
                continue  # already blocked above
            if not math.isfinite(base_metrics.get(k, math.nan)):
                continue  # a broken baseline cannot be regressed from; the candidate's own numbers are finite
            drop = base_metrics[k] - cand_metrics[k]
            if not drop <= allowed:
                regressions.append(
                    f"{k} drops by {drop:.4f} ({base_metrics[k]:.4f} -> {cand_metrics[k]:.4f}), "
                    f"more than the {allowed:.4f} tolerance"
                )
    result = PromotionResult(
        promoted=not regressions,
        candidate=cand.ref,
        tag=to,
        # what ``to`` held: a cohort's first own production held nothing, though it is gated against production's
        previous=prev.ref if prev is not None and served == to else None,
        candidate_metrics=cand_metrics,
        baseline_metrics=base_metrics,
        regressions=regressions,
        compared_with=f"{prev.ref} ({served})" if prev is not None else None,
    )
    decision: dict[str, Any] = {
        "previous": prev.number if prev is not None and served == to else None,
        "evaluator": name,
        "metrics": cand_metrics,
        "baseline": base_metrics,
    }
    if regressions:
        registry.record_promotion_decision(
            cand.model, to, cand.number, promoted=False, reasons=regressions, **decision
        )
        if raise_on_refusal:
            raise PromotionRefused(result.summary())
        return result
    data = evaluation_data or str(getattr(evaluator, "data", ""))
    card = _promotion_card(cand, prev, to, cand_metrics, name, data, tolerance)
    # One write transaction (the registry's write lock): the tag and the consent the gate read are checked
    # again under it, so a promotion or withdrawal by another process while this one evaluated is never
    # overwritten by a decision taken on stale state; a failed attach leaves the tag where it was, never a
    # promoted version with no card.
    with registry.transaction():
        _check_unchanged(registry, cand, to, prev, served)
        registry.record_promotion_decision(cand.model, to, cand.number, promoted=True, reasons=[], **decision)
        registry._move_tag(cand.model, to, cand.number, action="promote", reason=f"gate passed ({name})")
        registry.attach_card(cand, card.to_dict())
    return result


def _served_before(registry: Registry, model: str, to: str) -> tuple[Artifact | None, str]:
    """The version devices are served on ``to`` now, which the candidate is gated against, and the tag that
    holds it.

    That is ``to``'s holder, or, for a cohort's ``production.<cohort>`` not held yet, ``production``'s: the
    service serves that cohort ``production`` until it has its own, so a cohort's first own production must not
    regress from what its devices run (gated against nothing, any model would pass).
    """
    with contextlib.suppress(NotFound):
        return registry.get(model, registry.tag(model, to, verify=True)), to
    if to != PRODUCTION and is_gated_tag(to):
        with contextlib.suppress(NotFound):
            return registry.get(model, registry.tag(model, PRODUCTION, verify=True)), PRODUCTION
    return None, to


def _check_unchanged(
    registry: Registry, cand: Artifact, to: str, prev: Artifact | None, served: str | None = None
) -> None:
    """Refuse to move ``to`` if what devices are served on it left ``prev`` (``served``: the tag that held it,
    see :func:`_served_before`) or ``cand`` lost its consent since the gate read them.

    Raises:
        Conflict: the tag moved meanwhile (the gate compared against a version no longer there).
        PromotionRefused: a cohort of the candidate was withdrawn meanwhile.
    """
    gated = prev.ref if prev is not None else "nothing"
    for tag in dict.fromkeys((to, served or to)):
        try:
            now: int | None = registry.tag(cand.model, tag, verify=True)
        except NotFound:
            now = None
        expected = prev.number if prev is not None and tag == (served or to) else None
        if now != expected:
            holder = f"v{now}" if now is not None else "nothing"
            raise Conflict(
                f"{cand.model}:{tag} moved to {holder} while {cand.ref} was evaluated against {gated}; nothing "
                f"was changed: promote again to gate against the version {to!r} serves now"
            )
    late = registry.governance_problems(cand, verify=True)
    if late:
        raise PromotionRefused(f"{cand.ref} was not promoted to {to!r}: " + "; ".join(late))


def _promotion_card(
    cand: Artifact,
    prev: Artifact | None,
    to: str,
    metrics: Mapping[str, float],
    evaluator: str,
    data: str,
    tolerance: Tolerance,
) -> ModelCard:
    """The card a promotion attaches: the gate's metrics and how they were measured (evaluator, data,
    tolerances, the version compared against, the tag moved: the gate's record, not the model's lineage).

    The registry keeps no drift report per version (the service's monitor reports per model and window), so
    drift says "not measured" outright rather than being left blank.
    """
    return ModelCard(
        cand.model,
        cand.number,
        lineage={"parent": cand.parent, **cand.lineage},
        governance=cand.governance.to_dict(),
        metrics=metrics,
        drift={**NOT_MEASURED, "note": "the registry holds no drift report for this version"},
        evaluation={
            "evaluator": evaluator,
            "data": data or "not stated (declare it as `evaluate.data = '...'` or pass evaluation_data=)",
            "compared_with": prev.ref if prev is not None and prev.number != cand.number else "nothing",
            "gate": ", ".join(f"{k} may drop by at most {v:g}" for k, v in tolerance.limits.items()),
            "promoted_to": to,
        },
    )


def production_stack(registry: Registry, model: str, tag: str = "production") -> list[int]:
    """The tag's version stack implied by its history (promotions/sets push, rollbacks pop).

    A move onto the version the tag already holds (promoting it again, tagging it twice) pushes nothing: the
    tag did not change, so a rollback after it must still go back to the version held before.
    """
    stack: list[int] = []
    for h in registry.tag_history(model, tag):
        if h["action"] == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != h["number"]:
                stack.append(h["number"])
        elif not stack or stack[-1] != h["number"]:
            stack.append(h["number"])
    return stack


def rollback(registry: Registry, model: str, *, tag: str = "production", reason: str = "") -> Artifact:
    """Point ``model:tag`` back at the version it held before the current one; returns that version.

    Reading the tag's history, moving the tag and signing the rollback record are one registry transaction
    (its write lock is taken first): a failure leaves neither a moved tag without the record devices need to
    follow it, and a concurrent rollback waits and then pops the next version instead of the same one. The tag
    and its history are checked against the signed state log first (:class:`~deltaplane.errors.IntegrityError`
    when they differ): a forged history must not choose the version the signed rollback record vouches for.

    Raises:
        PromotionRefused: the previous version contains a cohort that withdrew consent (nothing is moved).
    """
    with registry.transaction():
        if model not in registry.models():
            known = ", ".join(registry.models()) or "none yet"
            raise NotFound(f"no model {model!r} in the registry (models: {known})")
        registry.check_state(model=model, tag=tag)
        if tag not in registry.tags(model):
            raise NotFound(
                f"{model} has no tag {tag!r} to roll back (tags: {sorted(registry.tags(model)) or 'none'})"
            )
        stack = production_stack(registry, model, tag)
        if len(stack) < 2:
            raise NotFound(f"{model}:{tag} has no previous version to roll back to (history: {stack})")
        target = stack[-2]
        # a rollback moves the tag as a promotion does: never onto a version that may not be served
        problems = registry.governance_problems(registry.get(model, target), verify=True)
        if problems:
            raise PromotionRefused(
                f"{model}:{tag} cannot roll back to {model}@{target}: {problems[0]}, so it may not be served; "
                f"rebuild without the cohort (POST /admin/models/{model}/rebuild) and promote the version it "
                "publishes instead"
            )
        registry._move_tag(
            model, tag, target, action="rollback", reason=reason or f"rollback from {stack[-1]}"
        )
        registry.record_rollback(model, tag, target)  # devices already on a newer version may follow it back
    return registry.get(model, target)

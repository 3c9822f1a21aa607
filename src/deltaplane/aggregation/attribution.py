"""Backdoor attribution by trigger inversion: judge an update by what it does to the model, not its coordinates.

Update-space defences compare coordinates (norms, cosines, histories); on a small non-IID federation with sparse
compressed uploads a 20% backdoor does not stand out there (``benchmarks/robustness_diagnostics.py``). This rule
asks the model instead, with the server's own small clean root dataset (FLTrust's, :func:`root_dataset`):

1. **Trigger inversion** (Neural Cleanse, Wang et al. 2019, IEEE S&P, https://doi.org/10.1109/SP.2019.00031):
   every ``every`` rounds, for each label ``t``, optimise a mask ``m ∈ [0,1]^{H×W}`` and a pattern ``p`` so that
   the stamped root inputs ``(1 − m)⊙x + m⊙p`` of the other labels are classified ``t``, minimising
   ``CE + λ‖m‖₁`` (Adam). An infected label needs an anomalously small mask: with ``nₜ = ‖mₜ‖₁`` (the full mask
   for a label the search could not reach), its anomaly index ``(median n − nₜ) / (1.4826 · MAD n)`` is at least
   2. The inversion runs on the server's *shadow* model: the global model plus everything this rule has kept
   out of it so far, so that a backdoor it is keeping out stays visible to the search. One inversion is noisy: a
   half-trained model has outlier labels, and once the backdoor's trigger is unlearned a clean label's outlier
   often ranks first. So each label's anomaly indices add up over the inversions (its *evidence*), and a newly
   flagged label replaces the current one only when its evidence is the larger (``switch``, see the class).
2. **Attribution** (server-side, in the spirit of FLIP, Zhang et al. 2023, ICLR, https://arxiv.org/abs/2210.10272,
   which inverts on the clients): each update ``Δᵢ``, scaled to the round's median norm, is applied to the global
   model and scored by how much it lowers the loss of the reconstructed trigger towards ``t``:
   ``sᵢ = L_trig(θ + Δᵢ) − L_trig(θ)``. Scores become robust z-scores across the round's clients (median / MAD),
   clipped to ±5. (Subtracting the same change on the clean root inputs, to cancel honest clients rich in label
   ``t``, separated the attackers in the first 10 rounds but reversed once the model held the backdoor:
   ``benchmarks/robustness_attribution.py``.) That score confuses honest clients rich in label ``t`` with the
   attackers once the model holds the backdoor; ``score="mix"`` judges instead the push of the other labels'
   *clean* inputs towards ``t`` beyond what the update's gain on the genuine inputs of ``t`` predicts, and
   ``score="both"`` sums the two z-scores (see the class).
3. **Reputation** (per-client history, as in FLDetector, Zhang et al. 2022, KDD): each client's z-scores add up
   over the rounds it takes part in; with ``Rᵢ`` the sum over ``kᵢ`` rounds, a client is excluded while
   ``Rᵢ / √kᵢ < −threshold`` (a sum of ``k`` standard scores has standard deviation ``√k``), at most
   ``⌊(n − 1)/2⌋`` of a round's ``n`` clients, the most suspicious first, and (``reputation="floor"``, the
   default) while its mean ``Rᵢ/kᵢ`` is below ``−REPUTATION_FLOOR`` as well. The first test alone
   (``reputation="sum"``) tests a mean z-score below 0, and honest clients rich in the label have a small
   persistent one (see the class).

4. **Unlearning** (Neural Cleanse's mitigation): once a trigger is known, the new global model takes
   ``unlearn`` SGD steps on the root data, clean and stamped with the trigger under their *true* labels, so a
   backdoor that entered before its senders were found loses its hold (without it, exclusion came too late on
   the default federation: the backdoor stayed at 0.88–0.92).

The result is the unweighted mean of the kept updates, then unlearned (client weights are claims an attacker
controls). Valid with every uplink codec: the scores come from the decoded updates' effect on the model, so sparse top-k/STC
payloads are scored like dense ones. Holds every update of the round (``streaming = False``).

Needs a task whose inputs are continuous (images, features) and whose labels are class indices: inverting a
trigger blends a mask and a pattern into the inputs, which has no meaning for token ids (a blend of two ids is no
token) — :func:`check_task` refuses those with :class:`~deltaplane.errors.IncompatibleDefense`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from deltaplane.aggregation.checkpoint import flat_state_difference, float_shapes
from deltaplane.aggregation.robust import _Buffered
from deltaplane.delta import Delta, StateDict
from deltaplane.errors import ConfigError, DeltaplaneError, IncompatibleDefense, InvalidUpdate, ShapeMismatch

if TYPE_CHECKING:
    from deltaplane.codecs.layout import TensorLayout

__all__ = [
    "INVERSIONS",
    "REPUTATIONS",
    "SCORES",
    "SHADOWS",
    "SWITCHES",
    "AttributionState",
    "BackdoorAttribution",
    "TriggerProbe",
    "bound_norms",
    "check_task",
]

#: the anomaly index above which a label counts as infected (Neural Cleanse uses 2; on the default federation's
#: round-40 undefended model the backdoor's label 0 scored 1.6 with every other label below it, so 1.5)
ANOMALY_INDEX = 1.5
#: the share of stamped inputs a trigger must flip for its label to count as reached
REACHED = 0.75
#: per-round z-scores are clipped to this magnitude so one degenerate round cannot decide a reputation
Z_CLIP = 5.0
#: how the rule moves from the current infected label to another one an inversion flags (``switch=``)
SWITCHES = ("evidence", "latest", "sticky")
#: how an update's effect on the trigger is measured (``score=``, see the class)
SCORES = ("trigger", "mix", "both")
#: how the mask's L1 weight moves during an inversion (``invert=``, see the class)
INVERSIONS = ("fixed", "schedule")
#: ``invert="schedule"``: every this many Adam steps, each label's ``λ`` is raised ×1.5 if its trigger flipped at
#: least ``LAMBDA_SUCCESS`` of the stamped inputs over the last step, lowered ÷1.5^1.5 otherwise (Neural Cleanse's
#: cost adjustment; the reference code checks per epoch with patience, at 0.99 success)
LAMBDA_EVERY = 10
LAMBDA_SUCCESS = 0.95
#: what the shadow model holds of the mass kept out (``shadow=``, see the class)
SHADOWS = ("full", "bounded")
#: ``shadow="bounded"``: the share of the global model's root accuracy the shadow model must keep. The bar is the
#: inversion's own: one that reaches fewer than half the labels is thrown away, and a shadow that has lost more
#: than half its root accuracy is on its way there (default codec, seed 0, invert=schedule: root accuracy 0.82,
#: 0.40, 0.09 at rounds 41, 46, 51; the first two inversions counted, the third and every later one did not).
#: A stricter bar (within 0.1 of the global model) halved the backdoor out of the shadow with the damage, the
#: current label's index fell to 0 and a clean label's outliers outgrew its evidence (seed 1: switch at round 66)
SHADOW_KEEP = 0.5
#: ``shadow="bounded"``: halvings of the offset tried before the inversion falls back to the global model
SHADOW_HALVINGS = 10
#: how a client's summed z-scores decide its exclusion (``reputation=``, see the class)
REPUTATIONS = ("sum", "floor")
#: ``reputation="floor"``: the mean z-score ``Rᵢ/kᵢ`` a client must also be below to be kept out. Measured on the
#: default codec with ``invert=schedule`` (2-core Xeon, from the label's adoption to round 80): the attackers'
#: mean z is −1.50 to −1.63 (seed 0) and −1.74 to −1.85 (seed 2); the honest clients rich in the label −0.63 and
#: −0.71 (seed 0; −0.88 to −1.12 on seed 2). Replayed offline on seed 0's recorded z-scores, 0.9 keeps both
#: honest clients in and delays the attackers 0–3 rounds; 1.0 delays them 5–11 rounds, 0.8 still keeps client 10
#: out for 4 rounds
REPUTATION_FLOOR = 0.9


def _theil_sen_residuals(y: list[float], x: list[float]) -> list[float]:
    """``y`` less the Theil–Sen line of ``y`` on ``x`` (the median of the pairwise slopes, then the median
    intercept): what ``y`` says beyond what ``x`` predicts, robust to a minority of outliers."""
    slopes = sorted(
        (y[j] - y[i]) / (x[j] - x[i])
        for i in range(len(x))
        for j in range(i + 1, len(x))
        if abs(x[j] - x[i]) > 1e-12
    )
    b = slopes[len(slopes) // 2] if slopes else 0.0
    a = sorted(yi - b * xi for xi, yi in zip(x, y, strict=True))[len(x) // 2]
    return [yi - a - b * xi for xi, yi in zip(x, y, strict=True)]


def bound_norms(x: Tensor, cap: float, rows: list[int] | None = None) -> Tensor:
    """The rows of ``x`` (one update each), every row of ``rows`` (all by default) longer than ``cap`` times the
    median norm of *all* rows scaled down to that norm; ``x`` itself when no such row is over it (so a round the
    bound does not touch is computed bit for bit as without it). With ``cap > 1`` the median norm is unchanged."""
    norms = x.norm(dim=1)
    bound = cap * float(norms.median())
    over = norms > bound
    if rows is not None:
        chosen = torch.zeros_like(over)
        chosen[rows] = True
        over &= chosen
    if not bool(over.any()):
        return x
    scale = torch.where(over, bound / norms, torch.ones_like(norms))
    return x * scale.unsqueeze(1).to(x.dtype)


def _robust_z(values: list[float]) -> Tensor:
    """Robust z-scores (median, 1.4826 · MAD) of one round's per-client values, clipped to ±``Z_CLIP``."""
    sc = torch.tensor(values, dtype=torch.float64)
    med = sc.median()
    mad = 1.4826 * (sc - med).abs().median()
    return ((sc - med) / mad.clamp_min(1e-12)).clamp(-Z_CLIP, Z_CLIP)


def check_task(x: Tensor, y: Tensor) -> None:
    """Refuse root data trigger inversion cannot work with (see the module docstring).

    Raises:
        IncompatibleDefense: integer inputs (token ids), or labels that are not one class index per input.
    """
    if not x.is_floating_point():
        raise IncompatibleDefense(
            f"trigger_attribution inverts triggers by blending a continuous mask and pattern into the inputs; "
            f"this task's inputs are {x.dtype} (token ids: a blend of two ids is no token). Use foolsgold, "
            "flame or fltrust for this task"
        )
    if x.dim() < 2 or y.dim() != 1 or y.is_floating_point() or len(y) != len(x):
        raise IncompatibleDefense(
            "trigger_attribution needs a classification task (one class index per input) to invert a trigger "
            f"towards a label; the root data has inputs {tuple(x.shape)} and labels {tuple(y.shape)} {y.dtype}"
        )


@dataclass
class TriggerProbe:
    """The server's model and root data, as the rule needs them for one round (set by the server step).

    Args:
        model: a scratch module of the task's architecture (its weights are never read).
        x: root inputs ``(N, ...)``, continuous.
        y: root labels ``(N,)``, class indices.
        state: the global model the round's clients trained from.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    state: StateDict

    def __post_init__(self) -> None:
        check_task(self.x, self.y)
        self.num_classes = int(self.y.max()) + 1

    def logits(self, state: StateDict, x: Tensor) -> Tensor:
        """The model's outputs with ``state``, in inference mode: trigger inversion, scoring and unlearning look
        at the model as it is served, so dropout is off (its masks drew from torch's unseeded global generator
        and the server's results changed run to run) and BatchNorm uses its running statistics (in training
        mode it wrote batch statistics into ``state``'s buffers: the server's own global model). The model's
        mode is restored afterwards."""
        was = self.model.training
        self.model.eval()
        try:
            return functional_call(self.model, dict(state), (x,))  # a dict, as functional_call's hints ask
        finally:
            self.model.train(was)


@dataclass
class AttributionState:
    """What the rule learns across rounds (checkpointed with the server): each client's summed z-scores and
    round count, the mass kept out of the global model so far (the shadow offset), the current trigger, and
    each label's anomaly evidence (its anomaly indices summed over the inversions, ``switch="evidence"``)."""

    reputation: dict[str, float] = field(default_factory=dict)
    rounds_seen: dict[str, int] = field(default_factory=dict)
    shadow: Tensor | None = None
    mask: Tensor | None = None
    pattern: Tensor | None = None
    label: int = -1
    anomaly: float = 0.0
    rounds: int = 0
    evidence: dict[int, float] = field(default_factory=dict)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The float tensors (name -> shape) whose flattened values ``shadow`` holds, recorded with it."""

    def layout_problem(self, floats: dict[str, tuple[int, ...]]) -> str:
        """How the shadow offset differs from a model whose float tensors are ``floats``; empty if it fits (no
        shadow yet fits any model)."""
        if self.shadow is None:
            return ""
        problem = flat_state_difference(self.tensors, {"shadow": self.shadow}, floats)
        return f"trigger_attribution state: {problem}" if problem else ""

    def check_layout(self, layout: Mapping[str, TensorLayout]) -> None:
        """Refuse another model's shadow offset at restore (it used to load, and the next inversion failed on
        it after a round of client training).

        Raises:
            ConfigError: naming the first tensor that differs.
        """
        problem = self.layout_problem(float_shapes(layout))
        if problem:
            raise ConfigError(
                f"{problem}: the snapshot's shadow offset belongs to another model; restore a snapshot taken "
                "from a run of this model"
            )


class BackdoorAttribution(_Buffered):
    """Trigger inversion + per-client attribution + reputation (see the module docstring).

    Args:
        every: invert triggers every this many rounds (and in the first).
        steps: Adam steps per inversion.
        lam: ``λ``, the L1 weight of the mask.
        threshold: exclude a client while its reputation ``Rᵢ/√kᵢ`` is below ``−threshold``.
        unlearn: SGD steps of unlearning the current trigger from each round's new global model (0: none).
        unlearn_lr: their learning rate.
        switch: when another label's trigger replaces the current one (which restarts the reputations), once a
            label has been found infected:

            * ``"evidence"`` (default): when the flagged label's *evidence* — its anomaly indices summed over
              every inversion so far, each clipped to ±``Z_CLIP`` — exceeds the current label's. The current
              label's own index counts only when positive: the server's unlearning, not the clients, pushes
              it down. A backdoor's label stands out inversion after inversion, a clean label's outlier once.
            * ``"latest"``: whenever an inversion flags another label. Unlearning hides the backdoor from the
              next inversion, a clean label's outlier then wins and the attackers' evidence is lost (default
              codec, seed 2: label 0 found at round 51 with index 2.06, replaced by label 1 at 1.85 five
              rounds later, by label 2 at 4.79 after it came back).
            * ``"sticky"``: when the flagged label's index is larger than the largest the current label has
              had. An outlier of a half-trained model then holds for good (identity, seed 0: label 4 at 2.85
              in round 11, at accuracy 0.63, never flagged again; the backdoor's label 0 at 2.39 in round 21
              cannot displace it and keeps 0.96 backdoor success).
        sticky: the older spelling: ``True`` is ``switch="sticky"``, ``False`` is ``switch="latest"``.
        score: what an update is judged by, each update scaled to the round's median norm and applied to the
            global model, towards the infected label ``t``:

            * ``"trigger"`` (the default until ``both`` passed identity seed 2): how much it lowers the loss of the root inputs of the other labels stamped with
              the reconstructed trigger. Once the model holds the backdoor, planting it again barely moves that
              loss, while an honest client rich in label ``t`` lowers it by pushing every input towards ``t``
              (identity, seed 2: clients with 17–55% of label 0 scored as low as the attackers).
            * ``"mix"``: how much it lowers the loss of the *clean* root inputs of the other labels towards
              ``t``, less what its gain on the genuine root inputs of label ``t`` predicts (the residual of a
              Theil–Sen line across the round's clients): a client rich in ``t`` lowers both, an attacker
              pushes other labels' inputs towards ``t`` without learning ``t`` itself. Uses the label, not
              the trigger's pixels.
            * ``"both"`` (default): the two z-scores summed and divided by ``√2``. On the default federation at
              20% ``backdoor`` it passes all six seed × codec runs of #21 (``trigger`` five, ``mix`` five).
        invert: how each inversion weighs the mask's size against reaching the label:

            * ``"fixed"`` (default): ``λ = lam`` throughout, and the final mask. The search stops where the
              stamped inputs are already classified ``t``, so every mask ends 2–3× the smallest trigger: on the
              default federation (default codec, seed 2, on a 2-core Xeon) the backdoor's label 0 kept 11.6
              pixels against a median 14.9 in round 36 (index 1.45, under the 1.5 bar) at 0.86 backdoor, though
              the attack's trigger has 4, was never flagged, and the run kept 0.91 backdoor.
            * ``"schedule"``: Neural Cleanse's cost adjustment — ``lam`` is each label's starting ``λ``; every
              ``LAMBDA_EVERY`` steps a label's ``λ`` is multiplied by 1.5 while its trigger flips at least
              ``LAMBDA_SUCCESS`` of the stamped inputs and divided by 1.5^1.5 otherwise, and the inversion keeps
              each label's smallest mask that did flip them. On that model label 0's mask is 4.0 against a
              median 8.0 (index 3.72), and the run ends with 0.00 backdoor; it is not the default because it
              cost default-codec seed 0 accuracy (0.916 against the fixed rule's 0.950 and clean FedAvg's 0.958
              on that machine: two more honest clients kept out), see docs/aggregation.md.
        shadow: what the shadow model the inversions run on holds of the mass kept out:

            * ``"full"`` (default): the global model plus the sum of everything kept out since the first round.
              Nothing pulls that sum back, as the honest clients' training pulls back a backdoor in the global
              model: with the default codec it grows by about 2 (L2) a round once the attackers are kept out
              (default codec, seed 0, ``invert=schedule``: 1.5, 6.2, 13.9 at rounds 41, 46, 51), the shadow's
              root accuracy falls to 0.40 and then to 0.09 (every input to label 0), and every later inversion
              is thrown away (fewer than half the labels reached).
            * ``"bounded"``: before each inversion the offset is halved (and kept so) until the shadow model
              keeps at least ``SHADOW_KEEP`` (half) of the global model's root accuracy; after
              ``SHADOW_HALVINGS`` halvings it is dropped. A model past that is the sum's own damage, not the
              kept-out clients' backdoor, and its inversion would be thrown away.
        reputation: when a client's summed z-scores ``Rᵢ`` over its ``kᵢ`` rounds keep it out:

            * ``"floor"`` (default): while ``Rᵢ/√kᵢ < −threshold`` *and* ``Rᵢ/kᵢ < −REPUTATION_FLOOR`` (0.9):
              the mean z-score ``max(threshold/√kᵢ, REPUTATION_FLOOR)`` below the median at least — the plain
              test for the first ``(threshold/REPUTATION_FLOOR)²`` ≈ 11 rounds, an effect-size bar after, so a
              persistent mean above ``−REPUTATION_FLOOR`` is never kept out however long it lasts, while the
              attackers (mean −1.5 to −1.85 on the measured runs) are. With ``invert="schedule",
              shadow="bounded"`` it passed 6 of 6 acceptance runs (the sum 5 of 6: default codec seed 0, 0.944
              against 0.925) at 0.3 points more no-attacker cost; with the other options at their defaults, 6 of
              6 too (the sum missed default-codec seed 2) at the sum's no-attacker cost, −0.3 points on the mean
              (docs/benchmarks.md, "— reputation option", measured while the sum was the default).
            * ``"sum"``: while ``Rᵢ/√kᵢ < −threshold``: a test that the client's mean z-score is below
              0. Its power grows with ``kᵢ``, so *any* persistent negative mean ``μ`` crosses the bar after
              about ``(threshold/μ)²`` rounds; the honest clients rich in the infected label have one (their
              updates do push towards it): default codec, seed 0, ``invert=schedule``: clients 10 and 8 at
              mean −0.71 and −0.63 are kept out from 16 and 20 rounds after the label's adoption to the end
              (0.925 against clean FedAvg's 0.958 with ``shadow=bounded``). The default until the floor was
              measured. With ``norm_cap=10`` on the ``stc(0.006)`` uplink it holds all 9 cells of the attack
              grid (≤ 0.01 backdoor; the floor loses the 30% plain and norm-bounded ones), but without attackers
              it keeps out 5–7 of the 20 honest clients by round 80, 1.4 points below FedAvg on the 3-seed mean
              against the floor's 0.7 (docs/aggregation.md, "At 30% attackers"): choose it where a third of
              the clients may be attackers.
        norm_cap: bound every *kept* update of a round to ``norm_cap`` times the round's median L2 norm (over all
            its updates) before the mean (``None``, the default: no bound). The scores already scale each update to the median norm; the
            unweighted mean does not, and takes an update whose local training diverged whole. Measured
            (``robustness_trace.py default 0 'trigger_attribution(reputation=sum)' out.json --attack
            bounded_backdoor:0.3 --uplink 'stc(0.006)'``): honest client 12 (65 samples: batches 32, 32, 1)
            diverged in local SGD at round 46 from an ordinary global model (sent norm 1,046; the
            round's median 6.4–6.9, the largest of rounds 1–45 3.15× the median) and the model fell to chance;
            ``norm_cap=10`` is measured in docs/aggregation.md. Scaling a row down keeps the round's median
            (``norm_cap > 1``); the scores are taken before it (they scale each update to the median anyway).
            The kept-out updates are left whole: a round where no kept update is over the bound is computed bit
            for bit as without it, the shadow offset included.
        state: learned state to continue from (a fresh one by default).
    """

    def __init__(
        self,
        *,
        every: int = 5,
        steps: int = 300,
        lam: float = 0.01,
        threshold: float = 3.0,
        unlearn: int = 10,
        unlearn_lr: float = 0.05,
        switch: str | None = None,
        sticky: bool | None = None,
        score: str = "both",
        invert: str = "fixed",
        shadow: str = "full",
        reputation: str = "floor",
        norm_cap: float | None = None,
        state: AttributionState | None = None,
    ) -> None:
        super().__init__()
        if norm_cap is not None and (
            isinstance(norm_cap, bool)
            or not isinstance(norm_cap, int | float)
            or not (math.isfinite(norm_cap) and norm_cap > 1)
        ):
            raise ConfigError(
                f"norm_cap must be a number above 1 (a multiple of the round's median update norm). "
                f"Found {norm_cap!r}"
            )
        self.norm_cap = None if norm_cap is None else float(norm_cap)
        if sticky is not None and not isinstance(sticky, bool):
            raise ConfigError(f"sticky must be true or false. Found {sticky!r}")
        if switch is not None and switch not in SWITCHES:
            raise ConfigError(f"switch must be one of {list(SWITCHES)}. Found {switch!r}")
        implied = None if sticky is None else ("sticky" if sticky else "latest")
        if switch is not None and implied is not None and switch != implied:
            raise ConfigError(
                f"sticky={sticky} means switch={implied!r}, not {switch!r}: give one of the two"
            )
        for name, value, allowed in (
            ("score", score, SCORES),
            ("invert", invert, INVERSIONS),
            ("shadow", shadow, SHADOWS),
            ("reputation", reputation, REPUTATIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}. Found {value!r}")
        self.score = score
        self.invert = invert
        self.shadow = shadow
        self.reputation = reputation
        self.switch: str = switch or implied or "evidence"
        self.sticky = self.switch == "sticky"
        for key, count in (("every", every), ("steps", steps), ("unlearn", unlearn + 1)):
            if isinstance(count, bool) or not (isinstance(count, int) and count >= 1):
                raise ConfigError(f"{key} must be a positive integer. Found {count!r}")
        for key, number in (("lam", lam), ("threshold", threshold), ("unlearn_lr", unlearn_lr)):
            if not (isinstance(number, int | float) and math.isfinite(number) and number > 0):
                raise ConfigError(f"{key} must be positive. Found {number!r}")
        self.every, self.steps, self.lam, self.threshold = every, steps, float(lam), float(threshold)
        self.unlearn, self.unlearn_lr = unlearn, float(unlearn_lr)
        self.state = state if state is not None else AttributionState()
        self._probe: TriggerProbe | None = None
        self._ids: list[str] = []
        self.excluded: list[str] = []

    def set_probe(self, probe: TriggerProbe) -> None:
        """The round's global model and the server's root data (before :meth:`add`)."""
        self._probe = probe

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        cid = self._next_id  # (super().add consumes it; _Buffered.identify sets it)
        if cid is None or cid in self._ids:
            self._next_id = None
            if cid is None:
                raise InvalidUpdate("trigger_attribution needs the sender of every update: pass client_id")
            raise InvalidUpdate(f"client {cid} sent two updates in one round")
        super().add(delta, weight)
        self._ids.append(cid)

    def _combine(self, x: Tensor) -> Tensor:
        probe = self._probe
        if probe is None:
            raise DeltaplaneError(
                "trigger_attribution needs the server's model and root data: set_probe() first"
            )
        st = self.state
        like = self._like
        assert like is not None
        floats = float_shapes(like)
        problem = st.layout_problem(floats)
        if problem:  # restored from another model's snapshot without the model's layout at hand
            raise ShapeMismatch(
                f"{problem} in this round's update: the shadow offset belongs to another model (a snapshot of "
                "another model's run restored?)"
            )
        st.tensors = floats
        if st.rounds % self.every == 0:
            self._invert(probe, like)
        st.rounds += 1
        z = self._scores(probe, like, x) if st.label >= 0 else torch.zeros(len(x), dtype=torch.float64)
        drop = self._judge(z.tolist())
        keep = [i for i in range(len(x)) if i not in drop]
        if self.norm_cap is not None:  # after the scores: they scale every update to the median norm anyway
            x = bound_norms(x, self.norm_cap, keep)
        self.excluded = [self._ids[i] for i in drop]
        mean_all = x.mean(dim=0)
        out = x[keep].mean(dim=0)
        removed = mean_all - out
        st.shadow = removed.clone() if st.shadow is None else st.shadow + removed
        if self.unlearn and st.label >= 0:
            out = self._unlearn(probe, like, out)
        self._own = {
            "attribution_excluded": float(len(drop)),
            "attribution_label": float(st.label),
            "attribution_anomaly": st.anomaly,
        }
        return out

    def _judge(self, z: list[float]) -> list[int]:
        """Add the round's z-scores (one per client, in arrival order) to the reputations; return the indices
        of the updates to keep out, the most suspicious first (at most ``⌊(n − 1)/2⌋`` of ``n``)."""
        st = self.state
        for cid, zi in zip(self._ids, z, strict=True):
            st.reputation[cid] = st.reputation.get(cid, 0.0) + zi
            st.rounds_seen[cid] = st.rounds_seen.get(cid, 0) + 1
        r = torch.tensor([st.reputation[c] for c in self._ids], dtype=torch.float64)
        k = torch.tensor([st.rounds_seen[c] for c in self._ids], dtype=torch.float64)
        stat = r / k.sqrt()
        suspect = stat < -self.threshold
        if self.reputation == "floor":
            suspect &= r / k < -REPUTATION_FLOOR
        order = [int(i) for i in stat.argsort() if bool(suspect[i])]
        return order[: (len(z) - 1) // 2]

    def _unlearn(self, probe: TriggerProbe, like: Delta, out: Tensor) -> Tensor:
        """Neural Cleanse's unlearning on the server: ``unlearn`` SGD steps of the new global model on the root
        data and the same inputs stamped with the reconstructed trigger *under their true labels*, so a backdoor
        that entered before its senders were found loses its hold; returns the adjusted update."""
        st = self.state
        assert st.mask is not None and st.pattern is not None
        base = {k: v.detach() for k, v in probe.state.items()}
        d = like.unflatten(out)
        keys = [k for k, v in d.items() if v.is_floating_point()]  # the order flatten() uses
        params = {k: (v + d[k]).clone().requires_grad_() if k in keys else v for k, v in base.items()}
        inputs = torch.cat([probe.x, (1 - st.mask) * probe.x + st.mask * st.pattern])
        labels = torch.cat([probe.y, probe.y])
        trained = [params[k] for k in keys]
        opt = torch.optim.SGD(trained, lr=self.unlearn_lr)
        for _ in range(self.unlearn):
            loss = F.cross_entropy(probe.logits(params, inputs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([(params[k].detach() - base[k]).reshape(-1).float() for k in keys])

    def _invert(self, probe: TriggerProbe, like: Delta) -> None:
        """Neural Cleanse on the shadow model: keep the trigger of the most anomalous label if it is infected."""
        self._consider(*self._inverted(probe, like))

    def _consider(self, index: Tensor, flip: Tensor, norms: Tensor, masks: Tensor, patterns: Tensor) -> None:
        """Weigh one inversion (:meth:`_inverted`'s outputs): add each label's anomaly index to its evidence
        and offer the most anomalous label's trigger to :meth:`_adopt` if that label is infected."""
        st = self.state
        t_n = len(index)
        # a model that reaches fewer than half the labels (early rounds: it predicts one class for everything)
        # has no median trigger size to compare with
        if int((flip >= REACHED).sum()) * 2 < t_n:
            return
        for label, value in enumerate(index.tolist()):
            value = min(max(value, -Z_CLIP), Z_CLIP)
            if label == st.label:  # being unlearned: its drop is the server's doing, not evidence
                value = max(value, 0.0)
            st.evidence[label] = st.evidence.get(label, 0.0) + value
        t = int(index.argmax())
        if float(norms[t]) < 0.5 or float(index[t]) < ANOMALY_INDEX:  # an empty mask is no trigger either
            return
        self._adopt(t, float(index[t]), masks[t].clone(), patterns[t].clone())

    def _inverted(self, probe: TriggerProbe, like: Delta) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One trigger per label on the shadow model: each label's anomaly index, the share of stamped inputs
        its trigger flips, its mask's L1 norm (the full mask when not reached), and the masks and patterns."""
        st = self.state
        if self.shadow == "bounded":
            self._bound_shadow(probe, like)
        model_state = dict(probe.state)
        if st.shadow is not None:
            off = like.unflatten(st.shadow)
            model_state = {k: v + off[k] if k in off else v for k, v in model_state.items()}
        x, y = probe.x, probe.y
        lo, hi = float(x.min()), float(x.max())
        t_n = probe.num_classes
        gen = torch.Generator().manual_seed(st.rounds)
        space = x.shape[-2:] if x.dim() >= 3 else x.shape[-1:]
        mask_l = torch.randn((t_n, 1, *([1] * (x.dim() - 1 - len(space))), *space), generator=gen) * 0.1 - 2
        pat_l = torch.randn((t_n, 1, *x.shape[1:]), generator=gen) * 0.1
        mask_l.requires_grad_(True)
        pat_l.requires_grad_(True)
        opt = torch.optim.Adam([mask_l, pat_l], lr=0.1)
        target = torch.arange(t_n).repeat_interleave(len(x))
        other = (y[None] != torch.arange(t_n)[:, None]).float()  # (T, N): inputs not already of label t
        frozen = {k: v.detach() for k, v in model_state.items()}
        labels = torch.arange(t_n)[:, None]

        def share(logits: Tensor) -> Tensor:
            """Per label, the share of the other labels' stamped inputs classified as that label."""
            pred = logits.argmax(1).view(t_n, -1)
            return ((pred == labels).float() * other).sum(1) / other.sum(1).clamp_min(1)

        schedule = self.invert == "schedule"
        lam = torch.full((t_n,), self.lam)
        best = torch.full(
            (t_n,), math.inf
        )  # each label's smallest mask that flipped LAMBDA_SUCCESS (schedule)
        best_m = torch.zeros_like(mask_l)
        best_p = torch.zeros_like(pat_l)
        best_flip = torch.zeros(t_n)
        for i in range(self.steps):
            m, p = torch.sigmoid(mask_l), lo + (hi - lo) * torch.sigmoid(pat_l)
            stamped = ((1 - m) * x[None] + m * p).reshape(-1, *x.shape[1:])
            logits = probe.logits(frozen, stamped)
            ce = F.cross_entropy(logits, target, reduction="none").view(t_n, -1)
            ce = (ce * other).sum(1) / other.sum(1).clamp_min(1)
            loss = (ce + lam * m.reshape(t_n, -1).sum(1)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if schedule and (i + 1) % LAMBDA_EVERY == 0:
                with torch.no_grad():  # the mask and pattern before this step, and what they flipped
                    hit = share(logits)
                    size = m.reshape(t_n, -1).sum(1)
                    ok = hit >= LAMBDA_SUCCESS
                    better = ok & (size < best)
                    best = torch.where(better, size, best)
                    best_m[better], best_p[better], best_flip[better] = m[better], p[better], hit[better]
                    lam = torch.where(ok, lam * 1.5, lam / 1.5**1.5)
        with torch.no_grad():
            m, p = torch.sigmoid(mask_l), lo + (hi - lo) * torch.sigmoid(pat_l)
            stamped = ((1 - m) * x[None] + m * p).reshape(-1, *x.shape[1:])
            flip = share(probe.logits(frozen, stamped))
            norms = m.reshape(t_n, -1).sum(1)
            if schedule:  # the smallest successful mask, unless the final one is smaller and still reaches
                use = torch.isfinite(best) & ((flip < REACHED) | (best < norms))
                m, p = m.clone(), p.clone()
                m[use], p[use], flip[use], norms[use] = best_m[use], best_p[use], best_flip[use], best[use]
            norms = torch.where(flip >= REACHED, norms, torch.full_like(norms, float(m[0].numel())))
            med = norms.median()
            mad = 1.4826 * (norms - med).abs().median()
            index = (med - norms) / mad.clamp_min(1e-6)
        return index, flip, norms, m, p

    def _bound_shadow(self, probe: TriggerProbe, like: Delta) -> None:
        """``shadow="bounded"``: halve the shadow offset (in the state) until the shadow model keeps at least
        ``SHADOW_KEEP`` of the global model's root accuracy; drop it after ``SHADOW_HALVINGS`` halvings."""
        st = self.state
        if st.shadow is None:
            return
        base = {k: v.detach() for k, v in probe.state.items()}

        def accuracy(offset: Tensor | None) -> float:
            state = base
            if offset is not None:
                d = like.unflatten(offset)
                state = {k: v + d[k] if k in d else v for k, v in base.items()}
            return float((probe.logits(state, probe.x).argmax(1) == probe.y).float().mean())

        with torch.no_grad():
            floor = SHADOW_KEEP * accuracy(None)
            for _ in range(SHADOW_HALVINGS):
                if accuracy(st.shadow) >= floor:
                    return
                st.shadow = st.shadow * 0.5
            if accuracy(st.shadow) < floor:
                st.shadow = None

    def _adopt(self, label: int, anomaly: float, mask: Tensor, pattern: Tensor) -> bool:
        """Make an inverted trigger the current one (unless ``switch`` keeps the earlier label); returns
        whether it was taken. Another label's trigger restarts the reputations: scores against different
        triggers do not add up."""
        st = self.state
        if st.label >= 0 and label != st.label:
            if self.switch == "sticky" and anomaly <= st.anomaly:
                return False
            if self.switch == "evidence" and st.evidence.get(label, 0.0) <= st.evidence.get(st.label, 0.0):
                return False
        if label != st.label:
            st.reputation.clear()
            st.rounds_seen.clear()
        elif self.sticky:  # the bar another label must clear: the strongest evidence seen for this one
            anomaly = max(anomaly, st.anomaly)
        st.mask, st.pattern, st.label, st.anomaly = mask, pattern, label, anomaly
        return True

    def _scores(self, probe: TriggerProbe, like: Delta, x: Tensor) -> Tensor:
        """Robust z-scores of each update's effect towards the infected label, as ``score`` measures it (see
        the class; negative: suspicious)."""
        st = self.state
        assert st.mask is not None and st.pattern is not None
        t = st.label
        keep = probe.y != t
        clean = probe.x[keep]
        inputs = {"clean": clean, "own": probe.x[~keep]}  # other labels' inputs, and label t's own
        if self.score in ("trigger", "both"):
            inputs["stamped"] = (1 - st.mask) * clean + st.mask * st.pattern
        if self.score == "trigger":
            del inputs["clean"], inputs["own"]
        base = {k: v.detach() for k, v in probe.state.items()}
        norms = x.norm(dim=1)
        step = float(norms.median())

        def losses(state: StateDict) -> dict[str, float]:
            """The loss towards ``t`` of each input set (0 for an empty one: a root set without label ``t``)."""
            return {
                k: float(F.cross_entropy(probe.logits(state, v), torch.full((len(v),), t))) if len(v) else 0.0
                for k, v in inputs.items()
            }

        with torch.no_grad():
            before = losses(base)
            moves: dict[str, list[float]] = {k: [] for k in inputs}
            for row, n in zip(x, norms.tolist(), strict=True):
                d = like.unflatten(row * (step / n if n > 0 else 0.0))
                after = losses({k: v + d[k] if k in d else v for k, v in base.items()})
                for k in inputs:
                    moves[k].append(after[k] - before[k])
        if self.score == "trigger":
            return _robust_z(moves["stamped"])
        mix = _robust_z(_theil_sen_residuals(moves["clean"], moves["own"]))
        if self.score == "mix":
            return mix
        return ((_robust_z(moves["stamped"]) + mix) / math.sqrt(2)).clamp(-Z_CLIP, Z_CLIP)

    def reset(self) -> None:
        super().reset()
        self._ids, self._next_id, self._probe = [], None, None

    def __repr__(self) -> str:
        return (
            f"BackdoorAttribution(every={self.every!r}, steps={self.steps!r}, lam={self.lam!r}, "
            f"threshold={self.threshold!r}, unlearn={self.unlearn!r}, unlearn_lr={self.unlearn_lr!r}, "
            f"switch={self.switch!r}, score={self.score!r}, invert={self.invert!r}, shadow={self.shadow!r}, "
            f"reputation={self.reputation!r}, norm_cap={self.norm_cap!r})"
        )

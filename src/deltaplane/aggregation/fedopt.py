"""Server optimizers (FedOpt): treat the averaged client delta as a pseudo-gradient and step an optimizer on it.

Reddi et al. 2021, "Adaptive Federated Optimization" (https://arxiv.org/abs/2003.00295), Algorithm 2. With
``Δₜ`` the aggregate of the inner aggregator (the mean client delta, i.e. minus a pseudo-gradient):

    mₜ = β₁ mₜ₋₁ + (1 − β₁) Δₜ
    vₜ = vₜ₋₁ + Δₜ²                                   (FedAdagrad)
    vₜ = β₂ vₜ₋₁ + (1 − β₂) Δₜ²                       (FedAdam)
    vₜ = vₜ₋₁ − (1 − β₂) Δₜ² sign(vₜ₋₁ − Δₜ²)          (FedYogi)
    xₜ₊₁ = xₜ + η mₜ / (√vₜ + τ)

with ``v₋₁ = τ²``. Server momentum (FedAvgM, Hsu et al. 2019, https://arxiv.org/abs/1909.06335) is
``mₜ = β mₜ₋₁ + Δₜ``, ``xₜ₊₁ = xₜ + η mₜ``. One engine, :class:`FedOpt`, runs all four; the named classes are
registered settings of it (the mergekit pattern). The optimizer moments live in an explicit
:class:`ServerOptimizerState`, which can be checkpointed with :meth:`ServerOptimizerState.state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
from deltaplane.aggregation.checkpoint import float_shapes, layout_difference
from deltaplane.delta import Delta, check_compatible
from deltaplane.errors import ConfigError, InvalidUpdate, ShapeMismatch

if TYPE_CHECKING:
    from deltaplane.codecs.layout import TensorLayout

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedOpt", "FedYogi", "ServerOptimizerState", "ServerSGD"]

OPTIMIZERS = ("adam", "yogi", "adagrad", "momentum")
#: the largest magnitude an update may carry into an optimizer that squares the mean delta (adam, yogi,
#: adagrad): Δ² is computed in float64, whose largest value (≈1.8e308) is exceeded from |Δ| ≈ 1.34e154 on, so
#: ``v`` became inf, the coordinate froze (``m / (√v + τ)`` = 0 for good) and the next snapshot was refused at
#: restore ("v holds NaN or Inf"). 2^500 ≈ 3.3e150 leaves Δ² ≤ 2^1000, so even FedAdagrad's ever-growing
#: sum of squares stays finite for 2^23 rounds of such updates; float32 updates (at most ≈3.4e38) never reach it.
MAX_SQUARED_MAGNITUDE = 2.0**500


@dataclass
class ServerOptimizerState:
    """Server optimizer moments (float64, one tensor per parameter) and the number of steps taken."""

    step: int = 0
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: ``m.<name>``, ``v.<name>`` and ``step``."""
        out = {f"m.{k}": t for k, t in self.m.items()} | {f"v.{k}": t for k, t in self.v.items()}
        return out | {"step": torch.tensor(self.step, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> ServerOptimizerState:
        """Inverse of :meth:`state_dict`.

        Raises:
            ConfigError: ``sd`` is not such a state (see :meth:`check_state`).
        """
        step = sd.get("step")
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point()):
            raise ConfigError(f"server optimizer state: 'step' must be one integer tensor. Found {step!r}")
        m = {k[2:]: t for k, t in sd.items() if k.startswith("m.")}
        v = {k[2:]: t for k, t in sd.items() if k.startswith("v.")}
        state = cls(step=int(step), m=m, v=v)
        state.check_state()
        return state

    def check_state(self) -> None:
        """Refuse moments that no run of :class:`FedOpt` produces (a corrupted or hand-made checkpoint): a NaN
        moment or a negative ``v`` released a NaN update (``√v``), and a ``v`` of another shape than ``m`` was
        silently broadcast. Moments are finite float64 tensors, ``v ≥ 0``, and ``v`` (when kept) has ``m``'s
        names and shapes.

        Raises:
            ConfigError: naming the tensor.
        """
        if isinstance(self.step, bool) or not (isinstance(self.step, int) and self.step >= 0):
            raise ConfigError(
                f"server optimizer state: step must be a non-negative integer. Found {self.step!r}"
            )
        for name, moments in (("m", self.m), ("v", self.v)):
            if not isinstance(moments, dict):
                raise ConfigError(f"server optimizer state: {name} must be a dict of tensors")
            for k, t in moments.items():
                if not (isinstance(t, torch.Tensor) and t.dtype == torch.float64):
                    raise ConfigError(f"server optimizer state: {name}[{k!r}] must be a float64 tensor")
                if not bool(torch.isfinite(t).all()):
                    raise ConfigError(f"server optimizer state: {name}[{k!r}] holds NaN or Inf")
                if name == "v" and bool((t < 0).any()):
                    raise ConfigError(f"server optimizer state: v[{k!r}] is negative somewhere")
        if self.v:
            try:
                check_compatible(self.m, self.v, "server optimizer moments m and v")
            except ShapeMismatch as exc:
                raise ConfigError(f"server optimizer state: {exc}") from None

    def check_layout(self, layout: Mapping[str, TensorLayout]) -> None:
        """Refuse moments of another model: kept moments must be those of ``layout``'s floating-point tensors,
        by name and shape (moments are kept for every float tensor of the round's update from the first round
        on). Without this check a snapshot of another model loaded, and the mismatch surfaced only as a
        ShapeMismatch at the next round's close, after a round of client training.

        Raises:
            ConfigError: naming the first tensor that differs.
        """
        floats = float_shapes(layout)
        for name, moments in (("m", self.m), ("v", self.v)):
            if not moments:
                continue  # a fresh state (no round taken yet) fits any model
            problem = layout_difference(_shapes(moments), floats)
            if problem:
                raise ConfigError(
                    f"server optimizer state: {name}{problem}: the snapshot's moments belong to another model; "
                    "restore a snapshot taken from a run of this model"
                )


def _shapes(moments: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in moments.items()}


def _check(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and math.isfinite(value) and (value > lo if lo_open else value >= lo)
    if not ok or value > hi:
        raise ConfigError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}]. Found {value!r}")


class FedOpt(AggregatorWrapper):
    """Adaptive server optimizer on top of an inner aggregator (FedAvg by default).

    Args:
        inner: aggregator producing the round's mean delta ``Δₜ``.
        optimizer: ``"adam"``, ``"yogi"``, ``"adagrad"`` or ``"momentum"``.
        lr: server learning rate ``η``.
        beta1: first-moment decay ``β₁`` (the momentum ``β`` for ``"momentum"``).
        beta2: second-moment decay ``β₂`` (adam, yogi).
        tau: adaptivity ``τ``; also ``√v₋₁``.
        state: server optimizer state to resume from; fresh when None.

    The result is the server update to add to the global model (``x + result``).
    """

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        optimizer: str = "adam",
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        state: ServerOptimizerState | None = None,
    ) -> None:
        from deltaplane.aggregation.fedavg import FedAvg

        super().__init__(inner if inner is not None else FedAvg())
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}. Found {optimizer!r}")
        _check("lr", lr, 0.0, math.inf, lo_open=True)
        _check("beta1", beta1, 0.0, 1.0)
        _check("beta2", beta2, 0.0, 1.0)
        _check("tau", tau, 0.0, math.inf, lo_open=True)
        self.optimizer = optimizer
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        if state is not None:
            state.check_state()
        self.state = state if state is not None else ServerOptimizerState()

    def add(self, delta: Delta, weight: float = 1.0) -> bool | None:
        """Fold ``delta`` into the inner aggregator, refusing first a float64 update the second moment would
        overflow on (see :data:`MAX_SQUARED_MAGNITUDE`): :class:`~deltaplane.aggregation.Validate` skips it and
        the round goes on with the others.

        Raises:
            InvalidUpdate: a float64 tensor holds a value beyond ±2^500 (adam, yogi, adagrad).
        """
        if self.optimizer != "momentum":
            for k, t in delta.items():
                if t.dtype == torch.float64 and t.numel() and float(t.abs().max()) > MAX_SQUARED_MAGNITUDE:
                    raise InvalidUpdate(
                        f"tensor '{k}' holds values beyond ±2^500 (≈3.3e150): {type(self).__name__} squares the "
                        "mean update in float64, which would overflow its second moment to inf (the coordinate "
                        "would stop learning and the server state could not be restored); refusing the update"
                    )
        return super().add(delta, weight)

    def _finish(self) -> Delta:
        delta = self.inner.result()
        s = self.state
        if s.m or s.v:
            floats = float_shapes(delta)
            # (a v of another shape than the delta was broadcast: a silently wrong step)
            for name, moments in (("m", s.m), ("v", s.v)):
                problem = layout_difference(_shapes(moments), floats) if moments else ""
                if problem:  # restored from another model's snapshot without the model's layout at hand
                    raise ShapeMismatch(
                        f"server optimizer state: {name}{problem} in this round's update: the optimizer's "
                        "moments belong to another model (a snapshot of another model's run restored?)"
                    )
        out: dict[str, torch.Tensor] = {}
        new_m: dict[str, torch.Tensor] = {}
        new_v: dict[str, torch.Tensor] = {}
        b1, b2 = self.beta1, self.beta2
        for k, t in delta.items():
            if not t.is_floating_point():
                out[k] = t
                continue
            d = t.double()
            m = s.m.get(k)
            if m is None:
                m = torch.zeros_like(d)
            if self.optimizer == "momentum":
                m = b1 * m + d
                out[k] = (self.lr * m).to(t.dtype)
                new_m[k] = m
                continue
            m = b1 * m + (1 - b1) * d
            v = s.v.get(k)
            if v is None:
                v = torch.full_like(d, self.tau**2)
            d2 = d * d
            if self.optimizer == "adagrad":
                v = v + d2
            elif self.optimizer == "adam":
                v = b2 * v + (1 - b2) * d2
            else:  # yogi: additive, sign-controlled update of v
                v = v - (1 - b2) * d2 * torch.sign(v - d2)
            new_m[k], new_v[k] = m, v
            out[k] = (self.lr * m / (v.sqrt() + self.tau)).to(t.dtype)
        # the moments are committed only when finite: an overflowed v froze its coordinate for good and made
        # every later snapshot unrestorable (an aggregate the per-update bound in add() did not see: a chain
        # fed directly, or an inner rule that scales its result up)
        for name, moments in (("m", new_m), ("v", new_v)):
            for k, t in moments.items():
                if not bool(torch.isfinite(t).all()):
                    raise InvalidUpdate(
                        f"the round's mean update overflows {type(self).__name__}'s moment {name}[{k!r}] in float64 "
                        "(its square or running sum passes ≈1.8e308): the round is refused and the optimizer state left as "
                        "it was; check the clients' updates (Validate(max_norm=...) refuses outsized ones)"
                    )
        s.m.update(new_m)
        s.v.update(new_v)
        s.step += 1
        result = Delta(out)
        self._own = {"server_step": float(s.step), "server_update_norm": result.norm()}
        return result

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.inner!r}, optimizer={self.optimizer!r}, lr={self.lr!r}, "
            f"beta1={self.beta1!r}, beta2={self.beta2!r}, tau={self.tau!r})"
        )


class _TwoMomentFedOpt(FedOpt):
    """A FedOpt setting with both moments (``β₁``, ``β₂``) as parameters; a subclass names its ``_optimizer``."""

    _optimizer: ClassVar[str]

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        state: ServerOptimizerState | None = None,
    ) -> None:
        super().__init__(
            inner, optimizer=self._optimizer, lr=lr, beta1=beta1, beta2=beta2, tau=tau, state=state
        )


class FedAdam(_TwoMomentFedOpt):
    """FedAdam (Reddi et al. 2021, https://arxiv.org/abs/2003.00295)."""

    _optimizer = "adam"


class FedYogi(_TwoMomentFedOpt):
    """FedYogi (Reddi et al. 2021, https://arxiv.org/abs/2003.00295)."""

    _optimizer = "yogi"


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al. 2021, https://arxiv.org/abs/2003.00295)."""

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        lr: float = 1e-2,
        beta1: float = 0.0,
        tau: float = 1e-3,
        state: ServerOptimizerState | None = None,
    ) -> None:
        super().__init__(inner, optimizer="adagrad", lr=lr, beta1=beta1, beta2=0.0, tau=tau, state=state)


class FedAvgM(FedOpt):
    """FedAvg with server momentum (Hsu et al. 2019, https://arxiv.org/abs/1909.06335)."""

    def __init__(
        self,
        inner: Aggregator | None = None,
        *,
        lr: float = 1.0,
        momentum: float = 0.9,
        state: ServerOptimizerState | None = None,
    ) -> None:
        super().__init__(inner, optimizer="momentum", lr=lr, beta1=momentum, state=state)
        self.momentum = momentum


class ServerSGD(AggregatorWrapper):
    """Plain server SGD: ``x ← x + η·Δₜ``, FedAvg's server learning rate (Reddi et al. 2021, Alg. 1 with
    ``ServerOpt = SGD``).

    The server step of every driver applies it as one link of the chain (``build_aggregator(server_lr=η)``),
    so ``server_lr`` means the same everywhere; FedAdam, FedYogi, FedAdagrad and FedAvgM have their own ``lr``.
    ``η = 1`` returns the inner result untouched (bit for bit).
    """

    def __init__(self, inner: Aggregator | None = None, *, lr: float = 1.0) -> None:
        from deltaplane.aggregation.fedavg import FedAvg

        super().__init__(inner if inner is not None else FedAvg())
        _check("lr", lr, 0.0, math.inf, lo_open=True)
        self.lr = lr

    def _finish(self) -> Delta:
        delta = self.inner.result()
        return delta if self.lr == 1.0 else delta * self.lr

    def __repr__(self) -> str:
        return f"ServerSGD({self.inner!r}, lr={self.lr!r})"

"""Aggregating LoRA updates: why averaging factors is biased, and the re-factorizing aggregator that is not.

Devices training a LoRA upload the change of their factors. Three ways to combine them (``pᵢ`` the weights):

- **FedIT** (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction Tuning",
  https://arxiv.org/abs/2305.05644): plain FedAvg on the factors, ``Ā = Σ pᵢAᵢ``, ``B̄ = Σ pᵢBᵢ``. The model the
  server ends up with is ``B̄Ā``, which is *not* the average of the devices' changes ``Σ pᵢ BᵢAᵢ``: the
  difference ``Σᵢ pᵢ(Bᵢ − B̄)(Aᵢ − Ā)`` (a covariance of the factors) grows as devices drift apart — the
  documented bias of FedIT (:func:`fedit_bias` measures it). Any :class:`~deltaplane.aggregation.FedAvg` chain
  over :meth:`LoRADelta.factors` computes it; no special aggregator is needed.
- **FFA-LoRA** (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning",
  https://arxiv.org/abs/2403.12313): ``A`` is frozen at its shared random initialization, only ``B`` trains, so
  ``Σ pᵢ BᵢA = (Σ pᵢBᵢ) A``: FedAvg of ``B`` is *exactly* the average change, and the update is linear in the
  trained parameters (clipping and DP noise act on what is averaged). A task option (freeze ``A``), plain FedAvg.
- **Stacking / re-factorizing** (:class:`LoRARefactor`): the server forms the exact average change
  ``ΔW̄ = Σ pᵢ BᵢAᵢ`` (stacking ``[B₁ … Bₙ]`` against ``[A₁; …; Aₙ]`` is the same product) and factors it again
  by a truncated SVD to the adapter's rank, ``B = U_r Σ_r^½``, ``A = Σ_r^½ V_rᵀ``: exact up to the rank-r
  truncation (the best rank-r approximation of the true average), at a server-side SVD per layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from deltaplane.aggregation.base import Aggregator, AggregatorWrapper
from deltaplane.aggregation.fedavg import FedAvg
from deltaplane.delta import Delta, StateDict
from deltaplane.errors import AdapterMismatch, ConfigError, InvalidUpdate

__all__ = ["LoRARefactor", "factor_pairs", "fedit_bias"]


#: PEFT's names of a layer's factors: linear layers, and embeddings (``ΔW = (B A)ᵀ``: the same product to average)
_FACTOR_NAMES = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def factor_pairs(names: list[str] | Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """``layer → (A name, B name)`` for every ``…lora_A…`` / ``…lora_B…`` (or ``…lora_embedding_A…`` /
    ``…lora_embedding_B…``) pair among ``names`` (PEFT's names)."""
    keys = list(names)
    pairs = {}
    for k in keys:
        for a, b in _FACTOR_NAMES:
            if a in k:
                kb = k.replace(a, b)
                if kb not in keys:
                    raise AdapterMismatch(f"factor '{k}' has no matching '{kb}'")
                pairs[k.replace("." + a, "")] = (k, kb)
    return pairs


def fedit_bias(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> float:
    """Relative error ``‖B̄Ā − Σ pᵢBᵢAᵢ‖ / ‖Σ pᵢBᵢAᵢ‖`` of averaging factors separately (FedIT) for one layer."""
    p = torch.tensor(weights, dtype=torch.float64)
    p = p / p.sum()
    exact = sum(w * B.double() @ A.double() for w, A, B in zip(p, As, Bs, strict=True))
    fedit = sum(w * B.double() for w, B in zip(p, Bs, strict=True)) @ sum(
        w * A.double() for w, A in zip(p, As, strict=True)
    )
    return float((fedit - exact).norm() / exact.norm())


class LoRARefactor(AggregatorWrapper):
    """Aggregate LoRA factor updates exactly: average the products ``BᵢAᵢ``, re-factor to the rank by SVD.

    Wraps the aggregator of every other tensor (a classification head, or nothing): updates are factor deltas
    ``(ΔAᵢ, ΔBᵢ)`` relative to the current global factors, which this aggregator tracks itself — it starts from
    ``initial`` and moves by each round's result — so the downlink must deliver the result exactly (an exact
    downlink codec, as by default). Memory: one ``out × in`` accumulator per adapted layer.

    The factors never reach ``inner``, so ``inner`` must be a plain :class:`~deltaplane.aggregation.FedAvg`: a
    clipping, DP, robust or server-optimizer aggregator there would act on the other tensors only, and the adapter
    would silently escape it (refused). Anything outside this wrapper must leave its result unchanged
    (:class:`~deltaplane.aggregation.validation.Validate` does; a server optimizer would not, and the factors
    tracked here would no longer be the server's).

    Args:
        inner: aggregates the tensors that are not LoRA factors: a :class:`~deltaplane.aggregation.FedAvg`.
        initial: the global state at version 0 (its factor names define the adapted layers).

    Raises:
        ConfigError: ``inner`` is not a FedAvg, or ``initial`` holds no factor pair.
    """

    def __init__(self, inner: Aggregator, initial: StateDict) -> None:
        if not isinstance(inner, FedAvg):
            raise ConfigError(
                f"LoRARefactor: inner must be a plain FedAvg, not {type(inner).__name__}: LoRARefactor averages the "
                "factors' products itself and hands its inner aggregator only the other tensors, so clipping, DP "
                "noise, a robust rule or a server optimizer there would not touch the adapter; use "
                "LoRARefactor(FedAvg(), initial)"
            )
        super().__init__(inner)
        self.pairs = factor_pairs(initial)
        if not self.pairs:
            raise ConfigError("LoRARefactor needs a state with lora_A / lora_B factors")
        self.factors = {k: initial[k].detach().clone() for pair in self.pairs.values() for k in pair}
        self._sum: dict[str, Tensor] = {}
        self._weight = 0.0
        self._rest = False

    def add(self, delta: Delta, weight: float = 1.0) -> None:
        factor_keys = set(self.factors)
        self._check(delta, weight)  # a bad update is refused here, before it is in the round's running sum
        for layer, (ka, kb) in self.pairs.items():
            A = (self.factors[ka] + delta[ka]).double()
            B = (self.factors[kb] + delta[kb]).double()
            prod = weight * (B @ A)
            self._sum[layer] = self._sum[layer].add_(prod) if layer in self._sum else prod
        self._weight += weight
        rest = {k: v for k, v in delta.items() if k not in factor_keys}
        if rest:
            self.inner.add(Delta(rest), weight)
            self._rest = True

    def _check(self, delta: Delta, weight: float) -> None:
        """:class:`InvalidUpdate` / :class:`AdapterMismatch` naming the tensor for an update that cannot be summed."""
        if not math.isfinite(weight) or weight < 0:
            raise InvalidUpdate(f"LoRARefactor: an update's weight must be finite and ≥ 0. Found {weight}")
        for key, current in self.factors.items():
            if key not in delta:
                raise AdapterMismatch(f"LoRARefactor: the update has no factor {key!r}")
            got = delta[key]
            if tuple(got.shape) != tuple(current.shape):
                raise AdapterMismatch(
                    f"LoRARefactor: factor {key!r} has shape {tuple(got.shape)}, the adapter's is "
                    f"{tuple(current.shape)} (another rank or layer)"
                )
            if not bool(torch.isfinite(got).all()):
                raise InvalidUpdate(f"LoRARefactor: factor {key!r} holds NaN or Inf values")

    def _finish(self) -> Delta:
        if self._weight <= 0:
            raise ConfigError("LoRARefactor: no update with positive weight this round")
        out: dict[str, Tensor] = {}
        residual = 0.0
        for layer, (ka, kb) in self.pairs.items():
            mean = self._sum[layer] / self._weight
            u, s, vh = torch.linalg.svd(mean, full_matrices=False)
            # a rank above min(out, in) (PEFT allows it) keeps its shape: the extra factor rows stay zero
            k = min(self.factors[ka].shape[0], s.numel())
            root = s[:k].sqrt()
            A_new, B_new = torch.zeros_like(self.factors[ka]), torch.zeros_like(self.factors[kb])
            A_new[:k] = root[:, None] * vh[:k]
            B_new[:, :k] = u[:, :k] * root[None, :]
            residual = max(residual, float(s[k:].norm() / s.norm()) if s.norm() > 0 else 0.0)
            out[ka] = A_new - self.factors[ka]
            out[kb] = B_new - self.factors[kb]
            self.factors[ka], self.factors[kb] = A_new, B_new
        self._own = {"lora_truncation": residual}
        if self._rest:
            out.update(self.inner.result())
        return Delta(out)

    def reset(self) -> None:
        super().reset()
        self._sum = {}
        self._weight = 0.0
        self._rest = False

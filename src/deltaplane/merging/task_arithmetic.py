"""Generalized task arithmetic: one engine, registered under five paper names.

Pipeline per tensor (the same as mergekit's ``GeneralizedTaskArithmeticMerge``)::

    τᵢ = θᵢ − θ₀                                  task vectors
    τ̂ᵢ = sparsify(τᵢ, densityᵢ)                   none | magnitude top-k | random drop (DARE) | outlier-trim
    τ̂ᵢ ← wᵢ · τ̂ᵢ                                  per-model weight
    mᵢ = [sgn(τ̂ᵢ) = γ],  γ = sgn(Σᵢ τ̂ᵢ)            sign consensus (TIES), else mᵢ = 1
    τ = Σᵢ mᵢ τ̂ᵢ  /  (Σᵢ mᵢ wᵢ  if normalize)       (disjoint) mean or sum
    θ = θ₀ + λ · τ

Registered settings (name: sparsification, consensus, normalize default, rescale default):

- ``task_arithmetic`` — none, none, False, False. Ilharco et al. 2022, "Editing Models with Task Arithmetic",
  https://arxiv.org/abs/2212.04089: ``θ = θ₀ + λ Σᵢ wᵢ τᵢ``.
- ``ties`` — magnitude, sum, True, False. Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
  Models", https://arxiv.org/abs/2306.01708: trim to the top-k% magnitudes, elect the sign of the summed
  trimmed vectors, average only the agreeing entries (disjoint mean).
- ``dare_linear`` — random, none, False, True; ``dare_ties`` — random, sum, False, True. Yu et al. 2023,
  "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
  https://arxiv.org/abs/2311.03099: drop each entry with probability ``1 − density`` and rescale the survivors
  by ``1 / density`` so the expected task vector is unchanged.
- ``breadcrumbs`` (and ``breadcrumbs_ties``) — outlier trim, none (sum), False, False. Davari & Belilovsky 2023,
  "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", https://arxiv.org/abs/2312.06795:
  drop the largest ``gamma`` fraction (outliers) and the smallest entries, keeping ``density`` of them.

Rescaling follows the DARE paper (``÷ density``); recent mergekit versions instead match the L1 norm of the
unmasked vector, which gives different numbers for the same config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaplane.errors import ConfigError
from deltaplane.merging.base import (
    MergeMethod,
    MergeParams,
    Param,
    in_unit_interval,
    non_negative,
    register_method,
    tensor_generator,
)

__all__ = ["SPARSIFIERS", "GeneralizedTaskArithmetic", "sign_consensus_mask", "sparsify"]


def _keep_count(numel: int, density: float) -> int:
    # at least one entry survives in a non-empty tensor: a positive density never erases a whole tensor
    return max(1, int(density * numel)) if numel else 0


def largest_indices(a: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of the flat tensor ``a`` — exactly ``torch.topk``'s set (ties aside).

    ``topk`` over tens of millions of values dominates a TIES merge. For large tensors a fixed-seed sample of
    65,536 values brackets the k-th largest value in a narrow band ``[lo, hi]``; every entry above ``hi`` is then
    certainly kept, and ``topk`` runs only on the band to pick the rest. If the sample's bracket misses (it can
    only make the band too narrow), the plain ``topk`` runs instead, so the result is always exact.
    """
    n = a.numel()
    if k >= n:
        return torch.arange(n)
    if n >= 1 << 20 and k > 0:
        g = torch.Generator().manual_seed(n)
        sample = a[torch.randint(n, (1 << 16,), generator=g)]
        m = sample.numel()
        q = 1 - k / n  # the k-th largest sits at this quantile
        lo = torch.kthvalue(sample, max(1, int((q - 0.01) * m))).values
        hi = torch.kthvalue(sample, min(m, int((q + 0.01) * m) + 1)).values
        above = (a > hi).nonzero().squeeze(1)  # at most k of them → all belong to the top k
        if above.numel() <= k:
            band = ((a >= lo) & (a <= hi)).nonzero().squeeze(1)
            need = k - above.numel()
            if band.numel() >= need:  # the rest of the top k lies in the band
                return torch.cat([above, band[torch.topk(a[band], need, sorted=False).indices]])
    return torch.topk(a, k, sorted=False).indices


def magnitude_mask(tau: Tensor, density: float, gamma: float, generator: torch.Generator) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest ``|τ|`` (TIES "trim")."""
    k = _keep_count(tau.numel(), density)
    mask = torch.zeros(tau.numel(), dtype=torch.bool)
    mask[largest_indices(tau.abs().reshape(-1), k)] = True
    return mask.reshape(tau.shape)


def random_mask(tau: Tensor, density: float, gamma: float, generator: torch.Generator) -> Tensor:
    """Keep each entry independently with probability ``density`` (DARE "drop")."""
    return torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density


def outlier_mask(tau: Tensor, density: float, gamma: float, generator: torch.Generator) -> Tensor:
    """Drop the top ``gamma`` fraction by ``|τ|`` and the smallest entries, keeping ``density`` (Breadcrumbs).

    Equivalent to sorting ``|τ|`` ascending and keeping ranks ``[n − keep − top, n − top)``, done with two
    top-k selections instead of a full sort.
    """
    n = tau.numel()
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)  # outlier removal shrinks if it would undercut the density
    a = tau.abs().reshape(-1)
    mask = torch.zeros(n, dtype=torch.bool)
    if keep == 0:
        return mask.reshape(tau.shape)
    mask[largest_indices(a, keep + n_top)] = True
    if n_top:
        mask[largest_indices(a, n_top)] = False
    return mask.reshape(tau.shape)


SPARSIFIERS = {"magnitude": magnitude_mask, "random": random_mask, "outliers": outlier_mask}


def sparsify(
    tau: Tensor,
    *,
    method: str,
    density: float,
    rescale: bool = False,
    gamma: float = 0.0,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> Tensor:
    """Zero all but a ``density`` fraction of ``tau`` chosen by ``method``; divide survivors by ``density`` if
    ``rescale`` (DARE's unbiased rescaling). With ``inplace`` ``tau`` itself is modified and returned."""
    if density >= 1:
        return tau
    mask = SPARSIFIERS[method](tau, density, gamma, generator or torch.Generator().manual_seed(0))
    out = tau.mul_(mask) if inplace else tau * mask
    return out.div_(density) if rescale else out


def sign_consensus_mask(weighted: Tensor, method: str = "sum") -> Tensor:
    """TIES sign election over stacked task vectors ``(N, ...)``: ``True`` where an entry agrees with the elected
    sign. ``"sum"``: γ = sgn(Σᵢ τ̂ᵢ) (mass-weighted, as in the paper); ``"count"``: majority of signs. A tie
    elects ``+``."""
    signs = weighted.sign()
    total = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)
    return signs == elected


class GeneralizedTaskArithmetic(MergeMethod):
    """The task-vector merge pipeline; a paper is a setting of it (see the module docstring).

    Args:
        name: registry name.
        sparsification: ``None``, ``"magnitude"``, ``"random"`` or ``"outliers"``.
        consensus: ``None``, ``"sum"`` or ``"count"``.
        default_normalize: divide by the (agreeing) weight sum unless the config says otherwise.
        default_rescale: divide sparsified vectors by their density unless the config says otherwise.
        paper, url: the reference.
    """

    needs_base = True

    def __init__(
        self,
        *,
        name: str,
        sparsification: str | None,
        consensus: str | None,
        default_normalize: bool,
        default_rescale: bool,
        paper: str,
        url: str,
    ) -> None:
        if sparsification not in (None, *SPARSIFIERS):
            raise ConfigError(
                f"sparsification must be one of None, {sorted(SPARSIFIERS)}. Found {sparsification!r}"
            )
        if consensus not in (None, "sum", "count"):
            raise ConfigError(f"consensus must be None, 'sum' or 'count'. Found {consensus!r}")
        self.name = name
        self.sparsification = sparsification
        self.consensus = consensus
        self.default_normalize = default_normalize
        self.default_rescale = default_rescale
        self.paper = paper
        self.url = url
        params = [
            Param("lambda", 1.0, doc="scale of the merged task vector"),
            Param("normalize", default_normalize, kind="bool", doc="divide by the sum of (agreeing) weights"),
            Param("weight", 1.0, per_model=True, plural="weights", doc="weight of this model's task vector"),
        ]
        if sparsification is not None:
            params += [
                Param("rescale", default_rescale, kind="bool", doc="divide kept entries by the density"),
                Param(
                    "density", 1.0, per_model=True, plural="densities", check=in_unit_interval,
                    doc="fraction of task-vector entries kept",
                ),
            ]  # fmt: skip
        if sparsification == "random":
            params.append(Param("seed", 0, kind="int", doc="seed of the random drop masks"))
        if sparsification == "outliers":
            params.append(
                Param("gamma", 0.01, per_model=True, plural="gammas", check=non_negative,
                      doc="fraction of largest-magnitude entries dropped as outliers")
            )  # fmt: skip
        self.params = tuple(params)

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], params: MergeParams
    ) -> Tensor:
        assert base is not None  # needs_base is enforced before any tensor is read
        weights = params.column("weight")
        # Each input becomes its task vector in place (the inputs are owned by the merge): peak memory is the
        # inputs plus about three tensors of scratch, not a stacked (N, ...) copy of everything.
        taus = list(tensors)
        for i, tau in enumerate(taus):
            tau.sub_(base)
            if self.sparsification is not None:
                mp = params.per_model[i]
                sparsify(
                    tau,
                    method=self.sparsification,
                    density=mp["density"],
                    rescale=params.shared["rescale"],
                    gamma=mp.get("gamma", 0.0),
                    generator=tensor_generator(params.shared.get("seed", 0), name, i),
                    inplace=True,
                )
            if weights[i] != 1:
                tau.mul_(weights[i])
        normalize = params.shared["normalize"]
        divisor: Tensor | None = None
        if self.consensus is not None:
            votes = torch.zeros_like(base)
            for tau in taus:
                votes.add_(tau if self.consensus == "sum" else tau.sign())
            positive = votes >= 0  # elected sign γ (a tie elects +)
            del votes
            divisor = torch.zeros_like(base) if normalize else None
            for w, tau in zip(weights, taus, strict=True):
                agree = torch.where(positive, tau > 0, tau < 0)  # sgn(τ̂ᵢ) = γ; zeros never agree
                tau.mul_(agree)
                if divisor is not None:
                    divisor.add_(agree.to(base.dtype), alpha=w)
                del agree
            if divisor is not None:
                divisor.masked_fill_(divisor == 0, 1)  # no model agrees → merged entry is 0 anyway
        elif normalize:
            total = sum(weights)
            divisor = torch.tensor(total if abs(total) >= 1e-12 else 1.0, dtype=base.dtype)
        merged = taus[0]  # accumulate into the first task vector: no extra tensor
        for tau in taus[1:]:
            merged.add_(tau)
        del taus
        if divisor is not None:
            merged.div_(divisor)
        lam = params.shared["lambda"]
        if lam != 1:
            merged.mul_(lam)
        return merged.add_(base)


for _spec in (
    dict(name="task_arithmetic", sparsification=None, consensus=None, default_normalize=False,
         default_rescale=False, paper="Ilharco et al. 2022, Editing Models with Task Arithmetic",
         url="https://arxiv.org/abs/2212.04089"),
    dict(name="ties", sparsification="magnitude", consensus="sum", default_normalize=True, default_rescale=False,
         paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
         url="https://arxiv.org/abs/2306.01708"),
    dict(name="dare_linear", sparsification="random", consensus=None, default_normalize=False,
         default_rescale=True, paper="Yu et al. 2023, Language Models are Super Mario (DARE)",
         url="https://arxiv.org/abs/2311.03099"),
    dict(name="dare_ties", sparsification="random", consensus="sum", default_normalize=False,
         default_rescale=True, paper="Yu et al. 2023, Language Models are Super Mario (DARE) + TIES sign consensus",
         url="https://arxiv.org/abs/2311.03099"),
    dict(name="breadcrumbs", sparsification="outliers", consensus=None, default_normalize=False,
         default_rescale=False, paper="Davari & Belilovsky 2023, Model Breadcrumbs",
         url="https://arxiv.org/abs/2312.06795"),
    dict(name="breadcrumbs_ties", sparsification="outliers", consensus="sum", default_normalize=False,
         default_rescale=False, paper="Davari & Belilovsky 2023, Model Breadcrumbs + TIES sign consensus",
         url="https://arxiv.org/abs/2312.06795"),
):  # fmt: skip
    register_method(GeneralizedTaskArithmetic(**_spec), replace=True)

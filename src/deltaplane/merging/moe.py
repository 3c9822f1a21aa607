"""Mixture of experts: keep K fine-tuned experts of one base and route each input to its top-k experts.

When merging loses too much (tasks that pull weights in opposite directions), the alternative is not to merge:
a small learned router reads the input's features and sends each example to the expert (top-1) or the two
experts (top-2) that fit it, as in sparsely-gated MoE (Shazeer et al. 2017, "Outrageously Large Neural
Networks: The Sparsely-Gated Mixture-of-Experts Layer", https://arxiv.org/abs/1701.06538) applied at the level of
whole fine-tuned models ("model-level MoE", cf. Komatsuzaki et al. 2022, https://arxiv.org/abs/2212.05055 for
building experts from one base). Only the selected experts run for each example.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from deltaplane.delta import Delta, StateDict
from deltaplane.errors import ConfigError, ShapeMismatch
from deltaplane.seeding import seeded_global_generators, seeded_random_layers

__all__ = ["MixtureOfExperts", "Router"]


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)  # unlike reshape(B, -1), also defined for an empty batch


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_labels(labels: Tensor, name: str, n: int, classes: int, what: str) -> None:
    """Raise :class:`ConfigError` unless ``labels`` are ``n`` integer indices in ``[0, classes)``."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ConfigError(f"{name} must be integer {what} indices. Found dtype {labels.dtype}")
    if labels.dim() == 0 or labels.shape[0] != n:
        raise ConfigError(f"{name} has {labels.shape[0] if labels.dim() else 0} labels for {n} examples")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ConfigError(
            f"{name} must be {what} indices in [0, {classes}). Found {int(labels.min())}..{int(labels.max())}"
        )


def _same_outputs(outputs: Sequence[Tensor], experts: Sequence[int]) -> None:
    """Raise :class:`ShapeMismatch` unless every expert's output has the first one's per-example shape."""
    first = tuple(outputs[0].shape[1:])
    for out, e in zip(outputs[1:], experts[1:], strict=True):
        if tuple(out.shape[1:]) != first:
            raise ShapeMismatch(
                f"expert {e} gives outputs of shape {tuple(out.shape[1:])}, expert {experts[0]} {first}; "
                "a mixture needs experts with the same output shape"
            )


def _reset_router(router: nn.Module, g: torch.Generator) -> None:
    """Re-initialise ``router`` from ``g`` alone: linear layers uniform in ±1/√fan_in with zero biases, any
    other layer by its own ``reset_parameters`` (a LayerNorm's weight back to 1) under a global RNG seeded from
    ``g``, so the result depends on the seed only; parameters of neither kind as a linear layer's."""
    done: set[int] = set()
    with torch.no_grad():
        for module in router.modules():
            own = list(module.parameters(recurse=False))
            if not own or isinstance(module, nn.Linear):
                continue
            reset = getattr(
                module, "reset_parameters", None
            )  # a method, not nn.Module's Tensor | Module attribute
            if callable(reset):
                # the CPU generator and, once CUDA is in use, every CUDA device's: seeded, then restored (it
                # was torch.manual_seed, which seeded every CUDA device, or queued the seed before CUDA's
                # start, and restored only the devices of this module's parameters)
                with seeded_global_generators(int(torch.randint(2**62, (1,), generator=g))):
                    reset()
                done.update(id(p) for p in own)
        for p in router.parameters():
            if id(p) in done:
                continue
            if p.dim() > 1:
                bound = 1 / p.shape[1] ** 0.5
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
            else:
                p.zero_()


class Router(nn.Module):
    """Gating network: input features ``(B, F)`` → expert logits ``(B, K)`` through one hidden layer."""

    def __init__(self, *, in_features: int, n_experts: int, hidden: int = 64) -> None:
        super().__init__()
        if in_features <= 0 or n_experts <= 0 or hidden <= 0:
            raise ConfigError(
                f"in_features, n_experts and hidden must be positive. Found {in_features}, {n_experts}, {hidden}"
            )
        self.in_features, self.n_experts, self.hidden = in_features, n_experts, hidden
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_experts))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class MixtureOfExperts(nn.Module):
    """``y = Σ_{e ∈ topk(g(x))} ĝ_e(x) · expert_e(x)`` with ``ĝ`` the router's softmax renormalised over the top-k.

    Args:
        experts: K modules with the same input and output shapes (fine-tunes of one base).
        router: maps ``features(x)`` to K logits; default a :class:`Router` on the flattened input.
        top_k: experts evaluated per example (1 or 2 are typical).
        features: what the router sees; default the flattened input.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deltaplane.merging import MixtureOfExperts
        >>> base = nn.Linear(4, 2)
        >>> experts = [{"weight": torch.eye(2, 4), "bias": torch.zeros(2)},
        ...            {"weight": -torch.eye(2, 4), "bias": torch.zeros(2)}]
        >>> moe = MixtureOfExperts.from_states(base, experts, top_k=1)
        >>> x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        >>> which = (x[:, 0] > 0).long()                  # expert 1 for positive first feature
        >>> _ = moe.fit_router(x, expert_labels=which, epochs=60, lr=0.03, seed=0)
        >>> bool((moe.route(x)[1][:, 0] == which).float().mean() > 0.95)
        True
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        *,
        router: nn.Module | None = None,
        top_k: int = 1,
        features: Callable[[Tensor], Tensor] | None = None,
        in_features: int | None = None,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ConfigError("a mixture needs at least one expert")
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise ConfigError(f"top_k must be an integer. Found {top_k!r}")
        if not 1 <= top_k <= len(experts):
            raise ConfigError(
                f"top_k must be between 1 and the number of experts ({len(experts)}). Found {top_k}"
            )
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.features = features or _flatten
        if router is None:
            if in_features is None:
                raise ConfigError("give a router or in_features (the size of features(x)) to build one")
            router = Router(in_features=in_features, n_experts=len(experts), hidden=hidden)
        self.router = router
        for p in self.experts.parameters():
            p.requires_grad_(False)  # experts are frozen: only the router learns

    @classmethod
    def from_states(
        cls,
        base: nn.Module,
        experts: Sequence[StateDict | Delta],
        *,
        top_k: int = 1,
        features: Callable[[Tensor], Tensor] | None = None,
        in_features: int | None = None,
        hidden: int = 64,
        example_input: Tensor | None = None,
    ) -> MixtureOfExperts:
        """Build a mixture from a base module and each expert's state dict (or :class:`Delta` from the base).

        ``in_features`` defaults to the router input size inferred from ``example_input`` or, for a module
        whose first layer is ``nn.Linear``, from its ``in_features``.
        """
        base_state = base.state_dict()
        modules = []
        for i, e in enumerate(experts):
            state = e.apply(base_state) if isinstance(e, Delta) else e
            m = copy.deepcopy(base)
            try:
                m.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ShapeMismatch(f"expert {i} does not fit the base module: {exc}") from exc
            m.eval()
            modules.append(m)
        if in_features is None:
            feat = features or _flatten
            if example_input is not None:
                in_features = feat(example_input).shape[-1]
            else:
                first = next((mod for mod in base.modules() if isinstance(mod, nn.Linear | nn.Conv2d)), None)
                if isinstance(first, nn.Linear):
                    in_features = first.in_features
                else:
                    raise ConfigError("pass example_input or in_features so the router knows its input size")
        return cls(modules, top_k=top_k, features=features, in_features=in_features, hidden=hidden)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k gate values ``(B, k)`` (summing to 1 per row) and expert indices ``(B, k)``.

        Experts with equal scores are taken in index order (a stable sort: ``topk`` leaves ties to the kernel).
        """
        probs = torch.softmax(self.router(self.features(x)), dim=-1)
        values, index = probs.sort(dim=-1, descending=True, stable=True)
        values, index = values[:, : self.top_k], index[:, : self.top_k]
        return values / values.sum(dim=-1, keepdim=True), index

    def forward(self, x: Tensor) -> Tensor:
        gates, index = self.route(x)
        if (
            x.shape[0] == 0
        ):  # no example routes anywhere: expert 0 on the empty batch gives the output's shape
            return self.experts[0](x)
        out: Tensor | None = None
        first = -1
        for e, expert in enumerate(self.experts):
            hit = index == e  # (B, k)
            rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue  # an expert nobody is routed to costs nothing
            y = expert(x[rows])
            if out is None:
                out, first = torch.zeros((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device), e
            _same_outputs([out, y], [first, e])
            g = (gates[rows] * hit[rows]).sum(dim=-1).reshape(-1, *([1] * (y.dim() - 1)))
            out[rows] += g * y
        assert out is not None  # every row routes to top_k ≥ 1 experts
        return out

    def fit_router(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        expert_labels: Tensor | None = None,
        epochs: int = 100,
        lr: float = 1e-2,
        batch_size: int = 256,
        seed: int = 0,
    ) -> list[float]:
        """Train the router; the experts stay frozen.

        With ``expert_labels`` (which expert each example belongs to, e.g. its domain) the router is trained as a
        classifier of them. Otherwise it learns from the task labels ``y``: the loss is the cross-entropy of the
        dense mixture ``Σₑ gₑ(x) expertₑ(x)`` (experts' outputs computed once), so the router learns to prefer the
        expert that is right for each input.

        The router is re-initialised from ``seed`` first, and the masks of any dropout in it are drawn from
        the same seed (:func:`~deltaplane.seeding.seeded_random_layers`), so the result depends on the data and
        the seed only.

        Returns:
            the mean training loss of each epoch.

        Raises:
            ConfigError: no labels, no examples, labels that are not indices of the experts (``expert_labels``)
                or of the experts' output classes (``y``), one per example; inputs holding NaN or Inf; a
                non-positive or non-integer ``epochs`` / ``batch_size``, a non-positive or non-finite ``lr``.
            ShapeMismatch: experts whose outputs differ in shape.
        """
        if expert_labels is None and y is None:
            raise ConfigError("fit_router needs task labels y or expert_labels")
        if not (_positive_int(epochs) and _positive_int(batch_size) and 0 < lr < math.inf):
            raise ConfigError(
                "epochs and batch_size must be positive integers, lr must be positive and finite. "
                f"Found {epochs!r}, {batch_size!r}, {lr!r}"
            )
        n = x.shape[0]
        if n == 0:
            raise ConfigError("fit_router was given no examples (x is empty)")
        if expert_labels is not None:
            _check_labels(expert_labels, "expert_labels", n, len(self.experts), "expert")
        feats = self.features(x).detach()
        bad = int((~torch.isfinite(feats)).flatten(1).any(dim=1).sum()) if feats.is_floating_point() else 0
        if bad:
            raise ConfigError(f"x holds NaN or Inf in {bad} example(s); drop or fix them before fit_router")
        outputs = None
        if expert_labels is None:
            assert y is not None
            with torch.no_grad():
                each = [e(x) for e in self.experts]
            _same_outputs(each, list(range(len(each))))
            outputs = torch.stack(each, dim=1)  # (N, K, C)
            if not (y.is_floating_point() and y.shape == outputs[:, 0].shape):  # not class probabilities
                _check_labels(y, "y", n, outputs.shape[2], "class")
        g = torch.Generator().manual_seed(seed)
        # a fixed init from the seed makes routing reproducible regardless of global RNG state
        _reset_router(self.router, g)
        opt = torch.optim.Adam(self.router.parameters(), lr=lr)
        losses = []
        # a router's dropout draws from torch's global generator: seeded from this fit's seed, in a fork
        with seeded_random_layers(g):
            self.router.train()
            for _ in range(epochs):
                order = torch.randperm(x.shape[0], generator=g)
                total = 0.0
                for start in range(0, x.shape[0], batch_size):
                    idx = order[start : start + batch_size]
                    logits = self.router(feats[idx])
                    if expert_labels is not None:
                        loss = nn.functional.cross_entropy(logits, expert_labels[idx])
                    else:
                        assert outputs is not None and y is not None
                        gate = torch.softmax(logits, dim=-1).unsqueeze(-1)  # (B, K, 1)
                        loss = nn.functional.cross_entropy((gate * outputs[idx]).sum(dim=1), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * idx.numel()
                losses.append(total / x.shape[0])
        self.router.eval()
        return losses

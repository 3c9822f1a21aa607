"""LoRA adapters as deltas: :class:`LoRADelta` holds the low-rank factors of a change, not the change itself.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685: a frozen
weight ``W`` (out × in) is adapted by ``ΔW = s · B A`` with ``A`` (r × in), ``B`` (out × r) and the scaling
``s = α / r`` (``α / √r`` with rank-stabilized LoRA, Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).
An adapter with r ≪ min(out, in) is ``r (out + in)`` numbers instead of ``out · in``: that is what devices train,
send and store, and what a deployed base model switches between.

:meth:`LoRADelta.materialize` turns the factors into the full :class:`~deltaplane.delta.Delta` every other
subsystem understands; :meth:`LoRADelta.factors` views the factors themselves as a ``Delta`` (so every codec,
aggregator and the wire format work on adapters unchanged) and :meth:`LoRADelta.with_factors` turns such a
``Delta`` back into an adapter. Names follow PEFT: a layer is keyed by the base model's weight name
(``encoder.layer.0.attention.self.query.weight``) and its factors by ``<module>.lora_A.weight`` /
``<module>.lora_B.weight`` (``lora_embedding_A`` / ``lora_embedding_B`` for embeddings), exactly PEFT's
``adapter_model.safetensors`` keys without the ``base_model.model.`` prefix.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from deltaplane.delta import Delta, StateDict, first_non_finite
from deltaplane.errors import AdapterError, AdapterMismatch, InvalidUpdate

__all__ = ["LoRADelta", "LoRALayer", "module_of"]


def module_of(weight_name: str) -> str:
    """The module path of a weight name (``a.b.weight`` → ``a.b``)."""
    return weight_name.removesuffix(".weight")


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """The factors of one adapted weight: ``ΔW = scaling · B A`` (transposed for embeddings / fan-in-fan-out).

    Attributes:
        A: ``(r, in)`` down-projection (``(r, num_embeddings)`` for an embedding).
        B: ``(out, r)`` up-projection (``(embedding_dim, r)`` for an embedding).
        alpha: LoRA's ``α``; the scaling is ``α / r`` (``α / √r`` if ``rslora``).
        rslora: rank-stabilized scaling.
        embedding: PEFT's ``lora_embedding_A/B`` layout, ``ΔW = scaling · (B A)ᵀ`` of shape (num_embeddings, dim).
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2's ``Conv1D``): ``ΔW = scaling · (B A)ᵀ``.
        bias: PEFT's ``lora_B.bias`` (``lora_bias=True``): the layer's bias changes by ``scaling · bias``.
    """

    A: Tensor
    B: Tensor
    alpha: float
    rslora: bool = False
    embedding: bool = False
    fan_in_fan_out: bool = False
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        # ΔW = s·B A is a floating-point product: integer or bool factors would load fine and only fail (untyped,
        # inside torch's matmul) when merged, so they are refused here, where the adapter is built.
        for which, t in (("lora_A", self.A), ("lora_B", self.B), ("lora_B.bias", self.bias)):
            if t is not None and not t.is_floating_point():
                raise AdapterError(f"{which} has dtype {t.dtype}; LoRA factors must be floating point")
        if self.A.dim() != 2 or self.B.dim() != 2:
            raise AdapterMismatch(
                f"LoRA factors must be matrices: A has shape {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise AdapterMismatch(
                f"rank mismatch: A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns "
                f"(A {tuple(self.A.shape)}, B {tuple(self.B.shape)}); both must equal the rank r"
            )
        if self.bias is not None and (self.bias.dim() != 1 or self.bias.shape[0] != self.B.shape[0]):
            raise AdapterMismatch(
                f"lora_B.bias has shape {tuple(self.bias.shape)} but B has {self.B.shape[0]} output rows"
            )
        if self.embedding and self.bias is not None:
            raise AdapterMismatch("an embedding LoRA has no bias")
        if not math.isfinite(self.alpha):
            raise AdapterError(f"lora_alpha must be finite. Found {self.alpha!r}")

    @property
    def rank(self) -> int:
        """The rank ``r``."""
        return int(self.A.shape[0])

    @property
    def scaling(self) -> float:
        """``α / r`` (``α / √r`` with rslora), as PEFT computes it."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    @property
    def transposed(self) -> bool:
        """Whether ``ΔW`` is ``(B A)ᵀ`` rather than ``B A``."""
        return self.embedding or self.fan_in_fan_out

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the adapted weight."""
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (inp, out) if self.transposed else (out, inp)

    def delta_weight(self) -> Tensor:
        """``ΔW``, in the factors' dtype (computed in float32 for half types, like PEFT on CPU)."""
        a, b = self.A, self.B
        half = a.dtype in (torch.float16, torch.bfloat16)
        if half:
            a, b = a.float(), b.float()
        w = b @ a
        if self.transposed:
            w = w.T
        w = w * self.scaling
        return w.to(self.A.dtype) if half else w

    def delta_bias(self) -> Tensor | None:
        """The change of the layer's bias (``scaling · lora_B.bias``), or ``None``."""
        return None if self.bias is None else self.bias * self.scaling

    def numel(self) -> int:
        return self.A.numel() + self.B.numel() + (0 if self.bias is None else self.bias.numel())


def _orientation_hint(name: str, layer: LoRALayer, want: tuple[int, ...]) -> str:
    """What a layer whose shape is the base weight's transposed means: the wrong ``fan_in_fan_out``.

    PEFT decides ``fan_in_fan_out`` per module from its type (True for ``transformers``' ``Conv1D``, which stores
    its weight (in, out) as GPT-2's ``c_attn`` / ``c_proj`` / ``c_fc`` do; False for ``nn.Linear``), whatever the
    config says, but saves one flag per adapter: the last wrapped module's. An adapter on both kinds of layer
    therefore records the wrong flag for some of them. A non-square layer proves it (this message); a square one
    cannot be told from its files (docs/adapters.md)."""
    kind = (
        "(in, out), as transformers' Conv1D does"
        if not layer.fan_in_fan_out
        else "(out, in), as nn.Linear does"
    )
    return (
        f"adapter layer '{name}' has shape {layer.shape} (fan_in_fan_out={layer.fan_in_fan_out}) but the base "
        f"stores that weight transposed, {want}: {kind}. PEFT picks fan_in_fan_out per module type (True for "
        "transformers' Conv1D, False for nn.Linear) and saves only the last module's in adapter_config.json, so "
        "an adapter on both kinds of layer records it wrongly for some; set it per layer with "
        f"lora.replace(layers={{..., '{name}': dataclasses.replace(layer, "
        f"fan_in_fan_out={not layer.fan_in_fan_out})}}), or train one adapter per kind of layer"
    )


class LoRADelta(Mapping[str, LoRALayer]):
    """A LoRA adapter: adapted base-weight name → :class:`LoRALayer`, plus whole tensors saved in full.

    ``modules_to_save`` holds tensors the adapter replaces outright (PEFT's ``modules_to_save``, typically a new
    classification head): their *new values*, keyed by the base tensor name. Materializing turns them into
    ``new − base`` like everything else.

    Example:
        >>> import torch
        >>> from deltaplane.adapters import LoRADelta, LoRALayer
        >>> A, B = torch.ones(1, 3), torch.full((2, 1), 0.5)
        >>> lora = LoRADelta({"fc.weight": LoRALayer(A, B, alpha=2.0)})
        >>> base = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
        >>> lora.materialize(base)["fc.weight"].tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
        >>> sorted(lora.factors())
        ['fc.lora_A.weight', 'fc.lora_B.weight']
    """

    __slots__ = ("_layers", "base_model", "modules_to_save", "task_type")

    def __init__(
        self,
        layers: Mapping[str, LoRALayer],
        *,
        modules_to_save: Mapping[str, Tensor] | None = None,
        base_model: str | None = None,
        task_type: str | None = None,
    ) -> None:
        self._layers: dict[str, LoRALayer] = {}
        for name, layer in layers.items():
            if not isinstance(layer, LoRALayer):
                raise TypeError(
                    f"LoRADelta value for '{name}' must be a LoRALayer, got {type(layer).__name__}"
                )
            self._layers[name] = layer
        self.modules_to_save: dict[str, Tensor] = dict(modules_to_save or {})
        both = sorted(set(self._layers) & set(self.modules_to_save))
        if both:
            raise AdapterError(f"tensor(s) {both[:5]} are both LoRA-adapted and saved in full; keep one")
        self.base_model = base_model
        self.task_type = task_type

    # -- Mapping protocol ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LoRALayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        ranks = sorted({layer.rank for layer in self.values()})
        return (
            f"LoRADelta({len(self)} layers, ranks {ranks}, {len(self.modules_to_save)} full tensors, "
            f"{self.numel()} values)"
        )

    # -- measures -----------------------------------------------------------------------------------
    def numel(self) -> int:
        """Values held: every factor plus the full tensors."""
        return sum(layer.numel() for layer in self.values()) + sum(
            t.numel() for t in self.modules_to_save.values()
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the raw factors and full tensors (what an uncompressed adapter costs to send or store)."""
        return self.factors().nbytes

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of each adapted layer."""
        return {name: layer.rank for name, layer in self.items()}

    def check_finite(self) -> None:
        """Raise :class:`InvalidUpdate` naming the first factor holding NaN or Inf."""
        bad = first_non_finite(self.factors())
        if bad is not None:
            raise InvalidUpdate(f"adapter tensor '{bad}' holds NaN or Inf values")

    # -- the full change ----------------------------------------------------------------------------
    def check_base(self, base: StateDict) -> None:
        """Raise :class:`AdapterMismatch` unless every adapted (or saved) tensor exists in ``base`` with its shape."""
        for name in [*self, *self.modules_to_save]:
            if name not in base:
                near = difflib.get_close_matches(name, list(base), n=1, cutoff=0.6)
                suffix = [k for k in base if k.endswith("." + name) or name.endswith("." + k)]
                hint = (
                    f"; the base names it '{suffix[0]}' (rename the adapter's layers with with_prefix())"
                    if suffix
                    else (f"; did you mean '{near[0]}'?" if near else "")
                )
                raise AdapterMismatch(
                    f"adapter targets '{module_of(name)}' but the base model has no tensor '{name}'{hint}"
                )
            layer = self._layers.get(name)
            if layer is not None and layer.bias is not None:
                bias_name = module_of(name) + ".bias"
                if bias_name not in base or tuple(base[bias_name].shape) != tuple(layer.bias.shape):
                    raise AdapterMismatch(
                        f"adapter layer '{name}' changes the bias '{bias_name}' (lora_bias) but the base has "
                        f"{'no such tensor' if bias_name not in base else tuple(base[bias_name].shape)}"
                    )
            want = tuple(base[name].shape)
            have = (
                self._layers[name].shape if name in self._layers else tuple(self.modules_to_save[name].shape)
            )
            if tuple(have) != want:
                if layer is not None and not layer.embedding and tuple(reversed(have)) == want:
                    raise AdapterMismatch(_orientation_hint(name, layer, want))
                raise AdapterMismatch(
                    f"adapter layer '{name}' has shape {tuple(have)} but the base weight is {want}: "
                    "the adapter was trained on a different model"
                )

    def materialize(self, base: StateDict, *, only_adapted: bool = False) -> Delta:
        """The full change ``ΔW = scaling · B A`` per adapted weight, as a :class:`Delta` over ``base``.

        Args:
            base: the model the adapter was trained on (a state dict); it fixes names, dtypes and the
                ``new − base`` of the tensors in :attr:`modules_to_save`.
            only_adapted: return only the adapted and saved tensors; by default every tensor of ``base`` is
                present (zeros where the adapter does not touch it), so ``materialize(base).apply(base)`` works.

        Raises:
            AdapterMismatch: a target module is missing in ``base`` or has another shape.
        """
        self.check_base(base)
        # each layer's bias change (small: one value per output), for the base's biases that have one
        biases = {module_of(k) + ".bias": d for k, v in self.items() if (d := v.delta_bias()) is not None}
        out: dict[str, Tensor] = {}
        for name, b in base.items():
            if name in self._layers:
                out[name] = self._layers[name].delta_weight().to(b.dtype)
            elif name in biases:
                out[name] = biases[name].to(b.dtype)
            elif name in self.modules_to_save:
                out[name] = self.modules_to_save[name].to(b.dtype) - b.detach()
            elif not only_adapted:
                out[name] = torch.zeros_like(b)
        return Delta(out)

    def merged_into(self, base: StateDict) -> dict[str, Tensor]:
        """``base + ΔW``: the fine-tuned model this adapter stands for (PEFT's ``merge_and_unload``)."""
        return self.materialize(base).apply(base)

    # -- factors as a Delta -------------------------------------------------------------------------
    def factor_names(self, name: str) -> tuple[str, str]:
        """The PEFT keys (without ``base_model.model.``) of layer ``name``'s ``A`` and ``B``."""
        module = module_of(name)
        if self._layers[name].embedding:
            return f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"
        return f"{module}.lora_A.weight", f"{module}.lora_B.weight"

    def factors(self) -> Delta:
        """Every factor (and full tensor) as a :class:`Delta`: what codecs compress and aggregators average."""
        out: dict[str, Tensor] = {}
        for name, layer in self.items():
            ka, kb = self.factor_names(name)
            out[ka], out[kb] = layer.A, layer.B
            if layer.bias is not None:
                out[f"{module_of(name)}.lora_B.bias"] = layer.bias
        out.update(self.modules_to_save)
        return Delta(out)

    def with_factors(self, factors: Mapping[str, Tensor]) -> LoRADelta:
        """A copy of this adapter holding the tensors of ``factors`` (laid out like :meth:`factors`).

        This is the way back after compression or aggregation of the factors; ranks may change (a re-factorized
        aggregate), the scaling ``α`` is kept per layer.
        """
        expected = set(self.factors())
        if set(factors) != expected:
            missing = sorted(expected - set(factors))
            extra = sorted(set(factors) - expected)
            raise AdapterMismatch(
                f"factors do not match the adapter: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        layers = {}
        for name, layer in self.items():
            ka, kb = self.factor_names(name)
            bias = factors[f"{module_of(name)}.lora_B.bias"] if layer.bias is not None else None
            try:
                layers[name] = replace(layer, A=factors[ka], B=factors[kb], bias=bias)
            except AdapterError as exc:
                raise type(exc)(f"adapter layer '{name}': {exc}") from None
        return self.replace(layers=layers, modules_to_save={k: factors[k] for k in self.modules_to_save})

    def replace(
        self,
        *,
        layers: Mapping[str, LoRALayer] | None = None,
        modules_to_save: Mapping[str, Tensor] | None = None,
    ) -> LoRADelta:
        """A copy with other layers and/or full tensors, keeping the metadata."""
        return LoRADelta(
            self._layers if layers is None else layers,
            modules_to_save=self.modules_to_save if modules_to_save is None else modules_to_save,
            base_model=self.base_model,
            task_type=self.task_type,
        )

    def with_prefix(self, *, add: str = "", remove: str = "") -> LoRADelta:
        """Rename every tensor: strip ``remove`` then prepend ``add`` (e.g. ``remove="bert."`` to apply an
        adapter trained on ``BertForSequenceClassification`` to a bare ``BertModel``)."""

        def rename(k: str) -> str:
            if remove and not k.startswith(remove):
                raise AdapterMismatch(f"tensor '{k}' does not start with the prefix '{remove}' to remove")
            return add + k.removeprefix(remove)

        return LoRADelta(
            {rename(k): v for k, v in self.items()},
            modules_to_save={rename(k): v for k, v in self.modules_to_save.items()},
            base_model=self.base_model,
            task_type=self.task_type,
        )

    # -- PEFT folders -------------------------------------------------------------------------------
    @classmethod
    def load_peft(cls, path: str) -> LoRADelta:
        """Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from deltaplane.adapters.peft_format import load_peft

        return load_peft(path)

    def save_peft(self, path: str) -> None:
        """Write a PEFT adapter folder that ``PeftModel.from_pretrained`` loads."""
        from deltaplane.adapters.peft_format import save_peft

        save_peft(self, path)

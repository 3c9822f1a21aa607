"""From a merge config to a list of output tensors, each with its inputs and its own resolved parameters.

mergekit plans a merge layer by layer from an architecture definition; deltaplane reads the layer structure from
the tensor names instead, so it needs no per-architecture table: a tensor is in layer ``i`` when its name holds
``layers.i.``, ``layer.i.``, ``h.i.``, ``blocks.i.`` or ``block.i.`` (Llama/Mistral/Qwen, BERT, GPT-2, ...). Tensors
outside the layers are *pre* weights when their name mentions ``embed``, ``wte`` or ``wpe`` and *post* weights
(final norm, head, pooler) otherwise.

- ``models:`` is one slice over every layer of every model.
- ``slices:`` stack layer ranges: output layer ``n`` of a slice is input layer ``start + n`` of each of its sources,
  merged by the config's method and renumbered consecutively over the slices; the pre weights come from the first
  slice's sources and the post weights from the last's, as in mergekit.
- Gradients are evaluated at ``t = n / (len − 1)`` within a slice (``t = 1`` for a one-layer slice) and at
  ``t = 0`` for pre and post weights, as mergekit does since v0.1.2 (``plan_module`` reads both with one
  ``ConfigReader(t=0)``; before arcee-ai/mergekit#534 it read the post weights at ``t = 1``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaplane.errors import ConfigError, DecodeError, ShapeMismatch
from deltaplane.merging.base import MergeMethod, MergeParams, resolve_params
from deltaplane.merging.checkpoint import Checkpoint
from deltaplane.merging.config import MergeConfig, evaluate_setting
from deltaplane.textfile import MANIFEST_LIMIT, read_bounded_text

__all__ = [
    "LAYER_PATTERN",
    "PlannedTensor",
    "Source",
    "layer_index",
    "plan_tensors",
    "tied_head",
    "uses_base",
]

_HEAD = "lm_head.weight"
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_PRE = ("embed", "wte", "wpe")


def layer_index(name: str) -> tuple[int, int, int] | None:
    """``(layer, start, stop)`` of the layer number in ``name`` (its character span), or ``None``."""
    m = LAYER_PATTERN.search(name)
    return None if m is None else (int(m.group(1)), m.start(1), m.end(1))


def _renumber(name: str, layer: int) -> str:
    found = layer_index(name)
    assert found is not None
    return f"{name[: found[1]]}{layer}{name[found[2] :]}"


def tied_head(ck: Checkpoint, name: str) -> str | None:
    """The embedding a checkpoint with tied embeddings holds in place of the head ``name`` it lacks, else ``None``.

    A model saved with ``tie_word_embeddings: true`` writes no ``lm_head.weight``: ``transformers`` loads its input
    embedding there, and mergekit reads it there too (the architecture's ``tied_names``), so such a model merges
    with an untied fine-tune of the same architecture. Only for a ``config.json`` that says so, and one embedding.
    """
    if name != _HEAD or name in ck.infos:
        return None
    try:
        conf = json.loads(
            read_bounded_text(ck.folder / "config.json", limit=MANIFEST_LIMIT, what="model config")
        )
    except (OSError, ValueError, ConfigError, DecodeError):
        return None
    if not isinstance(conf, dict):
        return None
    text = conf.get("text_config")
    tied = conf.get(
        "tie_word_embeddings", text.get("tie_word_embeddings") if isinstance(text, dict) else None
    )
    found = [n for n in ck.infos if n.endswith(_EMBEDDINGS)]
    return found[0] if tied is True and len(found) == 1 else None


def uses_base(method: MergeMethod) -> bool:
    """Whether ``base_model`` is an input of the method's formula (θ₀, task vectors, or one more input)."""
    return method.needs_base or method.optional_base or method.averages_base


@dataclass(frozen=True)
class Source:
    """One input of an output tensor: a checkpoint and the tensor's name in it."""

    checkpoint: Checkpoint
    name: str
    label: str


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape and dtypes, its inputs and its resolved parameters."""

    name: str
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    base: Source | None
    inputs: list[Source]
    params: MergeParams
    t: float


@dataclass
class _Scope:
    """The inputs of one slice (or of the whole ``models:`` list) and their parameter settings."""

    base: Source | None
    models: list[tuple[Checkpoint, str, dict[str, Any], int]]  # checkpoint, label, parameters, first layer
    slice_params: dict[str, Any]
    base_first: int = 0
    length: int = 0


@dataclass
class Plan:
    """The output tensors and what the output folder needs besides them."""

    tensors: list[PlannedTensor]
    checkpoints: list[Checkpoint]
    """Every file opened: the models and any tensor-valued parameters (Fisher files)."""
    models: list[Checkpoint]
    """The models (and base) only."""
    donor: Checkpoint
    n_layers: int | None
    notes: list[str] = field(default_factory=list)
    untie_head: bool = False
    """The donor ties its head to its embedding (no ``lm_head.weight``) but the output holds a merged head: its
    ``config.json`` must say ``tie_word_embeddings: false``, else the head would be dropped on load."""


class _Resolver:
    def __init__(self, method: MergeMethod, cfg: MergeConfig) -> None:
        self.method = method
        self.cfg = cfg
        self.cache: dict[str, MergeParams] = {}
        self.files: dict[str, Checkpoint] = {}

    def __call__(
        self, out_name: str, scope: _Scope, in_names: Sequence[str], t: float, labels: Sequence[str]
    ) -> MergeParams:
        m = self.method
        readers = {p.name: p.read for p in m.params}  # unknown names are refused by resolve_params below
        shared: dict[str, Any] = {}
        for settings in (scope.slice_params, self.cfg.parameters):
            for key, setting in settings.items():
                if (
                    key not in shared
                    and (v := evaluate_setting(setting, out_name, t, read=readers.get(key))) is not None
                ):
                    shared[key] = v
        per_model: list[dict[str, Any]] = []
        for (_, _, settings, _), in_name in zip(scope.models, in_names, strict=True):
            mine = {}
            for key, setting in settings.items():
                if (v := evaluate_setting(setting, in_name, t, read=readers.get(key))) is not None:
                    mine[key] = v
            per_model.append(mine)
        key = repr((shared, per_model))
        if key in self.cache:
            return self.cache[key]
        where = self.cfg.source
        for p in m.mergekit_required:
            for mine, label in zip(per_model, labels, strict=True):
                if p not in mine and p not in shared:
                    raise ConfigError(
                        f"{where}: merge method '{m.name}' needs parameter '{p}' for model '{label}' (tensor "
                        f"'{out_name}'); mergekit requires it too: add e.g. `parameters: {{{p}: 1.0}}`"
                    )
        params = resolve_params(m, len(per_model), shared, per_model, where=where, model_names=list(labels))
        for mp, label in zip(params.per_model, labels, strict=True):
            for param in m.model_params:
                if param.kind == "tensors" and isinstance(mp[param.name], str):
                    path = str(self.cfg.resolve(mp[param.name]))
                    if path not in self.files:
                        try:
                            self.files[path] = Checkpoint(path, what=f"{param.name} file")
                        except ConfigError as exc:
                            raise ConfigError(
                                f"{where}: parameter '{param.name}' of model '{label}': {exc}"
                            ) from None
                    mp[param.name] = self.files[path]
        self.cache[key] = params
        return params


def _same(cfg: MergeConfig, a: str, b: str) -> bool:
    return cfg.resolve(a).resolve() == cfg.resolve(b).resolve()


def plan_tensors(cfg: MergeConfig, method: MergeMethod) -> Plan:
    """Open every input (headers only), check the layouts and resolve each output tensor's inputs and parameters.

    Raises:
        ConfigError: a missing model or base, a wrong number of models, a bad or missing parameter (naming the model
            and tensor), a slice whose sources lack the layers it asks for.
        ShapeMismatch: inputs of one output tensor disagree on names, shapes or (without ``dtype:``) float-ness.
    """
    opened: dict[Path, Checkpoint] = {}
    resolver = _Resolver(method, cfg)
    try:
        return _plan(cfg, method, opened, resolver)
    except BaseException:
        # a refusal partway (a missing model, a bad Fisher file, a shape mismatch) closes what was opened so far
        for ck in [*opened.values(), *resolver.files.values()]:
            ck.close()
        raise


def _plan(cfg: MergeConfig, method: MergeMethod, opened: dict[Path, Checkpoint], resolver: _Resolver) -> Plan:
    """:func:`plan_tensors`' work; every checkpoint it opens is recorded in ``opened`` or ``resolver.files``."""
    where = cfg.source

    def open_ck(ref: str) -> Checkpoint:
        path = cfg.resolve(ref).resolve()
        if path not in opened:
            ck = Checkpoint(cfg.resolve(ref))
            ck.check_index()
            opened[path] = ck
        return opened[path]

    notes: list[str] = []
    scopes: list[tuple[_Scope, list[int]]] = []  # scope, its output layers' input offsets
    base_used = uses_base(method)
    if cfg.models:
        entries = list(cfg.models)
        base_ref = cfg.base_model
        if base_ref is not None and base_used:
            # mergekit lists the base under models too; its entry carries no task vector
            entries = [e for e in entries if not _same(cfg, e.model, base_ref)]
        elif base_ref is not None and not any(_same(cfg, e.model, base_ref) for e in entries):
            # mergekit adds an unlisted base model as one more input of methods that do not treat it apart
            from deltaplane.merging.config import ModelEntry

            entries.append(ModelEntry(model=base_ref))
        if method.needs_base and base_ref is None:
            raise ConfigError(f"{where}: merge method '{method.name}' needs base_model")
        try:
            method.check_models(len(entries), base_used and base_ref is not None)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        base = Source(open_ck(base_ref), "", base_ref) if base_used and base_ref is not None else None
        models = [(open_ck(e.model), e.model, e.parameters, 0) for e in entries]
        ref = base.checkpoint if base is not None else models[0][0]
        n_layers = _count_layers(ref)
        scope = _Scope(base, models, {}, 0, n_layers)
        scopes.append((scope, list(range(n_layers))))
    else:
        assert cfg.slices is not None
        for i, sl in enumerate(cfg.slices):
            if sl.residual_weight is not None:
                notes.append(
                    f"slices[{i}].residual_weight is ignored (mergekit's merge does not use it either)"
                )
            base_ref = sl.base_model or cfg.base_model
            sources = list(sl.sources)
            base = None
            base_first = 0
            if base_ref is not None and (method.needs_base or method.optional_base):
                in_slice = [s for s in sources if _same(cfg, s.model, base_ref)]
                if not in_slice:
                    raise ConfigError(
                        f"{where}: slices[{i}]: the base model '{base_ref}' must be one of the slice's sources "
                        f"(with its layer_range), as mergekit requires"
                    )
                base = Source(open_ck(base_ref), "", base_ref)
                base_first = in_slice[0].layer_range[0]
                sources = [s for s in sources if not _same(cfg, s.model, base_ref)]
            elif method.needs_base:
                raise ConfigError(f"{where}: merge method '{method.name}' needs base_model")
            try:
                method.check_models(len(sources), base is not None)
            except ConfigError as exc:
                raise ConfigError(f"{where}: slices[{i}]: {exc}") from None
            models = [(open_ck(s.model), s.model, s.parameters, s.layer_range[0]) for s in sources]
            length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            for ck, label, _, first in models + (
                [(base.checkpoint, base.label, {}, base_first)] if base else []
            ):
                have = _count_layers(ck)
                if first + length > have:
                    raise ConfigError(
                        f"{where}: slices[{i}]: model '{label}' has {have} layers; layers [{first}, "
                        f"{first + length}) do not exist"
                    )
            scopes.append((_Scope(base, models, sl.parameters, base_first, length), list(range(length))))
        n_layers = sum(len(offsets) for _, offsets in scopes)
    tensors: list[PlannedTensor] = []
    first_scope, last_scope = scopes[0][0], scopes[-1][0]
    ref_ck = (first_scope.base or Source(first_scope.models[0][0], "", "")).checkpoint
    if cfg.models:  # every input holds exactly the same floating-point tensors
        for ck in opened.values():
            _check_names(ref_ck, ck, notes)
    layered = {n for n in ref_ck.infos if layer_index(n) is not None}
    outside = [n for n in ref_ck.infos if n not in layered]
    pre = [n for n in outside if any(p in n.lower() for p in _PRE)]
    post = [n for n in outside if n not in pre]
    if _HEAD not in ref_ck.infos and tied_head(ref_ck, _HEAD) is not None:
        # a tied reference lacks the head an untied input of the last slice has: mergekit plans the head when any
        # input holds it (its ``optional`` lm_head) and reads a tied input's embedding in its place
        last = [ck for ck, _, _, _ in last_scope.models] + (
            [last_scope.base.checkpoint] if last_scope.base else []
        )
        if any(_HEAD in ck.infos for ck in last):
            post.append(_HEAD)

    def add(out_name: str, scope: _Scope, names: list[str], base_name: str | None, t: float) -> None:
        inputs = [Source(ck, n, label) for (ck, label, _, _), n in zip(scope.models, names, strict=True)]
        base = None if scope.base is None or base_name is None else Source(scope.base.checkpoint, base_name,
                                                                          scope.base.label)  # fmt: skip
        every = ([base] if base is not None else []) + inputs
        donor = next((s for s in every if s.name in s.checkpoint.infos), None)
        if donor is not None and not donor.checkpoint.infos[donor.name].dtype.is_floating_point:
            # a buffer (position ids, a counter) is copied, never merged: an input that lacks it (a fine-tune
            # saved by a newer transformers, which no longer writes position_ids) reads the donor's copy
            def fill(s: Source) -> Source:
                return s if s.name in s.checkpoint.infos else Source(donor.checkpoint, donor.name, s.label)

            base = fill(base) if base is not None else None
            inputs = [fill(s) for s in inputs]
            every = ([base] if base is not None else []) + inputs
        every = [s if (e := tied_head(s.checkpoint, s.name)) is None else Source(s.checkpoint, e, s.label)
                 for s in every]  # fmt: skip
        base = every[0] if base is not None else None
        inputs = every[1:] if base is not None else every
        infos = []
        for s in every:
            if s.name not in s.checkpoint.infos:
                raise ShapeMismatch(
                    f"model '{s.label}' has no tensor '{s.name}' (needed for output '{out_name}')"
                )
            infos.append(s.checkpoint.infos[s.name])
        first = infos[0]
        for s, info in zip(every, infos, strict=True):
            if info.shape != first.shape:
                raise ShapeMismatch(
                    f"tensor '{s.name}': shape {info.shape} in '{info.file}' but {first.shape} in '{first.file}'"
                )
            if info.dtype.is_floating_point != first.dtype.is_floating_point or (
                not info.dtype.is_floating_point and info.dtype != first.dtype
            ):
                raise ShapeMismatch(
                    f"tensor '{s.name}': dtype {info.dtype} in '{info.file}' but {first.dtype} in '{first.file}'"
                )
        if first.dtype.is_floating_point:
            in_dtype = cfg.compute_dtype or _promote([i.dtype for i in infos])
            out_dtype = cfg.output_dtype or in_dtype
        else:
            in_dtype = out_dtype = first.dtype
        params = resolver(out_name, scope, names, t, [label for _, label, _, _ in scope.models])
        tensors.append(PlannedTensor(out_name, first.shape, in_dtype, out_dtype, base, inputs, params, t))

    for name in pre:
        add(name, first_scope, [name] * len(first_scope.models), name, 0.0)
    out_layer = 0
    for scope, offsets in scopes:
        for k in offsets:
            t = k / (len(offsets) - 1) if len(offsets) > 1 else 1.0
            if scope.models:
                src_ck, _, _, src_first = scope.models[0]
            else:
                assert scope.base is not None  # unreachable: check_models refused a slice without models
                src_ck, src_first = scope.base.checkpoint, scope.base_first
            for name in sorted(n for n in src_ck.infos if (li := layer_index(n)) and li[0] == src_first + k):
                names = [_renumber(name, first + k) for _, _, _, first in scope.models]
                base_name = _renumber(name, scope.base_first + k) if scope.base is not None else None
                add(_renumber(name, out_layer), scope, names, base_name, t)
            out_layer += 1
    for name in post:
        add(name, last_scope, [name] * len(last_scope.models), name, 0.0)
    donor = first_scope.base.checkpoint if first_scope.base is not None else first_scope.models[0][0]
    if cfg.models and cfg.base_model is not None:
        donor = open_ck(cfg.base_model)
    untie = tied_head(donor, _HEAD) is not None and any(t.name == _HEAD for t in tensors)
    if untie:
        notes.append(
            f"'{donor.path}' ties its embeddings (tie_word_embeddings: true, no '{_HEAD}'); the output holds a "
            f"merged '{_HEAD}' (each tied input's embedding stood in for it), so its config.json says "
            "tie_word_embeddings: false. mergekit 0.1.5 writes the same head but keeps the donor's true: "
            "transformers 4 then ties the head back to the embedding on load and drops the merged one"
        )
    model_files = list(opened.values())
    return Plan(tensors, model_files + list(resolver.files.values()), model_files, donor,
                n_layers if cfg.slices else None, notes, untie)  # fmt: skip


def _check_names(ref: Checkpoint, other: Checkpoint, notes: list[str]) -> None:
    """Refuse ``other`` unless it holds the floating-point tensors ``ref`` holds, and no others.

    Non-floating tensors (buffers such as BERT's ``embeddings.position_ids``, counters) are copied from the
    reference, never merged, so one an input lacks is read from the reference, and one only an input holds is
    left out; both are said in ``notes``. A fine-tune saved by a newer ``transformers`` (which no longer writes
    ``position_ids``) was refused against its own base. A head ``other`` lacks because its embeddings are tied
    (:func:`tied_head`) is read from its embedding, also said in ``notes``; a head only ``other`` holds beside a
    tied ``ref`` is merged too (``ref`` lends its embedding), and the output's config unties it."""
    if ref.infos.keys() == other.infos.keys():
        return
    missing = sorted(set(ref.infos) - set(other.infos))
    extra = sorted(set(other.infos) - set(ref.infos))
    floats_missing = [n for n in missing if ref.infos[n].dtype.is_floating_point]
    tied = {n: e for n in floats_missing if (e := tied_head(other, n)) is not None}
    floats_missing = [n for n in floats_missing if n not in tied]
    missing = [n for n in missing if n not in tied]  # what is left is non-floating, or refused below
    for n, e in tied.items():
        notes.append(
            f"'{other.path}' has tied embeddings (tie_word_embeddings: true) and no '{n}': its '{e}' is merged in "
            "its place, as transformers loads it and as mergekit reads it"
        )
    if _HEAD in extra and tied_head(ref, _HEAD) is not None:
        extra.remove(_HEAD)  # the tied reference lends its embedding as the head: planned in _plan
    floats_extra = [n for n in extra if other.infos[n].dtype.is_floating_point]
    parts = []
    if floats_missing:
        parts.append(f"lacks tensor(s) {floats_missing[:5]} that '{ref.path}' has")
    if floats_extra:
        parts.append(f"has extra tensor(s) {floats_extra[:5]} that '{ref.path}' lacks")
    if parts:
        raise ShapeMismatch(f"model '{other.path}' " + " and ".join(parts))
    if missing:
        notes.append(
            f"'{other.path}' lacks the non-floating tensor(s) {missing[:5]}: copied from '{ref.path}', as "
            "every non-floating tensor is"
        )
    if extra:
        notes.append(
            f"'{other.path}' holds non-floating tensor(s) {extra[:5]} that '{ref.path}' lacks: left out of the "
            "output, which follows the reference model"
        )


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _count_layers(ck: Checkpoint) -> int:
    found = [li[0] for n in ck.infos if (li := layer_index(n)) is not None]
    return max(found) + 1 if found else 0

"""The merge-method protocol, its parameter declarations and the registry; :func:`merge` on state dicts / deltas.

A merge method works on **one tensor at a time**: given the base tensor (or ``None``) and the same-named tensor of
each model, it returns the merged tensor. That single contract serves both the in-memory :func:`merge` below and
the streaming :func:`deltaplane.merging.merge_files`.

A :class:`ChunkedMergeMethod` (every built-in method) goes further and merges a tensor **in row chunks**, so the
streaming merge holds ``inputs × chunk`` rather than ``inputs × largest tensor``: :meth:`~MergeMethod.prepare`
makes read-only passes over the chunks for the per-tensor statistics a method needs (TIES' top-k magnitude
thresholds, SLERP's norms and dot product, Model Stock's cosines), then :meth:`~MergeMethod.merge_chunk` merges
each chunk with them. The in-memory path runs the same two steps on one chunk covering the whole tensor, so both
paths share one implementation; with elementwise arithmetic the chunked result is bit-identical.

Parameters are declared as data (:class:`Param`): a name, a default (or required), whether it is *shared* by all
models (``lambda``, ``t``) or given *per model* (``weight``, ``density``), and a check. This is what lets a
mergekit YAML, keyword arguments and the CLI all be validated by the same code with the same messages.
"""

from __future__ import annotations

import functools
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltaplane.delta import Delta, StateDict, all_finite, check_compatible
from deltaplane.errors import ConfigError, InvalidUpdate, ShapeMismatch

__all__ = [
    "REQUIRED",
    "ChunkPass",
    "ChunkedMergeMethod",
    "MergeMethod",
    "MergeParams",
    "Param",
    "TensorChunk",
    "available_methods",
    "chunk_dtype",
    "compute_dtype_for",
    "get_method",
    "merge",
    "merge_in_chunks",
    "register_method",
    "resolve_params",
    "row_ranges",
    "tensor_generator",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Sentinel default of a :class:`Param` that has no default and must be given."""


@dataclass(frozen=True)
class Param:
    """Declaration of one merge-method parameter.

    Attributes:
        name: the name used in keyword arguments and in mergekit YAML (``weight``, ``density``, ``lambda``).
        default: value when not given; :data:`REQUIRED` if it must be given.
        per_model: ``True`` if each model has its own value (``weight``), ``False`` if shared (``lambda``).
        check: returns an error text for a bad value (``"must be in (0, 1]"``) or ``None`` if fine.
        kind: ``"float"``, ``"bool"``, ``"int"``, ``"choice"`` (one of ``choices``) or ``"tensors"`` (a
            per-tensor mapping such as a Fisher dict).
        plural: keyword accepted by :func:`merge` for a list with one value per model (``weights``).
        doc: one line shown in docs and errors.
    """

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    check: Callable[[Any], str | None] | None = None
    kind: str = "float"
    plural: str | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()

    def read(self, value: Any) -> Any:
        """A YAML scalar as mergekit's pydantic validator reads it, before gradients are interpolated: a numeric
        string is a number for a numeric parameter (YAML 1.1 leaves ``1e-3``, without a dot, a string). Anything
        else is returned as is, for :meth:`validate` to check."""
        if self.kind in ("float", "int") and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value

    def validate(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's kind and check it; raise :class:`ConfigError` naming ``where``."""
        if self.kind == "tensors":
            if not isinstance(value, Mapping | str):
                raise ConfigError(
                    f"{where}: parameter '{self.name}' must be a mapping name -> tensor (or a safetensors path). "
                    f"Found {type(value).__name__}"
                )
            return value
        if isinstance(value, list | dict):
            # gradients and filters are resolved to one value per tensor before this (merging.config)
            raise ConfigError(
                f"{where}: parameter '{self.name}' must be a single {self.kind}, found {value!r}"
            )
        if self.kind == "choice":
            if value is True and "true" in self.choices:  # YAML reads an unquoted `true` as a bool
                value = "true"
            if not isinstance(value, str) or value not in self.choices:
                raise ConfigError(
                    f"{where}: parameter '{self.name}' must be one of {', '.join(self.choices)}. Found {value!r}"
                )
            return value
        try:
            if self.kind == "bool":
                if not isinstance(value, bool):
                    raise TypeError
                coerced: Any = value
            elif self.kind == "int":
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError
                coerced = int(value)
            else:
                if isinstance(value, bool):
                    raise TypeError
                coerced = float(value)
                if not math.isfinite(coerced):
                    raise TypeError
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: parameter '{self.name}' must be a finite {self.kind}. Found {value!r}"
            ) from None
        if self.check is not None and (problem := self.check(coerced)) is not None:
            raise ConfigError(f"{where}: parameter '{self.name}' {problem}. Found {value!r}")
        return coerced


def in_unit_interval(x: float) -> str | None:
    """Check for densities and interpolation factors: ``0 < x <= 1``."""
    return None if 0 < x <= 1 else "must be in (0, 1]"


def in_closed_unit_interval(x: float) -> str | None:
    return None if 0 <= x <= 1 else "must be in [0, 1]"


def non_negative(x: float) -> str | None:
    return None if x >= 0 else "must be non-negative"


def positive(x: float) -> str | None:
    return None if x > 0 else "must be positive"


@dataclass
class MergeParams:
    """Resolved parameters for one merge: ``shared`` values and one dict per model (defaults filled in)."""

    shared: dict[str, Any]
    per_model: list[dict[str, Any]]

    def column(self, name: str) -> list[Any]:
        """The per-model values of ``name``, in model order."""
        return [p[name] for p in self.per_model]


@dataclass
class TensorChunk:
    """Rows ``[start, stop)`` (along dimension 0) of one tensor, from every input, in the compute dtype.

    A 0-d tensor is one chunk with ``start=0, stop=1`` holding the 0-d tensors themselves. ``params`` has every
    tensor-valued per-model parameter (a Fisher) cut to the same rows.
    """

    name: str
    shape: tuple[int, ...]
    """Shape of the whole tensor."""
    start: int
    stop: int
    base: Tensor | None
    tensors: list[Tensor]
    params: MergeParams


ChunkPass = Callable[[], Iterator[TensorChunk]]
"""Each call starts a fresh pass over a tensor's chunks, in row order (:meth:`MergeMethod.prepare` may make several)."""


def row_ranges(shape: Sequence[int], chunk_elements: int | None) -> list[tuple[int, int]]:
    """Row ranges covering a tensor of ``shape`` with at most ``chunk_elements`` elements each (rows never split).

    ``None`` gives one range for the whole tensor. A row larger than ``chunk_elements`` is a chunk by itself.
    """
    if len(shape) == 0:
        return [(0, 1)]
    rows = shape[0]
    row_numel = math.prod(shape[1:])
    if chunk_elements is None or rows == 0 or row_numel == 0:
        return [(0, rows)]
    step = max(1, chunk_elements // row_numel)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


class MergeMethod(ABC):
    """One merge algorithm acting tensor by tensor. Subclasses cite their paper in ``paper`` / ``url``.

    A method that can merge a tensor in row chunks subclasses :class:`ChunkedMergeMethod` instead; one that only
    implements :meth:`merge_tensor` still streams, a whole tensor at a time.
    """

    chunked: bool = False
    """Whether :meth:`prepare` + :meth:`merge_chunk` are implemented (the streaming merge then works by chunks)."""

    name: str = ""
    paper: str = ""
    url: str = ""
    needs_base: bool = False
    optional_base: bool = False
    averages_base: bool = False
    """Whether a given ``base_model`` is averaged as one more input (mergekit's ``karcher``)."""
    """Whether a ``base_model``, when given, takes part (``slerp``, ``nuslerp``, ``multislerp``: task vectors)."""
    upcasts_half: bool = False
    """Whether half-precision inputs are computed in float32 (as mergekit's ``linear`` and ``slerp`` kernels do);
    other methods compute in the config's ``dtype`` (else the inputs' dtype), as mergekit does."""
    float64_sums: str = ""
    """What the method sums in float64 where mergekit sums in the compute dtype (``""``: nothing); see
    :meth:`float64_sums_with`."""
    mergekit_required: tuple[str, ...] = ()
    """Parameters that mergekit requires in a YAML config (``weight`` for ``linear``): :func:`merge` keeps their
    defaults, a config that omits them is refused as mergekit refuses it."""
    min_models: int = 1
    max_models: int | None = None
    params: tuple[Param, ...] = ()

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @abstractmethod
    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], params: MergeParams
    ) -> Tensor:
        """Merge the ``name`` tensors of all models (float tensors, already in the compute dtype).

        The method owns ``base`` and ``tensors``: they are fresh copies and may be modified in place, which is
        how the task-vector engine keeps its scratch memory to a few tensors.

        ``params.per_model[i]`` holds model ``i``'s values; tensor-valued parameters (a Fisher) are already
        looked up for ``name``. Returns a tensor with the shape of the inputs.
        """

    def float64_sums_with(self, params: MergeParams) -> str:
        """What a merge with ``params`` sums in float64 where mergekit sums in the compute dtype (``""``: nothing).

        A deliberate difference — closer to the exact result, and independent of the chunk size up to the last
        bits — that the streaming merge states in its notes and in the model card.
        """
        return self.float64_sums

    def prepare(self, name: str, shape: tuple[int, ...], chunks: ChunkPass, params: MergeParams) -> Any:
        """Per-tensor statistics the chunked merge needs, from read-only passes over ``chunks()``; ``None`` if none.

        Must not modify the chunk tensors (in memory they are views of the tensors :meth:`merge_chunk` receives).
        """
        return None

    def merge_chunk(self, chunk: TensorChunk, state: Any) -> Tensor:
        """Merge one chunk given :meth:`prepare`'s ``state``; may modify the chunk's tensors in place.

        Called once per chunk, in row order (methods with running state, such as random masks drawn in sequence,
        rely on it). Returns a tensor shaped like ``chunk.tensors[0]``.
        """
        raise NotImplementedError(f"merge method '{self.name}' does not merge by chunks")

    def whole_tensor(self, shape: tuple[int, ...], params: MergeParams) -> bool:
        """Whether the tensor of ``shape`` must be merged as one chunk (a statistic that cannot be accumulated over
        row chunks, such as DELLA's ranks of a 1-D tensor). The streaming merge then holds that whole tensor."""
        return False

    def check_params(self, params: MergeParams, where: str) -> None:
        """Raise :class:`ConfigError` naming ``where`` if resolved parameters are individually valid but unusable
        together (e.g. linear weights summing to 0). Called by :func:`resolve_params`; the default accepts all."""
        return None

    def check_models(self, n_models: int, has_base: bool) -> None:
        """Raise :class:`ConfigError` if this method cannot merge ``n_models`` models (with/without a base)."""
        if self.needs_base and not has_base:
            raise ConfigError(f"merge method '{self.name}' needs a base model (base_model / base=...)")
        if n_models < self.min_models:
            raise ConfigError(
                f"merge method '{self.name}' needs at least {self.min_models} model(s). Found {n_models}"
            )
        if self.max_models is not None and n_models > self.max_models:
            raise ConfigError(
                f"merge method '{self.name}' merges at most {self.max_models} model(s). Found {n_models}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ChunkedMergeMethod(MergeMethod):
    """A method defined by :meth:`prepare` + :meth:`merge_chunk`; :meth:`merge_tensor` is the one-chunk case."""

    chunked = True

    def merge_tensor(
        self, name: str, base: Tensor | None, tensors: Sequence[Tensor], params: MergeParams
    ) -> Tensor:
        return merge_in_chunks(self, name, base, tensors, params)


def _cut_tensor_params(method: MergeMethod, params: MergeParams, rows: Callable[[Any], Any]) -> MergeParams:
    keys = [p.name for p in method.model_params if p.kind == "tensors"]
    if not keys:
        return params
    per_model = []
    for mp in params.per_model:
        mp = dict(mp)
        for key in keys:
            if mp[key] is not None:
                mp[key] = rows(mp[key])
        per_model.append(mp)
    return MergeParams(params.shared, per_model)


def check_tensor_params(method: MergeMethod, params: MergeParams, name: str, shape: tuple[int, ...]) -> None:
    """Raise :class:`ShapeMismatch` if a tensor-valued parameter (already looked up for ``name``) has another shape.

    Checked on the whole tensor, before chunking: a row slice of a too-long Fisher would otherwise fit.
    """
    for i, mp in enumerate(params.per_model):
        for p in method.model_params:
            value = mp.get(p.name)
            if p.kind == "tensors" and value is not None and tuple(value.shape) != tuple(shape):
                raise ShapeMismatch(
                    f"tensor '{name}': {p.name} of model {i} has shape {tuple(value.shape)}, the weight {shape}"
                )


def merge_in_chunks(
    method: MergeMethod,
    name: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    params: MergeParams,
    chunk_elements: int | None = None,
) -> Tensor:
    """Merge in-memory tensors with ``method.prepare`` + ``method.merge_chunk`` over row chunks.

    ``chunk_elements=None`` is one chunk (what :meth:`ChunkedMergeMethod.merge_tensor` does); smaller chunks give
    the result the streaming merge gives, which is how tests compare the two. ``base`` and ``tensors`` are owned
    and modified, as for :meth:`MergeMethod.merge_tensor`; tensor-valued parameters are full tensors.
    """
    shape = tuple(tensors[0].shape)
    check_tensor_params(method, params, name, shape)
    ranges = row_ranges(shape, chunk_elements)

    def cut(t: Tensor, start: int, stop: int) -> Tensor:
        return t if not shape or (start, stop) == (0, shape[0]) else t[start:stop]

    def chunks() -> Iterator[TensorChunk]:
        for s, e in ranges:
            yield TensorChunk(
                name,
                shape,
                s,
                e,
                None if base is None else cut(base, s, e),
                [cut(t, s, e) for t in tensors],
                _cut_tensor_params(method, params, functools.partial(cut, start=s, stop=e)),
            )

    state = method.prepare(name, shape, chunks, params)
    parts = [method.merge_chunk(c, state) for c in chunks()]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def tensor_generator(seed: int, name: str, model_index: int) -> torch.Generator:
    """A generator seeded from ``(seed, tensor name, model index)``.

    Random sparsification (DARE) must give the same mask whether models are merged in memory or streamed, in
    any tensor order; seeding per tensor from its name makes that hold without shared RNG state.
    """
    h = zlib.crc32(f"{seed}\x00{name}\x00{model_index}".encode())
    return torch.Generator().manual_seed(h)


# -- registry ------------------------------------------------------------------------------------------
_REGISTRY: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod, *, replace: bool = False) -> MergeMethod:
    """Make ``method`` available under ``method.name`` to :func:`merge`, :func:`get_method` and YAML configs."""
    if not method.name:
        raise ConfigError("a merge method needs a non-empty name")
    if method.name in _REGISTRY and not replace:
        raise ConfigError(f"merge method '{method.name}' is already registered")
    _REGISTRY[method.name] = method
    return method


def _load_builtins() -> None:
    # the built-in methods register themselves on import; importing here keeps base.py free of cycles
    import deltaplane.merging.fisher
    import deltaplane.merging.hypersphere
    import deltaplane.merging.linear
    import deltaplane.merging.model_stock
    import deltaplane.merging.passthrough
    import deltaplane.merging.ram
    import deltaplane.merging.sce
    import deltaplane.merging.selective
    import deltaplane.merging.slerp
    import deltaplane.merging.task_arithmetic  # noqa: F401


def available_methods() -> dict[str, MergeMethod]:
    """All registered merge methods by name."""
    _load_builtins()
    return dict(_REGISTRY)


def get_method(method: str | MergeMethod) -> MergeMethod:
    """The registered method called ``method`` (or ``method`` itself if already a :class:`MergeMethod`)."""
    if isinstance(method, MergeMethod):
        return method
    methods = available_methods()
    if method not in methods:
        raise ConfigError(f"unknown merge method '{method}'. Known: {', '.join(sorted(methods))}")
    return methods[method]


def resolve_params(
    method: MergeMethod,
    n_models: int,
    shared: Mapping[str, Any] | None = None,
    per_model: Sequence[Mapping[str, Any]] | None = None,
    *,
    where: str = "merge",
    model_names: Sequence[str] | None = None,
) -> MergeParams:
    """Validate and fill defaults, mergekit style.

    ``shared`` may also hold a per-model parameter, which then applies to every model unless that model
    overrides it in ``per_model`` (as mergekit's global ``parameters:`` block does). Unknown names raise.
    """
    shared = dict(shared or {})
    per_model = [dict(p) for p in (per_model or [{} for _ in range(n_models)])]
    if len(per_model) != n_models:
        raise ConfigError(f"{where}: {len(per_model)} per-model parameter sets for {n_models} models")
    names = list(model_names or [f"model {i}" for i in range(n_models)])
    known = {p.name: p for p in method.params}

    def unknown(here: str, key: str) -> ConfigError:
        return ConfigError(
            f"{here}: unknown parameter '{key}' for merge method '{method.name}'. "
            f"Known: {', '.join(sorted(known)) or 'none'}"
        )

    for key in shared:
        if key not in known:
            raise unknown(where, key)
    out_shared: dict[str, Any] = {}
    for p in method.shared_params:
        if p.name in shared:
            out_shared[p.name] = p.validate(shared[p.name], where)
        elif p.default is REQUIRED:
            raise ConfigError(f"{where}: merge method '{method.name}' needs parameter '{p.name}' ({p.doc})")
        else:
            out_shared[p.name] = p.default
    out_models: list[dict[str, Any]] = []
    for i, mp in enumerate(per_model):
        here = f"{where}, {names[i]}"
        for key in mp:
            if key not in known:
                raise unknown(here, key)
            if not known[key].per_model:
                raise ConfigError(
                    f"{here}: parameter '{key}' is shared by all models; give it once, globally"
                )
        resolved: dict[str, Any] = {}
        for p in method.model_params:
            if p.name in mp:
                resolved[p.name] = p.validate(mp[p.name], here)
            elif p.name in shared:
                resolved[p.name] = p.validate(shared[p.name], where)
            elif p.default is REQUIRED:
                raise ConfigError(
                    f"{here}: merge method '{method.name}' needs parameter '{p.name}' ({p.doc})"
                )
            else:
                resolved[p.name] = p.default
        out_models.append(resolved)
    params = MergeParams(out_shared, out_models)
    method.check_params(params, where)
    return params


def _split_kwargs(method: MergeMethod, n_models: int, kwargs: Mapping[str, Any]) -> MergeParams:
    """Turn :func:`merge` keywords (``density=0.2, weights=[1, 2]``) into resolved parameters."""
    shared: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in range(n_models)]
    by_plural = {p.plural: p for p in method.model_params if p.plural}
    model_names = {p.name: p for p in method.model_params}
    given: dict[str, str] = {}  # a per-model parameter's name -> the keyword that set it
    for key, value in kwargs.items():
        param = by_plural.get(key) or model_names.get(key)
        if param is not None:
            if param.name in given:  # weight=1 beside weights=[...]: one of the two was silently dropped
                raise ConfigError(
                    f"merge: '{given[param.name]}' and '{key}' both set the models' {param.name}; give one"
                )
            given[param.name] = key
        if param is not None and (key == param.plural or isinstance(value, list | tuple)):
            if not isinstance(value, list | tuple) or len(value) != n_models:
                raise ConfigError(
                    f"merge: '{key}' must be a list with one value per model ({n_models}). Found {value!r}"
                )
            for i, v in enumerate(value):
                per_model[i][param.name] = v
        else:
            shared[key] = value
    return resolve_params(method, n_models, shared, per_model)


def refuse_non_finite(name: str, tensors: Sequence[Tensor | None], sources: Sequence[str]) -> None:
    """Raise :class:`InvalidUpdate` naming the input (``sources[i]``) and tensor of the first of ``tensors``
    holding NaN or Inf: every method would spread it through the merged model."""
    for t, source in zip(tensors, sources, strict=True):
        if t is not None and not all_finite(t):
            raise InvalidUpdate(
                f"{source}: tensor '{name}' holds NaN or Inf values; a merge would spread them into the output"
            )


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype the in-memory :func:`merge` computes in for inputs of ``dtype``."""
    # float64 inputs stay float64 (exact tests); half types are merged in float32 and cast back
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_dtype(method: MergeMethod, dtype: torch.dtype, exact: bool) -> torch.dtype:
    """The dtype a config merge computes in when its inputs are (cast to) ``dtype``.

    mergekit computes in the config's ``dtype`` (else the inputs' dtype): a bfloat16 TIES merge rounds every
    step to bfloat16. Its ``linear`` and ``slerp`` kernels upcast half types to float32 (``upcasts_half``).
    ``exact`` (``--exact-accumulation``) computes every method in float32 and rounds once, at the output.
    """
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32 if exact or method.upcasts_half else dtype


def lookup_tensor_params(method: MergeMethod, params: MergeParams, name: str) -> MergeParams:
    """``params`` with every tensor-valued per-model parameter replaced by its entry for tensor ``name``."""
    tensor_params = [p.name for p in method.model_params if p.kind == "tensors"]
    if not tensor_params:
        return params
    per_model = []
    for i, mp in enumerate(params.per_model):
        mp = dict(mp)
        for key in tensor_params:
            mapping = mp[key]
            if mapping is None:
                continue
            if name not in mapping:
                raise ShapeMismatch(f"tensor '{name}': missing from parameter '{key}' of model {i}")
            mp[key] = mapping[name]
        per_model.append(mp)
    return MergeParams(params.shared, per_model)


def merge(
    method: str | MergeMethod,
    base: StateDict | None,
    models: Sequence[StateDict],
    **params: Any,
) -> dict[str, Tensor] | Delta:
    """Merge ``models`` (state dicts or :class:`Delta` task vectors) with a registered method.

    Example:
        >>> import torch, deltaplane as dp
        >>> from deltaplane.merging import merge
        >>> base = {"w": torch.zeros(4)}
        >>> a = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}
        >>> b = {"w": torch.tensor([1.5, 2.0, -1.0, 0.5])}
        >>> merge("ties", base, [a, b], density=0.5)["w"].tolist()
        [1.5, 2.0, 3.0, 0.0]
        >>> merge("linear", None, [a, b], weights=[3, 1])["w"].tolist()
        [1.125, -1.0, 2.0, 0.5]

    Args:
        method: a name from :func:`available_methods` (``"ties"``, ``"slerp"``...) or a :class:`MergeMethod`.
        base: the common base model, needed by task-vector methods; ``None`` when models are deltas or when
            the method does not use a base (``linear``, two-model ``slerp``).
        models: state dicts sharing names, shapes and dtypes; or :class:`Delta` objects, read as task vectors
            relative to a zero base (then the result is a :class:`Delta`, or ``base + delta`` if ``base`` given).
            Deltas that all record the same base (:attr:`~deltaplane.delta.Delta.base_sha256`) give a delta
            recording it, and ``base`` must then be that base (:class:`~deltaplane.errors.BaseMismatch`).
        **params: shared parameters (``density=0.2``, ``lambda_=...`` as ``**{"lambda": 0.5}``), a per-model
            parameter for all models (``weight=1``) or one per model (``weights=[1, 2, 3]``).

    Returns:
        The merged state dict (in each tensor's input dtype), or a :class:`Delta` if ``models`` are deltas and
        no ``base`` is given. Non-floating tensors (counters) are copied from the base (else the first model).

    Raises:
        ConfigError: unknown method or parameter, bad value, wrong number of models, missing base.
        ShapeMismatch: the models (or base) disagree on tensor names, shapes or dtypes; names the tensor.
        BaseMismatch: the deltas record a base and ``base`` is another one (its fingerprint differs).
        InvalidUpdate: an input tensor holds NaN or Inf (names the input and the tensor), or the merged tensor
            overflows the inputs' dtype (a float16 sum beyond 65504; names the tensor), as :func:`merge_files`.
    """
    m = get_method(method)
    if isinstance(models, Mapping) or not isinstance(models, Sequence | Iterator):
        raise ConfigError(
            f"merge: models must be a list of state dicts or Deltas, one per model. Found {type(models).__name__}"
            + ("; pass [model]" if isinstance(models, Mapping) else "")
        )
    models = list(models)
    if not models:
        raise ConfigError("merge: no models given")
    for what, x in [("base", base), *((f"model {i}", x) for i, x in enumerate(models))]:
        if x is not None and not isinstance(x, Mapping):  # an nn.Module failed with "has no attribute 'keys'"
            hint = ": pass its .state_dict()" if hasattr(x, "state_dict") else ""
            raise ConfigError(f"merge: {what} is a {type(x).__name__}, not a state dict or Delta{hint}")
    deltas = all(isinstance(x, Delta) for x in models)
    if deltas:
        apply_to = base
        base = Delta.zeros_like(models[0])
    for i, x in enumerate(models[1:], start=1):
        check_compatible(models[0], x, f"model 0 and model {i}")
    if base is not None:
        check_compatible(base, models[0], "base and model 0")
    m.check_models(len(models), base is not None)
    resolved = _split_kwargs(m, len(models), params)
    for mp in resolved.per_model:
        for p in m.model_params:
            if p.kind == "tensors" and isinstance(mp[p.name], str):
                from deltaplane.merging.checkpoint import Checkpoint

                mp[p.name] = Checkpoint(mp[p.name], what=f"{p.name} file")
    out: dict[str, Tensor] = {}
    for name, first in models[0].items():
        if not first.is_floating_point():
            if first.is_complex():  # copied from the base unmerged, so checked as a real tensor's inputs are
                refuse_non_finite(
                    name,
                    [base[name] if base is not None else None, *(x[name] for x in models)],
                    ["base", *(f"model {i}" for i in range(len(models)))],
                )
            out[name] = (base[name] if base is not None else first).detach().clone()
            continue
        cdt = compute_dtype_for(first.dtype)
        b = base[name].detach().to(cdt, copy=True) if base is not None else None
        ts = [x[name].detach().to(cdt, copy=True) for x in models]  # copies: methods may work in place
        refuse_non_finite(name, [b, *ts], ["base", *(f"model {i}" for i in range(len(ts)))])
        merged = m.merge_tensor(name, b, ts, lookup_tensor_params(m, resolved, name)).to(first.dtype)
        if not all_finite(merged):  # finite inputs: the result overflowed (float16 tops out at 65504)
            raise InvalidUpdate(
                f"merged tensor '{name}' holds NaN or Inf although its inputs are finite: the merge overflows "
                f"{str(first.dtype).removeprefix('torch.')} (largest value {torch.finfo(first.dtype).max:g}). "
                "Merge the models cast to float32 or bfloat16, or lower the weights or lambda"
            )
        out[name] = merged
    if deltas:
        # a merge of task vectors taken against one base is a change of that base, as a sum of them is: it keeps
        # their common record, so applying it to another base is refused (BaseMismatch) as each of them would be
        recorded = [x.base_sha256 for x in models if isinstance(x, Delta)]  # every model: they are deltas
        common = recorded[0]
        d = Delta(out, base_sha256=common if all(r == common for r in recorded) else None)
        return d.apply(apply_to) if apply_to is not None else d
    return out

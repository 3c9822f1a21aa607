"""Durable snapshots of an aggregator chain's learned state, loadable without running code.

Why: a server that restarts between rounds must continue exactly where it stopped — a server optimizer's
moments (FedAdam & co.), the DP accountant, an adaptive clip's estimate and its noise generator, a robust
rule's history, every random generator's position. :func:`chain_state` walks the chain (each wrapper's
``inner``, and the objects its attributes hold, such as the ``state`` dataclasses) and returns plain data:
tensors, numbers, strings, lists and dicts, with random generators as their state. ``torch.save`` writes it
and ``torch.load(weights_only=True)`` reads it back, so a snapshot can never run code (unlike a pickle).
:func:`load_chain_state` puts it into a freshly built chain of the same configuration.

Snapshots are taken between rounds: the chain is :meth:`~deltaplane.aggregation.Aggregator.reset` first
(on a copy), so a round's partial sums are never part of one.

A snapshot carries the chain's configuration too (every attribute is written), and a restore checks it: an
attribute named after a constructor parameter (``lr``, ``max_norm``, ``seed``...) must hold the value the new
chain was built with. Restoring used to overwrite them, so a server restarted with a new ``max_norm``, server
``lr`` or DP noise source silently ran with the old one. A restore that fails (another configuration, a
malformed snapshot, learned state that does not hold together) raises :class:`~deltaplane.errors.ConfigError`
and leaves the chain as it was. An object may define ``check_state()`` to check what was restored into it, and
``check_layout(layout)`` to check it against the model the chain aggregates (the server optimizer's moments
must be the model's float tensors, by name and shape): given the model's layout, a restore refuses a snapshot of
another model, which used to load and fail only at the next round's close, after a round of client training.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deltaplane.delta import Delta
from deltaplane.errors import ConfigError, DeltaplaneError

if TYPE_CHECKING:
    from deltaplane.codecs.layout import TensorLayout

__all__ = ["chain_state", "flat_state_difference", "float_shapes", "layout_difference", "load_chain_state"]

_KIND = "__kind__"


def chain_state(aggregator: Any) -> dict[str, Any]:
    """The learned state of ``aggregator`` and everything it holds, as plain data (see the module docstring).

    Raises:
        ConfigError: an attribute holds a value of a kind a snapshot cannot carry (named by its path).
    """
    agg = copy.deepcopy(aggregator)
    if hasattr(agg, "reset"):
        agg.reset()  # between rounds: no partial sums, no per-round rejections
    return _encode_object(agg, "aggregator", {})


def load_chain_state(
    aggregator: Any, state: dict[str, Any], *, layout: Mapping[str, TensorLayout] | None = None
) -> None:
    """Put a :func:`chain_state` snapshot into ``aggregator`` (built with the same configuration), in place.

    ``layout``: the model the chain aggregates (name -> shape and dtype of every tensor an update carries);
    when given, learned state that belongs to another model is refused here rather than at the next round.

    Raises:
        ConfigError: the snapshot was taken from a chain of another shape or configuration or (``layout``) from a
            run of another model, is malformed, or holds learned state that does not hold together;
            ``aggregator`` is then left as it was.
    """
    try:  # a dry run on a copy first: a refusal halfway must not leave the live chain half restored
        trial = copy.deepcopy(aggregator)
        _decode_into(trial, state, "aggregator")
        if layout is not None:
            _check_layout(trial, layout, set())
    except DeltaplaneError:
        raise
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"the server checkpoint is malformed ({type(exc).__name__}: {exc})") from None
    _decode_into(aggregator, state, "aggregator")


def _check_layout(obj: Any, layout: Mapping[str, TensorLayout], seen: set[int]) -> None:
    """Call ``check_layout(layout)`` on every object of the chain that defines it (wrappers' ``inner``, the
    state objects they hold), each once."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    check = getattr(obj, "check_layout", None)
    if callable(check):
        check(layout)
    for value in vars(obj).values():
        for item in value if isinstance(value, list | tuple) else [value]:
            if _is_node(item):
                _check_layout(item, layout, seen)


def float_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of the floating-point tensors of a layout or a delta (what the server's learned state is
    kept for: integer tensors are counters, never averaged)."""
    return {k: tuple(t.shape) for k, t in tensors.items() if t.dtype.is_floating_point}


def layout_difference(
    shapes: Mapping[str, tuple[int, ...]], floats: Mapping[str, tuple[int, ...]], held: str = "moment"
) -> str:
    """How state kept per tensor (``shapes``: name -> shape) differs from a model's float tensors (``floats``),
    naming the first tensor that does, as ``[name] ...`` to follow the state's name; empty if they match."""
    for k, shape in shapes.items():
        if k not in floats:
            return f"[{k!r}] is for a tensor this model does not have"
        if tuple(shape) != floats[k]:
            return f"[{k!r}] has shape {tuple(shape)}, this model's tensor {k!r} {floats[k]}"
    missing = sorted(set(floats) - set(shapes))
    if missing:
        return f" has no {held} for this model's tensor {missing[0]!r}"
    return ""


def flat_state_difference(
    tensors: Mapping[str, tuple[int, ...]],
    vectors: Mapping[str, torch.Tensor],
    floats: Mapping[str, tuple[int, ...]],
) -> str:
    """How state kept as flattened model vectors (``vectors``, by the name a message gives each: a robust rule's
    per-client histories, say), recorded for the float tensors ``tensors`` (name -> shape; empty in a snapshot older than the
    record), differs from a model whose float tensors are ``floats``: the first tensor that differs, else the
    first vector whose length is not the model's; empty if it fits."""
    if tensors:
        problem = layout_difference(tensors, floats, held="values")
        if problem:
            return f"tensors{problem}"
    size = sum(math.prod(shape) for shape in floats.values())
    for label, v in vectors.items():
        if v.numel() != size:
            return f"{label} holds {v.numel()} values, this model's float tensors {size}"
    return ""


def _is_value(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


def _configuration(obj: Any) -> frozenset[str]:
    """The attributes of ``obj`` that hold its configuration: those named after a parameter of its constructor.
    A dataclass is a state holder (its fields are what was learned: a step, moments, a generator), not one."""
    if dataclasses.is_dataclass(obj):
        return frozenset()
    try:
        return frozenset(inspect.signature(type(obj).__init__).parameters) - {"self"}
    except (TypeError, ValueError):  # a constructor without a signature (a builtin)
        return frozenset()


def _is_node(v: Any) -> bool:
    """An object whose attributes are part of the state (not a value, a function or a class)."""
    return (
        hasattr(v, "__dict__")
        and not isinstance(v, type | types.FunctionType | types.MethodType | types.ModuleType)
        and not isinstance(v, torch.Tensor | torch.Generator | np.random.Generator | Delta)
    )


def _encode_object(obj: Any, path: str, seen: dict[int, str]) -> dict[str, Any]:
    seen[id(obj)] = path
    attrs = {}
    for name, value in vars(obj).items():
        if isinstance(value, types.MethodType | types.FunctionType):
            continue  # behaviour, rebuilt with the chain
        attrs[name] = _encode(value, f"{path}.{name}", seen)
    return {_KIND: "object", "type": type(obj).__qualname__, "attrs": attrs}


def _encode(value: Any, path: str, seen: dict[int, str]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, torch.Generator):
        return {_KIND: "torch.Generator", "state": value.get_state()}
    if isinstance(value, np.random.Generator):
        return {_KIND: "numpy.Generator", "state": value.bit_generator.state}
    if isinstance(value, np.floating | np.integer):
        return value.item()
    if isinstance(value, Delta):
        return {_KIND: "Delta", "tensors": {k: v.detach().clone() for k, v in value.items()}}
    if isinstance(value, list | tuple):
        items = [_encode(v, f"{path}[{i}]", seen) for i, v in enumerate(value)]
        return {_KIND: type(value).__name__, "items": items}
    if isinstance(value, dict):
        return {_KIND: "dict", "items": [[k, _encode(v, f"{path}[{k!r}]", seen)] for k, v in value.items()]}
    if _is_node(value):
        if id(value) in seen:  # the same object held twice (e.g. a clip estimator): restored once
            return {_KIND: "ref", "path": seen[id(value)]}
        return _encode_object(value, path, seen)
    raise ConfigError(f"{path}: a {type(value).__name__} cannot be part of a server checkpoint")


def _decode(doc: Any, path: str) -> Any:
    if not isinstance(doc, dict):
        return doc
    kind = doc.get(_KIND)
    if kind == "torch.Generator":
        g = torch.Generator()
        g.set_state(doc["state"])
        return g
    if kind == "numpy.Generator":
        bit = getattr(np.random, doc["state"]["bit_generator"])()
        bit.state = doc["state"]
        return np.random.Generator(bit)
    if kind == "Delta":
        return Delta(doc["tensors"])
    if kind in ("list", "tuple"):
        items = [_decode(v, f"{path}[{i}]") for i, v in enumerate(doc["items"])]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode(v, f"{path}[{k!r}]") for k, v in doc["items"]}
    raise ConfigError(f"{path}: the checkpoint holds an object where this chain has a value")


def _decode_into(obj: Any, doc: Any, path: str) -> None:
    if not (isinstance(doc, dict) and doc.get(_KIND) == "object") or doc["type"] != type(obj).__qualname__:
        found = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(
            f"{path}: the checkpoint holds a {found}, this chain a {type(obj).__qualname__}; "
            "restore it into a chain built from the same configuration"
        )
    configuration = _configuration(obj)
    for name, value in doc["attrs"].items():
        current = getattr(obj, name, None)
        if isinstance(value, dict) and value.get(_KIND) == "ref":
            continue  # restored where it was first met
        if isinstance(value, dict) and value.get(_KIND) == "object":
            if not _is_node(current):
                raise ConfigError(f"{path}.{name}: the checkpoint holds an object this chain does not have")
            _decode_into(current, value, f"{path}.{name}")
        elif name in configuration and _is_value(value) and _is_value(current) and value != current:
            raise ConfigError(
                f"{path}.{name}: the checkpoint was taken with {name}={value!r}, this chain is configured with "
                f"{name}={current!r}; restore it into a chain built from the same configuration"
            )
        else:
            setattr(obj, name, _decode(value, f"{path}.{name}"))
    check = getattr(obj, "check_state", None)
    if callable(check):
        check()

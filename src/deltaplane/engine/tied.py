"""Tied weights (one parameter under two names) travel as one tensor in a device's update.

A model whose output layer shares its embedding table, or any layer reused under a second name, lists the
tensor once in ``model.parameters()`` but under every name in ``model.state_dict()``, so a device's delta held
it twice. Central DP then clipped an update whose norm counted that parameter twice (the clip bound the tied
part at ``C/√2``) and noised the two copies independently; the global state kept two different copies, of which
``load_state_dict`` keeps the last one it copies. The reported ε stayed an upper bound (the doubled vector's norm
was what was clipped, and each released value is noised), but the update was over-clipped and the state
inconsistent.

So the device drops each *alias* (every name of a tied parameter but the one ``load_state_dict`` copies last,
which is the value a model loaded from any state holds) before clipping, DP and compression, the server expects
and aggregates that one tensor, and :func:`retie` copies the aggregated update to the aliases before it is
published, so every version keeps the names equal. The clip then bounds the norm of the unique parameters and
the noise on the shared weight is one draw of the accountant's σ.

The alias map comes from the model's architecture (:func:`tied_aliases` of the task's model), never from the
weights or a device's word: two names holding equal values in a version are not one parameter (every LayerNorm
weight starts at ones, every bias at zero), and a server that took them for one would keep them equal forever.
A service without a task (``deltaplane serve`` without ``--federation``) therefore cannot take a tied model's
untied updates; :func:`equal_twins` only names the likely aliases in its refusal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from deltaplane.delta import Delta

__all__ = ["equal_twins", "retie", "tied_aliases", "untie"]


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: kept}`` for each tied parameter of ``model``: every name but the last under which
    ``named_parameters(remove_duplicate=False)`` lists it, mapped to that last name (the one whose value
    ``load_state_dict`` copies last and so leaves in the model). Empty for a model without tied weights."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {alias: group[-1] for group in names.values() if len(group) > 1 for alias in group[:-1]}


def untie(delta: Delta, aliases: dict[str, str]) -> Delta:
    """``delta`` without the aliases of tied parameters (the kept name carries their one change)."""
    if not aliases or not any(k in delta for k in aliases):
        return delta
    return Delta({k: v for k, v in delta.items() if k not in aliases}, base_sha256=delta.base_sha256)


def retie(update: Delta, aliases: dict[str, str]) -> Delta:
    """``update`` with each alias given its kept name's change (a copy of the same values), so a state it is
    applied to keeps tied names equal."""
    extra = {a: update[k] for a, k in aliases.items() if k in update and a not in update}
    if not extra:
        return update
    return Delta({**update, **extra}, base_sha256=update.base_sha256)


def equal_twins(
    missing: Iterable[str], present: Iterable[str], state: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """``{name: twin}`` for each of ``missing`` whose tensor in ``state`` equals one of ``present``'s (same shape,
    dtype and values): what the alias of a tied parameter looks like in a version of the model.

    Equal values are necessary for a tie, not sufficient (two biases initialised to zero are equal too), so this
    names candidates for a message, never a tie to act on (see the module)."""
    kept = [k for k in present if k in state]
    twins: dict[str, str] = {}
    for name in missing:
        t = state.get(name)
        if t is None:
            continue
        twin = next(
            (
                k
                for k in kept
                if state[k].shape == t.shape and state[k].dtype == t.dtype and torch.equal(state[k], t)
            ),
            None,
        )
        if twin is not None:
            twins[name] = twin
    return twins

"""Admission checks a network-facing server makes on what a device claims, shared by every such driver (the
HTTP service and Flower's :class:`~deltaplane.flower.DeltaStrategy`), so a claim means the same on both.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping

from deltaplane.errors import ConfigError, InvalidUpdate

__all__ = ["DEFAULT_MAX_EXAMPLES", "MAX_EXAMPLES", "check_examples", "check_max_examples", "examples_bound"]

#: the largest bound an operator may set on a claimed example count (and the HTTP schema's own bound)
MAX_EXAMPLES = 1e12
#: the default bound: far above the simulator's and the built-in tasks' partitions
DEFAULT_MAX_EXAMPLES = 100_000.0


def check_max_examples(bound: float) -> float:
    """``bound`` as a float if it is a usable ``max_examples`` (``1 ≤ bound ≤ MAX_EXAMPLES``).

    Raises:
        ConfigError: otherwise (NaN, a bool, out of range).
    """
    if isinstance(bound, bool) or not isinstance(bound, int | float) or not 1 <= bound <= MAX_EXAMPLES:
        raise ConfigError(f"max_examples must be a number in [1, {MAX_EXAMPLES:g}]. Found {bound!r}")
    return float(bound)


def examples_bound(sizes: Iterable[float]) -> float:
    """The bound for a federation whose devices' true sizes the server knows (an engine run over HTTP or
    Flower): the default, or the largest device's size where that is larger, so every device may claim its
    own size, as in process."""
    return min(MAX_EXAMPLES, max([DEFAULT_MAX_EXAMPLES, *sizes]))


def check_examples(
    num_examples: float, bound: float, counters: MutableMapping[str, int] | None = None, *, fix: str = ""
) -> None:
    """Refuse (never clip) an update whose device claims more than ``bound`` examples.

    The claim is the update's weight in (clipped) FedAvg: unbounded, one device claiming 10¹² examples makes
    the round's model its own update. Refused rather than clipped so the device learns that its weight was
    not what it asked for. ``counters`` (if given) counts the refusal as ``rejected.too_many_examples``;
    ``fix`` says how the operator raises the bound on this driver.

    Raises:
        InvalidUpdate: the claim exceeds ``bound``.
    """
    if num_examples > bound:
        if counters is not None:
            counters["rejected.too_many_examples"] += 1
        raise InvalidUpdate(
            f"num_examples={num_examples:g} exceeds this server's bound of {bound:g} examples per update "
            "(an update's weight in the average is its claimed example count); send at most that, or ask the "
            f"operator to raise it{f' ({fix})' if fix else ''}"
        )

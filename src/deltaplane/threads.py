"""Torch's intra-op thread count for the length of one block of work."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op pool at ``n`` threads (``None``: as it is), then restore the previous
    count, so that an in-process caller (tests, notebooks, a service) keeps its own setting.

    The one place that sets and restores the count for a whole command: the CLI's ``--threads``
    (:func:`deltaplane.commands.cpu_threads`), a simulated run and ``deltaplane run``'s follow-up, a streaming
    merge's and a deploy's thread budget.
    """
    if n is None:
        yield
        return
    import torch  # lazily: `deltaplane --help` should not wait for torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

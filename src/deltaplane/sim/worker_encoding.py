"""Encoding a forked worker's clients' payloads in the worker, where a device would encode its own update.

With ``threads=2`` the batched simulator trains a second share of each round's clients in a forked worker
(:class:`~deltaplane.sim.batched.BatchedTrainer`). Its share's deltas used to come back to this process, which
encoded them into payloads after its own share's (~0.6 ms a round on the default workload), while the worker,
done with its share and the last round's scoring, waited for the next round. When every one of the share's
compressors is :attr:`~deltaplane.codecs.Compressor.memoryless` (an exact, stateless codec such as the
default ``identity``, with nothing carried between rounds) a copy of it encodes the very bytes the device's own
would, so the worker encodes the share with copies and hands back the payloads; this process counts the
round on each device's own compressor (:meth:`~deltaplane.codecs.Compressor.count_encoded_copy`) and delivers
the payloads as they came. Any other codec (lossy with error feedback, stochastic, stateful) is encoded here,
as before: its state lives with the device.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from deltaplane.codecs import Compressor
from deltaplane.engine import ClientStep, Upload
from deltaplane.engine.federation import Client
from deltaplane.errors import DeltaplaneError
from deltaplane.sim.batched import BatchedTrainer, FinishedShare
from deltaplane.sim.forked_workers import ForkContexts

__all__ = ["WorkerEncoding"]

#: What each run's forked worker encodes with (the run's client step, whose wire sessions and base id frame
#: the payloads, its codec spec and error-feedback setting, and the copies of compressors it made).
_CONTEXT = ForkContexts("encoding")


def _encode_forked(deltas: dict[str, Tensor], key: int, version: int) -> list[bytes | DeltaplaneError]:
    """A worker share's payloads (runs in the forked worker): its deltas ``{name: (C, *shape)}`` compressed
    with copies of the devices' memoryless compressors, as :meth:`~deltaplane.engine.ClientStep.compress_stacked`
    compresses them; a device whose compression fails gets its error."""
    step, spec, error_feedback, copies = _CONTEXT.of(key)
    rows = next(iter(deltas.values())).shape[0]
    while len(copies) < rows:  # made once, reused: a memoryless compressor stays so
        copies.append(Compressor(spec, error_feedback=error_feedback))
    return step.compress_stacked(copies[:rows], deltas, version=version)


class WorkerEncoding:
    """A run's worker-side encoding (see the module's docstring).

    Create it before the trainer's first :meth:`~deltaplane.sim.batched.BatchedTrainer.start` (the fork), pass
    :meth:`finish` as that start's ``worker_finish`` for a round whose devices all qualify (:meth:`covers`),
    turn the worker's :class:`~deltaplane.sim.batched.FinishedShare` into uploads with :meth:`uploads`, and
    :meth:`close` it after the run.
    """

    def __init__(self, trainer: BatchedTrainer, step: ClientStep, clients: list[Client]) -> None:
        self._step = step
        # the run's codec and setting, as its devices' compressors were built (a device whose compressor
        # differs, or carries state, is not covered)
        first = clients[0].compressor if clients else None
        self._spec = first.codec.spec if first is not None else ""
        self._error_feedback = first.error_feedback if first is not None else False
        self._key = _CONTEXT.register(trainer, (step, self._spec, self._error_feedback, []))

    def covers(self, clients: list[Client]) -> bool:
        """Whether the worker may encode these devices' updates: every stage after training leaves them as
        they are, and every device's compressor is memoryless, with the run's one codec and setting."""
        return (
            self._step.stackable
            and bool(clients)
            and all(
                c.compressor.memoryless
                and c.compressor.codec.spec == self._spec
                and c.compressor.error_feedback == self._error_feedback
                for c in clients
            )
        )

    def finish(self, version: int) -> tuple[Any, tuple[Any, ...]]:
        """``worker_finish`` for a round whose devices train from global version ``version``."""
        return (_encode_forked, (self._key, version))

    @staticmethod
    def uploads(clients: list[Client], share: FinishedShare) -> list[Upload]:
        """The uploads of a share the worker encoded (``clients`` in the share's order): each device's own
        compressor counts the round its copy compressed; a device whose compression failed is refused."""
        out: list[Upload] = []
        for c, p in zip(clients, share.value, strict=True):
            if isinstance(p, DeltaplaneError):
                out.append(Upload(c.cid, c.num_samples, error=p))
                continue
            c.compressor.count_encoded_copy()
            out.append(Upload(c.cid, c.num_samples, payload=p))
        return out

    def close(self) -> None:
        """Forget the run's context (the worker keeps its copy until the trainer stops it)."""
        _CONTEXT.forget(self._key)

"""Train many small clients at once: one SGD computation over all clients' stacked weights.

A round of the sequential simulator runs ``Σ_clients epochs · ⌈n_c / B⌉`` tiny optimizer steps one after
another, each a handful of kernel launches on a batch of 32 images: Python and dispatch overhead, not
arithmetic, is what it pays for. Here the clients of a round train *simultaneously*: their weights are one
``(C, P)`` tensor, so a round costs ``max_clients epochs · ⌈n_c / B⌉`` batched steps and an SGD update of every
client is three tensor operations. A step's gradients come from

* the model's own ``forward_stacked(params, x)`` if it has one (``DigitsCNN``: grouped, channels-last
  convolutions and batched matrix products) and one ordinary backward pass of the summed per-client losses —
  client ``k``'s loss depends only on its own weights, so each gets exactly its own gradient; or
* ``vmap(grad(loss))`` over ``torch.func.functional_call`` for any other model (the approach of pfl-research
  and of JAX FL simulators, https://arxiv.org/abs/2404.06430), about 2.5× slower per step on CPU.

The result equals the sequential path's up to floating-point rounding, because every choice is the same:

* each client's batch order is drawn from *its own* generator with the same ``torch.randperm(n)`` calls per
  epoch, in the same order, as :meth:`deltaplane.sim.client.Client.local_update`;
* clients hold different numbers of samples, so batches are padded to ``B`` with a weight per sample, ``1/n``
  for each of a batch's ``n`` real samples and 0 for padding, and the loss of a batch is ``Σ wᵢ·ℓᵢ`` — the
  mean over its real samples, as ``cross_entropy`` computes it for the short last batch (the gradient of
  each ``ℓᵢ`` is the same ``1/n`` as dividing the 0/1-masked sum by ``n`` gives, bit for bit, in one
  ``torch.dot`` instead of five small operations and their backward nodes);
* SGD with momentum is written out as ``torch.optim.SGD`` computes it (``buf ← μ·buf + g``, the first step
  ``buf = g``; ``p ← p − lr·buf``), fresh every round. Clients are stacked longest first, so the ones still
  training at a step are a prefix of the stack; a finished client drops out of the computation.

A model with tied weights (one parameter under two names, :mod:`deltaplane.engine.tied`) is stacked once per
parameter, under the name a device's update carries it (the kept name, the last); the forward pass sees the
same stacked tensor under every name, so its gradient sums every use, as autograd sums it in the loop, and the
delta holds the parameter once, as a device's untied update does (the server copies it to the aliases).

Only models without buffers (no BatchNorm running statistics), with only floating-point
parameters and without random layers (dropout) are batched; :func:`batching_blocker` says why another model is not, and the simulator
then falls back to the sequential loop. A random layer is not batched because the loop draws each device's
masks from that device's own seed (:func:`deltaplane.seeding.seeded_random_layers`), while a stacked step can
only draw them from one generator for the whole stack (``vmap``'s ``randomness="different"``), so a device's
masks, and its update, would depend on which devices share its chunk and worker. The number of clients trained at once adapts to a memory budget
(:func:`clients_per_chunk`).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import weakref
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from deltaplane.data.dataset import Dataset
from deltaplane.engine.tied import tied_aliases
from deltaplane.errors import ConfigError, DeltaplaneError
from deltaplane.sim.forked_workers import ForkedWorkers, tree_map

if TYPE_CHECKING:
    from deltaplane.engine.task import Task

__all__ = [
    "BatchedTrainer",
    "FinishedShare",
    "batching_blocker",
    "clients_per_chunk",
    "loss_blocker",
    "per_client_bytes",
    "retain_freed_memory",
    "task_blocker",
]

_F32 = 4


def batching_blocker(model: nn.Module, sample: Tensor | None = None) -> str | None:
    """Why ``model`` cannot be trained by :class:`BatchedTrainer`, or ``None`` if it can.

    Stacked training gives each client its own copy of the parameters only: the model's buffers are one copy
    shared by every client, so a buffer the forward pass updates in place (BatchNorm's running statistics) would
    mix the clients, and a constant one cannot be told from it (a tied parameter, one tensor under two names, is
    stacked once: see the module); non-float parameters have no gradient; frozen
    ones (``requires_grad=False``) would be trained; other float types than float32 are left to the sequential
    loop. Random layers (dropout modules with ``p > 0``, RReLU) are found by type; with a ``sample`` input the
    model also runs one forward pass in training mode, in a fork of torch's global generator, and a pass that
    draws from it (``F.dropout`` called in ``forward``) is refused too.
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        # the reason as it is: a constant int buffer is refused too, not because it changes but because
        # nothing here can tell it from one that does
        return (
            f"model {type(model).__name__} has buffers ({', '.join(buffers[:3])}); stacked training keeps one "
            "copy of a buffer for all clients, and cannot tell a constant buffer from one each client's forward "
            "pass updates (as BatchNorm's running statistics)"
        )
    ints = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if ints:
        return f"model {type(model).__name__} has non-float parameters ({', '.join(ints[:3])})"
    # the stacked step updates every parameter; the loop's torch.optim.SGD leaves a frozen one (no grad) as it is
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        return f"model {type(model).__name__} has frozen parameters ({', '.join(frozen[:3])}, requires_grad=False)"
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if len(dtypes) > 1:  # the clients' weights are stacked as one (clients × parameters) tensor
        return f"model {type(model).__name__} mixes parameter dtypes ({', '.join(dtypes)})"
    if dtypes and dtypes != [str(torch.float32)]:
        # the batch plan's sample weights, the memory estimate and the forked workers' numpy hand-over are
        # float32 (numpy has no bfloat16)
        return (
            f"model {type(model).__name__} has {dtypes[0]} parameters; batched training is for float32 models"
        )
    if not any(True for _ in model.parameters()):
        return f"model {type(model).__name__} has no parameters"
    random = [
        f"{name or 'the model'}: {type(m).__name__}"
        for name, m in model.named_modules()
        if _is_random_layer(m)
    ]
    if random or (sample is not None and _draws_random_numbers(model, sample)):
        where = (
            f" ({', '.join(random[:3])})" if random else " (its forward pass draws from torch's generator)"
        )
        return (
            f"model {type(model).__name__} has random layers{where}; the sequential loop draws each device's "
            "dropout masks from its own seed, stacked training could only draw them for the whole stack at once"
        )
    return None


def loss_blocker(model: nn.Module, loss: Callable[..., Tensor], x: Tensor, y: Tensor) -> str | None:
    """Why the stacked step cannot take the task's ``loss`` on ``model``, or ``None`` if it can.

    The stacked step weighs each sample's loss, ``loss(logits, y, reduction="none")`` (one value per sample),
    and without ``forward_stacked`` computes it under ``torch.func.vmap``. A loss that returns more than one
    value per sample (``mse_loss`` against one-hot targets) or does what vmap cannot (``F.one_hot``, ``.item()``)
    trains on the sequential loop, which only takes the mean, but raised a bare ``RuntimeError`` in round 1
    here. So the step runs once, for one client on the first two samples of ``x`` and ``y``, exactly as the
    trainer would; call it on a model that :func:`batching_blocker` passes.
    """
    names = _trained_names(model)
    step_grads, _ = _step_grads(model, names, loss)
    n = min(2, len(x))
    state = dict(model.named_parameters(remove_duplicate=False))
    params = [state[name].detach().unsqueeze(0) for name in names]
    try:
        with torch.random.fork_rng(devices=[]):
            step_grads(params, x[:n].unsqueeze(0), y[:n].unsqueeze(0), torch.full((1, n), 1 / n))
    except Exception as exc:  # any failure of the user's loss under the stacked step is the reason
        first = str(exc).splitlines()[0] if str(exc) else ""
        return (
            f"the task's loss cannot run in the stacked step ({type(exc).__name__}: {first[:160]}); it must "
            "return one value per sample with reduction='none' and run under torch.func.vmap"
        )
    return None


def task_blocker(model: nn.Module, task: Task) -> str | None:
    """Why ``task``'s devices cannot train stacked on ``model``, or ``None``: :func:`batching_blocker` with one of
    the task's test inputs, then :func:`loss_blocker` on its test data (the batched engine then falls back to
    the sequential loop; the population engine refuses the run)."""
    has_data = len(task.test) > 0
    reason = batching_blocker(model, task.test.x[:1] if has_data else None)
    if reason is None and has_data:
        reason = loss_blocker(model, task.loss, task.test.x, task.test.y)
    return reason


def _trained_names(model: nn.Module) -> list[str]:
    """The parameters a stacked step trains, by the name a device's update carries each: every parameter once,
    a tied one under its kept name (:func:`~deltaplane.engine.tied.tied_aliases`), in the state dict's order,
    as a device's untied delta lists them."""
    aliases = tied_aliases(model)
    return [name for name, _ in model.named_parameters(remove_duplicate=False) if name not in aliases]


def _is_random_layer(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers in training mode (the dropout family with ``p > 0``, RReLU)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return isinstance(module, nn.RReLU)


def _draws_random_numbers(model: nn.Module, sample: Tensor) -> bool:
    """Whether one forward pass of ``sample[:1]`` in training mode draws from torch's global CPU generator
    (run in a fork of it, without gradients; the model's mode is restored)."""
    was = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.train()
            before = torch.get_rng_state()
            model(sample[:1])
            return not torch.equal(before, torch.get_rng_state())
    finally:
        model.train(was)


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_TUNED = False


def retain_freed_memory(trim_threshold: int = 256 * 2**20, mmap_threshold: int = 32 * 2**20) -> bool:
    """Let glibc's allocator keep freed memory for reuse instead of handing it back to the kernel at once.

    A batched step allocates and frees a few megabytes of activations and gradients, thousands of times a
    run. With glibc's defaults those blocks are mapped fresh (``mmap``) or the heap top is trimmed after each
    step, so every step pays page faults to zero new pages: ``fill_`` of max-pool's 2.6 MB gradient showed as
    10% of a step. Raising the trim and mmap thresholds (as ``MALLOC_TRIM_THRESHOLD_`` /
    ``MALLOC_MMAP_THRESHOLD_`` would; PyTorch's CPU performance guide suggests jemalloc or tcmalloc for the
    same reason) took 10-15% off a simulated round (``benchmarks/sim_speed.py``). The process keeps up to
    ``trim_threshold`` bytes of freed heap; nothing else changes. Done once per process, on glibc only;
    returns whether it applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(
            libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        )
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def per_client_bytes(model: nn.Module, sample: Tensor, batch_size: int) -> int:
    """Estimated peak bytes one client adds to a batched step: its weights, momentum, gradient and delta
    (4 copies of the parameters) plus the activations of one batch kept for the backward pass.

    Activations are measured, not guessed: one forward pass of a single sample with hooks that add up every
    module's output size; the backward pass needs about as much again for their gradients.
    """
    numel = sum(p.numel() for p in model.parameters())
    activations = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal activations
        if isinstance(output, Tensor):
            activations += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return _F32 * (4 * numel + 2 * batch_size * (activations + sample[:1].numel()))


def clients_per_chunk(model: nn.Module, sample: Tensor, batch_size: int, memory_budget: int) -> int:
    """How many clients :class:`BatchedTrainer` trains at once within ``memory_budget`` bytes (at least 1)."""
    if memory_budget <= 0:
        raise ConfigError(f"memory_budget must be positive. Found {memory_budget}")
    return max(1, memory_budget // per_client_bytes(model, sample, batch_size))


def _step_grads(
    model: nn.Module, names: list[str], loss: Callable[..., Tensor]
) -> tuple[Callable[[list[Tensor], Tensor, Tensor, Tensor], list[Tensor]], bool]:
    """A batched step's gradients for ``loss``: ``step_grads(params, x, y, w)`` with each parameter stacked
    ``(K, *shape)``, and whether it runs the model's ``forward_stacked`` (else ``vmap`` over
    ``functional_call``, which swaps the module's own parameters while it runs: one group at a time).

    The closures name ``names`` and ``model``, not the trainer: no reference cycle, so a trainer nobody closes is
    freed (and its worker processes stopped) as soon as its last reference goes.

    ``names`` are :func:`_trained_names`: a tied parameter once, under its kept name. ``functional_call`` (whose
    ``tie_weights`` is on) uses that tensor under every name the module ties, and ``forward_stacked`` is given
    it under each alias too, so either way the gradient sums every use of the parameter."""
    task_loss = loss
    aliases = tied_aliases(model)

    def batch_loss(params: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        logits = functional_call(model, params, (x,))
        # Mean over the real samples of this (possibly short, padded) batch: w is 1/n_real or 0 (_batch_plan)
        return torch.dot(task_loss(logits, y, reduction="none"), w)

    stacked_forward = getattr(model, "forward_stacked", None)
    if callable(stacked_forward):
        # The model evaluates all its stacked copies in one pass (DigitsCNN: grouped convolutions), so one
        # ordinary backward pass of the *sum* of the clients' losses yields every client's own gradient:
        # client k's loss depends only on its own weights.
        def step_grads(params: list[Tensor], x: Tensor, y: Tensor, w: Tensor) -> list[Tensor]:
            leaves = [p.detach().requires_grad_(True) for p in params]
            with torch.enable_grad():
                named = dict(zip(names, leaves, strict=True))
                named |= {alias: named[kept] for alias, kept in aliases.items()}  # one leaf under each name
                logits = stacked_forward(named, x)  # (K, B, classes)
                # Σ over clients of each one's mean over its real samples: w is 1/n_real or 0 (_batch_plan)
                losses = task_loss(logits.flatten(0, 1), y.flatten(), reduction="none")
                return list(torch.autograd.grad(torch.dot(losses, w.flatten()), leaves))

    else:
        per_client = vmap(grad(batch_loss))

        def step_grads(params: list[Tensor], x: Tensor, y: Tensor, w: Tensor) -> list[Tensor]:
            grads = per_client(dict(zip(names, params, strict=True)), x, y, w)
            return [grads[n] for n in names]

    return step_grads, callable(stacked_forward)


class BatchedTrainer:
    """Local SGD for many clients of one architecture at once; results equal the sequential loop's.

    Args:
        model: the architecture (its current weights are ignored; :meth:`train` takes the start point).
        loss: the task's loss, ``loss(logits, y, reduction="none")`` (cross-entropy by default).
        memory_budget: bytes the stacked weights and activations of one chunk may use; clients beyond what
            fits are trained in further chunks (see :func:`clients_per_chunk`).
        workers: disjoint groups of the clients trained side by side, each with one torch intra-op thread:
            the caller's thread and ``workers - 1`` forked processes (threads where the platform cannot fork;
            see :meth:`_executor`). Results do not depend on it beyond float rounding.

    Raises:
        ConfigError: if ``model`` cannot be batched (:func:`batching_blocker`).

    Example:
        >>> import torch
        >>> from deltaplane.data.digits import load_digits
        >>> from deltaplane.data.models import build_model
        >>> data = load_digits()
        >>> shards = [data.subset(range(0, 50)), data.subset(range(50, 120))]
        >>> gens = [torch.Generator().manual_seed(i) for i in range(2)]
        >>> model = build_model(0)
        >>> deltas = BatchedTrainer(model).train(model.state_dict(), shards, gens,
        ...     epochs=1, batch_size=32, lr=0.1, momentum=0.9)
        >>> deltas["fc2.weight"].shape  # one delta per client, stacked
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        memory_budget: int = 256 * 2**20,
        loss: Callable[..., Tensor] = nn.functional.cross_entropy,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ConfigError(f"workers must be at least 1. Found {workers}")
        reason = batching_blocker(model)
        if reason is not None:
            raise ConfigError(
                f"cannot train clients batched: {reason}; train them one at a time (engine='sequential')"
            )
        if memory_budget <= 0:
            raise ConfigError(f"memory_budget must be positive. Found {memory_budget}")
        retain_freed_memory()
        self.model = model
        self.memory_budget = memory_budget
        self.workers = workers
        #: the trained parameters' names (:func:`_trained_names`): a tied one once, under its kept name, as a
        #: device's update carries it
        self.names = names = _trained_names(model)
        self._aliases = tied_aliases(model)
        self._param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self._step_grads, stacked = _step_grads(model, names, loss)
        if not stacked:
            # functional_call swaps the module's own parameters while it runs: one group at a time
            self.workers = 1
        #: step functions for other losses than the task's (personal training's cross-entropy), by loss
        self._loss = loss
        self._other_steps: dict[Callable[..., Tensor], Callable[..., list[Tensor]]] = {}
        # recent chunks' clients and their zero-padded data, by the chunk's dataset ids: a full-participation
        # run trains the same chunks every round, so their data is stacked once (the datasets are held, so
        # an id cannot be reused while its entry lives)
        self._data_cache: dict[tuple[int, ...], tuple[list[Dataset], Tensor, Tensor]] = {}
        self._chunk_cache: dict[tuple[tuple[int, ...], int], int] = {}
        self._pool: Executor | None = None
        self._probed = False  # whether start() has run the model once to look for random draws
        # the stacked data the forked workers already hold: what _data_cache held when they were forked, by
        # key (the chunk's dataset ids), with the datasets themselves: holding them keeps another dataset from
        # taking one of their ids, and so a key, while the workers hold that key's data
        self._forked_data: dict[tuple[int, ...], list[Dataset]] = {}

    def _stacked_data(self, datasets: Sequence[Dataset]) -> tuple[Tensor, Tensor]:
        """``x`` ``(C, n_max, ...)`` and ``y`` ``(C, n_max)``: each client's samples, zero-padded."""
        key = tuple(id(d) for d in datasets)
        cached = self._data_cache.get(key)
        if cached is not None:
            return cached[1], cached[2]
        longest = max(len(d) for d in datasets)
        x = torch.zeros((len(datasets), longest, *datasets[0].x.shape[1:]), dtype=datasets[0].x.dtype)
        y = torch.zeros((len(datasets), longest), dtype=datasets[0].y.dtype)
        for c, d in enumerate(datasets):
            x[c, : len(d)] = d.x
            y[c, : len(d)] = d.y
        if len(self._data_cache) >= 4 * self.workers:  # bounded: a sampled population brings new chunks
            self._data_cache.pop(next(iter(self._data_cache)))
        self._data_cache[key] = (list(datasets), x, y)
        return x, y

    def _clients_per_chunk(self, sample: Tensor, batch_size: int) -> int:
        """:func:`clients_per_chunk`, measured once per input shape and batch size."""
        key = (tuple(sample.shape[1:]), batch_size)
        if key not in self._chunk_cache:
            self._chunk_cache[key] = clients_per_chunk(self.model, sample, batch_size, self.memory_budget)
        return self._chunk_cache[key]

    def train(
        self,
        global_state: dict[str, Tensor],
        datasets: Sequence[Dataset],
        generators: Sequence[torch.Generator | int],
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float,
        prox_mu: float = 0.0,
    ) -> dict[str, Tensor]:
        """Train one copy of ``global_state`` per dataset; return the deltas stacked as ``(C, *shape)``.

        ``generators[i]`` decides client ``i``'s batch order exactly as in the sequential path (one
        ``torch.randperm`` per epoch) and is advanced as it would be there; or it is a seed (an ``int``), and
        a fresh ``torch.Generator().manual_seed(seed)`` does that where the client trains (a forked worker
        draws its own clients' batch orders: the caller neither draws nor sends them). ``prox_mu > 0`` adds FedProx's
        proximal term ``μ/2 ‖w − w_global‖²`` (https://arxiv.org/abs/1812.06127), as the sequential path does.
        """
        return self.start(
            global_state,
            datasets,
            generators,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            prox_mu=prox_mu,
        ).result()

    def start(
        self,
        global_state: dict[str, Tensor],
        datasets: Sequence[Dataset],
        generators: Sequence[torch.Generator | int],
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float,
        prox_mu: float = 0.0,
        caller_share: float = 1.0,
        worker_finish: tuple[Callable[..., Any], tuple[Any, ...]] | None = None,
    ) -> PendingTraining:
        """:meth:`train`, begun: the batch orders are drawn (the generators advance now) and the forked
        workers' shares are sent off; :meth:`PendingTraining.result` trains the caller's own share and
        collects. In between the caller is free for other work while the workers train.

        ``caller_share`` is the caller's capacity relative to a worker's when the clients are split (1: equal
        estimated work each). A caller that does other work before it asks for the result gives the workers
        a head start and should take less (the simulator passes :data:`PREFETCH_CALLER_SHARE`). The split
        moves whole clients between groups: a client's arithmetic stays the same, but its stack-mates change,
        which can change the float rounding of its delta, so a run keeps one share for all its rounds.

        ``worker_finish=(fn, args)`` has each forked worker hand back ``fn(deltas, *args)`` for its share instead
        of the deltas (``deltas`` stacked ``{name: (C, *shape)}``, its clients in the order
        :meth:`PendingTraining.parts` gives their positions): the simulator's workers encode their clients'
        payloads there (:mod:`deltaplane.sim.worker_encoding`). ``fn`` is pickled by name (a module-level
        function) and sees the worker's memory as it was at the fork. Such a share comes out of
        :meth:`PendingTraining.parts` as a :class:`FinishedShare`; shares trained by the caller, or on worker
        threads, are deltas as always."""
        if prox_mu < 0:
            raise ConfigError(f"prox_mu must be non-negative. Found {prox_mu}")
        if len(datasets) != len(generators):
            raise ConfigError(f"{len(datasets)} datasets but {len(generators)} generators")
        if not datasets:
            raise ConfigError("no clients to train")
        if any(len(d) == 0 for d in datasets):
            raise ConfigError("every client needs at least one training sample")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1. Found {batch_size}")
        # A batch never holds more than a client's samples: beyond the largest client, batch_size only pads
        # (every client then takes its whole data as one batch an epoch, as with the largest client's count),
        # and padding costs as much as real samples (batch_size 10**6 on 3 clients trained for minutes).
        batch_size = min(batch_size, max(len(d) for d in datasets))
        if not (isinstance(caller_share, int | float) and 0 < caller_share <= 1):
            raise ConfigError(f"caller_share must be in (0, 1]. Found {caller_share!r}")
        for g in generators:
            if not isinstance(g, torch.Generator) and not (type(g) is int and 0 <= g < 2**63):
                raise ConfigError(
                    f"each generator must be a torch.Generator or a seed in [0, 2**63). Found {g!r}"
                )
        if not self._probed:  # a random op the module types do not show (F.dropout in forward): refused too
            reason = batching_blocker(self.model, datasets[0].x[:1])
            if reason is not None:
                raise ConfigError(
                    f"cannot train clients batched: {reason}; train them one at a time (engine='sequential')"
                )
            self._probed = True
        chunk = self._clients_per_chunk(datasets[0].x[:1], batch_size)
        # Clients of similar size share a chunk, so few of them idle while the longest one finishes; with
        # several workers, the groups get similar estimated work (_balanced_groups).
        order = sorted(range(len(datasets)), key=lambda c: -len(datasets[c]))
        n_workers = min(self.workers, len(order))
        steps = [epochs * math.ceil(len(datasets[c]) / batch_size) for c in order]
        groups = _balanced_groups(order, steps, n_workers, caller_share=caller_share)
        chunks = [g[i : i + chunk] for g in groups for i in range(0, len(g), chunk)]

        # Batch orders are drawn here, in the caller's process and thread, so every client's generator advances
        # exactly as the sequential loop advances it, whichever worker then trains the client; a chunk of a
        # forked worker whose clients all come as seeds is drawn there instead (the same draws: _draw_plan).
        def job(members: list[int], *, forked: bool = False) -> dict[str, Any]:
            shards = [datasets[c] for c in members]
            x, y = self._stacked_data(shards)
            sizes = [len(d) for d in shards]
            gens = [generators[c] for c in members]
            seeded = forked and all(isinstance(g, int) for g in gens)
            return {
                "data_key": tuple(id(d) for d in shards),
                "global_state": global_state,
                "x": x,
                "y": y,
                **(
                    {"draw": (sizes, gens, epochs, batch_size)}
                    if seeded
                    else {"plan": _batch_plan(sizes, [_generator(g) for g in gens], epochs, batch_size)}
                ),
                "lr": lr,
                "momentum": momentum,
                "prox_mu": prox_mu,
            }

        if n_workers == 1:
            return PendingTraining(self, [], [job(m) for m in chunks], chunks)
        if self._pool is None:
            # The workers are forked below: stack the chunks' data first, so that they inherit it, and a run
            # that trains the same chunks again (full participation) sends a worker only the start weights
            # and the batch plan each round (_lean). Stacked after the fork, the default federation's data
            # (274 KB of a 387 KB job) crossed the pipe every round, and a job larger than the socket's
            # buffer kept the caller writing until the worker, busy scoring, read it.
            for members in chunks:
                self._stacked_data([datasets[c] for c in members])
        # a chunk's deltas, or the payloads a worker encodes from them (a little framing more each)
        arena = chunk * (self._param_bytes + framing_allowance(len(self.names)))
        if isinstance(pool := self._executor(arena_bytes=arena), ForkedWorkers):
            # The caller trains the last group itself meanwhile, instead of waiting: `workers` CPUs in all.
            # Each worker job is sent off as soon as it is planned, before the caller plans its own share.
            # Jobs cross as numpy arrays, which pickle by value: a tensor would cross as a shared-memory file
            # descriptor handed over on a socket connection of its own, ~1 ms each (30-40 ms a round).
            own = len(chunks) - math.ceil(len(groups[-1]) / chunk)
            futures = [
                pool.submit_to(
                    worker,
                    _train_forked,
                    id(self),
                    tree_map(
                        _lean(job(m, forked=True), self._forked_data)
                        | ({"finish": worker_finish} if worker_finish else {}),
                        Tensor,
                        lambda t: t.numpy(),
                    ),
                )
                for worker, m in _chunk_workers(groups, chunks[:own], chunk)
            ]
            return PendingTraining(self, futures, [job(m) for m in chunks[own:]], chunks)
        # worker threads (no fork here): every share on the pool, tensors in and out
        jobs = [job(m) for m in chunks]
        futures = [pool.submit(_train_here, self, job) for job in jobs]
        return PendingTraining(self, futures, [], chunks)

    def _executor(self, *, arena_bytes: int = 0) -> Executor:
        """The workers, started once, each running torch on one intra-op thread (never oversubscribed:
        ``workers`` CPUs in all, instead of ``workers`` × torch's own pool).

        Where the platform can fork (Linux): ``workers - 1`` processes forked from this one, the caller being
        the last worker. Two worker *threads* of one process hardly beat one on a 2-core machine (measured:
        166 ms against 179 ms for one round's training, two forked processes 87 ms), since every one of a
        step's hundreds of small kernels hands the GIL back and forth. A forked worker inherits this trainer
        (model, loss) as it was at the fork, so only a chunk's data, its batch plan and the start weights
        travel; a chunk's deltas come back in shared memory (``arena_bytes``, at most :data:`_MAX_ARENA`; see
        :mod:`deltaplane.sim.forked_workers`). Elsewhere: ``workers`` threads.
        """
        if isinstance(self._pool, ForkedWorkers) and self._pool.stopped:  # interrupted: start afresh
            self._pool = None
        if self._pool is None:
            if "fork" in multiprocessing.get_all_start_methods():
                _FORKED[id(self)] = self  # what the forked workers find (_train_forked)
                # and the stacked data they inherit with it
                self._forked_data = {key: entry[0] for key, entry in self._data_cache.items()}
                try:
                    arena = arena_bytes if arena_bytes <= _MAX_ARENA else 0  # larger: the pipe
                    pool = ForkedWorkers(self.workers - 1, arena_bytes=arena)  # and the caller
                finally:
                    del _FORKED[id(self)]  # the workers hold their copy; here it would keep the trainer alive
                self._pool = pool
            else:
                self._pool = ThreadPoolExecutor(
                    self.workers,
                    thread_name_prefix="batched-trainer",
                    initializer=torch.set_num_threads,
                    initargs=(1,),
                )
            # the workers would outlive a trainer nobody closed: stop them with it
            weakref.finalize(self, self._pool.shutdown)
        return self._pool

    def run_in_worker(self, fn: Callable[..., Any], /, *args: Any) -> Future | None:
        """``fn(*args)`` in a forked worker process, after the jobs already sent to it (the first worker's), as
        a future; ``None`` where the trainer has no forked worker (one worker, or no fork on this platform)
        or has not started them yet (:meth:`start` does).

        For work the caller would otherwise do while a worker idles: a worker that has trained its share
        waits for the next round's model, which the caller is still closing. ``fn`` and ``args`` are pickled
        (``fn`` by name: a module-level function), and ``fn`` sees the worker's memory as it was at the fork.
        """
        if not isinstance(self._pool, ForkedWorkers):
            return None
        return self._pool.submit_to(0, fn, *args)

    def close(self) -> None:
        """Stop the workers (they stop with the process anyway; a new :meth:`train` restarts them)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _train_chunk(
        self,
        global_state: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        plan: tuple[Tensor, Tensor, list[int]],
        *,
        lr: float,
        momentum: float,
        prox_mu: float,
    ) -> dict[str, Tensor]:
        """One chunk's SGD: ``x``, ``y`` its clients' zero-padded samples, ``plan`` their :func:`_batch_plan`."""
        start = [global_state[n].detach() for n in self.names]
        params = [t.unsqueeze(0).repeat(x.shape[0], *([1] * t.dim())) for t in start]
        self._sgd(params, x, y, plan, lr=lr, momentum=momentum, prox_mu=prox_mu, anchors=start)
        return {n: p - t for n, p, t in zip(self.names, params, start, strict=True)}

    def _sgd(
        self,
        params: list[Tensor],
        x: Tensor,
        y: Tensor,
        plan: tuple[Tensor, Tensor, list[int]],
        *,
        lr: float,
        momentum: float,
        prox_mu: float,
        anchors: list[Tensor],
        step_grads: Callable[..., list[Tensor]] | None = None,
    ) -> None:
        """SGD with momentum on the stacked ``params`` (each ``(C, *shape)``, in :attr:`names` order), in place:
        ``plan`` is the clients' :func:`_batch_plan`; with ``prox_mu > 0`` the proximal term
        ``μ/2 ‖w − anchor‖²`` pulls every client toward ``anchors`` (one unstacked tensor per parameter)."""
        # The clients come longest first: at step s the clients still training are a prefix of the stack,
        # so finished ones drop out of the computation instead of being carried along as masked padding.
        idx, weight, active = plan
        step_grads = step_grads or self._step_grads
        self.model.train()  # as the sequential loop trains (a module whose forward looks at self.training)
        rows = torch.arange(x.shape[0]).unsqueeze(1)  # (C, 1): pairs each client with its own indices

        # Each parameter holds all clients' copies, (C, *shape); the clients still training at step s are the
        # first k rows, so an SGD step of every client is three multi-tensor (foreach) operations.
        bufs = [torch.zeros_like(p) for p in params]
        for s, k in enumerate(active):
            i, w = idx[s, :k], weight[s, :k]
            live, live_bufs = [p[:k] for p in params], [b[:k] for b in bufs]
            g: list[Tensor] | tuple[Tensor, ...] = step_grads(live, x[rows[:k], i], y[rows[:k], i], w)
            with torch.no_grad():
                if prox_mu > 0:  # ∇ μ/2 ‖w − anchor‖² = μ (w − anchor)
                    g = torch._foreach_add(g, torch._foreach_sub(live, anchors), alpha=prox_mu)
                # torch.optim.SGD (dampening 0, no Nesterov): buf ← μ·buf + g, first buf = g (= μ·0 + g);
                # p ← p − lr·buf.
                torch._foreach_mul_(live_bufs, momentum)
                torch._foreach_add_(live_bufs, g)
                torch._foreach_add_(live, live_bufs, alpha=-lr)

    def train_from(
        self,
        starts: Sequence[Mapping[str, Tensor]],
        datasets: Sequence[Dataset],
        generators: Sequence[torch.Generator],
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float,
        prox_center: Mapping[str, Tensor] | None = None,
        prox_lambda: float = 0.0,
        loss: Callable[..., Tensor] | None = None,
    ) -> list[dict[str, Tensor]]:
        """Train each device from its *own* start state ``starts[i]`` on ``datasets[i]``; return the trained
        weights (the model's parameters by name, a tied one under each of its names), one dict per device in the order given.

        The personal training of α-mix and Ditto (:mod:`deltaplane.personalization`) on the stack: each device
        draws its batch order from ``generators[i]`` exactly as
        :func:`~deltaplane.personalization.train_sgd` does (one ``torch.randperm`` per epoch), and with
        ``prox_center`` and ``prox_lambda > 0`` the loss gets Ditto's ``λ/2 ‖θ − θ_center‖²``, so the result
        equals that loop's up to float rounding. ``loss`` (the trainer's own by default) is
        ``loss(logits, y, reduction="none")``. Trained in this process only, chunk by chunk within the memory
        budget: the forked workers, if any, keep training and scoring what the simulator sent them.

        Raises:
            ConfigError: mismatched lengths, an empty dataset, a start state without some parameter.
        """
        if not (len(starts) == len(datasets) == len(generators)):
            raise ConfigError(
                f"{len(starts)} start states, {len(datasets)} datasets, {len(generators)} generators"
            )
        if not datasets:
            return []
        if any(len(d) == 0 for d in datasets):
            raise ConfigError("every device needs at least one training sample")
        if epochs < 0 or batch_size < 1 or prox_lambda < 0:
            raise ConfigError(
                f"epochs >= 0, batch_size >= 1 and prox_lambda >= 0 needed. Found {epochs}, {batch_size}, {prox_lambda}"
            )
        missing = [n for n in self.names if any(n not in s for s in starts)]
        if missing:
            raise ConfigError(f"start states lack parameters {missing[:3]}")
        step_grads = self._step_grads
        if loss is not None and loss is not self._loss:
            if loss not in self._other_steps:
                self._other_steps[loss] = _step_grads(self.model, self.names, loss)[0]
            step_grads = self._other_steps[loss]
        batch_size = min(batch_size, max(len(d) for d in datasets))  # as start(): larger only pads
        anchors = (
            [prox_center[n].detach() for n in self.names]
            if prox_center is not None and prox_lambda > 0
            else []
        )
        chunk = self._clients_per_chunk(datasets[0].x[:1], batch_size)
        order = sorted(range(len(datasets)), key=lambda c: -len(datasets[c]))
        out: list[dict[str, Tensor]] = [{} for _ in datasets]
        for first in range(0, len(order), chunk):
            members = order[first : first + chunk]
            x, y = self._stacked_data([datasets[c] for c in members])
            plan = _batch_plan(
                [len(datasets[c]) for c in members], [generators[c] for c in members], epochs, batch_size
            )
            params = [torch.stack([starts[c][n].detach() for c in members]) for n in self.names]
            self._sgd(
                params,
                x,
                y,
                plan,
                lr=lr,
                momentum=momentum,
                prox_mu=prox_lambda if anchors else 0.0,
                anchors=anchors,
                step_grads=step_grads,
            )
            for row, c in enumerate(members):
                out[c] = {n: p[row].clone() for n, p in zip(self.names, params, strict=True)}
                # a personal model is loaded whole: each alias holds its kept name's (one) tensor
                out[c] |= {alias: out[c][kept] for alias, kept in self._aliases.items()}
        return out


class PendingTraining:
    """A round begun with :meth:`BatchedTrainer.start`: the workers' shares under way, the caller's to train."""

    def __init__(
        self,
        trainer: BatchedTrainer,
        futures: list[Future],
        own: list[dict[str, Any]],
        members: list[list[int]],
    ) -> None:
        # members: each job's clients (positions in the input order), the futures' jobs first, then own's
        self._trainer, self._futures, self._own, self._members = trainer, futures, own, members
        self._parts: list[tuple[list[int], dict[str, Tensor] | FinishedShare]] = []
        self._result: dict[str, Tensor] | None = None

    def parts(self) -> Iterator[tuple[list[int], dict[str, Tensor] | FinishedShare]]:
        """Every client's delta, share by share as it becomes available: first the caller's own share
        (trained now), then each worker's (waited for). Yields ``(positions, stacked)``: the clients'
        positions in the order the datasets were given and their deltas stacked in that order, so a caller
        can encode and send the first share's updates while the workers still train; a worker's share
        finished there (``start(worker_finish=...)``) is a :class:`FinishedShare` instead. Computed once."""
        n_futures = len(self._futures)
        shares: list[tuple[list[int], Callable[[], dict[str, Tensor] | FinishedShare]]] = [
            (members, functools.partial(_train_here, self._trainer, job))
            for job, members in zip(self._own, self._members[n_futures:], strict=True)
        ] + [
            (members, functools.partial(_future_share, f))
            for f, members in zip(self._futures, self._members, strict=False)
        ]
        for i, (members, get) in enumerate(shares):
            if i == len(self._parts):  # not computed by an earlier (possibly abandoned) iteration
                self._parts.append((members, get()))
            yield self._parts[i]

    def result(self) -> dict[str, Tensor]:
        """Train the caller's share, collect the workers', and return every client's delta stacked
        ``{name: (C, *shape)}`` in the order the datasets were given (computed once)."""
        if self._result is None:
            parts = list(self.parts())
            if any(isinstance(p, FinishedShare) for _, p in parts):
                raise DeltaplaneError(
                    "this training's worker shares were finished in the workers (start(worker_finish=...)); "
                    "read them with parts()"
                )
            inverse = _inverse([c for members, _ in parts for c in members])
            stacks = [p for _, p in parts if not isinstance(p, FinishedShare)]  # all of them: checked above
            self._result = {n: torch.cat([p[n] for p in stacks])[inverse] for n in self._trainer.names}
        return self._result


def framing_allowance(n_tensors: int) -> int:
    """Room per client in a forked worker's arena beyond its delta's bytes: an identity payload's framing
    (header, tensor table, CRC; the self-describing table grows with the tensors) and the arena's alignment.
    A share that still does not fit goes down the pipe."""
    return 1024 + 256 * n_tensors


#: the most shared memory a forked worker gets for handing back a chunk's deltas (its arena, only touched
#: pages of which take memory); a chunk whose deltas need more sends them down the pipe
_MAX_ARENA = 1 << 30

#: Trainers whose workers are forked processes, by ``id``: a forked worker finds its trainer here, inherited
#: from the parent's memory, so the model and the loss (often a closure) are never pickled.
_FORKED: dict[int, BatchedTrainer] = {}


def _train_forked(key: int, job: dict[str, Any]) -> dict[str, np.ndarray] | tuple[str, Any]:
    """A forked worker's share of :meth:`BatchedTrainer.train`: one chunk (runs in the worker process); its
    deltas as arrays, or ``(_FINISHED, value)`` when the job carries ``worker_finish`` (read by :func:`_share`)."""
    trainer = _FORKED[key]
    job = tree_map(job, np.ndarray, torch.from_numpy)
    if "x" not in job:  # data the worker inherited at the fork (_lean)
        _, job["x"], job["y"] = trainer._data_cache[job["data_key"]]
    if "draw" in job:  # its clients came as seeds: their batch orders are drawn here
        sizes, seeds, epochs, batch_size = job["draw"]
        job["plan"] = _batch_plan(sizes, [_generator(s) for s in seeds], epochs, batch_size)
    deltas = trainer._train_chunk(**_own(job))
    if "finish" in job:  # start(worker_finish=...): what the caller wants of the deltas, made here
        fn, args = job["finish"]
        return (_FINISHED, fn(deltas, *args))
    return tree_map(deltas, Tensor, lambda t: t.numpy())


#: tags a forked worker's reply that is ``worker_finish``'s result, not deltas (a dict of arrays)
_FINISHED = "finished"


@dataclass(frozen=True)
class FinishedShare:
    """A worker's share as ``start(worker_finish=(fn, args))`` made it: ``value`` is ``fn``'s result."""

    value: Any


def _share(reply: Any) -> dict[str, Tensor] | FinishedShare:
    """A forked worker's reply to :func:`_train_forked`: its share's deltas as tensors, or what it finished."""
    if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == _FINISHED:
        return FinishedShare(reply[1])
    return tree_map(reply, np.ndarray, torch.from_numpy)


def _chunk_workers(
    groups: list[list[int]], chunks: list[list[int]], chunk: int
) -> list[tuple[int, list[int]]]:
    """Each of the workers' chunks with the worker of its group: group ``g`` is worker ``g`` (the chunks
    come group by group, ``⌈len(group)/chunk⌉`` of them each)."""
    owners = [g for g, members in enumerate(groups) for _ in range(math.ceil(len(members) / chunk))]
    return list(zip(owners, chunks, strict=False))


def _lean(job: dict[str, Any], held: Container[tuple[int, ...]]) -> dict[str, Any]:
    """``job`` without the chunk's stacked data if the forked workers hold it already (``held``): a
    full-participation run sends each worker only the start weights and the batch plan each round."""
    if job["data_key"] in held:
        return {k: v for k, v in job.items() if k not in ("x", "y")}
    return job


def _train_here(trainer: BatchedTrainer, job: dict[str, Any]) -> dict[str, Tensor]:
    """One chunk trained in this process (a worker thread, or the caller's own share)."""
    return trainer._train_chunk(**_own(job))


def _future_share(future: Future) -> dict[str, Tensor] | FinishedShare:
    """A forked worker's share, waited for."""
    return _share(future.result())


def _own(job: dict[str, Any]) -> dict[str, Any]:
    """:meth:`BatchedTrainer._train_chunk`'s arguments of a job (without its data key)."""
    return {k: v for k, v in job.items() if k not in ("data_key", "finish", "draw")}


#: estimated cost of one batched step: a fixed part (kernel launches, autograd) worth this many clients'
#: shares of it (DigitsCNN, batch 32, one thread: about 1.0 ms for 1 client, 4.4 ms for 10, 8 ms for 20)
_STEP_OVERHEAD_CLIENTS = 1.6

#: the caller's share (``BatchedTrainer.start(caller_share=...)``) when rounds overlap: the caller sends the
#: worker its job, trains its own share, and encodes and delivers that share's updates before it needs the
#: worker's; the worker scores the last round after its share (simulation._run, sim.worker_scoring) and, with
#: a memoryless codec such as the default identity, encodes its share's payloads (sim.worker_encoding). On the
#: default workload 1.0 gives the worker 42 client-steps and the caller 46; 0.95 (44 and 44) left the worker,
#: which now also encodes, the longer of the two (a round's median paired ratio 1.002 against 0.982 for 1.0,
#: 16 fresh-process pairs each). Before the worker encoded, 0.95 split best.
PREFETCH_CALLER_SHARE = 1.0


def _balanced_groups(
    order: list[int], steps: list[int], n: int, *, caller_share: float = 1.0
) -> list[list[int]]:
    """Split clients (``order``, longest first, with their step counts ``steps``) into ``n`` groups of
    similar estimated time, each kept longest first; the last group (the caller's) works at ``caller_share``
    of a worker's speed, i.e. gets about that share of a worker's load.

    A group's time is about ``overhead · (its most steps) + Σ its clients' steps``: every step pays a fixed
    cost plus a share per client still training. Greedy longest-processing-time assignment on that estimate
    (deterministic: it depends only on the sizes, so the split, and with it the float rounding, is the same
    every run). Dealing clients out in turn gave the worker holding the longest client two more steps than
    the other on the default federation.
    """
    if n == 1:
        return [list(order)]
    groups: list[list[int]] = [[] for _ in range(n)]
    most, total = [0] * n, [0] * n
    speed = [1.0] * (n - 1) + [caller_share]
    for c, k in zip(order, steps, strict=True):
        w = min(range(n), key=lambda g: (_STEP_OVERHEAD_CLIENTS * max(most[g], k) + total[g] + k) / speed[g])
        groups[w].append(c)
        most[w], total[w] = max(most[w], k), total[w] + k
    return [g for g in groups if g]


def _inverse(order: list[int]) -> Tensor:
    """The permutation that puts rows stacked in ``order`` back into input order."""
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return inverse


def _generator(g: torch.Generator | int) -> torch.Generator:
    """``g`` itself, or a fresh generator seeded with it (a client given as a seed: start()'s ``generators``)."""
    return g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(g)


def _batch_plan(
    sizes: Sequence[int], generators: Sequence[torch.Generator], epochs: int, batch_size: int
) -> tuple[Tensor, Tensor, list[int]]:
    """Sample indices ``(S, C, B)``, sample weights ``(S, C, B)`` (``1/n`` for each of a batch's ``n`` real samples,
    0 for padding) and the number of clients active at each step.

    ``sizes`` (the clients' sample counts) come longest first. Client ``c`` runs ``epochs · ⌈n_c / B⌉`` steps, the first ones of the
    ``S`` (the most any client runs); its epoch ``e`` is ``torch.randperm(n_c, generator)`` cut into batches,
    as the sequential loop does.
    """
    sizes = tuple(sizes)
    steps = [epochs * math.ceil(n / batch_size) for n in sizes]
    total = steps[0]
    # client-major while filling, so each epoch's slots are one contiguous run of memory that randperm fills
    idx = torch.zeros((len(sizes), total * batch_size), dtype=torch.long)
    for c, (n, gen) in enumerate(zip(sizes, generators, strict=True)):
        slots = math.ceil(n / batch_size) * batch_size  # one epoch, its last batch padded
        for e in range(epochs):
            torch.randperm(n, generator=gen, out=idx[c, e * slots : e * slots + n])
    active = [sum(1 for n in steps if n > s) for s in range(total)]
    weight = _sample_weights(sizes, epochs, batch_size)
    return idx.view(weight.shape).transpose(0, 1), weight.transpose(0, 1), active


@functools.lru_cache(maxsize=64)
def _sample_weights(sizes: tuple[int, ...], epochs: int, batch_size: int) -> Tensor:
    """:func:`_batch_plan`'s weights, client-major ``(C, S, B)``: they depend only on the clients' sizes, so a
    run that trains the same clients every round reuses them (read-only: never changed in place).

    ``1/n`` for each of a batch's ``n`` real samples: a step's loss ``Σ wᵢ·ℓᵢ`` is then the mean over the
    batch's real samples, and its gradient wrt ``ℓᵢ`` is exactly the ``fl(1/n)`` that dividing the 0/1-masked
    sum by ``n`` gives."""
    total = epochs * math.ceil(sizes[0] / batch_size)
    weight = torch.zeros((len(sizes), total * batch_size), dtype=torch.float32)
    for c, n in enumerate(sizes):
        slots = math.ceil(n / batch_size) * batch_size
        for e in range(epochs):
            weight[c, e * slots : e * slots + n] = 1.0
    weight = weight.view(len(sizes), total, batch_size)
    weight /= weight.sum(-1, keepdim=True).clamp(min=1.0)
    return weight

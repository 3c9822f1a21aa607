"""Recovery instead of refusal: knowledge distillation from the fp32 model into its pruned copy, masks held.

Pruning that breaks a model (2:4 on a small transformer without fine-tuning) need not be refused if a little
training wins the quality back. No labels are needed: the fp32 model is the teacher, the unlabeled calibration
inputs are the data (Hinton et al. 2015, https://arxiv.org/abs/1503.02531). What is matched depends on the task:

- tensor classifiers, sequence classifiers and decoders: the teacher's softened output distribution,
  ``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` (per real token for a decoder);
- encoders (and any Hugging Face model that returns ``hidden_states``): additionally every layer's hidden states
  over real tokens, MSE normalised by the teacher's variance (intermediate-layer distillation as in TinyBERT,
  Jiao et al. 2020, https://arxiv.org/abs/1909.10351), plus ``1 − cos`` of the pooled sentence embeddings.

Adam on all student weights; after every step the pruning masks are re-applied, so the sparsity pattern
(2:4 included) is exactly kept. :func:`distill_recover` returns the ``recover`` callable the deploy pipelines
take; its report (loss before/after, steps, seconds) goes into the manifest.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.deploy.prune import PruneResult, apply_masks
from deltaplane.errors import ConfigError

__all__ = ["RECOVERY_METHODS", "distill_recover"]

RECOVERY_METHODS = ("none", "distill")
TOKEN_TASKS = ("sentence-embedding", "text-classification", "next-token")


def _kl(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    t = nn.functional.log_softmax(teacher / temperature, dim=-1)
    s = nn.functional.log_softmax(student / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) * temperature**2
    if mask is not None:
        return (kl * mask).sum() / mask.sum().clamp(min=1)
    return kl.mean()


def _token_forward(model: nn.Module, ids: Tensor, mask: Tensor) -> Any:
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def _pooled(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _token_loss(task: str, s_out: Any, t_out: Any, mask: Tensor, temperature: float) -> Tensor:
    loss = torch.zeros(())
    m = mask.unsqueeze(-1).to(torch.float32)
    hs_s, hs_t = getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None)
    if hs_s is not None and hs_t is not None:
        for hs, ht in zip(hs_s[1:], hs_t[1:], strict=True):  # [0] is the (unpruned) embedding output
            var = ((ht * m) ** 2).sum() / (m.sum() * ht.shape[-1]) + 1e-6
            loss = loss + (((hs - ht) ** 2) * m).sum() / (m.sum() * ht.shape[-1]) / var
        loss = loss / max(1, len(hs_t) - 1)
    if task == "sentence-embedding":
        last_s = s_out.last_hidden_state
        last_t = t_out.last_hidden_state
        loss = (
            loss
            + (
                1 - nn.functional.cosine_similarity(_pooled(last_s, mask), _pooled(last_t, mask), dim=-1)
            ).mean()
        )
    elif task == "text-classification":
        loss = loss + _kl(s_out.logits, t_out.logits, temperature)
    else:  # next-token: every real position
        loss = loss + _kl(s_out.logits, t_out.logits, temperature, mask.to(torch.float32))
    return loss


def distill_recover(
    teacher: nn.Module,
    calibration: np.ndarray,
    *,
    task: str,
    epochs: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    temperature: float = 2.0,
    seed: int = 0,
) -> Callable[[nn.Module, PruneResult | None], dict[str, Any]]:
    """A ``recover(student, prune_result) -> report`` callable that distills ``teacher`` into ``student``.

    Args:
        teacher: the fp32 model (not modified; a frozen copy is used).
        calibration: unlabeled inputs — images ``(N, ...)`` for ``task="classification"``, ``(N, 2, T)`` token
            ids + attention masks for token tasks. Never the evaluation set.
        task: ``classification``, ``sentence-embedding``, ``text-classification`` or ``next-token``.
        epochs: passes over ``calibration``. lr, batch_size: Adam settings. temperature: KL softening.
    """
    if task not in ("classification", *TOKEN_TASKS):
        raise ConfigError(f"cannot distill task {task!r}")
    if epochs < 1 or lr <= 0 or batch_size < 1 or temperature <= 0:
        raise ConfigError(f"need epochs >= 1, lr > 0, batch_size >= 1, temperature > 0. Found {epochs}, {lr}")
    data = torch.from_numpy(np.ascontiguousarray(calibration))
    if len(data) == 0:
        raise ConfigError("distillation needs calibration inputs")
    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def loss_on(student: nn.Module, batch: Tensor) -> Tensor:
        if task == "classification":
            with torch.no_grad():
                t = frozen(batch)
            return _kl(student(batch), t, temperature)
        ids, mask = batch[:, 0], batch[:, 1]
        with torch.no_grad():
            t_out = _token_forward(frozen, ids, mask)
        return _token_loss(task, _token_forward(student, ids, mask), t_out, mask, temperature)

    def full_loss(student: nn.Module) -> float:
        student.eval()
        with torch.no_grad():
            vals = [
                float(loss_on(student, data[i : i + batch_size])) for i in range(0, len(data), batch_size)
            ]
        return float(np.mean(vals))

    def recover(student: nn.Module, result: PruneResult | None) -> dict[str, Any]:
        start = time.perf_counter()
        before = full_loss(student)
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
        g = torch.Generator().manual_seed(seed)
        steps = 0
        for _ in range(epochs):
            student.train()
            perm = torch.randperm(len(data), generator=g)
            for i in range(0, len(data), batch_size):
                batch = data[perm[i : i + batch_size]]
                opt.zero_grad()
                loss_on(student, batch).backward()
                opt.step()
                if result is not None:
                    apply_masks(student, result.masks)  # pruned weights stay exactly zero
                steps += 1
        student.eval()
        after = full_loss(student)
        seconds = time.perf_counter() - start
        return {
            "method": "distill",
            "epochs": epochs,
            "steps": steps,
            "lr": lr,
            "calibration_inputs": len(data),
            "distill_loss_before": before,
            "distill_loss_after": after,
            "seconds": seconds,
            "summary": f"distilled from fp32 on {len(data)} unlabeled calibration inputs, {epochs} epochs "
            f"({steps} steps, {seconds:.0f} s): distillation loss {before:.4g} → {after:.4g}",
        }

    return recover

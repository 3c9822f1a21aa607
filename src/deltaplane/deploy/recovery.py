"""Recovery instead of refusal: knowledge distillation from the fp32 model into its pruned copy, masks held.

Pruning that breaks a model (2:4 on a small transformer without fine-tuning) need not be refused if a little
training wins the quality back. No labels are needed: the fp32 model is the teacher, the unlabeled calibration
inputs are the data (Hinton et al. 2015, https://arxiv.org/abs/1503.02531). What is matched depends on the task:

- tensor classifiers, sequence classifiers and decoders: the teacher's softened output distribution,
  ``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` (per real token for a decoder);
- encoders (and any Hugging Face model that returns ``hidden_states``): additionally every layer's hidden states
  over real tokens — MSE normalised by the teacher's variance plus ``1 − cos`` per token (intermediate-layer
  distillation as in TinyBERT, Jiao et al. 2020, https://arxiv.org/abs/1909.10351, and the layer-wise
  distillation that recovers sparse BERTs in Kurtic et al. 2022, "The Optimal BERT Surgeon",
  https://arxiv.org/abs/2203.07259) — plus ``1 − cos`` of the pooled sentence embeddings.

Adam on every weight except the embedding tables (pruning leaves those as they were), linear warm-up then cosine
decay, and early stopping on a held-out slice of the calibration inputs (the best weights are kept; dropout is
seeded, so a run is reproducible). An optional ``monitor`` draws the curve of any figure (e.g. min cosine on an
evaluation set) at every held-out measurement without choosing anything by it. After every
step the pruning masks are re-applied, so the sparsity pattern (2:4 included) is exactly kept. How much text it
needs: on 64 sentences MiniLM memorises them (training loss falls, held-out fidelity does not follow), so the
CLI and the benchmark distil on thousands of sentences from :func:`deltaplane.deploy.sentences.corpus_split`.
:func:`distill_recover` returns the ``recover`` callable the deploy pipelines take; its report (held-out loss
before/after, steps, where it stopped, seconds) goes into the manifest.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.deploy.prune import PruneResult, apply_masks
from deltaplane.errors import ConfigError
from deltaplane.seeding import seeded_global_generators

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
    real = m.sum()
    hs_s, hs_t = getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None)
    if hs_s is not None and hs_t is not None:
        for hs, ht in zip(hs_s[1:], hs_t[1:], strict=True):  # [0] is the (unpruned) embedding output
            var = ((ht * m) ** 2).sum() / (real * ht.shape[-1]) + 1e-6
            mse = (((hs - ht) ** 2) * m).sum() / (real * ht.shape[-1]) / var
            cos = (nn.functional.cosine_similarity(hs, ht, dim=-1) * mask).sum() / real
            loss = loss + mse + (1 - cos)
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


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the full rate, then cosine decay to zero (the schedule of most fine-tuning recipes)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _trainable(student: nn.Module, task: str) -> list[nn.Parameter]:
    """What distillation may change: everything except token/position embedding tables.

    Pruning never touches the embeddings (they are lookups, not matmuls), so the teacher's are already right;
    freezing them also keeps a decoder's tied LM head (the same tensor) exact and saves most of the optimizer
    state of a small encoder, whose vocabulary table is half its parameters.
    """
    frozen: set[int] = set()
    if task in TOKEN_TASKS:
        for mod in student.modules():
            if isinstance(mod, nn.Embedding):
                frozen.update(id(p) for p in mod.parameters())
    return [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]


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
    holdout: float = 0.1,
    patience: int = 3,
    evals_per_epoch: int = 2,
    warmup: float = 0.05,
    progress: Callable[[str], None] | None = None,
    monitor: Callable[[nn.Module], dict[str, float]] | None = None,
) -> Callable[[nn.Module, PruneResult | None], dict[str, Any]]:
    """A ``recover(student, prune_result) -> report`` callable that distills ``teacher`` into ``student``.

    Training: Adam with linear warm-up (``warmup`` × the planned steps) then cosine decay; the pruning masks are
    re-applied after every step. Early stopping: ``holdout`` of the calibration inputs (seeded) is never
    trained on; its distillation loss is measured ``evals_per_epoch`` times per epoch, the best weights are
    kept, and training stops after ``patience`` measurements without improvement (``holdout=0`` trains every
    epoch and keeps the last weights).

    Args:
        teacher: the fp32 model (not modified; a frozen copy is used).
        calibration: unlabeled inputs — images ``(N, ...)`` for ``task="classification"``, ``(N, 2, T)`` token
            ids + attention masks for token tasks. Never the evaluation set.
        task: ``classification``, ``sentence-embedding``, ``text-classification`` or ``next-token``.
        epochs: the most passes over the training part of ``calibration``. lr, batch_size: Adam settings.
        temperature: KL softening. progress: called with a line at every held-out measurement.
        monitor: called with the student (in eval mode, masks applied) before training and at every held-out
            measurement; the figures it returns (e.g. min / mean cosine on an evaluation set) go into the
            progress line and the report's ``history``, so a long run shows its curve as it goes. They are
            only recorded: early stopping and the kept weights follow the held-out distillation loss alone,
            so an evaluation set measured here stays held out.
    """
    if task not in ("classification", *TOKEN_TASKS):
        raise ConfigError(f"cannot distill task {task!r}")
    if epochs < 1 or lr <= 0 or batch_size < 1 or temperature <= 0:
        raise ConfigError(f"need epochs >= 1, lr > 0, batch_size >= 1, temperature > 0. Found {epochs}, {lr}")
    if not 0 <= holdout < 1 or patience < 1 or evals_per_epoch < 1 or not 0 <= warmup < 1:
        raise ConfigError(
            "need 0 <= holdout < 1, patience >= 1, evals_per_epoch >= 1 and 0 <= warmup < 1. "
            f"Found {holdout}, {patience}, {evals_per_epoch}, {warmup}"
        )
    data = torch.from_numpy(np.ascontiguousarray(calibration))
    if len(data) == 0:
        raise ConfigError("distillation needs calibration inputs")
    n_held = round(holdout * len(data)) if len(data) >= 10 else 0
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 1))
    train, held = data[order[n_held:]], data[order[:n_held]]
    say = progress or (lambda _msg: None)
    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def loss_on(student: nn.Module, batch: Tensor) -> Tensor:
        if task == "classification":
            with torch.no_grad():
                t = frozen(batch)
            return _kl(student(batch), t, temperature)
        length = max(1, int(batch[:, 1].sum(1).max()))  # drop padding every row of the batch has
        ids, mask = batch[:, 0, :length], batch[:, 1, :length]
        with torch.no_grad():
            t_out = _token_forward(frozen, ids, mask)
        return _token_loss(task, _token_forward(student, ids, mask), t_out, mask, temperature)

    def mean_loss(student: nn.Module, inputs: Tensor) -> float:
        student.eval()
        with torch.no_grad():
            vals = [
                (float(loss_on(student, inputs[i : i + batch_size])), len(inputs[i : i + batch_size]))
                for i in range(0, len(inputs), batch_size)
            ]
        return float(sum(v * n for v, n in vals) / sum(n for _, n in vals))

    def recover(student: nn.Module, result: PruneResult | None) -> dict[str, Any]:
        # dropout draws from torch's global generator: seed a private copy so a run is the same every time (and
        # the accelerators' generators a student on them draws from; torch.manual_seed seeded those unrestored)
        with seeded_global_generators(seed):
            return _recover(student, result)

    def _recover(student: nn.Module, result: PruneResult | None) -> dict[str, Any]:
        start = time.perf_counter()
        params = _trainable(student, task)
        watch = held if n_held else train
        before = mean_loss(student, watch)

        def watched() -> dict[str, float]:
            if monitor is None:
                return {}
            student.eval()
            # in a fork of its own: a monitor that draws from torch's generator (a sampled evaluation) must not
            # move the dropout masks of the training it only watches
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                return {k: float(v) for k, v in monitor(student).items()}

        start_figures = watched()
        if start_figures:
            say("distill step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in start_figures.items()))
        opt = torch.optim.Adam(params, lr=lr)
        per_epoch = -(-len(train) // batch_size)
        total = epochs * per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: _lr_factor(step, total, int(warmup * total))
        )
        eval_at = {round(per_epoch * (k + 1) / evals_per_epoch) for k in range(evals_per_epoch)}
        g = torch.Generator().manual_seed(seed)
        best, best_step, since, steps = before, 0, 0, 0
        history: list[dict[str, Any]] = (
            [{"step": 0, "epoch": 0.0, "holdout_loss": before, **start_figures}] if n_held else []
        )
        # the pruned model is the first candidate: a run that never beats it on held-out text changes nothing
        best_state = {k: v.detach().clone() for k, v in student.state_dict().items()} if n_held else None
        stopped = False
        for epoch in range(epochs):
            perm = torch.randperm(len(train), generator=g)
            for b, i in enumerate(range(0, len(train), batch_size)):
                student.train()
                opt.zero_grad()
                loss_on(student, train[perm[i : i + batch_size]]).backward()
                opt.step()
                sched.step()
                if result is not None:
                    apply_masks(student, result.masks)  # pruned weights stay exactly zero
                steps += 1
                if not n_held or (b + 1) not in eval_at:
                    continue
                now = mean_loss(student, held)
                figures = watched()
                history.append(
                    {"step": steps, "epoch": epoch + (b + 1) / per_epoch, "holdout_loss": now, **figures}
                )
                say(
                    f"distill step {steps}/{total}: held-out loss {now:.4g} (best {min(best, now):.4g})"
                    + "".join(f", {k} {v:.4f}" for k, v in figures.items())
                )
                if now < best:
                    best, best_step, since = now, steps, 0
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                else:
                    since += 1
                if since >= patience:
                    stopped = True
                    break
            if stopped:
                break
        if best_state is not None:
            student.load_state_dict(best_state)
        student.eval()
        after = mean_loss(student, watch)
        seconds = time.perf_counter() - start
        where = f"held-out ({n_held} inputs)" if n_held else "calibration"
        return {
            "method": "distill",
            "epochs": epochs,
            "epochs_run": round(steps / per_epoch, 2),
            "steps": steps,
            "best_step": best_step if n_held else steps,
            "stopped_early": stopped,
            "lr": lr,
            "schedule": f"linear warm-up {warmup:g} then cosine decay",
            "batch_size": batch_size,
            "calibration_inputs": len(train),
            "holdout_inputs": n_held,
            "distill_loss_before": before,
            "distill_loss_after": after,
            "loss_measured_on": where,
            "history": history,
            "seconds": seconds,
            "summary": f"distilled from fp32 on {len(train)} unlabeled calibration inputs ({n_held} more held "
            f"out for early stopping), {steps} steps of batch {batch_size} "
            f"({steps / per_epoch:.1f} of {epochs} epochs{', stopped early' if stopped else ''}, "
            f"{seconds:.0f} s): {where} distillation loss {before:.4g} → {after:.4g}",
        }

    return recover

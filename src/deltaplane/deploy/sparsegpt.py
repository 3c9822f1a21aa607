"""SparseGPT: one-shot pruning that re-solves the kept weights so each layer's output barely moves.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(https://arxiv.org/abs/2301.00774), Algorithm 1 and the authors' reference ``SparseGPT.fasterprune``. Magnitude and
Wanda only *choose* which weights to drop; SparseGPT also *updates* the weights it keeps (the Optimal Brain Surgeon
update) so that ``Ŵ X`` stays close to ``W X`` on calibration inputs ``X``. For one layer:

- ``H = 2 X Xᵀ / N + λ I`` over the layer's calibration inputs (columns = input features), with dampening
  ``λ`` = ``damp`` × the mean of ``diag(H)``; input features that never fire get ``H_jj = 1`` and their weights 0.
- ``U`` = upper Cholesky factor of ``H⁻¹`` (float64), so row ``j`` of ``U`` is the OBS update direction after the
  columns before ``j`` are fixed.
- Columns are processed left to right in blocks; for N:M, at the first column of each group of ``m`` the mask keeps
  the ``n`` weights with the largest saliency ``w² / U_jj²`` (on the already-updated weights); each pruned weight's
  error ``(w − 0) / U_jj`` is spread over the later columns of its row with ``U[j, j:]``, and each block's errors
  over the columns after the block with one matmul (the paper's lazy batch update).

:func:`sparsegpt_prune` runs this layer-sequentially in forward order: each layer's ``X`` is collected with a
forward pre-hook on a calibration pass through the model whose earlier layers are already pruned, so later layers
compensate for the error upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deltaplane.deploy.prune import (
    PruneResult,
    _conv_columns,
    _forward_order,
    check_sparsity,
    prunable_layers,
    run_calibration,
)
from deltaplane.errors import ConfigError, UnsupportedLayer

__all__ = ["input_hessian", "sparsegpt_prune", "sparsegpt_weights"]


def _layer_inputs(layer: nn.Module, x: Tensor, name: str) -> Tensor:
    """The rows of features the layer's weight rows multiply: ``(tokens, in)`` (im2col columns for a Conv2d)."""
    x = x.detach().to(torch.float64)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise UnsupportedLayer(
                f"SparseGPT: grouped conv {name!r} (groups={layer.groups}) is not supported"
            )
        return _conv_columns(layer, x)
    return x.reshape(-1, x.shape[-1])


def _real_rows(batch: Any, x: Tensor) -> Tensor | None:
    """For a token batch (a mapping with ``attention_mask``), which rows of the layer input are real tokens."""
    if not isinstance(batch, Mapping) or "attention_mask" not in batch or x.dim() != 3:
        return None
    mask = batch["attention_mask"]
    if tuple(mask.shape) != tuple(x.shape[:2]):
        return None
    return mask.reshape(-1).bool()


@torch.no_grad()
def input_hessian(model: nn.Module, layer_name: str, calibration: Sequence[Any]) -> Tensor:
    """``2 X Xᵀ / N`` (float64, ``in × in``) of layer ``layer_name``'s inputs over a pass of ``calibration``.

    For token batches (mappings with an ``attention_mask`` whose shape matches the layer input's first two
    dimensions) only real tokens count: padding positions never reach a real output, so fitting them would spend
    the reconstruction on inputs the model never uses.
    """
    layer = dict(model.named_modules())[layer_name]
    acc: dict[str, Any] = {"h": None, "n": 0, "batch": None}

    def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        real = _real_rows(acc["batch"], args[0])
        x = _layer_inputs(layer, args[0], layer_name)
        if real is not None:
            x = x[real]
        h = x.T @ x
        acc["h"] = h if acc["h"] is None else acc["h"] + h
        acc["n"] += x.shape[0]

    handle = layer.register_forward_pre_hook(fn)
    try:
        for batch in calibration:
            acc["batch"] = batch
            run_calibration(model, [batch])
    finally:
        handle.remove()
    if acc["h"] is None or acc["n"] == 0:
        raise ConfigError(
            f"SparseGPT: calibration data never reached layer {layer_name!r}; pass data that does or exclude it"
        )
    return 2.0 * acc["h"] / acc["n"]


@torch.no_grad()
def sparsegpt_weights(
    weight: Tensor,
    hessian: Tensor,
    *,
    n: int | None = None,
    m: int | None = None,
    sparsity: float | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune one weight matrix with SparseGPT; returns ``(new_weight, mask)`` (mask ``True`` = kept).

    Args:
        weight: ``(out, in)`` (a Conv2d weight is flattened to ``(out, in·kh·kw)`` and reshaped back).
        hessian: ``(in, in)`` from :func:`input_hessian` (not modified).
        n, m: keep ``n`` of every ``m`` consecutive input weights per row (``n == m`` keeps everything); or
        sparsity: the share pruned in each block of columns (chosen per block by saliency, as in the paper).
        blocksize: columns per lazy-update block (a multiple of ``m``). damp: dampening as a share of mean
            ``diag(H)``.
    """
    if (sparsity is None) == (n is None or m is None):
        raise ConfigError("SparseGPT needs either sparsity=... or n=... and m=... (not both)")
    if n is not None and not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ConfigError(f"N:M needs integers 0 < n <= m. Found {n}:{m}")
    if sparsity is not None and sparsity != 0.0:
        sparsity = check_sparsity(sparsity)
    shape, dtype = weight.shape, weight.dtype
    w = weight.reshape(shape[0], -1).to(torch.float64).clone()
    cols = w.shape[1]
    if m is not None and (cols % m or blocksize % m):
        raise UnsupportedLayer(f"input size {cols} (and block size {blocksize}) must be multiples of m={m}")
    if hessian.shape != (cols, cols):
        raise ConfigError(f"hessian has shape {tuple(hessian.shape)}, expected {(cols, cols)}")
    if not bool(torch.isfinite(hessian).all()):  # else a raw LinAlgError from the Cholesky factorization
        raise ConfigError(
            "the input Hessian holds NaN/Inf: the calibration inputs (or the activations the layers before "
            "compute from them) are not finite; pass finite calibration data"
        )
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    idx = torch.arange(cols)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if sparsity is not None:
            k = round(sparsity * w1.numel())
            if k:
                sal = (w1**2 / d1.reshape(1, -1) ** 2).flatten()
                prune1.view(-1)[torch.topk(sal, k, largest=False).indices] = True
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            # n and m are set together (checked above); naming both narrows them for the type checker
            if n is not None and m is not None and i % m == 0 and n < m:
                sal = w1[:, i : i + m] ** 2 / d1[i : i + m].reshape(1, -1) ** 2
                prune1.scatter_(1, i + torch.topk(sal, m - n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            q = torch.where(prune1[:, i], torch.zeros_like(col), col)
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.reshape(shape).to(dtype), keep.reshape(shape)


@torch.no_grad()
def sparsegpt_prune(
    model: nn.Module,
    calibration: Sequence[Any],
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    blocksize: int = 128,
    damp: float = 0.01,
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """SparseGPT pruning of ``model`` in place, layer-sequentially: N:M with ``n``/``m``, or unstructured.

    Each prunable layer, in the order the forward pass reaches it, gets its input Hessian from a calibration pass
    through the model with every earlier layer already pruned and updated, then :func:`sparsegpt_weights`. Layers
    whose input size is not a multiple of ``m`` are left dense and listed in :attr:`PruneResult.skipped` (an
    error if named in ``include``). Costs one calibration pass per layer.
    """
    if (sparsity is None) == (n is None or m is None):
        raise ConfigError("sparsegpt_prune needs either sparsity=... or n=... and m=... (not both)")
    if n is not None and not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ConfigError(f"N:M needs integers 0 < n < m. Found {n}:{m}")
    if sparsity is not None:
        sparsity = check_sparsity(sparsity)
    calibration = list(calibration)
    if not calibration:
        raise ConfigError("SparseGPT pruning needs calibration data")
    layers = prunable_layers(model, include=include, exclude=exclude)
    masks: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    for name in _forward_order(model, layers, calibration[:1]):
        layer = layers[name]
        cols = layer.weight[0].numel()
        if m is not None and cols % m:
            msg = f"input size {cols} is not a multiple of m={m}"
            if include is not None:
                raise UnsupportedLayer(f"layer {name!r}: {msg}")
            skipped[name] = f"{msg}; left dense"
            continue
        h = input_hessian(model, name, calibration)
        bs = blocksize if m is None else max(m, blocksize - blocksize % m)
        new, keep = sparsegpt_weights(layer.weight, h, n=n, m=m, sparsity=sparsity, blocksize=bs, damp=damp)
        layer.weight.copy_(new)
        masks[name] = keep
        if progress is not None:
            progress(f"SparseGPT {name}: {1 - float(keep.float().mean()):.2f} sparse")
    return PruneResult(masks, skipped)

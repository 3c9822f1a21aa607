"""ONNX export verified against PyTorch, and ONNX Runtime sessions tuned for small-batch device inference.

An export is only written once ONNX Runtime reproduces PyTorch's outputs on the example inputs, to within float32
rounding of the outputs' magnitude (the max absolute difference is returned and recorded); a failed or diverging
export leaves no file behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.errors import ExportError, UnsupportedLayer
from deltaplane.staging import stage_file, sweep

__all__ = ["ExportResult", "export_onnx", "ort_session", "run_session"]


@dataclass(frozen=True)
class ExportResult:
    """Where the model went and how closely ONNX Runtime matches PyTorch on the verification inputs."""

    path: Path
    max_abs_diff: float
    nbytes: int
    opset: int


def ort_session(model: str | os.PathLike[str] | bytes, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with full graph optimization (constant folding, Conv+ReLU/QDQ fusion).

    ``threads=1`` with sequential execution is what a small model at batch 1 wants: thread-pool wake-ups cost
    more than the tiny kernels they would parallelise. It also makes latency comparable across runs.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_session(session: Any, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Run a session on one array (single-input models) or a feed dict."""
    if isinstance(inputs, np.ndarray):
        inputs = {session.get_inputs()[0].name: inputs}
    return session.run(None, dict(inputs))


def _as_tuple(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def export_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    verify_inputs: Sequence[Tensor | Sequence[Tensor]] | None = None,
) -> ExportResult:
    """Export ``model`` to ONNX, check ONNX Runtime against PyTorch, then move the file into place.

    Uses the TorchScript-based exporter (``dynamo=False``): for the plain feed-forward models deployed here it is
    an order of magnitude faster than the ``torch.export`` route and handles dynamic batch axes directly.

    Args:
        model: the model; exported and verified in eval mode, and left in the modes it came in (a model
            still being trained keeps its dropout and batch-norm updates).
        example_inputs: tensors traced for export.
        path: destination ``.onnx`` file; written only after verification succeeds.
        input_names, output_names: ONNX graph input/output names (what sessions are fed with).
        dynamic_axes: e.g. ``{"input": {0: "batch"}}``; defaults to a dynamic batch axis on every input/output.
        opset: ONNX opset.
        atol, rtol: the largest max-abs difference accepted between an output of PyTorch and of ONNX Runtime is
            ``atol + rtol × max |PyTorch output|``: float32 rounding grows with the outputs' magnitude (a
            classifier whose logits reach 2,000 differs by ~1e-3 between two correct runtimes), while an export
            that computes something else differs by the outputs' own size.
        verify_inputs: extra input sets to verify on (default: the example inputs only).

    Raises:
        UnsupportedLayer: the model uses an operator the exporter cannot express.
        ExportError: export failed, or ONNX Runtime's outputs differ by more than ``atol``.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        return _export_verified(
            model.eval(),
            example_inputs,
            Path(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset=opset,
            atol=atol,
            rtol=rtol,
            verify_inputs=verify_inputs,
        )
    finally:
        for module, training in modes.items():
            module.training = training


def _export_verified(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    opset: int,
    atol: float,
    rtol: float,
    verify_inputs: Sequence[Tensor | Sequence[Tensor]] | None,
) -> ExportResult:
    """:func:`export_onnx` on a model already in eval mode."""
    import onnx

    example = _as_tuple(example_inputs)
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    fd, tmp = stage_file(path)
    os.close(fd)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice; chosen knowingly
                torch.onnx.export(
                    model,
                    example,
                    str(tmp),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
                    opset_version=opset,
                    dynamo=False,
                )
        except Exception as e:
            msg = str(e)
            if "is not supported" in msg or "Unsupported" in msg or "unsupported" in msg:
                raise UnsupportedLayer(
                    f"{type(model).__name__} cannot be exported to ONNX opset {opset}: {msg.splitlines()[0]}. "
                    "Replace the layer with a supported one or raise the opset."
                ) from e
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {msg.splitlines()[0]}") from e
        try:
            onnx.checker.check_model(str(tmp))
            session = ort_session(tmp)
        except Exception as e:
            raise ExportError(f"exported ONNX model is invalid or cannot be loaded: {e}") from e
        worst, over = 0.0, None
        for inputs in [example, *(_as_tuple(v) for v in (verify_inputs or []))]:
            with torch.no_grad():
                ref = _as_tuple(_flatten_outputs(model(*inputs)))
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs, strict=True)}
            got = session.run(None, feeds)
            if len(got) != len(ref):
                raise ExportError(f"ONNX model has {len(got)} outputs, PyTorch {len(ref)}")
            names = [*output_names, *(f"#{i}" for i in range(len(output_names), len(ref)))]
            for name, r, g in zip(names, ref, got, strict=False):
                if tuple(r.shape) != tuple(g.shape):
                    raise ExportError(f"output shape {tuple(g.shape)} differs from PyTorch {tuple(r.shape)}")
                ref_np = r.detach().cpu().numpy()
                diff = _parity(name, ref_np, g)
                tol = atol + rtol * (float(np.abs(ref_np).max()) if ref_np.size else 0.0)
                worst = max(worst, diff)
                if not diff <= tol and over is None:
                    over = (name, diff, tol)
        if over is not None:
            name, diff, tol = over
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {diff:.3g} (max abs) on output {name!r} > "
                f"atol + rtol × max|output| = {tol:.3g} (atol={atol:g}, rtol={rtol:g}): the exported graph computes "
                "something else; replace the layer that traces differently (data-dependent Python control flow, an "
                "op exported approximately) or raise the opset"
            )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path, worst, path.stat().st_size, opset)


def _parity(name: str, ref: np.ndarray, got: np.ndarray) -> float:
    """Max abs difference of one output; :class:`ExportError` if either side holds NaN/Inf.

    Checked first because ``max(worst, nan)`` is ``worst`` in Python: a NaN difference would otherwise pass
    as 0.0.
    """
    bad_ref, bad_got = int(np.size(ref) - np.isfinite(ref).sum()), int(np.size(got) - np.isfinite(got).sum())
    if bad_ref or bad_got:
        raise ExportError(
            f"output {name!r}: PyTorch gives {bad_ref} and ONNX Runtime {bad_got} NaN/Inf values (of "
            f"{np.size(got)}) on the verification inputs; refusing an export that computes non-finite values"
        )
    return float(np.max(np.abs(ref - got))) if np.size(ref) else 0.0


def _flatten_outputs(out: Any) -> Tensor | tuple[Tensor, ...]:
    """Model outputs as tensors: HF ``ModelOutput``/dicts become their tensor values in order."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        return tuple(v for v in out.values() if isinstance(v, Tensor))
    return tuple(out)

"""Quantization: int8 post-training (dynamic and static with calibration) and int4 weight-only group-wise.

The int8 paths use the established tooling rather than our own kernels: ONNX Runtime's
``onnxruntime.quantization.quantize_dynamic`` / ``quantize_static`` (QDQ format, per-channel weights, calibrated
activation ranges) for the ONNX route, and ``torch.ao.quantization.quantize_dynamic`` for models that stay in
PyTorch. What we write ourselves is only *storage* quantization — symmetric per-channel int8 and group-wise int4
codes with their scales — used by the device artifact and by weight-only int4, where the runtime dequantizes
weights to float before computing (what CPU runtimes do for int4 weights anyway).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import platform
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deltaplane.errors import ConfigError, ExportError

__all__ = [
    "GroupQuant",
    "dequantize_int4",
    "dequantize_int8",
    "group_quant_fits",
    "quantize_dynamic_torch",
    "quantize_int4",
    "quantize_int8",
    "quantize_onnx",
    "weight_only_quantize",
]


@dataclass(frozen=True)
class GroupQuant:
    """Integer codes plus one float16 scale per group: ``x ≈ (code − offset) · scale[group]``."""

    codes: np.ndarray  # uint8, one code per value (packed to 4 bits only when stored)
    scales: np.ndarray  # float16, one per group
    group_size: int
    bits: int

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)


#: the largest finite float16: a group scale (max |x| / qmax) beyond it cannot be stored
_FP16_MAX = float(np.finfo(np.float16).max)


def group_quant_fits(x: np.ndarray, bits: int) -> bool:
    """Whether ``bits``-bit codes with float16 scales can hold ``x``: finite, and ``max |x| / qmax`` a finite
    float16 (|x| up to about 8.3e6 at 8 bits, 4.6e5 at 4 bits). Beyond that the scale overflows to Inf and every
    value of its group decodes to NaN."""
    a = np.abs(np.asarray(x, np.float32))
    return a.size == 0 or bool(np.isfinite(a).all() and a.max() / ((1 << (bits - 1)) - 1) <= _FP16_MAX)


def _group_quant(x: np.ndarray, group_size: int, bits: int) -> GroupQuant:
    if group_size < 1:
        raise ConfigError(f"group_size must be positive. Found {group_size}")
    x = np.asarray(x, np.float32).reshape(-1)
    if not group_quant_fits(x, bits):
        raise ConfigError(
            f"values up to {float(np.abs(x).max()):.4g} (or NaN/Inf) do not fit {bits}-bit codes with float16 "
            "scales; keep this tensor unquantized (the device artifact stores such tensors losslessly)"
        )
    n = len(x)
    pad = (-n) % group_size
    g = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, group_size)
    qmax = (1 << (bits - 1)) - 1  # symmetric: zero stays exactly zero, so pruned weights stay pruned
    exact = np.abs(g).max(axis=1) / qmax
    # the scale the decoder will see: the smallest float16 >= the exact scale. Rounded to nearest, the scale of a
    # group of tiny values (max |x| below qmax × 2^-25) became 0 and the group decoded as zeros; among float16
    # subnormals, rounding down also made codes clip at qmax
    half = exact.astype(np.float16)
    half = np.where(half.astype(np.float32) < exact, np.nextafter(half, np.float16(np.inf)), half)
    scale = half.astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(g / safe[:, None]), -qmax, qmax).astype(np.int16)
    codes = (q + (1 << (bits - 1))).astype(np.uint8).reshape(-1)[:n]
    return GroupQuant(codes, scale.astype(np.float16), group_size, bits)


def _group_dequant(gq: GroupQuant) -> np.ndarray:
    n = len(gq.codes)
    groups = np.arange(n) // gq.group_size
    return (gq.codes.astype(np.float32) - gq.offset) * gq.scales.astype(np.float32)[groups]


def quantize_int4(x: np.ndarray, group_size: int = 32) -> GroupQuant:
    """Symmetric int4 codes (−7..7) with a float16 scale per ``group_size`` consecutive values.

    Group-wise scales are what makes 4-bit weights usable: one outlier only coarsens its own group (as in
    GPTQ/AWQ's group quantization, https://arxiv.org/abs/2210.17323). Values are taken in row-major order, so
    groups run along each row's input dimension.
    """
    return _group_quant(x, group_size, 4)


def dequantize_int4(gq: GroupQuant) -> np.ndarray:
    """Float32 values of :func:`quantize_int4` codes (flat)."""
    return _group_dequant(gq)


def quantize_int8(x: np.ndarray, group_size: int) -> GroupQuant:
    """Symmetric int8 codes (−127..127), one scale per ``group_size`` values (a row = per output channel)."""
    return _group_quant(x, group_size, 8)


def dequantize_int8(gq: GroupQuant) -> np.ndarray:
    return _group_dequant(gq)


@torch.no_grad()
def weight_only_quantize(
    model: nn.Module, *, bits: int = 4, group_size: int = 32, exclude: Sequence[str] = ()
) -> nn.Module:
    """A copy of ``model`` whose Linear/Conv2d weights are replaced by their int4 (or int8) dequantized values.

    This is exactly what a weight-only runtime computes with, so evaluating the copy measures the accuracy of
    the stored int4 weights. Activations stay float.
    """
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8. Found {bits}")
    out = copy.deepcopy(model)
    for name, mod in out.named_modules():
        if isinstance(mod, nn.Linear | nn.Conv2d) and name not in exclude:
            w = mod.weight.detach().cpu().numpy()
            try:
                gq = _group_quant(w, group_size, bits)
            except ConfigError as e:
                raise ConfigError(f"layer {name!r}: {e}; exclude it") from None
            mod.weight.copy_(torch.from_numpy(_group_dequant(gq).reshape(w.shape)))
    return out


def quantize_dynamic_torch(model: nn.Module) -> nn.Module:
    """PyTorch dynamic int8 quantization of every ``nn.Linear`` (weights int8, activations quantized on the fly).

    Uses ``torch.ao.quantization.quantize_dynamic`` — deprecated upstream in favour of torchao but still the
    stock eager-mode tool in torch 2.13; its deprecation warning is silenced here because we chose it knowingly.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """Keep ORT's quantization tooling from printing ``WARNING:root:...`` lines into our tables.

    The tooling calls ``logging.warning`` on the root logger; with no handler configured that installs a stderr
    handler (``basicConfig``) for the rest of the process. A temporary filter drops records raised from inside
    ``onnxruntime`` (what they say — e.g. "consider pre-processing" — is acted on here already), and a temporary
    ``NullHandler`` stops ``basicConfig`` from installing anything.
    """

    def not_ort(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    null = logging.NullHandler() if not root.handlers else None
    if null is not None:
        root.addHandler(null)
    root.addFilter(not_ort)
    try:
        yield
    finally:
        root.removeFilter(not_ort)
        if null is not None:
            root.removeHandler(null)


class _Reader:
    """ONNX Runtime ``CalibrationDataReader`` over a list of input feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_onnx(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: str = "static",
    calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
    per_channel: bool = True,
    calibrate_method: str = "minmax",
    op_types: Sequence[str] | None = None,
    block_size: int = 32,
) -> Path:
    """Post-training quantization of an ONNX model with ONNX Runtime's tooling; writes ``dst`` atomically.

    Args:
        src: the float ONNX model.
        dst: where to write the int8 model.
        mode: ``"dynamic"`` (weights int8, activation ranges computed per call: no calibration, best for
            transformers' MatMuls), ``"static"`` (activation ranges fixed from ``calibration``: QDQ graph that
            ORT fuses into integer Conv/MatMul kernels, best for CNNs) or ``"int4"`` (weight-only: every MatMul
            with a constant weight becomes ORT's ``MatMulNBits`` with symmetric int4 blocks of ``block_size``;
            Gemm/Conv/Gather stay float — pair with ``pack_onnx(..., quant="int4")`` to store those compactly).
        calibration: input feeds (``{input_name: array}``) for static mode, e.g. 64–512 training samples.
        per_channel: one weight scale per output channel (much better accuracy for conv/linear weights).
        calibrate_method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (static mode).
        block_size: values per int4 scale (int4 mode).
        op_types: restrict quantization to these ONNX op types (default: all ORT supports).
    """
    from onnxruntime.quantization import CalibrationMethod

    if mode not in ("dynamic", "static", "int4"):
        raise ConfigError(f"mode must be 'dynamic', 'static' or 'int4'. Found {mode!r}")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if calibrate_method not in methods:
        raise ConfigError(f"calibrate_method must be one of {sorted(methods)}. Found {calibrate_method!r}")
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with _quiet_ort_logging():
            _run_quantizer(
                src, tmp, dst, mode, calibration, per_channel, methods[calibrate_method], op_types, block_size
            )
        tmp.replace(dst)
    except ConfigError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX Runtime {mode} quantization of {src} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
        dst.with_name(f".{dst.name}.pre.tmp").unlink(missing_ok=True)
    return dst


@functools.cache
def saturating_int8() -> bool:
    """Whether this CPU's int8 GEMM can saturate: x86-64 without VNNI (AVX2/AVX-512 only).

    There ONNX Runtime's u8·s8 kernels sum pairs of products with ``VPMADDUBSW`` into int16, which overflows for
    large activations times large weights; ORT's quantization guide recommends ``reduce_range`` (7-bit weights)
    on such machines. With VNNI (``avx512_vnni``/``avx_vnni``/AMX) or on ARM the products accumulate in int32
    and full-range 8-bit weights are exact. Read from ``/proc/cpuinfo``; off Linux x86 it answers False.
    """
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _run_quantizer(
    src: str | os.PathLike[str],
    tmp: Path,
    dst: Path,
    mode: str,
    calibration: Iterable[Mapping[str, np.ndarray]] | None,
    per_channel: bool,
    method: object,
    op_types: Sequence[str] | None,
    block_size: int,
) -> None:
    """Run ORT's quantizer for ``mode`` from ``src`` into ``tmp`` (``dst`` names the pre-pass scratch file)."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )

    if mode == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(tmp), False)
    elif mode == "dynamic":
        quantize_dynamic(
            str(src),
            str(tmp),
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=saturating_int8(),
            op_types_to_quantize=list(op_types) if op_types else None,
        )
    else:
        feeds = [dict(f) for f in (calibration or [])]
        if not feeds:
            raise ConfigError("static quantization needs calibration feeds ({input_name: array}, ...)")
        # ORT's recommended pre-pass (symbolic shape inference + graph optimization) so the quantizer sees
        # fused Conv+BN and every tensor's shape; without it it quantizes some tensors twice.
        pre = dst.with_name(f".{dst.name}.pre.tmp")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            src_q = pre
        except Exception:  # the pre-pass is an optimization; fall back to the model as given
            src_q = Path(src)
        quantize_static(
            str(src_q),
            str(tmp),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=saturating_int8(),
            calibrate_method=method,
            op_types_to_quantize=list(op_types) if op_types else None,
        )

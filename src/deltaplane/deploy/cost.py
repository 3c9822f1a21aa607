"""What running (and training) a model costs a device: MACs, peak activation memory, bytes, energy estimates.

Three measured quantities and one model of energy:

- **MACs per inference** — counted by PyTorch's ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass
  (every matmul, convolution and attention product, 2 FLOPs per multiply-accumulate), plus the *non-zero* MACs a
  sparse kernel could do (each Linear/Conv's MACs scaled by its weight density; ORT's CPU kernels do not skip
  zeros, so the dense count is what the shipped graph executes).
- **Peak activation memory** — of the graph ONNX Runtime actually executes: the shipped model is optimised by
  ORT (fusions, constant folding), every intermediate tensor of the optimised graph is fetched on a real batch-1
  input, and a liveness walk in node order (a tensor lives from the node that makes it to its last reader) gives
  the peak of live activation bytes. Weights are not counted (they are ``model bytes``).
- **Bytes** — weight bytes the runtime holds (the graph's initializers) and the artifact's size on disk.
- **Energy** (an *estimate*, not a measurement): ``MACs × pJ/MAC + bytes moved × pJ/byte`` with a device
  profile from :data:`PROFILES`; bytes moved assumes every weight byte is read once per inference and every
  activation is written and read once (no cache reuse). Radio energy for federated rounds uses the LTE / Wi-Fi
  power models of :data:`LINKS`.

Profiles and their sources (order-of-magnitude figures; the table is data, so a team with measured numbers for
its device passes its own :class:`DeviceProfile`). Each number below is either stated in the cited publication
or derived from stated numbers by the arithmetic shown; nothing else is claimed.

- ``phone`` — M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, pp. 10–14,
  doi:10.1109/ISSCC.2014.6757323, energy table for 45 nm at 0.9 V: fp32 multiply 3.7 pJ + fp32 add 0.9 pJ
  → 4.6 pJ per fp32 MAC; 8-bit integer multiply 0.2 pJ + 8-bit add 0.03 pJ → 0.23 pJ per int8 MAC; DRAM
  1.3–2.6 nJ per 64-bit access → 1.3 nJ / 8 bytes = 162.5 ≈ 160 pJ per byte (the low end; 160 is exactly the
  640 pJ per 32-bit DRAM access that Han et al., "Learning both Weights and Connections for Efficient Neural
  Networks", NeurIPS 2015, Table 1, quote from Horowitz). 45 nm is a decade old: 5–7 nm SoCs and LPDDR5 are several times lower in
  absolute terms; the *ratios* fp32 : int8 and compute : memory are what the profile is for.
- ``mcu`` — not a published per-MAC figure but an estimate from two data sheets, shown with its arithmetic:
  STMicroelectronics' STM32L476 data sheet gives about 100 µA/MHz in run mode (range 1, from flash) at 3 V
  → 100 µA × 3 V / 1 MHz = 300 pJ per cycle, memory accesses included. Arm's Cortex-M4 Technical Reference
  Manual gives the cycle counts: ``SMLAD`` does two 16×16 MACs in one cycle (the int8 kernels of CMSIS-NN,
  Lai et al. 2018, https://arxiv.org/abs/1801.06601, widen int8 to int16 and use it), so with the loads and the
  widening about 1 cycle per int8 MAC → 300 pJ; ``VFMA.F32`` takes 3 cycles → 900 pJ per fp32 MAC; a 32-bit
  load moves 4 bytes per cycle → 75 pJ per byte. Use it for the scale of energy on a microcontroller, not for
  a datasheet-grade figure.
- links — J. Huang, F. Qian, A. Gerber, Z. M. Mao, S. Sen, O. Spatscheck, "A Close Examination of Performance
  and Power Characteristics of 4G LTE Networks", MobiSys 2012, doi:10.1145/2307636.2307658: the data-transfer
  power model of their Table 3, ``P = α_u·t_u + α_d·t_d + β`` (mW, throughput t in Mbit/s), LTE α_u 438.39,
  α_d 51.97, β 1288.04; Wi-Fi α_u 283.17, α_d 137.01, β 132.86. The paper gives power, not energy per byte:
  energy per bit at throughput ``t`` is ``(α·t + β)/t`` nJ (a transfer pays the base power β for as long as
  it lasts), so per-byte figures depend on the throughput assumed. LTE is evaluated at the paper's own median
  throughputs (6 Mbit/s up, 13 Mbit/s down, from its 4GTest measurements); Wi-Fi at 10 / 20 Mbit/s, an
  assumption of ours. The radio's tail energy after a transfer (long for LTE, the main reason the paper
  finds LTE up to 23× less efficient than Wi-Fi in real traces) is left out, so these are lower bounds.

Checked against sources on 2026-12-02 (docs/deploy.md, "What was checked"): every Horowitz figure above, and
Huang et al.'s median throughputs and 23× finding; Huang et al.'s Table 3 coefficients could not be checked
against a copy of the table and are the one unverified input.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from deltaplane.errors import ConfigError

__all__ = [
    "LINKS",
    "PROFILES",
    "DeviceProfile",
    "Link",
    "activation_memory",
    "cost_row",
    "count_macs",
    "count_onnx_macs",
    "federated_round_cost",
    "inference_cost",
]


@dataclass(frozen=True)
class DeviceProfile:
    """Energy per operation of a device class (pJ), with where the numbers come from."""

    name: str
    pj_per_mac_fp32: float
    pj_per_mac_int8: float
    pj_per_byte: float  # moving one byte between memory and the compute unit
    source: str


PROFILES: dict[str, DeviceProfile] = {
    "phone": DeviceProfile(
        "phone",
        4.6,
        0.23,
        160.0,
        "Horowitz ISSCC 2014 (45 nm): fp32 mul 3.7 + add 0.9 pJ; int8 mul 0.2 + add 0.03 pJ; DRAM 1.3 nJ/64 bit",
    ),
    "mcu": DeviceProfile(
        "mcu",
        900.0,
        300.0,
        75.0,
        "estimate: STM32L476 data sheet ~100 µA/MHz at 3 V = 300 pJ/cycle; Cortex-M4 TRM cycle counts "
        "(SMLAD 2 MACs/cycle, VFMA.F32 3 cycles)",
    ),
}


@dataclass(frozen=True)
class Link:
    """A radio's power model ``P = α_u·t_u + α_d·t_d + β`` (mW, Mbit/s) at assumed throughputs."""

    name: str
    alpha_up_mw_per_mbps: float
    alpha_down_mw_per_mbps: float
    beta_mw: float
    up_mbps: float
    down_mbps: float
    source: str = "Huang et al. MobiSys 2012, Table 3 (power model); energy/byte derived at up_mbps/down_mbps"

    @property
    def uj_per_byte_up(self) -> float:
        """µJ per byte sent: ``8 · (α_u·t + β) / t`` nJ/bit → µJ/byte."""
        return 8 * (self.alpha_up_mw_per_mbps * self.up_mbps + self.beta_mw) / self.up_mbps / 1000

    @property
    def uj_per_byte_down(self) -> float:
        return 8 * (self.alpha_down_mw_per_mbps * self.down_mbps + self.beta_mw) / self.down_mbps / 1000


LINKS: dict[str, Link] = {
    # LTE at the paper's median measured throughputs; Wi-Fi at assumed ones (module docstring)
    "lte": Link("lte", 438.39, 51.97, 1288.04, up_mbps=6.0, down_mbps=13.0),
    "wifi": Link("wifi", 283.17, 137.01, 132.86, up_mbps=10.0, down_mbps=20.0),
}


def _as_args(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example, Mapping):
        return (), dict(example)
    if isinstance(example, tuple | list):
        return tuple(example), {}
    return (example,), {}


@torch.no_grad()
def count_macs(model: nn.Module, example: Any) -> dict[str, int]:
    """``{"macs": dense MACs, "nonzero_macs": MACs with zero weights skipped}`` for one forward pass on
    ``example`` (a tensor, a tuple of positional args or a dict of keyword args).

    Dense MACs come from ``FlopCounterMode`` (FLOPs / 2), with scaled-dot-product attention run by its math
    backend so the attention products are counted; the non-zero count subtracts, for every Linear and Conv2d,
    its MACs times its weight's fraction of zeros (measured with forward hooks on the same pass).
    """
    from torch.utils.flop_counter import FlopCounterMode

    args, kwargs = _as_args(example)
    per_layer: list[tuple[int, float]] = []

    def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        w = cast(torch.Tensor, mod.weight)  # hooked on Linear and Conv2d only
        if isinstance(mod, nn.Linear):
            macs = out.numel() * w.shape[1]
        else:  # Conv2d: every output element reads in_channels/groups × kh × kw weights
            macs = out.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        per_layer.append((int(macs), float((w == 0).float().mean())))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        # the math backend spells attention out as matmuls the counter sees; the fused CPU kernel it would
        # otherwise pick is not counted at all (Q·Kᵀ and weights·V would be missing)
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            model.eval()(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    macs = int(counter.get_total_flops()) // 2
    skipped = sum(m * zero for m, zero in per_layer)
    return {"macs": macs, "nonzero_macs": round(macs - skipped)}


#: ops whose multiply-accumulates are counted in an ONNX graph (their float, integer and quantized forms)
ONNX_MAC_OPS = (
    "MatMul",
    "Gemm",
    "Conv",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulNBits",
)


def _onnx_shapes(model: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for these feeds: ONNX shape inference first, then (for what it could not infer,
    e.g. contrib ops) the shapes of a real ONNX Runtime run with every intermediate exposed."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:  # pin the feeds' concrete shapes, so inference needs no symbolic dims
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            for d, n in zip(dims, np.asarray(feeds[inp.name]).shape, strict=False):
                d.ClearField("dim_param")
                d.dim_value = int(n)
    shapes: dict[str, tuple[int, ...]] = {i.name: tuple(int(x) for x in i.dims) for i in m.graph.initializer}
    shapes |= {k: tuple(np.asarray(v).shape) for k, v in feeds.items()}
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if dims and all(d.HasField("dim_value") for d in dims):
                shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    except Exception:  # inference is best effort (contrib ops): the run below covers what it misses
        pass
    wanted = {
        name
        for node in m.graph.node
        if node.op_type in ONNX_MAC_OPS
        for name in [*node.input[:2], *node.output[:1]]
        if name and name not in shapes
    }
    if wanted:
        outputs = {o.name for o in m.graph.output}
        for name in wanted - outputs:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for name, value in zip(names, sess.run(None, dict(feeds)), strict=True):
            shapes.setdefault(name, tuple(np.asarray(value).shape))
    return shapes


def count_onnx_macs(
    onnx_model: bytes | str | os.PathLike[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """MACs of one run of an ONNX graph on ``feeds``, counted from its MatMul / Gemm / Conv shapes.

    For a model that comes in as ONNX there is no PyTorch module to count on, so the count is read off the graph:
    ``MatMul`` (and ``MatMulInteger``, ``QLinearMatMul``) costs ``output elements × K`` with ``K`` the last
    dimension of its first input; ``Gemm`` ``M × N × K`` (``transA`` respected); ``Conv`` (and ``ConvInteger``,
    ``QLinearConv``) ``output elements × in_channels/groups × kernel``; ``MatMulNBits`` ``rows × N × K`` from its
    attributes. Shapes come from ONNX shape inference, completed by a real run where inference cannot reach.
    ``nonzero_macs`` scales each op by the share of non-zero entries of its constant weight (what a sparse kernel
    could skip to). Returns ``{"macs", "nonzero_macs", "by_op": {op_type: macs}}``.
    """
    import onnx
    from onnx import numpy_helper

    # the file's bytes are dropped once parsed (not held beside the model while it is walked)
    model = onnx.load_from_string(
        onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    )
    shapes = _onnx_shapes(model, feeds)
    inits = {i.name: i for i in model.graph.initializer}

    def density(name: str, zero_point: str | None = None) -> float:
        if name not in inits:
            return 1.0  # a weight computed at run time (e.g. dequantized): counted dense
        w = numpy_helper.to_array(inits[name])
        zero: object = 0  # 0, or the zero point's numpy scalar
        if zero_point and zero_point in inits:
            zp = numpy_helper.to_array(inits[zero_point])
            zero = zp.reshape(-1)[0] if zp.size == 1 else None
        if zero is None:
            return 1.0
        return float((w != zero).mean()) if w.size else 1.0

    total, nonzero = 0, 0.0
    by_op: dict[str, int] = {}
    for node in model.graph.node:
        op, ins = node.op_type, list(node.input)
        if op not in ONNX_MAC_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out = shapes.get(node.output[0])
        if op == "MatMulNBits":
            a = shapes.get(ins[0])
            if a is None:
                continue
            macs = int(np.prod(a[:-1], dtype=np.int64)) * int(attrs["N"]) * int(attrs["K"])
            dens = 1.0  # packed 4-bit blocks: zeros are not stored as such
        elif out is None:
            continue
        elif op in ("Conv", "ConvInteger", "QLinearConv"):
            w_name = ins[3] if op == "QLinearConv" else ins[1]
            w = shapes.get(w_name)
            if w is None:
                continue
            macs = int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
            zp = (
                ins[5]
                if op == "QLinearConv" and len(ins) > 5
                else ins[3]
                if op == "ConvInteger" and len(ins) > 3
                else None
            )
            dens = density(w_name, zp)
        elif op == "Gemm":
            a = shapes.get(ins[0])
            if a is None:
                continue
            k = a[0] if attrs.get("transA", 0) else a[1]
            macs = int(np.prod(out, dtype=np.int64)) * int(k)
            dens = density(ins[1])
        else:  # MatMul, MatMulInteger, QLinearMatMul: (..., M, K) @ (..., K, N)
            a = shapes.get(ins[0])
            if a is None:
                continue
            w_name = ins[3] if op == "QLinearMatMul" else ins[1]
            zp = (
                ins[5]
                if op == "QLinearMatMul" and len(ins) > 5
                else ins[3]
                if op == "MatMulInteger" and len(ins) > 3
                else None
            )
            macs = int(np.prod(out, dtype=np.int64)) * int(a[-1])
            dens = density(w_name, zp)
        total += macs
        nonzero += macs * dens
        by_op[op] = by_op.get(op, 0) + macs
    return {"macs": int(total), "nonzero_macs": round(nonzero), "by_op": by_op}


def activation_memory(
    onnx_model: bytes | str | os.PathLike[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Peak and total activation bytes of the graph ONNX Runtime executes for ``feeds`` (module docstring).

    Returns ``{"peak_activation_bytes", "total_activation_bytes", "weight_bytes"}``; inputs count as live until
    their last reader, graph outputs until the end.

    Memory: a graph given as a path is opened by ONNX Runtime from the file, and the optimised graph is written
    with its weights in a side file (:data:`_EXTERNAL_WEIGHTS`), so the weights are held by one session at a time
    and never also as a parsed ``ModelProto`` and its serialized bytes (on MiniLM's fp32 graph that was
    ~4 copies of 90 MB at once, the peak of the whole deploy).
    """
    import onnx
    import onnxruntime as ort

    src = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = os.path.join(tmp, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = opt_path
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", _EXTERNAL_WEIGHTS
        )
        so.log_severity_level = 3
        # built only to write the optimised graph; dropped at once, before the walk's session loads the weights
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        model = onnx.load(opt_path, load_external_data=False)  # the graph; the weights stay in the side file
        graph = model.graph
        weight_bytes = sum(
            int(np.prod(i.dims, dtype=np.int64)) * _itemsize(i.data_type) for i in graph.initializer
        )
        inits = {i.name for i in graph.initializer}
        outputs = {o.name for o in graph.output}
        for node in graph.node:
            for name in node.output:
                if name and name not in outputs:
                    graph.output.append(onnx.ValueInfoProto(name=name))
        walk_path = os.path.join(tmp, "walk.onnx")  # beside the side file its initializers name
        onnx.save(model, walk_path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(walk_path, so, providers=["CPUExecutionProvider"])
        values = sess.run(None, dict(feeds))
        size = {o.name: int(v.nbytes) for o, v in zip(sess.get_outputs(), values, strict=True)}
        del sess, values
    size.update({k: int(np.asarray(v).nbytes) for k, v in feeds.items()})
    nodes = list(graph.node)
    last = {name: len(nodes) for name in outputs}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name and name not in inits:
                last[name] = max(last.get(name, i), i)
    live = sum(size[k] for k in feeds)
    peak, total = live, 0
    alive = set(feeds)
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                live += size.get(name, 0)
                total += size.get(name, 0)
                alive.add(name)
        peak = max(peak, live)
        for name in [n for n in alive if last.get(n, -1) <= i]:
            live -= size.get(name, 0)
            alive.discard(name)
    return {"peak_activation_bytes": peak, "total_activation_bytes": total, "weight_bytes": weight_bytes}


#: the file :func:`activation_memory` has ONNX Runtime write the optimised graph's weights to
_EXTERNAL_WEIGHTS = "opt.weights"


def _itemsize(onnx_type: int) -> int:
    from onnx import helper

    return int(np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)).itemsize)


def inference_cost(
    *,
    macs: int,
    weight_bytes: int,
    total_activation_bytes: int,
    int8: bool,
    profiles: Sequence[DeviceProfile] | None = None,
) -> dict[str, float]:
    """Energy per inference in µJ per profile: ``MACs·pJ/MAC + (weights + 2·activations)·pJ/byte``."""
    out = {}
    moved = weight_bytes + 2 * total_activation_bytes
    for p in profiles or PROFILES.values():
        pj = macs * (p.pj_per_mac_int8 if int8 else p.pj_per_mac_fp32) + moved * p.pj_per_byte
        out[p.name] = pj / 1e6
    return out


def federated_round_cost(
    model: nn.Module,
    example: Any,
    *,
    samples: float,
    epochs: int,
    bytes_up: int,
    bytes_down: int,
    profile: DeviceProfile | str = "phone",
    links: Sequence[Link | str] = ("wifi", "lte"),
    forward_macs: int | None = None,
) -> dict[str, Any]:
    """One client's cost of one federated round: local training compute plus the radio for the round's bytes.

    Training FLOPs ≈ 3 × forward FLOPs per sample (forward + backward, which costs about twice the forward:
    Kaplan et al. 2020, https://arxiv.org/abs/2001.08361) × ``samples`` × ``epochs``, at fp32 MAC energy of the
    profile; ``example`` is a single-sample input. Radio: ``bytes_up`` sent and ``bytes_down`` received at each
    link's energy per byte (:data:`LINKS`). Returns MACs, bytes, and µJ for compute and per link, so a run
    report can show what a round costs a phone on Wi-Fi vs LTE. ``forward_macs`` (MACs of one sample's forward
    pass) skips counting them again when the caller already has them (a run's rounds all share one model).
    """
    if samples < 0 or epochs < 0 or bytes_up < 0 or bytes_down < 0 or (forward_macs or 0) < 0:
        raise ConfigError("samples, epochs and byte counts must be non-negative")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    fwd = count_macs(model, example)["macs"] if forward_macs is None else int(forward_macs)
    train_macs = round(3 * fwd * samples * epochs)
    compute_uj = train_macs * prof.pj_per_mac_fp32 / 1e6
    radio = {}
    for link in links:
        lk = LINKS[link] if isinstance(link, str) else link
        radio[lk.name] = bytes_up * lk.uj_per_byte_up + bytes_down * lk.uj_per_byte_down
    return {
        "profile": prof.name,
        "forward_macs_per_sample": fwd,
        "train_macs": train_macs,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "compute_uj": compute_uj,
        "radio_uj": radio,
        "total_uj": {k: compute_uj + v for k, v in radio.items()},
    }


def profiles_table() -> list[dict[str, Any]]:
    """The profiles and links as plain rows (for manifests and docs)."""
    return [asdict(p) for p in PROFILES.values()] + [
        asdict(lk) | {"uj_per_byte_up": lk.uj_per_byte_up, "uj_per_byte_down": lk.uj_per_byte_down}
        for lk in LINKS.values()
    ]


def cost_row(
    macs: Mapping[str, Any], memory: Mapping[str, int], model_bytes: int, int8: bool
) -> dict[str, Any]:
    """One model's entry of a manifest's ``device_cost``: its MAC count (:func:`count_macs` or
    :func:`count_onnx_macs`), activation memory (:func:`activation_memory`), bytes and energy per profile."""
    return {
        **macs,
        "model_bytes": model_bytes,
        **memory,
        "int8_compute": int8,
        "energy_uj": inference_cost(
            macs=macs["macs"],
            weight_bytes=memory["weight_bytes"],
            total_activation_bytes=memory["total_activation_bytes"],
            int8=int8,
        ),
    }


def deploy_cost(
    reference: nn.Module,
    compressed: nn.Module,
    example: Any,
    *,
    fp32_onnx: bytes | str | os.PathLike[str],
    shipped_onnx: bytes | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    fp32_bytes: int,
    artifact_bytes: int,
    int8: bool,
) -> dict[str, Any]:
    """fp32 vs compressed device cost per batch-1 inference, as recorded in a deploy manifest (``device_cost``).

    ``fp32_onnx`` is the float graph of the reference architecture, ``shipped_onnx`` what the artifact decodes
    to; ``example``/``feeds`` the same batch-1 input for PyTorch and ONNX Runtime.
    """
    rows: dict[str, Any] = {}
    for key, model, graph, nbytes, is_int8 in (
        ("fp32", reference, fp32_onnx, fp32_bytes, False),
        ("compressed", compressed, shipped_onnx, artifact_bytes, int8),
    ):
        rows[key] = cost_row(count_macs(model, example), activation_memory(graph, feeds), nbytes, is_int8)
    rows["note"] = (
        "Estimates per batch-1 inference: dense MACs (ORT does not skip zeros) × pJ/MAC + (weights + 2 × "
        "activations) × pJ/byte, profiles in deltaplane.deploy.cost (phone: Horowitz ISSCC 2014, 45 nm; mcu: "
        "estimate for a Cortex-M4F class microcontroller)."
    )
    return rows

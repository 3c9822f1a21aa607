"""Deploy a model that arrives as ONNX (no PyTorch code): prune its weight initializers, quantize with ORT, pack.

An ``.onnx`` file is a model too: ``deltaplane deploy model.onnx`` compresses what ONNX Runtime's tooling can —
int8 dynamic / static and int4 weight-only quantization (:func:`~deltaplane.deploy.quantize.quantize_onnx`) —
and prunes the weight matrices in the graph itself: the constant weight of every ``MatMul`` (``(in, out)``),
``Gemm`` (``(out, in)`` with ``transB=1``, else ``(in, out)``) and ``Conv`` (``(out, in, kh, kw)``), by magnitude
per layer (``0.8``, ``layer:0.8``) or N:M along the input dimension (``2:4``; a weight shared by nodes that read it
in different orientations is left dense under N:M and reported as skipped). Wanda and channel pruning need
activations or a traced module and are refused here.

Fidelity is measured against the original ONNX model on evaluation feeds, on its first output. With labels and
``(batch, classes)`` logits that cover them, the model is a classifier and is gated as one: accuracy drop, top-1
disagreement, accuracy floor and above-chance (the logits' cosine is recorded). Any other output with several
values per input (an embedding, or logits on random inputs) is gated on the minimum per-input cosine similarity
and, when it is ``(batch, k)``, on top-1 agreement as well. An output with one value per input (a regressor, a score) is gated on R² over
the batch (:func:`~deltaplane.deploy.gates.batch_r2`): a 1-element cosine is only the sign of a product. Weight
initializers with NaN/Inf are refused on load, and NaN/Inf outputs before any gate. Device cost records activation memory and bytes (no MAC count: there is no PyTorch module to count).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from deltaplane.deploy.artifact import pack_onnx
from deltaplane.deploy.cost import activation_memory, cost_row, count_onnx_macs
from deltaplane.deploy.encoder import cosine_similarity_rows
from deltaplane.deploy.gates import (
    Gates,
    batch_r2,
    classifier_quality,
    refuse_non_finite_outputs,
    refuse_non_finite_tensors,
)
from deltaplane.deploy.onnx import ort_session
from deltaplane.deploy.prune import nm_mask
from deltaplane.deploy.publish import check_out_dir, staging_dir
from deltaplane.deploy.quantize import quantize_onnx
from deltaplane.errors import ConfigError, DecodeError, ExportError, UnsupportedLayer

__all__ = ["OnnxDeployResult", "deploy_onnx_model", "integer_input_ranges", "onnx_feeds", "prune_onnx"]

Feeds = list[dict[str, np.ndarray]]

#: Why an ONNX model's robustness gates are not evaluated, whatever its inputs (digits images or random feeds).
ONNX_NOT_EVALUATED = {
    "max-ood-drop": (
        "No OOD evaluation: an ONNX input is measured on clean inputs only (corrupted variants are made for "
        "PyTorch classifiers); deploy the PyTorch checkpoint for the OOD gate."
    ),
    "max-adv-drop": (
        "No adversarial evaluation: FGSM/PGD need the model's gradients, which an ONNX graph run by ONNX Runtime "
        "does not give; deploy the PyTorch checkpoint for the adversarial gate."
    ),
}


@dataclass
class OnnxDeployResult:
    """Paths written and the manifest of :func:`deploy_onnx_model`."""

    out_dir: Path
    artifact: Path
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)


def _weights(model: Any) -> dict[str, tuple[str, bool | None]]:
    """Initializer name → (op types, whether its rows are (out, in)) for every prunable constant weight.

    One initializer can feed several nodes (a weight tied between layers). When they read it in different
    orientations (a ``MatMul``'s ``(in, out)`` and a ``Gemm``'s ``(out, in)`` with ``transB=1``), the orientation
    is ``None``: there is no single input dimension to run N:M groups along.
    """
    inits = {i.name for i in model.graph.initializer}
    seen: dict[str, tuple[list[str], set[bool]]] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "MatMul":
            out_in = False
        elif node.op_type == "Gemm":
            out_in = bool(next((a.i for a in node.attribute if a.name == "transB"), 0))
        elif node.op_type == "Conv":
            out_in = True
        else:
            continue
        ops, orientations = seen.setdefault(node.input[1], ([], set()))
        ops.append(node.op_type + ("(transB=1)" if node.op_type == "Gemm" and out_in else ""))
        orientations.add(out_in)
    return {
        name: (", ".join(sorted(set(ops))), orient.pop() if len(orient) == 1 else None)
        for name, (ops, orient) in seen.items()
    }


def prune_onnx(model: Any, spec: Mapping[str, Any]) -> tuple[float, dict[str, str]]:
    """Prune ``model``'s weight initializers in place by a parsed prune spec; returns (sparsity, skipped layers)."""
    from onnx import numpy_helper

    method = spec["method"]
    if method not in ("nm", "magnitude", "layer"):
        raise UnsupportedLayer(
            f"{method} pruning needs a PyTorch module (activations or tracing); an ONNX input takes 0.8, "
            "layer:0.8 or 2:4"
        )
    targets = _weights(model)
    zeros = total = 0
    skipped: dict[str, str] = {}
    for init in model.graph.initializer:
        if init.name not in targets:
            continue
        orig = numpy_helper.to_array(init)
        # scored in float32, written back in the graph's own dtype (fp16 stays fp16)
        w = orig.astype(np.float32)
        if w.ndim < 2:
            skipped[init.name] = "not a matrix"
            continue
        ops, out_in = targets[init.name]
        if out_in is None:
            if method == "nm":  # N:M along one node's input dimension is not N:M along the other's
                skipped[init.name] = (
                    f"shared by nodes that read it in different orientations ({ops}): no single input "
                    "dimension for N:M groups"
                )
                continue
            out_in = True  # magnitude masks are elementwise: the orientation does not change them
        rows = w.reshape(w.shape[0], -1) if out_in else w.T  # (out, in): groups run along the input dim
        score = torch.from_numpy(np.abs(rows).copy())
        if method == "nm":
            try:
                keep = nm_mask(score, spec["n"], spec["m"]).numpy()
            except UnsupportedLayer as e:
                skipped[init.name] = str(e)
                continue
        else:
            k = round(spec["sparsity"] * score.numel())
            keep = np.ones(score.shape, bool)
            if k:
                flat = score.flatten()
                keep.reshape(-1)[torch.topk(flat, k, largest=False).indices.numpy()] = False
        rows = np.where(keep, rows, 0.0).astype(orig.dtype)
        new = rows.reshape(w.shape) if out_in else rows.T
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
        zeros += int((new == 0).sum())
        total += new.size
    if total == 0:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise UnsupportedLayer(
            "the ONNX model has no MatMul/Gemm/Conv with a constant weight to prune"
            + (f" (not pruned: {why})" if why else "")
        )
    return zeros / total, skipped


#: Random integers the CLI feeds an integer input it cannot trace to a table: [0, INT_HIGH).
INT_HIGH = 100
#: Ops that pass an integer input's values through unchanged (only its shape or dtype changes), traced from the
#: input to the ``Gather`` whose indices it becomes.
_PASS_VALUES = {
    "Cast",
    "Identity",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Transpose",
    "Expand",
    "Slice",
}


def _constant_shapes(model: Any) -> dict[str, list[int]]:
    """Shape of every constant tensor of the graph (initializers, ``Constant`` nodes, ``Identity`` of either)."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = list(a.t.dims)
        elif node.op_type == "Identity" and node.input[0] in shapes:
            shapes[node.output[0]] = shapes[node.input[0]]
    return shapes


def integer_input_ranges(model: Any) -> dict[str, dict[str, Any]]:
    """For every integer input, the range ``[low, high)`` :func:`onnx_feeds` draws from, and why.

    An input whose values reach a ``Gather``'s indices (an embedding lookup), through ops that do not change
    values (``Cast``, ``Reshape``, ``Unsqueeze``...), draws from every row of the smallest constant table it
    indexes, ``[0, rows)``: ids beyond it are out of range for ONNX Runtime, and ids below a fixed cap would
    leave most of a vocabulary's rows (and what compression did to them) unmeasured; in BERT-style vocabularies
    ids below 100 are ``[PAD]`` and ``[unused]`` tokens. Otherwise [0, ``INT_HIGH``).
    """
    from onnx import TensorProto

    shapes = _constant_shapes(model)
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, []).append((node, i))
    inits = {i.name for i in model.graph.initializer}
    ints = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64}
    ints |= {TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits or inp.type.tensor_type.elem_type not in ints:
            continue
        tables: dict[str, int] = {}
        todo, seen = [inp.name], {inp.name}
        while todo:
            for node, i in users.get(todo.pop(), []):
                if node.op_type == "Gather" and i == 1 and node.input[0] in shapes:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = shapes[node.input[0]]
                    if dims:
                        tables[node.input[0]] = int(dims[axis])
                elif node.op_type in _PASS_VALUES and i == 0:
                    todo += [o for o in node.output if o not in seen]
                    seen |= set(node.output)
        if tables:
            table = min(tables, key=tables.__getitem__)
            high = tables[table]
            why = f"indexes the {tables[table]}-row table '{table}' (Gather): every row"
        else:
            high, why = INT_HIGH, "default: not traced to a lookup table"
        out[inp.name] = {"low": 0, "high": high, "why": why}
    return out


def onnx_feeds(model: Any, n: int, *, seed: int, sym: int = 16) -> Feeds:
    """``n`` batch-1 feeds for the model's inputs from a seeded generator: floats ~ N(0, 1), integers in
    [0, 100), or over the rows of the table an integer input indexes (:func:`integer_input_ranges`).

    Symbolic dimensions other than the first (batch) become ``sym``. For models whose inputs mean something
    (token ids of a given vocabulary, images in a range), pass real feeds instead. :class:`ConfigError` when an
    integer input indexes an empty table (nothing can be fed to it).
    """
    from onnx import helper

    inits = {i.name for i in model.graph.initializer}
    ranges = integer_input_ranges(model)
    for name, r in ranges.items():
        if r["high"] <= r["low"]:
            raise ConfigError(f"cannot generate inputs for '{name}': it {r['why']}; pass real inputs")
    g = np.random.default_rng(seed)
    specs = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else sym for d in t.shape.dim]
        if dims:
            dims[0] = 1
        specs.append((inp.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))))
    feeds = []
    for _ in range(n):
        f = {}
        for name, dims, dt in specs:
            if np.issubdtype(dt, np.integer):
                r = ranges.get(name, {"low": 0, "high": INT_HIGH})
                f[name] = g.integers(r["low"], r["high"], size=dims).astype(dt)
            elif dt == np.bool_:
                f[name] = np.ones(dims, bool)
            else:
                f[name] = g.standard_normal(dims).astype(dt)
        feeds.append(f)
    return feeds


def _run(session: Any, feeds: Feeds) -> np.ndarray:
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _run_source(data: bytes, feeds: Feeds, src: Path) -> np.ndarray:
    """The source model's first output on ``feeds``; :class:`ConfigError` (not ONNX Runtime's own error) when
    ONNX Runtime cannot load it or the feeds do not fit it (an input name or shape, an integer input beyond an
    embedding table's rows)."""
    try:
        session = ort_session(data)
    except Exception as e:  # onnxruntime's own error types
        raise ConfigError(f"ONNX Runtime cannot load {src}: {e}") from e
    try:
        return _run(session, feeds)
    except Exception as e:
        names = {i.name: i.shape for i in session.get_inputs()}
        given = {k: (v.dtype.name, list(v.shape)) for k, v in feeds[0].items()} if feeds else {}
        raise ConfigError(
            f"{src} does not run on its evaluation inputs ({given}; the model takes {names}): "
            f"{str(e).splitlines()[0]}. Pass inputs that fit the model (deploy_onnx_model(eval_feeds=...) from "
            "Python; the CLI draws integers in [0, 100), or over the rows of the table an input indexes)"
        ) from e


def deploy_onnx_model(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    eval_feeds: Feeds,
    calib_feeds: Sequence[dict[str, np.ndarray]] = (),
    labels: np.ndarray | None = None,
    prune: str | None = None,
    quant: str = "int8",
    gates: Gates | None = None,
    progress: Callable[[str], None] | None = None,
    card_info: dict[str, str] | None = None,
    inputs_note: str | None = None,
    eval_inputs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> OnnxDeployResult:
    """Prune → quantize → pack an ONNX model and measure the artifact as shipped against the original graph.

    ``quant``: ``int8`` / ``int8-dynamic`` (ORT dynamic), ``int8-static`` (needs ``calib_feeds``), ``int4``,
    ``none``. ``eval_feeds``: batch-1 feeds; ``labels``: one per feed (optional) for an accuracy figure.
    ``eval_inputs``: how the feeds were made (e.g. random, with :func:`integer_input_ranges`), recorded as
    ``manifest["eval_inputs"]``.
    ``out_dir``: replaced as a whole when published; a non-empty folder that is not a deploy's output is refused
    unless ``overwrite`` (:func:`~deltaplane.deploy.publish.check_out_dir`).
    """
    import onnx

    from deltaplane.deploy.pipeline import QUANTS, _check_gates, _embedded, _publish, _read_back, parse_prune

    say = progress or (lambda _msg: None)
    if quant not in QUANTS:
        raise ConfigError(f"quant must be one of {', '.join(QUANTS)}. Found {quant!r}")
    if not eval_feeds:
        raise ConfigError("deploy_onnx_model needs evaluation feeds")
    out_dir = check_out_dir(out_dir, overwrite=overwrite)  # before any work: a bad OUT fails fast
    src = Path(src)
    data = src.read_bytes()
    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises its own ValidationError / protobuf errors
        raise DecodeError(f"{src} is not a valid ONNX model: {e}") from e
    refuse_non_finite_tensors(_constant_tensors(model), str(src))
    ref = _run_source(data, eval_feeds, src)  # before any work: feeds that do not fit fail fast, typed
    import hashlib

    spec = parse_prune(prune)
    sparsity = 0.0
    skipped: dict[str, str] = {}
    if spec is not None:
        say(f"pruning ONNX weights ({prune})")
        sparsity, skipped = prune_onnx(model, spec)
    tmp = staging_dir(out_dir)
    try:
        pruned = tmp / "pruned.onnx"
        onnx.save(model, str(pruned))
        shipped, store, scheme = pruned, "none", "fp32"
        if quant != "none":
            say(f"quantizing ({quant})")
        if quant in ("int8", "int8-dynamic"):
            shipped, scheme = quantize_onnx(pruned, tmp / "q.onnx", mode="dynamic"), "int8 dynamic (ORT)"
        elif quant == "int8-static":
            if not calib_feeds:
                raise ConfigError("int8-static needs calibration feeds")
            shipped = quantize_onnx(pruned, tmp / "q.onnx", mode="static", calibration=list(calib_feeds))
            scheme = "int8 static (ORT QDQ)"
        elif quant == "int4":
            shipped, store = quantize_onnx(pruned, tmp / "q.onnx", mode="int4"), "int4"
            scheme = "int4 weight-only (ORT MatMulNBits) + int4 storage"
        say("packing and evaluating the artifact as shipped")
        sha = hashlib.sha256(data).hexdigest()
        info = pack_onnx(
            shipped,
            tmp / "model.dpla",
            quant=store,
            manifest=_embedded(src.name, sha, "onnx", prune, quant, scheme, sparsity),
        )
        _, graph, evaluated = _read_back(tmp, graph=True)
        onnx_bytes = cast("bytes", graph)
        for f in (pruned, tmp / "q.onnx"):
            f.unlink(missing_ok=True)
        refuse_non_finite_outputs(ref, f"the source model {src.name}")
        try:
            out = _run(ort_session(onnx_bytes), eval_feeds)
        except Exception as e:  # onnxruntime's own error types; the source ran on these feeds
            raise ExportError(
                f"the compressed artifact ({quant}) does not run on feeds the source model runs on: {e}"
            ) from e
        refuse_non_finite_outputs(out, f"the compressed artifact ({quant})", ExportError)
        fidelity, quality = output_fidelity(ref, out, labels)
        fidelity = {"inputs": len(eval_feeds), **fidelity}
        say("device cost (MACs from the graph, activation memory, energy estimates)")
        device_cost: dict[str, Any] = {}
        for key, graph, nbytes, int8 in (
            ("fp32", data, len(data), False),
            ("compressed", onnx_bytes, info.nbytes, quant.startswith("int8")),
        ):
            macs, mem = count_onnx_macs(graph, eval_feeds[0]), activation_memory(graph, eval_feeds[0])
            device_cost[key] = cost_row(macs, mem, nbytes, int8)
        device_cost["note"] = (
            "Estimates per batch-1 inference: MACs counted from the graph's MatMul/Gemm/Conv shapes (ONNX shape "
            "inference), × pJ/MAC + (weights + 2 × activations) × pJ/byte, profiles in deltaplane.deploy.cost."
        )
        manifest: dict[str, Any] = {
            "model": src.name,
            "task": "onnx",
            "source_sha256": sha,
            "format": "onnx",
            "prune": prune or "none",
            "prune_skipped_layers": skipped,
            "quant": quant,
            "quant_scheme": scheme,
            "weight_sparsity": sparsity,
            "sizes": {
                "fp32_safetensors_bytes": len(data),  # the source ONNX file: the baseline it is compared with
                "artifact_bytes": info.nbytes,
                "artifact_payload_bytes": info.payload_nbytes,
                "compression_ratio": len(data) / info.nbytes,
            },
            "fidelity": fidelity,
            "device_cost": device_cost,
            "quality": quality,
        }
        if inputs_note:
            manifest["inputs_note"] = inputs_note
        if eval_inputs is not None:
            manifest["eval_inputs"] = dict(eval_inputs)
        _check_gates(manifest, gates, ONNX_NOT_EVALUATED)
        files = _publish(tmp, out_dir, manifest, card_info, evaluated=evaluated, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OnnxDeployResult(out_dir, out_dir / "model.dpla", manifest, files)


def output_fidelity(
    ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fidelity of the shipped outputs ``out`` to the source's ``ref`` (rows = inputs) and its gate summary.

    One value per input: R² over the batch (plus the correlation, for the record). Several: the per-input cosine
    for every such output, and for ``(batch, classes)`` logits top-1 agreement (with labels: accuracies, the
    accuracy drop, disagreement and chance as for PyTorch classifiers).
    """
    flat_ref, flat_out = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    fidelity: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    if flat_ref.shape[1] == 1:  # a scalar per input: judged over the batch, never per row
        r2 = batch_r2(flat_out, flat_ref)
        a, b = flat_ref[:, 0].astype(np.float64), flat_out[:, 0].astype(np.float64)
        corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float(np.array_equal(a, b))
        fidelity |= {"r2": r2, "correlation": corr}
        quality["r2_min"] = r2
        return fidelity, quality
    cos = cosine_similarity_rows(flat_out, flat_ref)
    fidelity |= {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    if ref.ndim == 2 and labels is not None and ref.shape[1] > int(np.max(labels)):
        # labelled logits: a classifier, judged by what it predicts (accuracy, agreement, floors); the logits'
        # direction is recorded, not gated (a 50%-pruned digits CNN: logit cosine 0.96 at 99.7% accuracy)
        q = classifier_quality(ref, out, labels)
        fidelity |= {
            "top1_agreement": 1 - q["disagreement_points"] / 100,
            "accuracy_fp32": q["accuracy_fp32"],
            "accuracy": q["accuracy"],
        }
        quality |= q | {
            "accuracy_drop_points": 100 * (q["accuracy_fp32"] - q["accuracy"]),
            "accuracy_label": "clean accuracy drop",
        }
        return fidelity, quality
    # unknown meaning (embedding or logits): the direction of every output is gated, and for (batch, k) the
    # top-1 agreement too, so an embedding whose argmax never moves is not waved through
    quality["cosine_min"] = float(cos.min())
    if ref.ndim == 2:
        agree = float((out.argmax(1) == ref.argmax(1)).mean())
        fidelity["top1_agreement"] = agree
        quality |= {
            "accuracy_drop_points": 100 * (1 - agree),
            "accuracy_label": "top-1 disagreement with fp32",
        }
    return fidelity, quality


def _constant_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Every floating-point constant of the graph (initializers and ``Constant`` nodes), by name."""
    from onnx import numpy_helper

    protos = [(i.name, i) for i in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            protos += [(node.output[0], a.t) for a in node.attribute if a.name == "value"]
    out = {}
    for name, proto in protos:
        arr = numpy_helper.to_array(proto)
        if np.issubdtype(arr.dtype, np.floating):
            out[name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
    return out


def digits_feeds(model: Any, x: np.ndarray, input_shape: Sequence[int] | None = None) -> Feeds | None:
    """Batch-1 feeds of digits images if the model's single input fits them (``N×1×8×8`` or ``N×64``), else None."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        return None
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    tail = list(dims[1:])
    for shape in ([1, 8, 8], [64]):
        if tail == shape:
            return [
                {inputs[0].name: x[i : i + 1].reshape(1, *shape).astype(np.float32)} for i in range(len(x))
            ]
    return None

"""One call from a trained classifier to a device artifact: prune → (fine-tune) → export → quantize → pack → evaluate.

:func:`deploy_classifier` is what ``deltaplane deploy`` runs. It evaluates the artifact *as shipped* — the ORT
session is built from the bytes read back from the artifact file — so the reported accuracy is the accuracy of
what a device runs, not of an intermediate model. The output folder is checked before any work, everything is
written to a hidden sibling folder and swapped in as a whole at the end (:mod:`deltaplane.deploy.publish`): a
failure at any step leaves no partial artifact, and the folder is always one complete deploy, never a mix.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

import numpy as np
import torch
from torch import nn

from deltaplane.deploy.artifact import (
    Artifact,
    pack_onnx,
    read_artifact,
    state_dict_sha256,
    write_artifact,
)
from deltaplane.deploy.card import render_model_card
from deltaplane.deploy.cost import deploy_cost
from deltaplane.deploy.gates import (
    Gates,
    classifier_quality,
    ood_excess_drops,
    refuse_non_finite_outputs,
    refuse_non_finite_tensors,
)
from deltaplane.deploy.onnx import export_onnx, ort_session
from deltaplane.deploy.profile import (
    Comparison,
    Evaluation,
    compare,
    evaluate,
    onnx_predictor,
    torch_predictor,
)
from deltaplane.deploy.prune import (
    PruneResult,
    apply_masks,
    channel_prune,
    check_sparsity,
    magnitude_prune,
    nm_prune,
    sparsity_of,
    wanda_prune,
)
from deltaplane.deploy.publish import (
    bytes_sha256,
    check_out_dir,
    manifest_json,
    publish_dir,
    staging_dir,
)
from deltaplane.deploy.quantize import quantize_onnx
from deltaplane.deploy.sparsegpt import sparsegpt_prune
from deltaplane.deploy.tokens import TokenDeployResult
from deltaplane.errors import ConfigError, ExportError, QualityGateFailed
from deltaplane.specs import parse_one_spec
from deltaplane.threads import torch_threads

__all__ = [
    "DeployResult",
    "EncoderDeployResult",
    "deploy_classifier",
    "deploy_encoder",
    "manifest_json",
    "parse_prune",
    "prune_model",
]

QUANTS = ("none", "int8", "int8-static", "int8-dynamic", "int4")
FORMATS = ("onnx", "weights")


_PRUNE_FORMS = (
    "use 2:4, 0.8, layer:0.8, wanda:0.5, wanda:2:4, sparsegpt:2:4, sparsegpt:0.5 or channels:0.5, or the spec "
    "grammar: nm(n=2, m=4), magnitude(0.8), layer(0.8), wanda(0.5), wanda(n=2, m=4), sparsegpt(n=2, m=4), "
    "sparsegpt(0.5), channels(0.5)"
)
#: each prune method's parameters; wanda and sparsegpt take a sparsity or an N:M pattern
_PRUNE_PARAMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "nm": (("n", "m"),),
    "magnitude": (("sparsity",),),
    "global": (("sparsity",),),
    "layer": (("sparsity",),),
    "channels": (("sparsity",),),
    "wanda": (("sparsity",), ("n", "m")),
    "sparsegpt": (("sparsity",), ("n", "m")),
}


def _prune_grammar_text(s: str) -> str:
    """A short form (``2:4``, ``0.8``, ``wanda:2:4``, ``layer:0.8``) as the spec grammar writes it; grammar text
    (``nm(n=2, m=4)``) unchanged."""
    if "(" in s or (":" not in s and re.fullmatch(r"[a-z_]\w*", s, re.ASCII)):
        return s
    parts = [p.strip() for p in s.split(":")]
    if parts[0] in _PRUNE_PARAMS:
        method, values = parts[0], parts[1:]
    else:
        method, values = ("nm" if len(parts) == 2 else "magnitude"), parts
    if len(values) == 2:
        return f"{method}(n={values[0]}, m={values[1]})"
    if len(values) == 1:
        return f"{method}({values[0]})"
    return f"{method}({', '.join(values)})"  # too many values: the method's check names what it takes


def _whole(value: object) -> TypeGuard[int]:
    """Whether ``value`` is a whole number (an ``int``, not a ``bool``) as N:M's n and m must be."""
    return isinstance(value, int) and not isinstance(value, bool)


def parse_prune(spec: str | None) -> dict[str, Any] | None:
    """Parse a prune spec into ``{"method": ..., "sparsity": ...}`` or ``{"method": ..., "n": ..., "m": ...}``.

    The grammar is the codecs' (:func:`deltaplane.codecs.parse_spec`): ``nm(n=2, m=4)``, ``magnitude(0.8)``,
    ``layer(0.8)``, ``wanda(0.5)``, ``wanda(n=2, m=4)``, ``sparsegpt(n=2, m=4)``, ``sparsegpt(0.5)``,
    ``channels(0.5)``. The short forms mean the same: ``"2:4"``, ``"0.8"`` (= ``magnitude:0.8``), ``"layer:0.8"``,
    ``"wanda:0.5"``, ``"wanda:2:4"``, ``"sparsegpt:2:4"``, ``"sparsegpt:0.5"``, ``"channels:0.5"``. Numbers are
    the grammar's: ASCII digits, finite, no leading ``+``. ``None``/``"none"`` means no pruning.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ConfigError(f"prune spec must be text such as '2:4' or 'magnitude(0.8)'. Found {spec!r}")
    s = spec.strip().lower()
    bad = next((c for c in s if not c.isascii()), None)
    if bad is not None:  # '٢:٤' would otherwise read as 2:4
        raise ConfigError(
            f"prune spec {spec!r} has the non-ASCII character {bad!r} (U+{ord(bad):04X}); a prune spec is "
            f"ASCII: retype it with the digits 0-9 ({_PRUNE_FORMS})"
        )
    if s == "none":
        return None
    if re.search(r"(?:^|[(:,=])\s*\+", s):
        raise ConfigError(
            f"prune spec {spec!r}: a number is written without a leading '+' (e.g. 0.5, not +0.5)"
        )
    text = _prune_grammar_text(s)
    name, args, kwargs = parse_one_spec(
        text, label=f"prune spec {spec!r}", noun="methods", hint=f"; {_PRUNE_FORMS}"
    )
    shapes = _PRUNE_PARAMS.get(name)
    if shapes is None:
        raise ConfigError(f"prune spec {spec!r} not understood: unknown method {name!r}; {_PRUNE_FORMS}")
    shape = next((sh for sh in shapes if len(args) == len(sh)), None) if args else None
    if args and shape is None:
        raise ConfigError(
            f"prune spec {spec!r}: {name} takes {' or '.join(str(len(sh)) for sh in shapes)} value(s), "
            f"got {len(args)}; {_PRUNE_FORMS}"
        )
    params = dict(zip(shape or (), args, strict=True))
    for k, v in kwargs.items():
        if k in params:
            raise ConfigError(f"prune spec {spec!r}: '{k}' given twice")
        params[k] = v
    shape = next((sh for sh in shapes if set(params) == set(sh)), None)
    if shape is None:
        want = " or ".join(", ".join(sh) for sh in shapes)
        raise ConfigError(
            f"prune spec {spec!r}: {name} takes {want}, got {sorted(params) or 'nothing'}; {_PRUNE_FORMS}"
        )
    method = "magnitude" if name == "global" else name
    if shape == ("sparsity",):
        value = params["sparsity"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"prune spec {spec!r}: the sparsity must be a number such as 0.8. Found {value!r}"
            )
        return {"method": method, "sparsity": check_sparsity(value, "prune ratio")}
    n, of = params["n"], params["m"]
    if not (_whole(n) and _whole(of)):
        raise ConfigError(
            f"prune spec {spec!r}: n and m are whole numbers, e.g. nm(n=2, m=4). Found {n!r}, {of!r}"
        )
    if not 0 < n < of:  # checked here, not only when pruning starts (after loading and calibrating)
        raise ConfigError(
            f"prune spec {spec!r}: N:M keeps the n largest of every m weights and needs 0 < n < m (e.g. 2:4)"
        )
    return {"method": method, "n": n, "m": of}


def prune_model(
    model: nn.Module,
    spec: dict[str, Any],
    *,
    calibration: Sequence[Any] = (),
    example_input: torch.Tensor | None = None,
    exclude: Sequence[str] = (),
) -> tuple[nn.Module, PruneResult | None]:
    """Apply a parsed prune spec; returns the (possibly new, for ``channels``) model and the masks applied."""
    method = spec["method"]
    if method == "channels":
        if example_input is None:
            raise ConfigError("channel pruning needs an example input to trace shapes")
        return channel_prune(
            model, spec["sparsity"], example_input=example_input, exclude=exclude
        ).model, None
    if method == "nm":
        return model, nm_prune(model, spec["n"], spec["m"], exclude=exclude)
    if method in ("magnitude", "layer"):
        scope = "layer" if method == "layer" else "global"
        return model, magnitude_prune(model, spec["sparsity"], scope=scope, exclude=exclude)
    if method in ("wanda", "sparsegpt"):  # the calibrated pruners: N:M or unstructured, alike
        prune, label = (wanda_prune, "Wanda") if method == "wanda" else (sparsegpt_prune, "SparseGPT")
        if not calibration:
            raise ConfigError(f"{label} pruning needs calibration data")
        if "n" in spec:
            return model, prune(model, calibration, n=spec["n"], m=spec["m"], exclude=exclude)
        return model, prune(model, calibration, sparsity=spec["sparsity"], exclude=exclude)
    raise ConfigError(f"unknown prune method {method!r}")


def _embedded(
    model_name: str, source_sha256: str, fmt: str, prune: str | None, quant: str, scheme: str, sparsity: float
) -> dict[str, Any]:
    """The facts known before evaluation, embedded in the artifact header so the file describes itself."""
    return {
        "model": model_name,
        "source_sha256": source_sha256,
        "format": fmt,
        "prune": prune or "none",
        "quant": quant,
        "quant_scheme": scheme,
        "weight_sparsity": sparsity,
    }


def _read_back(tmp: Path, *, graph: bool) -> tuple[Artifact, bytes | None, dict[str, str]]:
    """The staged ``model.dpla`` read back once (the artifact as shipped), ``model.onnx`` written from it when
    ``graph``, and the SHA-256 of both files' bytes as read — what :func:`_publish` checks the staged files
    against, so what is published is what was evaluated."""
    dpla = (tmp / "model.dpla").read_bytes()
    evaluated = {"model.dpla": bytes_sha256(dpla)}
    art = read_artifact(dpla)
    del dpla
    onnx_bytes = None
    if graph:
        onnx_bytes = art.onnx_bytes()
        (tmp / "model.onnx").write_bytes(onnx_bytes)
        evaluated["model.onnx"] = bytes_sha256(onnx_bytes)
    return art, onnx_bytes, evaluated


def _publish(
    tmp: Path,
    out_dir: Path,
    manifest: dict[str, Any],
    card_info: dict[str, str] | None,
    *,
    evaluated: Mapping[str, str],
    overwrite: bool = False,
) -> list[str]:
    """Write manifest (with the model files' SHA-256) + card into the staging folder ``tmp``, then make ``tmp``
    the new ``out_dir`` in one rename (:func:`~deltaplane.deploy.publish.publish_dir`): ``out_dir`` is the old
    complete deploy or the new one, never a mix, and no file of an earlier deploy survives beside the new ones.
    ``evaluated`` (from :func:`_read_back`): a staged model file that no longer holds those bytes is refused."""
    return publish_dir(
        tmp,
        out_dir,
        manifest,
        lambda m: render_model_card(m, **(card_info or {})),
        overwrite=overwrite,
        evaluated=evaluated,
    )


def _check_gates(
    manifest: dict[str, Any], gates: Gates | None, not_evaluated_why: Mapping[str, str] | None = None
) -> None:
    """Record every gate's outcome in the manifest; raise :class:`QualityGateFailed` (nothing published) on a miss.

    ``gates=None`` (``--no-gates``) records ``{"off": true, "passed": null}``: nothing was checked, which is not
    the same as everything passed (the registry copies this into the lineage, the card says so). A robustness
    gate that is on but was not measured is listed under ``gates.not_evaluated`` with why
    (``not_evaluated_why``: the pipeline's reason per gate, :meth:`Gates.not_evaluated`), also on a refusal —
    a gate that could not be evaluated is not a gate that passed.
    """
    if gates is None:
        manifest["gates"] = {"off": True, "thresholds": None, "results": [], "passed": None}
        return
    quality = manifest.get("quality", {})
    results = gates.check(quality)
    failed = [r for r in results if not r.passed]
    manifest["gates"] = {
        "thresholds": gates.to_dict(),
        "results": [r.to_dict() for r in results],
        "passed": not failed,
    }
    unevaluated = gates.not_evaluated(quality, not_evaluated_why)
    if unevaluated:
        manifest["gates"]["not_evaluated"] = unevaluated
    if failed:
        raise QualityGateFailed(
            "refused to ship: " + "; ".join(r.describe() for r in failed),
            results=results,
            manifest=manifest,
        )


@dataclass
class DeployResult:
    """Paths written and the side-by-side evaluation."""

    out_dir: Path
    artifact: Path
    manifest: dict[str, Any]
    baseline: Evaluation
    compressed: Evaluation
    comparison: Comparison
    files: list[str] = field(default_factory=list)


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _agreement(
    ref: np.ndarray, tuned: np.ndarray | None, shipped: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """The classifier gates' figures (:func:`~deltaplane.deploy.gates.classifier_quality`).

    Top-1 disagreement is measured against the model the artifact was exported from: the fp32 source, or, when
    the pipeline fine-tuned (or distilled) the pruned model — training meant to change predictions, judged by the
    accuracy gates — that fine-tuned PyTorch model; the disagreement with the source is then recorded too.
    """
    q = classifier_quality(ref, shipped, y)
    if tuned is None:
        return q | {"disagreement_with": "fp32 source"}
    return q | {
        "disagreement_points": classifier_quality(tuned, shipped, None)["disagreement_points"],
        "disagreement_with": "fine-tuned fp32 model",
        "disagreement_vs_source_points": q["disagreement_points"],
    }


def _fp32_safetensors_nbytes(model: nn.Module) -> int:
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def deploy_classifier(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    x_test: np.ndarray,
    y_test: np.ndarray,
    x_calib: np.ndarray,
    prune: str | None = None,
    quant: str = "int8",
    fmt: str = "onnx",
    finetune: Callable[[nn.Module, PruneResult | None], dict[str, Any] | None] | None = None,
    variants: dict[str, np.ndarray] | None = None,
    exclude: Sequence[str] = (),
    source_sha256: str | None = None,
    model_name: str = "model",
    threads: int = 1,
    latency_iters: int = 300,
    card_info: dict[str, str] | None = None,
    reference: nn.Module | None = None,
    gates: Gates | None = None,
    progress: Callable[[str], None] | None = None,
    extra: Callable[[nn.Module, nn.Module, Callable[[np.ndarray], np.ndarray]], dict[str, Any]] | None = None,
    device_cost: bool = True,
    adversarial_eps: Sequence[float] = (),
    overwrite: bool = False,
    ood_note: str | None = None,
) -> DeployResult:
    """Compress a single-input classifier into ``out_dir`` (artifact + manifest + model card) and evaluate it.

    Args:
        model: the fp32 model (left untouched; a copy is compressed).
        out_dir: output folder; gets ``model.dpla``, ``manifest.json``, ``MODEL_CARD.md`` (+ ``model.onnx`` for
            ``fmt="onnx"``, the runnable graph as ONNX Runtime loads it).
        x_test, y_test: the clean test set. x_calib: calibration inputs (Wanda, static int8).
        prune: prune spec (:func:`parse_prune`). quant: one of ``none, int8, int8-static, int8-dynamic, int4``
            (``int8`` = static for ``onnx``). fmt: ``onnx`` (graph + weights) or ``weights`` (state dict only).
        finetune: optional ``finetune(model, prune_result)`` run after pruning (masks are re-applied after it);
            a recovery such as :func:`~deltaplane.deploy.recovery.distill_recover` returns a report, recorded
            as ``manifest["recovery"]`` with the pruned and recovered PyTorch accuracy.
        variants: corrupted/OOD copies of ``x_test`` (same labels), e.g. :func:`~deltaplane.deploy.profile.corruptions`.
        exclude: layers to leave unpruned. source_sha256: hash of the source checkpoint file (else of the
            state dict). threads: CPU threads for both PyTorch and ONNX Runtime during timing.
        reference: the fp32 model to report against (default: ``model``) — e.g. the dense model when ``model``
            was already pruned by a gradual schedule during training.
        gates: quality thresholds (:class:`~deltaplane.deploy.gates.Gates`) checked on the measured numbers
            before anything is published; a miss raises :class:`~deltaplane.errors.QualityGateFailed` and leaves
            no files. ``None``: no gate (the numbers are still recorded).
        progress: called with a short line at every stage (the CLI prints them).
        extra: ``extra(reference, compressed_torch, shipped_predict) -> dict`` merged into the manifest before
            the gates are checked (e.g. adversarial robustness: its ``quality`` keys are gated too).
        device_cost: record MACs, peak activation memory, bytes and energy estimates per inference, fp32 vs
            compressed (:func:`~deltaplane.deploy.cost.deploy_cost`; ``onnx`` format only).
        adversarial_eps: L∞ budgets for FGSM and PGD accuracy, fp32 vs the artifact as shipped
            (:func:`~deltaplane.deploy.adversarial.adversarial_eval`); gated by ``gates.max_adv_drop``.
        overwrite: replace a non-empty ``out_dir`` that is not a previous deploy's output (else refused before
            any work, :func:`~deltaplane.deploy.publish.check_out_dir`). The folder is always replaced as a
            whole: no file of an earlier deploy survives beside the new ones.
        ood_note: why there are no ``variants`` (recorded with the not-evaluated OOD gate). Without variants the
            ``max_ood_drop`` gate cannot be evaluated: it is listed in ``manifest["gates"]["not_evaluated"]``
            (and the table and card say so) rather than silently passing.
    """
    import copy

    if quant not in QUANTS:
        raise ConfigError(f"quant must be one of {', '.join(QUANTS)}. Found {quant!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}. Found {fmt!r}")
    if fmt == "weights" and quant in ("int8-static", "int8-dynamic"):
        raise ConfigError(
            f"quant={quant} runs in ONNX Runtime; use --format onnx, or int8/int4 weight storage"
        )
    spec = parse_prune(prune)
    out_dir = check_out_dir(out_dir, overwrite=overwrite)  # before any work: a bad OUT fails fast
    x_test = np.ascontiguousarray(x_test, dtype=np.float32)
    x_calib = np.ascontiguousarray(x_calib, dtype=np.float32)
    if adversarial_eps:  # before any work: an ε the evaluation would refuse must not cost the pruning first
        from deltaplane.deploy.adversarial import check_input_eps

        check_input_eps(adversarial_eps, float(x_test.min()), float(x_test.max()))
    calib_batches = [torch.from_numpy(x_calib[i : i + 64]) for i in range(0, len(x_calib), 64)]
    example = torch.from_numpy(x_test[:1])
    model = model.eval()
    reference = (reference if reference is not None else model).eval()
    refuse_non_finite_tensors(model.state_dict(), model_name)
    if reference is not model:
        refuse_non_finite_tensors(reference.state_dict(), f"{model_name} (fp32 reference)")
    with torch.inference_mode():  # finite weights can still overflow: a source that outputs NaN/Inf is broken
        ref = reference(torch.from_numpy(x_test)).numpy()
    refuse_non_finite_outputs(ref, f"the fp32 model {model_name}")
    fp32_bytes = _fp32_safetensors_nbytes(reference)
    source_sha256 = source_sha256 or state_dict_sha256(model.state_dict())

    say = progress or (lambda _msg: None)
    work = copy.deepcopy(model)
    result: PruneResult | None = None
    recovery: dict[str, Any] | None = None
    if spec is not None:
        say(f"pruning ({prune})")
        work, result = prune_model(
            work, spec, calibration=calib_batches, example_input=example, exclude=exclude
        )
        if finetune is not None:
            acc_pruned = _accuracy(work, x_test, y_test)
            say("fine-tuning or recovering the pruned model (masks held)")
            work.train()
            report = finetune(work, result)
            if result is not None:
                apply_masks(work, result.masks)
            work.eval()
            if isinstance(report, dict):  # a recovery (e.g. distillation) reports what it did
                recovery = report | {
                    "accuracy_pruned": acc_pruned,
                    "accuracy_recovered": _accuracy(work, x_test, y_test),
                }
    weight_sparsity = sparsity_of(work)
    tuned = None  # the fine-tuned PyTorch model's logits: what the artifact must agree with after training
    if spec is not None and finetune is not None:
        with torch.inference_mode():
            tuned = work.eval()(torch.from_numpy(x_test)).numpy()

    tmp = staging_dir(out_dir)
    try:
        artifact_path = tmp / "model.dpla"
        say(f"exporting ({fmt}) and quantizing ({quant})")
        if fmt == "onnx":
            fp32_onnx = tmp / "fp32.onnx"
            exp = export_onnx(work, example, fp32_onnx, verify_inputs=[torch.from_numpy(x_test[:32])])
            shipped = fp32_onnx
            store_quant = "none"
            scheme = "fp32"
            if quant in ("int8", "int8-static"):
                shipped = quantize_onnx(
                    fp32_onnx,
                    tmp / "int8.onnx",
                    mode="static",
                    calibration=[{"input": x_calib[i : i + 1]} for i in range(len(x_calib))],
                )
                scheme = "int8 static (ORT QDQ, per-channel weights, minmax activations)"
            elif quant == "int8-dynamic":
                shipped = quantize_onnx(fp32_onnx, tmp / "int8.onnx", mode="dynamic")
                scheme = "int8 dynamic (ORT, per-channel weights)"
            elif quant == "int4":
                store_quant, scheme = "int4", "int4 weight-only, group 32, fp16 scales (dequantized on load)"
            info = pack_onnx(
                shipped,
                artifact_path,
                quant=store_quant,
                manifest=_embedded(model_name, source_sha256, fmt, prune, quant, scheme, weight_sparsity),
            )
            art, graph, evaluated = _read_back(tmp, graph=True)
            onnx_bytes = cast("bytes", graph)
            fp32_graph = fp32_onnx.read_bytes()
            if spec is not None and spec["method"] == "channels":  # shapes changed: cost the original graph
                fp32_graph = export_onnx(reference, example, tmp / "ref.onnx").path.read_bytes()
            for f in (fp32_onnx, tmp / "int8.onnx", tmp / "ref.onnx"):
                f.unlink(missing_ok=True)
            cand_predict = onnx_predictor(ort_session(onnx_bytes, threads=threads))
            export_diff = exp.max_abs_diff
        else:
            store_quant = "none" if quant == "none" else ("int4" if quant == "int4" else "int8")
            scheme = {"none": "fp32", "int4": "int4 group 32", "int8": "int8 group 128"}[
                store_quant
            ] + " weights"
            info = write_artifact(
                artifact_path,
                work.state_dict(),
                quant=store_quant,
                manifest=_embedded(model_name, source_sha256, fmt, prune, quant, scheme, weight_sparsity),
            )
            art, _, evaluated = _read_back(tmp, graph=False)
            runnable = copy.deepcopy(work)
            runnable.load_state_dict(art.state_dict())
            cand_predict = torch_predictor(runnable)
            export_diff = None
        say("evaluating fp32 and the artifact as shipped")
        shipped_out = cand_predict(x_test)
        refuse_non_finite_outputs(shipped_out, f"the compressed artifact ({fmt}, {quant})", ExportError)
        # the same thread budget for PyTorch as for ONNX Runtime: the latency ratio compares runtimes, not cores
        with torch_threads(threads):
            base = evaluate(
                "fp32 (PyTorch)",
                torch_predictor(reference),
                x_test,
                y_test,
                variants=variants,
                latency_iters=latency_iters,
                size_bytes=fp32_bytes,
            )
            cand = evaluate(
                "compressed",
                cand_predict,
                x_test,
                y_test,
                variants=variants,
                latency_iters=latency_iters,
                size_bytes=info.nbytes,
            )
        cmp = compare(base, cand)
        fidelity = float(np.max(np.abs(shipped_out - ref)))
        manifest: dict[str, Any] = {
            "model": model_name,
            "source_sha256": source_sha256,
            "format": fmt,
            "prune": prune or "none",
            "prune_skipped_layers": result.skipped if result is not None else {},
            "quant": quant,
            "quant_scheme": scheme,
            "weight_sparsity": weight_sparsity,
            "sizes": {
                "fp32_safetensors_bytes": fp32_bytes,
                "artifact_bytes": info.nbytes,
                "artifact_payload_bytes": info.payload_nbytes,
                "compression_ratio": fp32_bytes / info.nbytes,
            },
            "params": sum(p.numel() for p in work.parameters()),
            "export_max_abs_diff": export_diff,
            "max_abs_logit_diff_vs_fp32": fidelity,
            "baseline": base.to_dict(),
            "compressed": cand.to_dict(),
            "comparison": cmp.to_dict(),
            "quality": {
                "accuracy_drop_points": cmp.drops["clean"],
                "ood_excess_drop_points": ood_excess_drops(cmp.drops),
                **_agreement(ref, tuned, shipped_out, y_test),
            },
        }
        if recovery is not None:
            manifest["recovery"] = recovery
        if adversarial_eps:
            from deltaplane.deploy.adversarial import adversarial_eval

            say(f"adversarial robustness (FGSM, PGD at ε = {', '.join(f'{e:g}' for e in adversarial_eps)})")
            adv = adversarial_eval(reference, work, cand_predict, x_test, y_test, eps=adversarial_eps)
            manifest["quality"] |= adv.pop("quality")
            manifest["adversarial"] = adv
        if device_cost and fmt == "onnx":
            say("device cost (MACs, activation memory, energy estimates)")
            manifest["device_cost"] = deploy_cost(
                reference,
                work,
                example,
                fp32_onnx=fp32_graph,
                shipped_onnx=onnx_bytes,
                feeds={"input": x_test[:1]},
                fp32_bytes=fp32_bytes,
                artifact_bytes=info.nbytes,
                int8=quant.startswith("int8"),
            )
        if extra is not None:
            quality = manifest.pop("quality")
            manifest.update(extra(reference, work, cand_predict))
            manifest["quality"] = quality | manifest.get("quality", {})
        ood_why = None
        if (
            not variants
        ):  # no OOD figure: the manifest says so, and the gate (if on) is listed as not evaluated
            ood_why = (
                ood_note
                or "No OOD evaluation: no corrupted variants of the test set were given (variants=None)."
            )
            manifest["ood"] = {"evaluated": False, "why": ood_why}
        _check_gates(manifest, gates, {"max-ood-drop": ood_why} if ood_why else None)
        files = _publish(tmp, out_dir, manifest, card_info, evaluated=evaluated, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DeployResult(out_dir, out_dir / "model.dpla", manifest, base, cand, cmp, files)


EncoderDeployResult = TokenDeployResult  # the sentence-embedding case of deploy_token_model


def _tokenize(tokenizer: Any, sentences: Sequence[str]) -> np.ndarray:
    from deltaplane.deploy.tokens import tokens_from_sentences

    return tokens_from_sentences(tokenizer, sentences)


def deploy_encoder(
    encoder: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer: Any,
    sentences: Sequence[str],
    calib_sentences: Sequence[str],
    prune: str | None = None,
    quant: str = "int8",
    source_sha256: str | None = None,
    fp32_nbytes: int | None = None,
    model_name: str = "encoder",
    threads: int = 1,
    latency_iters: int = 30,
    card_info: dict[str, str] | None = None,
    gates: Gates | None = None,
    recover: Callable[[nn.Module, PruneResult | None], dict[str, Any] | None] | None = None,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TokenDeployResult:
    """Compress a BERT-style sentence encoder into ``out_dir`` and measure embedding fidelity and latency.

    The shipped graph computes mean-pooled, L2-normalised embeddings (:class:`MeanPooledEncoder`). Fidelity is
    the cosine similarity of each evaluation sentence's embedding to the fp32 PyTorch one, read from the
    artifact as shipped. ``quant``: ``int8`` (= ``int8-dynamic``: ORT dynamic int8, the usual choice for
    transformers), ``int8-static``, ``int4`` (ORT ``MatMulNBits`` weight-only int4 for every MatMul, and int4
    group-wise storage for the remaining float matrices, e.g. the token embedding table) or ``none``.
    Prune specs as in :func:`parse_prune` except ``channels`` (attention heads are not channel-prunable here).
    The sentence-embedding case of :func:`~deltaplane.deploy.tokens.deploy_token_model` (gates, recovery,
    progress as there).
    """
    from deltaplane.deploy.tokens import deploy_token_model

    if not sentences or not calib_sentences:
        raise ConfigError("deploy_encoder needs evaluation sentences and calibration sentences")
    return deploy_token_model(
        encoder,
        out_dir,
        task="sentence-embedding",
        eval_tokens=_tokenize(tokenizer, sentences),
        calib_tokens=_tokenize(tokenizer, calib_sentences),
        prune=prune,
        quant=quant,
        recover=recover,
        gates=gates,
        source_sha256=source_sha256,
        fp32_nbytes=fp32_nbytes,
        model_name=model_name,
        threads=threads,
        latency_iters=latency_iters,
        card_info=card_info,
        progress=progress,
        overwrite=overwrite,
    )

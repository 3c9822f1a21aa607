"""Deploy a token model (Hugging Face layout: encoder, sequence classifier or small decoder) and measure fidelity.

:func:`deploy_token_model` is the token-input counterpart of :func:`~deltaplane.deploy.deploy_classifier`: prune
→ (recover) → export → quantize → pack → evaluate the artifact *as shipped* against the fp32 PyTorch model on
held-out token sequences. The task decides the exported graph and what "fidelity" means:

=====================  ======================================  ==============================================
task                   graph output                            fidelity (vs fp32, on every evaluation input)
=====================  ======================================  ==============================================
``sentence-embedding`` mean-pooled, L2-normalised embedding    cosine similarity per sentence (min / mean)
``text-classification`` logits ``(B, C)``                      top-1 agreement, logit cosine
``next-token``         logits ``(B, T, V)``                     top-1 next-token agreement over real tokens,
                                                               mean KL(fp32 ‖ compressed) in nats
=====================  ======================================  ==============================================

Without labels the compressed model is judged against fp32's own predictions: ``100 × (1 − agreement)`` is the
accuracy drop it would show if fp32 were exactly right, which is what the ``max-accuracy-drop`` gate reads.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deltaplane.deploy.artifact import pack_onnx, state_dict_sha256
from deltaplane.deploy.cost import deploy_cost
from deltaplane.deploy.encoder import MeanPooledEncoder, cosine_similarity_rows
from deltaplane.deploy.gates import Gates, refuse_non_finite_outputs, refuse_non_finite_tensors
from deltaplane.deploy.onnx import export_onnx, ort_session
from deltaplane.deploy.profile import measure_latency
from deltaplane.deploy.prune import PruneResult, apply_masks, sparsity_of
from deltaplane.deploy.publish import check_out_dir, staging_dir
from deltaplane.deploy.quantize import quantize_onnx
from deltaplane.deploy.smoothquant import smooth_layernorm_inputs
from deltaplane.errors import ConfigError, ExportError
from deltaplane.threads import torch_threads

__all__ = ["TASKS", "TokenDeployResult", "TokenOutput", "deploy_token_model", "token_fidelity"]

TASKS = ("sentence-embedding", "text-classification", "next-token")
#: Why a token model's OOD gate is not evaluated (listed under ``gates.not_evaluated`` when it is on).
TOKEN_OOD_WHY = (
    "No OOD evaluation: corrupted variants are made for image classifiers; a token model is measured on its "
    "evaluation text only."
)
Progress = Callable[[str], None]


class TokenOutput(nn.Module):
    """``(input_ids, attention_mask) -> logits`` of a Hugging Face classifier or causal LM, as one tensor.

    Hugging Face models return a ``ModelOutput``; exporting and comparing wants the logits tensor alone. Caching
    of past key/values is switched off so a decoder exports as a plain full-sequence graph.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = False

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out[0]


def wrap_for_task(model: nn.Module, task: str) -> nn.Module:
    """The module whose graph ships for ``task``: pooled embeddings or logits."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}. Found {task!r}")
    return MeanPooledEncoder(model) if task == "sentence-embedding" else TokenOutput(model)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_fidelity(task: str, out: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """How close the compressed outputs ``out`` are to fp32's ``ref`` (see the module docstring's table)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if task == "sentence-embedding":
        cos = cosine_similarity_rows(out, ref)
        return {"inputs": len(ref), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    if task == "text-classification":
        agree = out.argmax(-1) == ref.argmax(-1)
        cos = cosine_similarity_rows(out, ref)
        return {
            "inputs": len(ref),
            "top1_agreement": float(agree.mean()),
            "logit_cosine_min": float(cos.min()),
        }
    real = np.asarray(mask).astype(bool)  # next-token: only positions holding a real token
    agree = out.argmax(-1) == ref.argmax(-1)
    lp, lq = _log_softmax(ref), _log_softmax(out)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "inputs": len(ref),
        "positions": int(real.sum()),
        "top1_agreement": float(agree[real].mean()),
        "kl_mean_nats": float(kl[real].mean()),
    }


def quality_of(task: str, fidelity: dict[str, Any]) -> dict[str, Any]:
    """The gate-readable summary (:mod:`deltaplane.deploy.gates`) of a token model's fidelity."""
    if task == "sentence-embedding":
        return {"cosine_min": fidelity["cosine_min"]}
    label = "top-1 disagreement with fp32" if task == "text-classification" else "next-token disagreement"
    return {"accuracy_drop_points": 100.0 * (1.0 - fidelity["top1_agreement"]), "accuracy_label": label}


@dataclass
class TokenDeployResult:
    """Paths written and the manifest (sizes, fidelity, latency, gates) of :func:`deploy_token_model`."""

    out_dir: Path
    artifact: Path
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)


def _calibration_batches(cal: np.ndarray, size: int = 8) -> list[dict[str, Tensor]]:
    """Calibration inputs as keyword batches of ``size``, each cut after its last real position.

    Trailing padding that every row of a batch has changes no real token's activations, and calibration text
    padded to its longest sentence is mostly padding (a left-padded batch keeps its full length).
    """
    cuts = [
        (i, 1 + int(np.flatnonzero(cal[i : i + size, 1].any(0))[-1:].sum())) for i in range(0, len(cal), size)
    ]
    return [
        {
            "input_ids": torch.from_numpy(cal[i : i + size, 0, :n]),
            "attention_mask": torch.from_numpy(cal[i : i + size, 1, :n]),
        }
        for i, n in cuts
    ]


def _scheme(quant: str) -> str:
    return {
        "none": "fp32",
        "int8": "int8 dynamic (ORT: int8 MatMul weights, uint8 embedding table)",
        "int8-dynamic": "int8 dynamic (ORT: int8 MatMul weights, uint8 embedding table)",
        "int8-static": "int8 static (ORT QDQ)",
        "int4": "int4 weight-only (ORT MatMulNBits, block 32) + int4 group-32 storage of other float matrices",
    }[quant]


def deploy_token_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    task: str,
    eval_tokens: np.ndarray,
    calib_tokens: np.ndarray,
    prune: str | None = None,
    quant: str = "int8",
    recover: Callable[[nn.Module, PruneResult | None], dict[str, Any] | None] | None = None,
    gates: Gates | None = None,
    source_sha256: str | None = None,
    fp32_nbytes: int | None = None,
    model_name: str = "model",
    threads: int = 1,
    latency_iters: int = 30,
    card_info: dict[str, str] | None = None,
    progress: Progress | None = None,
    extra: Callable[[nn.Module, nn.Module, Callable[[np.ndarray], np.ndarray]], dict[str, Any]] | None = None,
    device_cost: bool = True,
    adversarial_eps: Sequence[float] = (),
    smooth: float | None = 0.5,
    overwrite: bool = False,
) -> TokenDeployResult:
    """Compress a token model into ``out_dir`` (artifact, ONNX graph, manifest, model card) and measure it.

    Args:
        model: the fp32 model (``input_ids``/``attention_mask`` keywords; left untouched, a copy is compressed).
        task: ``sentence-embedding``, ``text-classification`` or ``next-token``.
        eval_tokens, calib_tokens: ``(N, 2, T)`` int64 arrays (token ids, attention mask); the evaluation
            inputs must not overlap the calibration inputs, so fidelity is measured on data compression never saw.
        prune: a :func:`~deltaplane.deploy.parse_prune` spec except ``channels``. quant: ``int8`` (= dynamic),
            ``int8-dynamic``, ``int8-static``, ``int4`` or ``none``.
        recover: ``recover(pruned_model, prune_result) -> report`` run after pruning (e.g. distillation,
            :func:`~deltaplane.deploy.recovery.distill_recover`); masks are re-applied after it.
        gates: thresholds checked before anything is published (:class:`~deltaplane.deploy.gates.Gates`);
            a miss raises :class:`~deltaplane.errors.QualityGateFailed` and leaves no files.
        progress: called with a short line at every stage (the CLI prints them).
        extra: ``extra(reference, compressed_torch, shipped_predict) -> dict`` merged into the manifest (e.g.
            adversarial robustness) before the gates are checked.
        device_cost: record MACs, peak activation memory, bytes and energy estimates for one input, fp32 vs
            compressed (:func:`~deltaplane.deploy.cost.deploy_cost`).
        adversarial_eps: ε (relative to the embedding table's std) for FGSM/PGD on the input token embeddings,
            gated by ``gates.max_adv_drop``: embedding cosine for sentence encoders
            (:func:`~deltaplane.deploy.adversarial.encoder_adversarial_eval`), accuracy for sequence classifiers
            and next-token accuracy / loss for decoders (:func:`~deltaplane.deploy.adversarial.token_adversarial_eval`).
        smooth: SmoothQuant's α for int8 dynamic (:func:`~deltaplane.deploy.smoothquant.smooth_layernorm_inputs`,
            on the calibration inputs): moves the LayerNorm outputs' outlier channels into the weights before
            export, an exact rewrite in fp32 that keeps min cosine ≥ 0.99 on MiniLM even with 7-bit weights
            (``reduce_range`` on CPUs without VNNI). ``None`` exports the model as it is.
        overwrite: replace a non-empty ``out_dir`` that is not a previous deploy's output (else refused before
            any work, :func:`~deltaplane.deploy.publish.check_out_dir`); the folder is replaced as a whole.
    """
    from deltaplane.deploy.pipeline import (
        QUANTS,
        _check_gates,
        _embedded,
        _publish,
        _read_back,
        parse_prune,
        prune_model,
    )

    say = progress or (lambda _msg: None)
    if quant not in QUANTS:
        raise ConfigError(f"quant must be one of {', '.join(QUANTS)}. Found {quant!r}")
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}. Found {task!r}")
    spec = parse_prune(prune)
    if spec is not None and spec["method"] == "channels":
        raise ConfigError(
            "channel pruning is not supported for token models; use 2:4, wanda:…, sparsegpt:… or 0.x"
        )
    ev = np.ascontiguousarray(eval_tokens, dtype=np.int64)
    cal = np.ascontiguousarray(calib_tokens, dtype=np.int64)
    if ev.ndim != 3 or ev.shape[1] != 2 or not len(ev) or cal.ndim != 3 or not len(cal):
        raise ConfigError("eval_tokens and calib_tokens must be non-empty (N, 2, T) arrays of ids and masks")
    out_dir = check_out_dir(out_dir, overwrite=overwrite)  # before any work: a bad OUT fails fast
    refuse_non_finite_tensors(model.state_dict(), model_name)
    if adversarial_eps:  # before any work: an ε the evaluation would refuse must not cost the pruning first
        from deltaplane.deploy.adversarial import check_embedding_eps

        check_embedding_eps(adversarial_eps, model)
    reference = wrap_for_task(model, task).eval()
    say(f"fp32 reference on {len(ev)} evaluation inputs")
    with torch.inference_mode():
        ref = reference(torch.from_numpy(ev[:, 0]), torch.from_numpy(ev[:, 1])).numpy()
    refuse_non_finite_outputs(ref, f"the fp32 model {model_name}")
    fp32_nbytes = fp32_nbytes or _fp32_nbytes(model)
    source_sha256 = source_sha256 or state_dict_sha256(model.state_dict())
    # a private copy only when pruning will change it: unpruned, nothing writes to it (SmoothQuant smooths a
    # copy of its own), and a second copy of the weights was held for the whole deploy
    work = model if spec is None else copy.deepcopy(model).eval()
    result: PruneResult | None = None
    recovery: dict[str, Any] | None = None
    if spec is not None:
        say(f"pruning ({prune})")
        work, result = prune_model(work, spec, calibration=_calibration_batches(cal))
        if recover is not None:

            def fidelity_now() -> dict[str, Any]:
                wrapped_now = wrap_for_task(work, task).eval()
                with torch.inference_mode():
                    out = wrapped_now(torch.from_numpy(ev[:, 0]), torch.from_numpy(ev[:, 1])).numpy()
                return token_fidelity(task, out, ref, ev[:, 1])

            before = fidelity_now()
            say("recovering the pruned model")
            recovery = dict(recover(work, result) or {})
            if result is not None:
                apply_masks(work, result.masks)
            work.eval()
            # PyTorch, before quantization: what pruning cost and what recovery won back on the held-out inputs
            recovery |= {"fidelity_pruned": before, "fidelity_recovered": fidelity_now()}
    smoothing: dict[str, Any] | None = None
    exported = work
    if smooth is not None and quant in ("int8", "int8-dynamic"):
        say(f"SmoothQuant (alpha {smooth}) on the LayerNorm-fed Linears")
        exported = copy.deepcopy(work).eval()
        smoothing = smooth_layernorm_inputs(exported, _calibration_batches(cal), alpha=smooth)
    wrapped = wrap_for_task(exported, task).eval()
    names = ("input_ids", "attention_mask")
    out_name = "embedding" if task == "sentence-embedding" else "logits"
    out_axes = {0: "batch", 1: "tokens"} if task == "next-token" else {0: "batch"}
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {out_name: out_axes}
    tmp = staging_dir(out_dir)
    try:
        say("exporting ONNX")
        example = (torch.from_numpy(ev[:2, 0]), torch.from_numpy(ev[:2, 1]))
        exp = export_onnx(
            wrapped,
            example,
            tmp / "fp32.onnx",
            input_names=names,
            output_names=(out_name,),
            dynamic_axes=axes,
            verify_inputs=[(torch.from_numpy(ev[:, 0]), torch.from_numpy(ev[:, 1]))],
        )
        shipped, store_quant = exp.path, "none"
        if quant != "none":
            say(f"quantizing ({quant})")
        if quant in ("int8", "int8-dynamic"):
            shipped = quantize_onnx(exp.path, tmp / "q.onnx", mode="dynamic")
        elif quant == "int8-static":
            feeds = [
                {"input_ids": cal[i : i + 1, 0], "attention_mask": cal[i : i + 1, 1]} for i in range(len(cal))
            ]
            shipped = quantize_onnx(exp.path, tmp / "q.onnx", mode="static", calibration=feeds)
        elif quant == "int4":
            shipped = quantize_onnx(exp.path, tmp / "q.onnx", mode="int4")
            store_quant = "int4"
        say("packing the artifact")
        scheme = _scheme(quant)
        info = pack_onnx(
            shipped,
            tmp / "model.dpla",
            quant=store_quant,
            manifest=_embedded(model_name, source_sha256, "onnx", prune, quant, scheme, sparsity_of(work)),
        )
        shipped_graph = tmp / "model.onnx"
        evaluated = _read_back(tmp, graph=True)[2]
        # the fp32 graph stays a file until the device cost has read it (no channel pruning here: same
        # activation shapes as the reference), then is removed before publishing; held as bytes it was
        # another copy of the weights for the rest of the deploy
        fp32_graph = exp.path
        (tmp / "q.onnx").unlink(missing_ok=True)
        if not device_cost:
            fp32_graph.unlink(missing_ok=True)
        session = ort_session(shipped_graph, threads=threads)

        def ort_predict(x: np.ndarray) -> np.ndarray:
            return session.run(None, {"input_ids": x[:, 0], "attention_mask": x[:, 1]})[0]

        def torch_predict(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return reference(torch.from_numpy(x[:, 0]), torch.from_numpy(x[:, 1])).numpy()

        say("evaluating the artifact as shipped")
        shipped_out = ort_predict(ev)
        refuse_non_finite_outputs(shipped_out, f"the compressed artifact ({quant})", ExportError)
        fidelity = token_fidelity(task, shipped_out, ref, ev[:, 1])
        latency = {}
        say("timing fp32 and compressed")
        with torch_threads(threads):
            for b in (1, 32):
                t = measure_latency(torch_predict, ev, batch_size=b, iters=latency_iters, warmup=3)
                c = measure_latency(ort_predict, ev, batch_size=b, iters=latency_iters, warmup=3)
                latency[str(b)] = {
                    "fp32_p50_us": t.p50_us,
                    "fp32_p95_us": t.p95_us,
                    "p50_us": c.p50_us,
                    "p95_us": c.p95_us,
                    "ratio_p50": c.p50_us / t.p50_us,
                }
        manifest: dict[str, Any] = {
            "model": model_name,
            "task": task,
            "source_sha256": source_sha256,
            "format": "onnx",
            "prune": prune or "none",
            "prune_skipped_layers": result.skipped if result is not None else {},
            "quant": quant,
            "quant_scheme": scheme,
            "smoothquant": smoothing,
            "weight_sparsity": sparsity_of(work),
            "sizes": {
                "fp32_safetensors_bytes": fp32_nbytes,
                "artifact_bytes": info.nbytes,
                "artifact_payload_bytes": info.payload_nbytes,
                "compression_ratio": fp32_nbytes / info.nbytes,
            },
            "export_max_abs_diff": exp.max_abs_diff,
            "fidelity": fidelity,
            "latency_us": latency,
        }
        if recovery is not None:
            manifest["recovery"] = recovery
        if adversarial_eps:
            from deltaplane.deploy.adversarial import encoder_adversarial_eval, token_adversarial_eval

            say("adversarial robustness (FGSM, PGD on the input embeddings)")
            if task == "sentence-embedding":
                adv = encoder_adversarial_eval(model, work, ev, eps=adversarial_eps)
            else:
                adv = token_adversarial_eval(model, work, ev, task=task, eps=adversarial_eps)
            manifest["quality"] = adv.pop("quality")
            manifest["adversarial"] = adv
        if device_cost:
            say("device cost (MACs, activation memory, energy estimates)")
            one = ev[:1]
            manifest["device_cost"] = deploy_cost(
                reference,
                wrapped,
                (torch.from_numpy(one[:, 0]), torch.from_numpy(one[:, 1])),
                fp32_onnx=fp32_graph,
                shipped_onnx=shipped_graph,
                feeds={"input_ids": one[:, 0], "attention_mask": one[:, 1]},
                fp32_bytes=fp32_nbytes,
                artifact_bytes=info.nbytes,
                int8=quant.startswith("int8"),
            )
            fp32_graph.unlink(missing_ok=True)  # scratch: not published
        if extra is not None:
            manifest.update(extra(reference, wrapped, ort_predict))
        manifest["quality"] = quality_of(task, fidelity) | manifest.get("quality", {})
        _check_gates(manifest, gates, {"max-ood-drop": TOKEN_OOD_WHY})
        files = _publish(tmp, out_dir, manifest, card_info, evaluated=evaluated, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenDeployResult(out_dir, out_dir / "model.dpla", manifest, files)


def _fp32_nbytes(model: nn.Module) -> int:
    from safetensors.torch import save

    # Tied tensors (a decoder's LM head sharing the embedding) are stored once, as safetensors does.
    seen: dict[int, str] = {}
    state = {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:
            continue
        seen[v.data_ptr()] = k
        state[k] = v.contiguous()
    return len(save(state))


def tokens_from_sentences(tokenizer: Any, sentences: Sequence[str], max_length: int = 128) -> np.ndarray:
    """``(N, 2, T)`` int64 ids + attention mask, padded to the longest sentence (truncated at ``max_length``)."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers ship without a pad token
    enc = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)


def random_tokens(vocab_size: int, n: int, length: int, *, seed: int) -> np.ndarray:
    """``(n, 2, length)`` seeded random token ids (all positions real) for a model that ships no tokenizer.

    Fidelity on random ids says how far compression moves the outputs, not how well the model does on text; the
    manifest records which inputs were used.
    """
    g = np.random.default_rng(seed)
    ids = g.integers(0, vocab_size, size=(n, length), dtype=np.int64)
    return np.stack([ids, np.ones_like(ids)], axis=1)

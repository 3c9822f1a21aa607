"""Model card (Mitchell et al. 2019, https://arxiv.org/abs/1810.03993) for a compressed deployment artifact.

Rendered from the manifest, so every number in the card is one that was measured and recorded; the prose
fields (intended use, data, limitations) come from the caller, with defaults that state what we know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def size_change(ratio: float) -> str:
    """fp32 bytes / artifact bytes as words: ``4.11× smaller``, or ``1.46× larger`` for a model so small that
    the artifact's graph and quantization parameters outweigh its weights (a 13-feature MLP: 1,372 → 2,000
    bytes), rather than ``0.69× smaller``."""
    if ratio >= 1 or ratio <= 0:
        return f"{ratio:.2f}× smaller"
    return f"{1 / ratio:.2f}× larger"


__all__ = ["render_model_card"]


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def render_model_card(
    manifest: Mapping[str, Any],
    *,
    intended_use: str = "On-device inference with ONNX Runtime (CPU) or a runtime reading the deltaplane artifact.",
    data: str = "Not specified by the caller.",
    limitations: str = "",
) -> str:
    """Markdown model card: intended use, data, compression, metrics (fp32 vs compressed), limitations.

    Classifier manifests (``deploy_classifier``) get accuracy per split with OOD flags, ECE and latency; token
    model manifests (``task``: sentence-embedding, text-classification, next-token) get their fidelity to fp32
    and latency. Device cost, adversarial robustness and quality gates get a section when measured. The
    limitations start with each gate that was not evaluated and why (``gates.not_evaluated``, also rows of the
    gate table), then are written from the measured numbers (which splits lost accuracy, by how much), so they
    can never contradict the metrics table.
    """
    sizes = manifest["sizes"]
    lines = [
        f"# Model card: {manifest['model']} ({manifest['prune']} pruning, {manifest['quant']} quantization)",
        "",
        "## Intended use",
        intended_use,
        "",
        "## Data",
        data,
        "",
        "## Compression",
        f"- source model SHA-256: `{manifest['source_sha256']}`",
        f"- format: {manifest['format']}; quantization: {manifest['quant_scheme']}",
        f"- pruning: {manifest['prune']}; weight sparsity {_pct(manifest['weight_sparsity'])}",
        f"- size: {sizes['artifact_bytes']:,} bytes vs {sizes['fp32_safetensors_bytes']:,} fp32 safetensors "
        f"({size_change(sizes['compression_ratio'])})",
    ]
    if manifest.get("export_max_abs_diff") is not None:
        lines.append(
            f"- ONNX export max |PyTorch − ORT| on test inputs: {manifest['export_max_abs_diff']:.2e}"
        )
    for layer, why in (manifest.get("prune_skipped_layers") or {}).items():
        lines.append(f"- not pruned: `{layer}` ({why})")
    rec = manifest.get("recovery")
    if rec:
        lines.append(f"- recovery after pruning: {rec.get('summary', rec.get('method', ''))}")
    if manifest.get("task") in ("sentence-embedding", "text-classification", "next-token", "onnx"):
        flags = _token_metrics(manifest, lines)
    else:
        flags = _classifier_metrics(manifest, lines)
    for section in _extra_sections(manifest):
        lines += ["", *section]
    lines += _gate_lines(manifest)
    lim = _unevaluated(manifest)
    lim += [limitations] if limitations else []
    lim += _measured_limitations(manifest, flags)
    lim.append(
        "Latency was measured on the build machine's CPU with one thread; device latency differs. "
        "Quality figures hold for the evaluation data (and listed corruptions) only."
    )
    lines += ["", "## Limitations", *[f"- {x}" for x in lim], ""]
    return "\n".join(lines)


def _unevaluated(manifest: Mapping[str, Any]) -> list[str]:
    """Why each gate listed under ``gates.not_evaluated`` was not evaluated (and why there is no OOD figure, when
    the OOD gate was off): the card's limitations start with what was not checked."""
    whys = [ne["why"] for ne in (manifest.get("gates") or {}).get("not_evaluated", [])]
    ood = manifest.get("ood") or {}
    if not ood.get("evaluated", True) and ood.get("why") not in whys:
        whys.insert(0, ood["why"])
    return whys


def _measured_limitations(manifest: Mapping[str, Any], flags: list[str]) -> list[str]:
    """Limitations stated from the measured numbers only, so none can contradict the metrics table."""
    out = []
    cmp = manifest.get("comparison")
    if cmp is not None:
        drops = cmp["drops_points"]
        clean = drops.get("clean", 0.0)
        if clean > 0:
            out.append(f"Compression lowers clean accuracy by {clean:.2f} points on the test set.")
        else:
            out.append(
                f"Clean accuracy did not drop on the test set ({-clean:+.2f} points); "
                "a difference of one or two test images is not significant."
            )
        for split in flags:
            out.append(
                f"On {split} inputs the compressed model loses {drops[split]:.2f} points, more than on clean "
                f"inputs ({max(clean, 0.0):.2f}); check this condition before relying on it there."
            )
    fid = manifest.get("fidelity") or {}
    if "cosine_min" in fid:
        out.append(
            f"Embeddings differ from fp32: cosine similarity as low as {fid['cosine_min']:.4f} "
            f"(mean {fid['cosine_mean']:.4f}) on {fid['inputs']} held-out inputs."
        )
    if "top1_agreement" in fid:
        out.append(
            f"The compressed model's top-1 prediction differs from fp32's on "
            f"{100 * (1 - fid['top1_agreement']):.2f}% of the evaluated "
            + ("positions" if "positions" in fid else "inputs")
            + "."
        )
    if manifest.get("inputs_note"):
        out.append(str(manifest["inputs_note"]))
    adv = manifest.get("adversarial") or {}
    for row in adv.get("rows", []):
        if row.get("drop_points", 0.0) > 0:
            what = "mean embedding cosine (×100)" if adv.get("metric") == "cosine" else "adversarial accuracy"
            out.append(
                f"Under {row['attack']} at ε={row['eps']:g} the compressed model's {what} is "
                f"{row['drop_points']:.2f} points lower than fp32's."
            )
    return out


def _gate_lines(manifest: Mapping[str, Any]) -> list[str]:
    gates = manifest.get("gates") or {}
    if gates.get("off"):
        return [
            "",
            "## Quality gates",
            "",
            "**Quality gates were OFF** (`--no-gates`, or `gates=None` in Python): nothing was checked before "
            "this model shipped; the "
            "numbers above are measured but no threshold was applied to them.",
        ]
    results, unevaluated = gates.get("results") or [], gates.get("not_evaluated") or []
    if not results and not unevaluated:
        return []
    lines = ["", "## Quality gates", "", "| gate | measured | threshold | result |", "|---|---|---|---|"]
    for r in results:
        unit = r.get("unit", "" if r["gate"] == "min-cosine" else " pts")
        lines.append(
            f"| {r['gate']}: {r['what']} | {r['measured']:.4g}{unit} | {r['threshold']:.4g}{unit} | "
            f"{'pass' if r['passed'] else 'FAIL'} (margin {r['margin']:+.4g}) |"
        )
    thresholds = gates.get("thresholds") or {}
    for ne in unevaluated:
        limit = thresholds.get(ne["gate"].replace("-", "_"))
        shown = f"{limit:.4g} pts" if isinstance(limit, int | float) else ""
        lines.append(f"| {ne['gate']} | — | {shown} | **not evaluated**: {ne['why']} |")
    return lines


def _extra_sections(manifest: Mapping[str, Any]) -> list[list[str]]:
    """Device cost and adversarial robustness tables, when the manifest holds them."""
    out = []
    cost = manifest.get("device_cost")
    if cost:
        sec = [
            "## Device cost (per inference, batch 1)",
            "",
            "| | fp32 | compressed |",
            "|---|---|---|",
            f"| MACs | {cost['fp32']['macs']:,} | {cost['compressed']['macs']:,} |",
            f"| model bytes | {cost['fp32']['model_bytes']:,} | {cost['compressed']['model_bytes']:,} |",
            f"| peak activation bytes | {cost['fp32']['peak_activation_bytes']:,} | "
            f"{cost['compressed']['peak_activation_bytes']:,} |",
        ]
        for prof, e in cost["compressed"]["energy_uj"].items():
            sec.append(f"| energy, {prof} (µJ, estimate) | {cost['fp32']['energy_uj'][prof]:.3g} | {e:.3g} |")
        sec += ["", str(cost.get("note", ""))]
        out.append(sec)
    adv = manifest.get("adversarial")
    if adv:
        sec = [
            "## Adversarial robustness",
            "",
            str(adv.get("method", "")),
            "",
            "| attack | ε | fp32 | compressed | drop (points) |",
            "|---|---|---|---|---|",
        ]
        for row in adv["rows"]:
            fp, cp = f"{row['fp32']:.4f}", f"{row['compressed']:.4f}"
            if "fp32_loss" in row:  # decoders and sequence classifiers: the cross-entropy under attack too
                fp += f" (loss {row['fp32_loss']:.3f})"
                cp += f" (loss {row['compressed_loss']:.3f})"
            sec.append(f"| {row['attack']} | {row['eps']:g} | {fp} | {cp} | {row['drop_points']:+.2f} |")
        out.append(sec)
    return out


def _classifier_metrics(manifest: Mapping[str, Any], lines: list[str]) -> list[str]:
    base, cand, cmp = manifest["baseline"], manifest["compressed"], manifest["comparison"]
    lines += [
        "",
        "## Metrics (fp32 vs compressed)",
        "",
        "| metric | fp32 | compressed | drop (points) |",
        "|---|---|---|---|",
    ]
    for split, acc in base["accuracy"].items():
        flag = " ⚠ larger than clean drop" if split in cmp["ood_flags"] else ""
        lines.append(
            f"| accuracy ({split}) | {_pct(acc)} | {_pct(cand['accuracy'][split])} | "
            f"{cmp['drops_points'][split]:+.2f}{flag} |"
        )
    lines.append(f"| ECE (clean) | {base['ece']:.4f} | {cand['ece']:.4f} | |")
    for b, lat in base["latency_us"].items():
        c = cand["latency_us"][b]
        lines.append(
            f"| latency batch {b} p50 / p95 (µs) | {lat['p50']:.1f} / {lat['p95']:.1f} | "
            f"{c['p50']:.1f} / {c['p95']:.1f} | ratio {c['p50'] / lat['p50']:.2f}× |"
        )
    return list(cmp["ood_flags"])


def _token_metrics(manifest: Mapping[str, Any], lines: list[str]) -> list[str]:
    fid = manifest["fidelity"]
    lines += ["", "## Metrics (compressed vs fp32)", "", "| metric | value |", "|---|---|"]
    if "cosine_min" in fid:
        lines += [
            f"| cosine similarity to fp32 embeddings, min over {fid['inputs']} inputs | {fid['cosine_min']:.4f} |",
            f"| cosine similarity to fp32 embeddings, mean | {fid['cosine_mean']:.4f} |",
        ]
    if "top1_agreement" in fid:
        where = f"{fid['positions']} token positions" if "positions" in fid else f"{fid['inputs']} inputs"
        lines.append(f"| top-1 agreement with fp32 over {where} | {fid['top1_agreement']:.4f} |")
    if "r2" in fid:
        lines += [
            f"| R² of the outputs to fp32's over {fid['inputs']} inputs | {fid['r2']:.4f} |",
            f"| correlation with fp32's outputs | {fid['correlation']:.4f} |",
        ]
    if "kl_mean_nats" in fid:
        lines.append(f"| mean KL(fp32 ‖ compressed), nats per position | {fid['kl_mean_nats']:.4g} |")
    if "logit_cosine_min" in fid:
        lines.append(f"| cosine similarity of logits to fp32, min | {fid['logit_cosine_min']:.4f} |")
    for b, lat in manifest.get("latency_us", {}).items():
        lines.append(
            f"| latency batch {b} p50: fp32 PyTorch {lat['fp32_p50_us']:.0f} µs, compressed {lat['p50_us']:.0f} µs "
            f"| {lat['ratio_p50']:.2f}× |"
        )
    return []

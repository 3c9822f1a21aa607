"""Model card (Mitchell et al. 2019, https://arxiv.org/abs/1810.03993) for a compressed deployment artifact.

Rendered from the manifest, so every number in the card is one that was measured and recorded; the prose
fields (intended use, data, limitations) come from the caller, with defaults that state what we know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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

    Classifier manifests (``deploy_classifier``) get accuracy per split with OOD flags, ECE and latency;
    sentence-encoder manifests (``task == "sentence-embedding"``) get cosine similarity to fp32 and latency.
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
        f"({sizes['compression_ratio']:.2f}× smaller)",
    ]
    if manifest.get("export_max_abs_diff") is not None:
        lines.append(
            f"- ONNX export max |PyTorch − ORT| on test inputs: {manifest['export_max_abs_diff']:.2e}"
        )
    for layer, why in (manifest.get("prune_skipped_layers") or {}).items():
        lines.append(f"- not pruned: `{layer}` ({why})")
    if manifest.get("task") == "sentence-embedding":
        flags = _encoder_metrics(manifest, lines)
    else:
        flags = _classifier_metrics(manifest, lines)
    lim = [limitations] if limitations else []
    if flags:
        lim.append(
            "Compression costs more accuracy on " + ", ".join(flags) + " inputs than on clean ones; "
            "check these conditions before relying on the compressed model there."
        )
    lim.append(
        "Latency was measured on the build machine's CPU with one thread; device latency differs. "
        "Quality figures hold for the evaluation data (and listed corruptions) only."
    )
    lines += ["", "## Limitations", *[f"- {x}" for x in lim], ""]
    return "\n".join(lines)


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


def _encoder_metrics(manifest: Mapping[str, Any], lines: list[str]) -> list[str]:
    fid = manifest["fidelity"]
    lines += [
        "",
        "## Metrics (compressed vs fp32)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| cosine similarity to fp32 embeddings, min over {fid['sentences']} sentences | {fid['cosine_min']:.4f} |",
        f"| cosine similarity to fp32 embeddings, mean | {fid['cosine_mean']:.4f} |",
    ]
    for b, lat in manifest["latency_us"].items():
        lines.append(
            f"| latency batch {b} p50: fp32 PyTorch {lat['fp32_p50_us']:.0f} µs, compressed {lat['p50_us']:.0f} µs "
            f"| {lat['ratio_p50']:.2f}× |"
        )
    return []

"""Deployment: prune, quantize, export and package models for devices, and measure what it cost.

``onnx``, ``onnxruntime`` and ``zstandard`` (the ``deploy`` extra) are imported inside the functions that need
them, so importing this package only costs torch.
"""

from deltaplane.deploy.artifact import (
    Artifact,
    ArtifactInfo,
    pack_onnx,
    read_artifact,
    state_dict_sha256,
    write_artifact,
)
from deltaplane.deploy.card import render_model_card
from deltaplane.deploy.checkpoint import (
    Checkpoint,
    available_architectures,
    load_checkpoint,
    register_architecture,
    save_checkpoint,
)
from deltaplane.deploy.encoder import MeanPooledEncoder, cosine_similarity_rows
from deltaplane.deploy.finetune import masked_finetune
from deltaplane.deploy.onnx import ExportResult, export_onnx, ort_session, run_session
from deltaplane.deploy.pipeline import (
    DeployResult,
    EncoderDeployResult,
    deploy_classifier,
    deploy_encoder,
    parse_prune,
    prune_model,
)
from deltaplane.deploy.profile import (
    Comparison,
    Evaluation,
    Latency,
    compare,
    corruptions,
    evaluate,
    expected_calibration_error,
    measure_latency,
    onnx_predictor,
    torch_predictor,
)
from deltaplane.deploy.prune import (
    ChannelPruneResult,
    GradualPruner,
    GradualSchedule,
    PruneResult,
    apply_masks,
    channel_prune,
    check_sparsity,
    magnitude_prune,
    nm_mask,
    nm_prune,
    prunable_layers,
    sparsity_of,
    wanda_prune,
    wanda_scores,
)
from deltaplane.deploy.quantize import (
    GroupQuant,
    dequantize_int4,
    quantize_dynamic_torch,
    quantize_int4,
    quantize_int8,
    quantize_onnx,
    weight_only_quantize,
)

__all__ = [
    "Artifact",
    "ArtifactInfo",
    "ChannelPruneResult",
    "Checkpoint",
    "Comparison",
    "DeployResult",
    "EncoderDeployResult",
    "Evaluation",
    "ExportResult",
    "GradualPruner",
    "GradualSchedule",
    "GroupQuant",
    "Latency",
    "MeanPooledEncoder",
    "PruneResult",
    "apply_masks",
    "available_architectures",
    "channel_prune",
    "check_sparsity",
    "compare",
    "corruptions",
    "cosine_similarity_rows",
    "deploy_classifier",
    "deploy_encoder",
    "dequantize_int4",
    "evaluate",
    "expected_calibration_error",
    "export_onnx",
    "load_checkpoint",
    "magnitude_prune",
    "masked_finetune",
    "measure_latency",
    "nm_mask",
    "nm_prune",
    "onnx_predictor",
    "ort_session",
    "pack_onnx",
    "parse_prune",
    "prunable_layers",
    "prune_model",
    "quantize_dynamic_torch",
    "quantize_int4",
    "quantize_int8",
    "quantize_onnx",
    "read_artifact",
    "register_architecture",
    "render_model_card",
    "run_session",
    "save_checkpoint",
    "sparsity_of",
    "state_dict_sha256",
    "torch_predictor",
    "wanda_prune",
    "wanda_scores",
    "weight_only_quantize",
    "write_artifact",
]

"""Model merging: many models into one, in memory (:func:`merge`) or streamed from disk (:func:`merge_files`).

Methods (each cites its paper; see ``available_methods()``): ``linear``, ``task_arithmetic``, ``ties``,
``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``, ``sce``,
``slerp``, ``nuslerp``, ``multislerp``, ``karcher``, ``model_stock``, ``nearswap``, ``arcee_fusion``,
``passthrough``, ``fisher`` — mergekit's methods with mergekit's numbers, and mergekit's YAML (gradients, filters,
slices, tokenizer and chat template) through :func:`merge_files`.
:class:`MixtureOfExperts` composes experts under a learned router when merging loses too much.
"""

from deltaplane.merging.base import (
    REQUIRED,
    MergeMethod,
    MergeParams,
    Param,
    available_methods,
    get_method,
    merge,
    register_method,
    resolve_params,
)
from deltaplane.merging.config import MergeConfig, load_config
from deltaplane.merging.fisher import FisherMerge, diagonal_fisher
from deltaplane.merging.hypersphere import Karcher, MultiSlerp
from deltaplane.merging.linear import Linear
from deltaplane.merging.model_stock import ModelStock
from deltaplane.merging.moe import MixtureOfExperts, Router
from deltaplane.merging.passthrough import Passthrough
from deltaplane.merging.sce import Sce
from deltaplane.merging.selective import ArceeFusion, NearSwap
from deltaplane.merging.slerp import NuSlerp, Slerp, slerp
from deltaplane.merging.streaming import MergeResult, PreparedMerge, merge_files, prepare_merge
from deltaplane.merging.task_arithmetic import GeneralizedTaskArithmetic, sign_consensus_mask, sparsify

__all__ = [
    "REQUIRED",
    "ArceeFusion",
    "FisherMerge",
    "GeneralizedTaskArithmetic",
    "Karcher",
    "Linear",
    "MergeConfig",
    "MergeMethod",
    "MergeParams",
    "MergeResult",
    "MixtureOfExperts",
    "ModelStock",
    "MultiSlerp",
    "NearSwap",
    "NuSlerp",
    "Param",
    "Passthrough",
    "PreparedMerge",
    "Router",
    "Sce",
    "Slerp",
    "available_methods",
    "diagonal_fisher",
    "get_method",
    "load_config",
    "merge",
    "merge_files",
    "prepare_merge",
    "register_method",
    "resolve_params",
    "sign_consensus_mask",
    "slerp",
    "sparsify",
]

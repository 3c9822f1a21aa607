"""Model merging: many models into one, in memory (:func:`merge`) or streamed from disk (:func:`merge_files`).

Methods (each cites its paper; see ``available_methods()``): ``linear``, ``task_arithmetic``, ``ties``,
``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``slerp``, ``model_stock``, ``fisher``.
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
from deltaplane.merging.fisher import FisherMerge, diagonal_fisher
from deltaplane.merging.linear import Linear
from deltaplane.merging.model_stock import ModelStock
from deltaplane.merging.moe import MixtureOfExperts, Router
from deltaplane.merging.slerp import Slerp, slerp
from deltaplane.merging.streaming import MergeResult, merge_files
from deltaplane.merging.task_arithmetic import GeneralizedTaskArithmetic, sign_consensus_mask, sparsify

__all__ = [
    "REQUIRED",
    "FisherMerge",
    "GeneralizedTaskArithmetic",
    "Linear",
    "MergeMethod",
    "MergeParams",
    "MergeResult",
    "MixtureOfExperts",
    "ModelStock",
    "Param",
    "Router",
    "Slerp",
    "available_methods",
    "diagonal_fisher",
    "get_method",
    "merge",
    "merge_files",
    "register_method",
    "resolve_params",
    "sign_consensus_mask",
    "slerp",
    "sparsify",
]

"""Model/delta registry: content-addressed signed versions, lineage, tags, governance, promotion, downlink.

Needs the ``serve`` extra (``cryptography``) for signing. See ``docs/ops.md``.
"""

from deltaplane.registry.downlink import Downlink, apply_downlink, plan_downlink, publish_update
from deltaplane.registry.promotion import Evaluator, PromotionResult, Tolerance, promote, rollback
from deltaplane.registry.signing import Signature, Signer, Verifier, init_keys, load_signer, load_verifier
from deltaplane.registry.store import (
    Artifact,
    Governance,
    IntegrityReport,
    Registry,
    default_home,
    state_from_bytes,
    state_to_bytes,
)

__all__ = [
    "Artifact",
    "Downlink",
    "Evaluator",
    "Governance",
    "IntegrityReport",
    "PromotionResult",
    "Registry",
    "Signature",
    "Signer",
    "Tolerance",
    "Verifier",
    "apply_downlink",
    "default_home",
    "init_keys",
    "load_signer",
    "load_verifier",
    "plan_downlink",
    "promote",
    "publish_update",
    "rollback",
    "state_from_bytes",
    "state_to_bytes",
]

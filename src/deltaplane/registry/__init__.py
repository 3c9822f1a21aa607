"""Model/delta registry: content-addressed signed versions, lineage, tags, governance, promotion, downlink.

Needs the ``serve`` extra (``cryptography``) for signing. See ``docs/ops.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaplane.lazy import lazy_attributes

if TYPE_CHECKING:
    from deltaplane.registry.downlink import Downlink, apply_downlink, plan_downlink, publish_update
    from deltaplane.registry.promotion import Evaluator, PromotionResult, Tolerance, promote, rollback
    from deltaplane.registry.signing import (
        Signature,
        Signer,
        Verifier,
        init_keys,
        load_signer,
        load_trusted_keys,
        load_verifier,
    )
    from deltaplane.registry.store import (
        Artifact,
        Governance,
        IntegrityReport,
        Registry,
        RepairReport,
        default_home,
        state_from_bytes,
        state_to_bytes,
        withdrawn_among,
    )

# Lazy (PEP 562): registry commands that only read metadata must not wait for torch.
_LAZY = {
    "apply_downlink": "deltaplane.registry.downlink",
    "Artifact": "deltaplane.registry.store",
    "default_home": "deltaplane.registry.store",
    "Downlink": "deltaplane.registry.downlink",
    "Evaluator": "deltaplane.registry.promotion",
    "Governance": "deltaplane.registry.store",
    "init_keys": "deltaplane.registry.signing",
    "IntegrityReport": "deltaplane.registry.store",
    "load_signer": "deltaplane.registry.signing",
    "load_trusted_keys": "deltaplane.registry.signing",
    "load_verifier": "deltaplane.registry.signing",
    "plan_downlink": "deltaplane.registry.downlink",
    "promote": "deltaplane.registry.promotion",
    "PromotionResult": "deltaplane.registry.promotion",
    "publish_update": "deltaplane.registry.downlink",
    "Registry": "deltaplane.registry.store",
    "RepairReport": "deltaplane.registry.store",
    "rollback": "deltaplane.registry.promotion",
    "Signature": "deltaplane.registry.signing",
    "Signer": "deltaplane.registry.signing",
    "state_from_bytes": "deltaplane.registry.store",
    "state_to_bytes": "deltaplane.registry.store",
    "Tolerance": "deltaplane.registry.promotion",
    "Verifier": "deltaplane.registry.signing",
    "withdrawn_among": "deltaplane.registry.store",
}

__all__ = [
    "Artifact",
    "Downlink",
    "Evaluator",
    "Governance",
    "IntegrityReport",
    "PromotionResult",
    "Registry",
    "RepairReport",
    "Signature",
    "Signer",
    "Tolerance",
    "Verifier",
    "apply_downlink",
    "default_home",
    "init_keys",
    "load_signer",
    "load_trusted_keys",
    "load_verifier",
    "plan_downlink",
    "promote",
    "publish_update",
    "rollback",
    "state_from_bytes",
    "state_to_bytes",
    "withdrawn_among",
]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

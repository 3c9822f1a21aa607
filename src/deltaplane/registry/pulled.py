"""What a ``registry pull`` folder says about consent, for the commands that take a folder as their input.

``deltaplane registry pull`` writes a version out even when it contains a cohort that withdrew consent (a pull
is a download, not a use) and names those cohorts in the folder's ``manifest.json``
(``"consent": {"withdrawn_cohorts": [...]}``). ``deploy``, ``merge`` and ``extract-lora`` read folders, not
the registry: :func:`withdrawn_in_pulled` lets them say so when such a folder is their input, so it is never
used silently. It is a warning, not a refusal: the registry's own gates (promotion, serving, round bases) still
decide what is done with a result, and a version registered from one inherits the cohorts by its lineage.
"""

from __future__ import annotations

import os

from deltaplane.shards import pull_manifest

__all__ = ["withdrawn_in_pulled"]


def withdrawn_in_pulled(path: str | os.PathLike[str]) -> list[str]:
    """The withdrawn cohorts a pulled folder's ``manifest.json`` names (``path``: the folder, or a file in it).

    Empty for anything else: no manifest, a deploy output's manifest (no ``consent``), a manifest that does not
    read as JSON. The manifest is the pull's record, not a signed one: this warns a careful user, it does not
    stop a careless one (the registry's lineage walk does that).
    """
    doc = pull_manifest(path)
    cohorts = doc["consent"].get("withdrawn_cohorts") if doc is not None else None
    return sorted({c for c in cohorts if isinstance(c, str)}) if isinstance(cohorts, list) else []

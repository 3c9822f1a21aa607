"""Which registry versions a ``deltaplane merge`` output was made from, for ``registry register``.

A merge reads folders, not the registry, so nothing tied its output to the versions it merged: registered
without ``--lineage '{"sources": [...]}'``, the merged version carried none of their cohorts, and a withdrawal
of one never reached it. The merge now writes ``merge_sources.json`` (:func:`deltaplane.merging.output.write_sources`)
naming each input by the SHA-256 of its weights file. :func:`read_merge_sources` reads that record from the
folder being registered (or the folder of the file being registered); :func:`link_merge_sources` finds the
versions holding those weights (:meth:`~deltaplane.registry.Registry.deployed_from`: a version's own bytes, as
``registry pull`` writes them, or the file a version was registered from), which ``registry register`` passes
as ``sources=`` so their governance flows into the merged version and the consent walk reaches it.

An input the registry does not know (a model from a hub) is a note, as it is for a deploy. An input that says it
was pulled from a registry (its ``pulled_as``) but that no version here holds is a refusal: registering would
drop that version's cohorts, which is what this module exists to prevent. ``--lineage`` naming its own
``sources`` is the user's word and is never overridden.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from deltaplane.errors import ConfigError, DecodeError
from deltaplane.merging.output import SOURCES_KIND, SOURCES_NAME
from deltaplane.registry.store import Artifact, Registry
from deltaplane.textfile import MANIFEST_LIMIT, read_bounded_text

__all__ = ["link_merge_sources", "read_merge_sources"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_merge_sources(path: Path) -> dict[str, Any] | None:
    """The merge record of ``path`` (a merge output folder, or a file in one) as the lineage's ``merge`` entry:
    ``{"method": ..., "inputs": [{"model", "sha256", "pulled_as"?}, ...]}``; ``None`` when there is none.

    Raises:
        DecodeError: a ``merge_sources.json`` that is not the record a merge writes (not JSON, another
            ``kind``, an input without a SHA-256): fix or remove it, so the inputs are not silently unlinked.
    """
    folder = path if path.is_dir() else path.parent
    f = folder / SOURCES_NAME
    if not f.is_file():
        return None
    text = read_bounded_text(f, limit=MANIFEST_LIMIT, what="merge record", error=DecodeError)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DecodeError(
            f"{f} is not valid JSON ({exc}); restore the file the merge wrote, or remove it"
        ) from None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("kind") != SOURCES_KIND or not isinstance(inputs, list):
        raise DecodeError(
            f"{f} is not a merge record (a JSON object with kind {SOURCES_KIND!r} and a list of inputs); restore "
            "the file the merge wrote, or remove it"
        )
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(inputs):
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise DecodeError(
                f"{f}: input {i} has no SHA-256 (64 lowercase hex digits); restore the file the merge wrote"
            )
        kept = {"model": str(entry.get("model", "")), "sha256": sha}
        if isinstance(entry.get("pulled_as"), str):
            kept["pulled_as"] = entry["pulled_as"]
        out.append(kept)
    return {"method": str(doc.get("merge_method", "")), "inputs": out}


def link_merge_sources(
    reg: Registry, model: str, merge: dict[str, Any], given: dict[str, Any], parent: int | None
) -> tuple[list[Artifact], list[str]]:
    """The versions a merge record's inputs are (to pass as ``sources=``), and lines saying what was linked.

    Each input's SHA-256 is looked up with :meth:`Registry.deployed_from` (versions of ``model`` first; the
    signature checked). The ``parent`` version, when named, is not repeated as a source. ``given`` is the
    user's ``--lineage``: when it names ``sources`` nothing is linked.

    Raises:
        ConfigError: an input pulled from a registry (``pulled_as``) whose weights no version here holds: its
            cohorts would be dropped. The message says how to name the sources instead.
    """
    inputs = merge["inputs"]
    if "sources" in given:
        return [], [
            f"note: the merge's {len(inputs)} inputs are not linked, as --lineage names its own sources"
        ]
    found: dict[str, Artifact] = {}
    unknown: list[str] = []
    for entry in inputs:
        art = reg.deployed_from(entry["sha256"], model=model)
        if art is not None:
            found.setdefault(art.ref, art)
        elif "pulled_as" in entry:
            raise ConfigError(
                f"merge input {entry['model']} was pulled from a registry as {entry['pulled_as']}, but no version "
                f"in this registry holds its weights (SHA-256 {entry['sha256'][:16]}…), so the merged version "
                "would not carry its cohorts or their consent: register it into the registry it was pulled from "
                "(--home), or name the versions it was made from with --lineage "
                f'\'{{"sources": ["{entry["pulled_as"]}", ...]}}\''
            )
        else:
            unknown.append(entry["model"])
    sources = [a for a in found.values() if not (a.model == model and a.number == parent)]
    lines = []
    if found:
        lines.append(f"sources {', '.join(found)}: they hold the weights the merge read ({SOURCES_NAME})")
    if unknown:
        lines.append(
            f"note: no registered version holds the weights of {', '.join(unknown)}; name what they were made from "
            "with --lineage '{\"sources\": [...]}' if they came from this registry"
        )
    return sources, lines

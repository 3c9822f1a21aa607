"""A version's lineage record in one line, for listings (``deltaplane registry list``).

A lineage is free JSON, and what the library and the service write into it can be long: a fleet's first version
carries its whole run configuration (``run_config``, some fifty fields), a ``deltaplane run`` folder its config and
final metrics. A listing that printed the record whole buried every other column. This module names the fields a
reader looks for first (the round, the codec, where the weights came from) and counts the rest; the whole record
stays behind ``registry show REF`` and ``registry list --json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["summarize_lineage"]

#: a scalar printed longer than this is cut (``…``): the record is a summary, ``registry show`` has it whole
_VALUE_WIDTH = 28

#: fields a table prints in a column of its own (cohorts), or that repeat another field (a service round's own
#: numbering beside ``round``): left out of the summary without counting as omitted
_SHOWN_ELSEWHERE = frozenset({"round_cohorts"})


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def _codec_of(config: Any) -> str | None:
    codec = config.get("codec") if isinstance(config, Mapping) else None
    return f"codec {_short(codec)}" if isinstance(codec, str) and codec else None


def _run(run: Any) -> str | None:
    """A ``deltaplane run`` record (``registry register RUN_FOLDER``): its name, task, accuracy and codec."""
    if not isinstance(run, Mapping):
        return None
    parts = [f"run {_short(run.get('run', '?'))}" + (f" on {_short(run['task'])}" if run.get("task") else "")]
    acc = run.get("final", {}).get("test_accuracy") if isinstance(run.get("final"), Mapping) else None
    if isinstance(acc, int | float):
        parts.append(f"acc {acc:.4f}")
    parts.append(_codec_of(run.get("config")) or "")
    return ", ".join(p for p in parts if p)


def _source(source: Any) -> str | None:
    if not isinstance(source, Mapping) or not source.get("file"):
        return None
    return f"from {_short(source['file'])}" + (f" ({source['format']})" if source.get("format") else "")


def _deploy(deploy: Any) -> str | None:
    """A deploy manifest's summary (``deploy.bundle``): its recipe, prune share and quantization."""
    if not isinstance(deploy, Mapping):
        return None
    recipe = [f"prune {deploy['prune']:.0%}" if isinstance(deploy.get("prune"), int | float) else ""]
    recipe.append(_short(deploy["quant"]) if deploy.get("quant") else "")
    return "deploy " + (" + ".join(r for r in recipe if r) or "artifact")


def _merge(merge: Any) -> str | None:
    """A merge output's record (``registry.merged``): its method and how many models it read."""
    inputs = merge.get("inputs") if isinstance(merge, Mapping) else None
    if not isinstance(inputs, list):
        return None
    method = merge.get("method")
    return (
        f"merge{f' {_short(method)}' if isinstance(method, str) and method else ''} of {len(inputs)} models"
    )


def _hf(config: Any) -> str | None:
    arch = config.get("architectures") if isinstance(config, Mapping) else None
    if isinstance(arch, list) and arch:
        return f"HF {_short(arch[0])}"
    return (
        f"HF {_short(config['model_type'])}"
        if isinstance(config, Mapping) and config.get("model_type")
        else None
    )


def _cohorts(cohorts: Any) -> str | None:
    return (
        f"excluded {_short(','.join(map(str, cohorts)))}" if isinstance(cohorts, list) and cohorts else None
    )


def _dp(dp: Any) -> str | None:
    eps, delta = (dp.get("epsilon"), dp.get("delta")) if isinstance(dp, Mapping) else (None, None)
    ok = all(isinstance(v, float | int) and not isinstance(v, bool) for v in (eps, delta))
    adjacency = dp.get("adjacency") if ok else None  # absent from versions published before it was stored
    neighbours = f" ({_short(adjacency)})" if isinstance(adjacency, str) and adjacency else ""
    return f"DP ε {eps:.3f} at δ {delta:g}{neighbours}" if ok else None


def _count(noun: str) -> Callable[[Any], str | None]:
    return lambda n: f"{n} {noun}" if isinstance(n, int) and not isinstance(n, bool) else None


# (fields read, how they read) in the order a reader wants them: which round, what it was made from, with what
_KNOWN: tuple[tuple[str, Callable[[Any], str | None]], ...] = (
    ("round", lambda r: f"round {r}"),
    ("plain_round", lambda r: f"round {r}"),
    ("secagg_round", lambda r: f"SecAgg round {r}"),
    ("uploads", _count("uploads")),
    ("dp", _dp),
    ("examples", _count("examples")),
    ("downlink_codec", lambda c: f"downlink {_short(c)}"),
    ("run_config", lambda c: "run config" + (f" ({_codec_of(c)})" if _codec_of(c) else "")),
    ("run", _run),
    ("source", _source),
    ("deploy", _deploy),
    ("merge", _merge),
    ("hf_config", _hf),
    ("excluded_cohorts", _cohorts),
)


def summarize_lineage(lineage: Mapping[str, Any]) -> tuple[str, int]:
    """One line for a version's lineage, e.g. ``round 5, 18 uploads, downlink stc(0.006)``.

    Known fields read as words (``round``, ``uploads``, ``downlink_codec``, a run's codec and accuracy, the
    source file, a deploy recipe); other short values as ``key=value``; nested values nobody named are counted
    (``+2 more``), never dropped without saying so. ``plain_round`` is left out beside ``round`` (the same
    round in the service's numbering), ``round_cohorts`` always (listings print cohorts in their own column).

    Args:
        lineage: a version's lineage record (:attr:`~deltaplane.registry.Artifact.lineage`).

    Returns:
        ``(summary, omitted)``: the line, and how many fields it counts as ``+N more`` rather than shows.
    """
    parts: list[str] = []
    done = set(_SHOWN_ELSEWHERE) | ({"plain_round"} if "round" in lineage else set())
    for key, read in _KNOWN:
        if key in lineage and key not in done:
            text = read(lineage[key])
            if text:
                parts.append(text)
                done.add(key)
    omitted = 0
    for key, value in sorted(lineage.items()):
        if key in done:
            continue
        if value is None or isinstance(value, str | int | float | bool):
            parts.append(f"{_short(key)}={_short(value)}")
        else:
            omitted += 1
    if omitted:
        parts.append(f"+{omitted} more")
    return ", ".join(parts) or "—", omitted

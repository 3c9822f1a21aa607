"""What a fleet's coordinator needs from the task, computed once where the model is born (``fleet init``).

The coordinator (:func:`~deltaplane.serve.coordinator.coordinate`) opens and closes rounds; it needs two things
that only the task's data tells: the drift reference the devices' summaries are compared with (the pixel or
feature histograms of the training set, :func:`~deltaplane.serve.federation.drift_reference`), and, for a
weighted SecAgg round, the devices' example counts its public weight scale is the mean of
(:func:`~deltaplane.engine.round_params.secure_weight_scale`). Building the task for them made a coordinator
import torch and load the data (5.2–5.7 s of CPU and 420 MB for docs/fleet.md's task, against 0.8 s and 73 MB
without it: ``benchmarks/coordinator_startup.py``, recorded in docs/benchmarks.md). ``deltaplane fleet init``
builds the task anyway, to register the initial model: it computes both there (:func:`compute_reference`) and
stores them in that version's lineage under :data:`REFERENCE_KEY`, signed with it, with the run options they
depend on (:data:`DATA_FIELDS`). The coordinator reads them back over the admin API (``GET
/admin/models/{m}/versions``: :func:`registered_reference`) and uses them only when its federation file
agrees on every one of those options; otherwise it says why and builds the task itself, as before.

This module imports no torch: only :func:`compute_reference`, which ``fleet init`` calls, does, lazily.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deltaplane.engine.round_params import secure_weight_scale

if TYPE_CHECKING:
    from deltaplane.engine.config import RunConfig

__all__ = ["DATA_FIELDS", "REFERENCE_KEY", "FleetReference", "compute_reference", "registered_reference"]

#: the lineage key of the reference ``fleet init`` stores with the fleet's initial model
REFERENCE_KEY = "fleet_reference"
#: the run options the task's data and its partition across the devices depend on (``make_task`` reads the
#: task and its options, the split and the shifts; ``build_clients`` the count, α, the minimum, the holdout
#: share and the seed): the reference is used only for a federation that agrees on all of them
DATA_FIELDS = (
    "task",
    "task_options",
    "clients",
    "alpha",
    "min_client_samples",
    "holdout_fraction",
    "test_fraction",
    "train_shifts",
    "seed",
    "split_seed",
)


def _data_options(config: RunConfig) -> dict[str, Any]:
    """``config``'s :data:`DATA_FIELDS`, as JSON gives them back (so a stored copy compares equal)."""
    return json.loads(json.dumps({name: getattr(config, name) for name in DATA_FIELDS}))


@dataclass(frozen=True)
class FleetReference:
    """The drift reference (its :class:`~deltaplane.monitor.DriftSpec` and summary, as their JSON forms) and
    every device's example count, of one federation's task and partition."""

    spec: Mapping[str, Any]
    reference: Mapping[str, Any]
    num_samples: tuple[int, ...]

    def weight_scale(self, config: RunConfig) -> float:
        """SecAgg's public weight scale for ``config`` (0 under distributed DP): the same function every
        driver uses, over every device's count, as the coordinator computed it from the task."""
        return secure_weight_scale(config, self.num_samples)

    def to_lineage(self, config: RunConfig) -> dict[str, Any]:
        """The JSON object stored under :data:`REFERENCE_KEY`: the reference and the options it depends on."""
        return {
            "options": _data_options(config),
            "drift": {"spec": dict(self.spec), "reference": dict(self.reference)},
            "num_samples": list(self.num_samples),
        }

    @classmethod
    def from_lineage(cls, stored: Any, config: RunConfig) -> FleetReference | str:
        """The reference stored by :meth:`to_lineage` if it was computed for ``config``'s data; otherwise why
        not, in words (an option that differs, or a malformed record)."""
        if not isinstance(stored, Mapping):
            return f"its {REFERENCE_KEY} is not a JSON object"
        options, drift, counts = stored.get("options"), stored.get("drift"), stored.get("num_samples")
        if not (isinstance(options, Mapping) and isinstance(drift, Mapping) and isinstance(counts, list)):
            return f"its {REFERENCE_KEY} lacks options, drift or num_samples"
        ours = _data_options(config)
        differ = [
            f"{k} {options.get(k)!r} there, {ours[k]!r} here"
            for k in DATA_FIELDS
            if options.get(k) != ours[k]
        ]
        if differ:
            return "it was computed for other data (" + "; ".join(differ) + ")"
        if not (isinstance(drift.get("spec"), Mapping) and isinstance(drift.get("reference"), Mapping)):
            return f"its {REFERENCE_KEY} drift holds no spec and reference"
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
            return f"its {REFERENCE_KEY} num_samples are not example counts"
        return cls(drift["spec"], drift["reference"], tuple(counts))


def compute_reference(task: Any, clients: Sequence[Any]) -> FleetReference:
    """The reference of ``task`` partitioned into ``clients`` (``build_clients`` of the same config): what the
    coordinator computed before, by the same functions. Imports torch (the drift reference reads the data)."""
    from deltaplane.serve.federation import drift_reference

    spec, reference = drift_reference(task, list(clients))
    return FleetReference(spec.to_dict(), reference.to_dict(), tuple(int(c.num_samples) for c in clients))


def registered_reference(versions: Mapping[str, Any], model: str, config: RunConfig) -> FleetReference | str:
    """The reference ``fleet init`` stored with ``model``'s first version that holds one, in ``versions`` (the
    answer of ``GET /admin/models/{m}/versions``), if computed for ``config``'s data; otherwise why not."""
    rows = versions.get("versions") if isinstance(versions, Mapping) else None
    for row in sorted(rows or (), key=lambda r: r.get("number", 0) if isinstance(r, Mapping) else 0):
        lineage = row.get("lineage") if isinstance(row, Mapping) else None
        if isinstance(lineage, Mapping) and REFERENCE_KEY in lineage:
            got = FleetReference.from_lineage(lineage[REFERENCE_KEY], config)
            return got if isinstance(got, FleetReference) else f"{model}@{row.get('number')}: {got}"
    return f"no version of {model!r} holds one (`deltaplane fleet init` registers it with the initial model)"

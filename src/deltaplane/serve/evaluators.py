"""Ready-made evaluators for promotion gates (``--evaluator deltaplane.serve.evaluators:digits``).

An evaluator maps a state dict to metrics; the gate compares ``accuracy`` (clean) and ``ood_accuracy``
(out-of-distribution) between the candidate and current production. :func:`digits` scores the simulator's
:class:`~deltaplane.sim.model.DigitsCNN` on the same held-out test split ``deltaplane run`` reports, and on a
noisy copy of it (Gaussian pixel noise, std 0.2, seeded) as the OOD set — the shift a cheaper camera or sensor
would bring.
"""

from __future__ import annotations

from functools import cache

import torch

from deltaplane.data.digits import Dataset, load_digits, train_test_split
from deltaplane.data.domains import apply_domain
from deltaplane.data.models import build_model
from deltaplane.engine.metrics import accuracy

__all__ = ["digits"]


@cache
def _digits_sets() -> tuple[Dataset, Dataset]:
    _, test = train_test_split(load_digits(), test_fraction=0.2, seed=0)
    return test, Dataset(apply_domain("noise", test.x, seed=0), test.y)


def digits(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Clean and OOD (noisy) test accuracy of a DigitsCNN state dict; also per-shift figures."""
    model = build_model(0)
    model.load_state_dict(state)
    test, noisy = _digits_sets()
    return {
        "accuracy": accuracy(model, test),
        "ood_accuracy": accuracy(model, noisy),
        "ood_rotate90_accuracy": accuracy(model, Dataset(apply_domain("rotate90", test.x), test.y)),
    }


#: what the evaluator scores, stated in the model card of every version it promotes
digits.data = (  # type: ignore[attr-defined]  # a function attribute: how promote() reads an evaluator's data
    "digits test split (20%, seed 0); ood_accuracy on a copy with Gaussian pixel noise (std 0.2, seed 0); "
    "ood_rotate90_accuracy on the split rotated by 90 degrees"
)

"""Promotion gate and rollback on a real model: degraded candidates are blocked, rollback is byte-identical.

The digits task's CNN is federated by the engine (sequential driver, 10 clients): a weaker version (2 rounds)
and a better one (15 rounds) go into the registry, then two degraded deploy artifacts derived from the better one
(90% magnitude pruning, 2-bit weight quantization). Each promotion runs the ready-made digits evaluator
(``deltaplane.serve.evaluators:digits``: clean test accuracy + accuracy on a noisy OOD copy of the test set) on
the candidate and on current production; tolerance 1 point clean / 2 points OOD.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _record import record, table
from deltaplane.engine import RunConfig
from deltaplane.registry import Registry, Tolerance, promote, rollback
from deltaplane.serve.evaluators import digits as evaluate
from deltaplane.sim import run_simulation


def pruned(state, sparsity):
    out = {}
    for k, v in state.items():
        if v.dim() > 1:
            t = v.abs().flatten().kthvalue(int(sparsity * v.numel())).values
            v = torch.where(v.abs() > t, v, torch.zeros_like(v))
        out[k] = v
    return out


def quantized(state, bits):
    levels = 2 ** (bits - 1) - 1
    out = {}
    for k, v in state.items():
        s = v.abs().max() / levels if v.dim() > 1 else None
        out[k] = torch.round(v / s) * s if s is not None and s > 0 else v
    return out


def main() -> None:
    torch.set_num_threads(1)
    tol = Tolerance({"accuracy": 0.01, "ood_accuracy": 0.02})
    reg = Registry.create(tempfile.mkdtemp(prefix="gate-bench-"))
    fed = RunConfig(clients=10, alpha=1.0)
    weak = run_simulation(fed.replace(rounds=2)).final_state
    good = run_simulation(fed.replace(rounds=15)).final_state
    v1 = reg.register_model("cnn", weak, lineage={"rounds": 2})
    v2 = reg.register_model("cnn", good, parent=v1.number, lineage={"rounds": 15})
    v3 = reg.register_model(
        "cnn", pruned(good, 0.9), parent=v2.number, lineage={"deploy_recipe": "prune 90%"}
    )
    v4 = reg.register_model("cnn", quantized(good, 2), parent=v2.number, lineage={"deploy_recipe": "2-bit"})
    rows = []
    for art, what in [
        (v1, "weaker (2 rounds)"),
        (v2, "better (15 rounds)"),
        (v3, "over-pruned 90%"),
        (v4, "2-bit quantized"),
    ]:
        res = promote(reg, art.ref, evaluator=evaluate, tolerance=tol, raise_on_refusal=False)
        c, b = res.candidate_metrics, res.baseline_metrics
        rows.append(
            [
                art.ref,
                what,
                f"{c['accuracy']:.3f}",
                f"{c['ood_accuracy']:.3f}",
                f"{b['accuracy']:.3f} / {b['ood_accuracy']:.3f}" if b else "none",
                "promoted" if res.promoted else "**blocked**",
            ]
        )
        print(rows[-1], flush=True)
    prod_before = reg.tag("cnn", "production")
    v1_bytes = reg.blob_path(v1.sha256).read_bytes()
    back = rollback(reg, "cnn")
    restored = reg.read(reg.resolve("cnn:production"))
    identical = restored == v1_bytes and hashlib.sha256(restored).hexdigest() == v1.sha256
    loaded_equal = all(torch.equal(reg.load_state(back)[k], weak[k]) for k in weak)
    body = (
        table(["version", "what", "clean acc", "OOD acc", "production before (clean / OOD)", "gate"], rows)
        + f"\n\nTolerance: {dict(tol.limits)} (absolute drop). Production after the attempts: cnn@{prod_before}. "
        f"`rollback` then restored cnn@{back.number}: bytes identical to the originally registered blob: "
        f"**{'yes' if identical else 'NO'}**; every tensor equal to the trained weights: "
        f"**{'yes' if loaded_equal else 'NO'}**."
    )
    print(body)
    record("promotion-gate", "Promotion gate blocks degraded models; rollback is byte-identical", body)


if __name__ == "__main__":
    main()

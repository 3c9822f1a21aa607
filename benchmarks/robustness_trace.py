"""Per-round trace of ``trigger_attribution`` in one run of ``robustness.py accept`` (issue #21 diagnostics).

Runs the very federation the accept table reports (:func:`robustness.config`: 80 rounds, 20% ``backdoor``,
``engine="batched"``, one thread) and watches the rule without changing it — thin wrappers around
:class:`~deltaplane.aggregation.attribution.BackdoorAttribution`'s inversion, adoption, scoring and combining
record, per round: every label's anomaly index and reach at each inversion (and whether it ran on the shadow
model), each trigger offered and whether it was taken, the label in force, every client's z-score, the excluded
clients against the true attackers, every update's norm and the norm of the kept mean (and says when one update is
over 10× the round's median), the largest kept update's multiple of the round's median norm and, with ``norm_cap``,
the kept updates the bound scales down (``capped``), and the test accuracy and backdoor success. Prints a compact trace and writes
the whole record as JSON. The run's final figures go into the accept section's cache when it has none for them.

``--attack`` and ``--uplink`` trace a cell of the grid instead (e.g. ``--attack dba:0.3 --uplink 'stc(0.006)'``:
the run of ``robustness.py grid --uplink 'stc(0.006)'``'s 30% distributed-trigger cell, whose cache it fills);
``--attack none`` traces the ``clean`` section's no-attacker run (e.g. to read the honest updates' norms).

Usage::

    python benchmarks/robustness_trace.py identity 0 'trigger_attribution(sticky=true)' trace.json
    python benchmarks/robustness_trace.py default 0 trigger_attribution trace.json --attack backdoor:0.3 \
        --uplink 'stc(0.006)'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import robustness as rb


def job(codec: str, seed: int, defense: str, rounds: int, attack: str, uplink: str) -> tuple:
    """The ``robustness.py`` job (and so cache file) a traced run is: ``attack="none"`` is the ``clean``
    section's run, which robustness.py keys, and configures, with no attack at all (``None``)."""
    job_codec = rb.uplink(uplink) if codec == "default" else rb.CODECS[codec]
    return (job_codec, None if attack == "none" else attack, defense, seed, rounds)


def over_cap(x: Any, ids: list[str], kept: list[int], cap: float | None) -> tuple[float, dict[str, float]]:
    """The largest kept update's multiple of the round's median norm (over *all* its updates, as
    :func:`~deltaplane.aggregation.attribution.bound_norms` takes it), and each kept update over ``cap`` times
    that median with its multiple: the updates ``norm_cap=cap`` scales down this round (none without a cap)."""
    norms = x.norm(dim=1)
    median = norms.median()
    over = [] if cap is None else [i for i in kept if bool(norms[i] > cap * float(median))]
    return float(norms[kept].max() / median), {ids[i]: float(norms[i] / median) for i in over}


def trace(
    codec: str,
    seed: int,
    defense: str,
    rounds: int = 80,
    attack: str = "backdoor:0.2",
    uplink: str = rb.DEFAULT_CODEC,
) -> dict[str, Any]:
    """One traced run: ``codec`` is ``default`` (``uplink`` with the DGC options, as :func:`robustness.uplink`)
    or ``identity``, ``attack`` the grid's ``name:fraction``; returns the record (see the module docstring)."""
    import torch

    from deltaplane.aggregation import attribution as A
    from deltaplane.apps.runner import run_federation
    from deltaplane.engine.attacks import choose_malicious, parse_attack
    from deltaplane.engine.seeding import Stream, numpy_rng

    args = job(codec, seed, defense, rounds, attack, uplink)
    job_attack = args[1]
    cfg = rb.config(args)
    attackers: set[str] = set()
    if job_attack is not None:  # the runner's own choice of the malicious clients (engine/client.py)
        _, fraction = parse_attack(job_attack)
        chosen = choose_malicious(cfg.clients, fraction, numpy_rng(seed, Stream.ATTACK), spec=job_attack)
        attackers = {str(i) for i in chosen}
    log: list[dict[str, Any]] = []
    rule = A.BackdoorAttribution
    inverted, adopt, scores, combine = rule._inverted, rule._adopt, rule._scores, rule._combine

    def w_inverted(self: Any, probe: Any, like: Any, **kw: Any) -> Any:
        out = inverted(self, probe, like, **kw)
        index, flip = out[0], out[1]
        off = self.state.shadow
        norm, acc = 0.0, None
        with torch.no_grad():  # the shadow model the inversion ran on: its offset's norm, its root accuracy
            state = dict(probe.state)
            if off is not None:
                norm = float(off.norm())
                d = like.unflatten(off)
                state = {k: v + d[k] if k in d else v for k, v in state.items()}
            acc = float((probe.logits(state, probe.x).argmax(1) == probe.y).float().mean())
        log.append(
            {
                "kind": "inversion",
                "round": self.state.rounds + 1,
                "shadow": kw.get("shadow", True),
                "shadow_norm": round(norm, 3),
                "shadow_accuracy": round(acc, 3),
                "index": [round(float(v), 2) for v in index],
                "reached": [round(float(v), 2) for v in flip],
            }
        )
        print(
            f"  inversion round {self.state.rounds + 1} (shadow norm {norm:.2f}, root accuracy {acc:.2f}): "
            f"{log[-1]['index']}",
            flush=True,
        )
        return out

    def w_adopt(self: Any, label: int, anomaly: float, mask: Any, pattern: Any) -> bool:
        before = self.state.label
        taken = adopt(self, label, anomaly, mask, pattern)
        log.append(
            {
                "kind": "offer",
                "round": self.state.rounds + 1,
                "label": label,
                "anomaly": anomaly,
                "taken": taken,
                "before": before,
            }
        )
        print(
            f"  offer label {label} ({anomaly:.2f}) over {before}: {'taken' if taken else 'refused'}",
            flush=True,
        )
        return taken

    def w_scores(self: Any, probe: Any, like: Any, x: Any) -> Any:
        z = scores(self, probe, like, x)
        log.append(
            {"kind": "z", "round": self.state.rounds, "z": dict(zip(self._ids, map(float, z), strict=True))}
        )
        return z

    def w_combine(self: Any, x: Any) -> Any:
        out = combine(self, x)
        st, out_ids = self.state, set(self.excluded)
        norms = dict(zip(self._ids, x.norm(dim=1).tolist(), strict=True))  # each decoded update's L2 norm
        kept = [i for i, c in enumerate(self._ids) if c not in out_ids]
        kept_max, capped = over_cap(x, self._ids, kept, self.norm_cap)
        log.append(
            {
                "kind": "round",
                "round": st.rounds,
                "label": st.label,
                "excluded": sorted(out_ids),
                "attackers_out": len(out_ids & attackers),
                "honest_out": len(out_ids - attackers),
                "norms": {c: round(n, 3) for c, n in norms.items()},
                "kept_mean_norm": round(float(x[kept].mean(dim=0).norm()), 3),
                "kept_max_ratio": round(kept_max, 3),
                "capped": {c: round(r, 2) for c, r in capped.items()},
            }
        )
        if capped:
            print(f"  round {st.rounds}: norm_cap scales down {log[-1]['capped']} (× the median)", flush=True)
        top = max(norms, key=norms.__getitem__)
        if norms[top] > 10 * float(x.norm(dim=1).median()):  # one update far above the round's: a divergence
            print(f"  round {st.rounds}: client {top}'s update has norm {norms[top]:.1f}", flush=True)
        return out

    rule._inverted, rule._adopt, rule._scores, rule._combine = w_inverted, w_adopt, w_scores, w_combine  # type: ignore[method-assign]
    start = time.time()

    def progress(m: Any) -> None:
        log.append(
            {"kind": "metrics", "round": m.round, "accuracy": m.test_accuracy, "backdoor": m.backdoor_success}
        )
        r = next((e for e in reversed(log) if e["kind"] == "round"), None)
        if r is not None and m.round % 5 == 0:
            bd = "—" if m.backdoor_success is None else f"{m.backdoor_success:.2f}"  # none without an attack
            print(
                f"round {m.round}: label {r['label']}, out {r['attackers_out']} attackers + {r['honest_out']} "
                f"honest; accuracy {m.test_accuracy:.3f}, backdoor {bd} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        final = run_federation(cfg, progress=progress).final
    finally:
        rule._inverted, rule._adopt, rule._scores, rule._combine = inverted, adopt, scores, combine  # type: ignore[method-assign]
    result = {"accuracy": final.test_accuracy, "backdoor": final.backdoor_success}
    key = rb._key(args)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(json.dumps(result))
    return {
        "codec": codec,
        "uplink": args[0],
        "attack": attack,
        "seed": seed,
        "defense": defense,
        "attackers": sorted(attackers),
        "final": result,
        "log": log,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("codec", choices=sorted(rb.CODECS))
    ap.add_argument("seed", type=int)
    ap.add_argument("defense", help="a trigger_attribution spec, e.g. 'trigger_attribution(switch=latest)'")
    ap.add_argument("out", type=Path, help="where to write the JSON record")
    ap.add_argument("--rounds", type=int, default=80, help="80: the accept section's run")
    ap.add_argument(
        "--attack",
        default="backdoor:0.2",
        help="name:fraction (the accept section's by default); 'none': the clean section's run",
    )
    ap.add_argument(
        "--uplink", default=rb.DEFAULT_CODEC, help="the codec of 'default' (robustness.py's --uplink)"
    )
    a = ap.parse_args()
    record = trace(a.codec, a.seed, a.defense, a.rounds, a.attack, a.uplink)
    a.out.write_text(json.dumps(record))
    print("final", record["final"], "attackers", record["attackers"])


if __name__ == "__main__":
    main()

"""Candidate attribution scores, side by side, on one run of ``robustness.py accept`` (issue #21 diagnostics).

Runs the accept table's federation (:func:`robustness.config`) with a ``trigger_attribution`` spec and, in every
scored round, computes beside the rule's own score (the change of the trigger's loss towards ``t``, ``trig``)
candidate scores for each client's update, all with the rule's current trigger and label, without changing what
the rule decides:

* ``clean``: the change of the loss of the *unstamped* root inputs (labels other than ``t``) towards ``t``;
* ``diff``: ``trig − clean``;
* ``resid``: the residual of ``trig`` after a Theil–Sen line on ``clean`` across the round's clients;
* ``u_trig``, ``u_clean``, ``u_diff``: the same on a scoring copy of the global model from which the trigger
  was unlearned ``--unlearn-copy`` steps (the rule's unlearning recipe; the copy is never adopted);
* ``dir``: the cosine of the update with the gradient of the trigger's loss after projecting out the
  gradient of the clean inputs' loss towards ``t`` (planting the trigger without pushing clean inputs to ``t``).

Writes the per-round raw scores, the attackers and the final figures as JSON; ``--analyse`` reads such a file
and prints, per candidate, the attackers' mean rank per round window and the round from which a reputation
(summed z-scores, ``R/√k < −threshold``) would keep each attacker and each honest client out.

Usage::

    python benchmarks/robustness_score_probe.py identity 2 'trigger_attribution' probe.json
    python benchmarks/robustness_score_probe.py --analyse probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

CANDIDATES_V1 = ("trig", "clean", "diff", "resid", "u_trig", "u_clean", "u_diff", "dir")
CANDIDATES = tuple(
    [p + k for p in ("", "f_", "o_") for k in ("trig", "mtrig", "diff", "mdiff", "resid")]
    + ["clean", "mclean", "tt", "cres"]
)


def probe_run(codec: str, seed: int, defense: str, unlearn_copy: int, rounds: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import robustness as rb
    from deltaplane.aggregation import attribution as A
    from deltaplane.apps.runner import run_federation
    from deltaplane.engine.attacks import add_trigger, choose_malicious
    from deltaplane.engine.seeding import Stream, numpy_rng

    args = (rb.CODECS[codec], "backdoor:0.2", defense, seed, rounds)
    cfg = rb.config(args)
    attackers = {str(i) for i in choose_malicious(cfg.clients, 0.2, numpy_rng(seed, Stream.ATTACK))}
    log: list[dict[str, Any]] = []
    rule = A.BackdoorAttribution
    scores = rule._scores

    def invert_label(probe: Any, state: Any, t: int, steps: int, lam: float, seed: int) -> tuple[Any, Any]:
        """Neural Cleanse for label ``t`` alone on ``state`` (the rule's recipe, one label)."""
        x, y = probe.x, probe.y
        lo, hi = float(x.min()), float(x.max())
        gen = torch.Generator().manual_seed(seed)
        mask_l = (torch.randn((1, *x.shape[-2:]), generator=gen) * 0.1 - 2).requires_grad_(True)
        pat_l = (torch.randn(tuple(x.shape[1:]), generator=gen) * 0.1).requires_grad_(True)
        opt = torch.optim.Adam([mask_l, pat_l], lr=0.1)
        xo = x[y != t]
        target = torch.full((len(xo),), t, dtype=torch.long)
        frozen = {k: v.detach() for k, v in state.items()}
        for _ in range(steps):
            m, p = torch.sigmoid(mask_l), lo + (hi - lo) * torch.sigmoid(pat_l)
            loss = F.cross_entropy(probe.logits(frozen, (1 - m) * xo + m * p), target) + lam * m.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return torch.sigmoid(mask_l), lo + (hi - lo) * torch.sigmoid(pat_l)

    def extra(self: Any, probe: Any, like: Any, x: Any) -> dict[str, list[float]]:
        st = self.state
        t = st.label
        keep = probe.y != t
        clean_x = probe.x[keep]
        t_x = probe.x[~keep]
        target = torch.full((len(clean_x),), t, dtype=torch.long)
        t_target = torch.full((len(t_x),), t, dtype=torch.long)
        base = {k: v.detach() for k, v in probe.state.items()}
        norms = x.norm(dim=1)
        step = float(norms.median())
        fm, fp = invert_label(probe, base, t, self.steps, self.lam, st.rounds)
        triggers = {
            "": (1 - st.mask) * clean_x + st.mask * st.pattern,
            "f_": (1 - fm) * clean_x + fm * fp,
            "o_": add_trigger(clean_x),
        }
        out: dict[str, list[float]] = {}

        def margin(state: Any, inputs: Any) -> Any:
            lg = probe.logits(state, inputs)
            others = torch.cat([lg[:, :t], lg[:, t + 1 :]], dim=1)
            return lg[:, t] - torch.logsumexp(others, dim=1)

        def measures(state: Any) -> dict[str, float]:
            m: dict[str, float] = {
                "clean": float(F.cross_entropy(probe.logits(state, clean_x), target)),
                "mclean": float(margin(state, clean_x).mean()),
                "tt": float(F.cross_entropy(probe.logits(state, t_x), t_target)),
            }
            for pre, inputs in triggers.items():
                m[pre + "trig"] = float(F.cross_entropy(probe.logits(state, inputs), target))
                m[pre + "mtrig"] = float(margin(state, inputs).mean())
            return m

        with torch.no_grad():
            b = measures(base)
            rows = []
            for row, n in zip(x, norms.tolist(), strict=True):
                d = like.unflatten(row * (step / n if n > 0 else 0.0))
                m = measures({k: v + d[k] if k in d else v for k, v in base.items()})
                rows.append({k: m[k] - b[k] for k in m})
        for key in rows[0]:
            out[key] = [r[key] for r in rows]
        for pre in triggers:
            out[pre + "diff"] = [r[pre + "trig"] - r["clean"] for r in rows]
            # margins rise when an update plants: minus, so that negative is suspicious like the losses
            out[pre + "mdiff"] = [-(r[pre + "mtrig"] - r["mclean"]) for r in rows]
            out[pre + "mtrig"] = [-r[pre + "mtrig"] for r in rows]
            out[pre + "resid"] = A._theil_sen_residuals(out[pre + "trig"], out["clean"])
        out["mclean"] = [-v for v in out["mclean"]]
        out["cres"] = A._theil_sen_residuals(out["clean"], out["tt"])
        out["base"] = [b["trig"], b["clean"], b["f_trig"], b["o_trig"], float(fm.sum())]
        return out

    def w_scores(self: Any, probe: Any, like: Any, x: Any) -> Any:
        z = scores(self, probe, like, x)
        with torch.enable_grad():
            e = extra(self, probe, like, x)
        log.append(
            {"round": self.state.rounds, "label": self.state.label, "ids": list(self._ids), "scores": e}
        )
        return z

    rule._scores = w_scores  # type: ignore[method-assign]
    start = time.time()
    metrics: dict[int, Any] = {}

    def progress(m: Any) -> None:
        metrics[m.round] = (m.test_accuracy, m.backdoor_success)
        if m.round % 10 == 0:
            print(
                f"round {m.round}: accuracy {m.test_accuracy:.3f}, backdoor {m.backdoor_success:.2f} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        final = run_federation(cfg, progress=progress).final
    finally:
        rule._scores = scores  # type: ignore[method-assign]
    return {
        "codec": codec,
        "seed": seed,
        "defense": defense,
        "unlearn_copy": unlearn_copy,
        "dir_sign": 1,
        "candidates": list(CANDIDATES),
        "attackers": sorted(attackers),
        "final": {"accuracy": final.test_accuracy, "backdoor": final.backdoor_success},
        "metrics": metrics,
        "log": log,
    }


def analyse(record: dict[str, Any], threshold: float = 3.0) -> None:
    attackers = set(record["attackers"])
    print("final", record["final"], "attackers", sorted(attackers))
    for cand in record.get("candidates", CANDIDATES_V1):
        rep: dict[str, float] = {}
        seen: dict[str, int] = {}
        first_out: dict[str, int] = {}
        ranks: dict[int, list[float]] = {}
        for e in record["log"]:
            s = e["scores"][cand]
            if cand == "dir" and "dir_sign" not in record:  # the first record's ``dir`` had the sign flipped
                s = [-v for v in s]
            ids = e["ids"]
            srt = sorted(s)
            med = srt[len(s) // 2] if len(s) % 2 else 0.5 * (srt[len(s) // 2 - 1] + srt[len(s) // 2])
            mad = 1.4826 * sorted(abs(v - med) for v in s)[len(s) // 2]
            z = [max(-5.0, min(5.0, (v - med) / max(mad, 1e-12))) for v in s]
            order = sorted(range(len(s)), key=lambda i: s[i])
            ranks.setdefault(e["round"] // 10, []).extend(
                order.index(i) for i, c in enumerate(ids) if c in attackers
            )
            for c, zi in zip(ids, z, strict=True):
                rep[c] = rep.get(c, 0.0) + zi
                seen[c] = seen.get(c, 0) + 1
                if rep[c] / math.sqrt(seen[c]) < -threshold and c not in first_out:
                    first_out[c] = e["round"]
        att = {c: first_out.get(c) for c in sorted(attackers)}
        hon = {c: r for c, r in first_out.items() if c not in attackers}
        win = " ".join(f"{10 * k}s:{sum(v) / len(v):.1f}" for k, v in sorted(ranks.items()))
        print(f"{cand:8s} attacker mean rank (0 = most suspicious) {win}")
        print(f"         attackers first out {att}; honest first out {dict(sorted(hon.items()))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("codec", nargs="?")
    ap.add_argument("seed", nargs="?", type=int)
    ap.add_argument("defense", nargs="?")
    ap.add_argument("out", type=Path)
    ap.add_argument("--unlearn-copy", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--analyse", action="store_true", help="read OUT and print the comparison")
    ap.add_argument("--threshold", type=float, default=3.0)
    a = ap.parse_args()
    if a.analyse:
        analyse(json.loads(a.out.read_text()), a.threshold)
        return
    record = probe_run(a.codec, a.seed, a.defense, a.unlearn_copy, a.rounds)
    a.out.write_text(json.dumps(record))
    analyse(record, a.threshold)


if __name__ == "__main__":
    main()

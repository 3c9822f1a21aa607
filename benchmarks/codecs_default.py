"""Choosing ``deltaplane run``'s default uplink codec: the frontier's candidates on 30 paired seeds.

Issue #16 asks ``make run``'s default codec to be the best configuration (the most uplink compression) that stays
within 0.5 point of fp32. On the digits federation one seed's gap spans 2-3 points between seeds (the test set
has 360 images: one image is 0.28 point), so ``codecs_accuracy.py``'s 10 seeds leave a standard error near 0.3
point, larger than the margins this choice turns on. This script runs the candidates, fp32 and the previous
default on seeds 0..N-1 (``--seeds``, default 30) with ``codecs_accuracy.one`` (``deltaplane run``'s RunConfig
on the batched engine, 1 torch thread, only the listed options changed) and reports, per candidate, the mean
gap to fp32 (each seed against its own fp32 run) with its standard error, the worst seed, the paired difference
to the previous default (mean ± s.e., and on how many seeds it is better or worse) and the uplink ratio. The
verdict is the highest uplink ratio whose mean gap is within 0.5 point among the scale-free candidates (no
absolute local clip: ``deltaplane run`` applies its default's options to every task, and a clip threshold is one
model's update scale; the relative clip, a multiple of each device's own earlier update norms, is scale-free),
then the same among all rows, and within 1.0 point (the ≥ 300× target).

Run: ``nice -n 19 .venv/bin/python benchmarks/codecs_default.py [--seeds 30] [--jobs 2] [--resume]``
(not a timing measurement; about 10 CPU-seconds a run, 240 runs; ``--resume`` continues from /tmp)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codecs_accuracy import CLIP, FP32, MASK, PACKED, SELF, _best, _cell, _mean, _options, run_sweep

#: ``deltaplane run``'s default before this comparison (2026-12-06): stc(0.002) + MC + masking, compact frames
PREVIOUS = "stc(0.002) + MC + masking (the default until 2026-12-06)"
#: the relative local clip: κ times each device's own earlier update norms (engine.dgc.NormHistory); κ = 1.5
#: from a pilot on 4 hard seeds (24, 22, 5, 25) at κ = 1.5, 2 and 3, where 3 let stc(0.004) lose 2-3 points
RELATIVE = {"local_clip_relative": 1.5}
#: (label, RunConfig changes): fp32 first, then the previous default, then the candidates, sparsest first
ROWS = [
    (FP32, {"codec": "identity", **SELF}),
    (PREVIOUS, {"codec": "stc(0.002)", **PACKED, **MASK}),
    ("stc(0.002) + MC + masking + clip", {"codec": "stc(0.002)", **PACKED, **MASK, **CLIP}),
    ("stc(0.002) + MC + masking + relative clip", {"codec": "stc(0.002)", **PACKED, **MASK, **RELATIVE}),
    ("stc(0.003) + MC + masking + relative clip", {"codec": "stc(0.003)", **PACKED, **MASK, **RELATIVE}),
    ("stc(0.003) + MC + masking + clip", {"codec": "stc(0.003)", **PACKED, **MASK, **CLIP}),
    ("stc(0.004) + MC + masking", {"codec": "stc(0.004)", **PACKED, **MASK}),
    ("stc(0.004) + MC + masking + clip", {"codec": "stc(0.004)", **PACKED, **MASK, **CLIP}),
    ("stc(0.004) + MC + masking + relative clip", {"codec": "stc(0.004)", **PACKED, **MASK, **RELATIVE}),
    ("stc(0.006) + MC + masking", {"codec": "stc(0.006)", **PACKED, **MASK}),
    ("stc(0.008) + MC + masking", {"codec": "stc(0.008)", **PACKED, **MASK}),
]
#: why an absolute local clip cannot be the run's default: ``deltaplane run`` applies its default codec's options
#: to every task and model, and a clip at L2 norm 2.0 is this CNN's update scale (about the 80th percentile of
#: its devices' update norms in early rounds), not another model's; momentum correction, masking and the
#: relative clip (a multiple of each device's own earlier norms) are scale-free
SCALE_FREE = "candidates for the default are scale-free: no absolute local clip"
CACHE = Path("/tmp") / "deltaplane_codecs_default.jsonl"


def _se(xs: list[float]) -> float:
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5 if len(xs) > 1 else float("nan")


def main() -> None:
    from _record import record, table

    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 2
    n_seeds = int(sys.argv[sys.argv.index("--seeds") + 1]) if "--seeds" in sys.argv else 30
    if n_seeds < 2:
        sys.exit("--seeds must be at least 2 (a standard error needs two seeds)")
    seeds = range(n_seeds)
    done: dict[tuple[str, int], dict] = {}
    if "--resume" in sys.argv and CACHE.exists():
        for line in CACHE.read_text().splitlines():
            res = json.loads(line)
            done[res["label"], res["seed"]] = res
    elif CACHE.exists():
        CACHE.unlink()
    todo = [
        ("frontier", label, changes, s) for s in seeds for label, changes in ROWS if (label, s) not in done
    ]
    run_sweep(todo, CACHE, done, jobs)
    missing = [(label, s) for label, _ in ROWS for s in seeds if (label, s) not in done]
    if missing:
        sys.exit(f"{len(missing)} runs missing (first: {missing[0]}); rerun with --resume")
    base_up = _mean([done[FP32, s]["uplink"] for s in seeds])
    base_acc = _mean([done[FP32, s]["accuracy"] for s in seeds])
    points, rows = [], []
    for label, changes in ROWS[1:]:
        gaps = [100 * (done[label, s]["accuracy"] - done[FP32, s]["accuracy"]) for s in seeds]
        diffs = [100 * (done[label, s]["accuracy"] - done[PREVIOUS, s]["accuracy"]) for s in seeds]
        up = base_up / _mean([done[label, s]["uplink"] for s in seeds])
        p = {
            "label": label,
            "changes": changes,
            "up": up,
            "gap": _mean(gaps),
            "se": _se(gaps),
            "worst": min(gaps),
        }
        points.append(p)
        vs_prev = (
            "—"
            if label == PREVIOUS
            else f"{_mean(diffs):+.2f} ± {_se(diffs):.2f} "
            f"(better on {sum(d > 0 for d in diffs)}, worse on {sum(d < 0 for d in diffs)})"
        )
        rows.append([
            _cell(label), _cell(_options(changes)), f"{up:,.0f}×",
            f"{_mean([done[label, s]['accuracy'] for s in seeds]):.4f}", f"{p['gap']:+.2f}", f"{p['se']:.2f}",
            f"{p['worst']:+.2f}", f"{sum(g >= -1.0 for g in gaps)} of {n_seeds}", vs_prev,
        ])  # fmt: skip
    verdicts = []
    for within, pool, what in (
        (
            0.5,
            [p for p in points if "local_clip" not in p["changes"]],
            f" ({SCALE_FREE})",
        ),  # relative: scale-free
        (0.5, points, ", any option"),
        (1.0, points, ", any option"),
    ):
        ok = [p for p in pool if -p["gap"] <= within + 1e-9]
        if not ok:
            verdicts.append(f"Within {within} point of fp32 on the mean gap{what}: **none** of these.")
            continue
        best = _best(ok, "up")  # ratios within 1% tie, and the better mean gap wins
        verdicts.append(
            f"Most compression within {within} point of fp32 on the {n_seeds}-seed mean gap{what}: "
            f"`{best['label']}` at **{best['up']:,.0f}×** fewer uplink bytes (mean gap {best['gap']:+.2f} ± "
            f"{best['se']:.2f}, worst seed {best['worst']:+.2f})."
            + (f" Target ≥ 300×: {'met' if best['up'] >= 300 else '**not met**'}." if within == 1.0 else "")
        )
    from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC

    verdicts.append(
        f"`deltaplane run`'s default now: `{DEFAULT_RUN_CODEC}` with "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_RUN_DGC.items())
        + " and compact, entropy-coded frames."
    )
    body = (
        f"`deltaplane run`'s federation (20 non-IID digits clients, Dirichlet α=0.5, 120 rounds, 2 local epochs, "
        f"uplink error feedback, the batched engine, DigitsCNN) on seeds 0–{n_seeds - 1}; every candidate runs "
        "on the same seeds as fp32 and the previous default, so each gap and each difference is paired by seed "
        f"(fp32 mean accuracy {base_acc:.4f}). Gap: a seed's accuracy minus that seed's fp32 run, in points "
        "(one test image is 0.28 point); ± s.e.: the standard error of the mean over the seeds. MC = DGC "
        "momentum correction 0.5, masking = momentum factor masking, clip = local clipping at L2 norm 2.0, "
        f"relative clip = each device's update scaled down to {RELATIVE['local_clip_relative']} times an average "
        "of its own earlier update norms (none on its first round; scale-free); every "
        "candidate uses compact, entropy-coded frames. Issue #16: `make run`'s default is the configuration with "
        "the most uplink compression whose mean gap is within 0.5 point; "
        "the candidates for it are scale-free (`deltaplane run` applies its default codec's options to every "
        "task and model, and a local clip at L2 norm 2.0 is this CNN's update scale, not another model's; a "
        "relative clip is scale-free).\n\n"
        + table(
            [
                "configuration",
                "options",
                "uplink ratio",
                "mean final test acc",
                "mean gap (points)",
                "± s.e.",
                "worst seed",
                "seeds within 1 point",
                "minus the previous default (points)",
            ],
            rows,
        )
        + "\n\n"
        + "\n\n".join(verdicts)
    )
    command = "nice -n 19 python benchmarks/codecs_default.py" + (
        f" --seeds {n_seeds}" if n_seeds != 30 else ""
    )
    title = f"Choosing `deltaplane run`'s default codec: {n_seeds} paired seeds"
    record("codecs_default", title, body, command=command)
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()

"""Bytes vs accuracy on the digits federation: an ablation of the compression frontier, both directions.

Each run is ``deltaplane run``'s default RunConfig (20 non-IID clients, 120 rounds, error feedback on, the
batched engine, 1 torch thread) with only the listed options changed, on seeds 0..N-1 (``--seeds N``, default 10;
the seed draws the partition, the initial model and every round). Rows:

* **ablation** — one technique at a time on ``stc(0.002)`` with self-describing frames: the compact session
  header (``wire=compact``), entropy coding of its fields (``entropy_coding``), and DGC's device-side
  techniques (Lin et al. 2018): momentum correction, local clipping, momentum factor masking (on top of
  momentum correction, which it needs), sparsity warm-up;
* **frontier** — combinations, and earlier defaults for reference;
* **downlink** — ``stc(0.002)`` + MC + masking (``deltaplane run``'s default uplink until 2026-12-06) with a
  compressed downlink (server-side error feedback).

Reported per configuration, over the seeds: the mean final test accuracy, the mean and the worst gap to fp32
(each seed's accuracy minus that seed's fp32 run, in points) with the mean gap's standard error, and mean
uplink, downlink and total bytes (real payload lengths over all clients and rounds, framing included; downlink:
the broadcast payload counted once per receiving client), each as a ratio to the fp32 run's (``identity`` both
ways, self-describing frames, no DGC option). The best configuration is the one with the highest uplink ratio
whose MEAN gap is within 1.0 point of fp32 (ratios within 1% of each other count as tied: the best mean gap
wins); the line below it, the best within 0.5 point on the mean (what ``make run``'s default aims at; the default itself
is chosen on 30 paired seeds by ``codecs_default.py``); both
lines name the worst seed's gap too. Writes a table into docs/benchmarks.md and a plot of the accuracy-vs-bytes
Pareto frontier (uplink, downlink, total) to docs/codecs_accuracy.png (``--large``:
docs/codecs_accuracy_large.png).

``--large`` runs the same federation with the digits task's 1.08M-parameter ``cnn_wide`` model instead
(target: within 1 point of fp32 at ≥ 1,000× fewer uplink bytes), recorded under ``codecs_accuracy_large``.

Run: ``nice -n 19 .venv/bin/python benchmarks/codecs_accuracy.py [--seeds 10] [--large] [--jobs 2] [--resume]``
(not a timing measurement; about 10 CPU-seconds a batched run on the default model, 20-25 CPU-minutes the
default sweep; ``--large`` runs 1 seed unless told more; ``--resume`` continues an interrupted sweep from /tmp,
``--only-record`` records what has run: a configuration short of some seeds is reported with the seeds it has,
and says so)."""

from __future__ import annotations

import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path(__file__).resolve().parent.parent / "docs"
FP32 = "fp32 (identity both ways)"
#: the row of ``deltaplane run``'s default (deltaplane.cli.DEFAULT_RUN_CODEC with DEFAULT_RUN_DGC, compact frames;
#: chosen on 30 paired seeds by benchmarks/codecs_default.py)
DEFAULT = "stc(0.006) + compact/entropy + MC + masking"
SELF = {"wire": "self-describing"}  # the frames every payload used before compact sessions
PLAIN = {"wire": "compact", "entropy_coding": False}
PACKED = {"wire": "compact", "entropy_coding": True}
MC = {"momentum_correction": 0.5}
MASK = {"momentum_correction": 0.5, "momentum_masking": True}
CLIP = {"local_clip": 2.0}  # about the 80th percentile of the devices' update norms in early rounds
WARM = {"sparsity_warmup": 4}

#: downlink codecs (server-side error feedback): dense 8-bit, and sparse at about the density of the mean of
#: 20 devices' 0.2% updates (their union: up to 4% of the coordinates)
DOWNLINKS = ["quant(bits=8)", "topk(0.05) | quant(bits=8)", "stc(0.02)"]
#: (group, label, RunConfig changes); the fp32 baseline first
SMALL = [
    ("baseline", FP32, {"codec": "identity", **SELF}),
    ("ablation", "stc(0.002)", {"codec": "stc(0.002)", **SELF}),
    ("ablation", "+ compact header", {"codec": "stc(0.002)", **PLAIN}),
    ("ablation", "+ compact header + entropy coding", {"codec": "stc(0.002)", **PACKED}),
    ("ablation", "+ momentum correction 0.5", {"codec": "stc(0.002)", **SELF, **MC}),
    ("ablation", "+ local clip 2.0", {"codec": "stc(0.002)", **SELF, **CLIP}),
    ("ablation", "+ momentum correction + masking", {"codec": "stc(0.002)", **SELF, **MASK}),
    ("ablation", "+ warm-up 4 rounds", {"codec": "stc(0.002)", **SELF, **WARM}),
    ("frontier", "stc(0.002) + compact/entropy + MC + masking", {"codec": "stc(0.002)", **PACKED, **MASK}),
    (
        "frontier",
        "stc(0.002) + compact/entropy + all four DGC",
        {"codec": "stc(0.002)", **PACKED, **MASK, **CLIP, **WARM},
    ),
    ("frontier", "stc(0.001) + compact/entropy + MC + masking", {"codec": "stc(0.001)", **PACKED, **MASK}),
    (
        "frontier",
        "topk(0.01) | quant(bits=8) (earlier make run default)",
        {"codec": "topk(0.01) | quant(bits=8)", **SELF},
    ),
    ("frontier", "stc(0.01) (earlier best within 1 point)", {"codec": "stc(0.01)", **SELF}),
    *(
        (
            "downlink",
            f"stc(0.002) + compact/entropy + MC + masking, downlink {down}",
            {"codec": "stc(0.002)", **PACKED, **MASK, "downlink_codec": down},
        )
        for down in DOWNLINKS
    ),
    # candidates for the 0.5-point line on the mean: a denser STC (fewer rounds' worth of residual held back),
    # and local clipping, the technique that helped most alone, without warm-up's dense early rounds
    ("frontier", "stc(0.003) + compact/entropy + MC + masking", {"codec": "stc(0.003)", **PACKED, **MASK}),
    ("frontier", "stc(0.004) + compact/entropy + MC + masking", {"codec": "stc(0.004)", **PACKED, **MASK}),
    ("frontier", DEFAULT, {"codec": "stc(0.006)", **PACKED, **MASK}),
    (
        "frontier",
        "stc(0.002) + compact/entropy + MC + masking + clip",
        {"codec": "stc(0.002)", **PACKED, **MASK, **CLIP},
    ),
]
#: the order a sweep runs in, so that an interrupted one has the rows that matter on every seed: the
#: baseline, then the frontier, the downlink rows, the ablation (the earlier defaults last)
PRIORITY = {"baseline": 0, "frontier": 1, "downlink": 2, "ablation": 3}
WIDE = {"task_options": {"model": "cnn_wide"}}
LARGE = [
    ("baseline", FP32, {**WIDE, "codec": "identity", **SELF}),
    ("frontier", "stc(0.001)", {**WIDE, "codec": "stc(0.001)", **SELF}),
    # the options of `deltaplane run`'s default (DEFAULT_RUN_DGC, compact entropy-coded frames) at the same density
    ("frontier", "stc(0.001) + MC + masking", {**WIDE, "codec": "stc(0.001)", **PACKED, **MASK}),
]  # fmt: skip


def one(item: tuple[str, str, dict, int]) -> dict:
    import torch

    from deltaplane.sim import RunConfig, run_simulation

    torch.set_num_threads(1)
    _group, label, changes, seed = item
    t = time.process_time()
    config = RunConfig().replace(engine="batched", threads=1, seed=seed, **changes)
    r = run_simulation(config).to_dict()
    return {
        "label": label,
        "seed": seed,
        "accuracy": r["final"]["test_accuracy"],
        "uplink": r["final"]["cumulative_uplink_bytes"],
        "downlink": r["final"]["cumulative_downlink_bytes"],
        "cpu_s": time.process_time() - t,
    }


def main() -> None:
    from _record import record, table

    large = "--large" in sys.argv
    runs = LARGE if large else SMALL
    jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 2
    n_seeds = int(sys.argv[sys.argv.index("--seeds") + 1]) if "--seeds" in sys.argv else (1 if large else 10)
    if n_seeds < 1:
        sys.exit("--seeds must be at least 1 (the seeds run are 0..N-1)")
    seeds = range(n_seeds)
    cache = Path("/tmp") / f"deltaplane_codecs_accuracy_batched{'_large' if large else ''}.jsonl"
    done: dict[tuple[str, int], dict] = {}
    if "--resume" in sys.argv and cache.exists():
        for line in cache.read_text().splitlines():
            res = json.loads(line)
            done[res["label"], res["seed"]] = res
    todo = [(*r, seed) for seed in seeds for r in runs if (r[1], seed) not in done]
    # seed-major within each priority class: an interrupted sweep has its key rows on every seed
    todo.sort(key=lambda r: (PRIORITY[r[0]], "earlier" in r[1], r[3]))
    if "--only-record" in sys.argv:  # record what has run so far (a partial sweep says so)
        todo = []
    run_sweep(todo, cache, done, jobs)
    base_seeds = [s for s in seeds if (FP32, s) in done]
    if not base_seeds:
        sys.exit("no fp32 run has finished: nothing to compare with")
    base = {k: _mean([done[FP32, s][k] for s in base_seeds]) for k in ("accuracy", "uplink", "downlink")}
    rows, points, short = [], [], []
    for group, label, changes in runs:
        have = [s for s in base_seeds if (label, s) in done]
        if not have:
            continue
        if len(have) < n_seeds:
            short.append(f"{_cell(label)} (seeds {', '.join(map(str, have))})")
        rs = [done[label, s] for s in have]
        acc = _mean([r["accuracy"] for r in rs])
        gaps = [100 * (done[label, s]["accuracy"] - done[FP32, s]["accuracy"]) for s in have]
        gap, worst = _mean(gaps), min(gaps)
        se = (
            (sum((g - gap) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps)) ** 0.5
            if len(gaps) > 1
            else None
        )
        uplink, downlink = _mean([r["uplink"] for r in rs]), _mean([r["downlink"] for r in rs])
        up, down = base["uplink"] / uplink, base["downlink"] / downlink
        total = (base["uplink"] + base["downlink"]) / (uplink + downlink)
        points.append(
            {
                "group": group,
                "label": label,
                "acc": acc,
                "up": up,
                "down": down,
                "total": total,
                "gap": gap,
                "worst": worst,
                "seeds": len(have),
            }
        )
        rows.append([
            group, _cell(label), _cell(_options(changes)), f"{acc:.4f}", f"{gap:+.2f}",
            "–" if se is None else f"{se:.2f}", f"{worst:+.2f}",
            " / ".join(f"{g:+.2f}" for g in gaps), f"{uplink:,.0f}", f"{up:,.0f}×", f"{downlink:,.0f}",
            f"{down:,.1f}×", f"{uplink + downlink:,.0f}", f"{total:,.1f}×",
        ])  # fmt: skip
    base_accs = " / ".join(f"{done[FP32, s]['accuracy']:.4f}" for s in base_seeds)
    target = 1000 if large else 300
    verdicts = []
    for within, what in (
        (1.0, f"Target ≥ {target:,}×"),
        *(() if large else ((0.5, "`make run`'s default"),)),
    ):
        best = _best([p for p in points if -p["gap"] <= within + 1e-9], "up")
        line = (
            f"Best within {within} point of fp32 on the mean gap: `{best['label']}` at **{best['up']:,.0f}×** "
            f"fewer uplink bytes ({best['total']:,.1f}× total; mean accuracy {best['acc']:.4f} vs "
            f"{base['accuracy']:.4f}, mean gap {best['gap']:+.2f}, worst seed {best['worst']:+.2f} points)."
        )
        if within == 1.0:
            line += f" {what}: " + ("met on the mean." if best["up"] >= target else "**not met**.")
            if best["up"] >= target and -best["worst"] > within + 1e-9:
                line += f" Its worst seed is more than {within} point behind."
        verdicts.append(line)
    default = next((p for p in points if p["label"] == DEFAULT), None)
    if default is not None:  # deltaplane run's own default: where it stands on the same seeds
        verdicts.append(
            f"`deltaplane run`'s default (`{DEFAULT}`): {default['up']:,.0f}× fewer uplink bytes at a mean gap "
            f"of {default['gap']:+.2f} points (worst seed {default['worst']:+.2f}): "
            + ("within" if -default["gap"] <= 0.5 + 1e-9 else "**not** within")
            + " 0.5 point, "
            + ("within" if -default["gap"] <= 1.0 + 1e-9 else "**not** within")
            + " 1.0 point of fp32 on the mean."
        )
    both = _best([p for p in points if -p["gap"] <= 1.0 + 1e-9], "total")
    verdicts.append(
        f"Both directions, within 1.0 point on the mean gap: `{both['label']}` at **{both['total']:,.1f}×** "
        f"fewer total bytes (uplink {both['up']:,.0f}×, downlink {both['down']:,.1f}×; mean accuracy "
        f"{both['acc']:.4f}, mean gap {both['gap']:+.2f}, worst seed {both['worst']:+.2f} points)."
    )
    png = OUT / ("codecs_accuracy_large.png" if large else "codecs_accuracy.png")
    _plot(points, base["accuracy"], png, large=large)
    missing = [label for _, label, _ in runs if not any((label, s) in done for s in base_seeds)]
    what = (
        "the 1.08M-parameter `cnn_wide` model of the digits task"
        if large
        else "the default DigitsCNN (18,346 parameters)"
    )
    body = (
        f"Default federation (20 non-IID clients, Dirichlet α=0.5, 120 rounds, 2 local epochs, uplink "
        f"error feedback on) on {what}, on the batched engine (what `deltaplane run` uses; it equals the "
        "sequential loop up to float32 rounding, which 120 rounds of top-k grow into a different federation, "
        "so a single seed's gap moves by a point between the engines), each configuration on "
        + (
            f"seeds 0–{n_seeds - 1}"
            if n_seeds > 1
            else "seed 0 only (one seed: a gap below a point or so is noise)"
        )
        + f" (fp32: {base_accs}); only the listed options differ between runs. Accuracy is the mean "
        "over the seeds; the gap is each seed's accuracy minus that seed's fp32 run, in points: the mean, the "
        "worst seed, and every seed (± s.e.: the mean gap's standard error over the seeds). The test set has "
        "360 images: one image is 0.28 point. The lines under the table choose by the MEAN gap (uplink ratios "
        "within 1% of each other tie, and the better mean gap wins) and name the worst seed's gap. Bytes are "
        "means over the seeds of real payload "
        "lengths over all clients and rounds, framing included; downlink bytes count the broadcast payload "
        "once per receiving client. Ratios are to the fp32 run (`identity` both ways, self-describing frames). "
        + ("" if large else ABLATION)
        + "\n\n"
        + table(
            [
                "group",
                "configuration",
                "options",
                "mean final test acc",
                "mean gap (points)",
                "± s.e.",
                "worst seed",
                "gap per seed",
                "uplink bytes",
                "uplink ratio",
                "downlink bytes",
                "downlink ratio",
                "total bytes",
                "total ratio",
            ],
            rows,
        )
        + "\n\n"
        + "\n\n".join(verdicts)
        + ("" if large else "\n\n" + SEEDS_NOTE)
        + f"\n\n![accuracy vs bytes: Pareto frontier]({png.name})"
        + ("\n\nNot run (out of time): " + ", ".join(_cell(m) for m in missing) + "." if missing else "")
        + ("\n\nShort of seeds (out of time): " + ", ".join(short) + "." if short else "")
    )
    # the command that reproduces the figures (a sweep may have been resumed or recorded in several sittings)
    command = "nice -n 19 python benchmarks/codecs_accuracy.py" + (" --large" if large else "")
    command += f" --seeds {n_seeds}" if n_seeds != 1 or not large else ""
    if large:
        title = "Bytes vs accuracy on a 1.08M-parameter model (cnn_wide)"
        record("codecs_accuracy_large", title, body, command=command)
    else:
        title = "Bytes vs accuracy: the compression frontier on the digits federation"
        record("codecs_accuracy", title, body, command=command)
    print("\n".join(verdicts))


ABLATION = (
    "Ablation rows add one technique to `stc(0.002)` with self-describing frames (masking needs momentum "
    "correction, so its row has both); MC = DGC momentum correction 0.5, masking = momentum factor masking, "
    "clip = local clipping at L2 norm 2.0, warm-up = sparsity warm-up over 4 rounds (`deltaplane.engine.dgc`). "
    "The compact header and entropy coding are lossless: they change bytes, never accuracy. Downlink rows "
    "compress the server's update with server-side error feedback."
)


SEEDS_NOTE = (
    "Until 2026-12-06 this section ran one seed (seed 0) on the sequential engine, where the default scored "
    "+0.3 point at 575× and was reported as the best within 0.5 point; on the batched engine the same seed "
    "gives −0.84, and across seeds one configuration's gap spans 2–3 points (a few test images), so a "
    "0.5-point line needs the mean of several seeds, and even 10 leave a standard error near 0.3 point. "
    "`deltaplane run`'s default is therefore chosen on 30 paired seeds (benchmarks/codecs_default.py: "
    "[its section](#choosing-deltaplane-runs-default-codec-30-paired-seeds))."
)


def run_sweep(todo: list[tuple[str, str, dict, int]], cache: Path, done: dict, jobs: int) -> None:
    """Run every ``(group, label, changes, seed)`` of ``todo`` on ``jobs`` processes; each result goes into
    ``done`` and is appended to ``cache`` as it finishes, so that ``--resume`` continues an interrupted sweep."""
    with Pool(jobs) as pool, cache.open("a") as f:
        for res in pool.imap_unordered(one, todo):
            done[res["label"], res["seed"]] = res
            f.write(json.dumps(res) + "\n")
            f.flush()
            print(
                f"seed {res['seed']} {res['label']}: acc {res['accuracy']:.4f} up {res['uplink']:,} "
                f"down {res['downlink']:,} ({res['cpu_s']:.0f} CPU s)",
                flush=True,
            )


def _best(points: list[dict], key: str) -> dict:
    """The point with the highest ratio ``key``; ratios within 1% of it count as tied (the same codec in other
    frames, or with another option, differs by a few bytes), and the best mean gap among those wins."""
    top = max(p[key] for p in points)
    return max((p for p in points if p[key] >= top / 1.01), key=lambda p: p["gap"])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _options(changes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in changes.items() if k != "task_options")


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"  # a bare | would split the markdown cell


def _frontier(xy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (ratio, accuracy) points: no other point has both a higher ratio and accuracy."""
    best, out = -1.0, []
    for x, y in sorted(xy, key=lambda p: (-p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return sorted(out)


def _plot(points: list[dict], base_acc: float, path: Path, *, large: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for n, p in enumerate(points, 1):
        p["n"] = n
    fig, axes = plt.subplots(1, 3, figsize=(16, 7.5), sharey=True)
    colours = {"baseline": "black", "ablation": "tab:blue", "frontier": "tab:green", "downlink": "tab:orange"}
    for ax, key, name in zip(
        axes, ("up", "down", "total"), ("uplink", "downlink", "total (both ways)"), strict=True
    ):
        for p in points:
            ax.scatter(p[key], p["acc"], s=25, color=colours[p["group"]])
            ax.annotate(
                str(p["n"]), (p[key], p["acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        front = _frontier([(p[key], p["acc"]) for p in points])
        ax.plot([x for x, _ in front], [y for _, y in front], color="grey", lw=0.8, label="Pareto frontier")
        ax.axhline(base_acc - 0.01, color="grey", ls="--", lw=0.8, label="fp32 − 1 point (means)")
        if key == "up":
            ax.axvline(1000 if large else 300, color="red", ls=":", lw=0.8, label="target")
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} bytes: ratio vs fp32 (log)")
        ax.legend(loc="lower left", fontsize=7)
    axes[0].set_ylabel("final test accuracy (mean over seeds)")
    model = "cnn_wide, 1.08M params" if large else "DigitsCNN, 18k params"
    fig.suptitle(f"deltaplane: accuracy vs bytes on non-IID digits (20 clients, 120 rounds, {model})")
    key_text = "\n".join(f"{p['n']}: {p['label']}" for p in points)
    fig.text(0.01, 0.01, key_text, fontsize=7, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, 0.03 + 0.018 * len(points), 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()

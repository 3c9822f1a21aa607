"""Bytes vs accuracy: every codec (and several pipelines) on the default digits federation, same seeds.

Each run is ``deltaplane run``'s default RunConfig (20 non-IID clients, 120 rounds, seed 0, error feedback on)
with only the uplink codec changed (rows marked "[no EF]": the same codec with error feedback off — the codecs
that are not contractions, with which error feedback diverges); the downlink stays fp32. Reported: final test accuracy, total uplink bytes
(real payload lengths, headers included), the ratio to the fp32 baseline's uplink, and the accuracy gap.
The best configuration is the one with the highest ratio whose accuracy is within 1.0 point of fp32.
Writes a table into docs/benchmarks.md and a plot to docs/codecs_accuracy.png.

Run: ``.venv/bin/python benchmarks/codecs_accuracy.py`` (about 15 CPU-minutes; 3 runs at a time; `--resume` continues an interrupted sweep).
"""

from __future__ import annotations

import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BASELINE = "identity"
NO_EF = " [no EF]"  # suffix: the same codec with error feedback off (for codecs that are not contractions)
SPECS = [  # the fp32 baseline and the high-ratio candidates first, then every other codec
    BASELINE,
    "stc(0.003)",
    "topk(0.003) | quant(bits=4)",
    "stc(0.005)",
    "topk(0.01) | quant(bits=8)",
    "stc(0.01)",
    "topk(0.01) | quant(bits=4) | zstd",
    "policy(rules='*.bias: quant(bits=8); *: stc(0.005)')",
    "powersgd(rank=2) | quant(bits=8)",
    "fp16",
    "bf16",
    "quant(bits=8)",
    "quant(bits=4)",
    "quant(bits=2, stochastic=true)",
    "quant(bits=4, stochastic=true, scale=norm)",
    "quant(bits=4, stochastic=true, scale=norm)" + NO_EF,
    "sign",
    "ternary",
    "ternary" + NO_EF,
    "topk(0.01)",
    "topk(0.01, approx=true)",
    "randk(0.01)",
    "threshold(tau=0.01)",
    "powersgd(rank=2)",
]
OUT = Path(__file__).resolve().parent.parent / "docs"


def one(spec: str) -> dict:
    from deltaplane.sim import RunConfig, run_simulation

    t = time.process_time()
    codec = spec.removesuffix(NO_EF)
    r = run_simulation(RunConfig().replace(codec=codec, error_feedback=codec == spec)).to_dict()
    return {
        "spec": spec,
        "accuracy": r["final"]["test_accuracy"],
        "uplink": r["final"]["cumulative_uplink_bytes"],
        "cpu_s": time.process_time() - t,
    }


def main() -> None:
    from _record import record, table
    from deltaplane.sim import RunConfig

    cache = Path("/tmp") / "deltaplane_codecs_accuracy.jsonl"
    done = {}
    if "--resume" in sys.argv and cache.exists():
        done = {json.loads(line)["spec"]: json.loads(line) for line in cache.read_text().splitlines()}
    todo = [s for s in SPECS if s not in done]
    if "--only-record" in sys.argv:  # record what has run so far (a partial sweep says so)
        todo = []
    with Pool(3) as pool, cache.open("a") as f:
        for res in pool.imap_unordered(one, todo):
            done[res["spec"]] = res
            f.write(json.dumps(res) + "\n")
            f.flush()
            print(f"{res['spec']}: acc {res['accuracy']:.4f} uplink {res['uplink']:,}", flush=True)
    base = done[BASELINE]
    rows, points = [], []
    missing = [s for s in SPECS if s not in done]
    for spec in SPECS:
        if spec not in done:
            continue
        r = done[spec]
        ratio = base["uplink"] / r["uplink"]
        gap = 100 * (r["accuracy"] - base["accuracy"])
        points.append((spec, ratio, r["accuracy"]))
        rows.append(
            [
                _cell(spec),
                f"{r['accuracy']:.4f}",
                f"{gap:+.1f}",
                f"{r['uplink']:,}",
                f"{ratio:.1f}×",
            ]
        )
    ok = [(ratio, spec, acc) for spec, ratio, acc in points if 100 * (base["accuracy"] - acc) <= 1.0]
    best_ratio, best_spec, best_acc = max(ok)
    cfg = RunConfig()
    verdict = (
        f"Best configuration within 1.0 point of fp32: `{best_spec}` at **{best_ratio:.0f}×** fewer uplink bytes "
        f"(accuracy {best_acc:.4f} vs {base['accuracy']:.4f}). Target ≥ 300×: "
        + ("met." if best_ratio >= 300 else "**not met**.")
    )
    _plot(points, base["accuracy"], OUT / "codecs_accuracy.png")
    body = (
        f"Default federation: {cfg.clients} non-IID clients (Dirichlet α={cfg.alpha}), {cfg.rounds} rounds, "
        f"{cfg.local_epochs} local epochs, seed {cfg.seed}, uplink error feedback on, downlink fp32; only the "
        "uplink codec differs between runs. Uplink bytes are real payload lengths over all clients and rounds "
        "(frame and header included); the ratio is to the fp32 (`identity`) run's uplink. Rows marked "
        "`[no EF]` run that codec with error feedback off: `ternary` and norm-scaled stochastic `quant` are not "
        "contractions (their error can exceed the update), error feedback accumulates it and the run falls to "
        "chance, which is why `Compressor` warns about that combination.\n\n"
        + table(["uplink codec", "final test acc", "vs fp32 (points)", "uplink bytes", "ratio vs fp32"], rows)
        + f"\n\n{verdict}\n\n![bytes vs accuracy](codecs_accuracy.png)"
        + ("\n\nNot run (out of time): " + ", ".join(_cell(m) for m in missing) + "." if missing else "")
    )
    record("codecs_accuracy", "Bytes vs accuracy: every codec on the digits federation", body)
    print(verdict)


def _cell(spec: str) -> str:
    return "`" + spec.replace("|", "\\|") + "`"  # a bare | would split the markdown cell


def _plot(points: list[tuple[str, float, float]], base_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for spec, ratio, acc in points:
        ax.scatter(ratio, acc, s=25)
        ax.annotate(spec, (ratio, acc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(base_acc - 0.01, color="grey", ls="--", lw=0.8, label="fp32 − 1 point")
    ax.axvline(300, color="red", ls=":", lw=0.8, label="300× target")
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes: ratio vs fp32 (log)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("deltaplane codecs on non-IID digits (20 clients, 120 rounds)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()

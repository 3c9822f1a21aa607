"""Robust aggregation on deltaplane's own federation (issue #21): attacks × defences, measured on the engine.

Every figure comes from :func:`deltaplane.apps.runner.run_federation` — the federation ``deltaplane run`` runs —
with its defaults (20 non-IID clients, DigitsCNN, Dirichlet(0.5), 2 local epochs at lr 0.2) and
``engine="batched"`` with one torch thread. Backdoor success = share of test images of other classes that,
stamped with the full 2×2 trigger, are classified as the target class 0. Sections:

* ``accept``: 80 rounds, 20% ``backdoor`` attackers, seeds 0..2, ``stc(0.002)`` with DGC momentum correction 0.5
  and momentum masking (``deltaplane run``'s default codec until 2026-12-06: :data:`DEFAULT_CODEC`) and ``identity``: clean
  FedAvg, undefended, and the candidate defences (``--best``). A seed passes when the defence is within 2 points
  of that seed's clean run and backdoor success ≤ 10%.
* ``clean``: 80 rounds, no attacker, seed 0: every defence against FedAvg, with the default codec (``identity``
  for the rules refused over sparsifying codecs).
* ``grid``: attack × defence × {10, 20, 30}% with the default codec, seed 0, ``--grid-rounds`` rounds (80 by
  default; the section says how many), ``--defenses`` the columns (:data:`GRID_DEFENSES` by default: every rule
  valid over the sparsifying codec, ``sign_vote``, ``geometric_median`` and ``centered_clip`` included since
  2026-12-07). The default grid is 91 federation runs (one clean, 9 cells × 10 defences): at 25–60 s a run on the
  2-core dev machine under load 5–13 (2026-12-07), about one to one and a half hours with ``--workers 1``.
  ``--grid-seeds N`` measures seeds 0..N-1: each cell per seed, and over the seeds its mean accuracy and in how
  many seeds the backdoor got in (success above 0.5; at 30% attackers one seed's cell can read 0.00 and the next
  0.9+).

``--uplink SPEC`` measures any section with another codec in the default codec's place, still with
:data:`DEFAULT_DGC` (e.g. ``stc(0.006)``, ``deltaplane run``'s default from 2026-12-06); its runs are cached under
names of their own (:func:`uplink`). ``accept --codecs default`` leaves out the ``identity`` half, which does not
depend on the uplink.

Finished runs are cached in ``.bench-cache/robustness-engine/<code fingerprint>/`` so a rerun on the same code only
computes what is missing (other code's results are not reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from multiprocessing import Pool
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import code_fingerprint

if TYPE_CHECKING:
    from deltaplane.engine.config import RunConfig

#: the uplink every robustness section is measured with: ``deltaplane run``'s default until 2026-12-06 (its codec and
#: the DGC options that went with it), named here rather than imported from ``deltaplane.cli`` so that moving the
#: run's default never silently changes what a recorded section measures
DEFAULT_CODEC = "stc(0.002)"
DEFAULT_DGC = {"momentum_correction": 0.5, "momentum_masking": True}
CODECS = {"default": DEFAULT_CODEC, "identity": "identity"}
#: how a job names a codec run with :data:`DEFAULT_DGC` other than :data:`DEFAULT_CODEC` (which carries them bare,
#: as it did before ``--uplink``, so that its cached and recorded runs keep their names)
DGC_MARK = "+dgc"
GRID_ATTACKS = ["backdoor", "bounded_backdoor", "dba"]
#: the grid's columns by default (and the clean table's rules): every rule valid over the sparsifying default codec
GRID_DEFENSES = [
    "none",
    "foolsgold",
    "flame",
    "fltrust",
    "multi_krum(4)",
    "norm_bound(adaptive)",
    "trigger_attribution",
    "sign_vote",
    "geometric_median",
    "centered_clip",
]
#: settings measured without attackers beside the grid's: a variant, and the norm bound with Sun et al.'s weak DP
CLEAN_EXTRA = [
    "foolsgold(binary=true)",
    "norm_bound(adaptive, noise=0.001)",
    "trigger_attribution(sticky=true)",
]
#: coordinate-wise: refused over the sparsifying default codec (``median(4)``: mean around median)
REFUSED = ["trimmed_mean(0.2)", "median", "median(bucket=1)", "median(4)"]
FRACTIONS = [0.1, 0.2, 0.3]
# per version of the library's code: a result of other code is recomputed, never recorded as today's
CACHE = Path(__file__).resolve().parent.parent / ".bench-cache" / "robustness-engine" / code_fingerprint()


def uplink(spec: str) -> str:
    """A job's codec for the uplink ``spec`` in the default codec's place: run with :data:`DEFAULT_DGC`."""
    return spec if spec == DEFAULT_CODEC else spec + DGC_MARK


def _codec(job_codec: str) -> tuple[str, bool]:
    """(the codec spec, whether the run applies :data:`DEFAULT_DGC`) of a job's codec."""
    if job_codec.endswith(DGC_MARK):
        return job_codec[: -len(DGC_MARK)], True
    return job_codec, job_codec == DEFAULT_CODEC


def _key(args: tuple) -> Path:
    """The cache file of one run: the codec's spec, the rest of the job, and ``_dgc`` for the runs with the DGC
    options, so that two uplinks, or a codec with and without DGC, never share a file."""
    spec, dgc = _codec(args[0])
    name = "_".join(str(a) for a in (spec, *args[1:])).translate(str.maketrans(" |():,=", "-------"))
    return CACHE / (name + ("_dgc" if dgc else "") + ".json")


def config(args: tuple) -> RunConfig:
    """The run of (codec, attack or None, defence, seed, rounds), as every section measures it (also used by
    per-round diagnostics, so that they watch the very run the tables report)."""
    from deltaplane.engine.config import RunConfig

    job_codec, attack, defense, seed, rounds = args
    codec, with_dgc = _codec(job_codec)
    dgc = DEFAULT_DGC if with_dgc else {}  # as `deltaplane run` applies them to its default
    return RunConfig(
        rounds=rounds,
        codec=codec,
        attack=attack,
        defense=defense,
        seed=seed,
        engine="batched",
        threads=1,
        **dgc,
    )


def job(args: tuple) -> dict:
    """One federation run (cached): (codec, attack or None, defence, seed, rounds) → accuracy, backdoor."""
    import torch

    from deltaplane.apps.runner import run_federation

    key = _key(args)
    if key.exists():
        return json.loads(key.read_text())
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    r = run_federation(config(args)).final
    out = {"accuracy": r.test_accuracy, "backdoor": r.backdoor_success}
    CACHE.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(out))
    print(args, out, flush=True)
    return out


CACHED_ONLY = False


def cached(args: tuple) -> dict | None:
    """A finished run from the cache, or None."""
    key = _key(args)
    return json.loads(key.read_text()) if key.exists() else None


def run_all(jobs: list[tuple], workers: int) -> dict[tuple, dict | None]:
    if CACHED_ONLY:  # record what has finished; a missing cell says so
        return {j: cached(j) for j in jobs}
    with Pool(workers) as pool:
        return dict(zip(jobs, pool.map(job, jobs, chunksize=1), strict=True))


def cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    bd = "—" if r["backdoor"] is None else f"{r['backdoor']:.2f}"
    return f"{r['accuracy']:.3f} / {bd}"


def _section(args: argparse.Namespace, key: str, title: str) -> tuple[str, str]:
    """The benchmarks page section a run records into: with ``--key-suffix``, a section of its own beside the
    full table (a subset measured later, e.g. one more defence), so the full table is not overwritten."""
    if not args.key_suffix:
        return key, title
    return f"{key}-{args.key_suffix}", f"{title} — {args.key_suffix}"


def _apart_note(args: argparse.Namespace) -> str:
    """What a section recorded with ``--key-suffix`` says of its rows: they were measured apart from the full
    table (a subset, e.g. defences added later), by the command, on the machine, load and date of its own header
    lines, so a reader compares them with the full table's knowing they were not run beside them."""
    if not args.key_suffix:
        return ""
    return (
        "These rows were measured apart from the full table (the section of the same title without "
        f"“— {args.key_suffix}”), by the command above, at the date and load above, on the code of that date; "
        "the full table's rows come from its own command and date. "
    )


def _defaults_note(defences: list[str]) -> str:
    """What a bare ``trigger_attribution`` measured: its ``score=`` default, read from the rule itself, so a
    re-run of a recorded command after the default changes says which score its cells are (the first tables
    were measured under ``score=trigger``, the default then, with the same labels; those up to 2026-12-06 under
    ``reputation=sum``)."""
    import inspect

    from deltaplane.aggregation.attribution import BackdoorAttribution

    attr = [d for d in defences if d.startswith("trigger_attribution")]
    params = inspect.signature(BackdoorAttribution.__init__).parameters
    notes = [
        f"`trigger_attribution` without `{name}=` runs its default {what}, `{name}={params[name].default}`. "
        for name, what in (("score", "score"), ("reputation", "reputation test"))
        if any(f"{name}=" not in d for d in attr)
    ]
    return "".join(notes)


def _uplink_note(spec: str) -> str:
    """What a section measured with ``--uplink`` says beside its codec (nothing for :data:`DEFAULT_CODEC`,
    whose sections were recorded before the option, so that they read as they did)."""
    if spec == DEFAULT_CODEC:
        return ""
    return (
        f"Measured with `--uplink '{spec}'` in place of `{DEFAULT_CODEC}` (the uplink of the sections without "
        "one), with the same DGC options. "
    )


def accept(args: argparse.Namespace) -> None:
    from _record import record, table

    seeds, best = range(args.seeds), args.best
    codecs = {"default": uplink(args.uplink), "identity": "identity"}
    codecs = {name: codecs[name] for name in args.codecs}
    jobs = []
    for c in codecs.values():
        for s in seeds:
            jobs += [(c, None, "none", s, 80), (c, "backdoor:0.2", "none", s, 80)]
            jobs += [(c, "backdoor:0.2", d, s, 80) for d in best]
    by = run_all(jobs, args.workers)
    rows, verdict = [], []
    for name, c in codecs.items():
        passed = dict.fromkeys(best, 0)
        measured = dict.fromkeys(best, 0)
        for s in seeds:
            base = by[(c, None, "none", s, 80)]
            row = [name, s, f"{base['accuracy']:.3f}" if base else "not run"]
            row.append(cell(by[(c, "backdoor:0.2", "none", s, 80)]))
            for d in best:
                r = by[(c, "backdoor:0.2", d, s, 80)]
                if r is None or base is None:
                    row.append("not run")
                    continue
                ok = r["accuracy"] >= base["accuracy"] - 0.02 and r["backdoor"] <= 0.10
                passed[d] += ok
                measured[d] += 1
                row.append(
                    f"{cell(r)} ({100 * (r['accuracy'] - base['accuracy']):+.1f}) {'PASS' if ok else 'MISS'}"
                )
            rows.append(row)
        verdict += [[name, d, f"{passed[d]} of {measured[d]} measured ({len(seeds)} planned)"] for d in best]
    body = (
        f"Codecs: default = `{args.uplink}` with DGC momentum correction 0.5 and momentum masking (as "
        "`deltaplane run`)"
        + (", and `identity`. " if "identity" in codecs else ". ")
        + _uplink_note(args.uplink)
        + "80 rounds, 20 clients, 20% `backdoor` attackers (4 fixed clients, half their images stamped and "
        "relabelled 0), `engine=batched`, 1 thread. Cells: test accuracy / backdoor success "
        "(points vs that seed's clean FedAvg) and the acceptance verdict (within 2 points, backdoor ≤ 10%). "
        + _apart_note(args)
        + _defaults_note(best)
        + "\n\n"
        + table(["codec", "seed", "clean FedAvg", "undefended", *best], rows)
        + "\n\nSeeds passing:\n\n"
        + table(["codec", "defence", "seeds passing"], verdict)
    )
    print(body)
    record(
        *_section(
            args, "robustness", "Robust aggregation on the engine: 20% backdoor, 3 seeds, two codecs (#21)"
        ),
        body,
    )


def clean(args: argparse.Namespace) -> None:
    from _record import record, table

    seeds = list(range(args.clean_seeds))
    default = uplink(args.uplink)
    if args.clean_defenses:  # a subset, with one codec: its own section (see --key-suffix)
        codec = default if args.clean_codec == "default" else args.clean_codec
        plan = [(codec, d) for d in ["none", *args.clean_defenses]]
    else:
        plan = [(default, d) for d in ["none", *GRID_DEFENSES[1:], *CLEAN_EXTRA]]
        plan += [("identity", d) for d in ["none", *REFUSED]]  # the rules refused over sparsifying codecs
    jobs = [(c, None, d, s, 80) for c, d in plan for s in seeds]
    by = run_all(jobs, args.workers)
    rows = []
    for c, d in plan:
        name = "default" if c == default else c
        runs = [by[(c, None, d, s, 80)] for s in seeds]
        bases = [by[(c, None, "none", s, 80)] for s in seeds]
        cells = [f"{r['accuracy']:.3f}" if r else "not run" for r in runs]
        done = [(r, b) for r, b in zip(runs, bases, strict=True) if r is not None and b is not None]
        if len(done) < len(seeds):
            rows.append([name, d, *cells, "", "", ""])
            continue
        mean = sum(r["accuracy"] for r, _ in done) / len(done)
        pts = 100 * (mean - sum(b["accuracy"] for _, b in done) / len(done))
        worst = min(100 * (r["accuracy"] - b["accuracy"]) for r, b in done)
        ok = "yes" if pts >= -2 else "**no**"
        rows.append([name, d, *cells, f"{mean:.3f}", f"{pts:+.1f} (worst seed {worst:+.1f})", ok])
    body = (
        f"No attacker, 80 rounds, seeds {', '.join(map(str, seeds))}: every defence against FedAvg (`none`) with "
        f"the same uplink codec and seed — the default codec (`{args.uplink}` with DGC momentum correction 0.5 "
        "and momentum masking, as `deltaplane run`) for every rule valid over it, `identity` for the rules "
        "refused over sparsifying codecs (`IncompatibleDefense`). "
        + _uplink_note(args.uplink)
        + ("The default codec's" if args.uplink == DEFAULT_CODEC else f"`{DEFAULT_CODEC}`'s")
        + " final accuracy moves by "
        "several points between seeds and between CPUs (FedAvg seed 0: 0.964 on an AVX2 machine, 0.922 on the "
        "AVX-512 machine of the 2026-12-03 records, 0.958 on a 2-core Intel Xeon with AVX-512, the last two from the same code: "
        "each CPU rounds the stacked training's floats its own way), so the verdict reads the mean over seeds. "
        + _apart_note(args)
        + _defaults_note([d for _, d in plan])
        + "\n\n"
        + table(
            [
                "codec",
                "defence",
                *(f"seed {s}" for s in seeds),
                "mean",
                "points vs FedAvg (mean)",
                "within 2 points",
            ],
            rows,
        )
    )
    print(body)
    record(
        *_section(args, "robustness-clean", "Robust aggregation: no attacker, every defence vs FedAvg (#21)"),
        body,
    )


def _over_seeds(runs: list[dict | None]) -> str:
    """One grid cell over seeds: mean accuracy, and backdoor success as how many seeds let the backdoor in (above
    0.5: the 30% cells flip between 0.00 and 0.9+, so a mean alone would read as a half-held backdoor) and its
    mean; the seeds not run are said, never averaged as zero."""
    done = [r for r in runs if r is not None]
    if not done:
        return "not run"
    acc = sum(r["accuracy"] for r in done) / len(done)
    bds = [r["backdoor"] for r in done]
    missing = f" ({len(runs) - len(done)} not run)" if len(done) < len(runs) else ""
    return f"{acc:.3f} / {sum(b > 0.5 for b in bds)} of {len(done)} above 0.5, mean {sum(bds) / len(bds):.2f}{missing}"


def grid(args: argparse.Namespace) -> None:
    from _record import record, table

    rounds, default, seeds = args.grid_rounds, uplink(args.uplink), list(range(args.grid_seeds))
    cells = [(f"{a}:{f}", a, f) for f in args.fractions for a in args.attacks]
    jobs = [(default, None, "none", s, rounds) for s in seeds]
    jobs += [(default, attack, d, s, rounds) for s in seeds for attack, _, _ in cells for d in args.defenses]
    by = run_all(jobs, args.workers)
    clean = [by[(default, None, "none", s, rounds)] for s in seeds]
    fedavg = ", ".join(f"{r['accuracy']:.3f}" if r else "not run" for r in clean)
    if len(seeds) == 1:  # as the grid was recorded before --grid-seeds: one row per cell, the run itself
        rows = [
            [a, f"{round(100 * f)}%", *(cell(by[(default, attack, d, 0, rounds)]) for d in args.defenses)]
            for attack, a, f in cells
        ]
        tables = table(["attack", "malicious", *args.defenses], rows)
        seed_text = "seed 0"
    else:
        per_seed = [
            [a, f"{round(100 * f)}%", s, *(cell(by[(default, attack, d, s, rounds)]) for d in args.defenses)]
            for attack, a, f in cells
            for s in seeds
        ]
        summary = [
            [
                a,
                f"{round(100 * f)}%",
                *(_over_seeds([by[(default, attack, d, s, rounds)] for s in seeds]) for d in args.defenses),
            ]
            for attack, a, f in cells
        ]
        tables = (
            "Over the seeds (mean accuracy / seeds with backdoor success above 0.5, mean backdoor success):\n\n"
            + table(["attack", "malicious", *args.defenses], summary)
            + "\n\nPer seed:\n\n"
            + table(["attack", "malicious", "seed", *args.defenses], per_seed)
        )
        seed_text = f"seeds {', '.join(map(str, seeds))}"
    body = (
        f"Default codec `{args.uplink}` with DGC momentum correction 0.5 and momentum masking, {seed_text}, "
        f"**{rounds} rounds**, clean FedAvg {fedavg}. Cells: test accuracy / backdoor success (the share of "
        "triggered test images of other classes classified as the target 0). "
        + _uplink_note(args.uplink)
        + f"{', '.join(f'`{d}`' for d in REFUSED)} are refused with this codec "
        "(`IncompatibleDefense`); a cell that says *not run* did not finish in the session's time. "
        + _apart_note(args)
        + _defaults_note(args.defenses)
        + "\n\n"
        + tables
    )
    print(body)
    record(
        *_section(
            args,
            "robustness-grid",
            f"Robust aggregation: attack × defence × fraction, default codec, {rounds} rounds (#21)",
        ),
        body,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=["accept", "clean", "grid"])
    ap.add_argument("--best", nargs="+", default=["foolsgold"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--clean-seeds", type=int, default=3, help="seeds of the no-attacker comparison")
    ap.add_argument("--grid-rounds", type=int, default=80)
    ap.add_argument(
        "--grid-seeds",
        type=int,
        default=1,
        help="grid: seeds 0..N-1 (default 1, seed 0 as the grid was first recorded); with more than one, each "
        "cell per seed and over the seeds (mean accuracy, seeds with backdoor success above 0.5, its mean)",
    )
    ap.add_argument("--attacks", nargs="+", default=GRID_ATTACKS)
    ap.add_argument("--defenses", nargs="+", default=GRID_DEFENSES)
    ap.add_argument("--fractions", nargs="+", type=float, default=FRACTIONS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--uplink",
        default=DEFAULT_CODEC,
        help=f"the codec in the default codec's place, with DGC momentum correction 0.5 and momentum masking "
        f"(default: {DEFAULT_CODEC})",
    )
    ap.add_argument(
        "--codecs",
        nargs="+",
        choices=sorted(CODECS),
        default=list(CODECS),
        help="accept: the codecs measured ('default': the uplink)",
    )
    ap.add_argument(
        "--clean-defenses", nargs="+", help="clean: only these defences (and FedAvg), with --clean-codec"
    )
    ap.add_argument(
        "--clean-codec",
        default="default",
        help="clean with --clean-defenses: the uplink codec ('default': deltaplane run's; 'identity' for the "
        "coordinate-wise rules refused over it)",
    )
    ap.add_argument(
        "--key-suffix",
        help="record into a section of its own (key and title get this suffix) instead of the full table's",
    )
    ap.add_argument("--cached-only", action="store_true", help="record the finished runs, run nothing")
    args = ap.parse_args()
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    {"accept": accept, "clean": clean, "grid": grid}[args.section](args)


if __name__ == "__main__":
    main()

"""Run every benchmark invocation that records a section of docs/benchmarks.md (``make bench``).

Many scripts take arguments, and several sections come from the same script run with different ones, so
running each script once without arguments refreshed only some sections (and failed on the scripts that
need arguments). :data:`PLAN` lists each recorded section with the command that wrote it, as its
``- command:`` line says; a section is refreshed exactly as it was measured. :data:`HELPERS` are the scripts
that record no section (diagnostics and child processes), and :data:`HAND_COMPILED` the sections no script
writes. ``tests/test_benchmarks_plan.py`` checks that every section of the page is in one of them.

Usage::

    python benchmarks/run_all.py                 # everything (hours on a 2-core machine)
    python benchmarks/run_all.py --only secagg   # the invocations that record these sections
    python benchmarks/run_all.py --list          # the plan, nothing run

``sim_speed`` compares with pfl-research, which pins an older dp-accounting, from a venv of its own:
set ``PFL_PYTHON`` to its python (the section is not refreshed without it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: placeholders in an invocation's arguments, filled in at run time
SCRATCH, PFL = "{scratch}", "{pfl_python}"


@dataclass(frozen=True)
class Step:
    """One invocation: ``python benchmarks/<script> <args>``, recording ``sections`` (empty: a preparation)."""

    script: str
    args: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    #: the sections this step's preparation is for (run with them under --only)
    prepares: tuple[str, ...] = field(default=())


def _detect_steps() -> list[Step]:
    """robustness-detect scores six saved undefended runs; the diagnostics script saves them."""
    codec = {"default": (), "identity": ("--codec", "identity")}  # default: `deltaplane run`'s own codec
    saves = [
        Step(
            "robustness_diagnostics.py",
            (*codec[name], "--seed", str(seed), "--save", f"{SCRATCH}/rec_{name}_{seed}.pt"),
            prepares=("robustness-detect",),
        )
        for name in codec
        for seed in range(3)
    ]
    files = tuple(f"{SCRATCH}/rec_{n}_{s}.pt" for n in ("default", "identity") for s in range(3))
    return [*saves, Step("robustness_detect.py", ("--record", *files), ("robustness-detect",))]


_FED = ("--rounds", "3", "--epochs", "3", "--max-train", "400", "--max-test", "160")
_ATTR = "trigger_attribution"
#: the sum reputation test with the kept updates' norm bound, on the default uplink (docs/aggregation.md, "At 30%")
_SUM_CAP = f"{_ATTR}(reputation=sum, norm_cap=10)"
_SUM_CAP_SUFFIX = "stc(0.006) uplink, reputation=sum, norm_cap=10"
#: the grid's 30% row at seeds 0, 1, 2 on the default uplink (its seed-0 cells flip between 0.00 and 0.9+)
_SEEDS_30 = "grid --workers 1 --grid-seeds 3 --fractions 0.3"
_SEEDS_30_SUFFIX = "stc(0.006) uplink, 3 seeds, 30%"
#: the grid's 10% and 20% rows of the default defence at seeds 0, 1, 2 on the default uplink (beside the 30% row's)
_SEEDS_LOW = "grid --workers 2 --grid-seeds 3 --fractions 0.1 0.2"
_SEEDS_LOW_SUFFIX = "stc(0.006) uplink, 3 seeds, 10% and 20%"
#: the geometric median (RFA) and centered clipping, measured apart from the full grid and the clean table
_RFA_CC = "geometric median and centered clipping"
#: sign vote, the geometric median and centered clipping (τ = 3) over the whole grid, apart from its full table
_SV_RFA_CC = "sign vote, geometric median and centered clipping"


def _split(command: str) -> tuple[str, ...]:
    """Arguments written as on a shell line (the section's own command), quotes and all."""
    return tuple(shlex.split(command))


#: every recorded section and the invocation that records it (the section's own ``- command:`` line)
PLAN: list[Step] = [
    Step("adapters_extract.py", (), ("adapters-extract",)),
    Step("adapters_federated.py", (*_FED, "--lora-lr", "0.2", "--full-lr", "0.02"), ("adapters-federated",)),
    Step(
        "adapters_federated.py",
        (*_FED, "--lora-lr", "0.05", "--only", "centralized", "--key", "adapters-federated-central"),
        ("adapters-federated-central",),
    ),
    Step(
        "adapters_federated.py",
        (
            *_FED,
            "--lora-lr",
            "0.2",
            "--full-lr",
            "0.02",
            "--only",
            "full",
            "--key",
            "adapters-federated-full",
        ),
        ("adapters-federated-full",),
    ),
    Step("adapters_minilm.py", (), ("adapters-minilm",)),
    Step("aggregation_memory.py", (), ("aggregation-memory",)),
    Step("base_fingerprint.py", (), ("base-fingerprint",)),
    Step("busy_machine.py", ("--repeats", "5", "--rounds", "6"), ("busy-machine",)),
    Step("charlm_task.py", (), ("charlm_task",)),
    Step("cli_startup.py", (), ("cli-startup",)),
    Step("codec_bounds.py", (), ("codec-bounds",)),
    Step("coordinator_startup.py", (), ("coordinator-startup",)),
    Step("codecs_accuracy.py", ("--seeds", "10"), ("codecs_accuracy",)),
    Step("codecs_accuracy.py", ("--large", "--seeds", "10"), ("codecs_accuracy_large",)),
    Step("codecs_default.py", (), ("codecs_default",)),
    Step("codecs_throughput.py", (), ("codecs_throughput",)),
    Step("compact_decode.py", (), ("compact-decode",)),
    Step("deploy_any_model.py", (), ("deploy_any_model",)),
    Step("deploy_digits.py", ("--max-adv-drop", "5"), ("deploy_digits",)),
    Step("deploy_minilm.py", ("1", "2000", "5e-4"), ("deploy_minilm",)),
    Step("deploy_minilm.py", ("--only-24", "2", "2000"), ("deploy_minilm_24",)),
    Step("downlink_bytes.py", (), ("downlink-bytes",)),
    Step("dp_accuracy.py", (), ("dp-accuracy",)),
    Step("dp_audit.py", (), ("dp-audit",)),
    Step("dp_epsilon.py", (), ("dp-accounting",)),
    Step("drift_alarms.py", (), ("drift_alarms",)),
    Step("e2e_run.py", (), ("e2e_run",)),
    Step("flower_parity.py", (), ("flower-parity",)),
    Step("flower_scale.py", (), ("flower-scale",)),
    Step("foundation.py", (), ("foundation",)),
    Step("fuzz_decode.py", (), ("fuzz-decode",)),
    Step("fuzz_decode.py", ("--compact", "--mutations", "10000"), ("fuzz-decode-compact",)),
    Step("merge_domains.py", ("specialist",), ("merge-domains-specialist",)),
    Step("merge_domains.py", ("generalist",), ("merge-domains-generalist",)),
    Step("merge_scale.py", ("--skip-1b", "--repeats", "3"), ("merge-scale-minilm",)),
    Step("merge_scale.py", ("--only-1b",), ("merge-scale-1b",)),
    Step("mergekit_parity.py", (), ("mergekit-parity",)),
    Step("parity_matrix.py", (), ("parity_matrix",)),
    Step(
        "parity_matrix.py",
        (
            "--features",
            "geometric median (RFA)",
            "FedAdam + centered clipping τ = 0.05",
            "--key-suffix",
            _RFA_CC,
        ),
        (f"parity_matrix-{_RFA_CC}",),
    ),
    Step("personalization.py", (), ("personalization",)),
    Step("personalization_audit.py", (), ("personalization-audit",)),
    *(
        Step("alpha_choice_study.py", ("run", name, str(seed), f"{SCRATCH}/alpha_choice"), ())
        for name in ("make-run", "bench60")
        for seed in (10, 11, 12, 13, 14, 0, 1, 2)
        if name == "bench60" or seed in (10, 11, 0, 1, 2)
    ),
    Step("alpha_choice_study.py", ("report", f"{SCRATCH}/alpha_choice"), ("personalization-alpha-choice",)),
    Step("powersgd_quality.py", (), ("powersgd_quality",)),
    Step("promotion_gate.py", (), ("promotion-gate",)),
    Step("registry_crash.py", (), ("registry-crash",)),
    Step(
        "robustness.py",
        _split(
            f"accept --workers 2 --best '{_ATTR}(switch=evidence)' '{_ATTR}(switch=latest)' '{_ATTR}(sticky=true)'"
        ),
        ("robustness",),
    ),
    Step(
        "robustness.py",
        _split(
            f"accept --workers 1 --best '{_ATTR}(score=mix)' '{_ATTR}(score=both)' --key-suffix 'score option'"
        ),
        ("robustness-score option",),
    ),
    Step(
        "robustness.py",
        _split(
            f"accept --workers 1 --best '{_ATTR}(invert=schedule, shadow=bounded, reputation=floor)' "
            f"'{_ATTR}(reputation=floor)' --key-suffix 'reputation option'"
        ),
        ("robustness-reputation option",),
    ),
    Step(
        "robustness.py",
        _split(
            f"accept --workers 2 --uplink 'stc(0.006)' --codecs default --best '{_ATTR}' "
            "--key-suffix 'stc(0.006) uplink'"
        ),
        ("robustness-stc(0.006) uplink",),
    ),
    Step(
        "robustness.py",
        _split(
            f"accept --workers 1 --uplink 'stc(0.006)' --codecs default --best '{_SUM_CAP}' "
            f"--key-suffix '{_SUM_CAP_SUFFIX}'"
        ),
        (f"robustness-{_SUM_CAP_SUFFIX}",),
    ),
    Step("robustness.py", ("clean", "--workers", "1"), ("robustness-clean",)),
    Step(
        "robustness.py",
        _split(
            f"clean --workers 1 --clean-seeds 3 --clean-defenses '{_ATTR}(score=both)' '{_ATTR}(score=mix)' "
            "--key-suffix 'score option'"
        ),
        ("robustness-clean-score option",),
    ),
    Step(
        "robustness.py",
        _split(
            f"clean --workers 1 --clean-seeds 3 --clean-defenses "
            f"'{_ATTR}(invert=schedule, shadow=bounded, reputation=floor)' '{_ATTR}(reputation=floor)' "
            "--key-suffix 'reputation option'"
        ),
        ("robustness-clean-reputation option",),
    ),
    Step(
        "robustness.py",
        _split(
            f"clean --workers 1 --uplink 'stc(0.006)' --clean-seeds 3 --clean-defenses '{_ATTR}' "
            "--key-suffix 'stc(0.006) uplink'"
        ),
        ("robustness-clean-stc(0.006) uplink",),
    ),
    Step(
        "robustness.py",
        _split(
            f"clean --workers 1 --uplink 'stc(0.006)' --clean-seeds 3 --clean-defenses '{_SUM_CAP}' "
            f"--key-suffix '{_SUM_CAP_SUFFIX}'"
        ),
        (f"robustness-clean-{_SUM_CAP_SUFFIX}",),
    ),
    Step(
        "robustness.py",
        _split(
            "clean --workers 2 --clean-defenses median 'median(bucket=1)' --clean-codec identity "
            "--key-suffix 'median bucketed by default'"
        ),
        ("robustness-clean-median bucketed by default",),
    ),
    Step("robustness.py", ("grid", "--workers", "1"), ("robustness-grid",)),
    Step(
        "robustness.py",
        _split(f"grid --workers 1 --defenses '{_ATTR}(score=both)' --key-suffix 'score option'"),
        ("robustness-grid-score option",),
    ),
    Step(
        "robustness.py",
        _split(
            f"grid --workers 1 --defenses none {_ATTR} --uplink 'stc(0.006)' --key-suffix 'stc(0.006) uplink'"
        ),
        ("robustness-grid-stc(0.006) uplink",),
    ),
    Step(
        "robustness.py",
        _split(
            f"grid --workers 1 --defenses '{_SUM_CAP}' --uplink 'stc(0.006)' --key-suffix '{_SUM_CAP_SUFFIX}'"
        ),
        (f"robustness-grid-{_SUM_CAP_SUFFIX}",),
    ),
    *(
        Step(
            "robustness.py",
            _split(
                f"{_SEEDS_30} --defenses '{defence}' --uplink 'stc(0.006)' --key-suffix '{_SEEDS_30_SUFFIX}{suffix}'"
            ),
            (f"robustness-grid-{_SEEDS_30_SUFFIX}{suffix}",),
        )
        for defence, suffix in (
            (_ATTR, ""),
            (f"{_ATTR}(reputation=floor, norm_cap=10)", ", reputation=floor, norm_cap=10"),
            (_SUM_CAP, ", reputation=sum, norm_cap=10"),
        )
    ),
    Step(
        "robustness.py",
        _split(f"{_SEEDS_LOW} --defenses {_ATTR} --uplink 'stc(0.006)' --key-suffix '{_SEEDS_LOW_SUFFIX}'"),
        (f"robustness-grid-{_SEEDS_LOW_SUFFIX}",),
    ),
    Step(
        "robustness.py",
        _split(
            f"grid --workers 2 --fractions 0.2 --defenses geometric_median centered_clip --key-suffix '{_RFA_CC}'"
        ),
        (f"robustness-grid-{_RFA_CC}",),
    ),
    Step(
        "robustness.py",
        _split(
            f"clean --workers 2 --clean-seeds 1 --clean-defenses geometric_median centered_clip --key-suffix '{_RFA_CC}'"
        ),
        (f"robustness-clean-{_RFA_CC}",),
    ),
    Step(
        "robustness.py",
        _split(
            "grid --workers 1 --defenses none sign_vote geometric_median centered_clip "
            f"--key-suffix '{_SV_RFA_CC}'"
        ),
        (f"robustness-grid-{_SV_RFA_CC}",),
    ),
    Step("centered_clip_tau.py", ("--workers", "2"), ("centered-clip-tau",)),
    Step(
        "robust_cost.py",
        _split(
            "--record none median krum(2) geometric_median geometric_median(start=mean) centered_clip(0.1) "
            "'centered_clip(0.1, iterations=3)'"
        ),
        ("robust-cost",),
    ),
    Step("robustness_attribution.py", ("--seeds", "3"), ("robustness-attribution",)),
    *_detect_steps(),
    Step("secagg.py", (), ("secagg",)),
    Step("secagg_http.py", (), ("secagg_http",)),
    Step("serve_load.py", (), ("serve-load",)),
    Step("service_abuse.py", (), ("service-abuse",)),
    Step("session_decode.py", (), ("session-decode",)),
    Step("service_throughput.py", ("--seconds", "5", "--devices", "400"), ("service-throughput",)),
    Step("sim_speed.py", ("--rounds", "24", "--pfl-python", PFL), ("sim_speed",)),
    Step("sim_speed.py", ("--scale",), ("sim_scale",)),
    Step("stacked_codecs.py", (), ("stacked_codecs",)),
    Step("wire_overhead.py", (), ("wire-overhead",)),
]

#: scripts that record no section of their own: per-run diagnostics and figures a docs page quotes with its load,
#: and the pfl-research child of sim_speed
HELPERS = {
    "drift_hostile_service.py",
    "registry_first_read.py",
    "registry_rotate_rss.py",
    "robustness_diagnostics.py",
    "robustness_score_probe.py",
    "robustness_trace.py",
    "sim_speed_pfl.py",
}
#: sections of the page that no script writes (a log of many runs, compiled by hand; the section says so)
HAND_COMPILED = {"sim_speed_repeats"}


def planned_sections() -> set[str]:
    """Every section some step of :data:`PLAN` records."""
    return {s for step in PLAN for s in step.sections}


def _argv(step: Step, scratch: str, pfl_python: str) -> list[str]:
    args = [a.replace(SCRATCH, scratch).replace(PFL, pfl_python) for a in step.args]
    return [sys.executable, f"benchmarks/{step.script}", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="SECTION", help="run only what records these sections")
    ap.add_argument("--list", action="store_true", help="print the plan and run nothing")
    args = ap.parse_args()
    unknown = set(args.only or ()) - planned_sections()
    if unknown:
        ap.error(f"no step records {sorted(unknown)}; sections: {sorted(planned_sections())}")
    wanted = set(args.only or planned_sections())
    steps = [s for s in PLAN if wanted & set(s.sections or s.prepares)]
    pfl_python = os.environ.get("PFL_PYTHON", "")
    failed, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="deltaplane-bench-") as scratch:
        for step in steps:
            argv = _argv(step, scratch, pfl_python)
            label = ", ".join(step.sections) or f"(for {', '.join(step.prepares)})"
            print(f"== {' '.join(argv[1:])}  -> {label}", flush=True)
            if args.list:
                continue
            if PFL in step.args and not pfl_python:
                skipped.append(f"{label}: set PFL_PYTHON to a python with pfl-research installed")
                continue
            if subprocess.call(argv, cwd=ROOT) != 0:
                failed.append(label)
    for line in skipped:
        print(f"not refreshed: {line}", file=sys.stderr)
    if failed:
        print(f"benchmarks failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())

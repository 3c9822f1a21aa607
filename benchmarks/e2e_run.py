"""End to end: what a newcomer's ``make run`` does and costs — federation, personalization, merge, deploy.

Target: the whole ``deltaplane run`` (fp32 baseline + compressed federation + follow-up) finishes in under
5 minutes of wall-clock time on a 2-core machine. Runs the installed CLI as a subprocess exactly as the Makefile
does, measures its wall-clock and CPU time (the machine may be shared, so CPU time says what the run itself
needed), and records the headline figures from the ``report.json`` it wrote. The follow-up's cost is given as a
ratio to the federation's, both measured in the same run.

Run: ``.venv/bin/python benchmarks/e2e_run.py`` (about 3 minutes on 2 idle cores).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record, table

TARGET_S = 300.0


def main() -> None:
    cli = Path(sys.executable).with_name("deltaplane")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([str(cli), "run", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        doc = json.loads((out / "report.json").read_text())
        artifact_on_disk = (out / "deploy" / "model.dpla").stat().st_size
    fed_s = sum(r["wall_time_s"] for r in doc["runs"])
    (engine,) = {r["config"]["engine"] for r in doc["runs"]}
    (threads,) = {r["config"]["threads"] for r in doc["runs"]}
    f = doc["followup"]
    p, m, d = f["personalization"], f["merge"]["results"], f["deploy"]
    follow_s = p["seconds"] + f["merge"]["seconds"] + d["seconds"]
    assert artifact_on_disk == d["artifact_bytes"]
    base, comp = doc["summary"]
    rows = [
        [
            "federation: fp32 baseline",
            f"{base['final_accuracy']:.4f}",
            f"uplink {base['uplink_bytes']:,} B",
            "—",
        ],
        [
            "federation: " + comp["codec"].replace("|", "\\|"),
            f"{comp['final_accuracy']:.4f}",
            f"uplink {comp['uplink_bytes']:,} B",
            f"{comp['ratio_vs_baseline']:.1f}× fewer uplink bytes",
        ],
        [
            f"personalized ({p['method']} {'every round' if p['in_round'] else 'post hoc'}, "
            f"{p['devices']} devices)",
            f"device mean {p['personal_accuracy_mean']:.4f} / min {p['personal_accuracy_min']:.4f}",
            f"global: {p['global_accuracy_mean']:.4f} / {p['global_accuracy_min']:.4f}",
            f"{p['devices_personalized']}/{p['devices']} serve a personal model",
        ],
        [
            "merged: TIES",
            f"{m['ties']['test_accuracy']:.4f}",
            "test set",
            "global " + f"{m['global']['test_accuracy']:.4f}",
        ],
        ["merged: task arithmetic", f"{m['task_arithmetic']['test_accuracy']:.4f}", "test set", ""],
        [
            f"deployed: prune {d['prune']} + {d['quant']}",
            f"{d['accuracy_compressed']:.4f} (fp32 {d['accuracy_fp32']:.4f})",
            f"{d['artifact_bytes']:,} B vs {d['fp32_safetensors_bytes']:,} B fp32",
            f"{d['compression_ratio']:.2f}× smaller, batch-1 latency {d['latency_ratio_batch1']:.2f}×",
        ],
    ]
    verdict = "met" if wall < TARGET_S else "**MISSED**"
    print(f"wall {wall:.1f} s, cpu {cpu:.1f} s, federation {fed_s:.1f} s, follow-up {follow_s:.1f} s")
    body = "\n\n".join(
        [
            "`deltaplane run` with its defaults (what `make run` runs): fp32 baseline and compressed federation "
            f"on the {engine} engine (threads {threads})"
            + (
                f", the compressed one personalizing every device every round ({p['method']})"
                if p["in_round"]
                else ""
            )
            + ", then the follow-up (see docs/followup.md), as one subprocess.",
            table(["stage", "accuracy", "bytes", "vs"], rows),
            f"Whole command: {wall:.1f} s wall-clock, {cpu:.1f} s CPU (user + system) on a possibly shared "
            f"machine; the two federations took {fed_s:.1f} s and the follow-up {follow_s:.1f} s "
            f"({follow_s / fed_s:.3f}× the federations). Target < {TARGET_S:.0f} s wall-clock: {verdict}.",
        ]
    )
    record("e2e_run", "End to end: `make run` (federation, personalization, merge, deploy)", body)


if __name__ == "__main__":
    main()

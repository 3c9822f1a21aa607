"""CPU seconds and peak memory of `deltaplane fleet coordinate` (and `fleet enroll`) against a real service.

docs/fleet.md's walk, on plain HTTP over loopback: its ``fleet.yaml`` (3 devices, SecAgg with distributed DP)
and docs/byo.md's ``mytask.py`` are written into a temporary folder; ``registry init``, ``fleet init`` and
``deltaplane serve --federation fleet.yaml`` run there, ``fleet enroll`` issues the three tokens, and then
``fleet coordinate --rounds 1 --deadline 2`` runs with no device started: it reads the fleet reference from the
service, opens its one round, and aborts it at the deadline (no device took part; exit 1). Run without
``--trusted`` it builds no task; with ``--trusted`` it must build it (torch, the task's data) to run the
versions it publishes. ``--secagg-neighbours 1`` (a degree 3 devices refuse) is refused before any request.
Each child's user + system CPU seconds and peak RSS come from ``os.wait4`` (the kernel's
accounting of that process alone), wall seconds from the clock; each case runs ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _record import record, table
from _service import free_port, wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin-token-0123456789"
MODEL = "mytask"


def _guide_files(folder: Path) -> None:
    """docs/fleet.md's ``fleet.yaml`` and docs/byo.md's ``mytask.py``, as a reader saves them."""
    fleet = (ROOT / "docs" / "fleet.md").read_text()
    byo = (ROOT / "docs" / "byo.md").read_text()
    yaml = next(b for b in re.findall(r"```yaml\n(.*?)```", fleet, re.S) if b.startswith("task:"))
    task = next(b for b in re.findall(r"```python\n(.*?)```", byo, re.S) if b.startswith("# mytask.py"))
    (folder / "fleet.yaml").write_text(yaml)
    (folder / "mytask.py").write_text(task)


def measured(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, float, int, str]:
    """(CPU seconds, peak RSS in MB, wall seconds, exit code, last stderr line) of one child process."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    cpu = usage.ru_utime + usage.ru_stime
    return cpu, usage.ru_maxrss / 1024, wall, proc.returncode, (lines[-1] if lines else "")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltaplane.cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each case")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="coordinator-startup-") as tmp:
        folder = Path(tmp)
        _guide_files(folder)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAPLANE_")}
        path = [p for p in (os.environ.get("PYTHONPATH", ""), str(folder)) if p]
        env |= {
            "PYTHONPATH": os.pathsep.join(path),
            "OMP_NUM_THREADS": "1",
            "DELTAPLANE_HOME": str(folder / "home"),
            "DELTAPLANE_ADMIN_TOKEN": ADMIN,
        }
        for step in (("registry", "init"), ("fleet", "init", "--federation", "fleet.yaml", "--model", MODEL)):
            subprocess.run(_cli(*step), cwd=folder, env=env, check=True, capture_output=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            _cli("serve", "--federation", "fleet.yaml", "--port", str(port)),
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_healthy(url, server, 180)
            load_before = os.getloadavg()[0]
            coordinate = ("fleet", "coordinate", "--url", url, "--federation", "fleet.yaml", "--model", MODEL)
            once = ("--rounds", "1", "--deadline", "2")
            # a degree below the 3 devices' complete graph: refused, exit 2, before any request
            refused = ("--secagg-neighbours", "1")
            trusted = ("--trusted", str(folder / "home" / "keys" / "signing.ed25519.pub"))
            cases = [
                (
                    "`fleet enroll` (3 tokens)",
                    ("fleet", "enroll", "--url", url, "--federation", "fleet.yaml", "--out", "tokens"),
                    1,
                ),
                (
                    "`fleet coordinate --secagg-neighbours 1` (refused)",
                    (*coordinate, *once, *refused),
                    args.repeats,
                ),
                ("`fleet coordinate` (no `--trusted`)", (*coordinate, *once), args.repeats),
                (
                    "`fleet coordinate --trusted` (builds the task)",
                    (*coordinate, *once, *trusted),
                    args.repeats,
                ),
            ]
            rows = []
            for name, argv, runs in cases:
                got = [measured(_cli(*argv), folder, env) for _ in range(runs)]
                for cpu, rss, wall, code, last in got:
                    print(f"{name}: {cpu:.2f} s CPU, {rss:.0f} MB, {wall:.1f} s wall, exit {code}: {last}")
                cpus, rsss, walls = ([g[i] for g in got] for i in range(3))
                rows.append(
                    [
                        name,
                        runs,
                        f"{min(cpus):.2f}" + (f"-{max(cpus):.2f}" if runs > 1 else ""),
                        f"{min(rsss):.0f}" + (f"-{max(rsss):.0f}" if runs > 1 else ""),
                        f"{min(walls):.1f}" + (f"-{max(walls):.1f}" if runs > 1 else ""),
                        ", ".join(sorted({str(g[3]) for g in got})),
                    ]
                )
            load_after = os.getloadavg()[0]
        finally:
            server.terminate()
            server.wait(timeout=30)
    body = (
        "docs/fleet.md's federation (its `fleet.yaml`: 3 devices, SecAgg with distributed DP; docs/byo.md's "
        "`mytask.py`) served by `deltaplane serve --federation fleet.yaml` on plain HTTP over loopback. "
        "`fleet coordinate --rounds 1 --deadline 2` runs with no device started: it reads the fleet reference "
        "`fleet init` stored, opens its round and aborts it at the deadline (exit 1: the round failed, no device "
        "took part); with `--secagg-neighbours 1` it refuses the degree (exit 2) before any request. Without `--trusted` it builds no task; with it, it builds the task (torch, the data) to run "
        "the versions it publishes. CPU is user + system seconds of the child alone and RSS its peak "
        f"(`os.wait4`); ranges are min-max of the runs. 1-min load average {load_before:.1f} before, "
        f"{load_after:.1f} after (the service runs beside it).\n\n"
        + table(["command", "runs", "CPU s", "peak RSS MB", "wall s", "exit"], rows)
    )
    print(body)
    record("coordinator-startup", "Coordinator start-up: CPU and memory", body)


if __name__ == "__main__":
    main()

"""Crash-safety torture: SIGKILL a writer at random points, then check that the registry survived.

A forked worker registers model versions, registers deltas, promotes and tags in a loop, reporting each
*committed* operation through a pipe only after the call returned. The parent kills it (SIGKILL: no cleanup,
no atexit, no flush) after a random delay, reopens the registry, and checks that

* SQLite's own ``integrity_check`` and :meth:`Registry.verify` pass (every blob hashes to its name, every row
  points to an existing blob, every signature verifies);
* every version the worker reported as committed is present with the same SHA-256 and loads;
* version numbers have no gaps (an interrupted transaction never consumes a number).

Use it to qualify a filesystem or a deployment (``deltaplane registry torture``); the test suite runs it with a
few dozen kills. ``fork`` keeps each restart cheap (no re-import of torch).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltaplane.errors import ConfigError, IntegrityError
from deltaplane.registry.store import Registry

__all__ = ["TortureReport", "torture"]


@dataclass
class TortureReport:
    kills: int = 0
    committed: int = 0
    versions: int = 0
    orphans: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def _worker(home: Path, fd: int, seed: int, size: int) -> None:  # pragma: no cover - runs in the child
    from deltaplane.codecs import Compressor
    from deltaplane.delta import Delta
    from deltaplane.registry.promotion import promote

    reg = Registry(home)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    comp = Compressor("topk(0.1) | quant(bits=8)", error_feedback=False, seed=seed)

    def say(**msg: object) -> None:
        os.write(fd, (json.dumps(msg) + "\n").encode())

    while True:
        latest = reg.versions("m", kind="model")
        state = {"w": torch.randn(size, generator=gen), "b": torch.randn(16, generator=gen)}
        parent = latest[-1].number if latest else None
        a = reg.register_model("m", state, parent=parent, lineage={"seed": seed})
        say(op="model", number=a.number, sha256=a.sha256)
        if parent is not None and rng.random() < 0.5:
            base = reg.load_state(latest[-1])
            payload = comp.compress(Delta.between(base, state), base_id="m", base_version=parent)
            d = reg.register_delta("m", payload, base=parent)
            say(op="delta", number=d.number, sha256=d.sha256)
        if rng.random() < 0.5:
            promote(
                reg, a.ref, evaluator=lambda s: {"accuracy": 1.0, "ood_accuracy": 1.0}, evaluator_name="const"
            )
            say(op="promote", number=a.number)


def torture(
    home: str | os.PathLike[str],
    *,
    kills: int = 20,
    seed: int = 0,
    size: int = 50_000,
    max_delay_s: float = 0.25,
) -> TortureReport:
    """Kill a registry writer ``kills`` times at random points; returns what the checks found.

    Raises:
        ConfigError: ``kills`` is not a positive integer (checked before the scratch registry is created).
    """
    if isinstance(kills, bool) or not isinstance(kills, int) or kills < 1:
        raise ConfigError(f"kills must be a positive integer. Found {kills!r}")
    home = Path(home)
    if not (home / "registry.db").exists():
        Registry.create(home)
    rng = random.Random(seed)
    report = TortureReport()
    committed: dict[int, str] = {}
    promoted: set[int] = set()
    t0 = time.monotonic()
    for k in range(kills):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: write forever until killed
            os.close(r)
            try:
                _worker(home, w, seed * 1_000_003 + k, size)
            finally:
                os._exit(1)
        os.close(w)
        early = b""
        if k % 2 == 1:
            # Every other kill waits for the writer's first commit of this life, so the run makes progress
            # on a loaded machine too; the others land anywhere, including during start-up.
            ready, _, _ = select.select([r], [], [], 60.0)
            if ready:
                early = os.read(r, 1 << 16)
        time.sleep(rng.uniform(0.0, max_delay_s))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            lines = (early + f.read()).decode().splitlines()
        report.kills += 1
        for line in lines:
            msg = json.loads(line)
            if msg["op"] == "promote":
                promoted.add(msg["number"])
            else:
                committed[msg["number"]] = msg["sha256"]
        reg = Registry(home)
        integrity = reg.verify()
        report.problems += [f"after kill {k}: {p}" for p in integrity.problems]
        numbers = [a.number for a in reg.versions("m")]
        if numbers != list(range(1, len(numbers) + 1)):
            report.problems.append(f"after kill {k}: version numbers have gaps: {numbers[-10:]}")
        for number, sha in committed.items():
            try:
                art = reg.get("m", number)
                if art.sha256 != sha:
                    report.problems.append(f"m@{number}: sha changed after kill {k}")
                reg.read(art)
            except (IntegrityError, KeyError) as exc:
                report.problems.append(f"committed m@{number} lost after kill {k}: {exc}")
        history = {h["number"] for h in reg.tag_history("m", "production")}
        missing = promoted - history
        if missing:
            report.problems.append(f"committed promotions lost after kill {k}: {sorted(missing)}")
        report.orphans = len(integrity.orphans) + len(integrity.temp_files)
        reg.close()
    report.committed = len(committed)
    report.versions = len(Registry(home).versions("m"))
    report.seconds = time.monotonic() - t0
    return report

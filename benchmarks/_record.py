"""Record a benchmark's figures into docs/benchmarks.md under its own section (replaced on each run).

Every section states the machine, the date and the exact command, so each claim in the README can be traced
to a reproducible measurement.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every figure below is printed and recorded by a script under `benchmarks/` (`make bench` runs them all).\n"
    "Timings are ratios against a baseline measured in the same run unless stated; each section says the\n"
    "machine, the date and the command that produced it.\n"
)


def code_fingerprint() -> str:
    """A short hash of the library's source (every ``src/deltaplane`` Python file, path and bytes): benchmark
    caches are kept per fingerprint, so a result computed by other code is never recorded as today's."""
    import hashlib

    src = Path(__file__).resolve().parent.parent / "src" / "deltaplane"
    h = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def machine() -> str:
    """A one-line description of the machine the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    model = _cpu_model()
    if model:  # accuracy and timings change with the CPU model and vector width (reduction order)
        cpu = f"{cpu}, {model}"
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def _cpu_model() -> str:
    """'Intel(R) Xeon(R) Processor, AVX-512' from /proc/cpuinfo (Linux), or '' where it cannot be read."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    width = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return ", ".join(x for x in (name, width) if x)


def load() -> str:
    """The machine's load when the figures were recorded (shared machines slow timings down)."""
    one, five, _ = os.getloadavg()
    return f"1-min load average {one:.2f}, 5-min {five:.2f} on {os.cpu_count()} cores"


def record(key: str, title: str, body: str, command: str | None = None) -> None:
    """Write (or replace) the section ``key`` of docs/benchmarks.md with ``body`` (markdown)."""
    command = command or "python " + " ".join(shlex.quote(a) for a in sys.argv)
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = (
        f"{start}\n## {title}\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- load: {load()}\n"
        f"- date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n\n{body.strip()}\n{end}"
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_or_record(
    key: str,
    title: str,
    doc: str,
    note: str,
    headers: list[str],
    rows: list[list[object]],
    *,
    repeats: int,
    against: object = None,
    pairs: tuple[str, list[str], list[list[object]]] = ("", [], []),
) -> int:
    """The end of a fresh-process timing script: print its table, then, when timed ``against`` another
    checkout, the paired table ``pairs`` (unit, headers, rows) without recording anything; else record
    section ``key``: the second paragraph of the script's docstring ``doc``, the repeats, ``note`` and the table."""
    print(table(headers, rows))
    if against:
        unit, pair_headers, pair_rows = pairs
        print(f"\nPaired with {against} (median of {repeats} alternating fresh processes, {unit}):\n")
        print(table(pair_headers, pair_rows))
        return 0
    body = (
        f"{doc.split(chr(10) + chr(10))[1]}\n\nMedian of {repeats} fresh processes each "
        f"(`OMP_NUM_THREADS=1`){note}\n\n" + table(headers, rows)
    )
    record(key, title, body)
    return 0

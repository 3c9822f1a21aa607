"""Reading a wire session's text: ``WireSession.from_json`` and ``from_bytes`` on 4 MiB of tiny tensors.

A device fetches its server's session once (`WireSession.to_bytes`, at most 64 MiB) and reads it strictly:
every layout row and every template node is checked before the session is used. The worst honest case per byte
is a model of many tiny tensors (one row and one node per few dozen bytes). Two such 4 MiB texts are read:
`powersgd(rank=2)` over tensors of 2 values (its fp16 fallback: the shortest rows and nodes, ~65,000 tensors)
and `topk(0.01) | quant(bits=8)` over 4×2 tensors (nested nodes, ~20,000 tensors).

Each measurement runs in a fresh process (``OMP_NUM_THREADS=1``, one torch thread), so the garbage collector and
allocator start as a device's would; the table gives the median of ``--repeats`` processes, CPU time (the
machine is shared: wall time measures the load) with wall time beside it. ``from_json`` is the check alone, on
the parsed text; ``from_bytes`` adds the container count, the row match and ``json.loads``.

Run: ``.venv/bin/python benchmarks/session_decode.py``. ``--against DIR`` times the ``deltaplane`` under
``DIR`` (another checkout's ``src``) too, alternating with this one process by process, and prints the pairs
without recording them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import print_or_record

SRC = Path(__file__).resolve().parent.parent / "src"
TEXT_BYTES = 4 << 20
#: (codec, shape of every tensor)
CASES = [("powersgd(rank=2)", (2,)), ("topk(0.01) | quant(bits=8)", (4, 2))]

_CHILD = r"""
import gc, json, sys, time
from deltaplane.codecs import WireSession
text = open(sys.argv[1], "rb").read()
doc = json.loads(text)
gc.collect()
t, c = time.perf_counter(), time.process_time()
WireSession.from_json(doc)
out = {"from_json": (time.process_time() - c, time.perf_counter() - t)}
del doc
gc.collect()
t, c = time.perf_counter(), time.process_time()
WireSession.from_bytes(text)
out["from_bytes"] = (time.process_time() - c, time.perf_counter() - t)
print(json.dumps(out))
"""


def make_text(codec: str, shape: tuple[int, ...], path: Path) -> int:
    """Write the session of as many ``shape`` tensors as fill :data:`TEXT_BYTES` under ``codec``; its tensors."""
    import torch

    import deltaplane as dp
    from deltaplane.codecs import WireSession

    def text(n: int) -> bytes:
        layout = dp.Layout([(f"block{i}.w", shape, torch.float32) for i in range(n)])
        return WireSession.create(layout, codec, base_id="tiny").to_bytes()

    n = TEXT_BYTES * 1000 // len(text(1000))
    path.write_bytes(text(n))
    return n


def measure(src: Path, path: Path) -> dict[str, tuple[float, float]]:
    """One fresh process reading the session at ``path`` with the ``deltaplane`` under ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True, check=True
    )
    return {k: tuple(v) for k, v in json.loads(out.stdout).items()}


def _median(runs: list[dict[str, tuple[float, float]]], key: str, i: int) -> float:
    return statistics.median(r[key][i] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--against", type=Path, help="also time the deltaplane under this src directory (not recorded)"
    )
    args = ap.parse_args()
    rows, pairs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for codec, shape in CASES:
            path = Path(tmp) / "session.json"
            n = make_text(codec, shape, path)
            size = path.stat().st_size
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(measure(SRC, path))
                if args.against:
                    theirs.append(measure(args.against, path))
            name = codec.replace("|", "\\|")  # a bare | would end the markdown table cell
            cells = [f"`{name}`, {n:,} tensors of {list(shape)}", f"{size:,}"]
            for key in ("from_json", "from_bytes"):
                cells.append(f"{_median(ours, key, 0):.3f} ({_median(ours, key, 1):.3f})")
            rows.append(cells)
            if args.against:
                for key in ("from_json", "from_bytes"):
                    diffs = [a[key][0] - b[key][0] for a, b in zip(ours, theirs, strict=True)]
                    pairs.append(
                        [
                            f"`{name}`",
                            key,
                            f"{_median(theirs, key, 0):.3f}",
                            f"{_median(ours, key, 0):.3f}",
                            f"{statistics.median(diffs):+.3f}",
                        ]
                    )
    headers = ["session", "text bytes", "from_json, s CPU (wall)", "from_bytes, s CPU (wall)"]
    return print_or_record(
        "session-decode",
        "Wire session text: reading 4 MiB of tiny tensors",
        __doc__,
        "; CPU seconds, wall seconds in brackets.",
        headers,
        rows,
        repeats=args.repeats,
        against=args.against,
        pairs=("s CPU", ["session", "call", "against", "this", "median paired difference"], pairs),
    )


if __name__ == "__main__":
    raise SystemExit(main())

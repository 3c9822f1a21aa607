"""Peak memory of ``Registry.rotate_kek`` (``deltaplane registry rotate-key``) on a registry holding one large blob.

Makes an encrypted registry with one blob of ``--mib`` MiB of random bytes in a scratch folder, then rotates its
key in a fresh interpreter per source given with ``--src`` (e.g. main's and a branch's ``src``), each on its own
copy, and prints the peak RSS (``getrusage``) and the seconds the rotation took. Prints figures; records no
section (docs/security.md quotes them with the load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_MAKE = (
    "import os, sys; from deltaplane.registry import Registry; "
    "Registry.create(sys.argv[1]).put_blob(os.urandom(1 << 20) * int(sys.argv[2]))"
)
_ROTATE = (
    "import resource, sys, time; from deltaplane.registry import Registry; reg = Registry(sys.argv[1]); "
    "t = time.perf_counter(); r = reg.rotate_kek(); dt = time.perf_counter() - t; "
    "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
    "print(f'rewrapped {r.rewrapped}, peak RSS {peak / 1024:.0f} MiB, {dt:.2f} s')"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="size of the one blob (default 1 GiB)")
    p.add_argument("--src", action="append", help="a src folder to import deltaplane from (repeatable)")
    a = p.parse_args()
    sources = a.src or [str(Path(__file__).resolve().parents[1] / "src")]
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch) / "home"
        env = {**os.environ, "PYTHONPATH": sources[0], "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _MAKE, str(home), str(a.mib)], env=env, check=True)
        for i, src in enumerate(sources):
            copy = Path(scratch) / f"copy{i}"
            shutil.copytree(home, copy)
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(
                [sys.executable, "-c", _ROTATE, str(copy)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            print(f"{src}: {out.stdout.strip()} ({a.mib} MiB blob; load {os.getloadavg()[0]:.1f})")
            shutil.rmtree(copy)


if __name__ == "__main__":
    main()

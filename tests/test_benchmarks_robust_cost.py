"""benchmarks/robust_cost.py ``--record``: each robust rule's close measured in a process of its own, recorded.

docs/aggregation.md's cost table quotes the recorded section, so the recording mode must measure every spec it is
given, each in a fresh child process (a peak RSS is a process's), and say which spec failed and why.
"""

from __future__ import annotations

import pytest
from tests.benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def rc():
    with benchmark_module("robust_cost.py", "bench_robust_cost") as module:
        yield module


def test_record_measures_each_spec_in_a_child_process_and_records_one_table(rc, monkeypatch) -> None:
    import _record

    recorded, children = [], []
    real_run = rc.subprocess.run

    def spy_run(argv, **kw):
        children.append((argv, kw["env"]))
        return real_run(argv, **kw)

    monkeypatch.setattr(rc.subprocess, "run", spy_run)
    monkeypatch.setattr(_record, "record", lambda key, title, body: recorded.append((key, body)))
    body = rc.record_costs(["none", "centered_clip(0.1, iterations=3)"], 4, 1000)
    assert [a[2] for a, _ in children] == ["none", "centered_clip(0.1, iterations=3)"]
    assert all(
        env["MALLOC_MMAP_THRESHOLD_"] == "131072" and env["OMP_NUM_THREADS"] == "1" for _, env in children
    )
    assert [k for k, _ in recorded] == ["robust-cost"] and recorded[0][1] == body
    rows = [ln for ln in body.splitlines() if ln.startswith("| `")]
    assert [r.split(" | ")[0] for r in rows] == ["| `none`", "| `centered_clip(0.1, iterations=3)`"]
    assert "4 updates of 1,000 float32 values" in body
    for r in rows:  # a real process: torch alone takes well over 50 MiB
        assert float(r.split(" | ")[2].split()[0]) > 50


def test_record_names_the_spec_a_child_refused(rc, monkeypatch) -> None:
    import _record

    monkeypatch.setattr(_record, "record", lambda *a: pytest.fail("nothing is recorded when a spec fails"))
    with pytest.raises(SystemExit, match=r"^centered_clip\(tau=-1\): .*tau"):
        rc.record_costs(["centered_clip(tau=-1)"], 3, 10)

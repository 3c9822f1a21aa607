"""A ``fleet device`` under local DP keeps count of its releases across restarts (docs/fleet.md, local DP).

Its local ε grows with the privatized updates it has sent; the count lived in the client step's memory, so a
restarted device process counted, and reported (the dashboard's ``local_epsilon_max``), from zero again.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltaplane.aggregation import local_epsilon
from deltaplane.errors import ReleaseCountDamaged
from deltaplane.serve import fleet
from deltaplane.serve.device_releases import read_releases, write_releases

from .test_fleet import MODEL, Fleet, _config, _env

Z, DELTA = 0.8, 1e-3


def _local_dp_fleet(root: Path, byo_task: str) -> Fleet:
    """A service for a local-DP federation, its norm guard off (the noised updates are the devices' own)."""
    f = Fleet(root, _config(byo_task, clip="1.0", local_dp_noise=Z, dp_delta=DELTA))
    f.service = dataclasses.replace(f.service, max_update_norm_ratio=None)
    f._serve()
    return f


def _device_process(f: Fleet, tmp_path: Path, token: Path) -> subprocess.Popen:
    """``deltaplane fleet device`` for device 0, one round, as the operator starts it (its files default)."""
    return subprocess.Popen(
        [sys.executable, "-m", "deltaplane.cli", "fleet", "device", "--url", f.url, "--ca", str(f.tls.ca_cert),
         "--token-file", str(token), "--trusted", str(f.reg.home / "keys" / "signing.ed25519.pub"),
         "--federation", "fleet.yaml", "--model", MODEL, "--device", "0", "--rounds", "1", "--stage-wait", "60"],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _one_round(f: Fleet, proc: subprocess.Popen) -> str:
    """Open a plain round, close it once device 0's upload is in, and return the process's output once it has
    reported the new version and exited."""
    opened = f.admin.open_round(MODEL)
    deadline = time.monotonic() + 120
    while not f.admin.round_status(MODEL, opened["round"])["devices"]:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "device 0 did not upload"
        time.sleep(0.1)
    f.admin.close_round(MODEL, opened["round"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    return err


def test_a_restarted_device_process_goes_on_counting_its_local_dp_releases(byo_task, tmp_path) -> None:
    """Two ``fleet device`` processes, one after the other, each taking part in one round: the second reports
    the ε of two releases, not of one again (before: 0.8-noise ε of 1 round after the restart), and the file
    beside its token holds the count."""
    (tmp_path / "fleet.yaml").write_text(
        f"task: {{path: '{byo_task}'}}\nclients: {{count: 3}}\nseed: 3\n"
        f"privacy: {{clip: 1.0, local_noise: {Z}, delta: {DELTA}}}\n"
    )
    with _local_dp_fleet(tmp_path / "svc", byo_task) as f:
        token = tmp_path / "device-0.token"
        token.write_text(f.admin.issue_token(fleet.device_id(0), "fleet") + "\n")
        first = _one_round(f, _device_process(f, tmp_path, token))
        assert read_releases(tmp_path / "device-0.releases", device=0) == 1
        second = _one_round(f, _device_process(f, tmp_path, token))  # the restart
        assert read_releases(tmp_path / "device-0.releases", device=0) == 2
        reported = [r["metrics"]["epsilon"] for r in f.state.reports[MODEL]]
    one, two = (local_epsilon(noise_multiplier=Z, rounds=n, delta=DELTA) for n in (1, 2))
    assert reported == pytest.approx([one, two], rel=1e-12)  # the restart's report: two releases, not one
    assert f"local ε {one:.3f} (replace-one)" in first and f"local ε {two:.3f} (replace-one)" in second


def test_the_count_is_stored_before_the_privatized_update_leaves(byo_task, tmp_path, monkeypatch) -> None:
    """The file holds the new count when the upload starts (a crash then can only over-count), and a device
    whose count cannot be stored sends nothing."""
    with _local_dp_fleet(tmp_path / "svc", byo_task) as f:
        dev, path = f.device(0), tmp_path / "d0.releases"
        fleet.keep_releases(dev, path)
        seen: list[int] = []
        real = dev.conn.upload
        monkeypatch.setattr(
            dev.conn,
            "upload",
            lambda *a, **kw: (seen.append(read_releases(path, device=0)), real(*a, **kw))[1],
        )
        f.admin.open_round(MODEL)
        assert fleet.take_part(dev, dev.conn.open_rounds(MODEL)[0], stage_wait=5)
        assert seen == [1]

        def full_disk(*_a, **_kw):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(fleet, "write_releases", full_disk)
        f.admin.close_round(MODEL, 1)
        fleet.report_pending(dev)
        f.admin.open_round(MODEL)
        with pytest.raises(OSError, match="No space"):
            fleet.take_part(dev, dev.conn.open_rounds(MODEL)[0], stage_wait=5)
        assert seen == [1]  # the second update never reached the upload


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x01garbage", "not JSON"),
        (b'{"format": 1, "device": 0, "releases": -1}', "not a non-negative integer"),
        (b'{"format": 1, "device": 0, "releases": true}', "not a non-negative integer"),
        (b'{"format": 9, "device": 0, "releases": 3}', "not a device release count of format 1"),
        (b'{"format": 1, "device": 2, "releases": 3}', "of device 2, not of device 0"),
        (b"[1]", "not a device release count"),
        (b" " * 5000, "over the"),
    ],
)
def test_a_damaged_count_is_refused_never_reset(tmp_path, content, match) -> None:
    path = tmp_path / "device-0.releases"
    path.write_bytes(content)
    with pytest.raises(ReleaseCountDamaged, match=match):
        read_releases(path, device=0)
    assert path.read_bytes() == content  # left for the operator to restore, not overwritten


def test_a_count_round_trips_and_a_missing_file_is_zero(tmp_path) -> None:
    path = tmp_path / "sub" / "device-3.releases"
    assert read_releases(path, device=3) == 0
    write_releases(path, device=3, releases=7)
    assert read_releases(path, device=3) == 7
    assert json.loads(path.read_text()) == {"format": 1, "device": 3, "releases": 7}
    assert [p.name for p in path.parent.iterdir()] == ["device-3.releases"]  # no temp file left

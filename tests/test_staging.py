"""Staging left beside an output by a process that could not clean up (SIGKILL, OOM, power cut) is removed by the
next writer of that output, and only then: a live writer's stage, another host's, or one whose owner cannot be
checked is left, with a warning.

Before: stages were named ``.OUT.<random>`` and nothing ever removed one a killed run left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from deltaplane import staging
from deltaplane.staging import stage_dir, stage_file, sweep

#: a child that makes a stage for OUT, says its name, and waits to be killed
_CHILD = """
import sys, time
from deltaplane.staging import stage_dir
print(stage_dir(sys.argv[1]), flush=True)
time.sleep(300)
"""


def _child_stage(target: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def _named(target: Path, *, place: str | None = None, boot: str | None = None, pid: int | None = None,
           start: int | None = None, aside: bool = False) -> Path:  # fmt: skip
    """A stage folder for ``target`` named as another process would name it (this one's fields by default)."""
    my_place, my_boot, my_pid, my_start = staging._me()
    fields = (
        place or my_place,
        boot or my_boot,
        my_pid if pid is None else pid,
        my_start if start is None else start,
    )
    p = target.parent / f".{target.name}.{'old-' if aside else ''}dp1-{'-'.join(map(str, fields))}.abcd1234"
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"partial")
    return p


def test_a_live_writers_stage_survives_and_is_removed_once_it_is_killed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    proc, stage = _child_stage(target)
    try:
        assert stage.is_dir() and stage.name.startswith(".out.dp1-")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a live writer is certain: no warning either
            assert sweep(target) == []
        assert stage.is_dir()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert sweep(target) == [stage] and not stage.exists()


def test_a_killed_but_unreaped_writer_zombie_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    proc, stage = _child_stage(target)
    os.kill(proc.pid, signal.SIGKILL)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
    try:
        assert sweep(target) == [stage]
    finally:
        proc.wait()


def test_this_process_stages_are_never_removed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    mine = stage_dir(target)
    fd, file_stage = stage_file(target)
    os.close(fd)
    assert sweep(target) == [] and mine.is_dir() and file_stage.is_file()


def test_a_reused_pid_or_an_earlier_boot_means_the_owner_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    reused = _named(
        target, start=staging._me()[3] + 1
    )  # our pid, another start time: a dead owner's pid reused
    earlier_boot = _named(target, boot="0123abcd", pid=1)
    assert sorted(sweep(target)) == sorted([reused, earlier_boot])


def test_unsure_stages_are_left_with_a_warning(tmp_path: Path) -> None:
    target = tmp_path / "out"
    elsewhere = _named(target, place="0123abcd", pid=999999)  # another host or container: pid means nothing
    legacy = tmp_path / ".out.x1y2z3w4"  # named before owners were recorded
    legacy.mkdir()
    other_output = _named(tmp_path / "out.v2", pid=999999)  # .out.v2.dp1-… is out.v2's, not out's
    with pytest.warns(UserWarning) as caught:
        assert sweep(target) == []
    said = " ".join(str(w.message) for w in caught)
    assert f"left {elsewhere}" in said and "another host" in said
    assert f"left {legacy}" in said and "no owner recorded" in said
    assert elsewhere.is_dir() and legacy.is_dir() and other_output.is_dir() and str(other_output) not in said


def test_an_aside_folder_holding_the_only_copy_is_kept(tmp_path: Path) -> None:
    """Killed between moving OUT aside and renaming the new one in: the aside holds the only OUT."""
    target = tmp_path / "out"
    aside = _named(target, pid=999999, aside=True)
    with pytest.warns(UserWarning, match=f"mv {aside / 'x'} {target}"):
        assert sweep(target) == []
    target.mkdir()
    assert sweep(target) == [aside]


def test_a_long_output_name_still_stages_and_is_never_swept(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 240)
    stage = stage_dir(target)
    assert len(stage.name) <= 255 and "~." in stage.name
    fd, f = stage_file(target)
    os.close(fd)
    assert f.name.endswith(".tmp")
    assert sweep(target) == []


def _save_peft(target: Path) -> None:
    import torch

    from deltaplane.adapters import LoRADelta, LoRALayer, save_peft

    save_peft(LoRADelta({"fc.weight": LoRALayer(torch.ones(1, 3), torch.ones(2, 1), alpha=1.0)}), target)


def _makers() -> dict[str, object]:
    from deltaplane.deploy.publish import staging_dir
    from deltaplane.textfile import atomic_write_bytes

    return {
        "staging_dir (run, deploy)": staging_dir,
        "atomic_write_bytes (compress, keys, ...)": lambda t: atomic_write_bytes(t, b"x"),
        "save_peft (extract-lora)": _save_peft,
    }


@pytest.mark.parametrize("maker", list(_makers()))
def test_every_stage_maker_sweeps_first(tmp_path: Path, maker: str) -> None:
    """The helpers every command stages through remove a dead writer's stage of the same output (merge's own
    maker is covered by test_terminate_cleanup's SIGKILL test)."""
    target = tmp_path / "out"
    dead = _named(target, start=staging._me()[3] + 1)
    _makers()[maker](target)
    assert not dead.exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_names_its_stages_after_itself_not_its_parent(tmp_path: Path) -> None:
    """The owner was cached once per interpreter, so a forked child (a forked worker that writes an output)
    named its stages after its parent: its live stage was then removable once the parent died."""
    staging._me()  # the parent's owner, cached
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(write, stage_dir(tmp_path / "out").name.encode())
        finally:
            os._exit(0)
    os.close(write)
    name = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert f"-{pid}-" in name and f"-{os.getpid()}-" not in name, name

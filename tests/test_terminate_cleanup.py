"""SIGTERM (``kill``, ``timeout``, a cancelled CI job) ends every command that stages its output the way Ctrl-C
does: its hidden staging folder or ``.NAME.*.tmp`` file is removed, never left beside the output. SIGKILL cannot
be caught: the stage stays, and the next run writing the same output removes it (:mod:`deltaplane.staging`).

Each command runs in a real subprocess whose first rename into the working folder (the moment its output is
fully staged) waits; the test sends SIGTERM then. Before ``deltaplane.signals.exit_on_terminate`` was installed
around every command, Python's default action ended the process there and the stage stayed (found for ``run`` by
a newcomer; ``deploy``, ``compress``, ``extract-lora``, ``registry`` and ``keys`` did the same).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tests.test_cli_quiet import _tensors as cli_quiet_tensors

#: The child: the CLI, with os.rename / os.replace waiting (once) before a rename into the working folder.
_CHILD = """
import os, sys, time
flag, work, args = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3:]
if os.environ.get("IGNORE_SIGHUP"):  # as nohup starts a command
    import signal
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
def held(real):
    def rename(src, dst, *a, **k):
        if not os.path.exists(flag) and os.path.realpath(dst).startswith(work + os.sep):
            open(flag, "w").close()
            time.sleep(float(os.environ.get("HOLD_S", "300")))
        return real(src, dst, *a, **k)
    return rename
os.rename, os.replace = held(os.rename), held(os.replace)
from deltaplane.cli import app
app(args, prog_name="deltaplane")
"""


def _tensors(work: Path) -> tuple[str, str]:
    """test_cli_quiet's base and fine-tuned checkpoints, as command-line arguments."""
    base, new = cli_quiet_tensors(work)
    return str(base), str(new)


def _compress(work: Path) -> list[str]:
    base, new = _tensors(work)
    return ["compress", new, "--base", base, "--codec", "quant(bits=8)", "-o", str(work / "d.dpln")]


def _extract(work: Path) -> list[str]:
    base, new = _tensors(work)
    return ["extract-lora", new, "--base", base, "-o", str(work / "lora"), "--rank", "1", "--include", "fc"]


def _register(work: Path) -> list[str]:
    _, new = _tensors(work)
    _cli(work, "registry", "init", "--home", str(work / "home"))
    return ["registry", "register", "m", new, "--home", str(work / "home")]


def _pull(work: Path) -> list[str]:
    _cli(work, *_register(work))
    return ["registry", "pull", "m", "-o", str(work / "pulled"), "--home", str(work / "home")]


def _keys(work: Path) -> list[str]:
    return ["keys", "identity", "--device", "0", "--out", str(work / "k")]


def _deploy(work: Path) -> list[str]:
    from deltaplane.deploy.checkpoint import save_checkpoint
    from deltaplane.sim.model import DigitsCNN

    torch.manual_seed(0)
    save_checkpoint(DigitsCNN(), work / "ckpt", {"architecture": "DigitsCNN"})
    return ["deploy", str(work / "ckpt"), "--prune", "0.5", "--finetune-epochs", "0", "--attack-eps", "0",
            "--max-accuracy-drop", "100", "--max-ood-drop", "100", "--max-disagreement", "100",
            "--min-above-chance", "0", "-o", str(work / "out")]  # fmt: skip


def _merge(work: Path) -> list[str]:
    import yaml

    base, new = _tensors(work)
    for name, src in {"b": base, "a": new}.items():
        (work / name).mkdir()
        (work / name / "model.safetensors").write_bytes(Path(src).read_bytes())
    cfg = {"merge_method": "task_arithmetic", "base_model": str(work / "b"),
           "models": [{"model": str(work / "a"), "parameters": {"weight": 1.0}}]}  # fmt: skip
    (work / "m.yaml").write_text(yaml.safe_dump(cfg))
    return ["merge", str(work / "m.yaml"), "-o", str(work / "merged"), "--overwrite"]


def _cli(work: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deltaplane", *args], cwd=work, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _leftovers(work: Path) -> set[str]:
    """Hidden entries and ``.tmp`` files anywhere under ``work``: what a staging step leaves when cut short."""
    return {
        str(p.relative_to(work)) for p in work.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
    }


#: one command per way of staging: a folder (deploy, extract-lora), a file (compress), a registry blob, a pull's files, a secret
RECIPES: dict[str, Callable[[Path], list[str]]] = {
    "compress": _compress,
    "extract-lora": _extract,
    "registry register": _register,
    "registry pull": _pull,
    "keys identity": _keys,
    "deploy": _deploy,
}


@contextlib.contextmanager
def _held(tmp_path: Path, work: Path, args: list[str], **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """The command ``args`` in a child whose first rename into ``work`` waits (the output is then fully staged);
    yields the child at that moment, and kills it on the way out if still running."""
    flag = tmp_path / "staged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    env.pop("DELTAPLANE_SMALL", None)
    cmd = [sys.executable, "-c", _CHILD, str(flag), str(work), *args]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():  # the output is staged, its rename into place waits
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _prepared(tmp_path: Path, recipe: Callable[[Path], list[str]]) -> tuple[Path, list[str], set[str]]:
    """A working folder ``recipe`` prepared, its command, and what it holds before the command runs."""
    work = tmp_path / "w"
    work.mkdir()
    args = recipe(work)
    return work, args, _leftovers(work)


@pytest.mark.parametrize("name", list(RECIPES))
def test_sigterm_mid_write_leaves_no_stage(tmp_path: Path, name: str) -> None:
    work, args, before = _prepared(tmp_path, RECIPES[name])
    with _held(tmp_path, work, args) as proc:
        staged = _leftovers(work) - before
        assert staged, "nothing was staged: the wait caught no staging rename"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert _leftovers(work) - before == set(), f"left behind (staged: {sorted(staged)})"
    assert rc == 128 + signal.SIGTERM  # SystemExit after the cleanup, not killed by the signal


#: registry register stages only a blob's temp file in the registry's blobs/tmp: `registry verify` reports those
#: and `registry gc` removes them (the registry's own upkeep, not a stage beside an output). merge holds SIGTERM
#: during its swap (test_mergekit_parity tests its SIGTERM cleanup), but SIGKILL cannot be held.
KILLED = {**{n: r for n, r in RECIPES.items() if n != "registry register"}, "merge": _merge}


@pytest.mark.parametrize("name", list(KILLED))
def test_sigkill_mid_write_leaves_a_stage_the_next_run_removes(tmp_path: Path, name: str) -> None:
    """Before: the stage of a SIGKILLed (OOM-killed, power-cut) run stayed beside the output for good."""
    work, args, before = _prepared(tmp_path, KILLED[name])
    with _held(tmp_path, work, args) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    staged = _leftovers(work) - before
    assert staged, "SIGKILL left nothing: the wait caught no staging rename"
    _cli(work, *args, *(["--force"] if name == "keys identity" else []))  # again, to the same output
    assert _leftovers(work) - before == set(), f"left behind (staged by the killed run: {sorted(staged)})"


def test_a_signal_the_process_ignores_stays_ignored(tmp_path: Path) -> None:
    """``nohup deltaplane …``: SIGHUP is ignored when the command starts, so closing the terminal must not end it
    (the CLI-wide SIGTERM/SIGHUP handler once replaced the ignore with an exit)."""
    work = tmp_path / "w"
    work.mkdir()
    args = RECIPES["compress"](work)
    with _held(tmp_path, work, args, IGNORE_SIGHUP="1", HOLD_S="2") as proc:
        proc.send_signal(signal.SIGHUP)  # the terminal closes while the output is being put in place
        rc = proc.wait(timeout=120)
        err = proc.stderr.read().decode()
    assert rc == 0, err[-2000:]
    assert _leftovers(work) == set()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_the_servers_still_shut_down_through_uvicorn(tmp_path: Path, command: str) -> None:
    """``serve`` and ``ui`` are left to uvicorn's own SIGTERM handling (the CLI does not wrap them): it finishes
    the requests in flight, runs the app's shutdown, then re-raises SIGTERM to the handler it found, Python's
    default, so the process ends by the signal as it always did."""
    import httpx

    _cli(tmp_path, "registry", "init", "--home", str(tmp_path / "home"))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTAPLANE_ADMIN_TOKEN": "a" * 24}
    cmd = [sys.executable, "-m", "deltaplane", command, "--home", str(tmp_path / "home"), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGTERM, out.decode()[-2000:]
    assert "Finished server process" in out.decode(), out.decode()[-2000:]  # uvicorn's graceful shutdown ran

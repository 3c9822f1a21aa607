"""Every shell block of README.md and docs/*.md runs as a new user would type it, in a scratch folder.

The convention (docs writers, read this):

- A fenced block labelled ``bash``, ``sh``, ``shell`` or ``console`` is run by this test, line by line (a line
  ending in ``\\`` continues on the next), each line with ``bash -eo pipefail`` in a fresh scratch folder that
  is also ``$HOME``. In ``console`` blocks only the ``$ `` lines are commands; the other lines are output and
  are ignored. Every command must exit 0.
- ``deltaplane serve`` and ``deltaplane ui`` run until stopped: the test starts them, waits until the
  ``http://`` address written in the line's comment answers, then stops them.
- Sizes: ``DELTAPLANE_SMALL=1`` is set (docs/cli.md), so ``deltaplane run`` does at most 2 rounds over 4
  devices; everything else runs as written, so keep documented commands small.
- A block that cannot run here says why in an HTML comment on the line right before its fence:
  ``<!-- not-run: starts a long-running Flower deployment; tests/flower/test_deployment.py runs it -->``.
  The reason is shown as the test's skip reason. A block that runs but takes minutes even at small sizes (a
  transformer on every device) carries ``<!-- slow: why -->`` instead and runs with the slow tests (``-m slow``).
- The files a block reads (checkpoints, configs) are made by the page's entry in ``SETUP`` below.
- An unlabelled block that starts with a command is refused: label it ``bash``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
SLOW = re.compile(r"<!--\s*slow:\s*(.+?)\s*-->")
COMMAND_START = re.compile(r"^(\$ |deltaplane |make |flwr |flower-|pip |python )")
LONG_RUNNING = re.compile(r"^deltaplane (serve|ui)\b")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, when marked
    slow: str | None = None  # runs only with the slow tests (-m slow), with the reason

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown page, with the not-run reason of the line before each fence."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            marked = NOT_RUN.search(before)
            name = str(path.relative_to(ROOT))
            text = "\n".join(lines[start + 1 : j])
            slow = SLOW.search(before)
            found.append(
                Block(
                    name,
                    start + 1,
                    lang,
                    text,
                    marked.group(1) if marked else None,
                    slow.group(1) if slow else None,
                )
            )
            i = j + 1
        else:
            i += 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]
SHELL_BLOCKS = [b for b in ALL if b.lang in SHELLS]


def commands(block: Block) -> list[str]:
    """The commands of a block, continuation lines joined; console output lines dropped."""
    raw = block.text.splitlines()
    if block.lang == "console":
        kept, more = [], False
        for line in raw:
            if line.startswith("$ ") or more:
                kept.append(line[2:] if line.startswith("$ ") and not more else line)
                more = line.rstrip().endswith("\\")
        raw = kept
    out, parts = [], []
    for line in raw:
        line = line.strip()
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        command = " ".join([*parts, line]).strip()
        parts = []
        if command and not command.startswith("#"):
            out.append(command)
    return out


# --- what the pages' commands read --------------------------------------------------------------------------


def _checkpoints(folder: Path, names: list[str], *, hf: bool) -> None:
    """Small linear-layer checkpoints that differ a little, as a fine-tune differs from its base."""
    base = {
        "fc.weight": torch.randn(16, 12, generator=torch.Generator().manual_seed(0)),
        "fc.bias": torch.zeros(16),
    }
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i + 1)
        state = {
            k: (v + (0.1 * torch.randn(v.shape, generator=g) if i else 0)).contiguous()
            for k, v in base.items()
        }
        if hf:
            (folder / name).mkdir()
            save_file(state, folder / name / "model.safetensors")
        else:
            save_file(state, folder / f"{name}.safetensors")


def _merging(folder: Path) -> None:
    text = (ROOT / "docs" / "merging.md").read_text()
    (folder / "merge.yaml").write_text(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    _checkpoints(folder, ["base", "math", "code"], hf=True)


def _byo(folder: Path) -> None:
    python = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "byo.md").read_text(), re.S)
    (folder / "mytask.py").write_text(next(b for b in python if b.startswith("# mytask.py")))


SETUP: dict[str, Callable[[Path], None]] = {
    "docs/merging.md": _merging,
    "docs/codecs.md": lambda f: _checkpoints(f, ["base", "finetuned"], hf=False),
    "docs/adapters.md": lambda f: _checkpoints(f, ["base", "finetuned"], hf=True),
    "docs/byo.md": _byo,
}


# --- running ------------------------------------------------------------------------------------------------


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAPLANE_")}
    bin_dir = str(Path(sys.executable).parent)  # the venv's `deltaplane` entry point, as `make` installs it
    env.update(
        HOME=str(home),
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),
        DELTAPLANE_SMALL="1",
        OMP_NUM_THREADS="1",
        COLUMNS="120",
    )
    return env


def _serve_until_answered(command: str, cwd: Path, env: dict[str, str]) -> None:
    """Start a long-running command, wait for the address in its comment to answer, stop it."""
    url = re.search(r"http://[^\s)]+", command)
    assert url, f"long-running command without an http:// address in its comment: {command}"
    with open(cwd / "server.log", "w") as log:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {command.split('#')[0]}"],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.get(url.group(0), timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        log_text = (cwd / "server.log").read_text()
        assert answer is not None, f"{command!r} never answered at {url.group(0)}:\n{log_text}"
        assert answer.status_code < 500, f"{url.group(0)} answered {answer.status_code}:\n{log_text}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_convention_finds_the_shell_blocks() -> None:
    ids = {b.id for b in SHELL_BLOCKS}
    assert any(i.startswith("README.md:") for i in ids)
    assert len(SHELL_BLOCKS) >= 10
    assert commands(Block("x", 1, "console", "$ a \\\n  --b\nout\n$ c  # note", None)) == [
        "a --b",
        "c  # note",
    ]


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == ""], ids=lambda b: b.id)
def test_command_blocks_are_labelled(block: Block) -> None:
    first = next((line for line in block.text.splitlines() if line.strip()), "")
    assert not COMMAND_START.match(first), f"{block.id}: a block of commands must be fenced as ```bash"


@pytest.mark.parametrize(
    "block", [pytest.param(b, marks=[pytest.mark.slow] if b.slow else [], id=b.id) for b in SHELL_BLOCKS]
)
def test_doc_commands_run(block: Block, tmp_path: Path) -> None:
    if block.not_run is not None:
        assert len(block.not_run) > 10, f"{block.id}: say why the block cannot run"
        pytest.skip(f"not-run: {block.not_run}")
    assert shutil.which("deltaplane", path=str(Path(sys.executable).parent)), "the deltaplane entry point"
    home = tmp_path / "home"
    home.mkdir()
    if block.page in SETUP:
        SETUP[block.page](tmp_path)
    env = _env(home)
    cmds = commands(block)
    assert cmds, f"{block.id}: no command found"
    for command in cmds:
        if LONG_RUNNING.match(command):
            _serve_until_answered(command, tmp_path, env)
            continue
        done = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", command],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"{block.id}: `{command}` exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
            f"\n--- stderr\n{done.stderr[-3000:]}"
        )


def test_small_caps_rounds_and_devices_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltaplane import cli

    monkeypatch.setenv("DELTAPLANE_SMALL", "1")
    cfg = cli._run_config(None, rounds=30, clients=10, codec="stc(0.01)", lr=None)
    assert (cfg.rounds, cfg.clients, cfg.codec) == (2, 4, "stc(0.01)")
    assert cli._run_config(None, rounds=1, clients=3).rounds == 1  # already small: unchanged
    monkeypatch.setenv("DELTAPLANE_SMALL", "0")
    assert cli._run_config(None, rounds=30).rounds == 30

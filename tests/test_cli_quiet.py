"""Where the CLI's output goes (docs/cli.md): results on stdout; progress, notes and warnings on stderr, which
``deltaplane -q`` silences; errors always. Every command is enumerated from the typer app itself, so a new
command fails ``test_every_command_is_classified`` until it is given a cheap run here or a reason it has none;
the static test keeps every module on the shared consoles, which is what lets ``-q`` reach it at all (``merge``,
``deploy`` and ``extract-lora`` each built a console of their own that the global ``-q`` never silenced)."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path

import click
import pytest
import torch
import typer.main
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import deltaplane
from deltaplane.cli import app
from deltaplane.commands import set_verbosity

SRC = Path(deltaplane.__file__).parent
SHARED = SRC / "commands" / "__init__.py"


def _commands() -> list[str]:
    """Every runnable command's words (``registry list``), walked from the app as click sees it."""

    def walk(cmd: click.Command, words: list[str]) -> list[str]:
        if isinstance(cmd, click.Group):
            return [w for name, sub in sorted(cmd.commands.items()) for w in walk(sub, [*words, name])]
        return [" ".join(words)]

    return walk(typer.main.get_command(app), [])


def _tensors(tmp: Path) -> tuple[Path, Path]:
    """A base and a fine-tuned checkpoint of one small linear layer."""
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(16, 8, generator=g), "fc.bias": torch.randn(16, generator=g)}
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp / "base.safetensors")
    save_file(new, tmp / "new.safetensors")
    return tmp / "base.safetensors", tmp / "new.safetensors"


def _merge(tmp: Path) -> tuple[list[list[str]], list[str]]:
    base, new = _tensors(tmp)
    for name, src in {"b": base, "a": new}.items():
        (tmp / name).mkdir()
        (tmp / name / "model.safetensors").write_bytes(src.read_bytes())
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp / "b"),
           "models": [{"model": str(tmp / "a"), "parameters": {"weight": 1.0}}]}  # fmt: skip
    (tmp / "m.yaml").write_text(yaml.safe_dump(cfg))
    return [], ["merge", str(tmp / "m.yaml"), "-o", str(tmp / "out")]


def _compress(tmp: Path) -> tuple[list[list[str]], list[str]]:
    base, new = _tensors(tmp)
    return [], [
        "compress",
        str(new),
        "--base",
        str(base),
        "--codec",
        "quant(bits=8)",
        "-o",
        str(tmp / "d.dpln"),
    ]


def _decompress(tmp: Path) -> tuple[list[list[str]], list[str]]:
    _, compress = _compress(tmp)
    return [compress], ["decompress", str(tmp / "d.dpln"), "-o", str(tmp / "o.safetensors")]


def _apply(tmp: Path) -> tuple[list[list[str]], list[str]]:
    setup, decompress = _decompress(tmp)  # without --base: the delta itself
    base = str(tmp / "base.safetensors")
    return [*setup, decompress], [
        "apply",
        str(tmp / "o.safetensors"),
        "--base",
        base,
        "-o",
        str(tmp / "m.safetensors"),
    ]


def _extract(tmp: Path) -> tuple[list[list[str]], list[str]]:
    base, new = _tensors(tmp)
    return [], ["extract-lora", str(new), "--base", str(base), "-o", str(tmp / "lora"), "--rank", "1",
                "--include", "fc"]  # fmt: skip


def _registry(*words: str) -> Callable[[Path], tuple[list[list[str]], list[str]]]:
    def recipe(tmp: Path) -> tuple[list[list[str]], list[str]]:
        home = ["--home", str(tmp / "home")]
        setup = [] if words[1] == "init" else [["registry", "init", *home]]
        return setup, [*words, *home]

    return recipe


def _keys(*words: str) -> Callable[[Path], tuple[list[list[str]], list[str]]]:
    return lambda tmp: ([], [*words, "--out", str(tmp / "k")])


#: commands run here, cheaply, on tiny generated inputs: (setup command lines, the command checked)
CHEAP: dict[str, Callable[[Path], tuple[list[list[str]], list[str]]]] = {
    "merge": _merge,
    "compress": _compress,
    "decompress": _decompress,
    "apply": _apply,
    "extract-lora": _extract,
    "privacy epsilon": lambda tmp: ([], ["privacy", "epsilon", "-z", "1", "-q", "0.1", "-T", "10"]),
    "privacy noise": lambda tmp: ([], ["privacy", "noise", "-e", "8", "-q", "0.1", "-T", "10"]),
    "registry init": _registry("registry", "init"),
    "registry list": _registry("registry", "list"),
    "registry verify": _registry("registry", "verify"),
    "registry gc": _registry("registry", "gc"),
    "keys init": _registry("keys", "init"),
    "keys enrollment": _keys("keys", "enrollment"),
    "keys identity": lambda tmp: ([], ["keys", "identity", "--device", "0", "--out", str(tmp / "k")]),
}
#: commands too slow or too stateful to run here (a federation, a service, a model to deploy, a registry
#: holding runs), and why; the static test below still keeps them on the shared consoles
NOT_RUN: dict[str, str] = {
    "run": "a federation (seconds to minutes)",
    "deploy": "trains and evaluates a model",
    "serve": "starts a service and blocks",
    "ui": "starts a service and blocks",
    "fleet init": "a service to talk to",
    "fleet enroll": "a service to talk to",
    "fleet device": "a service to talk to",
    "fleet coordinate": "a service to talk to",
    "keys certify": "an authority and a request from other commands",
    "keys revoke": "an authority and certified devices",
    "keys tls": "a CA and certificates",
    "registry rotate-key": "an encrypted registry holding blobs",
    "registry register": "a run's output folder",
    "registry pull": "a registered version",
    "registry show": "a registered version",
    "registry repair": "a signed state log",
    "registry tag": "a registered version",
    "registry promote": "a registered version and an evaluation",
    "registry rollback": "a tag history",
    "registry withdraw": "a registered version",
    "registry torture": "kills child processes (seconds)",
}


def test_every_command_is_classified() -> None:
    """A new command has to be added to CHEAP (preferably) or NOT_RUN, so it cannot escape the checks."""
    commands = set(_commands())
    assert commands == set(CHEAP) | set(NOT_RUN), (
        f"not classified: {sorted(commands - set(CHEAP) - set(NOT_RUN))}; "
        f"gone: {sorted(set(CHEAP) | set(NOT_RUN) - commands)}"
    )
    assert not set(CHEAP) & set(NOT_RUN)


def _invoke(args: list[str]):
    try:
        return CliRunner().invoke(app, args, terminal_width=200)
    finally:
        set_verbosity(0)  # the callback set it for the process: leave the next test its notes


@pytest.mark.parametrize("command", sorted(CHEAP))
def test_quiet_success_prints_nothing_on_stderr(command: str, tmp_path: Path) -> None:
    """``deltaplane -q COMMAND`` succeeding writes nothing to stderr: no progress, no note, no warning."""
    setup, checked = CHEAP[command](tmp_path)
    for args in setup:
        r = _invoke(args)
        assert r.exit_code == 0, (args, r.output)
    r = _invoke(["-q", *checked])
    assert r.exit_code == 0, r.output
    assert r.stderr == "", f"deltaplane -q {command} wrote to stderr:\n{r.stderr}"


@pytest.mark.parametrize(
    "args",
    [
        ["privacy", "epsilon", "-z", "1", "-q", "0.1", "-T", "10", "--json"],
        ["privacy", "noise", "-e", "8", "-q", "0.1", "-T", "10", "--json"],
        ["registry", "list", "--json"],
    ],
)
def test_json_is_all_of_stdout(args: list[str], tmp_path: Path) -> None:
    """``--json`` output parses as a whole, with or without ``-q``: nothing else shares stdout with it."""
    if args[0] == "registry":
        args = [*args, "--home", str(tmp_path / "home")]
        assert _invoke(["registry", "init", "--home", str(tmp_path / "home")]).exit_code == 0
    for quiet in ([], ["-q"]):
        r = _invoke([*quiet, *args])
        assert r.exit_code == 0, r.output
        json.loads(r.stdout)


def test_quiet_never_silences_an_error(tmp_path: Path) -> None:
    """``-q`` hides notes, not the reason a command failed."""
    (tmp_path / "junk.dpln").write_bytes(b"not a payload")
    r = _invoke(["-q", "decompress", str(tmp_path / "junk.dpln"), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 1 and "error:" in r.stderr and "invalid deltaplane payload" in r.stderr, r.output


def test_quiet_never_silences_a_problem(tmp_path: Path) -> None:
    """``registry verify`` finding a problem exits 1 and says which; under ``-q`` it said nothing at all (its
    ``problem:`` lines were on the console -q silences)."""
    home = tmp_path / "home"
    assert _invoke(["registry", "init", "--home", str(home)]).exit_code == 0
    (home / "registry.db").write_text("not a database")
    r = _invoke(["-q", "registry", "verify", "--home", str(home)])
    assert r.exit_code == 1 and "problem:" in r.stderr and "registry.db" in r.stderr, r.output


def _modules() -> list[Path]:
    return [SRC / "cli.py", *sorted((SRC / "commands").glob("*.py"))]


def _called(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


#: the Console( calls allowed in the shared module: the three consoles every command prints through, and
#: fit_table's probe, which measures a table and prints nothing
SHARED_CONSOLES = 4


def test_no_command_builds_a_console_of_its_own() -> None:
    """Every command prints through commands.console / err_console / error_console: a Console built anywhere
    else is one that ``-q`` does not reach; a ``print(``, ``typer.echo(err=True)`` or a progress bar not on
    err_console bypasses them too."""
    found = []
    shared = 0
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name, where = _called(node), f"{path.relative_to(SRC)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "Console":
                if path == SHARED:
                    shared += 1
                else:
                    found.append(f"{where}: Console(...)")
            elif name == "print" and isinstance(node.func, ast.Name):
                found.append(f"{where}: print(...)")
            elif name == "echo" and "err" in keywords:
                found.append(f"{where}: typer.echo(err=...)")
            elif name == "Progress":
                target = keywords.get("console")
                if not (isinstance(target, ast.Name) and target.id == "err_console"):
                    found.append(f"{where}: Progress(...) not on err_console")
    assert not found, "output past the shared consoles:\n" + "\n".join(found)
    assert shared == SHARED_CONSOLES, f"{SHARED_CONSOLES} Console( calls expected in commands/__init__.py"

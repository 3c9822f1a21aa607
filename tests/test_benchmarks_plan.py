"""`make bench` refreshes every section of docs/benchmarks.md, each with the command that recorded it.

The page is the source of truth (its ``<!-- bench:KEY -->`` markers and ``- command:`` lines); the plan in
benchmarks/run_all.py is checked against it, and against the scripts on disk, so that a new section, a new
script or a changed invocation cannot drift out of ``make bench`` unnoticed.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"


def _run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _recorded() -> dict[str, list[str]]:
    """Section key → its recorded command as tokens, from the page itself."""
    text = PAGE.read_text()
    out = {}
    for m in re.finditer(r"<!-- bench:(.+?) -->\n## .*?\n\n- command: `([^`]*)`", text):
        out[m.group(1)] = shlex.split(m.group(2))
    keys = re.findall(r"<!-- bench:(.+?) -->", text)
    assert len(keys) == len(set(keys)), "a section key appears twice"
    assert set(keys) == set(out), f"sections without a command line: {set(keys) - set(out)}"
    return out


def test_every_section_is_refreshed_by_make_bench_or_declared_hand_compiled() -> None:
    run_all = _run_all()
    on_page = set(_recorded())
    planned = run_all.planned_sections()
    assert on_page - planned - run_all.HAND_COMPILED == set(), "sections no step of make bench records"
    assert planned - on_page == set(), "steps recording sections the page does not have"
    assert on_page >= run_all.HAND_COMPILED


def test_every_script_is_planned_or_a_helper() -> None:
    run_all = _run_all()
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    scripts.discard("run_all.py")
    planned = {step.script for step in run_all.PLAN}
    assert planned <= scripts, f"planned scripts missing: {planned - scripts}"
    assert scripts - planned - run_all.HELPERS == set(), "scripts make bench never runs"


def _normalise(tokens: list[str]) -> tuple[str, list[str]]:
    """(script file name, arguments) of a recorded command: ``nice`` and the interpreter dropped, and the
    mergekit row cache (``--keep DIR --reuse``: rows reused, not other figures) left out."""
    while tokens and (tokens[0] in ("nice", "python") or tokens[0].startswith("-n") or tokens[0] == "19"):
        tokens = tokens[1:]
    script, args = Path(tokens[0]).name, tokens[1:]
    if "--keep" in args:
        i = args.index("--keep")
        args = args[:i] + args[i + 2 :]
    return script, [a for a in args if a != "--reuse"]


def test_each_step_is_the_recorded_command() -> None:
    run_all = _run_all()
    recorded = _recorded()
    for step in run_all.PLAN:
        for key in step.sections:
            script, args = _normalise(recorded[key])
            assert script == step.script, key
            assert len(args) == len(step.args), (key, args, step.args)
            for got, want in zip(args, step.args, strict=True):
                if "{" in want:  # a scratch path or the pfl-research python, filled in at run time
                    continue
                assert got == want, (key, args, step.args)


def test_each_recorded_section_states_machine_load_and_date() -> None:
    """Timings depend on the machine and on what else runs on it: every section a script records says both
    (``_record.record`` writes the lines); only hand-compiled sections may lack them."""
    run_all = _run_all()
    text = PAGE.read_text()
    heads = dict(re.findall(r"<!-- bench:(.+?) -->\n## .*?\n\n((?:- .*\n(?:  .*\n)*)+)", text))
    assert set(heads) == set(_recorded())
    missing = {
        key
        for key, head in heads.items()
        if not all(re.search(rf"^- {line}: ", head, re.M) for line in ("machine", "load", "date"))
    }
    unrecorded = missing - run_all.HAND_COMPILED
    assert unrecorded == set(), f"sections without a machine, load or date line: {sorted(unrecorded)}"

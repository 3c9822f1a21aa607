"""The ``deltaplane`` command line: the only module that parses arguments and prints to the terminal.

Each sub-command is a thin layer over the library: it builds a config, calls the library, and renders what
came back with rich. Errors the library raises on purpose (:class:`~deltaplane.errors.DeltaplaneError`) end
the command with a one-line red message and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import click
import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deltaplane import choices, commands
from deltaplane.choices import AGGREGATORS, DEFAULT_TASK, ENGINES, PERSONALIZATIONS, TASKS, TRANSPORTS
from deltaplane.commands import (
    EXIT_REFUSED,
    check_threads,
    clean_errors,
    err_console,
    error_console,
    fit_table,
    set_verbosity,
)
from deltaplane.commands import console as shared_console
from deltaplane.errors import ConfigError
from deltaplane.signals import exit_on_terminate

if TYPE_CHECKING:  # the simulator pulls in torch; `deltaplane --help` should not wait for it
    from rich.progress import TaskID

    from deltaplane.engine.config import RunConfig
    from deltaplane.engine.results import RoundMetrics, RunResult

__all__ = ["DEFAULT_RUN_CODEC", "DEFAULT_RUN_DGC", "DEFAULT_RUN_ENGINE", "DEFAULT_RUN_PERSONALIZATION", "app"]

#: What ``deltaplane run`` compresses with unless told otherwise: STC at 0.6% density with error feedback, DGC
#: momentum correction (0.5) and momentum factor masking, in compact entropy-coded frames: on 30 paired seeds of
#: the digits federation, 348x fewer uplink bytes at -0.44 +/- 0.16 point from fp32 (worst seed -1.95), the most
#: compression within 0.5 point among the scale-free candidates (benchmarks/codecs_default.py; issue #16). The
#: default until 2026-12-06, ``stc(0.002)`` with the same options, is -1.18 there at 573x; ``stc(0.004)`` is
#: -0.99 at 431x, one seed in 30 falling 13 points. A local clip helps the sparser codecs (``stc(0.004)`` with a
#: clip at L2 norm 2.0: -0.44 at 431x) but is not a default: its threshold is one model's update scale. The
#: scale-free relative clip (``local_clip_relative=1.5``) keeps ``stc(0.004)`` from collapsing (worst seed -2.23)
#: at -0.63 +/- 0.15, short of 0.5 point.
DEFAULT_RUN_CODEC = "stc(0.006)"
#: the DGC options that go with the default codec (applied only when the codec is the default one)
DEFAULT_RUN_DGC = {"momentum_correction": 0.5, "momentum_masking": True}
#: The engine ``deltaplane run`` federates on unless ``--engine`` or the config names one: the round's devices
#: trained stacked (2-3.5x faster on the default run, equal to the sequential loop up to float32 rounding:
#: docs/sim-speed.md), where the run allows it (:func:`_default_engine`).
DEFAULT_RUN_ENGINE = "batched"
#: How the compressed run of ``deltaplane run`` personalizes (digits task, unless ``--personalization`` or the
#: config says otherwise; the fp32 baseline then runs without): every device keeps training its own α-mix model
#: each round, as a fleet's devices would, which the follow-up reports and merges. It leaves the federation as it
#: was (same global weights, accuracy and bytes: tests/sim/test_personalization_sim.py) and on the default run
#: gave +0.8 point on each device's label mix (0.977 vs 0.969, worst device -0.09; +0.4 on two test splits the
#: α-mix tie cap was not chosen on: benchmarks/personalization_audit.py), where α-mix once after the
#: federation gave +0.00 (docs/followup.md); it costs local training: `make run` 63 s instead of 30 s, back to
#: back at load average 3.4-3.9 on 2 shared cores.
DEFAULT_RUN_PERSONALIZATION = "alpha_mix"
BASELINE = "baseline"


#: What ``--engine`` accepts: the names of :data:`deltaplane.choices.ENGINES`, plus ``inprocess`` (an older name
#: of ``sequential``). A click choice rather than an Enum built from the names, which no type checker can follow.
_ENGINE_CHOICE = click.Choice([*ENGINES, "inprocess"])


#: Commands that handle SIGTERM themselves (uvicorn's graceful shutdown), so ``main`` leaves it to them.
_OWN_SIGTERM = frozenset({"serve", "ui"})

app = typer.Typer(
    name="deltaplane",
    help="Compress, aggregate, merge and ship model updates for on-device AI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # -h as well as --help, on every command; every option's default in its help
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
console = shared_console


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("deltaplane")
        except PackageNotFoundError:  # running from a source tree that is not installed
            from deltaplane import __version__ as v
        typer.echo(f"deltaplane {v}")
        raise typer.Exit()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as one yellow line on stderr (``--quiet`` hides it; ``-v`` adds where it came from), instead of
    Python's ``/path/to/module.py:186: UserWarning: ...`` followed by a line of deltaplane's source.

    It takes :func:`warnings.showwarning`'s arguments; ``file`` (where Python would print) and ``line`` (the
    source it would quote) go unused: the warning always goes to the error console, without the source."""
    where = f" ({category.__name__}, {Path(filename).name}:{lineno})" if commands.verbosity > 0 else ""
    err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(str(message))}{where}", soft_wrap=True)


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only results and errors; no progress.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail on stderr.")] = False,
) -> None:
    """deltaplane: the control plane for model deltas.

    Exit codes: 0 ok, 1 failure, 2 usage error, 3 refused by a gate (promotion, quality, privacy budget).
    """
    # A callback keeps typer in multi-command mode, so `deltaplane run` stays `run` as commands are added.
    if quiet and verbose:
        raise typer.BadParameter("--quiet and --verbose contradict each other; pick one")
    set_verbosity(-1 if quiet else 1 if verbose else 0)
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    ctx.call_on_close(
        lambda: setattr(warnings, "showwarning", previous)
    )  # an in-process caller keeps its own
    if ctx.invoked_subcommand not in _OWN_SIGTERM:
        # SIGTERM (kill, timeout, a cancelled CI job) as Ctrl-C: a command's hidden staging folder or .tmp file
        # is removed on the way out instead of left beside its output; the caller's handler is restored on close
        ctx.with_resource(exit_on_terminate())


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML file of run settings (see RunConfig).", show_default="none"
        ),
    ] = None,
    codec: Annotated[
        str | None,
        typer.Option(
            help=f"Uplink codec spec. \\[default: the task's own codec if it names one (Task.codec: the "
            f"docstrings task's LoRA variants do), else '{DEFAULT_RUN_CODEC}' with DGC momentum correction 0.5 and "
            "masking, unless the config sets a codec]"
        ),
    ] = None,
    downlink: Annotated[
        str | None,
        typer.Option(
            "--downlink",
            help="Codec spec for the global update sent to devices (server-side error feedback). \\[default: identity]",
        ),
    ] = None,
    error_feedback: Annotated[
        bool | None,
        typer.Option(
            "--error-feedback/--no-error-feedback",
            help="Devices carry what the uplink codec did not send into the next round. \\[default: on]",
        ),
    ] = None,
    momentum_correction: Annotated[
        float | None,
        typer.Option(
            help="DGC momentum correction m: devices send their velocity u <- m*u + update (0: off). "
            "\\[default: 0.5 with the default codec, else 0.0]",
        ),
    ] = None,
    local_clip: Annotated[
        float | None,
        typer.Option(
            show_default="none", help="DGC local clipping: L2 norm a device's update is scaled to first."
        ),
    ] = None,
    local_clip_relative: Annotated[
        float | None,
        typer.Option(
            show_default="none",
            help="Scale-free DGC local clipping: each device scales its update to at most this multiple "
            "(> 1) of its own earlier update norms.",
        ),
    ] = None,
    momentum_masking: Annotated[
        bool | None,
        typer.Option(
            "--momentum-masking/--no-momentum-masking",
            help="DGC momentum factor masking: zero the velocity where a value was sent. "
            "\\[default: on with the default codec, else off]",
        ),
    ] = None,
    sparsity_warmup: Annotated[
        int | None,
        typer.Option(
            show_default="0",
            help="DGC warm-up: rounds over which the uplink sparsifier's density falls from 1 to its ratio.",
        ),
    ] = None,
    clients: Annotated[
        int | None, typer.Option(show_default="20", help="Number of simulated devices.")
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            show_default=str(choices.DEFAULT_ALPHA),
            help="Label skew of the devices' data: Dirichlet concentration (smaller: each device sees fewer "
            "classes).",
        ),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(show_default=str(choices.DEFAULT_ROUNDS), help="Communication rounds.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(show_default=str(choices.DEFAULT_SEED), help="Seed of the partition, model and rounds."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json and report.html.")] = Path(
        "runs/default"
    ),
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also run uncompressed fp32 FedAvg to compare.")
    ] = True,
    aggregator: Annotated[
        str | None,
        typer.Option(show_default="fedavg", help=f"Server optimizer: {AGGREGATORS.names()}."),
    ] = None,
    dp_noise: Annotated[
        float | None, typer.Option(show_default="0.0", help="DP-FedAvg noise multiplier z (needs --clip).")
    ] = None,
    clip: Annotated[
        str | None, typer.Option(show_default="none", help="Per-client L2 clip norm: a number or 'adaptive'.")
    ] = None,
    epsilon_budget: Annotated[
        float | None,
        typer.Option(show_default="none", help="Stop before epsilon would exceed this (with --dp-noise)."),
    ] = None,
    secagg: Annotated[
        bool | None,
        typer.Option(
            "--secagg/--no-secagg", help="Aggregate through secure aggregation.", show_default="off"
        ),
    ] = None,
    secagg_neighbours: Annotated[
        int | None,
        typer.Option(
            "--secagg-neighbours",
            metavar="K",
            show_default="none",
            help="SecAgg+: each device masks with and shares its secrets to only K others (even; YAML "
            "secagg.neighbours; none: the complete graph). Needs SecAgg on (--secagg, or secagg.enabled in "
            "--config). 0: the complete graph, over a --config's degree.",
        ),
    ] = None,
    secagg_authenticated: Annotated[
        bool | None,
        typer.Option(
            "--secagg-authenticated/--no-secagg-authenticated",
            show_default="off",
            help="Authenticated SecAgg rounds (YAML secagg.authenticated): each device is enrolled by the run's "
            "own enrollment authority, signs its key advertisement and runs the consistency check before it "
            "unmasks; the same models as without. Needs SecAgg on (--secagg, or secagg.enabled in --config).",
        ),
    ] = None,
    attack: Annotated[
        str | None,
        typer.Option(
            show_default="none", help="Poisoning attack and malicious fraction, e.g. 'backdoor:0.2'."
        ),
    ] = None,
    defense: Annotated[
        str | None,
        typer.Option(
            show_default="none",
            help=(
                "Robust aggregation, e.g. 'foolsgold', 'flame(noise=0.001)', 'fltrust', 'trimmed_mean(0.2)', "
                "'geometric_median', 'centered_clip(tau=1)'."
            ),
        ),
    ] = None,
    prox_mu: Annotated[
        float | None, typer.Option(show_default="0.0", help="FedProx proximal term mu on the clients.")
    ] = None,
    personalization: Annotated[
        str | None,
        typer.Option(
            help=f"Per-device personalization in every round: {PERSONALIZATIONS.names()}; the follow-up reports "
            f"and merges the devices' personal models ('none': it personalizes once, post hoc). \\[default: "
            f"'{DEFAULT_RUN_PERSONALIZATION}' for the compressed digits run (not the fp32 baseline), unless the "
            "config sets one; else none]"
        ),
    ] = None,
    transport: Annotated[
        str | None,
        typer.Option(
            show_default="inproc",
            help="; ".join(f"{name}: {c.summary}" for name, c in TRANSPORTS.items()) + ".",
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            click_type=_ENGINE_CHOICE,
            help="; ".join(f"{name}: {c.summary}" for name, c in ENGINES.items())
            + f". \\[default: '{DEFAULT_RUN_ENGINE}' unless the config sets an engine; 'sequential' over "
            "--transport http and where the model or personalization cannot be batched]",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            show_default=DEFAULT_TASK,
            help="Your model and data: 'package.module:factory' returning a deltaplane.engine.Task, or a "
            f"built-in task ({TASKS.names()}).",
        ),
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option(
            "--task-option",
            help="key=value passed to the task factory (repeatable; value as YAML).",
            show_default="none",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the files of an earlier run in --out.")
    ] = False,
    save_personal: Annotated[
        bool,
        typer.Option(
            "--save-personal/--no-save-personal",
            help="Also write each device's personalized model into OUT/personal (with --personalization).",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            show_default="1",
            help="CPU threads, unless the config sets engine.threads (the batched engine: that many shares of "
            "the clients, trained side by side in worker processes of one torch thread each). 1 keeps speed "
            "on a shared machine.",
        ),
    ] = None,
    client_eval_every: Annotated[
        int | None,
        typer.Option(
            "--client-eval-every",
            min=0,
            metavar="N",
            show_default="1",
            help="Score every device's held-out data (the client accuracy columns) every N-th round and the "
            "last (YAML clients.eval_every); 0: never, the test set only, as Flower's and pfl-research's "
            "benchmark apps evaluate. Unscored rounds show 'not scored'. --transport http needs 1.",
        ),
    ] = None,
    followup: Annotated[
        bool,
        typer.Option(
            "--followup/--no-followup",
            help="After the federation: personalize every device, merge them, and write a deployable "
            "compressed artifact into OUT/deploy.",
        ),
    ] = True,
) -> None:
    """Federate a task (digits by default, charlm, or your own: --task) over devices with compressed updates, and report.

    Runs the fp32 baseline (codec 'identity') and the chosen codec with otherwise identical settings, prints
    a comparison table and writes report.json and report.html into --out. The compressed digits run
    personalizes every device in every round (α-mix) unless --personalization says otherwise. With --followup
    (the default), each device's global vs personal accuracy is then reported, the personal models are merged
    back into one (TIES, task arithmetic), and the global model is pruned + int8-quantized into OUT/deploy.
    """
    with clean_errors():
        if transport is not None and transport not in TRANSPORTS:
            raise ConfigError(
                f"--transport: unknown transport {transport!r}; choose one of {TRANSPORTS.names()}"
            )
        if os.getcwd() not in sys.path and "" not in sys.path:
            # --task mytask:make_task finds mytask.py in the working directory (_run_config loads the task when
            # no codec is given, to use the task's own)
            sys.path.insert(0, os.getcwd())
        full = _run_config(
            config, small=False, codec=codec, downlink_codec=downlink, error_feedback=error_feedback,
            clients=clients, alpha=alpha,
            momentum_correction=momentum_correction, local_clip=local_clip,
            local_clip_relative=local_clip_relative, momentum_masking=momentum_masking,
            sparsity_warmup=sparsity_warmup,
            rounds=rounds, seed=seed,
            aggregator=aggregator, dp_noise=dp_noise, clip=clip, epsilon_budget=epsilon_budget, secagg=secagg,
            secagg_neighbours=secagg_neighbours, secagg_authenticated=secagg_authenticated,
            attack=attack, defense=defense, prox_mu=prox_mu, personalization=personalization,
            task=task, task_options=_task_options(cfg_task_options(config), task_option),
            engine="sequential" if engine == "inprocess" else engine,
            transport=transport,
            threads=threads, client_eval_every=client_eval_every,
        )  # fmt: skip
        check_threads(full.threads)
        from deltaplane.apps.runner import preflight

        # A bad task, data that cannot be split into the devices asked for, an option the driver cannot run:
        # one line, before anything starts. Checked at the size asked for, so that DELTAPLANE_SMALL=1 (which
        # the docs' tests set) shortens a documented command but never hides that it fails at its real size.
        default_personal = personalization is None and not _config_sets(config, "personalization")
        if default_personal:
            full = _default_personalization(full)
        preflight(full)
        if engine is None and not _config_sets(config, "engine"):
            full = _default_engine(full)
        cfg = _small(full) if small_mode() else full
        if save_personal and cfg.personalization == "none":  # now, not after the whole run
            others = ", ".join(n for n in PERSONALIZATIONS if n != "none")
            raise ConfigError(f"--save-personal needs --personalization ({others})")
        if save_personal and cfg.engine == "flower" and cfg.transport == "inproc":
            raise ConfigError(
                "--save-personal: with --engine flower each device's personal model stays on its node and never "
                "reaches the server; run the sequential engine to save them"
            )
        plan = _plan_runs(cfg, with_baseline=baseline, personalize_baseline=not default_personal)
        target = _check_run_out(out, overwrite=overwrite)  # before the run: a bad --out fails fast
        # Every file goes into a hidden sibling folder that becomes --out in one rename once all are written:
        # an error or Ctrl-C half way leaves --out as it was (an earlier run's complete files, or nothing),
        # and --overwrite leaves no file of the earlier run behind (its personal/ or deploy/ next to new ones).
        # Made now, so a folder that cannot be written is refused before the run, not after it.
        # (SIGTERM ends it as Ctrl-C does, removing the stage: main() wraps every command in exit_on_terminate.)
        stage = _staging(out, target)
        try:
            results, stopped = _run_into(
                stage, out, plan, cfg, save_personal=save_personal, followup=followup
            )
            try:
                from deltaplane.deploy.publish import replace_dir

                replace_dir(
                    stage, _check_run_out(out, overwrite=overwrite)
                )  # --out may have changed meanwhile
            except OSError as exc:
                raise ConfigError(f"could not write '{out}': {exc}; nothing was changed there") from None
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        for r in results:
            final = r["final"]
            if final.get("personal_accuracy_mean") is not None:
                glob = final.get("client_mix_accuracy_mean")
                against = (
                    f" vs global {glob:.4f}; worst client change {100 * final['personal_gain_min']:+.2f} points"
                    if glob is not None  # FedPer/FedBN: no global model (engine.scoring.has_global_model)
                    else " (no global model under partial personalization: compare a FedAvg run)"
                )
                console.print(
                    f"{r['name']}: personalized ({r['config']['personalization']}) client accuracy "
                    f"{final['personal_accuracy_mean']:.4f}{against}",
                    soft_wrap=True,
                )
        # soft_wrap: a path broken across lines cannot be copied or clicked
        console.print(
            f"model:  {escape(str(out / 'model.safetensors'))} (deltaplane registry register NAME "
            f"{escape(str(out))})",
            soft_wrap=True,
        )
        console.print(f"report: [bold]{escape(str(out / 'report.html'))}[/bold]", soft_wrap=True)
        console.print(f"data:   {escape(str(out / 'report.json'))}", soft_wrap=True)
    if stopped:
        for r in stopped:
            error_console.print(  # a refusal (exit 3): -q never silences it
                f"[bold yellow]{escape(r['name'])}: {escape(r['stopped'])}[/bold yellow]", soft_wrap=True
            )
        error_console.print("the report holds every round done before the stop; follow-up steps were skipped")
        raise typer.Exit(code=EXIT_REFUSED)


def _run_into(
    stage: Path,
    out: Path,
    plan: list[tuple[str, RunConfig]],
    cfg: RunConfig,
    *,
    save_personal: bool,
    followup: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run ``plan``, print its tables, and write the model, follow-up and report into ``stage`` (which becomes
    ``out``). Returns the runs' results and those the privacy budget stopped."""
    from deltaplane.report import write_report

    results, finished = _execute(plan)
    task_name = _task_name(cfg)
    rows = _summarize(results)
    where = (
        " over HTTP (simulated devices ↔ a real deltaplane serve on loopback)"
        if cfg.transport == "http"
        else ""
    )
    for table in _summary_tables(rows, cfg.describe_aggregation() + where, task_name, width=console.width):
        console.print(table)
    cost_table = _device_cost_table(results, width=console.width)
    if cost_table is not None:
        console.print(cost_table)
    for row, result in zip(rows, results, strict=True):  # summarize keeps the runs' order
        _warn_far_below_baseline(row, str(result["config"]["codec"]))
    chance = _chance(cfg)
    for r in results:
        _warn_collapsed(r, chance)
    for note in dict.fromkeys(r["privacy_note"] for r in results if r.get("privacy_note")):
        err_console.print(f"[yellow]{escape(note)}[/yellow]", soft_wrap=True)  # a note, on stderr
    stopped = [r for r in results if r.get("stopped")]
    _save_checkpoint(finished[-1], stage, name=results[-1]["name"], task=task_name, personal=save_personal)
    after = None
    if stopped:
        pass  # the report still gets every round done before the stop; follow-up steps are skipped
    elif followup and cfg.task != DEFAULT_TASK:
        err_console.print("follow-up (personalize, merge, deploy) is the digits demo; skipped for --task")
    elif followup:
        after = _followup(finished[-1], stage / "deploy", out / "deploy", name=results[-1]["name"])
    write_report(
        results,
        stage,
        baseline=BASELINE if any(r["name"] == BASELINE for r in results) else None,
        followup=after,
    )
    return results, stopped


def _chance(cfg: RunConfig) -> float:
    """The accuracy of guessing on ``cfg``'s test set (the task is cached: the run loaded it already)."""
    from deltaplane.deploy.gates import chance_accuracy
    from deltaplane.engine import make_task

    task = make_task(cfg)
    return chance_accuracy(task.test.y.numpy(), int(task.num_classes))


def _staging(out: Path, target: Path) -> Path:
    """The hidden sibling folder the run writes into (:func:`~deltaplane.deploy.publish.staging_dir`)."""
    from deltaplane.deploy.publish import staging_dir

    try:
        return staging_dir(target)
    except OSError as exc:
        raise ConfigError(f"output '{out}' cannot be written: {exc.strerror or exc}") from None


#: A compressed run this many accuracy points or more below its baseline gets a warning next to its byte ratio.
FAR_BELOW_POINTS = 1.0
#: The codec the warning proposes instead: every coordinate in every round at 4x fewer bytes than fp32, which
#: kept the baseline's accuracy on docs/adapters.md's FFA-LoRA run (0.618 vs 0.613 in two rounds) where
#: stc(0.006) with DGC lost 39 points.
DENSE_CODEC = "quant(bits=8)"


def _warn_far_below_baseline(row: dict[str, Any], codec_spec: str) -> None:
    """Warn about a run far below its baseline, and say what to change: a sparsifier holds most of each update
    back in error feedback, which only later rounds deliver, so a short run or a small model (an adapter that
    starts at zero) needs more rounds or a denser codec. ``codec_spec`` is the run's codec spec: the row's
    ``codec`` is a display label (with SecAgg "SecAgg masked 20-bit ring values (of …)", not a spec)."""
    drop = row.get("accuracy_drop_points")
    if drop is None or drop < FAR_BELOW_POINTS:
        return
    from deltaplane.codecs import get_codec

    codec = get_codec(codec_spec)
    sparse = [s.spec for s in getattr(codec, "stages", [codec]) if s.sparsifies]
    if sparse:
        advice = (
            f"{sparse[0]} sends a small share of each tensor per round and error feedback delivers the rest only "
            f"in later rounds ({row['rounds']} here): give it more --rounds, or choose a denser codec, e.g. "
            f"--codec '{DENSE_CODEC}' (every coordinate, 4x fewer bytes than fp32)"
        )
    else:
        advice = (
            f"choose a denser codec with --codec (more bits, e.g. '{DENSE_CODEC}') or give it more --rounds"
        )
    err_console.print(
        f"[bold yellow]warning:[/bold yellow] {escape(row['name'])} ({escape(row['codec'])}) is "
        f"{drop:.2f} points below the baseline's accuracy: its byte savings cost accuracy. {escape(advice)}",
        soft_wrap=True,
    )


#: A run whose last round's test accuracy is this many points below its best round, and under half of it, has
#: collapsed rather than plateaued; one whose last round is within CHANCE_POINTS of guessing learned nothing
#: (the digits federation with 4 devices at the default lr 0.2 and momentum 0.9 reaches 0.30 in round 1 and
#: sits at chance, 0.10, from round 2 on; at lr 0.05 it reaches 0.97).
COLLAPSE_POINTS = 10.0
CHANCE_POINTS = 2.0
#: A shorter run at chance may simply not have learned yet: no advice then.
MIN_ROUNDS_AT_CHANCE = 5


def _warn_collapsed(result: dict[str, Any], chance: float) -> None:
    """Say when a run ended at chance level or fell away from its best round, and what to change: the tables
    show only the end, where a diverged run looks like a model that cannot learn. ``chance``: the test set's
    accuracy of guessing (:func:`~deltaplane.deploy.gates.chance_accuracy`)."""
    accs = [(m["test_accuracy"], m["round"]) for m in result.get("rounds", [])]
    accs = [(a, r) for a, r in accs if a is not None and math.isfinite(a)]
    if not accs:
        return
    best, best_round = max(accs, key=lambda ar: (ar[0], -ar[1]))
    final = accs[-1][0]
    collapsed = 100 * (best - final) >= COLLAPSE_POINTS and final < best / 2
    at_chance = 100 * (final - chance) < CHANCE_POINTS and len(accs) >= MIN_ROUNDS_AT_CHANCE
    if not (collapsed or at_chance):
        return
    where = f" ({chance:.3f}: guessing)" if at_chance else ""
    what = (
        f"fell from {best:.3f} (round {best_round}) to {final:.3f}{where}: training diverged"
        if collapsed
        else f"ended at chance level, {final:.3f}{where}"
    )
    lr = result.get("config", {}).get("lr")
    err_console.print(
        f"[bold yellow]warning:[/bold yellow] {escape(result['name'])}: test accuracy {what}. Try a smaller "
        f"learning rate (now {lr}; in a run config: clients: {{lr: ...}}), e.g. a quarter of it",
        soft_wrap=True,
    )


#: What ``deltaplane run`` writes into ``--out``: a folder holding only these is an earlier run's output.
RUN_OUTPUTS = frozenset(
    {"model.safetensors", "model.json", "report.json", "report.html", "deploy", "personal"}
)


def _check_run_out(out: Path, *, overwrite: bool) -> Path:
    """The folder ``--out`` names, if the run may write it; else :class:`ConfigError` saying what to change.

    It must be (or become) a writable folder, and hold nothing unless ``overwrite``; even then only an earlier
    run's files, because the new run replaces the folder as a whole (``-o . --overwrite`` must not take a
    project's sources with it).
    """
    from deltaplane.deploy.publish import check_writable_dir

    target = Path(os.path.abspath(check_writable_dir(out, hint="pass --out a folder path")))
    if Path.cwd().resolve().is_relative_to(target.resolve()):
        raise ConfigError(f"--out '{out}' is the folder you are in (or holds it); name a folder below it")
    names = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if names and not overwrite:
        # the same rule as `deltaplane merge`: never replace earlier results silently
        raise ConfigError(f"output folder '{out}' already holds files; pass --overwrite to replace them")
    foreign = [n for n in names if n not in RUN_OUTPUTS]
    if foreign:
        raise ConfigError(
            f"output folder '{out}' holds files that are not a run's ({', '.join(foreign[:5])}); --overwrite "
            "replaces an earlier run's folder as a whole, so choose another folder or move them"
        )
    return target


def _config_sets(config_file: Path | None, name: str) -> bool:
    """Whether a YAML config sets the field ``name`` (e.g. ``engine.name`` or ``engine: NAME`` for ``engine``)."""
    if config_file is None:
        return False
    from deltaplane.engine.config import RunConfig

    return name in RunConfig.from_yaml(config_file).model_fields_set


def _default_personalization(cfg: RunConfig) -> RunConfig:
    """``cfg`` personalizing as ``deltaplane run`` does when neither ``--personalization`` nor the config says:
    :data:`DEFAULT_RUN_PERSONALIZATION` for the digits task (whose follow-up reports and merges the personal
    models) in process or over HTTP; another task, or the population driver (which keeps no per-device model),
    stays without."""
    if cfg.task != DEFAULT_TASK or cfg.engine == "population" or cfg.personalization != "none":
        return cfg
    return cfg.replace(personalization=DEFAULT_RUN_PERSONALIZATION)


def _default_engine(cfg: RunConfig) -> RunConfig:
    """``cfg`` on the engine ``deltaplane run`` picks when neither ``--engine`` nor the config names one:
    :data:`DEFAULT_RUN_ENGINE` (batched) in process where it trains the devices stacked, else the sequential
    loop, which the batched engine would fall back to with a warning the user did not ask for (a model with
    buffers or random layers, FedPer / FedBN; :func:`deltaplane.sim.simulation.batching_fallback`); over
    ``--transport http`` every device trains on its own (sequential, the only engine HTTP runs)."""
    if cfg.transport != "inproc" or cfg.engine != "sequential":
        return cfg
    from deltaplane.sim.simulation import batching_fallback

    return cfg if batching_fallback(cfg) is not None else cfg.replace(engine=DEFAULT_RUN_ENGINE)


def cfg_task_options(config_file: Path | None) -> dict[str, Any]:
    """The task options a YAML config already sets (``--task-option`` adds to them)."""
    if config_file is None:
        return {}
    from deltaplane.engine.config import RunConfig

    return dict(RunConfig.from_yaml(config_file).task_options)


def _task_options(base: dict[str, Any], items: list[str] | None) -> dict[str, Any] | None:
    if not items:
        return None
    import yaml

    from deltaplane.yamlio import describe_yaml_error, load_yaml

    options = dict(base)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--task-option must be key=value. Found {item!r}")
        try:  # the same loader as the config file's task.options
            options[key.strip()] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--task-option {key.strip()}: {describe_yaml_error(exc)}") from None
        except ConfigError as exc:  # a key given twice, an alias bomb
            raise ConfigError(f"--task-option {key.strip()}: {exc}") from None
    return options


def _run_config(config_file: Path | None, *, small: bool | None = None, **options: Any) -> RunConfig:
    """The run's config: ``config_file`` (or the defaults) with the options given, the default codec unless one
    is set, and capped by ``DELTAPLANE_SMALL`` when ``small`` (default: whether it is set).

    The default codec is the task's own (:attr:`~deltaplane.engine.Task.codec`, as it is) where it names one,
    else :data:`DEFAULT_RUN_CODEC` with :data:`DEFAULT_RUN_DGC`, whose sparsity suits the digits CNN's tens of
    rounds but not a LoRA adapter's few small tensors in two or three (docs/adapters.md)."""
    from deltaplane.engine.config import RunConfig

    cfg = RunConfig.from_yaml(config_file) if config_file is not None else RunConfig()
    changes = {k: v for k, v in options.items() if v is not None}
    _secagg_degree(cfg, changes)
    if "codec" not in changes and "codec" not in cfg.model_fields_set:
        own = _task_codec(cfg.replace(**changes))
        changes["codec"] = own or DEFAULT_RUN_CODEC
        for name, value in DEFAULT_RUN_DGC.items() if own is None else ():
            if (
                name not in changes and name not in cfg.model_fields_set
            ):  # unless the command line or config sets it
                changes[name] = value
    cfg = cfg.replace(**changes)
    return _small(cfg) if (small_mode() if small is None else small) else cfg


def _task_codec(cfg: RunConfig) -> str | None:
    """The codec ``cfg``'s task names for itself (:attr:`~deltaplane.engine.Task.codec`); ``None`` for the
    digits task, whose codec is the run's default, without loading it."""
    from deltaplane.engine import DEFAULT_TASK, make_task

    return None if cfg.task == DEFAULT_TASK else make_task(cfg).codec


def _secagg_degree(cfg: RunConfig, changes: dict[str, Any]) -> None:
    """Fit ``--secagg-neighbours`` and ``--(no-)secagg`` (in ``changes``) to the config's SecAgg, like every flag
    over ``--config``: the flag wins. ``--secagg-neighbours`` needs SecAgg on in the run (``--secagg`` or the
    config's ``secagg.enabled``), never silently dropped, and ``0`` asks for the complete graph (no degree, over
    the config's); ``--secagg-authenticated`` needs SecAgg on too; ``--no-secagg`` turns SecAgg off together with
    the config's SecAgg+ degree, ``secagg.authenticated`` and distributed DP's ``secagg.min_contributors``, which
    mean nothing without it. The degree itself is checked by the config."""
    secagg = changes.get("secagg", cfg.secagg)
    degree = changes.get("secagg_neighbours")
    if degree == 0:  # the complete graph: the config's degree (if any) is dropped, whatever runs SecAgg
        changes["secagg_neighbours"] = degree = None
    how = (
        "--no-secagg turns SecAgg off"
        if "secagg" in changes
        else "add --secagg (or set secagg.enabled: true in --config)"
    )
    if degree is not None and not secagg:
        raise ConfigError(
            f"--secagg-neighbours {degree} is SecAgg+'s degree (how many devices each one masks with); it needs "
            f"secure aggregation: {how}"
        )
    if changes.get("secagg_authenticated") and not secagg:
        raise ConfigError(
            "--secagg-authenticated authenticates secure aggregation rounds (signed key advertisements, the "
            f"consistency check); it needs secure aggregation: {how}"
        )
    if (
        not secagg
    ):  # SecAgg's own settings go with it (a flag that sets one was refused above or by the config)
        for name in ("secagg_neighbours", "secagg_min_contributors"):
            if name not in changes and getattr(cfg, name) is not None:
                changes[name] = None
        if "secagg_authenticated" not in changes and cfg.secagg_authenticated:
            changes["secagg_authenticated"] = False


SMALL_ENV = "DELTAPLANE_SMALL"
SMALL_ROUNDS, SMALL_CLIENTS = 2, 4


def small_mode() -> bool:
    """Whether ``DELTAPLANE_SMALL`` asks for small runs (docs/cli.md)."""
    return os.environ.get(SMALL_ENV, "") not in ("", "0")


def _small(cfg: RunConfig) -> RunConfig:
    """Cap rounds and devices (DELTAPLANE_SMALL=1): the docs' commands run in seconds in CI, and say so.

    A task that brings its own devices (``charlm``: one per module) keeps them all: it runs with exactly those.
    """
    from deltaplane.engine import make_task

    keep = make_task(cfg).natural_split
    rounds, clients = min(cfg.rounds, SMALL_ROUNDS), cfg.clients if keep else min(cfg.clients, SMALL_CLIENTS)
    while True:
        # the fewest devices at which the options still mean what they say (an attack fraction of 0.1 needs
        # one attacker, Krum n > 2f + 2): never a refusal the full-size run would not get
        try:
            small = cfg.replace(rounds=rounds, clients=clients)
            small.attacker_count()  # checked by the driver, not by the config: asked here
            break
        except ConfigError:
            if clients >= cfg.clients:
                raise
            clients += 1
    if (rounds, clients) != (cfg.rounds, cfg.clients):
        err_console.print(
            f"{SMALL_ENV} is set: {rounds} rounds (not {cfg.rounds}) over {clients} devices (not {cfg.clients})"
        )
    return small


#: the DGC options of a run turned off (the fp32 baseline is plain FedAvg)
NO_DGC = {
    "momentum_correction": 0.0,
    "local_clip": None,
    "local_clip_relative": None,
    "momentum_masking": False,
    "sparsity_warmup": 0,
}


def _plan_runs(
    cfg: RunConfig, *, with_baseline: bool, personalize_baseline: bool = True
) -> list[tuple[str, RunConfig]]:
    """The runs of ``deltaplane run``: the fp32 baseline (unless not ``with_baseline``) and ``cfg``. The baseline
    personalizes as ``cfg`` does only with ``personalize_baseline`` (the user asked for it): the default α-mix
    is for the follow-up, which reads the last run, and leaves the federation's figures as they were."""
    from deltaplane.codecs import get_codec

    if get_codec(cfg.codec).spec == "identity" and get_codec(cfg.downlink_codec).spec == "identity":
        return [(BASELINE, cfg)]  # the chosen codec *is* the baseline; running it twice would prove nothing
    # the baseline is fp32 both ways, so "vs fp32" compares against no compression at all
    fp32 = cfg.replace(codec="identity", downlink_codec="identity", **NO_DGC)  # plain FedAvg, no DGC stage
    if not personalize_baseline:
        fp32 = fp32.replace(personalization="none")
    runs = [(BASELINE, fp32)] if with_baseline else []
    return [*runs, ("compressed", cfg)]


def _summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from deltaplane.report import summarize

    baseline = BASELINE if any(r["name"] == BASELINE for r in results) else None
    return [row.to_dict() for row in summarize(results, baseline)]


def _followup(result: RunResult, deploy_dir: Path, shown: Path, *, name: str) -> dict[str, Any]:
    """Personalize, merge and deploy ``result``'s global model into ``deploy_dir``, printing a table per step;
    the report and tables name the deploy folder ``shown``, where ``deploy_dir`` will be once published."""
    from deltaplane.apps.digits.followup import run_followup

    console.print(f"[bold]after the federation[/bold] (global model of run '{escape(name)}'):")
    with console.status("starting…") as status:
        after = run_followup(result, deploy_dir, progress=lambda msg: status.update(escape(msg)))
    deploy = after["deploy"]
    if not deploy.get("refused"):
        deploy["out_dir"], deploy["artifact"] = str(shown), str(shown / Path(deploy["artifact"]).name)
    for table in _followup_tables(after):
        console.print(table)
    return {"run": name, **after}


#: A column of the run summary: its header, and the cell it shows for one run's result.
Column = tuple[str, Callable[[dict[str, Any]], str]]
#: The one look of the run summary's tables: a rule under the header, no outer padding.
_plain_table = partial(Table, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def _followup_tables(after: dict[str, Any]) -> list[Table]:
    p, m, d = after["personalization"], after["merge"], after["deploy"]
    pers = _plain_table(
        title=f"personalization ({_personalization_how(p)}; "
        f"{p['devices_personalized']}/{p['devices']} devices serve a personal model)",
        # the worst device's own change goes under the table: beside the minimum it read as the minimum's change
        # ("0.9524 (worst -0.09)" under a global minimum of 0.9467), which it is not
        caption="accuracy on each device's own label mix; "
        + (
            f"worst device's change {100 * p['gain_min']:+.2f} points"
            if p.get("gain_min") is not None
            # FedPer/FedBN: the global state's local layers are untrained (engine.scoring.has_global_model)
            else "no global model under partial personalization: compare a FedAvg run"
        ),
        min_width=70,
    )
    pers.add_column("model")
    for h in ("device acc mean", "device acc min"):
        pers.add_column(h, justify="right")
    if p.get("global_accuracy_mean") is None:
        pers.add_row(
            "personalized", f"{p['personal_accuracy_mean']:.4f}", f"{p['personal_accuracy_min']:.4f}"
        )
    else:
        pers.add_row("global", f"{p['global_accuracy_mean']:.4f}", f"{p['global_accuracy_min']:.4f}")
        min_change = 100 * (p["personal_accuracy_min"] - p["global_accuracy_min"])
        pers.add_row(
            "personalized",
            f"{p['personal_accuracy_mean']:.4f} ({100 * p['gain_mean']:+.2f})",
            f"{p['personal_accuracy_min']:.4f} ({min_change:+.2f})",
        )
    title = f"merge ({m['models']} personalized models into one)"
    mer = _plain_table(
        title=title if not m.get("skipped") else f"merge skipped: {m['skipped']}", min_width=70
    )
    mer.add_column("model")
    for h in ("test acc", "device acc mean"):
        mer.add_column(h, justify="right")
    for method, r in m["results"].items():
        mer.add_row(method, f"{r['test_accuracy']:.4f}", _fmt(r.get("mean_device_accuracy")))
    if d.get("refused"):
        dep = _plain_table(title="deploy refused by its quality gates (no artifact written)", min_width=70)
        dep.add_column("gate missed")
        for reason in d["reasons"]:
            dep.add_row(escape(reason))
        return [pers, mer, dep]
    dep = _plain_table(
        title=f"deploy (prune {float(d['prune']):.0%} + {d['quant']}, {d['gates_passed']} quality gates passed) "
        f"→ {escape(d['artifact'])}",
    )
    for h in ("fp32 safetensors", "artifact", "smaller", "acc fp32", "acc artifact", "latency b=1"):
        dep.add_column(h, justify="right", no_wrap=True)
    dep.add_row(
        _human_bytes(d["fp32_safetensors_bytes"]),
        _human_bytes(d["artifact_bytes"]),
        f"{d['compression_ratio']:.2f}×",
        f"{d['accuracy_fp32']:.4f}",
        f"{d['accuracy_compressed']:.4f} ({-d['accuracy_drop_points']:+.2f})",
        f"{d['latency_ratio_batch1']:.2f}×",
    )
    return [pers, mer, dep]


def _personalization_how(p: dict[str, Any]) -> str:
    """How the follow-up's devices were personalized, in a few words (its table's title)."""
    epochs = f", {p['epochs']} local epochs" if p.get("epochs") else ""
    if p.get("in_round", False):
        return f"{p['method']} in every round{epochs.replace('epochs', 'epochs each')}"
    return f"{p['method']} post hoc, once from the final global model{epochs}"


def _execute(plan: list[tuple[str, RunConfig]]) -> tuple[list[dict[str, Any]], list[RunResult]]:
    from deltaplane.apps.runner import run_federation

    results: list[dict[str, Any]] = []
    finished: list[RunResult] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console) as progress:  # progress on stderr: --quiet hides it
        for name, cfg in plan:
            task = progress.add_task(f"{name:<10} {escape(cfg.codec)}", total=cfg.rounds, acc="-----")
            result = run_federation(cfg, progress=_advance(progress, task))
            results.append({"name": name, **result.to_dict()})
            finished.append(result)
    return results, finished


def _advance(progress: Progress, task: TaskID) -> Callable[[RoundMetrics], None]:
    def on_round(metrics: RoundMetrics) -> None:
        progress.update(task, advance=1, acc=f"{metrics.test_accuracy:.3f}")

    return on_round


def _save_checkpoint(result: RunResult, out: Path, *, name: str, task: str, personal: bool) -> Path:
    """Write the run's final global model (``OUT/model.safetensors``) and what produced it (``OUT/model.json``,
    which ``deltaplane registry register`` reads as lineage); with ``personal``, each device's personalized model."""
    import json

    from safetensors.torch import save_file

    if personal and not result.personal_states:
        others = ", ".join(n for n in PERSONALIZATIONS if n != "none")
        raise ConfigError(f"--save-personal needs --personalization ({others})")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.safetensors"
    tmp = path.with_suffix(".tmp")
    # the built-in digits CNN names its architecture, so `deltaplane deploy OUT/model.safetensors` can build it
    metadata = (
        {"config": json.dumps({"architecture": "DigitsCNN", "num_classes": 10})}
        if result.config.task == DEFAULT_TASK and result.config.task_options.get("model", "cnn") == "cnn"
        else None
    )
    save_file({k: v.contiguous() for k, v in result.final_state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    meta = {
        "kind": "deltaplane-run",
        "run": name,
        "task": task,
        "config": result.config.to_dict(),
        "final": result.final.to_dict(),
        "total_uplink_bytes": result.total_uplink_bytes,
    }
    from deltaplane.report.writer import json_safe

    # strict JSON (a NaN metric as null): `registry register OUT` reads it into a version's lineage
    (out / "model.json").write_text(json.dumps(json_safe(meta), indent=1, allow_nan=False))
    if personal:
        folder = out / "personal"
        folder.mkdir(exist_ok=True)
        for cid, state in sorted(result.personal_states.items()):
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(folder / f"device-{cid:05d}.safetensors")
            )
    return path


def _task_name(cfg: RunConfig) -> str:
    from deltaplane.engine import make_task

    return make_task(cfg).name


def _summary_tables(
    rows: list[dict[str, Any]], aggregation: str, task: str = "digits", *, width: int
) -> list[Table]:
    """The runs' results at ``width`` columns: one table, or two when it would not fit.

    The privacy and safety columns (ε spent, refused updates, backdoor success) appear when a run has them;
    when the whole table is wider than ``width`` they move to a table of their own under the results, keyed by
    run, since rich would otherwise shrink numbers to ``0.96…`` and crop the last column (``time``) without a
    word."""
    columns: list[Column] = [
        ("test\nacc", lambda r: f"{r['final_accuracy']:.4f}"),
        ("client acc\nmean / min", _client_accuracy),
        ("uplink\ndownlink", lambda r: f"{_human_bytes(r['uplink_bytes'])}\n{_human_bytes(r['downlink_bytes'])}"),
        (_ratio_header(rows), _ratio),
        ("time", lambda r: f"{r['wall_time_s']:.1f} s"),
    ]  # fmt: skip
    extra: list[Column] = [
        (header, _optional_cell(key, fmt))
        for header, key, fmt in (
            ("ε", "epsilon", "{:.3f}"),
            ("ε\nneighbours", "dp_adjacency", "{}"),  # what ε holds for: add/remove, zero-out, replace-one
            ("rejected", "rejected", "{}"),
            ("backdoor", "backdoor_success", "{:.3f}"),
        )
        if any(r.get(key) for r in rows)
    ]
    title = f"deltaplane run: {escape(aggregation)} on {escape(task)}"
    whole = _results_table(title, rows, [*columns[:-1], *extra, columns[-1]], codec=True)
    if fit_table(whole, width) or not extra:
        return [whole]
    tables = [
        _results_table(title, rows, columns, codec=True),
        _results_table("privacy and safety (the runs above)", rows, extra, codec=False),
    ]
    for table in tables:
        fit_table(table, width)
    return tables


def _optional_cell(key: str, fmt: str) -> Callable[[dict[str, Any]], str]:
    """The cell of a column only some runs fill: the run's ``key`` in ``fmt``, or a dash where it has none."""
    return lambda r: "—" if r.get(key) is None else fmt.format(r[key])


def _results_table(
    title: str,
    rows: list[dict[str, Any]],
    columns: list[Column],
    *,
    codec: bool,
) -> Table:
    """A table of one row per run: its name (folded when long), with ``codec`` its codec, then ``columns``
    (header, cell), right-aligned and never wrapped: a number is never cut."""
    table = _plain_table(title=title)
    table.add_column("run", overflow="fold")
    if codec:
        # wraps at " | " before it breaks "quant(bits=8)"
        table.add_column("codec", min_width=13, overflow="fold")
    for header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        name = escape(r["name"]) + (" [yellow](stopped)[/yellow]" if r.get("stopped") else "")
        table.add_row(name, *([escape(r["codec"])] if codec else []), *(cell(r) for _, cell in columns))
    return table


def _ratio_header(rows: list[dict[str, Any]]) -> str:
    """What :func:`_ratio` divides by, said in the header: the fp32 baseline run's uplink bytes (report.html's
    "uplink vs baseline run") or, with no baseline, the raw float32 tensors ("uplink vs raw fp32 tensors"),
    which differ by the baseline's frame headers: two "vs fp32" figures a little apart confused a reader."""
    if any(r["ratio_vs_baseline"] is not None for r in rows):
        return "vs fp32\nrun"
    return "vs raw\nfp32"


def _ratio(row: dict[str, Any]) -> str:
    """A run's uplink saving: against the baseline run, or without one against raw float32 updates."""
    ratio = row["ratio_vs_baseline"] if row["ratio_vs_baseline"] is not None else row["ratio_vs_raw"]
    return f"{ratio:.1f}×" if ratio is not None else "—"


def _device_cost_table(results: list[dict[str, Any]], *, width: int) -> Table | None:
    """What one round cost a mean participating device, per run (``RunResult.device_cost``), or None; laid out
    for ``width`` columns (a long run name folds, the numbers stay whole)."""
    runs = [r for r in results if r.get("device_cost")]
    if not runs:
        return None
    first = runs[0]["device_cost"]
    links = list(first["mean"]["total_uj"])
    table = _plain_table(
        title=f"device cost per round (mean participating device, {first['profile']} profile; estimates)"
    )
    table.add_column("run", overflow="fold")
    for header in ("training\nMACs", "training\nmJ", "sent\nreceived", *(f"total mJ\n{k}" for k in links)):
        table.add_column(header, justify="right", no_wrap=True)
    for r in runs:
        m = r["device_cost"]["mean"]
        table.add_row(
            r["name"],
            f"{m['train_macs'] / 1e6:,.1f} M",
            f"{m['compute_uj'] / 1e3:.2f}",
            f"{_human_bytes(round(m['bytes_up']))}\n{_human_bytes(round(m['bytes_down']))}",
            *(f"{m['total_uj'][k] / 1e3:.2f}" for k in links),
        )
    fit_table(table, width)
    return table


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _client_accuracy(row: dict[str, Any]) -> str:
    """The final round's client accuracies, mean / min; "not scored" where that round scored no device's
    held-out data (``--client-eval-every 0``, or a Poisson round that sampled nobody): NaN, not a number."""
    mean, worst = row.get("client_accuracy_mean"), row.get("client_accuracy_min")
    if mean is None or worst is None or math.isnan(mean) or math.isnan(worst):
        return "not scored"
    return f"{_fmt(mean)} / {_fmt(worst)}"


def _human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _register_command_modules() -> None:
    """Add every ``deltaplane.commands.<area>`` module's commands: each area owns its sub-commands."""
    import pkgutil

    import deltaplane.commands as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{package.__name__}.{info.name}").register(app)


_register_command_modules()


if __name__ == "__main__":  # pragma: no cover
    app()

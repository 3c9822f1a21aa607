"""``deltaplane merge CONFIG.yaml -o OUT/``: stream-merge checkpoints named by a mergekit-style YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltaplane.commands import (
    DEFAULT_THREADS,
    Threads,
    check_threads,
    clean_errors,
    console,
    cpu_threads,
    err_console,
    warn_withdrawn_inputs,
)

__all__ = ["register"]


def _parse_size(text: str) -> int:
    """``--max-shard-size``: bytes from '5GB', '500MB' or '1000000'; a usage error for anything else,
    including a size that is not a finite number of bytes ('inf', '1e309')."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("kmgib")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise typer.BadParameter(f"size must look like 5GB, 500MB or 1000000. Found {text!r}")
    try:
        return int(float(num) * units[unit])
    except (ValueError, OverflowError):  # not a number, nan; inf or beyond the float range
        raise typer.BadParameter(
            f"size must look like 5GB, 500MB or 1000000 (a finite number of bytes). Found {text!r}"
        ) from None


def merge_command(
    config: Annotated[Path, typer.Argument(help="merge config in mergekit's YAML format")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (Hugging Face layout)")],
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it exists (after the merge succeeds)")
    ] = False,
    max_shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB")] = "5GB",
    chunk_elements: Annotated[
        int, typer.Option(help="elements per input merged at once; peak memory ≈ (inputs + a few) × chunk")
    ] = 1 << 18,
    exact_accumulation: Annotated[
        bool,
        typer.Option(
            help="compute half-precision merges in float32 and round once at the output "
            "(default: like mergekit, compute in the config's dtype)"
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress bar or notes (as `deltaplane -q merge`)")
    ] = False,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Merge models from safetensors in row chunks (bounded memory) and write safetensors to OUT."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deltaplane.deploy.publish import check_writable_dir
    from deltaplane.merging.streaming import prepare_merge

    shard_bytes = _parse_size(max_shard_size)
    # every check (output, config, method, models, parameters, --threads) before the bar is drawn or any work
    # starts: a bad config is an error line, not an error under an empty progress bar. OSError: an input that
    # cannot be read (exit 1)
    with clean_errors(OSError):
        check_writable_dir(out, hint="pass -o a folder path")
        check_threads(threads)
        job = prepare_merge(
            config,
            out,
            overwrite=overwrite,
            max_shard_bytes=shard_bytes,
            chunk_elements=chunk_elements,
            exact_accumulation=exact_accumulation,
            threads=threads,
        )
    warn_withdrawn_inputs((ckpt.folder for ckpt in job.plan.models), "merged")
    # clean_errors is outermost, so the progress bar has stopped before an error line is printed; OSError: a
    # folder the checks above cannot foresee refusing the output (a read-only or virtual file system)
    with (
        clean_errors(OSError),
        job,
        cpu_threads(threads),
        Progress(
            TextColumn("[bold]merge"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[tensor]}"),
            console=err_console,  # stderr, which the global -q silences
            disable=quiet,
            transient=False,
        ) as bar,
    ):
        task = bar.add_task("merge", total=len(job.plan.tensors), tensor="")

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, tensor=name)

        result = job.run(progress)
    console.print(  # the result, on stdout
        f"merged {result.n_tensors} tensors ({result.n_params:,} params, {result.nbytes / 1e6:.1f} MB) "
        f"into {result.out_dir} in {result.seconds:.2f} s: {', '.join(result.files)}",
        markup=False,
        soft_wrap=True,
    )
    if not quiet:  # notes are stderr's, like the bar: either -q silences them
        for note in result.notes:
            err_console.print(f"note: {note}", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``merge`` to the deltaplane CLI."""
    app.command("merge")(merge_command)

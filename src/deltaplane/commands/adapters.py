"""``deltaplane extract-lora FINETUNED --base BASE --rank r -o ADAPTER/``: a PEFT adapter from a full fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deltaplane.commands import (
    DEFAULT_THREADS,
    Threads,
    clean_errors,
    cpu_threads,
    fit_table,
    warn_withdrawn_inputs,
)

__all__ = ["register"]


def extract_lora_command(
    finetuned: Annotated[Path, typer.Argument(help="fine-tuned model: folder (model.safetensors) or file")],
    base: Annotated[Path, typer.Option("--base", help="the base model it was fine-tuned from")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output PEFT adapter folder")],
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            "-r",
            help="rank of every layer (cap with --energy)",
            show_default="none: set by --energy",
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(
            help="per-layer rank: smallest keeping this fraction of the change's squared norm",
            show_default="none: --rank for every layer",
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="regex on weight names to extract (repeatable)", show_default="every 2-D weight"),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="regex on weight names to skip (default: embeddings, heads)")
    ] = None,
    bias: Annotated[bool, typer.Option(help="carry changed biases as lora_B.bias (lora_bias=true)")] = True,
    fan_in_fan_out: Annotated[
        list[str] | None,
        typer.Option(
            "--fan-in-fan-out",
            help="regex on weight names stored (in, out) as transformers' Conv1D does (repeatable)",
            show_default="GPT-2's c_attn/c_proj/c_fc when a folder's config.json is a GPT-2-family model",
        ),
    ] = None,
    randomized_above: Annotated[
        int, typer.Option(help="randomized SVD for layers whose smaller side exceeds this")
    ] = 256,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-layer table")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing output folder")] = False,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Extract a LoRA adapter (truncated SVD per linear layer, streamed) and report each layer's error."""
    import time

    from rich.markup import escape
    from rich.table import Table

    from deltaplane.adapters.extract import DEFAULT_EXCLUDE, extract_lora
    from deltaplane.commands import console, err_console  # the shared ones, which -q reaches

    with clean_errors(OSError), cpu_threads(threads):
        from deltaplane.deploy.publish import check_writable_dir

        check_writable_dir(out, hint="give -o a folder path")  # under a file, unwritable: before any work
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            from deltaplane.errors import ConfigError

            # the rule every command that writes a folder follows (docs/cli.md)
            raise ConfigError(f"output '{out}' already exists; pass --overwrite to replace it")
        warn_withdrawn_inputs([finetuned, base], "used for the adapter")
        t = time.perf_counter()
        result = extract_lora(
            finetuned,
            base,
            rank=rank,
            energy=energy,
            include=include or None,
            exclude=tuple(exclude) if exclude else DEFAULT_EXCLUDE,
            bias=bias,
            randomized_above=randomized_above,
            fan_in_fan_out=fan_in_fan_out or None,
        )
        if not result.lora:
            from deltaplane.errors import AdapterError

            raise AdapterError("no selected linear layer differs between the two models: nothing to extract")
        result.lora.base_model = str(base)
        result.lora.save_peft(str(out))
        seconds = time.perf_counter() - t
    if not quiet:
        table = Table()
        table.add_column("layer", overflow="fold")  # folded, never "model.layers.0.s…": q, k and v alike
        for header in ("shape", "rank", "rel. error", "energy kept", "svd"):
            table.add_column(header, no_wrap=True)
        for r in result.layers:
            table.add_row(
                escape(r.name), "x".join(map(str, r.shape)), str(r.rank), f"{r.rel_error:.4f}", f"{r.energy:.4f}",
                "randomized" if r.randomized else "full",
            )  # fmt: skip
        fit_table(table, console.width)
        console.print(table, soft_wrap=True)
    for name, rel in result.uncaptured.items():
        err_console.print(  # a warning, on stderr
            f"[yellow]not in the adapter:[/yellow] {escape(name)} changed by {rel:.3g} of its norm",
            soft_wrap=True,
        )
    console.print(  # the result, on stdout; escaped: a [..] in a path is not rich markup
        escape(
            f"extracted {len(result.layers)} layers ({result.lora.numel():,} values, "
            f"{result.lora.nbytes / 1e6:.2f} MB), mean relative error {result.mean_error():.4f}, into {out} in "
            f"{seconds:.2f} s"
        ),
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``extract-lora`` to the deltaplane CLI."""
    app.command("extract-lora")(extract_lora_command)

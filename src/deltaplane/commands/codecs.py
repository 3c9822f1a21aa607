"""``deltaplane compress`` / ``decompress`` / ``apply``: standalone update compression of safetensors files.

``compress`` turns a fine-tuned checkpoint into a compact ``.dpln`` payload of its change against a base
checkpoint; ``decompress`` turns the payload back into a delta, or, given the base, into the new checkpoint;
``apply`` turns a saved delta and its base into the new checkpoint. The payload and the delta file record the
base's SHA-256 fingerprint, and a delta is applied only to that base unless ``--allow-other-base`` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from deltaplane.commands import DEFAULT_THREADS, Threads, clean_errors, console, cpu_threads, err_console

if TYPE_CHECKING:
    import torch

    from deltaplane.delta import Delta

__all__ = ["register"]

AllowOtherBase = Annotated[
    bool,
    typer.Option(
        "--allow-other-base",
        help="apply the delta even if --base is not the base it was taken against (its recorded fingerprint)",
    ),
]


def _load_state(path: Path) -> dict:
    """The tensors of a checkpoint: a ``.safetensors`` file, or a Hugging Face folder — its
    ``model.safetensors``, else ``model.safetensors.index.json`` + shards read by
    :func:`deltaplane.shards.load_sharded`, as ``deploy`` and ``registry register`` read them (a shard named
    ``../x``, by an absolute path or through a link leading out of the folder is a :class:`DecodeError`).

    Raises:
        ConfigError: a folder with neither (a ``pytorch_model.bin`` is never unpickled: convert it first), or
            whose weights file is not a regular file (:func:`deltaplane.shards.folder_weights`).
    """
    from deltaplane.delta import Delta
    from deltaplane.errors import ConfigError
    from deltaplane.shards import INDEX_NAME, folder_weights, load_sharded

    if not path.is_dir():
        return dict(Delta.load(path))
    weights = folder_weights(path)
    if weights is not None:
        return load_sharded(path)[0] if weights.name == INDEX_NAME else dict(Delta.load(weights))
    raise ConfigError(
        f"{path} holds neither model.safetensors nor {INDEX_NAME}; a .bin checkpoint must be converted first "
        "(load it with torch and save_file(state, 'model.safetensors'))"
    )


def compress(
    new: Annotated[
        Path,
        typer.Argument(help="fine-tuned checkpoint (.safetensors, or a Hugging Face folder)", exists=True),
    ],
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            help="base checkpoint the delta is taken against (.safetensors, or a Hugging Face folder)",
            exists=True,
        ),
    ],
    codec: Annotated[
        str, typer.Option("--codec", help="codec spec, e.g. 'topk(0.01) | quant(bits=4) | zstd'")
    ],
    # dir_okay=False: a folder given as -o is a usage error before the work, not an OSError naming a temp file
    out: Annotated[Path, typer.Option("-o", "--out", help="payload to write (.dpln)", dir_okay=False)],
    base_id: Annotated[str, typer.Option(help="base model id recorded in the payload")] = "",
    base_version: Annotated[int, typer.Option(help="base model version recorded in the payload")] = 0,
    seed: Annotated[int, typer.Option(help="seed of stochastic codecs")] = 0,
    record_base: Annotated[
        bool,
        typer.Option(
            "--record-base/--no-record-base",
            help="record the base's SHA-256 fingerprint in the payload, so 'decompress --base' refuses another base",
        ),
    ] = True,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Compress NEW - BASE into a framed, checksummed payload (wire format v1)."""
    from deltaplane.codecs import Compressor, decompress
    from deltaplane.delta import Delta, atomic_write_bytes, short_fingerprint
    from deltaplane.deploy.publish import check_writable_dir

    with clean_errors(OSError), cpu_threads(threads):
        check_writable_dir(out.parent, hint="-o names a file inside a folder")  # before the work
        delta = Delta.between(_load_state(base), _load_state(new), record_base=record_base)
        comp = Compressor(codec, error_feedback=False, seed=seed)
        payload = comp.compress(delta, base_id=base_id, base_version=base_version)
        sent = decompress(payload, expect_layout=delta)
        atomic_write_bytes(out, payload)
    err = (sent - delta).norm() / max(delta.norm(), 1e-30)
    # two-line headers and numbers never wrapped: a 7B model's byte counts fit 80 columns whole (rich cut
    # "28,966,928,384" to "28,966,928,…" under one-line headers)
    table = Table(title=escape(f"compressed {new.name} against {base.name}"), box=box.SIMPLE_HEAD)
    for col in ("tensors", "values", "raw\nbytes", "payload\nbytes", "ratio", "relative\nerror"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_row(
        str(len(delta)),
        f"{delta.numel():,}",
        f"{delta.nbytes:,}",
        f"{len(payload):,}",
        f"{delta.nbytes / len(payload):.1f}x",
        f"{err:.4f}",
    )
    console.print(table)  # the result, on stdout
    recorded = f"; base {short_fingerprint(delta.base_sha256)}" if delta.base_sha256 else ""
    # a note on the shared stderr console, which `deltaplane -q` silences (a console of this module's own was
    # not, so `-q compress` still printed it): the codec and the file are what the command was given
    err_console.print(escape(f"codec {comp.codec.spec}{recorded}\nwrote {out}"), soft_wrap=True)


def decompress(
    payload: Annotated[
        Path, typer.Argument(help="payload written by 'deltaplane compress'", exists=True, dir_okay=False)
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="safetensors file to write", dir_okay=False)],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="apply the delta to this checkpoint (.safetensors, or a Hugging Face folder) and write the result",
            exists=True,
        ),
    ] = None,
    expect_base_id: Annotated[
        str | None, typer.Option(help="refuse a payload made for another base id")
    ] = None,
    expect_base_version: Annotated[
        int | None, typer.Option(help="refuse a payload made for another base version")
    ] = None,
    allow_other_base: AllowOtherBase = False,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Decode a payload (strictly) into the delta, or into BASE + delta with --base.

    Without --base the delta file keeps the payload's base fingerprint; with it, a base other than the one the
    payload records is refused unless --allow-other-base.
    """
    from deltaplane.codecs import decompress as decode_payload
    from deltaplane.codecs import read_header
    from deltaplane.delta import Delta
    from deltaplane.deploy.publish import check_writable_dir

    with clean_errors(OSError), cpu_threads(threads):
        check_writable_dir(out.parent, hint="-o names a file inside a folder")  # before the work
        data = payload.read_bytes()
        header = read_header(data)
        expect = None
        if expect_base_id is not None or expect_base_version is not None:
            expect = (
                header.base_id if expect_base_id is None else expect_base_id,
                header.base_version if expect_base_version is None else expect_base_version,
            )
        if (
            base is not None
        ):  # the checkpoint's layout: a payload for another model is refused before decoding
            base_state = _load_state(base)
            delta = decode_payload(data, expect_base=expect, expect_layout=base_state)
            new_state = delta.apply(base_state, check_base=not allow_other_base)
            Delta(new_state).save(out, metadata={"deltaplane.codec": header.codec})
            what = "checkpoint (base + delta" + _overridden(delta, base_state, allow_other_base) + ")"
        else:
            delta = decode_payload(data, expect_base=expect)
            delta.save(out, metadata={"deltaplane.codec": header.codec})
            what = "delta"
    console.print(
        escape(
            f"decoded {len(delta)} tensors ({delta.numel():,} values, codec {header.codec}, "
            f"base {header.base_id!r} v{header.base_version}); wrote {what} to {out}"
        ),
        soft_wrap=True,
    )


def apply(
    delta_path: Annotated[
        Path,
        typer.Argument(
            metavar="DELTA",
            help="delta file (.safetensors, e.g. from 'decompress')",
            exists=True,
            dir_okay=False,
        ),
    ],
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            help="checkpoint to apply the delta to (.safetensors, or a Hugging Face folder: model.safetensors "
            "or model.safetensors.index.json + shards)",
            exists=True,
        ),
    ],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="checkpoint to write (.safetensors)", dir_okay=False)
    ],
    allow_other_base: AllowOtherBase = False,
    threads: Threads = DEFAULT_THREADS,
) -> None:
    """Write BASE + DELTA as a new checkpoint; a delta recording another base is refused."""
    from deltaplane.delta import Delta, short_fingerprint
    from deltaplane.deploy.publish import check_writable_dir

    with clean_errors(OSError), cpu_threads(threads):
        check_writable_dir(out.parent, hint="-o names a file inside a folder")  # before the work
        delta = Delta.load(delta_path)
        base_state = _load_state(base)
        Delta(delta.apply(base_state, check_base=not allow_other_base)).save(out)
        recorded = "no base recorded, not checked"
        if delta.base_sha256:
            recorded = f"taken against base {short_fingerprint(delta.base_sha256)}"
        recorded += _overridden(delta, base_state, allow_other_base)
    console.print(
        escape(f"applied {len(delta)} tensors ({delta.numel():,} values; {recorded}); wrote {out}"),
        soft_wrap=True,
    )


def _overridden(delta: Delta, base_state: dict[str, torch.Tensor], allowed: bool) -> str:
    """'; --base is X: applied anyway' when --allow-other-base let a base through that the check refuses.

    The user asked to skip the check; the output still says it would have refused, so a log shows it.
    """
    from deltaplane.delta import base_fingerprint, short_fingerprint

    if not (allowed and delta.base_sha256):
        return ""
    actual = base_fingerprint(base_state)
    if actual == delta.base_sha256:
        return ""
    return (
        f"; --base is {short_fingerprint(actual)}, not the recorded base: applied anyway (--allow-other-base)"
    )


def register(app: typer.Typer) -> None:
    """Add ``compress``, ``decompress`` and ``apply`` to the deltaplane CLI."""
    app.command("compress")(compress)
    app.command("decompress")(decompress)
    app.command("apply")(apply)

"""``deltaplane deploy MODEL --prune 2:4 --quant int8 --format onnx -o OUT/``: compress a checkpoint for devices.

Loads the checkpoint (config + safetensors). An image classifier is pruned (and fine-tuned on the digits training
split, masks held), quantized, exported, packed and evaluated as shipped against fp32 (clean + noise / rotation /
blur / shift, ECE, latency at batch 1 and 32). A BERT-style text encoder (Hugging Face folder with tokenizer) is
evaluated by the cosine similarity of its sentence embeddings to fp32, and latency. Both print a before/after
table.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # numpy/torch load only when the command runs, so `deltaplane --help` stays quick
    import numpy as np

from deltaplane.commands import clean_errors

__all__ = ["register"]


def _register_models() -> None:
    from deltaplane.data.models import DigitsCNN
    from deltaplane.deploy.checkpoint import register_architecture

    # The simulator's digits CNN: checkpoints written from a `deltaplane run` model name it in their config.
    register_architecture(
        "DigitsCNN", lambda cfg: DigitsCNN(**{k: v for k, v in cfg.items() if k == "num_classes"})
    )


def _digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test split of the bundled digits set: the simulator's fixed split (its global test set)."""
    from deltaplane.data.digits import load_digits, train_test_split

    train, test = train_test_split(load_digits(), seed=seed)
    return train.x.numpy(), train.y.numpy(), test.x.numpy(), test.y.numpy()


def _finetuner(x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int):
    import torch

    from deltaplane.deploy.finetune import masked_finetune

    def finetune(model, result) -> None:
        masks = result.masks if result is not None else None  # pruned weights stay pruned
        masked_finetune(
            model, torch.from_numpy(x), torch.from_numpy(y), epochs=epochs, lr=lr, seed=seed, masks=masks
        )

    return finetune


def _deploy_encoder(
    console, ckpt, model: Path, out: Path, prune: str, quant: str, fmt: str, sentences
) -> None:
    """A Hugging Face BERT-style checkpoint: sentence embeddings, fidelity = cosine similarity to fp32."""
    import os

    from rich.table import Table

    from deltaplane.deploy.pipeline import deploy_encoder
    from deltaplane.deploy.sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES
    from deltaplane.errors import ConfigError

    if fmt != "onnx":
        raise ConfigError("text encoders deploy as --format onnx")
    os.environ.setdefault(
        "HF_HUB_OFFLINE", "1"
    )  # never reach for the hub: the tokenizer ships with the model
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer files in {model} ({e}); a text encoder checkpoint needs them") from e
    eval_sentences = EVAL_SENTENCES
    if sentences is not None:
        eval_sentences = [line.strip() for line in sentences.read_text().splitlines() if line.strip()]
    res = deploy_encoder(
        ckpt.model,
        out,
        tokenizer=tokenizer,
        sentences=eval_sentences,
        calib_sentences=CALIBRATION_SENTENCES,
        prune=prune,
        quant=quant,
        source_sha256=ckpt.sha256,
        fp32_nbytes=ckpt.weights_nbytes,
        model_name=f"{ckpt.architecture} ({model.name})",
        card_info={
            "intended_use": "Sentence embeddings (semantic search, clustering) on device with ONNX Runtime.",
            "data": f"Fidelity measured on {len(eval_sentences)} fixed English sentences; calibration on "
            f"{len(CALIBRATION_SENTENCES)} others.",
        },
    )
    m = res.manifest
    t = Table(title=f"deploy {model.name}: prune={prune} quant={quant} format=onnx")
    for col in ("metric", "fp32", "compressed", "change"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    sizes = m["sizes"]
    t.add_row(
        "size (bytes)",
        f"{sizes['fp32_safetensors_bytes']:,}",
        f"{sizes['artifact_bytes']:,}",
        f"{sizes['compression_ratio']:.2f}× smaller",
    )
    t.add_row("weight sparsity", "0.0%", f"{100 * m['weight_sparsity']:.1f}%", "")
    t.add_row(
        "cosine to fp32 (min / mean)",
        "1.0000",
        f"{m['fidelity']['cosine_min']:.4f} / {m['fidelity']['cosine_mean']:.4f}",
        "",
    )
    for b, lat in m["latency_us"].items():
        t.add_row(
            f"latency b={b} p50 µs",
            f"{lat['fp32_p50_us']:.0f}",
            f"{lat['p50_us']:.0f}",
            f"{lat['ratio_p50']:.2f}×",
        )
    console.print(t)
    console.print(f"wrote {', '.join(res.files)} to {res.out_dir}")


def register(app: typer.Typer) -> None:
    """Add the ``deploy`` command to ``app``."""

    @app.command("deploy")
    def deploy(
        model: Annotated[
            Path, typer.Argument(help="checkpoint folder (config.json + model.safetensors) or .safetensors")
        ],
        out: Annotated[Path, typer.Option("-o", "--out", help="output folder")],
        prune: Annotated[
            str, typer.Option(help="none, 2:4, 0.8, layer:0.8, wanda:0.5, wanda:2:4, channels:0.5")
        ] = "none",
        quant: Annotated[
            str, typer.Option(help="none, int8 (static), int8-static, int8-dynamic, int4")
        ] = "int8",
        fmt: Annotated[str, typer.Option("--format", help="onnx (graph + weights) or weights")] = "onnx",
        finetune_epochs: Annotated[int, typer.Option(help="fine-tune epochs after pruning (masks held)")] = 5,
        exclude: Annotated[
            list[str] | None, typer.Option(help="layer to leave unpruned (repeatable)")
        ] = None,
        seed: Annotated[int, typer.Option(help="seed for the data split and fine-tuning")] = 0,
        sentences: Annotated[
            Path | None,
            typer.Option(help="text encoders: evaluation sentences, one per line (default: built-in)"),
        ] = None,
    ) -> None:
        """Prune, quantize, export and package MODEL for devices; print fp32 vs compressed side by side."""
        from rich.console import Console
        from rich.table import Table

        from deltaplane.deploy.checkpoint import load_checkpoint
        from deltaplane.deploy.pipeline import deploy_classifier
        from deltaplane.deploy.profile import corruptions

        console = Console()
        _register_models()
        with clean_errors():
            ckpt = load_checkpoint(model)
            if ckpt.architecture == "BertModel":
                _deploy_encoder(console, ckpt, model, out, prune, quant, fmt, sentences)
                return
            xtr, ytr, xte, yte = _digits_split(seed)
            ft = (
                _finetuner(xtr, ytr, finetune_epochs, 0.01, seed)
                if prune != "none" and finetune_epochs > 0
                else None
            )
            res = deploy_classifier(
                ckpt.model,
                out,
                x_test=xte,
                y_test=yte,
                x_calib=xtr[:256],
                prune=prune,
                quant=quant,
                fmt=fmt,
                finetune=ft,
                variants=corruptions(xte, seed=seed),
                exclude=tuple(exclude or ()),
                source_sha256=ckpt.sha256,
                model_name=f"{ckpt.architecture} ({model.name})",
                card_info={
                    "data": "scikit-learn digits (8×8 grey-scale, 10 classes), fixed seeded split; "
                    "corruptions: Gaussian noise, 20° rotation, Gaussian blur, 1-pixel shift."
                },
            )
        b, c, cmp = res.baseline, res.compressed, res.comparison
        t = Table(title=f"deploy {model.name}: prune={prune} quant={quant} format={fmt}")
        for col in ("metric", "fp32", "compressed", "change"):
            t.add_column(col, justify="right" if col != "metric" else "left")
        sizes = res.manifest["sizes"]
        t.add_row(
            "size (bytes)",
            f"{sizes['fp32_safetensors_bytes']:,}",
            f"{sizes['artifact_bytes']:,}",
            f"{sizes['compression_ratio']:.2f}× smaller",
        )
        t.add_row("weight sparsity", "0.0%", f"{100 * res.manifest['weight_sparsity']:.1f}%", "")
        for split, acc in b.accuracy.items():
            flag = " [yellow]⚠ > clean drop[/yellow]" if split in cmp.flagged else ""
            t.add_row(
                f"accuracy {split}",
                f"{100 * acc:.2f}%",
                f"{100 * c.accuracy[split]:.2f}%",
                f"{-cmp.drops[split]:+.2f} pts{flag}",
            )
        t.add_row("ECE", f"{b.ece:.4f}", f"{c.ece:.4f}", f"{c.ece - b.ece:+.4f}")
        for bs, lat in b.latency.items():
            t.add_row(
                f"latency b={bs} p50/p95 µs",
                f"{lat.p50_us:.0f}/{lat.p95_us:.0f}",
                f"{c.latency[bs].p50_us:.0f}/{c.latency[bs].p95_us:.0f}",
                f"{cmp.latency_ratio[bs]:.2f}×",
            )
        console.print(t)
        for layer, why in res.manifest["prune_skipped_layers"].items():
            console.print(f"not pruned: {layer} ({why})")
        console.print(f"wrote {', '.join(res.files)} to {res.out_dir}")

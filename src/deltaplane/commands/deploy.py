"""``deltaplane deploy MODEL --prune 2:4 --quant int8 --format onnx -o OUT/``: compress a checkpoint for devices.

Loads the checkpoint (config + safetensors; the architecture from the registry, an entry point, ``transformers``
or ``--builder``) and decides the evaluation from what the model does (:func:`~deltaplane.deploy.infer_task`):

- a tensor classifier (e.g. the digits CNN, or a user model) is pruned, fine-tuned with masks held, quantized,
  exported, packed and evaluated as shipped against fp32 (clean + noise / rotation / blur / shift, ECE, latency);
- a token model (sentence encoder, sequence classifier, decoder) is compared with fp32 on held-out inputs:
  embedding cosine, top-1 agreement, next-token agreement and KL.

Quality gates (``--min-cosine``, ``--max-accuracy-drop``, ``--max-ood-drop``, ``--max-adv-drop``,
``--max-disagreement``, ``--min-above-chance``, on by default; ``--min-accuracy`` when given) turn a broken
compression into exit code 3 with the failed gate and its margin in the table, and nothing written. A model
with NaN/Inf weights, or one that outputs NaN/Inf on the evaluation set, is refused before any gate (exit 1),
``--no-gates`` or not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # numpy/torch load only when the command runs, so `deltaplane --help` stays quick
    from collections.abc import Callable

    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from deltaplane.deploy.checkpoint import Checkpoint
    from deltaplane.deploy.gates import Gates
    from deltaplane.deploy.onnx_input import OnnxDeployResult
    from deltaplane.deploy.pipeline import DeployResult
    from deltaplane.deploy.prune import PruneResult
    from deltaplane.deploy.tokens import TokenDeployResult

    #: progress lines (:func:`_progress`)
    Say = Callable[[str], None]
    #: --recover distill: (its name, epochs, learning rate or the default)
    Recovery = tuple[str, int, float | None]

from deltaplane.commands import (
    DEFAULT_THREADS,
    Threads,
    clean_errors,
    console,
    cpu_threads,
    err_console,
    error_console,
    fit_table,
    warn_withdrawn_inputs,
)

__all__ = ["register"]

EXIT_GATE_FAILED = 3


def _register_models() -> None:
    from deltaplane.data.models import DigitsCNN
    from deltaplane.deploy.checkpoint import register_architecture

    # The simulator's digits CNN: checkpoints written from a `deltaplane run` model name it in their config.
    register_architecture(
        "DigitsCNN", lambda cfg: DigitsCNN(**{k: v for k, v in cfg.items() if k == "num_classes"})
    )


def _classifier_data(
    config: dict[str, Any], data: Path | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Train/test arrays for a tensor classifier: ``--data FILE.npz`` or the bundled digits split.

    The digits images (N, 1, 8, 8) are reshaped to the config's ``input_shape`` (e.g. ``[64]`` for an MLP).
    """
    import numpy as np

    from deltaplane.errors import ConfigError

    if data is not None:
        try:
            with np.load(data) as z:
                arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(
                f"--data {data} must be an .npz with x_train, y_train, x_test, y_test ({e})"
            ) from e
        xtr, ytr = _split_arrays(arrays["x_train"], arrays["y_train"], f"--data {data}", "train")
        xte, yte = _split_arrays(arrays["x_test"], arrays["y_test"], f"--data {data}", "test")
        if xtr.shape[1:] != xte.shape[1:]:
            raise ConfigError(
                f"--data {data}: x_train samples have shape {xtr.shape[1:]} but x_test samples {xte.shape[1:]}; "
                "both must have the model's input shape"
            )
        return xtr, ytr, xte, yte, f"{data.name} ({len(ytr)} train / {len(yte)} test)"
    from deltaplane.data.digits import load_digits, train_test_split

    train, test = train_test_split(load_digits(), seed=seed)
    xtr, ytr, xte, yte = train.x.numpy(), train.y.numpy(), test.x.numpy(), test.y.numpy()
    shape = config.get("input_shape")
    if shape is not None:
        try:
            xtr, xte = xtr.reshape(len(xtr), *shape), xte.reshape(len(xte), *shape)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"config input_shape {shape} does not fit the 8×8 digits images ({e}); {DIGITS_FIX}"
            ) from e
    note = (
        "scikit-learn digits (8×8 grey-scale, 10 classes), fixed seeded split; "
        "corruptions: Gaussian noise, 20° rotation, Gaussian blur, 1-pixel shift."
    )
    return xtr, ytr, xte, yte, note


MIN_TEST_SAMPLES = 100  # below this one sample is a point or more of accuracy: the gates measure noise

#: what to do when the default evaluation data (no --data) does not fit the model: a user's own classifier
#: (a tabular MLP) was told to "give x_train / x_test", which it never gave
DIGITS_FIX = (
    "without --data a classifier is evaluated on the scikit-learn digits (8×8 images, 10 classes): pass "
    "--data FILE.npz holding x_train, y_train, x_test, y_test from your model's own data"
)


def _split_arrays(x: np.ndarray, y: np.ndarray, source: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``x_<split>`` as float32 and ``y_<split>`` as int64 labels, refusing what would ship a meaningless
    evaluation or fail later with a traceback: no samples, lengths that differ, non-integer labels."""
    import numpy as np

    from deltaplane.errors import ConfigError

    if x.ndim < 2 or not len(x):
        raise ConfigError(
            f"{source}: x_{split} has shape {x.shape}; it needs at least one sample (N × the model's input shape)"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ConfigError(
            f"{source}: y_{split} has shape {y.shape} but x_{split} holds {len(x)} samples; give one label per "
            "sample (a 1-D array of class indices)"
        )
    # float labels are accepted when every one is a whole number (0.0/1.0, as pandas or a float array saves
    # them) and converted to int64; a fractional, NaN or infinite label is refused, naming the first one
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.isfinite(y) & (y == np.round(y))))
    )
    if not integral:
        bad = ""
        if np.issubdtype(y.dtype, np.floating):
            i = int(np.argmax(~(np.isfinite(y) & (y == np.round(y)))))
            bad = f"; y_{split}[{i}] is {y[i].item()!r} (whole-number floats such as 0.0/1.0 are accepted)"
        raise ConfigError(f"{source}: y_{split} ({y.dtype}) must hold integer class indices{bad}")
    if not (np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.bool_)):
        raise ConfigError(f"{source}: x_{split} ({x.dtype}) must be numeric")
    return x.astype(np.float32), y.astype(np.int64)


def _check_fits(
    model: nn.Module,
    xtr: np.ndarray,
    ytr: np.ndarray,
    xte: np.ndarray,
    yte: np.ndarray,
    source: str,
    say: Say,
    digits: bool = False,
) -> None:
    """One sample through the model: the data's shape fits its input and every label names one of its outputs.

    Refused with :class:`~deltaplane.errors.ConfigError` naming ``source`` (``--data FILE`` or the digits'
    reshape) and the shapes, before anything is pruned or exported, and saying to pass ``--data`` when the data
    is the ``digits`` default; fewer than :data:`MIN_TEST_SAMPLES` test samples ship with a warning (the accuracy
    gates then measure a handful of samples)."""
    import torch

    from deltaplane.errors import ConfigError

    try:
        with torch.inference_mode():
            out = model.eval()(torch.from_numpy(xte[:1]))
    except Exception as e:  # whatever the model's first layer says about a wrong input
        raise ConfigError(
            f"{source}: the model does not run on its samples of shape {tuple(xte.shape[1:])} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            + (DIGITS_FIX if digits else "give x_train / x_test in the model's input shape")
        ) from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{source}: the model maps one sample of shape {tuple(xte.shape[1:])} to {shape}, not to "
            "(1, classes) logits; a tensor classifier is expected"
        )
    classes = int(out.shape[1])
    for split, y in (("train", ytr), ("test", yte)):
        if y.min() < 0 or y.max() >= classes:
            raise ConfigError(
                f"{source}: y_{split} holds labels in [{int(y.min())}, {int(y.max())}] but the model has "
                f"{classes} outputs; labels must be class indices in [0, {classes})"
                + (f"; {DIGITS_FIX}" if digits else "")
            )
    if len(yte) < MIN_TEST_SAMPLES:
        say(
            f"[yellow]warning:[/yellow] {source}: only {len(yte)} test samples (fewer than "
            f"{MIN_TEST_SAMPLES}): one sample is {100 / len(yte):.1f} accuracy points, so the accuracy gates "
            "measure noise"
        )


def _ood_variants(
    xte: np.ndarray, data: Path | None, seed: int
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The corrupted test sets (noise, rotation, blur, shift), or ``None`` and why there are none.

    The digits are corrupted as the 8×8 images they are and then reshaped to the model's input (so an MLP on
    ``[64]`` gets the same OOD evaluation as the CNN); ``--data`` test samples are corrupted when they are images
    (N×C×H×W), and otherwise the OOD evaluation, and with it the ``--max-ood-drop`` gate, is reported as not done.
    """
    from deltaplane.deploy.profile import corruptions

    if data is None:
        images = xte.reshape(len(xte), 1, 8, 8)  # undo the reshape to config input_shape (same order)
        return {k: v.reshape(xte.shape) for k, v in corruptions(images, seed=seed).items()}, None
    if xte.ndim == 4:
        return corruptions(xte, seed=seed), None
    return None, (
        f"No OOD evaluation: --data {data.name} test samples have shape {tuple(xte.shape[1:])}, not images "
        "(C×H×W), which the corruptions (noise, rotation, blur, shift) need; the max-ood-drop gate was not "
        "evaluated."
    )


def _finetuner(
    x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int
) -> Callable[[nn.Module, PruneResult | None], None]:
    import torch

    from deltaplane.deploy.finetune import masked_finetune

    def finetune(model: nn.Module, result: PruneResult | None) -> None:
        masks = result.masks if result is not None else None  # pruned weights stay pruned
        masked_finetune(
            model, torch.from_numpy(x), torch.from_numpy(y), epochs=epochs, lr=lr, seed=seed, masks=masks
        )

    return finetune


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _load_tokenizer(folder: Path, config: dict[str, Any], option: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder`` (``from_pretrained``, offline), checked against the model's vocabulary.

    ``from_pretrained`` opens the files itself, unbounded: a FIFO named ``vocab.txt`` would hang it and a
    multi-GiB ``tokenizer.json`` exhaust memory. So the files a tokenizer is made of are first read through the
    bounded reader (regular files of at most :data:`~deltaplane.textfile.TOKENIZER_LIMIT` each) into a private
    folder, and the tokenizer is loaded from that copy (no race with the user's folder changing meanwhile)."""
    import os
    import tempfile

    from transformers import AutoTokenizer

    from deltaplane.errors import ConfigError
    from deltaplane.merging.output import CONFIG_FILES
    from deltaplane.shards import SENTENCEPIECE_FILES
    from deltaplane.shards import TOKENIZER_FILES as FILES
    from deltaplane.textfile import TOKENIZER_LIMIT, read_bounded_bytes

    with tempfile.TemporaryDirectory(prefix="deltaplane-tokenizer-") as tmp:
        for name in (*FILES, *SENTENCEPIECE_FILES, *CONFIG_FILES):
            if os.path.lexists(folder / name):
                data = read_bounded_bytes(
                    folder / name, limit=TOKENIZER_LIMIT, what=f"tokenizer file ({option})"
                )
                (Path(tmp) / name).write_bytes(data)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"the tokenizer files in {folder} ({option}) do not load ({str(e).replace(tmp, str(folder))})"
            ) from e
    vocab = int(config.get("vocab_size") or 0)
    if vocab and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer in {folder} ({option}) has {len(tokenizer)} tokens but the model's config.json says "
            f"vocab_size {vocab}: it is not this model's tokenizer; pass the one it was trained with"
        )
    return tokenizer


def _token_inputs(
    model_dir: Path,
    config: dict[str, Any],
    sentences: Path | None,
    seed: int,
    *,
    tokenizer_dir: Path | None,
    random_ids: bool,
    distill_sentences: int,
    calibration_size: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str | None]:
    """Evaluation, calibration and distillation token arrays, and what they are (for the card).

    Text needs the model's own tokenizer: from ``--tokenizer DIR`` or the checkpoint folder. Without one the
    command refuses (:class:`~deltaplane.errors.MissingTokenizer`, naming both fixes) unless ``--random-tokens``
    asks for seeded random token ids, which measure only how far compression moves the outputs."""
    import os

    from deltaplane.deploy.sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES, corpus_split
    from deltaplane.deploy.tokens import random_tokens, tokens_from_sentences
    from deltaplane.errors import ConfigError, MissingTokenizer
    from deltaplane.textfile import CONFIG_LIMIT, read_bounded_text

    os.environ.setdefault(
        "HF_HUB_OFFLINE", "1"
    )  # never reach for the hub: the tokenizer ships with the model
    eval_sentences = EVAL_SENTENCES
    if sentences is not None:
        text = read_bounded_text(sentences, limit=CONFIG_LIMIT, what="--sentences file")
        eval_sentences = [line.strip() for line in text.splitlines() if line.strip()]
        if not eval_sentences:
            raise ConfigError(f"--sentences {sentences} holds no sentence")
    tokenizer = None
    if tokenizer_dir is not None:
        if not tokenizer_dir.is_dir() or not any((tokenizer_dir / f).exists() for f in TOKENIZER_FILES):
            raise ConfigError(
                f"--tokenizer {tokenizer_dir} is not a folder with {' / '.join(TOKENIZER_FILES)}"
            )
        tokenizer = _load_tokenizer(tokenizer_dir, config, "--tokenizer")
    elif model_dir.is_dir() and any((model_dir / f).exists() for f in TOKENIZER_FILES):
        tokenizer = _load_tokenizer(model_dir, config, "the checkpoint folder")
    if tokenizer is not None:
        if random_ids:
            raise ConfigError("--random-tokens and a tokenizer contradict each other; drop one")
        ev = tokens_from_sentences(tokenizer, eval_sentences)
        # pruning / static-int8 calibration: the built-in sentences, then the corpus's calibration part in its
        # fixed order; distillation text is the same prefix extended to --recover-sentences (so it contains
        # the calibration sentences whenever it is at least as long), never the evaluation sentences
        n_corpus = max(distill_sentences, calibration_size - len(CALIBRATION_SENTENCES))
        extra, _ = corpus_split(n_corpus) if n_corpus > 0 else ([], [])
        pool = [*CALIBRATION_SENTENCES, *extra]
        cal = tokens_from_sentences(tokenizer, pool[:calibration_size], max_length=64)
        distill = tokens_from_sentences(
            tokenizer, pool[: len(CALIBRATION_SENTENCES) + distill_sentences], max_length=64
        )
        note = (
            f"Fidelity measured on {len(eval_sentences)} held-out English sentences; calibration on "
            f"{min(calibration_size, len(pool))} others ({len(CALIBRATION_SENTENCES)} written for it, the rest "
            "from the standard library's docstrings)."
        )
        return ev, cal, distill, note, None
    if sentences is not None:
        raise MissingTokenizer(
            f"--sentences needs the model's tokenizer: {model_dir} has no {' / '.join(TOKENIZER_FILES)}; "
            "pass --tokenizer DIR"
        )
    if not random_ids:
        raise MissingTokenizer(
            f"{model_dir} has no tokenizer files ({' / '.join(TOKENIZER_FILES)}), so there is no text to measure "
            "on: put the model's tokenizer in that folder, pass --tokenizer DIR, or pass --random-tokens to "
            "measure only how far compression moves the outputs on seeded random token ids"
        )
    vocab = int(config.get("vocab_size", 0))
    if vocab < 2:
        raise ConfigError(f"{model_dir} has no tokenizer files and its config gives no vocab_size")
    ev = random_tokens(vocab, 32, 16, seed=seed + 1)
    cal = random_tokens(vocab, calibration_size, 16, seed=seed + 2)
    distill = random_tokens(vocab, 256, 16, seed=seed + 3)
    note = (
        "--random-tokens: fidelity measured on 32 seeded random token sequences (16 tokens), calibration on "
        f"{calibration_size} others; this measures how far compression moves the outputs, not quality on real "
        "text."
    )
    return ev, cal, distill, note, note


def _table(manifest: dict[str, Any], title: str, width: int) -> Table:
    """fp32 vs compressed, from the manifest (so a refused deploy prints the same table as a shipped one), laid
    out for ``width`` columns: cells wrap between words, a number is never cut (see :func:`fit_table`)."""
    from rich.table import Table

    from deltaplane.deploy.card import size_change

    t = Table(title=title)
    t.add_column("metric", overflow="fold")
    # values wrap between words ("87.50% (loss 1.092)"), never inside a number; "change" also holds a gate's
    # margin or why it was not evaluated
    for col in ("fp32", "compressed", "change"):
        t.add_column(col, justify="right", overflow="fold")
    sizes = manifest["sizes"]
    t.add_row(
        "size (bytes)",
        f"{sizes['fp32_safetensors_bytes']:,}",
        f"{sizes['artifact_bytes']:,}",
        size_change(sizes["compression_ratio"]),
    )
    t.add_row("weight sparsity", "0.0%", f"{100 * manifest['weight_sparsity']:.1f}%", "")
    if "fidelity" in manifest:
        fid = manifest["fidelity"]
        if "cosine_min" in fid:
            t.add_row(
                "cosine to fp32 (min / mean)",
                "1.0000",
                f"{fid['cosine_min']:.4f} / {fid['cosine_mean']:.4f}",
                "",
            )
        if "r2" in fid:
            t.add_row(
                "R² to fp32 over the batch (corr.)",
                "1.0000",
                f"{fid['r2']:.4f} ({fid['correlation']:.4f})",
                "",
            )
        if "top1_agreement" in fid:
            what = "next-token top-1 agreement" if "positions" in fid else "top-1 agreement"
            t.add_row(what, "1.0000", f"{fid['top1_agreement']:.4f}", "")
        if "kl_mean_nats" in fid:
            t.add_row("KL(fp32 ‖ compressed) nats", "0", f"{fid['kl_mean_nats']:.4g}", "")
        if "accuracy" in fid:
            t.add_row("accuracy", f"{100 * fid['accuracy_fp32']:.2f}%", f"{100 * fid['accuracy']:.2f}%", "")
        for b, lat in manifest.get("latency_us", {}).items():
            t.add_row(
                f"latency b={b} p50 µs",
                f"{lat['fp32_p50_us']:.0f}",
                f"{lat['p50_us']:.0f}",
                f"{lat['ratio_p50']:.2f}×",
            )
    else:
        b, c, cmp = manifest["baseline"], manifest["compressed"], manifest["comparison"]
        for split, acc in b["accuracy"].items():
            flag = " [yellow]⚠[/yellow]" if split in cmp["ood_flags"] else ""
            t.add_row(
                f"accuracy {split}",
                f"{100 * acc:.2f}%",
                f"{100 * c['accuracy'][split]:.2f}%",
                f"{-cmp['drops_points'][split] + 0.0:+.2f} pts{flag}",
            )
        t.add_row("ECE", f"{b['ece']:.4f}", f"{c['ece']:.4f}", f"{c['ece'] - b['ece']:+.4f}")
        for bs, lat in b["latency_us"].items():
            cl = c["latency_us"][bs]
            t.add_row(
                f"latency b={bs} p50/p95 µs",
                f"{lat['p50']:.0f}/{lat['p95']:.0f}",
                f"{cl['p50']:.0f}/{cl['p95']:.0f}",
                f"{cmp['latency_ratio_p50'][bs]:.2f}×",
            )
    adv = manifest.get("adversarial") or {}
    for row in adv.get("rows", []):
        if adv.get("metric") == "cosine":
            fp, cp = f"{row['fp32']:.4f}", f"{row['compressed']:.4f}"
        else:
            fp, cp = f"{100 * row['fp32']:.2f}%", f"{100 * row['compressed']:.2f}%"
        if "fp32_loss" in row:  # token classifiers and decoders: cross-entropy under attack as well
            fp, cp = f"{fp} (loss {row['fp32_loss']:.3f})", f"{cp} (loss {row['compressed_loss']:.3f})"
        t.add_row(
            f"{row['attack']} ε={row['eps']:g} {adv.get('metric', 'accuracy')}",
            fp,
            cp,
            f"{-row['drop_points']:+.2f} pts",
        )
    cost = manifest.get("device_cost")
    if cost:
        f, c = cost["fp32"], cost["compressed"]
        t.add_row("MACs / inference", f"{f['macs']:,}", f"{c['macs']:,}", "")
        t.add_row(
            "peak activations (bytes)",
            f"{f['peak_activation_bytes']:,}",
            f"{c['peak_activation_bytes']:,}",
            "",
        )
        for prof, e in c["energy_uj"].items():
            t.add_row(
                f"energy µJ ({prof})",
                f"{f['energy_uj'][prof]:.3g}",
                f"{e:.3g}",
                f"{e / f['energy_uj'][prof]:.2f}×",
            )
    rec = manifest.get("recovery")
    if rec:
        t.add_row("recovery", "", rec.get("summary", ""), "")
    if (manifest.get("gates") or {}).get("off"):
        t.add_row("[bold yellow]gates[/bold yellow]", "", "[bold yellow]OFF[/bold yellow] (--no-gates)", "")
    results = (manifest.get("gates") or {}).get("results", [])
    for r in results:
        if r["passed"]:
            continue
        unit = r.get("unit", "" if r["gate"] == "min-cosine" else " pts")
        t.add_row(
            f"[bold red]gate {r['gate']}[/bold red] ({r['what']})",
            f"limit {r['threshold']:.4g}{unit}",
            f"{r['measured']:.4g}{unit}",
            f"[bold red]FAIL[/bold red] ({r['margin']:+.3g})",
        )
    for ne in (manifest.get("gates") or {}).get("not_evaluated", []):
        t.add_row(f"[yellow]gate {ne['gate']}[/yellow]", "", "[yellow]not evaluated[/yellow]", ne["why"])
    if results:
        passed = [r for r in results if r["passed"]]
        tight = min(results, key=lambda r: r["margin"])
        t.add_row(
            "gates",
            "",
            f"{len(passed)}/{len(results)} pass",
            f"tightest: {tight['gate']} ({tight['what']}) {tight['margin']:+.3g}",
        )
    fit_table(t, width)
    return t


def _progress(console: Console) -> Say:
    start = time.perf_counter()

    def say(msg: str) -> None:
        console.print(
            f"[dim]{time.perf_counter() - start:6.1f}s[/dim] {msg}", highlight=False, soft_wrap=True
        )

    return say


def _check_numbers(
    *, seed: int, finetune_epochs: int, attack_eps: list[float] | None, recover_lr: float | None
) -> None:
    """Refuse numbers the work would choke on (an untyped numpy or torch error after the model is loaded) or
    silently treat as something else (negative epochs as none, a NaN attack ε as a skipped attack)."""
    import math

    from deltaplane.errors import ConfigError

    if not 0 <= seed < 2**64:  # numpy's generators take no negative seed, torch none of 64 bits or more
        raise ConfigError(f"--seed must be an integer from 0 to 2**64 - 1. Found {seed}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0 (0: no fine-tuning). Found {finetune_epochs}")
    for eps in attack_eps or ():
        if not (math.isfinite(eps) and eps >= 0):
            raise ConfigError(f"--attack-eps must be a finite number >= 0 (0: skip the attack). Found {eps}")
    if recover_lr is not None and not (math.isfinite(recover_lr) and recover_lr > 0):
        raise ConfigError(f"--recover-lr must be a positive finite learning rate. Found {recover_lr}")


def _check_options(prune: str, quant: str, fmt: str) -> None:
    from deltaplane.deploy.pipeline import FORMATS, QUANTS, parse_prune
    from deltaplane.errors import ConfigError

    parse_prune(prune)
    if quant not in QUANTS:
        raise ConfigError(f"quant must be one of {', '.join(QUANTS)}. Found {quant!r}")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}. Found {fmt!r}")


def _gates(
    min_cosine: float,
    max_accuracy_drop: float,
    max_ood_drop: float,
    max_adv_drop: float,
    no_gates: bool,
    *,
    max_disagreement: float = 5.0,
    min_accuracy: float | None = None,
    min_above_chance: float | None = None,
    min_r2: float = 0.95,
) -> Gates | None:
    """The :class:`~deltaplane.deploy.gates.Gates` the options ask for; ``None`` for ``--no-gates``.

    ``--min-above-chance 0`` switches that gate off (0 would only ask for accuracy ≥ chance, which a constant
    guess meets). Unset, it is 0.1, or off under ``DELTAPLANE_SMALL=1``: that mode caps ``deltaplane run`` at 2
    rounds over 4 devices (docs/cli.md), too short to train past chance, so a gate asking whether training
    happened would refuse every model it makes; the command says so."""
    from deltaplane.cli import SMALL_ENV, small_mode
    from deltaplane.deploy.gates import Gates

    if no_gates:
        return None
    if min_above_chance is None:
        min_above_chance = 0.0 if small_mode() else 0.1
        if small_mode():
            err_console.print(  # a note: -q silences it
                f"{SMALL_ENV} is set: the min-above-chance gate is off (small runs stay at chance)",
                markup=False,
                soft_wrap=True,
            )
    return Gates(
        min_cosine,
        max_accuracy_drop,
        max_ood_drop,
        max_adv_drop,
        max_disagreement=max_disagreement,
        min_accuracy=min_accuracy,
        min_above_chance=min_above_chance or None,
        min_r2=min_r2,
    )


def register(app: typer.Typer) -> None:
    """Add the ``deploy`` command to ``app``."""

    @app.command("deploy")
    def deploy(
        model: Annotated[
            Path,
            typer.Argument(
                help="checkpoint folder (config.json + model.safetensors), .safetensors, or .onnx"
            ),
        ],
        out: Annotated[Path, typer.Option("-o", "--out", help="output folder")],
        prune: Annotated[
            str,
            typer.Option(
                help="none, 2:4, 0.8, layer:0.8, wanda:0.5, wanda:2:4, sparsegpt:2:4, sparsegpt:0.5, channels:0.5, "
                "or the spec grammar: nm(n=2, m=4), magnitude(0.8), wanda(n=2, m=4), ..."
            ),
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
        builder: Annotated[
            str | None,
            typer.Option(
                help="build the model with pkg.module:function or file.py:function (config -> nn.Module)",
                show_default="by config.json's architecture",
            ),
        ] = None,
        task: Annotated[
            str | None,
            typer.Option(
                help="override: classification, sentence-embedding, text-classification, next-token",
                show_default="inferred from the checkpoint",
            ),
        ] = None,
        data: Annotated[
            Path | None,
            typer.Option(help="classifiers: .npz with x_train, y_train, x_test, y_test (default: digits)"),
        ] = None,
        min_cosine: Annotated[
            float, typer.Option(help="gate: lowest cosine of any embedding to fp32")
        ] = 0.98,
        max_accuracy_drop: Annotated[
            float, typer.Option(help="gate: clean accuracy points lost (token models: % top-1 disagreement)")
        ] = 1.0,
        max_ood_drop: Annotated[
            float, typer.Option(help="gate: points any corruption loses beyond the clean drop")
        ] = 5.0,
        max_adv_drop: Annotated[
            float,
            typer.Option(
                help="gate: FGSM/PGD accuracy (encoders: mean cosine ×100; decoders: next-token accuracy) lost "
                "vs fp32 at any ε"
            ),
        ] = 10.0,
        max_disagreement: Annotated[
            float,
            typer.Option(
                help="gate (labelled classifiers): % of test inputs whose top-1 class differs from fp32's, even "
                "if accuracy went up"
            ),
        ] = 5.0,
        min_accuracy: Annotated[
            float | None,
            typer.Option(
                help="gate: lowest clean accuracy of the shipped model, a fraction (0.9 = 90%)",
                show_default="off",
            ),
        ] = None,
        min_above_chance: Annotated[
            float | None,
            typer.Option(
                help="gate: fp32 clean accuracy must close this fraction of the gap from chance (1/classes or "
                "the majority label) to 100%; 0 turns it off",
                show_default="0.1; off under DELTAPLANE_SMALL=1, whose runs stay at chance",
            ),
        ] = None,
        min_r2: Annotated[
            float,
            typer.Option(
                help="gate (ONNX models with one output value per input): R² of the outputs to fp32's over the "
                "evaluation batch"
            ),
        ] = 0.95,
        attack_eps: Annotated[
            list[float] | None,
            typer.Option(
                help="L∞ ε for FGSM/PGD (repeatable; 0 = skip): tensor classifiers on inputs [0.02 0.05 0.1], "
                "token models (encoders, sequence classifiers, decoders) on input embeddings, relative to "
                "their std [0.05 0.1]",
                show_default="0.02 0.05 0.1 (tensor classifiers), 0.05 0.1 (token models)",
            ),
        ] = None,
        recover: Annotated[
            str,
            typer.Option(
                help="after pruning: none, or distill (knowledge distillation from fp32, unlabeled)"
            ),
        ] = "none",
        epochs: Annotated[
            int, typer.Option(help="--recover distill: passes over the calibration inputs")
        ] = 10,
        recover_lr: Annotated[
            float | None,
            typer.Option(
                help="--recover distill: Adam learning rate [1e-3 classifiers, 1e-4 tokens]",
                show_default="1e-3 classifiers, 1e-4 next-token",
            ),
        ] = None,
        recover_sentences: Annotated[
            int,
            typer.Option(
                help="--recover distill on text: sentences of the standard library's docstrings and help "
                "topics added to the 64 built-in calibration sentences (10% held out for early stopping)"
            ),
        ] = 4000,
        calibration_size: Annotated[
            int | None,
            typer.Option(
                help="inputs that pruning (Wanda, SparseGPT) and static int8 calibrate on: text models take the "
                "64 built-in calibration sentences, then standard-library docstring sentences (never the "
                "evaluation ones; distillation text starts with the same sentences); classifiers the first N "
                "training inputs",
                show_default="512 sentences (token models), 256 inputs (classifiers), 128 (ONNX inputs; 24 random feeds)",
            ),
        ] = None,
        tokenizer: Annotated[
            Path | None,
            typer.Option(
                help="token models: folder with the model's tokenizer files",
                show_default="the checkpoint folder",
            ),
        ] = None,
        random_tokens: Annotated[
            bool,
            typer.Option(
                "--random-tokens",
                help="token models without a tokenizer: measure on seeded random token ids (how far compression "
                "moves the outputs, not quality on text)",
            ),
        ] = False,
        no_gates: Annotated[bool, typer.Option("--no-gates", help="ship whatever the numbers are")] = False,
        overwrite: Annotated[
            bool,
            typer.Option(
                "--overwrite",
                help="replace OUT even when it holds files that are not a deploy's output (a previous deploy's "
                "output is always replaced, as a whole)",
            ),
        ] = False,
        threads: Threads = DEFAULT_THREADS,
    ) -> None:
        """Prune, quantize, export and package MODEL for devices; print fp32 vs compressed side by side.

        Exit codes: 0 shipped, 2 bad input, 3 a quality gate failed (nothing written).
        """
        from rich.markup import escape

        from deltaplane.deploy.checkpoint import infer_task, load_checkpoint
        from deltaplane.deploy.pipeline import parse_prune
        from deltaplane.deploy.publish import check_out_dir
        from deltaplane.errors import ConfigError, QualityGateFailed
        from deltaplane.textfile import require_regular_file

        say = _progress(err_console)  # progress, on stderr: -q silences it
        _register_models()
        title = f"deploy {model.name}: prune={prune} quant={quant} format={fmt}"
        refused: QualityGateFailed | None = None
        res: OnnxDeployResult | TokenDeployResult | DeployResult
        # --threads: pruning, fine-tuning and evaluation; the latency figures stay single-threaded (a device's)
        with clean_errors(), cpu_threads(threads):
            try:
                gates = _gates(
                    min_cosine,
                    max_accuracy_drop,
                    max_ood_drop,
                    max_adv_drop,
                    no_gates,
                    max_disagreement=max_disagreement,
                    min_accuracy=min_accuracy,
                    min_above_chance=min_above_chance,
                    min_r2=min_r2,
                )
                _check_options(prune, quant, fmt)  # bad options fail before anything slow runs
                check_out_dir(out, overwrite=overwrite)  # so does an OUT that cannot or must not be replaced
                if recover not in ("none", "distill"):
                    raise ConfigError(f"--recover must be none or distill. Found {recover!r}")
                if recover == "distill" and (parse_prune(prune) is None or epochs < 1):  # 'NONE', ' none '
                    raise ConfigError("--recover distill needs a --prune spec and --epochs >= 1")
                if recover_sentences < 0:
                    raise ConfigError(f"--recover-sentences must be >= 0. Found {recover_sentences}")
                if calibration_size is not None and calibration_size < 1:
                    raise ConfigError(f"--calibration-size must be >= 1. Found {calibration_size}")
                _check_numbers(
                    seed=seed, finetune_epochs=finetune_epochs, attack_eps=attack_eps, recover_lr=recover_lr
                )
                if data is not None:  # np.load would wait for good on a FIFO
                    require_regular_file(data, what="--data file (.npz)")
                if exclude and parse_prune(prune) is None:
                    raise ConfigError(
                        f"--exclude {' '.join(exclude)} names layers to leave unpruned, but nothing is pruned: "
                        "pass a --prune spec, or drop --exclude"
                    )
                rec = (recover, epochs, recover_lr) if recover == "distill" else None
                warn_withdrawn_inputs([model], "deployed")
                say(f"loading {model}")
                if model.suffix.lower() == ".onnx":
                    _refuse_unused("an ONNX file", data=data, exclude=exclude, sentences=sentences,
                                   tokenizer=tokenizer, random_tokens=random_tokens)  # fmt: skip
                    res = _deploy_onnx(
                        model, out, prune, quant, seed, gates, say, calibration_size, overwrite=overwrite
                    )
                else:
                    ckpt = load_checkpoint(model, builder=builder)
                    kind = task or infer_task(ckpt)
                    if kind in ("sentence-embedding", "text-classification", "next-token"):
                        _refuse_unused(f"a {kind} token model", data=data, exclude=exclude)
                        if fmt != "onnx":
                            raise ConfigError("token models deploy as --format onnx")
                        eps = [0.05, 0.1] if attack_eps is None else [e for e in attack_eps if e > 0]
                        text = {
                            "sentences": sentences,
                            "tokenizer_dir": tokenizer,
                            "random_ids": random_tokens,
                            "distill_sentences": recover_sentences if rec is not None else 0,
                            "calibration_size": calibration_size or 512,
                        }
                        res = _deploy_tokens(
                            ckpt, model, out, kind, prune, quant, text, seed, gates, say, rec, eps, overwrite
                        )
                    elif kind == "classification":
                        _refuse_unused("a classifier", sentences=sentences, tokenizer=tokenizer,
                                       random_tokens=random_tokens)  # fmt: skip
                        eps = [0.02, 0.05, 0.1] if attack_eps is None else [e for e in attack_eps if e > 0]
                        res = _deploy_classifier(
                            ckpt,
                            model,
                            out,
                            prune=prune,
                            quant=quant,
                            fmt=fmt,
                            epochs=finetune_epochs,
                            exclude=exclude,
                            seed=seed,
                            data=data,
                            gates=gates,
                            say=say,
                            eps=eps,
                            rec=rec,
                            calibration_size=calibration_size or 256,
                            overwrite=overwrite,
                        )
                    else:
                        raise ConfigError(
                            f"task {kind!r} unknown; use classification, sentence-embedding, text-classification "
                            "or next-token"
                        )
            except QualityGateFailed as e:  # not a usage error: its own exit code, with the numbers shown
                refused = e
        if refused is not None:
            console.print(_table(refused.manifest, title + " — REFUSED", console.width))
            error_console.print(  # a refusal is never silenced, not even by -q
                "[bold red]refused to ship:[/bold red] "
                + escape(f"{str(refused).removeprefix('refused to ship: ')}; nothing written to {out}"),
                soft_wrap=True,
            )
            raise typer.Exit(code=EXIT_GATE_FAILED)
        console.print(_table(res.manifest, title, console.width))
        for layer, why in res.manifest["prune_skipped_layers"].items():
            err_console.print(escape(f"not pruned: {layer} ({why})"), soft_wrap=True)  # a note, on stderr
        # soft_wrap: rich wraps at 80 columns when stdout is no terminal, and a path broken across lines cannot
        # be copied
        console.print(escape(f"wrote {', '.join(res.files)} to {res.out_dir}"), soft_wrap=True)


#: what each model-specific option is for, in the words of its refusal
_OPTION_USE = {
    "data": ("--data", "feeds a classifier's training and test images"),
    "exclude": ("--exclude", "leaves a checkpoint's layers unpruned (classifiers)"),
    "sentences": ("--sentences", "feeds a token model's evaluation text"),
    "tokenizer": ("--tokenizer", "tokenizes a token model's text"),
    "random_tokens": ("--random-tokens", "feeds a token model random ids"),
}


def _refuse_unused(what: str, **given: Any) -> None:
    """Refuse (:class:`~deltaplane.errors.ConfigError`, exit 2) an option the deploy of ``what`` would not use:
    a silently ignored ``--sentences`` or ``--exclude`` ships a model measured on other inputs than asked."""
    from deltaplane.errors import ConfigError

    used = [name for name, value in given.items() if value]
    if used:
        flag, role = _OPTION_USE[used[0]]
        raise ConfigError(f"{flag} {role}; the model to deploy is {what}, which does not use it: drop {flag}")


def _deploy_onnx(
    model: Path,
    out: Path,
    prune: str,
    quant: str,
    seed: int,
    gates: Gates | None,
    say: Say,
    calibration_size: int | None = None,
    *,
    overwrite: bool = False,
) -> OnnxDeployResult:
    """An ONNX file: digits feeds (and labels) when its input fits the digits images, else seeded random feeds."""
    import onnx

    from deltaplane.deploy.onnx_input import (
        deploy_onnx_model,
        digits_feeds,
        integer_input_ranges,
        onnx_feeds,
    )
    from deltaplane.errors import DecodeError

    try:
        graph = onnx.load(str(model), load_external_data=False)
    except Exception as e:
        raise DecodeError(f"{model} is not a readable ONNX model: {e}") from e
    xtr, _, xte, yte, note = _classifier_data({}, None, seed)
    labels: np.ndarray | None
    inputs_note: str | None
    feeds, labels, inputs_note = digits_feeds(graph, xte), yte, None
    calib = digits_feeds(graph, xtr[: calibration_size or 128])
    eval_inputs: dict[str, Any] = {"source": "digits test set", "count": len(xte)}
    if feeds is None:
        feeds, calib, labels = (
            onnx_feeds(graph, 32, seed=seed + 1),
            onnx_feeds(graph, calibration_size or 24, seed=seed + 2),
            None,
        )
        ranges = integer_input_ranges(graph)
        eval_inputs = {"source": "random", "count": 32, "seed": seed + 1, "integer_ranges": ranges}
        ints = "; ".join(
            f"'{k}' integers in [{r['low']}, {r['high']}) ({r['why']})" for k, r in ranges.items()
        )
        note = "32 seeded random inputs from the model's input signature (floats N(0,1)" + (
            f"; {ints})." if ints else ")."
        )
        inputs_note = "Measured on random inputs: how far compression moves the outputs, not task quality."
    return deploy_onnx_model(
        model,
        out,
        eval_feeds=feeds,
        calib_feeds=calib or [],
        labels=labels,
        prune=prune,
        quant=quant,
        gates=gates,
        progress=say,
        card_info={"data": note},
        inputs_note=inputs_note,
        eval_inputs=eval_inputs,
        overwrite=overwrite,
    )


def _deploy_tokens(
    ckpt: Checkpoint,
    model: Path,
    out: Path,
    task: str,
    prune: str,
    quant: str,
    text: dict[str, Any],
    seed: int,
    gates: Gates | None,
    say: Say,
    rec: Recovery | None,
    eps: list[float],
    overwrite: bool = False,
) -> TokenDeployResult:
    from deltaplane.deploy.tokens import deploy_token_model

    sentences = text.pop("sentences")
    ev, cal, distill, data_note, inputs_note = _token_inputs(model, ckpt.config, sentences, seed, **text)
    use = {
        "sentence-embedding": "Sentence embeddings (semantic search, clustering) on device with ONNX Runtime.",
        "text-classification": "Text classification on device with ONNX Runtime.",
        "next-token": "Next-token prediction (small on-device language model) with ONNX Runtime.",
    }[task]
    extra = (lambda *_: {"inputs_note": inputs_note}) if inputs_note else None
    recover = None
    if rec is not None:
        from deltaplane.deploy.recovery import distill_recover

        _, epochs, lr = rec
        recover = distill_recover(
            ckpt.model, distill, task=task, epochs=epochs, lr=lr or 1e-4, seed=seed, progress=say
        )
    return deploy_token_model(
        ckpt.model,
        out,
        task=task,
        eval_tokens=ev,
        calib_tokens=cal,
        prune=prune,
        quant=quant,
        gates=gates,
        source_sha256=ckpt.sha256,
        fp32_nbytes=ckpt.weights_nbytes,
        model_name=f"{ckpt.architecture} ({model.name})",
        card_info={"intended_use": use, "data": data_note},
        progress=say,
        extra=extra,
        recover=recover,
        adversarial_eps=eps,
        overwrite=overwrite,
    )


def _deploy_classifier(
    ckpt: Checkpoint,
    model: Path,
    out: Path,
    *,
    prune: str,
    quant: str,
    fmt: str,
    epochs: int,
    exclude: list[str] | None,
    seed: int,
    data: Path | None,
    gates: Gates | None,
    say: Say,
    eps: list[float],
    rec: Recovery | None,
    calibration_size: int,
    overwrite: bool = False,
) -> DeployResult:
    from deltaplane.deploy.pipeline import deploy_classifier, parse_prune

    xtr, ytr, xte, yte, note = _classifier_data(ckpt.config, data, seed)
    source = (
        f"--data {data}"
        if data is not None
        else f"the digits images reshaped to config input_shape {ckpt.config.get('input_shape', [1, 8, 8])}"
    )
    _check_fits(ckpt.model, xtr, ytr, xte, yte, source, say, digits=data is None)
    if len(yte) < MIN_TEST_SAMPLES:
        note += (
            f" Only {len(yte)} test samples: accuracy figures are coarse ({100 / len(yte):.1f} points each)."
        )
    ft: Callable[[nn.Module, PruneResult | None], dict[str, Any] | None] | None = (
        _finetuner(xtr, ytr, epochs, 0.01, seed) if parse_prune(prune) is not None and epochs > 0 else None
    )
    if rec is not None:  # distillation on the training inputs without their labels replaces the fine-tune
        from deltaplane.deploy.recovery import distill_recover

        _, d_epochs, lr = rec
        ft = distill_recover(
            ckpt.model, xtr, task="classification", epochs=d_epochs, lr=lr or 1e-3, seed=seed
        )
    variants, ood_note = _ood_variants(xte, data, seed)
    if ood_note is not None:  # the manifest, the table's gate rows and the card's limitations say it too
        say(f"[yellow]warning:[/yellow] {ood_note}")
    return deploy_classifier(
        ckpt.model,
        out,
        x_test=xte,
        y_test=yte,
        x_calib=xtr[:calibration_size],
        prune=prune,
        quant=quant,
        fmt=fmt,
        finetune=ft,
        variants=variants,
        exclude=tuple(exclude or ()),
        source_sha256=ckpt.sha256,
        model_name=f"{ckpt.architecture} ({model.name})",
        card_info={"data": note},
        gates=gates,
        progress=say,
        adversarial_eps=eps,
        overwrite=overwrite,
        ood_note=ood_note,
    )

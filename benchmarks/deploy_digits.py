"""Digits CNN for devices: every compression level side by side — size, accuracy (clean + OOD), ECE, latency.

Acceptance (issue 6, items 1 and 3): an artifact ≥ 8× smaller than the fp32 safetensors at ≤ 1 point accuracy
loss with batch-1 latency ≤ 0.5× the fp32 PyTorch model, both measured in the same run; and the OOD table
(noise, rotation, blur, shift) for every compression level, flagging OOD drops larger than the clean drop.

The model is the final global ``DigitsCNN`` of the default federated run (``deltaplane run``: 20 non-IID
clients, its default uplink codec ``topk(0.01) | quant(bits=8)`` with error feedback), saved as a checkpoint and
loaded back with :func:`~deltaplane.deploy.load_checkpoint`; evaluation is on the simulator's global test set.
Pruned levels are fine-tuned on the training part of the fixed split (an operator-side step: the server holding
some data, or a distillation set, is an assumption the federated run itself does not need). Every compressed row is evaluated from the artifact file as shipped (ONNX Runtime session built from the bytes
read back), against fp32 PyTorch measured in the same call, both with one CPU thread.

Issue 19 adds, for every level: FGSM and PGD accuracy at ε ∈ {0.02, 0.05, 0.1} (fp32 white-box vs the artifact as
shipped), which levels the default quality gates of ``deltaplane deploy`` would refuse and why, the device cost
per inference (MACs, peak activation memory, energy estimates on the phone / MCU profiles of
``deltaplane.deploy.cost``), and the per-round device cost of the default federated run itself (local training
MACs + the round's measured bytes over Wi-Fi / LTE).

Run: ``.venv/bin/python benchmarks/deploy_digits.py`` (the federated run takes 1–3 minutes on 2 cores, the
compression levels a few minutes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch import nn

from _record import record, table
from deltaplane.apps.runner import attach_device_cost
from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC
from deltaplane.data.digits import load_digits, train_test_split
from deltaplane.deploy import (
    Gates,
    GradualPruner,
    GradualSchedule,
    corruptions,
    deploy_classifier,
    load_checkpoint,
    masked_finetune,
    register_architecture,
    save_checkpoint,
)
from deltaplane.deploy.cost import LINKS, PROFILES
from deltaplane.sim.config import RunConfig
from deltaplane.sim.model import DigitsCNN
from deltaplane.sim.simulation import run_simulation

SEED = 0
EPS = (0.02, 0.05, 0.1)
EXCLUDE = ("conv1",)  # 72 weights reading 1 channel: not worth a mask, and too few inputs for 2:4


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> nn.Module:
    """SGD with momentum, batch 32 — the simulator's client optimizer, run centrally."""
    return masked_finetune(model, x, y, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--max-adv-drop",
        type=float,
        default=5.0,
        help="a tighter adversarial tolerance (points) shown beside the defaults: what `deltaplane deploy "
        "--max-adv-drop` would do",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    train_set, test_set = train_test_split(load_digits(), seed=SEED)
    xtr, ytr = train_set.x, train_set.y
    xte, yte = test_set.x.numpy(), test_set.y.numpy()
    run = attach_device_cost(run_simulation(RunConfig(codec=DEFAULT_RUN_CODEC, **DEFAULT_RUN_DGC, seed=SEED)))
    register_architecture("DigitsCNN", lambda cfg: DigitsCNN())
    ckpt_dir = Path(tempfile.mkdtemp())
    save_checkpoint(run.final_state, ckpt_dir / "digits", {"architecture": "DigitsCNN"})
    ckpt = load_checkpoint(ckpt_dir / "digits")
    fp32 = ckpt.model
    print(f"federated run: {len(run.rounds)} rounds, test accuracy {run.final.test_accuracy:.4f}", flush=True)
    variants = corruptions(xte, seed=SEED)
    calib = xtr[:256].numpy()

    def finetune(model: nn.Module, result) -> None:
        train(model, xtr, ytr, epochs=8, lr=0.01, seed=SEED + 1, masks=result.masks if result else None)

    # Gradual magnitude pruning (Zhu & Gupta 2017) to 90% during 15 epochs of fine-tuning, then int8.
    gmp = copy.deepcopy(fp32)
    steps_per_epoch = -(-len(ytr) // 32)
    schedule = GradualSchedule(
        final_sparsity=0.9, begin_step=0, end_step=10 * steps_per_epoch, frequency=steps_per_epoch // 2
    )
    train(
        gmp, xtr, ytr, epochs=15, lr=0.01, seed=SEED + 2, pruner=GradualPruner(gmp, schedule, exclude=EXCLUDE)
    )

    levels = [  # (label, model, prune, quant, fine-tune); every row is compared with the dense fp32 model
        ("fp32 ONNX", fp32, None, "none", False),
        ("int8 dynamic", fp32, None, "int8-dynamic", False),
        ("int8 static", fp32, None, "int8", False),
        ("int4 weight-only", fp32, None, "int4", False),
        ("2:4 + int8", fp32, "2:4", "int8", True),
        ("Wanda 2:4 + int8 (no fine-tune)", fp32, "wanda:2:4", "int8", False),
        ("magnitude 80% + int8", fp32, "0.8", "int8", True),
        ("GMP 90% + int8", gmp, None, "int8", False),
        ("GMP 90% + int4", gmp, None, "int4", False),
        ("channels 50% + int8", fp32, "channels:0.5", "int8", True),
    ]
    rows, ood_rows, results, adv_rows, cost_rows, gate_rows = [], [], [], [], [], []
    gates = Gates()  # the defaults of `deltaplane deploy`
    tight = Gates(max_adv_drop=args.max_adv_drop)  # the same, with the configured adversarial tolerance
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, model, prune, quant, ft) in enumerate(levels):
            res = deploy_classifier(
                model,
                Path(tmp) / f"l{i}",
                x_test=xte,
                y_test=yte,
                x_calib=calib,
                prune=prune,
                quant=quant,
                finetune=finetune if ft else None,
                variants=variants,
                exclude=EXCLUDE if prune and not prune.startswith("channels") else (),
                latency_iters=200,
                reference=fp32,
                source_sha256=ckpt.sha256,
                adversarial_eps=EPS,
            )
            m, b, c, cmp = res.manifest, res.baseline, res.compressed, res.comparison
            results.append((label, m, cmp))
            rows.append(
                [
                    label,
                    f"{m['sizes']['artifact_bytes']:,}",
                    f"{m['sizes']['compression_ratio']:.2f}×",
                    f"{m['params']:,}",
                    f"{100 * m['weight_sparsity']:.0f}%",
                    f"{100 * c.accuracy['clean']:.2f}%",
                    f"{0.0 - cmp.drops['clean']:+.2f}",
                    f"{c.ece:.3f}",
                    f"{cmp.latency_ratio[1]:.2f}×",
                    f"{cmp.latency_ratio[32]:.2f}×",
                ]
            )
            ood_rows.append(
                [label]
                + [
                    f"{100 * c.accuracy[k]:.1f} ({0.0 - cmp.drops[k]:+.1f}){' ⚠' if k in cmp.flagged else ''}"
                    for k in ("clean", "noise", "rotation", "blur", "shift")
                ]
            )
            adv = {(r["attack"], r["eps"]): r for r in m["adversarial"]["rows"]}
            if i == 0:
                adv_rows.append(
                    ["fp32 (white-box)"]
                    + [f"{100 * adv[(a, e)]['fp32']:.1f}" for a in ("fgsm", "pgd") for e in EPS]
                )
            adv_rows.append(
                [label]
                + [
                    f"{100 * adv[(a, e)]['compressed']:.1f} ({-adv[(a, e)]['drop_points'] + 0.0:+.1f})"
                    for a in ("fgsm", "pgd")
                    for e in EPS
                ]
            )
            dc = m["device_cost"]
            if i == 0:
                f = dc["fp32"]
                cost_rows.append(
                    [
                        "fp32 (graph of the dense model)",
                        f"{f['macs']:,}",
                        f"{f['macs']:,}",
                        f"{f['model_bytes']:,}",
                        f"{f['weight_bytes']:,}",
                        f"{f['peak_activation_bytes']:,}",
                        f"{f['energy_uj']['phone']:.2f}",
                        f"{f['energy_uj']['mcu']:.1f}",
                    ]
                )
            c2 = dc["compressed"]
            cost_rows.append(
                [
                    label,
                    f"{c2['macs']:,}",
                    f"{c2['nonzero_macs']:,}",
                    f"{c2['model_bytes']:,}",
                    f"{c2['weight_bytes']:,}",
                    f"{c2['peak_activation_bytes']:,}",
                    f"{c2['energy_uj']['phone']:.2f}",
                    f"{c2['energy_uj']['mcu']:.1f}",
                ]
            )
            verdicts = []
            for g_set in (gates, tight):
                failed = [g for g in g_set.check(m["quality"]) if not g.passed]
                verdicts.append(
                    "ships" if not failed else "**refused**: " + "; ".join(g.describe() for g in failed)
                )
            gate_rows.append([label, *verdicts])
            print(" | ".join(rows[-1]), "| flags:", cmp.flagged or "-", flush=True)
        fp32_eval = b  # the last call's fp32 baseline, for the reference row of the OOD table
    ok = [
        (label, m, cmp)
        for label, m, cmp in results
        if m["sizes"]["compression_ratio"] >= 8 and cmp.drops["clean"] <= 1.0 and cmp.latency_ratio[1] <= 0.5
    ]
    verdict = (
        "met by "
        + ", ".join(
            f"**{label}** ({m['sizes']['compression_ratio']:.1f}×, "
            f"{0.0 - cmp.drops['clean']:+.2f} pts, batch-1 latency {cmp.latency_ratio[1]:.2f}×)"
            for label, m, cmp in ok
        )
        if ok
        else "**MISSED** by every level"
    )
    b_lat = fp32_eval.latency
    # Per-round device cost of the federated run itself: what `deltaplane run` puts in its report (RunResult.device_cost)
    cfg = run.config
    dc = run.device_cost
    fed = dc["mean"]
    samples = dc["train_samples_per_device"]
    per_round_lte = [r["total_uj"]["lte"] for r in dc["per_round"]]
    fed_rows = (
        [
            ["local training (fp32 MACs)", f"{fed['train_macs']:,.0f}", "", f"{fed['compute_uj']:.0f}"],
            ["upload (mean per device per round)", "", f"{fed['bytes_up']:,.0f}", ""],
            ["download (mean per device per round)", "", f"{fed['bytes_down']:,.0f}", ""],
        ]
        + [[f"radio over {k} (up + down)", "", "", f"{v:.0f}"] for k, v in fed["radio_uj"].items()]
        + [[f"total per round, {k}", "", "", f"{v:.0f}"] for k, v in fed["total_uj"].items()]
    )
    body = "\n\n".join(
        [
            f"DigitsCNN ({sum(p.numel() for p in fp32.parameters()):,} params): final global model of the default "
            f"federated run (`deltaplane run` defaults: {run.config.clients} non-IID clients, {len(run.rounds)} rounds, "
            f"uplink `{DEFAULT_RUN_CODEC}` + error feedback + DGC momentum correction and masking, engine "
            f"`{run.config.engine}`; simulator test accuracy "
            f"{100 * run.final.test_accuracy:.2f}%), checkpoint SHA-256 `{ckpt.sha256[:16]}…`; fixed split "
            f"({len(ytr)} train / {len(yte)} test). fp32 safetensors: "
            f"{results[0][1]['sizes']['fp32_safetensors_bytes']:,} bytes; fp32 clean accuracy "
            f"{100 * fp32_eval.accuracy['clean']:.2f}%, ECE {fp32_eval.ece:.3f}; fp32 PyTorch p50 latency "
            f"{b_lat[1].p50_us:.0f} µs (batch 1) / {b_lat[32].p50_us:.0f} µs (batch 32) on this machine. "
            "Fine-tuned levels: 8 epochs SGD 0.01 on the train split with masks held (GMP: 15 epochs, cubic ramp to 90% "
            "over the first 10); `conv1` (72 weights) is never pruned. "
            "Latency ratios are compressed p50 / fp32 PyTorch p50 measured in the same call, 1 thread each.",
            table(
                [
                    "level",
                    "artifact bytes",
                    "smaller",
                    "params",
                    "sparsity",
                    "accuracy",
                    "Δ points",
                    "ECE",
                    "latency b=1",
                    "latency b=32",
                ],
                rows,
            ),
            f"Acceptance (≥ 8× smaller, ≤ 1 point loss, batch-1 latency ≤ 0.5×): {verdict}.",
            "Where the latency comes from: the fp32 ONNX row "
            f"({results[0][2].latency_ratio[1]:.2f}× at batch 1) shows that ONNX Runtime with full graph optimization "
            "(Conv+ReLU fusion), sequential execution and one thread already beats eager PyTorch, whose per-op "
            "dispatch dominates for a model this small. Integer kernels do not add speed at this size (int8 static "
            f"{results[2][2].latency_ratio[1]:.2f}×, dynamic {results[1][2].latency_ratio[1]:.2f}× — dynamic pays "
            "for quantizing activations on every call), and unstructured/2:4 zeros are not skipped by ORT's CPU "
            "kernels; they pay off in size only.",
            "OOD / corruption accuracy (%, change in points vs fp32 in brackets; ⚠ = drop larger than the clean drop; "
            "fp32: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in fp32_eval.accuracy.items()) + "):",
            table(["level", "clean", "noise σ=0.15", "rotation 20°", "blur σ=0.8", "shift 1 px"], ood_rows),
            "Adversarial accuracy (%, change in points vs fp32 under the same attack in brackets), L∞ on the 8×8 "
            f"images in [0, 1], all {len(yte)} test images. fp32: white-box. Compressed: adversarial inputs crafted "
            "on the level's PyTorch weights before quantization and evaluated on the artifact as shipped (BPDA). "
            "PGD: 10 steps of 2.5ε/10 from a random start.",
            table(["level"] + [f"{a.upper()} ε={e:g}" for a in ("fgsm", "pgd") for e in EPS], adv_rows),
            "Default quality gates of `deltaplane deploy` (max clean drop 1 pt, max OOD drop beyond clean 5 pts, "
            "max adversarial drop 10 pts) applied to each level's measured numbers — what the command would do — "
            f"and the same with a configured adversarial tolerance (`--max-adv-drop {args.max_adv_drop:g}`): the "
            "adversarial gate reads the largest drop over every attack and ε in the table above:",
            table(["level", "default gates", f"--max-adv-drop {args.max_adv_drop:g}"], gate_rows),
            "Device cost per batch-1 inference (estimates; `deltaplane.deploy.cost`): MACs counted by PyTorch's "
            "FlopCounterMode (dense: what ORT executes; non-zero: what a sparse kernel could skip to), file bytes "
            "(safetensors / artifact), weight bytes the runtime holds after decoding (int4 on this CNN is storage "
            "only: ORT's int4 kernel covers MatMul, and the CNN's Conv/Gemm run in fp32), peak activation bytes of the ORT-optimised graph (liveness walk), energy = MACs × "
            "pJ/MAC (int8 for int8 levels) + (weights + 2 × activations) × pJ/byte. Profiles: phone "
            f"{PROFILES['phone'].pj_per_mac_fp32} / {PROFILES['phone'].pj_per_mac_int8} pJ per fp32 / int8 MAC, "
            f"{PROFILES['phone'].pj_per_byte:g} pJ/byte (Horowitz ISSCC 2014, 45 nm); mcu "
            f"{PROFILES['mcu'].pj_per_mac_fp32:g} / {PROFILES['mcu'].pj_per_mac_int8:g} pJ, "
            f"{PROFILES['mcu'].pj_per_byte:g} pJ/byte (an estimate for a Cortex-M4F class microcontroller from its "
            "data sheet current and cycle counts; sources and arithmetic in `deltaplane.deploy.cost`).",
            table(
                [
                    "level",
                    "MACs",
                    "non-zero MACs",
                    "file bytes",
                    "runtime weight bytes",
                    "peak activation bytes",
                    "phone µJ",
                    "MCU µJ",
                ],
                cost_rows,
            ),
            f"Per-round device cost of this federated run, as `deltaplane run` reports it (`RunResult.device_cost`, "
            f"phone profile; {cfg.clients} clients, {cfg.clients_per_round()} per round, {cfg.local_epochs} local "
            f"epochs over {samples:.1f} samples on a mean device, {dc['forward_macs_per_sample']:,} forward MACs per "
            "sample, training ≈ 3× forward; bytes are the run's measured uplink/downlink per participating device, "
            "averaged over rounds; radio: the power model of Huang et al., MobiSys 2012, Table 3 at "
            f"{LINKS['wifi'].up_mbps:g} / {LINKS['wifi'].down_mbps:g} Mbit/s Wi-Fi (assumed) and "
            f"{LINKS['lte'].up_mbps:g} / {LINKS['lte'].down_mbps:g} Mbit/s LTE (the paper's medians): "
            f"{LINKS['wifi'].uj_per_byte_up:.2f} / {LINKS['wifi'].uj_per_byte_down:.2f} µJ per byte up/down on "
            f"Wi-Fi, {LINKS['lte'].uj_per_byte_up:.2f} / {LINKS['lte'].uj_per_byte_down:.2f} on LTE; tail energy "
            f"excluded, so lower bounds). Across the {len(per_round_lte)} rounds the LTE total per device ranges "
            f"{min(per_round_lte):.0f}–{max(per_round_lte):.0f} µJ:",
            table(["item", "MACs", "bytes", "µJ"], fed_rows),
        ]
    )
    record(
        "deploy_digits",
        "Deploy: digits CNN compression levels, size / accuracy / OOD / adversarial / gates / device cost",
        body,
    )


if __name__ == "__main__":
    main()

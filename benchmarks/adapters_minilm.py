"""Adapters on a real transformer: PEFT interop, merging vs PEFT, compressed factors, one base + 20 adapters.

all-MiniLM-L6-v2 with a classification head on the standard-library docstring task (deltaplane.data.docstrings:
1,757 real docstrings, 8 areas). 20 users each hold a Dirichlet(0.5) label-skewed share of the training set and
train a personal LoRA with PEFT (r=8 on query/value, the head in ``modules_to_save``; frozen base). Figures:

1. PEFT interop both ways: a PEFT-trained adapter loaded by deltaplane and materialized vs PEFT's
   ``merge_and_unload`` (max abs diff, target ≤ 1e-6); a deltaplane-made adapter (an SVD merge) loaded by PEFT.
2. Adapter merging vs PEFT's ``add_weighted_adapter`` on three of the users' adapters (target ≤ 1e-5 or explained).
3. Compression of an adapter's factors with several codecs vs the same codec on the materialized full change.
4. One int8 base + 20 compressed adapters in one bundle vs 20 personalized full int8 models (bytes), with each
   user's accuracy (fp32 base + adapter vs the bundle's int8 base + compressed adapter).

Run: ``python benchmarks/adapters_minilm.py`` (about 10 minutes on 2 cores, single-threaded; trained adapters are
cached under .bench-cache/adapters/users).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from _minilm_text import load_task, new_classifier, train
from _record import record, table
from deltaplane.adapters import LoRADelta, load_peft
from deltaplane.adapters.bundle import AdapterBundle, write_bundle
from deltaplane.adapters.merge import merge_adapters
from deltaplane.adapters.wire import compress_adapter, decompress_adapter
from deltaplane.codecs import Compressor
from deltaplane.data import dirichlet_partition
from deltaplane.deploy.artifact import write_artifact

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench-cache" / "adapters" / "users"
N_USERS, STEPS, LR, RANK = 20, 20, 3e-3, 8
LEVEL = 9  # zstd level for every artifact compared (the base, the bundle, the full models)


def user_split(task):
    rng = np.random.default_rng(1)
    labels = task.labels.numpy()[task.train]
    parts = dirichlet_partition(labels, N_USERS, 0.5, rng, min_size=20)
    return [task.train[p] for p in parts]


def train_users(task, base_model) -> list[Path]:
    import peft

    folders = []
    for i, idx in enumerate(user_split(task)):
        folder = WORK / f"user{i:02d}"
        folders.append(folder)
        if (folder / "adapter_model.safetensors").exists():
            continue
        cfg = peft.LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"], task_type="SEQ_CLS"
        )
        pm = peft.get_peft_model(copy.deepcopy(base_model), cfg)
        train(pm, task, idx, steps=STEPS, lr=LR, batch=16, seed=i)
        pm.save_pretrained(folder)
        print(f"trained user {i} on {len(idx)} examples", flush=True)
    return folders


@torch.no_grad()
def user_accuracy(model, state, task, shares: np.ndarray) -> float:
    """Accuracy on the user's own label distribution: per-class test accuracy weighted by the user's shares
    (classes under 5 % of the user's data are not evaluated)."""
    model.load_state_dict(state)
    model.eval()
    keep = shares >= 0.05
    shares = np.where(keep, shares, 0.0) / shares[keep].sum()
    idx = task.test[keep[task.labels.numpy()[task.test]]]
    correct = np.zeros(len(shares))
    total = np.zeros(len(shares))
    for s in range(0, len(idx), 128):
        b = torch.from_numpy(idx[s : s + 128])
        pred = model(input_ids=task.ids[b], attention_mask=task.mask[b]).logits.argmax(-1)
        y = task.labels[b].numpy()
        np.add.at(total, y, 1)
        np.add.at(correct, y, (pred.numpy() == y))
    return float(
        sum(shares[c] * correct[c] / total[c] for c in range(len(shares)) if shares[c] > 0 and total[c])
    )


def max_diff(a, b) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def interop(base_model, base, folders) -> str:
    import peft

    ours = load_peft(folders[0]).merged_into(base)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), folders[0])
    theirs = pm.merge_and_unload().state_dict()
    d1 = max_diff(ours, theirs)
    # the reverse: an adapter made by deltaplane (an SVD merge of three users, rank 8, plus user 0's head)
    users = [load_peft(f) for f in folders[:3]]
    merged = merge_adapters([u.replace(modules_to_save={}) for u in users], [1.0, 1.0, 1.0], "svd")
    merged = merged.replace(modules_to_save=users[0].modules_to_save)
    merged.task_type = "SEQ_CLS"
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_peft(tmp)
        pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), tmp)
        task = load_task()
        b = torch.from_numpy(task.test[:64])
        with torch.no_grad():
            logits_peft = pm2(input_ids=task.ids[b], attention_mask=task.mask[b]).logits
        theirs2 = pm2.merge_and_unload().state_dict()
    ours2 = merged.merged_into(base)
    d2 = max_diff(ours2, theirs2)
    m = copy.deepcopy(base_model)
    m.load_state_dict(ours2)
    with torch.no_grad():
        logits_ours = m(input_ids=task.ids[b], attention_mask=task.mask[b]).logits
    d3 = float((logits_ours - logits_peft).abs().max())
    print("interop", d1, d2, d3)
    return table(
        ["direction", "max abs diff of merged weights", "target"],
        [
            ["PEFT-trained adapter (user 0) → deltaplane `load_peft` + `materialize`, vs PEFT `merge_and_unload`",
             f"{d1:.2e}", "≤ 1e-6 " + ("met" if d1 <= 1e-6 else "MISSED")],
            ["deltaplane adapter (SVD merge of 3 users + a head) → `save_peft` → PEFT `from_pretrained` + merge",
             f"{d2:.2e}", "≤ 1e-6 " + ("met" if d2 <= 1e-6 else "MISSED")],
        ],
    ) + f"\n\nLogits of the PEFT-loaded model vs deltaplane's merged weights on 64 test texts: max abs diff {d3:.2e}."  # fmt: skip


def merging(base_model, folders) -> str:
    import peft
    from peft.utils import merge_utils

    from deltaplane.merging.base import tensor_generator

    with tempfile.TemporaryDirectory() as tmp:
        users = []
        for i, f in enumerate(folders[:3]):
            lora = load_peft(f).replace(modules_to_save={})  # heads are not merged (PEFT refuses them too)
            lora.task_type = None
            lora.save_peft(f"{tmp}/u{i}")
            users.append(lora)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), f"{tmp}/u0", adapter_name="u0")
        for i in (1, 2):
            pm.load_adapter(f"{tmp}/u{i}", adapter_name=f"u{i}")

    def peft_layers(name):
        out = {}
        for mod_name, mod in pm.base_model.model.named_modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                out[mod_name + ".weight"] = (
                    mod.scaling[name] * mod.lora_B[name].weight @ mod.lora_A[name].weight
                )
        return out

    cases = [
        ("linear", [1.0, 0.5, 0.25], {}), ("cat", [1.0, 0.5, 0.25], {}), ("svd", [1.0, 0.5, 0.25], {}),
        ("magnitude_prune", [1.0, 0.5, 0.25], {"density": 0.3}), ("magnitude_prune_svd", [1.0, 0.5, 0.25], {"density": 0.3}),
        ("ties", [1.0, 1.0, 1.0], {"density": 0.3}), ("ties_svd", [1.0, 1.0, 1.0], {"density": 0.3}),
        ("ties", [1.0, 0.5, 0.25], {"density": 0.3}), ("ties_svd", [1.0, 0.5, 0.25], {"density": 0.3}),
        ("dare_linear", [1.0, 0.5, 0.25], {"density": 0.5}), ("dare_ties", [1.0, 1.0, 1.0], {"density": 0.5}),
        ("dare_linear_svd", [1.0, 0.5, 0.25], {"density": 0.5}),
    ]  # fmt: skip
    rows = []
    for n, (kind, weights, kw) in enumerate(cases):
        seed = 11
        patched = kind.startswith("dare")
        if (
            patched
        ):  # hand PEFT the masks our seeded generators draw, so the rest of the maths can be compared
            masks = []
            for lname in users[0]:
                parts = (
                    [(lname, None)] if kind.endswith("svd") else [(f"{lname}.A", "A"), (f"{lname}.B", "B")]
                )
                for key, part in parts:
                    for i, u in enumerate(users):
                        t = u[lname].delta_weight() if part is None else getattr(u[lname], part)
                        m = torch.rand(t.shape, generator=tensor_generator(seed, key, i)) < kw["density"]
                        masks.append((t, m))
            original = merge_utils.random_pruning

            def random_pruning(tensor, density, rescale, masks=masks):
                m = next(
                    m for t, m in masks if t.shape == tensor.shape and torch.allclose(t, tensor, atol=1e-7)
                )
                out = tensor * m
                return out / density if rescale else out

            merge_utils.random_pruning = random_pruning
        try:
            pm.add_weighted_adapter(["u0", "u1", "u2"], weights, f"m{n}", combination_type=kind, **kw)
        finally:
            if patched:
                merge_utils.random_pruning = original
        ours = merge_adapters(users, weights, kind, seed=seed, **kw)
        ref = peft_layers(f"m{n}")
        with torch.no_grad():
            diff = max(float((ours[k].delta_weight() - ref[k]).abs().max()) for k in ref)
            scale = max(float(ref[k].abs().max()) for k in ref)
        note = ""
        if kind.startswith("ties") and len(set(weights)) > 1:
            note = "explained: TIES sign election on weighted vectors (mergekit, our full merges) vs PEFT's unweighted"
        elif patched:
            note = "masks from deltaplane's seeded generators handed to PEFT"
        ok = diff <= 1e-5 or bool(note.startswith("explained"))
        rows.append([kind, ", ".join(f"{w:g}" for w in weights), str(kw.get("density", "")), f"{diff:.2e}",
                     f"{scale:.2e}", ("met" if ok else "MISSED") + (f" ({note})" if note else "")])  # fmt: skip
        print("merge", kind, weights, diff, flush=True)
    return table(
        ["combination", "weights", "density", "max abs diff of ΔW vs PEFT", "max |ΔW|", "≤ 1e-5"], rows
    )


def compression(lora: LoRADelta, base) -> str:
    full = lora.replace(modules_to_save={}).materialize(base, only_adapted=True)
    rows = []
    for spec in ["identity", "fp16", "quant(bits=8)", "quant(bits=4, chunk=64)", "quant(bits=8) | zstd(level=3)",
                 "topk(ratio=0.1) | quant(bits=8)"]:  # fmt: skip
        ad = lora.replace(modules_to_save={})
        payload = compress_adapter(ad, spec)
        back = decompress_adapter(payload).materialize(base, only_adapted=True)
        err = (back - full).norm() / full.norm()
        dense = len(Compressor(spec, error_feedback=False).compress(full))
        rows.append(
            [
                f"`{spec}`".replace("|", "\\|"),
                f"{len(payload):,}",
                f"{dense:,}",
                f"{dense / len(payload):.1f}×",
                f"{err:.4f}",
            ]
        )
    return table(["codec", "adapter payload (bytes)", "materialized ΔW payload (bytes)", "ratio",
                  "rel. error of ΔW"], rows)  # fmt: skip


def bundle(base_model, base, folders, task) -> tuple[str, dict]:
    users = {f.name: load_peft(f) for f in folders}
    splits = user_split(task)
    n_classes = len(task.classes)
    with tempfile.TemporaryDirectory() as tmp:
        info = write_bundle(Path(tmp) / "fleet.dplb", base, users, base_id="minilm-docstrings", level=LEVEL)
        b = AdapterBundle(Path(tmp) / "fleet.dplb")
        full_bytes = []
        rows = []
        accs = []
        model = copy.deepcopy(base_model)
        for (name, lora), idx in zip(users.items(), splits, strict=True):
            merged = lora.merged_into(base)
            full_bytes.append(
                write_artifact(Path(tmp) / f"{name}.dpla", merged, quant="int8", level=LEVEL).nbytes
            )
            shares = np.bincount(task.labels.numpy()[idx], minlength=n_classes) / len(idx)
            a_fp = user_accuracy(model, merged, task, shares)
            a_b = user_accuracy(model, b.model_state(name), task, shares)
            a_base = user_accuracy(model, base, task, shares)
            accs.append((a_base, a_fp, a_b))
            rows.append(
                [
                    name,
                    len(idx),
                    f"{a_base:.3f}",
                    f"{a_fp:.3f}",
                    f"{a_b:.3f}",
                    f"{info.adapter_nbytes[name]:,}",
                ]
            )
            print("user", name, a_base, a_fp, a_b, flush=True)
    total_full = sum(full_bytes)
    acc = np.array(accs)
    summary = (
        f"One bundle: {info.nbytes:,} bytes (int8 base {info.base_nbytes:,} + {len(users)} adapters "
        f"{sum(info.adapter_nbytes.values()):,}, mean {np.mean(list(info.adapter_nbytes.values())):,.0f} each, "
        f"codec `quant(bits=8, chunk=128) | zstd`). {len(users)} personalized full int8 models: {total_full:,} bytes. "
        f"**Size ratio: {total_full / info.nbytes:.1f}× smaller** (base + 20 adapters ÷ 20 full int8 models = "
        f"{info.nbytes / total_full:.3f}). Mean accuracy over users: base (shared random head) {acc[:, 0].mean():.3f}, "
        f"fp32 base + adapter {acc[:, 1].mean():.3f}, bundle (int8 base + int8 factors) {acc[:, 2].mean():.3f} "
        f"(largest drop {np.max(acc[:, 1] - acc[:, 2]):+.3f})."
    )
    body = (
        summary
        + "\n\n"
        + table(
            ["user", "train examples", "acc. base", "acc. fp32 + adapter", "acc. bundle", "adapter bytes"],
            rows,
        )
    )
    return body, {"ratio": total_full / info.nbytes}


def main() -> None:
    torch.set_num_threads(1)
    task = load_task()
    base_model = new_classifier(len(task.classes), seed=0)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    WORK.mkdir(parents=True, exist_ok=True)
    folders = train_users(task, base_model)
    sections = [
        ("PEFT interop (MiniLM)", interop(base_model, base, folders)),
        ("Adapter merging vs PEFT add_weighted_adapter (MiniLM)", merging(base_model, folders)),
        ("Adapter compression: codecs on LoRA factors vs the materialized change (MiniLM)",
         compression(load_peft(folders[0]), base)),
    ]  # fmt: skip
    bundle_body, _ = bundle(base_model, base, folders, task)
    sections.append(("One base + 20 adapters vs 20 full int8 models (MiniLM)", bundle_body))
    intro = (
        f"all-MiniLM-L6-v2 + classification head, stdlib-docstring task; {N_USERS} users (Dirichlet 0.5 label skew), "
        f"each a PEFT LoRA r={RANK} on query/value + the head in modules_to_save, {STEPS} AdamW steps (lr {LR}), "
        "frozen base. Single-threaded.\n\n"
    )
    record("adapters-minilm", "Adapters on MiniLM: interop, merging, compression, one base + 20 adapters",
           intro + "\n\n".join(f"### {t}\n\n{b}" for t, b in sections))  # fmt: skip


if __name__ == "__main__":
    main()

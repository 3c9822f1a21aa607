"""LoRA extraction on a real MiniLM fine-tune: ``deltaplane extract-lora`` vs ``mergekit-extract-lora``.

Acceptance (issue 17): at the same rank, time and peak RSS ≤ 0.5× mergekit's, reconstruction error ≤ 1.05×.

The fine-tune is real: all-MiniLM-L6-v2 with a classification head, every weight trained (AdamW) on the
standard-library docstring task (deltaplane.data.docstrings); the encoder is saved in BertModel layout and both
tools extract a rank-r adapter of its linear layers against the original weights (embeddings excluded by both:
``-e embeddings`` for mergekit; LayerNorms are not linear: ``--skip-undecomposable``). Each tool runs as its own
command in a fresh process, timed end to end (imports included, as a user runs it), peak RSS from
``ru_maxrss`` of that process; best of ``--repeats``. Errors are computed here from each tool's written factors.

Run: ``python benchmarks/adapters_extract.py [--rank 16] [--steps 30]`` (a few minutes on 2 cores, single-threaded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _minilm_text import accuracy, load_task, minilm_folder, new_classifier, train
from _record import record, table

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".bench-cache" / "adapters"
VENV_BIN = Path(sys.executable).parent

MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, 'err': r.stderr[-2000:],\n"
    "                  'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
)
"""Runs a command; reports its wall time and peak RSS (ru_maxrss of the child: its own address space)."""

IN_PROCESS = """
import json, sys, time
def vm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
import torch
torch.set_num_threads(1)
{imports}
before = vm("VmHWM:")
t = time.perf_counter()
try:
    {call}
except SystemExit as exc:
    if exc.code:
        raise
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_mb": vm("VmHWM:"), "import_mb": before}}))
"""
"""The extraction call alone, after the tool's imports: its time, and the process peak with its import share."""

CALLS = {
    "deltaplane": ("from deltaplane.cli import app", "app(ARGS, standalone_mode=False)"),
    "mergekit": ("from mergekit.scripts.extract_lora import main", "main(ARGS, standalone_mode=False)"),
}


def fine_tune(out: Path, steps: int) -> dict:
    """Fully fine-tune MiniLM on the docstring task and save the encoder (BertModel layout) to ``out``."""
    from safetensors.torch import load_file, save_file

    task = load_task()
    model = new_classifier(len(task.classes))
    before = accuracy(model, task, task.test)
    train(model, task, task.train, steps=steps, lr=1e-4, batch=16)
    after = accuracy(model, task, task.test)
    base = load_file(minilm_folder() / "model.safetensors")
    enc = {
        k.removeprefix("bert."): v.contiguous()
        for k, v in model.state_dict().items()
        if k.startswith("bert.")
    }
    ft = {k: enc.get(k, v) for k, v in base.items()}  # same tensor set as the base (position_ids buffer)
    out.mkdir(parents=True, exist_ok=True)
    save_file(ft, out / "model.safetensors")
    shutil.copy(minilm_folder() / "config.json", out / "config.json")
    info = {"steps": steps, "acc_before": before, "acc_after": after}
    (out / "finetune.json").write_text(json.dumps(info))
    return info


def measured(cmd: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{res['err']}")
    return res


def in_process(tool: str, args: list[str]) -> dict:
    imports, call = CALLS[tool]
    code = IN_PROCESS.format(imports=imports, call=call.replace("ARGS", repr(args)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_import_mb() -> float:
    code = "import torch\nfor l in open('/proc/self/status'):\n    l.startswith('VmHWM:') and print(int(l.split()[1]) / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())


def layer_errors(adapter: Path, ft: Path, base: Path) -> dict[str, float]:
    """Relative Frobenius error of each extracted weight, from the raw factors a tool wrote."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    fw, bw = load_file(ft / "model.safetensors"), load_file(base / "model.safetensors")
    out = {}
    for key in t:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        A, B = t[key].double(), t[key.replace("lora_A", "lora_B")].double()
        r = A.shape[0]
        alpha = next((v for k, v in cfg.get("alpha_pattern", {}).items() if module.endswith(k.replace("\\", ""))),
                     cfg["lora_alpha"])  # fmt: skip
        scaling = alpha / r  # neither tool uses rslora
        delta = (fw[module + ".weight"] - bw[module + ".weight"]).double()
        out[module] = float((delta - scaling * B @ A).norm() / delta.norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ft = WORK / f"minilm-ft-{args.steps}"
    info = (
        json.loads((ft / "finetune.json").read_text())
        if (ft / "finetune.json").exists()
        else fine_tune(ft, args.steps)
    )
    base = minilm_folder()
    out_dp, out_mk = WORK / "extract-dp", WORK / "extract-mk"
    argv = {
        "deltaplane": ["extract-lora", str(ft), "--base", str(base), "--rank", str(args.rank), "-o", str(out_dp), "-q"],
        "mergekit": ["--model", str(ft), "--base-model", str(base), "--out-path", str(out_mk), "--max-rank",
                     str(args.rank), "-e", "embeddings", "--skip-undecomposable"],
    }  # fmt: skip
    exe = {"deltaplane": str(VENV_BIN / "deltaplane"), "mergekit": str(VENV_BIN / "mergekit-extract-lora")}
    outs = {"deltaplane": out_dp, "mergekit": out_mk}
    runs: dict[str, list[dict]] = {"deltaplane": [], "mergekit": []}
    calls: dict[str, list[dict]] = {"deltaplane": [], "mergekit": []}
    for _ in range(args.repeats):
        for tool in runs:
            shutil.rmtree(outs[tool], ignore_errors=True)
            runs[tool].append(measured([exe[tool], *argv[tool]]))
            shutil.rmtree(outs[tool], ignore_errors=True)
            calls[tool].append(in_process(tool, argv[tool]))

    def best_of(rs: list[dict]) -> dict:
        return {k: min(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}

    best = {k: best_of(v) for k, v in runs.items()}
    call = {k: best_of(v) for k, v in calls.items()}
    torch_mb = _torch_import_mb()
    err_dp, err_mk = layer_errors(out_dp, ft, base), layer_errors(out_mk, ft, base)
    assert err_dp.keys() == err_mk.keys(), (sorted(err_dp.keys() ^ err_mk.keys()))[:5]
    mean_dp = sum(err_dp.values()) / len(err_dp)
    mean_mk = sum(err_mk.values()) / len(err_mk)
    worst = max(err_dp[k] / err_mk[k] for k in err_dp)
    t_ratio = best["deltaplane"]["seconds"] / best["mergekit"]["seconds"]
    m_ratio = best["deltaplane"]["peak_mb"] / best["mergekit"]["peak_mb"]
    c_ratio = call["deltaplane"]["seconds"] / call["mergekit"]["seconds"]
    above = {k: v["peak_mb"] - v["import_mb"] for k, v in call.items()}
    e_ratio = mean_dp / mean_mk
    print(
        json.dumps(
            {"best": best, "call": call, "mean_err": [mean_dp, mean_mk], "worst_layer_ratio": worst}, indent=1
        )
    )
    load = os.getloadavg()[0]
    body = (
        f"all-MiniLM-L6-v2 fully fine-tuned for {info['steps']} AdamW steps on the stdlib-docstring task (test "
        f"accuracy {info['acc_before']:.3f} → {info['acc_after']:.3f}); rank {args.rank} adapter of its "
        f"{len(err_dp)} linear layers (embeddings excluded by both tools, biases carried as `lora_B.bias` by "
        "both). Each tool is one command in a fresh process, single-threaded, timed end to end including "
        f"imports; best of {args.repeats}. Load average {load:.1f} on {os.cpu_count()} cores.\n\n"
        + table(
            ["tool", "time (s)", "peak RSS (MB)", "mean rel. error", "time ÷ mergekit", "RSS ÷ mergekit"],
            [
                [
                    "deltaplane extract-lora",
                    f"{best['deltaplane']['seconds']:.2f}",
                    f"{best['deltaplane']['peak_mb']:.0f}",
                    f"{mean_dp:.5f}",
                    f"{t_ratio:.2f}",
                    f"{m_ratio:.2f}",
                ],
                [
                    "mergekit-extract-lora 0.1.5",
                    f"{best['mergekit']['seconds']:.2f}",
                    f"{best['mergekit']['peak_mb']:.0f}",
                    f"{mean_mk:.5f}",
                    "1.00",
                    "1.00",
                ],
            ],
        )
        + "\n\nThe extraction call alone, in a fresh process after the tool's imports (as the merge benchmark "
        "measures merges):\n\n"
        + table(
            ["tool", "call time (s)", "call time ÷ mergekit", "peak RSS above imports (MB)", "imports (MB)"],
            [
                [
                    k,
                    f"{call[k]['seconds']:.2f}",
                    f"{call[k]['seconds'] / call['mergekit']['seconds']:.2f}",
                    f"{above[k]:.0f}",
                    f"{call[k]['import_mb']:.0f}",
                ]
                for k in ("deltaplane", "mergekit")
            ],
        )
        + f"\n\nError ratio (deltaplane ÷ mergekit): mean {e_ratio:.4f}, worst layer {worst:.4f} (target ≤ 1.05). "
        f"Targets (end to end): time ≤ 0.5× {'met' if t_ratio <= 0.5 else 'MISSED'} (call alone "
        f"{c_ratio:.2f}×), RSS ≤ 0.5× "
        f"{'met' if m_ratio <= 0.5 else 'MISSED'}, error ≤ 1.05× {'met' if e_ratio <= 1.05 else 'MISSED'}. "
        f"On the RSS target: `import torch` alone peaks at {torch_mb:.0f} MB, "
        f"{torch_mb / best['mergekit']['peak_mb']:.2f}× mergekit's whole run, so a torch-based tool cannot reach "
        f"0.5× on a model this small; above the imports deltaplane uses {above['deltaplane'] / above['mergekit']:.2f}× "
        "mergekit's memory, and that share shrinks with the model (it holds one pair of weights at a time). "
        "mergekit takes the exact truncated SVD of every layer; deltaplane takes a randomized SVD (rank + 10 "
        "columns, 4 power iterations) where the rank is small next to the layer, which is where its call time "
        "comes from, at the error ratio above. The rest of the difference is the process: deltaplane reads the two safetensors files tensor by tensor with `pread` and never builds a "
        "model, mergekit imports transformers, instantiates the architecture on the meta device and schedules "
        "a task graph."
    )
    record("adapters-extract", "LoRA extraction vs mergekit-extract-lora (MiniLM)", body)


if __name__ == "__main__":
    main()

"""What a merge writes besides the weights: config, tokenizer, chat template, the recipe and a model card.

As mergekit does, the output gets the donor's ``config.json`` (the base model's, else the first model's; with the
output dtype and, after ``slices``, the new layer count), the tokenizer files of ``tokenizer_source`` (default: the
donor), the ``chat_template`` if one is set, the recipe as given (``mergekit_config.yml``) and a ``README.md``
model card naming the method, the models and the recipe. Beyond mergekit, ``merge_sources.json`` names each input
by the SHA-256 of its weights file (:func:`write_sources`): ``registry register`` of the output links the registry
versions holding those weights as its sources, so their cohorts (and any withdrawal of their consent) follow.

Tokenizers are copied, never rebuilt: ``tokenizer_source: union`` (or a model other than the donor) needs every
input's vocabulary to be the same — then mergekit's union/permutation is the identity and the embeddings are
merged as they are. Different vocabularies would need the embedding rows re-aligned to a new vocabulary, which
deltaplane does not do; that is refused with the reason before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deltaplane.errors import ConfigError
from deltaplane.merging.base import MergeMethod
from deltaplane.merging.checkpoint import Checkpoint
from deltaplane.merging.config import CHATML, MergeConfig
from deltaplane.shards import TOKENIZER_FILES, file_sha256, folder_weights, pull_manifest
from deltaplane.textfile import MANIFEST_LIMIT, TOKENIZER_LIMIT, read_bounded_bytes, read_bounded_text

__all__ = [
    "CONFIG_FILES",
    "SOURCES_KIND",
    "SOURCES_NAME",
    "TOKENIZER_FILES",
    "TokenizerPlan",
    "plan_tokenizer",
    "write_extras",
    "write_sources",
]

CONFIG_FILES = ("config.json", "generation_config.json")

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

SOURCES_NAME = "merge_sources.json"
"""The file of a merge output naming its inputs' weights (:func:`write_sources`)."""
SOURCES_KIND = "deltaplane-merge"
"""``merge_sources.json``'s ``kind``: what ``registry register`` looks for before it links the inputs."""


def _json_or_none(path: Path, *, limit: int, what: str) -> Any:
    """The JSON value in ``path``, or ``None`` when it is not JSON: a malformed file only lacks what was
    looked for in it, while one too large or not UTF-8 is still refused (:func:`read_bounded_text`'s
    :class:`ConfigError`)."""
    text = read_bounded_text(path, limit=limit, what=what)
    try:
        return json.loads(text)
    except ValueError:
        return None


def _vocabulary(folder: Path) -> str | None:
    """A fingerprint of the folder's tokenizer vocabulary (with added tokens), or ``None`` if it has none."""
    tj = folder / "tokenizer.json"
    h = hashlib.sha256()
    if tj.is_file():
        data = _json_or_none(tj, limit=TOKENIZER_LIMIT, what="tokenizer file")
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "vocab" in data["model"]:
            h.update(json.dumps(data["model"]["vocab"], sort_keys=True).encode())
            added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
            h.update(json.dumps(added).encode())
            return h.hexdigest()
    for name in ("vocab.txt", "vocab.json", "tokenizer.model"):
        f = folder / name
        if f.is_file():
            h.update(read_bounded_bytes(f, limit=TOKENIZER_LIMIT, what="tokenizer file"))
            added_file = folder / "added_tokens.json"
            if added_file.is_file():
                h.update(read_bounded_bytes(added_file, limit=TOKENIZER_LIMIT, what="tokenizer file"))
            return h.hexdigest()
    return None


class TokenizerPlan:
    """Where the output's tokenizer files come from and the chat template to set (``None``: keep the source's)."""

    def __init__(self, folder: Path, chat_template: str | None) -> None:
        self.folder = folder
        self.chat_template = chat_template


def plan_tokenizer(cfg: MergeConfig, donor: Path, inputs: list[Path]) -> TokenizerPlan:
    """Decide the tokenizer files and chat template from ``tokenizer_source`` / ``tokenizer`` / ``chat_template``.

    Raises:
        ConfigError: the named source has no tokenizer, the inputs' vocabularies differ (embedding re-alignment is
            not supported), ``tokenizer.tokens`` is set, or ``chat_template`` names an unknown template.
    """
    where = cfg.source
    source: Any = cfg.tokenizer_source
    if cfg.tokenizer is not None:
        source = cfg.tokenizer.source
        if cfg.tokenizer.tokens:
            raise ConfigError(
                f"{where}: tokenizer.tokens (adding tokens or choosing their embedding sources) needs embedding "
                "surgery, which deltaplane does not do; remove it or merge with mergekit"
            )
        if cfg.tokenizer.pad_to_multiple_of:
            raise ConfigError(
                f"{where}: tokenizer.pad_to_multiple_of would resize the embeddings, which deltaplane does not do"
            )
        if isinstance(source, dict):
            raise ConfigError(
                f"{where}: tokenizer.source must be 'base', 'union' or a model path. Found {source!r}"
            )
    folder = donor
    if source is not None:
        if source == "base":
            if cfg.base_model is None:
                raise ConfigError(f"{where}: tokenizer_source: base needs base_model")
            folder = cfg.resolve(cfg.base_model)
        elif source != "union":
            folder = cfg.resolve(source)
        folder = folder if folder.is_dir() else folder.parent
        vocabs = {p: _vocabulary(p) for p in dict.fromkeys([folder, *inputs])}
        missing = [str(p) for p, v in vocabs.items() if v is None]
        if missing:
            raise ConfigError(
                f"{where}: tokenizer_source needs each model's tokenizer files to check the vocabularies; "
                f"none found in {', '.join(missing)}"
            )
        if len(set(vocabs.values())) > 1:
            raise ConfigError(
                f"{where}: the models' tokenizer vocabularies differ, so tokenizer_source would re-align the "
                "embedding rows to a new vocabulary, which deltaplane does not do. Merge models that share a "
                "tokenizer, or use mergekit for this merge"
            )
    template = cfg.chat_template
    if template is not None:
        if template == "chatml":
            template = CHATML
        elif template == "auto":
            found = [t for p in dict.fromkeys([folder, *inputs]) if (t := _chat_template(p)) is not None]
            if not found:
                raise ConfigError(f"{where}: chat_template: auto found no chat template in any input model")
            template = Counter(found).most_common(1)[0][0]
        elif "{{" not in template and "{%" not in template:
            raise ConfigError(
                f"{where}: unknown chat_template '{template}'. Use chatml, auto or the Jinja template text itself"
            )
    return TokenizerPlan(folder, template)


def _chat_template(folder: Path) -> str | None:
    f = folder / "tokenizer_config.json"
    if f.is_file():
        data = _json_or_none(f, limit=TOKENIZER_LIMIT, what="tokenizer config")
        t = data.get("chat_template") if isinstance(data, dict) else None
        return t if isinstance(t, str) else None
    return None


def write_extras(
    cfg: MergeConfig,
    method: MergeMethod,
    out: Path,
    donor: Path,
    tokenizer: TokenizerPlan,
    out_dtype: torch.dtype | None,
    n_layers: int | None,
    model_labels: list[str],
    notes: list[str],
    title: str,
    *,
    untie_head: bool = False,
) -> list[str]:
    """Write config, tokenizer, recipe and card into ``out``; returns the file names written.

    ``title`` is the card's title when the config has no ``name:``: the final output folder's name, since ``out``
    is usually a temporary staging folder that is renamed into place afterwards. ``untie_head``: the donor ties its
    head to its embedding but the output holds a merged head (``Plan.untie_head``), so the config says
    ``tie_word_embeddings: false`` (inside ``text_config`` too where it says so there).
    """
    written = []
    for name in CONFIG_FILES:
        f = donor / name
        if not f.is_file():
            continue
        if name == "config.json" and (out_dtype is not None or n_layers is not None or untie_head):
            data = _json_or_none(f, limit=MANIFEST_LIMIT, what="model config")
            if isinstance(data, dict):
                if out_dtype is not None:
                    # the advertised dtype is the output's, written even when the donor had none (as mergekit
                    # does); transformers 5 names the key dtype, earlier versions torch_dtype
                    dt = str(out_dtype).removeprefix("torch.")
                    keys = [k for k in ("torch_dtype", "dtype") if k in data]
                    if not keys:
                        v5 = (
                            str(data.get("transformers_version", "")).split(".")[0].isdigit()
                            and int(str(data["transformers_version"]).split(".")[0]) >= 5
                        )
                        keys = ["dtype" if v5 else "torch_dtype"]
                    for k in keys:
                        data[k] = dt
                if n_layers is not None:
                    for key in _LAYER_KEYS:
                        if key in data:
                            data[key] = n_layers
                if untie_head:
                    data["tie_word_embeddings"] = False
                    if (
                        isinstance(data.get("text_config"), dict)
                        and "tie_word_embeddings" in data["text_config"]
                    ):
                        data["text_config"]["tie_word_embeddings"] = False
                (out / name).write_text(json.dumps(data, indent=2) + "\n")
                written.append(name)
                continue
        shutil.copyfile(f, out / name)
        written.append(name)
    for name in TOKENIZER_FILES:
        f = tokenizer.folder / name
        if f.is_file():
            shutil.copyfile(f, out / name)
            written.append(name)
    if tokenizer.chat_template is not None:
        tc = out / "tokenizer_config.json"
        data = (
            json.loads(read_bounded_text(tc, limit=TOKENIZER_LIMIT, what="tokenizer config"))
            if tc.is_file()
            else {}
        )
        data["chat_template"] = tokenizer.chat_template
        tc.write_text(json.dumps(data, indent=2) + "\n")
        if "tokenizer_config.json" not in written:
            written.append("tokenizer_config.json")
    recipe = cfg.text if cfg.text is not None else _dump(cfg)
    (out / "mergekit_config.yml").write_text(recipe if recipe.endswith("\n") else recipe + "\n")
    written.append("mergekit_config.yml")
    kind = _model_kind(donor)
    (out / "README.md").write_text(_card(cfg, method, title, model_labels, recipe, notes, kind))
    written.append("README.md")
    return written


def _dump(cfg: MergeConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(exclude_defaults=True, mode="json"), sort_keys=False)


def _model_kind(donor: Path) -> tuple[str, bool]:
    """What the merged models are, in the card's words, and whether they are ``transformers`` models.

    Only a ``config.json`` that ``transformers`` wrote (a ``model_type`` and the ``transformers_version`` every
    ``save_pretrained`` records) makes the card say ``library_name: transformers``; the card used to say that,
    and "pre-trained language models", of any merge — a plain torch MLP's included. Otherwise the card names the
    architecture the config gives (``architecture``, as ``deploy``'s :func:`save_checkpoint` writes it) or says
    none is recorded.
    """
    conf = (
        _json_or_none(donor / "config.json", limit=MANIFEST_LIMIT, what="model config")
        if (donor / "config.json").is_file()
        else None
    )
    conf = conf if isinstance(conf, dict) else {}
    archs = conf.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    arch = arch or (conf["architecture"] if isinstance(conf.get("architecture"), str) else None)
    model_type = conf.get("model_type")
    if isinstance(model_type, str) and "transformers_version" in conf:
        named = f"`{arch}`, model_type `{model_type}`" if arch else f"model_type `{model_type}`"
        return f"pre-trained `transformers` models ({named})", True
    if arch:
        return f"`{arch}` models (PyTorch weights in safetensors; not a `transformers` model)", False
    return "safetensors checkpoints (no config.json names their architecture)", False


def _card(
    cfg: MergeConfig,
    method: MergeMethod,
    default_title: str,
    models: list[str],
    recipe: str,
    notes: list[str],
    kind: tuple[str, bool],
) -> str:
    title = cfg.name or default_title
    link = f"[{method.name}]({method.url})" if method.url else method.name
    bases = [cfg.base_model] if cfg.base_model else []
    what, transformers = kind
    lines = [
        "---",
        "base_model:",
        *(f"- {m}" for m in dict.fromkeys(bases + models)),
        *(["library_name: transformers"] if transformers else []),
        "tags:",
        "- mergekit",
        "- merge",
        "- deltaplane",
        "---",
        f"# {title}",
        "",
        f"This is a merge of {what} created with deltaplane "
        "(`deltaplane merge`, a mergekit-compatible streaming merge).",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        f"This model was merged using the {link} merge method ({method.paper})"
        + (f", with {cfg.base_model} as the base." if cfg.base_model else "."),
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
        *(f"* {m}" for m in dict.fromkeys(models)),
        "",
    ]
    if notes:
        lines += ["### Notes", "", *(f"* {n}" for n in notes), ""]
    lines += [
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        recipe.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _weights_file(ck: Checkpoint) -> Path:
    """The file whose SHA-256 the registry knows ``ck`` by: the ``.safetensors`` file named, else the folder's
    ``model.safetensors`` or its index (what ``registry register`` records as the folder's ``source.sha256``,
    and what ``registry pull`` writes, hashing as the version), else its one ``.safetensors`` file."""
    if ck.path.is_file():
        return ck.path
    return folder_weights(ck.path) or next(iter(ck.infos.values())).file


def write_sources(out: Path, models: Sequence[Checkpoint], method: str) -> str:
    """Write ``merge_sources.json`` into ``out``, naming each input model (and base) by its weights' SHA-256;
    returns the file name.

    ``registry register OUT`` looks each hash up (``Registry.deployed_from``: a version's own bytes, as a pulled
    folder holds them, or the file it was registered from) and links the versions found as the merged version's
    ``sources``, so their cohorts flow into it and a withdrawal of one reaches it. An input pulled from a
    registry (its ``manifest.json`` says so) is also named by the version it was pulled as (``pulled_as``), so a
    register that finds no version holding it can refuse rather than drop its cohorts.

    Each input is read once more to hash it, after the merge: 0.9 s for two 257 MB inputs on a 2-core machine
    at load 7 (a linear merge of them takes 1.1 s there). Hashing in a thread beside the merge was no faster
    on that machine, so the simpler sequential read stays."""
    inputs: list[dict[str, Any]] = []
    for ck in models:
        f = _weights_file(ck)
        entry: dict[str, Any] = {"model": str(ck.path), "file": f.name, "sha256": file_sha256(f)}
        pulled = pull_manifest(ck.path)
        if pulled is not None and isinstance(pulled.get("ref"), str):
            entry["pulled_as"] = pulled["ref"]
        inputs.append(entry)
    record = {"kind": SOURCES_KIND, "merge_method": method, "inputs": inputs}
    (out / SOURCES_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return SOURCES_NAME

"""`registry register` of a deploy artifact links the version it was deployed from.

A deploy manifest records ``source_sha256``, the weights file it compressed; the artifact used to be registered
with no parent and no source unless ``--lineage`` named one by hand, so its governance and tokenizer were lost.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
from tests.registry.test_companion_inheritance import STATE, TOKENIZER

from deltaplane.deploy.artifact import write_artifact
from deltaplane.registry import Registry


def _dpla(path: Path, source_sha256: str) -> Path:
    """A deploy artifact whose manifest names the weights it compressed, as `deltaplane deploy` writes it."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.numpy().astype(np.float32) for k, v in STATE.items()}
    write_artifact(
        path / "model.dpla", tensors, quant="int8", manifest={"model": "m", "source_sha256": source_sha256}
    )
    return path


def test_a_deploy_artifact_is_linked_to_the_version_it_was_deployed_from(tmp_path, registry_cli) -> None:
    cli = registry_cli
    assert cli("registry", "init", "--no-encrypt").exit_code == 0
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(STATE, str(hf / "model.safetensors"))
    for name, data in TOKENIZER.items():
        (hf / name).write_bytes(data)
    assert cli("registry", "register", "m", hf).exit_code == 0
    # pulled, then deployed: the pulled file is the version's bytes, so the deploy's source hash is its sha256
    assert cli("registry", "pull", "m@1", "--out", tmp_path / "pulled").exit_code == 0
    reg = Registry(tmp_path / "home")
    pulled = hashlib.sha256((tmp_path / "pulled" / "model.safetensors").read_bytes()).hexdigest()
    assert pulled == reg.get("m", 1).sha256
    r = cli("registry", "register", "m", _dpla(tmp_path / "dep1", pulled))
    assert r.exit_code == 0 and "parent m@1: it holds the weights it was deployed from" in r.output, r.output
    v2 = reg.get("m", 2)
    assert v2.parent == 1 and reg.load_files(v2) == TOKENIZER  # and the tokenizer came with the link
    # deployed straight from the registered folder: its file's hash is in m@1's signed lineage
    folder_sha = hashlib.sha256((hf / "model.safetensors").read_bytes()).hexdigest()
    r = cli("registry", "register", "m-int8", _dpla(tmp_path / "dep2", folder_sha))
    assert r.exit_code == 0 and "source m@1" in r.output, r.output
    assert reg.get("m-int8", 1).lineage["sources"] == ["m@1"]
    # a --parent that does not hold those weights is kept, and said; weights no version holds are said too
    r = cli("registry", "register", "m", _dpla(tmp_path / "dep3", pulled), "--parent", "2")
    assert r.exit_code == 0 and "--parent m@2 does not hold" in r.output and reg.get("m", 3).parent == 2
    r = cli("registry", "register", "m", _dpla(tmp_path / "dep4", "0" * 64))
    assert r.exit_code == 0 and "no registered version holds" in r.output and reg.get("m", 4).parent is None

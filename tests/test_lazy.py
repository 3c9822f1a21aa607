"""`deltaplane`, `deltaplane.registry`, `.serve`, `.aggregation` (and `.secagg`) and `.deploy` load their public names on
first use (deltaplane.lazy), so importing one waits for no torch (nor the service), and each name, once loaded, is the defining module's own object."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize(
    "package",
    [
        "deltaplane",
        "deltaplane.registry",
        "deltaplane.aggregation",
        "deltaplane.aggregation.secagg.enrollment",  # fleet enroll, keys identity/certify/revoke
        "deltaplane.deploy",
        "deltaplane.deploy.publish",  # keys enrollment checks its folder with it
        "deltaplane.engine.config",  # RunConfig: reading a federation file's settings
        "deltaplane.engine.buildable",  # what checks those settings without building them
        "deltaplane.aggregation.dp_sizes",  # distributed DP's noise and ring range, which the check sizes
        "deltaplane.specs",  # the one spec grammar: reading a codec, defence or attack spec needs no torch
    ],
)
def test_importing_the_package_imports_no_torch(package: str) -> None:
    code = f"import sys, {package}; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "module", ["deltaplane.serve.fleet", "deltaplane.serve.client", "deltaplane.serve.tls"]
)
def test_the_fleet_agents_import_no_service(module: str) -> None:
    """`fleet coordinate` and `fleet device` (deltaplane.serve.fleet) talk to the service over httpx: importing
    them used to start `deltaplane.serve`'s package, which imported the service itself (FastAPI, Starlette,
    uvicorn, the dashboard: ~0.4 s of CPU on each process's start)."""
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'deltaplane.serve.app', 'deltaplane.ui') "
        "if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_service_packages_lazy_names_are_its_modules_objects() -> None:
    import deltaplane.serve
    from deltaplane.serve.app import create_app
    from deltaplane.serve.client import AdminClient

    assert deltaplane.serve.create_app is create_app and deltaplane.serve.AdminClient is AdminClient
    assert set(deltaplane.serve.__all__) <= set(dir(deltaplane.serve))
    with pytest.raises(AttributeError, match="module 'deltaplane.serve' has no attribute 'nope'"):
        deltaplane.serve.nope  # noqa: B018


def test_a_lazy_name_is_its_modules_object_and_loads_once() -> None:
    import deltaplane
    import deltaplane.registry
    from deltaplane.delta import Delta
    from deltaplane.registry.store import Registry

    assert deltaplane.Delta is Delta and vars(deltaplane)["Delta"] is Delta  # stored: no second look-up
    assert deltaplane.registry.Registry is Registry and "Registry" in vars(deltaplane.registry)
    assert {"Delta", "decompress"} <= set(dir(deltaplane))
    assert {"Registry", "promote"} <= set(dir(deltaplane.registry))
    for module, name in ((deltaplane, "deltaplane"), (deltaplane.registry, "deltaplane.registry")):
        with pytest.raises(AttributeError, match=f"module '{name}' has no attribute 'nope'"):
            module.nope  # noqa: B018

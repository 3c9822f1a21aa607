"""One service process per registry (docs/security.md): a second process is refused at its start.

Each open round lives in the serving process's memory, and a service's start marks every SecAgg round open in
the database lost and replays the plain rounds' uploads into an aggregate of its own: a second `deltaplane
serve` over a live registry (two containers on one volume, a restart before the old process exited) broke the
first one's rounds without a word. Before the lock, every start here succeeded.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from deltaplane import cli
from deltaplane.errors import RegistryInUse
from deltaplane.registry import Registry
from deltaplane.serve import ServiceConfig, create_app

ADMIN = "admin-token-0123456789"

HOLDER = textwrap.dedent(
    """
    import sys, time
    from deltaplane.serve import ServiceConfig, create_app
    app = create_app(ServiceConfig(home=sys.argv[1], admin_token="a" * 24, device_secret="s" * 32))
    print("serving", flush=True)
    time.sleep(600)
    """
)


def _config(home: Path) -> ServiceConfig:
    return ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32)


@pytest.fixture
def served(tmp_path: Path):
    """A registry served by another process (which built the service's app over it, as `deltaplane serve`)."""
    home = tmp_path / "home"
    Registry.create(home)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
        yield home, proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_service_process_on_a_registry_is_refused_naming_the_first(served) -> None:
    home, proc = served
    with pytest.raises(RegistryInUse) as refused:
        create_app(_config(home))
    assert f"another process (pid {proc.pid}) already serves the registry at {home}" in str(refused.value)
    assert "Stop that service first, or serve another --home" in str(refused.value)


def test_deltaplane_serve_exits_1_with_the_message(served, monkeypatch) -> None:
    import deltaplane.serve

    def started(*_: object, **__: object) -> None:
        raise AssertionError("a second service started serving the registry")

    monkeypatch.setattr(deltaplane.serve, "serve", started)
    home, proc = served
    r = CliRunner().invoke(cli.app, ["serve", "--home", str(home), "--admin-token", ADMIN, "--port", "9"])
    out = " ".join(r.output.split())
    assert r.exit_code == 1 and f"pid {proc.pid}" in out and "one service process per registry" in out, out


def test_the_lock_dies_with_the_process_however_it_dies(served) -> None:
    home, proc = served
    proc.send_signal(signal.SIGKILL)  # no clean-up ran: the kernel releases the lock
    proc.wait(timeout=30)
    app = create_app(_config(home))
    assert TestClient(app).get("/healthz").status_code == 200


def test_the_dashboard_and_registry_commands_still_work_on_a_served_registry(served) -> None:
    from deltaplane.ui import create_ui_app

    home, _ = served
    ui = create_ui_app(admin_token=ADMIN, runs_dir=None, registry_home=str(home))
    page = TestClient(ui).get("/ui/registry", headers={"Authorization": f"Bearer {ADMIN}"})
    assert page.status_code == 200, page.text
    assert Registry(home).verify().ok


def test_apps_in_one_process_share_the_lock_and_release_it_when_dropped(tmp_path: Path) -> None:
    """A restart simulated in one process (a new app over the same home) is not refused; once every app over
    the registry is gone, another process may serve it."""
    home = tmp_path / "home"
    Registry.create(home)
    first, second = create_app(_config(home)), create_app(_config(home))
    check = [sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), str(home)]
    refused = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "RegistryInUse" in refused.stderr, refused.stderr
    del first
    gc.collect()
    refused = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "RegistryInUse" in refused.stderr  # the second app still holds it
    del second
    gc.collect()
    ok = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == "serving", ok.stderr


def test_an_app_collected_while_the_lock_table_is_busy_neither_deadlocks_nor_drops_the_lock(
    tmp_path: Path,
) -> None:
    """The release runs as a finalizer, so a garbage collection may run it inside hold_service_lock itself
    (this thread holding the guard): it must not wait for the guard (a deadlock), and the release is applied
    at the next call."""
    from tests.test_textfile import _returns

    from deltaplane.serve import registry_lock

    home, other = tmp_path / "home", tmp_path / "other"
    home.mkdir()
    other.mkdir()

    held = [registry_lock.hold_service_lock(home)]
    key = next(k for k in registry_lock._HELD if k[1] == (home / registry_lock.LOCK_NAME).stat().st_ino)

    def collected_inside_the_guard() -> None:
        with registry_lock._GUARD:  # as if a collection ran inside the guarded block
            held.clear()  # the hold's last reference: its finalizer runs here, in this thread
            gc.collect()
            assert key in registry_lock._HELD  # deferred, not applied behind the holder's back

    assert _returns(collected_inside_the_guard) is None  # waiting for the guard would hang here
    registry_lock.hold_service_lock(other)  # the next call applies it (its own hold is dropped at once)
    assert key not in registry_lock._HELD


def test_a_folder_without_a_registry_gets_the_registrys_message_and_no_lock_file(tmp_path: Path) -> None:
    """The lock is taken once the registry is open: a folder that holds none still says how to create one, and
    is left without a service.lock in it."""
    from deltaplane.errors import NotFound

    for home in (tmp_path / "missing", tmp_path / "empty"):
        if home.name == "empty":
            home.mkdir()
        with pytest.raises(NotFound, match="no registry at"):
            create_app(_config(home))
        assert not (home / "service.lock").exists()

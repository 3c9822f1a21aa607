"""`deltaplane run --transport http` on a slow machine: a request to the run's local service that misses its
deadline, and a service that does not listen in time, end in a one-line error that says what timed out.

Before, httpx's ``ReadTimeout`` and the server's bare ``RuntimeError`` escaped the command: exit 1 with no
message in its output (a traceback on a terminal), which is how a run on a loaded 2-core machine once failed
with nothing to go on. Each test makes the service honestly slow (a delay injected where it builds the SecAgg
round, or where uvicorn starts) and shrinks the deadline below the delay, so the deadline is missed every time.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deltaplane import cli
from deltaplane.errors import ServiceUnreachable
from deltaplane.serve import federation
from deltaplane.serve.app import ServiceConfig, create_app
from deltaplane.serve.server import BackgroundServer
from deltaplane.sim import RunConfig

#: the deadline the slow open misses: every request before it (the drift reference, the registry's) must
#: still meet it on a loaded machine (0.5 s once failed there, at the drift reference)
SHORT = 2.0

SECAGG = RunConfig(clients=4, rounds=1, local_epochs=1, secagg=True, clip="2.0", codec="identity")


@pytest.fixture
def slow_secagg_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service takes 4 s to build a SecAgg round (an honest server on a loaded machine)."""
    from deltaplane.aggregation.secagg import SecAggServer

    init = SecAggServer.__init__

    def slow(self: SecAggServer, *args: object, **kwargs: object) -> None:
        time.sleep(4.0)
        init(self, *args, **kwargs)

    monkeypatch.setattr(SecAggServer, "__init__", slow)


def test_a_request_past_its_deadline_names_the_request_and_the_limit(slow_secagg_open) -> None:
    with pytest.raises(ServiceUnreachable) as failed:
        federation.run_http_simulation(SECAGG, request_timeout_s=SHORT)
    message = str(failed.value)
    assert message.startswith("--transport http: POST /admin/models/digits-cnn/secagg got no answer")
    assert f"within {SHORT:g} s (ReadTimeout)" in message


def test_the_same_run_passes_with_a_deadline_it_can_meet(slow_secagg_open) -> None:
    """The failure above is the deadline's, not the run's: a limit above the delay runs it to the end."""
    result = federation.run_http_simulation(SECAGG, request_timeout_s=30)
    assert len(result.rounds) == 1 and result.transport["registry_ok"]


def test_the_command_line_says_what_timed_out(slow_secagg_open, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(federation, "REQUEST_TIMEOUT_S", SHORT)
    config = tmp_path / "run.yaml"
    config.write_text("clients: {count: 4, rounds: 1, local_epochs: 1}\n")
    args = ["run", "-c", str(config), "--secagg", "--clip", "2.0", "--codec", "identity", "--no-baseline"]
    r = CliRunner().invoke(
        cli.app, [*args, "--transport", "http", "--no-followup", "-o", str(tmp_path / "o")]
    )
    output = " ".join(r.output.split())
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exception, output)
    assert "error: --transport http: POST /admin/models/digits-cnn/secagg got no answer" in output
    assert f"within {SHORT:g} s (ReadTimeout)" in output
    assert not (tmp_path / "o").exists()


def test_a_server_not_listening_in_time_is_stopped_and_says_so(tmp_path: Path, monkeypatch) -> None:
    import uvicorn

    from deltaplane.registry import Registry

    Registry.create(tmp_path)
    startup = uvicorn.Server.startup

    async def slow_startup(self: uvicorn.Server, sockets: object = None) -> None:
        time.sleep(1.0)  # blocks the server's loop, as a starved thread would
        await startup(self, sockets)

    monkeypatch.setattr(uvicorn.Server, "startup", slow_startup)
    server = BackgroundServer(create_app(ServiceConfig(home=str(tmp_path), admin_token="a" * 24)))
    with pytest.raises(ServiceUnreachable, match=r"was not listening within 0\.2 s of its start"):
        server.start(timeout=0.2)
    server._thread.join(timeout=10)
    assert not server._thread.is_alive()  # stopped, not left serving behind the error

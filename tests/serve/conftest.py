import pytest
import torch
from fastapi.testclient import TestClient

from deltaplane.registry import Registry
from deltaplane.serve import AdminClient, DeviceClient, ServiceConfig, create_app

ADMIN = "admin-token-0123456789"


def cnn_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": 0.1 * torch.randn(16, 1, 3, 3, generator=g),
        "conv1.bias": torch.zeros(16),
        "conv2.weight": 0.1 * torch.randn(32, 16, 3, 3, generator=g),
        "conv2.bias": torch.zeros(32),
        "fc.weight": 0.1 * torch.randn(10, 128, generator=g),
        "fc.bias": torch.zeros(10),
    }


class Service:
    """A service on a fresh registry whose model "cnn" is ``initial`` (default: :func:`cnn_state`)."""

    def __init__(self, home, initial: dict[str, torch.Tensor] | None = None, **config):
        self.reg = Registry.create(home)
        v1 = self.reg.register_model(
            "cnn", cnn_state(0) if initial is None else initial, lineage={"round": 0}
        )
        self.reg._move_tag("cnn", "production", v1.number, action="promote")
        self.config = ServiceConfig(home=str(home), admin_token=ADMIN, device_secret="s" * 32, **config)
        self.app = create_app(self.config)
        self.http = TestClient(self.app, raise_server_exceptions=True)
        self.admin = AdminClient("http://testserver", ADMIN, client=self.http)
        self.verifier = self.reg.verifier

    def device(self, device_id: str, cohort: str = "default") -> DeviceClient:
        token = self.admin.issue_token(device_id, cohort)
        return DeviceClient("http://testserver", token, verifier=self.verifier, client=self.http)

    @property
    def state(self):
        return self.app.state.deltaplane


@pytest.fixture
def service(tmp_path):
    return Service(tmp_path / "home")


@pytest.fixture
def make_state():
    return cnn_state


@pytest.fixture
def service_factory(tmp_path):
    return lambda **config: Service(tmp_path / "custom", **config)


def record_bodies(app):
    """An ASGI wrapper keeping a copy of every request body the service receives, as (path, body); it carries
    the app's ``state`` (the server reads the service's limits there)."""
    bodies: list[tuple[str, bytes]] = []

    async def recorder(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        chunks: list[bytes] = []

        async def spy():
            msg = await receive()
            if msg["type"] == "http.request":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    bodies.append((scope["path"], b"".join(chunks)))
            return msg

        return await app(scope, spy, send)

    recorder.state = app.state  # type: ignore[attr-defined]
    return recorder, bodies

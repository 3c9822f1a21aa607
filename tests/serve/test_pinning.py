"""A man in the middle between device and service: model swap, downgrade and freeze are all refused.

The MITM is an httpx transport in front of the real app. It holds no signing key, but it can replay anything
the service ever sent (validly signed artifacts of other models, older versions, earlier answers) and rewrite
headers and status codes at will.
"""

from collections.abc import Callable

import httpx
import pytest
import torch

from deltaplane.errors import DecodeError, DowngradeRefused, SignatureError
from deltaplane.serve import DeviceClient


class Mitm(httpx.BaseTransport):
    """Forwards to the service; ``rewrite`` may replace the request or the response."""

    def __init__(self, upstream: httpx.BaseTransport) -> None:
        self.upstream = upstream
        self.rewrite: Callable[[httpx.Request, Callable], httpx.Response] | None = None
        self.recorded: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        forward = self._forward
        if self.rewrite is not None:
            return self.rewrite(request, forward)
        return forward(request)

    def _forward(self, request: httpx.Request) -> httpx.Response:
        resp = self.upstream.handle_request(request)
        resp.read()
        self.recorded.append(resp)
        return httpx.Response(resp.status_code, headers=resp.headers, content=resp.content)


@pytest.fixture
def mitm(service):
    m = Mitm(service.http._transport)
    token = service.admin.issue_token("victim", "eu")
    client = httpx.Client(base_url="http://testserver", transport=m)
    dev = DeviceClient("http://testserver", token, verifier=service.verifier, client=client)
    return m, dev


def bump(service, parent: int, scale: float = 2.0, model: str = "cnn") -> int:
    state = service.reg.load_state(f"{model}@{parent}")
    return service.reg.register_model(
        model, {k: v * scale + 1 for k, v in state.items()}, parent=parent
    ).number


def test_a_validly_signed_artifact_of_another_model_is_refused(service, mitm, make_state):
    m, dev = mitm
    other = service.reg.register_model("other", make_state(7))
    service.reg._move_tag("other", "production", other.number, action="promote")

    def swap_path(req, forward):  # ask upstream for "other", keep or rewrite the announced name
        url = req.url.copy_with(path=req.url.path.replace("/cnn/", "/other/"))
        return forward(httpx.Request(req.method, url, headers=req.headers))

    m.rewrite = swap_path
    with pytest.raises(SignatureError, match="asked for model 'cnn'"):
        dev.fetch("cnn")

    def swap_and_relabel(req, forward):
        resp = swap_path(req, forward)
        headers = dict(resp.headers)
        headers["x-deltaplane-model"] = "cnn"
        return httpx.Response(resp.status_code, headers=headers, content=resp.content)

    m.rewrite = swap_and_relabel
    with pytest.raises(SignatureError):
        dev.fetch("cnn")
    assert dev.state is None  # nothing was applied


def test_replayed_older_answer_is_refused(service, mitm):
    m, dev = mitm
    assert dev.fetch("cnn")[0] == 1
    old_answer = m.recorded[-1]
    v2 = bump(service, 1)
    service.reg._move_tag("cnn", "production", v2, action="promote")
    assert dev.fetch("cnn")[0] == v2
    held = dict(dev.state)
    m.rewrite = lambda req, forward: httpx.Response(
        200, headers=old_answer.headers, content=old_answer.content
    )
    with pytest.raises(SignatureError):
        dev.fetch("cnn")  # the replayed v1 answer is signed for another nonce
    assert dev.version == v2 and all(torch.equal(held[k], dev.state[k]) for k in held)


def test_faked_204_cannot_freeze_the_device(service, mitm):
    m, dev = mitm
    dev.fetch("cnn")
    v2 = bump(service, 1)
    service.reg._move_tag("cnn", "production", v2, action="promote")

    def freeze(req, forward):
        resp = forward(req)
        headers = {k: v for k, v in resp.headers.items() if k.startswith("x-deltaplane")}
        headers.update({"x-deltaplane-kind": "none", "x-deltaplane-version": "1"})
        return httpx.Response(204, headers=headers)

    m.rewrite = freeze
    with pytest.raises(SignatureError):
        dev.fetch("cnn")
    m.rewrite = None
    assert dev.fetch("cnn")[0] == v2


def test_a_genuine_204_is_accepted(service, mitm):
    _, dev = mitm
    dev.fetch("cnn")
    assert dev.fetch("cnn")[0] == 1


def test_downgrade_needs_a_signed_rollback_record(service, mitm):
    m, dev = mitm
    v2 = bump(service, 1)
    service.reg._move_tag("cnn", "production", v2, action="promote")
    assert dev.fetch("cnn")[0] == v2
    # the tag moved back without a rollback record (or a MITM drops the record): the device refuses
    service.reg._move_tag("cnn", "production", 1, action="promote")
    with pytest.raises(DowngradeRefused):
        dev.fetch("cnn")
    # an explicit rollback signs a record covering v2: the device follows it
    from deltaplane.registry import rollback

    service.reg._move_tag("cnn", "production", v2, action="promote")
    assert rollback(service.reg, "cnn").number == 1
    dl_headers: list[httpx.Headers] = []

    def strip_record(req, forward):
        resp = forward(req)
        dl_headers.append(resp.headers)
        headers = {k: v for k, v in resp.headers.items() if k != "x-deltaplane-rollback"}
        return httpx.Response(resp.status_code, headers=headers, content=resp.content)

    m.rewrite = strip_record
    with pytest.raises(DowngradeRefused):
        dev.fetch("cnn")
    assert "x-deltaplane-rollback" in dl_headers[-1]

    def forge_record(req, forward):  # claim the record covers more than it does: the signature breaks
        resp = forward(req)
        tag, sup, sig = resp.headers["x-deltaplane-rollback"].split(":", 2)
        headers = {**dict(resp.headers), "x-deltaplane-rollback": f"{tag}:{int(sup) + 5}:{sig}"}
        return httpx.Response(resp.status_code, headers=headers, content=resp.content)

    m.rewrite = forge_record
    with pytest.raises(SignatureError):
        dev.fetch("cnn")
    m.rewrite = None
    assert dev.fetch("cnn")[0] == 1


def test_a_stale_rollback_record_is_not_offered_and_a_replayed_one_is_refused(service, mitm):
    # a rollback record had no expiry: production rolled back v2 -> v1 (record: v1, superseding v2), went to v2
    # again and later was moved back to v1 by hand; the service offered the old record and a device on v2
    # followed, as it would a man in the middle replaying that record. A record is current only while its tag's
    # newest move is the rollback that signed it, and the device needs the service's word on its own nonce.
    from deltaplane.registry import rollback

    m, dev = mitm
    v2 = bump(service, 1)
    service.reg._move_tag("cnn", "production", v2, action="promote")
    assert dev.fetch("cnn")[0] == v2
    assert rollback(service.reg, "cnn").number == 1
    stale = service.reg.rollback_record("cnn", 1, v2, tag="production")
    assert stale is not None and stale["supersedes"] == v2
    offered = service.device("d2")._download("cnn", have=v2, channel="production", nonce="n" * 16)[1]
    assert offered["x-deltaplane-rollback"] == f"production:{v2}:{stale['signature']}"
    service.reg._move_tag("cnn", "production", v2, action="promote")
    service.reg._move_tag("cnn", "production", 1, action="promote")  # back by hand: no rollback record
    with pytest.raises(DowngradeRefused, match="without a signed rollback record"):
        dev.fetch("cnn")  # the service no longer offers the stale record (it did, and the device followed)
    assert service.reg.rollback_record("cnn", 1, v2, tag="production") is None

    def replay_stale(req, forward):  # the genuine record, and the offer signed for another request
        resp = forward(req)
        headers = {
            **dict(resp.headers),
            "x-deltaplane-rollback": offered["x-deltaplane-rollback"],
            "x-deltaplane-rollback-offer": offered["x-deltaplane-rollback-offer"],
        }
        return httpx.Response(resp.status_code, headers=headers, content=resp.content)

    m.rewrite = replay_stale
    with pytest.raises(SignatureError):
        dev.fetch("cnn")

    def replay_record_only(req, forward):
        resp = forward(req)
        headers = {**dict(resp.headers), "x-deltaplane-rollback": offered["x-deltaplane-rollback"]}
        return httpx.Response(resp.status_code, headers=headers, content=resp.content)

    m.rewrite = replay_record_only
    with pytest.raises(DowngradeRefused, match="did not vouch for on this request"):
        dev.fetch("cnn")
    assert dev.version == v2
    # checked with the cryptography package directly: the record itself is still a valid Ed25519 signature
    # over its statement, so only its staleness refuses it
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from deltaplane.registry.signing import statement
    from deltaplane.registry.store import rollback_statement

    kid, _, sig = stale["signature"].partition(":")
    raw = base64.b64decode(sig)
    pub = service.verifier._keys[kid].public_bytes_raw()
    Ed25519PublicKey.from_public_bytes(pub).verify(
        raw, statement(rollback_statement("cnn", "production", 1, v2, service.reg.get("cnn", 1).sha256))
    )
    m.rewrite = None
    assert rollback(service.reg, "cnn").number == v2  # pops the manual move
    service.reg._move_tag("cnn", "production", 1, action="promote")
    assert rollback(service.reg, "cnn").number == v2
    assert rollback(service.reg, "cnn").number == 1  # a fresh rollback: the device follows it
    assert dev.fetch("cnn")[0] == 1


class _Endless(httpx.SyncByteStream):
    """A body that never ends; ``pulled[0]`` counts the bytes the device read from it."""

    def __init__(self, pulled: list[int]) -> None:
        self.pulled = pulled

    def __iter__(self):
        while True:
            self.pulled[0] += 64 << 10
            yield b"\0" * (64 << 10)


@pytest.mark.parametrize("path", ["download", "round"])
def test_an_endless_answer_is_refused_at_the_device_cap(service, path):
    """A man in the middle (or a broken server) streaming an endless body: the device read it all into memory
    (httpx's resp.content) whatever its size; it now stops at max_response_bytes with a DecodeError."""
    pulled = [0]

    def endless(request: httpx.Request) -> httpx.Response:
        headers = {"x-deltaplane-model": "cnn", "content-type": "application/json"}
        return httpx.Response(200, headers=headers, stream=_Endless(pulled))

    client = httpx.Client(base_url="http://testserver", transport=httpx.MockTransport(endless))
    dev = DeviceClient(
        "http://testserver", "t", verifier=service.verifier, client=client, max_response_bytes=1 << 20
    )
    with pytest.raises(DecodeError, match="max_response_bytes"):
        dev.fetch("cnn") if path == "download" else dev.round("cnn")
    assert pulled[0] <= (1 << 20) + (64 << 10)


def test_a_gzip_bomb_is_counted_by_what_it_inflates_to(service):
    import gzip

    bomb = gzip.compress(b"\0" * (8 << 20))  # ~8 kB on the wire, 8 MiB inflated

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-encoding": "gzip"}, content=bomb)

    client = httpx.Client(base_url="http://testserver", transport=httpx.MockTransport(handler))
    dev = DeviceClient(
        "http://testserver", "t", verifier=service.verifier, client=client, max_response_bytes=1 << 20
    )
    with pytest.raises(DecodeError, match="max_response_bytes"):
        dev.round("cnn")


def test_a_tls_context_with_a_plain_http_url_is_refused(tmp_path, service):
    """DeviceClient(http://..., tls=ctx) used to speak plain HTTP and send the token in clear, ignoring the
    context; a TLS context with a non-https URL is a configuration error now."""
    from deltaplane.errors import ConfigError
    from deltaplane.serve import AdminClient
    from deltaplane.serve.tls import client_context, make_tls_bundle

    ctx = client_context(make_tls_bundle(tmp_path / "tls").ca_cert)
    with pytest.raises(ConfigError, match="https://"):
        DeviceClient("http://127.0.0.1:8000", "t", verifier=service.verifier, tls=ctx)
    with pytest.raises(ConfigError, match="https://"):
        AdminClient("http://127.0.0.1:8000", "t" * 16, tls=ctx)
    DeviceClient("https://127.0.0.1:8000", "t", verifier=service.verifier, tls=ctx).close()


def test_a_rollback_of_another_tag_does_not_move_a_production_device_back(service, mitm):
    # staging's rollback record (signed, covering v2) was served to production devices as permission to go back
    # to v1 when production moved there without a rollback; a MITM could replay it too
    from deltaplane.registry import rollback

    m, dev = mitm
    v2 = bump(service, 1)
    service.reg._move_tag("cnn", "production", v2, action="promote")
    assert dev.fetch("cnn")[0] == v2
    service.reg.set_tag("cnn", "staging", 1)
    service.reg.set_tag("cnn", "staging", v2)
    assert rollback(service.reg, "cnn", tag="staging").number == 1
    record = service.reg.rollback_record("cnn", 1, v2)
    assert record is not None and record["tag"] == "staging"
    service.reg._move_tag("cnn", "production", 1, action="promote")  # production moved back, not rolled back
    with pytest.raises(DowngradeRefused, match="rollback"):
        dev.fetch("cnn")  # the service no longer offers staging's record
    assert service.reg.rollback_record("cnn", 1, v2, tag="production") is None

    def replay_staging_record(req, forward):  # the genuinely signed record, added by a man in the middle
        resp = forward(req)
        headers = dict(resp.headers)
        headers["x-deltaplane-rollback"] = f"staging:{record['supersedes']}:{record['signature']}"
        return httpx.Response(resp.status_code, headers=headers, content=resp.content)

    m.rewrite = replay_staging_record
    with pytest.raises(DowngradeRefused, match="'staging', which does not serve the 'production' channel"):
        dev.fetch("cnn")
    assert dev.version == v2


@pytest.mark.parametrize(
    ("tag", "channel", "serves"),
    [
        ("production", "production", True),
        ("production.eu", "production", True),
        ("production", "training", True),  # training falls back to production
        ("training.eu", "training", True),
        ("staging", "production", False),
        ("production_eu", "production", False),
        ("productionx", "production", False),
        ("training", "production", False),
    ],
)
def test_which_rollback_records_a_device_follows(tag, channel, serves):
    from deltaplane.serve.client import _serves_channel

    assert _serves_channel(tag, channel) is serves

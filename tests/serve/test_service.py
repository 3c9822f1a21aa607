import hashlib
import struct

import pytest
import torch

from deltaplane.codecs import Compressor, Identity, WireHeader, encode_delta, pack
from deltaplane.delta import Delta
from deltaplane.errors import SignatureError
from deltaplane.registry import apply_downlink
from deltaplane.serve import ServiceError


def local_update(state, seed):
    g = torch.Generator().manual_seed(seed)
    return Delta({k: 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()})


def test_round_trip_full_then_delta_downlink_is_byte_identical(service):
    dev = service.device("d1", "eu")
    v, state = dev.fetch("cnn")
    assert v == 1 and torch.equal(state["fc.weight"], service.reg.load_state("cnn@1")["fc.weight"])
    rnd = service.admin.open_round("cnn")
    assert rnd.pop("nonce") and rnd == {
        "model": "cnn",
        "round": 1,
        "base_version": 1,
        "uploads": 0,
        "open": True,
    }
    for i in range(3):
        d = service.device(f"u{i}")
        payload = Compressor("topk(0.1) | quant(bits=8)", seed=i).compress(
            local_update(state, i), base_id="cnn", base_version=1
        )
        assert d.upload("cnn", 1, payload, num_examples=10 + i) == {
            "accepted": True,
            "round": 1,
            "uploads": i + 1,
        }
    closed = service.admin.close_round("cnn", 1)
    assert closed["version"] == 2 and closed["uploads"] == 3
    assert closed["full_bytes"] / closed["delta_bytes"] >= 10
    assert service.reg.get("cnn", 2).lineage["round"] == 1 and service.reg.get("cnn", 2).parent == 1
    # training channel follows rounds; production stays until promoted
    v, new = dev.fetch("cnn", channel="training")
    assert v == 2 and dev.bytes_received < service.reg.get("cnn", 1).size + closed["delta_bytes"] + 200
    expected = service.reg.read(service.reg.get("cnn", 2))
    from deltaplane.registry import state_to_bytes

    assert state_to_bytes(new) == expected  # the delta reproduced version 2 exactly
    again = dev.download("cnn", have=2, channel="training")
    assert again.kind == "none"


def test_tampered_downlink_is_refused_by_the_device(service):
    service.reg.register_model(
        "cnn", {k: v + 1 for k, v in service.reg.load_state("cnn@1").items()}, parent=1
    )
    service.reg._move_tag("cnn", "production", 2, action="promote")
    dev = service.device("d1")
    dl = dev.download("cnn")
    body = bytearray(dl.body)
    body[100] ^= 0xFF
    from dataclasses import replace

    with pytest.raises(SignatureError, match="tampered"):
        apply_downlink(replace(dl, body=bytes(body)), service.verifier)
    with pytest.raises(SignatureError):
        apply_downlink(replace(dl, version=1), service.verifier)  # a signed v2 cannot pose as v1


def test_cohort_tag_is_served_to_that_cohort(service):
    v2 = service.reg.register_model(
        "cnn", {k: v * 2 for k, v in service.reg.load_state("cnn@1").items()}, parent=1
    )
    service.reg._move_tag("cnn", "production.eu", v2.number, action="promote")
    assert service.device("a", "eu").fetch("cnn")[0] == 2
    assert service.device("b", "us").fetch("cnn")[0] == 1


def test_training_devices_fall_back_to_their_cohorts_production(service):
    # a training device of cohort eu used to fall back to production (v1), not production.eu (v2): it trained
    # from a version its cohort is not served; the order is training.eu, training, production.eu, production
    v2 = service.reg.register_model(
        "cnn", {k: v * 2 for k, v in service.reg.load_state("cnn@1").items()}, parent=1
    )
    service.reg._move_tag("cnn", "production.eu", v2.number, action="promote")
    assert "training" not in service.reg.tags("cnn")
    eu, us = service.device("a", "eu"), service.device("b", "us")
    assert eu.fetch("cnn", channel="training")[0] == 2
    assert us.fetch("cnn", channel="training")[0] == 1
    v3 = service.reg.register_model(
        "cnn", {k: v * 3 for k, v in service.reg.load_state("cnn@1").items()}, parent=1
    )
    service.reg.set_tag("cnn", "training", v3.number)
    assert eu.download("cnn", channel="training").version == 3  # the channel's own tag before production's
    service.reg.set_tag("cnn", "training.eu", 1)
    assert eu.download("cnn", channel="training").version == 1
    assert us.download("cnn", channel="training").version == 3


def raw(service, method, path, token=None, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return service.http.request(method, path, headers=headers, **kw)


def test_bad_uploads_get_the_right_4xx(service, make_state):
    token = service.admin.issue_token("dev")
    h = {"X-Deltaplane-Round-Nonce": service.admin.open_round("cnn")["nonce"]}
    url = "/v1/models/cnn/rounds/1/update"
    good = Compressor("topk(0.1) | quant(bits=8)").compress(
        local_update(make_state(), 0), base_id="cnn", base_version=1
    )
    # unauthenticated / forged token
    assert raw(service, "POST", url, content=good).status_code == 401
    assert raw(service, "POST", url, token=token[:-2] + "xx", content=good).status_code == 401
    # a valid MAC moved onto another identity (device "dev" claiming to be "root" in cohort "eu")
    import base64

    forged = (
        base64.urlsafe_b64encode(b'{"d":"root","c":"eu"}').rstrip(b"=").decode() + "." + token.split(".")[1]
    )
    assert raw(service, "POST", url, token=forged, content=good).status_code == 401
    # oversized (declared and streamed)
    big = raw(
        service,
        "POST",
        url,
        token=token,
        headers=dict(h),
        content=b"\0" * (service.config.max_upload_bytes + 1),
    )
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    # malformed
    r = raw(service, "POST", url, token=token, headers=dict(h), content=b"not a payload at all")
    assert r.status_code == 400 and "bad magic" in r.json()["detail"]
    r = raw(service, "POST", url, token=token, headers=dict(h), content=good[:-1] + bytes([good[-1] ^ 1]))
    assert r.status_code == 400 and "checksum" in r.json()["detail"]
    assert raw(service, "POST", url, token=token, headers=dict(h), content=b"").status_code == 400
    # stale base version
    stale = Compressor("fp16").compress(local_update(make_state(), 0), base_id="cnn", base_version=7)
    r = raw(service, "POST", url, token=token, headers=dict(h), content=stale)
    assert r.status_code == 409 and "v7" in r.json()["detail"]
    # wrong shape
    bad_shape = Compressor("fp16").compress(
        Delta({"fc.weight": torch.zeros(3, 3)}), base_id="cnn", base_version=1
    )
    r = raw(service, "POST", url, token=token, headers=dict(h), content=bad_shape)
    assert r.status_code == 422 and "fc" in r.json()["detail"]
    # NaN smuggled past the client (hand-built payload)
    poisoned = {**local_update(make_state(), 1), "fc.bias": torch.full((10,), float("nan"))}
    trees = encode_delta(Delta(poisoned), Identity(), torch.Generator())
    r = raw(
        service,
        "POST",
        url,
        token=token,
        headers=dict(h),
        content=pack(trees, WireHeader("cnn", 1, "identity")),
    )
    assert r.status_code == 400 and "NaN" in r.json()["detail"]
    # not bound to the round (no or a wrong nonce)
    r = raw(service, "POST", url, token=token, content=good)
    assert r.status_code == 409 and "X-Deltaplane-Round-Nonce" in r.json()["detail"]
    r = raw(service, "POST", url, token=token, headers={"X-Deltaplane-Round-Nonce": "0" * 32}, content=good)
    assert r.status_code == 409
    # wrong round, then duplicate
    assert (
        raw(
            service, "POST", "/v1/models/cnn/rounds/2/update", token=token, headers=dict(h), content=good
        ).status_code
        == 409
    )
    assert raw(service, "POST", url, token=token, headers=dict(h), content=good).status_code == 202
    r = raw(service, "POST", url, token=token, headers=dict(h), content=good)
    assert r.status_code == 409 and "already uploaded" in r.json()["detail"]
    # admin endpoints refuse device tokens
    assert raw(service, "POST", "/admin/models/cnn/rounds/1/close", token=token).status_code == 401
    assert service.state.counters["uploads.accepted"] == 1
    assert struct.unpack("<4s", good[:4])[0] == b"DPLN"


def test_rate_limit_per_device(service_factory):
    svc = service_factory(rate=1.0, burst=3)
    a, b = svc.admin.issue_token("a"), svc.admin.issue_token("b")
    codes = [raw(svc, "GET", "/v1/models/cnn/download", token=a).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    r = raw(svc, "GET", "/v1/models/cnn/download", token=a)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["detail"]
    assert raw(svc, "GET", "/v1/models/cnn/download", token=b).status_code == 200  # per device, not global


def test_unknown_model_and_version_are_404(service):
    dev = service.device("d")
    with pytest.raises(ServiceError) as e:
        dev.fetch("nope")
    assert e.value.status == 404
    r = raw(
        service, "POST", "/v1/models/cnn/report", token=service.admin.issue_token("d"), json={"version": 99}
    )
    assert r.status_code == 404
    assert (
        raw(service, "GET", "/v1/models/cnn/round", token=service.admin.issue_token("d")).status_code == 404
    )


def test_openapi_is_served(service):
    spec = service.http.get("/openapi.json").json()
    assert "/v1/models/{model}/rounds/{round_id}/update" in spec["paths"]
    assert service.http.get("/docs").status_code == 200
    assert hashlib.sha256(service.http.get("/openapi.json").content).hexdigest()


def test_drift_alerts_from_device_summaries(service):
    import numpy as np

    from deltaplane.monitor import DriftSpec, summarize

    rng = np.random.default_rng(0)
    ref_x = rng.normal(size=(2000, 3))
    spec = DriftSpec.fit(ref_x, n_classes=10)
    service.admin.set_drift_reference(
        "cnn", spec.to_dict(), summarize(spec, ref_x, rng.integers(0, 10, 2000)).to_dict(), window=5
    )
    devs = [service.device(f"d{i}") for i in range(5)]
    for d in devs:
        x = rng.normal(size=(200, 3))
        x[:, 2] += 1.5
        out = d.report(
            "cnn",
            version=1,
            metrics={"accuracy": 0.9},
            summary=summarize(spec, x, rng.integers(0, 10, 200)).to_dict(),
        )
    assert out["drift_evaluated"] and any("f2" in a for a in out["alerts"])
    alerts = service.admin.alerts("cnn")
    assert len(alerts) == 1 and "feature drift on f2" in alerts[0]["alert"]
    # a malformed summary is a 422, not a crash
    with pytest.raises(ServiceError) as e:
        devs[0].report("cnn", version=1, summary={"n": 5, "feature_counts": [[1, 2]]})
    assert e.value.status == 422


def test_device_falls_back_to_full_model_when_its_base_differs(service, make_state):
    dev = service.device("d")
    dev.fetch("cnn")
    service.admin.open_round("cnn")
    payload = Compressor("topk(0.1) | quant(bits=8)").compress(
        local_update(make_state(), 0), base_id="cnn", base_version=1
    )
    service.device("u").upload("cnn", 1, payload)
    service.admin.close_round("cnn", 1)
    dev.state = {k: v + 0.5 for k, v in dev.state.items()}  # local weights corrupted / personalised in place
    before = dev.bytes_received
    v, state = dev.fetch("cnn", channel="training")
    from deltaplane.registry import state_to_bytes

    assert v == 2 and state_to_bytes(state) == service.reg.read(service.reg.get("cnn", 2))
    assert dev.bytes_received - before > service.reg.get("cnn", 2).size  # delta tried, then the full model


def test_promotion_and_rollback_over_http(service_factory, make_state):
    def evaluator(state):
        acc = 0.9 if float(state["fc.bias"].sum()) >= 0 else 0.5
        return {"accuracy": acc, "ood_accuracy": acc}

    svc = service_factory()
    svc.state.evaluator = evaluator
    good = svc.reg.register_model("cnn", {**make_state(1), "fc.bias": torch.ones(10)}, parent=1)
    bad = svc.reg.register_model("cnn", {**make_state(2), "fc.bias": -torch.ones(10)}, parent=good.number)
    assert svc.admin.promote("cnn", good.number)["promoted"]
    refused = svc.admin.promote("cnn", bad.number)
    assert not refused["promoted"] and "accuracy drops by 0.4000" in refused["regressions"][0]
    back = svc.admin.rollback("cnn")
    assert back["version"] == 1 and back["sha256"] == svc.reg.get("cnn", 1).sha256
    assert svc.device("x").fetch("cnn")[0] == 1


def test_small_payload_claiming_a_huge_tensor_is_refused_before_decoding(service, make_state):
    import time
    from dataclasses import replace

    from deltaplane.codecs import get_codec
    from deltaplane.codecs.wire import finalize

    token = service.admin.issue_token("dev")
    service.admin.open_round("cnn")
    gen = torch.Generator()
    codec = get_codec("topk(0.0001)")
    trees = {k: (v.dtype, finalize(codec.encode(v, gen))) for k, v in local_update(make_state(), 0).items()}
    dtype, tree = trees["fc.weight"]
    trees["fc.weight"] = (dtype, replace(tree, shape=(1 << 33,)))  # 32 GiB of float32 if it were decoded
    payload = pack(trees, WireHeader("cnn", 1, codec.spec))
    assert len(payload) < 10_000
    t = time.perf_counter()
    r = raw(
        service,
        "POST",
        "/v1/models/cnn/rounds/1/update",
        token=token,
        headers={"X-Deltaplane-Round-Nonce": service.state.rounds["cnn"].record.nonce},
        content=payload,
    )
    assert r.status_code in (400, 422) and time.perf_counter() - t < 5
    assert "fc.weight" in r.json()["detail"] or "topk" in r.json()["detail"]


def test_nan_metric_blocks_promotion_over_http(service_factory, make_state):
    svc = service_factory()
    svc.state.evaluator = lambda state: {"accuracy": float("nan"), "ood_accuracy": 0.9}
    cand = svc.reg.register_model("cnn", make_state(1), parent=1)
    refused = svc.admin.promote("cnn", cand.number)
    assert not refused["promoted"] and refused["candidate_metrics"]["accuracy"] is None
    assert "not a finite number" in refused["regressions"][0]
    assert svc.reg.tag("cnn", "production") == 1


def test_docs_page_needs_no_internet(service, monkeypatch):
    import re

    page = service.http.get("/docs").text
    assert "cdn" not in page.lower() and "https://" not in page  # no asset from another host
    for asset in re.findall(r"""['"](/docs/assets/[^'"]+)['"]""", page):
        r = service.http.get(asset)
        assert r.status_code == 200 and len(r.content) > 500, asset
    assert "swagger-ui-bundle.js" in page
    # without the asset package the page is a plain, self-contained operation list
    import builtins

    real_import = builtins.__import__

    def no_bundle(name, *a, **k):
        if name == "swagger_ui_bundle":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bundle)
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from deltaplane.serve.docs import mount_offline_docs

    app = FastAPI(docs_url=None, redoc_url=None)
    assert mount_offline_docs(app) == "plain"
    assert "/openapi.json" in TestClient(app).get("/docs").text

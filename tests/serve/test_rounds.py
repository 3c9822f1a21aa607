"""Durable rounds: restart keeps open rounds, replays are refused, closing is all-or-nothing, cohorts recorded."""

import pytest
import torch
from fastapi.testclient import TestClient

from deltaplane.codecs import Compressor
from deltaplane.delta import Delta
from deltaplane.engine import RunConfig
from deltaplane.errors import ConfigError
from deltaplane.serve import AdminClient, ServiceConfig, ServiceError, create_app
from deltaplane.serve import rounds as rounds_module

from .conftest import ADMIN, Service


def update(state, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return Delta({k: scale * torch.randn(v.shape, generator=g) for k, v in state.items()})


def payload(svc, seed, base=1, scale=0.01):
    return Compressor("topk(0.2) | quant(bits=8)", seed=seed).compress(
        update(svc.reg.load_state(f"cnn@{base}"), seed, scale), base_id="cnn", base_version=base
    )


def restart(svc):
    """A new process over the same home: a fresh app, nothing shared in memory."""
    svc.reg.close()
    svc.app = create_app(svc.config)
    svc.http = TestClient(svc.app)
    svc.admin = AdminClient("http://testserver", ADMIN, client=svc.http)
    return svc


def test_restart_keeps_the_open_round_and_its_uploads(tmp_path):
    svc, control = Service(tmp_path / "a"), Service(tmp_path / "b")
    for s in (svc, control):
        s.admin.open_round("cnn")
        for i in range(3):
            s.device(f"d{i}", "eu").upload("cnn", 1, payload(s, i), num_examples=1 + i)
    restart(svc)
    info = svc.device("x").round("cnn")
    assert info["round"] == 1 and info["uploads"] == 3 and info["base_version"] == 1
    with pytest.raises(ServiceError, match="already uploaded"):
        svc.device("d1", "eu").upload("cnn", 1, payload(svc, 11))
    a, b = svc.admin.close_round("cnn", 1), control.admin.close_round("cnn", 1)
    assert a["uploads"] == b["uploads"] == 3
    # the restored aggregate is the one the uninterrupted service computed: identical published weights
    assert svc.reg.get("cnn", a["version"]).sha256 == control.reg.get("cnn", b["version"]).sha256
    restart(svc)
    assert svc.admin.open_round("cnn")["round"] == 2  # numbers continue after a restart


def test_replay_into_a_later_round_is_refused(service):
    dev = service.device("d1")
    r1 = service.admin.open_round("cnn")
    captured = payload(service, 0)
    dev.upload("cnn", 1, captured, nonce=r1["nonce"])
    service.admin.close_round("cnn", 1)
    r2 = service.admin.open_round("cnn", base_version=1)  # a later round on the same base
    with pytest.raises(ServiceError) as e:  # the captured request, path rewritten to the new round
        dev.upload("cnn", r2["round"], captured, nonce=r1["nonce"])
    assert e.value.status == 409 and "nonce" in e.value.detail.lower()
    with pytest.raises(ServiceError, match="already had this exact update accepted in round 1"):
        dev.upload("cnn", r2["round"], captured, nonce=r2["nonce"])  # even with the fresh nonce
    assert service.device("d2").upload("cnn", r2["round"], payload(service, 5))["accepted"]


def _zero_payload(svc, base=1):
    state = svc.reg.load_state(f"cnn@{base}")
    zero = Delta({k: torch.zeros_like(v) for k, v in state.items()})
    return Compressor("identity").compress(zero, base_id="cnn", base_version=base)


def test_two_devices_may_upload_identical_bytes_but_a_device_may_not_replay_its_own(service):
    """Uploads were unique per model by payload hash across devices, so the second of two honest devices
    whose updates compress to the same bytes (both zero) got 409 "replays are refused". The check is per
    device now; the device re-sending its own bytes into a later round is still refused, and both uploads
    survive a restart."""
    service.admin.open_round("cnn")
    zero = _zero_payload(service)
    for name in ("d1", "d2"):
        assert service.device(name).upload("cnn", 1, zero)["accepted"]
    restart(service)
    assert service.device("x").round("cnn")["uploads"] == 2
    assert service.admin.close_round("cnn", 1)["uploads"] == 2
    r2 = service.admin.open_round("cnn", base_version=1)
    with pytest.raises(ServiceError) as e:
        service.device("d1").upload("cnn", r2["round"], zero, nonce=r2["nonce"])
    assert e.value.status == 409 and "replays are refused" in e.value.detail
    assert service.device("d3").upload("cnn", r2["round"], zero, nonce=r2["nonce"])["accepted"]


def test_an_accepted_upload_keeps_its_blob_when_a_refused_upload_of_the_same_bytes_discards_it(
    service, monkeypatch
):
    """A refused upload removes the blob it stored (unless a row names it), outside any lock; with identical
    bytes now normal (two devices, or two models), another upload that had stored the same bytes but not yet
    written its row recorded a blob that was gone: the round's restore then lost it. The discard and a check
    of the blob now happen under the service's lock, and an upload whose blob vanished writes it again."""
    from deltaplane.serve.rounds_store import RoundStore

    service.admin.open_round("cnn")
    zero = _zero_payload(service)
    real = RoundStore.store_payload

    calls = []

    def stored_then_discarded_by_another(self, data: bytes) -> str:
        digest = real(self, data)
        if not calls:  # once: as a refused upload of the same bytes does, before this one's row
            self.discard_payload(digest)
        calls.append(digest)
        return digest

    monkeypatch.setattr(RoundStore, "store_payload", stored_then_discarded_by_another)
    assert service.device("d1").upload("cnn", 1, zero)["accepted"]
    monkeypatch.setattr(RoundStore, "store_payload", real)
    assert len(calls) == 2  # the upload found its blob gone and wrote it again
    restart(service)  # the open round is rebuilt from its rows and their blobs
    assert service.device("x").round("cnn")["uploads"] == 1
    assert service.admin.close_round("cnn", 1)["uploads"] == 1


def test_a_store_made_with_per_model_replay_keys_is_migrated_in_place(tmp_path):
    """A store from before (round_uploads UNIQUE (model, sha256)) is rebuilt on start with the per-device key:
    the open round keeps its uploads, in order, and closed rounds' replay records stay."""
    import sqlite3

    svc = Service(tmp_path / "h")
    svc.admin.open_round("cnn")
    svc.device("d0").upload("cnn", 1, payload(svc, 0))
    svc.admin.close_round("cnn", 1)
    svc.admin.open_round("cnn", base_version=1)
    for i in (1, 2):
        svc.device(f"d{i}").upload("cnn", 2, payload(svc, i))
    svc.reg.close()
    con = sqlite3.connect(tmp_path / "h" / "registry.db")
    with con:  # the table as older versions created it
        before = con.execute("SELECT * FROM round_uploads ORDER BY id").fetchall()
        con.execute("ALTER TABLE round_uploads RENAME TO kept")
        con.execute(
            """CREATE TABLE round_uploads (
            id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, round INTEGER NOT NULL,
            device_id TEXT NOT NULL, cohort TEXT NOT NULL, weight REAL NOT NULL, sha256 TEXT NOT NULL,
            size INTEGER NOT NULL, at REAL NOT NULL,
            UNIQUE (model, round, device_id), UNIQUE (model, sha256))"""
        )
        con.execute("INSERT INTO round_uploads SELECT * FROM kept")
        con.execute("DROP TABLE kept")
    con.close()
    restart(svc)
    con = sqlite3.connect(tmp_path / "h" / "registry.db")
    assert con.execute("SELECT * FROM round_uploads ORDER BY id").fetchall() == before
    con.close()
    assert svc.device("x").round("cnn")["uploads"] == 2
    zero = _zero_payload(svc)
    for name in ("d3", "d4"):
        assert svc.device(name).upload("cnn", 2, zero)["accepted"]
    with pytest.raises(ServiceError, match="replays are refused"):
        svc.device("d0").upload("cnn", 2, payload(svc, 0))  # d0's round-1 bytes, still refused
    assert svc.admin.close_round("cnn", 2)["uploads"] == 4


def test_a_failed_close_keeps_the_round_and_publishes_nothing(service, monkeypatch):
    service.admin.open_round("cnn")
    for i in range(2):
        service.device(f"d{i}").upload("cnn", 1, payload(service, i))
    real = rounds_module.publish_update

    def disk_full(*args, **kwargs):
        real(*args, **kwargs)  # the version and its delta are written ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(rounds_module, "publish_update", disk_full)
    with pytest.raises(OSError):
        service.admin.close_round("cnn", 1)
    assert [a.number for a in service.reg.versions("cnn")] == [1]  # rolled back: no half-published version
    assert "training" not in service.reg.tags("cnn")
    assert service.device("x").round("cnn")["uploads"] == 2  # round and uploads kept
    monkeypatch.setattr(rounds_module, "publish_update", real)
    closed = service.admin.close_round("cnn", 1)
    assert closed["version"] == 2 and closed["uploads"] == 2


def test_versions_record_contributing_cohorts(service):
    service.admin.open_round("cnn")
    service.device("a", "eu").upload("cnn", 1, payload(service, 0))
    service.device("b", "us").upload("cnn", 1, payload(service, 1))
    v = service.admin.close_round("cnn", 1)["version"]
    assert service.reg.get("cnn", v).governance.cohorts == ("eu", "us")
    service.admin.open_round("cnn")
    service.device("c", "apac").upload("cnn", 2, payload(service, 2, base=v))
    v3 = service.admin.close_round("cnn", 2)["version"]
    assert service.reg.get("cnn", v3).governance.cohorts == ("apac", "eu", "us")  # inherited through lineage
    assert {a.number for a in service.reg.withdraw_cohort("eu") if a.kind == "model"} == {v, v3}


def test_absurd_norm_updates_are_refused(service):
    service.admin.open_round("cnn")
    dev = service.device("d1")
    huge = Compressor("identity").compress(
        update(service.reg.load_state("cnn@1"), 0, scale=1e30), base_id="cnn", base_version=1
    )
    with pytest.raises(ServiceError) as e:
        dev.upload("cnn", 1, huge)
    assert e.value.status == 422 and "norm" in e.value.detail
    assert dev.upload("cnn", 1, payload(service, 0))["accepted"]


def test_empty_rounds_can_be_closed_or_aborted(service):
    service.admin.open_round("cnn")
    assert service.admin.close_round("cnn", 1)["version"] is None
    r = service.admin.open_round("cnn")
    service.device("d").upload("cnn", r["round"], payload(service, 0))
    assert service.admin.abort_round("cnn", r["round"])["aborted"]
    assert [a.number for a in service.reg.versions("cnn")] == [1]
    with pytest.raises(ServiceError) as e:
        service.device("x").round("cnn")
    assert e.value.status == 404


def test_nan_metrics_are_refused(service):
    token = service.admin.issue_token("d1")
    r = service.http.post(
        "/v1/models/cnn/report",
        content=b'{"version": 1, "metrics": {"loss": NaN}}',
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 422 and "finite" in r.json()["detail"]
    r = service.http.post(
        "/v1/models/cnn/report",
        json={"version": 1, "metrics": {"x" * 100_000: 1.0}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 422  # metric names are bounded too


def test_memory_is_bounded_by_bytes(tmp_path):
    svc = Service(tmp_path / "h", downlink_cache_bytes=200_000)
    full = svc.reg.get("cnn", 1).size
    for i in range(8):  # distinct models of ~full bytes each: the cache keeps what fits in the budget
        v = svc.reg.register_model(
            "cnn", {k: t + i for k, t in svc.reg.load_state("cnn@1").items()}, parent=1
        )
        svc.reg._move_tag("cnn", "production", v.number, action="promote")
        svc.device(f"d{i}").fetch("cnn")
    cache = svc.state.downlinks
    assert cache.nbytes <= 200_000 and len(cache) == 200_000 // (full + 512)
    # drift history and alerts are capped
    from deltaplane.serve.fleet_watch import AlertLog

    assert isinstance(svc.state.alerts, AlertLog)  # the last MAX_ALERTS of each model (test_fleet_watch)


def _federated_rounds(svc, rounds, *, restart_between=False, forget_snapshot=False):
    """Three devices upload fixed updates each round; returns the published versions' hashes and ε."""
    out = []
    for rnd in range(1, rounds + 1):
        opened = svc.admin.open_round("cnn")
        base = opened["base_version"]
        for i in range(3):
            data = payload(svc, 10 * rnd + i, base=base, scale=0.05)
            svc.device(f"d{i}").upload("cnn", opened["round"], data, num_examples=1 + i)
        closed = svc.admin.close_round("cnn", opened["round"])
        out.append((svc.reg.get("cnn", closed["version"]).sha256, closed["measurements"].get("epsilon")))
        if restart_between:
            if forget_snapshot:
                with svc.reg.transaction() as con:
                    con.execute("DELETE FROM server_steps")
            restart(svc)
    return out


@pytest.mark.parametrize("chain", ["fedadam-dp", "centered-clip"])
def test_a_restarted_service_continues_its_server_step_bit_for_bit(tmp_path, chain):
    from deltaplane.engine import RunConfig

    # FedAdam's moments, the adaptive clip's estimate and noise generators, the DP accountant and a stochastic
    # downlink codec's residual and random state all carry across rounds; centered clipping starts each round from
    # the previous round's aggregate (its state's centre), which a service without its snapshot restarts from 0
    run = RunConfig(
        clients=3,
        aggregator="fedadam",
        clip="adaptive",
        dp_noise=0.5,
        dp_noise_source="seeded",  # bit-for-bit comparison of two services: noise from the seed, on purpose
        downlink_codec="topk(0.2) | quant(bits=8, stochastic=true)",
    )
    if chain == "centered-clip":
        run = RunConfig(clients=3, defense="centered_clip(0.001, iterations=2)")
    control = _federated_rounds(Service(tmp_path / "a", federation=run), 3)
    restarted = _federated_rounds(Service(tmp_path / "b", federation=run), 3, restart_between=True)
    assert restarted == control
    # without the stored state the service restarts its optimizer and residual, and draws its DP noise from
    # the OS CSPRNG rather than restart the seeded generator (which would repeat round 1's noise): the
    # published models differ from round 2 on, while ε still resumes from the rounds already released
    forgot = _federated_rounds(
        Service(tmp_path / "c", federation=run), 3, restart_between=True, forget_snapshot=True
    )
    assert forgot[0] == control[0] and forgot[1][0] != control[1][0]
    assert [e for _, e in forgot] == [e for _, e in control]


def test_a_tampered_server_step_snapshot_is_refused(tmp_path):
    from deltaplane.engine import RunConfig

    svc = Service(tmp_path / "a", federation=RunConfig(clients=3, aggregator="fedadam"))
    _federated_rounds(svc, 1)
    with svc.reg.transaction() as con:
        data = bytearray(con.execute("SELECT state FROM server_steps").fetchone()[0])
        data[-10] ^= 1
        con.execute("UPDATE server_steps SET state=?", (bytes(data),))
    with pytest.raises(ServiceError, match="does not match its hash") as info:
        restart(svc).admin.open_round("cnn")
    assert info.value.status == 409  # IntegrityError: the round is not opened on a state it cannot trust


def _blob_files(svc) -> set[str]:
    return {p.name for p in (svc.reg.home / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"}


def test_refused_uploads_leave_no_blob_behind(service):
    """A device re-sending (409) wrote each payload's blob before the refusal, and nothing removed it: one
    device token could fill the disk at the rate limit. The refusal now comes first, and a blob written for
    an upload refused afterwards is removed."""
    service.admin.open_round("cnn")
    dev = service.device("d1")
    before = _blob_files(service)
    dev.upload("cnn", 1, payload(service, 0))
    accepted = _blob_files(service) - before
    assert len(accepted) == 1
    for seed in range(1, 6):
        with pytest.raises(ServiceError, match="already uploaded"):
            dev.upload("cnn", 1, payload(service, seed))
    assert _blob_files(service) - before == accepted
    assert service.reg.verify(signatures=False).orphans == []


def test_gc_keeps_an_open_rounds_uploads_and_the_restart_that_needs_them(tmp_path):
    """`registry gc` counted an open round's accepted uploads as orphans and deleted them; the next start
    then failed (the round's uploads are replayed from their blobs). They are referenced while the round is
    open, and collectable once it closed."""
    from deltaplane.registry import Registry

    svc = Service(tmp_path / "home")
    svc.admin.open_round("cnn")
    for i in range(2):
        svc.device(f"d{i}").upload("cnn", 1, payload(svc, i))
    other = Registry(svc.reg.home)
    assert other.verify(signatures=False).orphans == []
    assert other.gc(min_age_s=0) == 0
    restart(svc)
    assert svc.device("x").round("cnn")["uploads"] == 2
    assert svc.admin.close_round("cnn", 1)["uploads"] == 2
    assert len(Registry(svc.reg.home).verify(signatures=False).orphans) == 2  # closed: only hashes are kept
    restart(svc)
    assert svc.admin.open_round("cnn")["round"] == 2


def test_an_upload_claiming_more_examples_than_the_bound_is_refused(service, service_factory):
    # num_examples weights FedAvg: unbounded, one device claiming 1e12 examples published its own update
    service.admin.open_round("cnn")
    mallory, blobs = service.device("mallory"), _blob_files(service)
    for claim in (100_001, 1e12):  # above the default bound (ServiceConfig.max_examples = 100_000)
        with pytest.raises(ServiceError) as e:
            mallory.upload("cnn", 1, payload(service, 0), num_examples=claim)
        assert e.value.status == 422 and "max-examples" in e.value.detail and "100000" in e.value.detail
    # the round is as it was: no upload counted, no blob kept, the device not marked as having uploaded
    assert mallory.round("cnn")["uploads"] == 0 and _blob_files(service) == blobs
    assert service.state.counters["rejected.too_many_examples"] == 2
    assert mallory.upload("cnn", 1, payload(service, 0), num_examples=100_000)["accepted"]  # at the bound
    service.device("d1").upload("cnn", 1, payload(service, 1), num_examples=3)
    closed = service.admin.close_round("cnn", 1)
    assert closed["uploads"] == 2 and service.reg.get("cnn", closed["version"]).lineage["examples"] == 100_003
    # the operator's bound
    svc = service_factory(max_examples=10)
    svc.admin.open_round("cnn")
    with pytest.raises(ServiceError, match="bound of 10 examples"):
        svc.device("d").upload("cnn", 1, payload(svc, 0), num_examples=11)
    with pytest.raises(ConfigError, match="max_examples"):
        ServiceConfig(home=".", admin_token=ADMIN, max_examples=0)


@pytest.mark.parametrize("defense", ["median", "trimmed_mean(0.2, bucket=2)"])
def test_a_bucketed_rule_publishes_the_same_weights_whatever_order_uploads_arrive_in(tmp_path, defense):
    """Buckets used to be drawn over arrival positions: the same 6 uploads in network order and in reverse
    published weights up to 0.0166 apart under `median` (a rerun of a round was not reproducible, and timing
    picked which devices shared a bucket). They are drawn over device ids now."""
    run = RunConfig().replace(defense=defense, downlink_codec="identity", codec="identity")
    published = []
    for name, order in (("forward", range(6)), ("reverse", reversed(range(6)))):
        svc = Service(tmp_path / name, federation=run)
        svc.admin.open_round("cnn")
        base = svc.reg.load_state("cnn@1")
        for i in order:
            p = Compressor("identity").compress(update(base, i), base_id="cnn", base_version=1)
            svc.device(f"d{i}").upload("cnn", 1, p)
        published.append(svc.reg.get("cnn", svc.admin.close_round("cnn", 1)["version"]).sha256)
    assert published[0] == published[1]


def test_a_service_restarted_with_another_configuration_refuses_the_stored_step(tmp_path):
    """The stored server step holds FedAdam's moments taken with lr=0.01. A restart configured with lr=0.5 used
    to run on with the snapshot's lr, silently; it is refused, saying what to do, and nothing is opened."""
    import dataclasses

    svc = Service(tmp_path / "a", federation=RunConfig(clients=3, aggregator="fedadam", server_opt_lr=0.01))
    _federated_rounds(svc, 1)
    changed = RunConfig(clients=3, aggregator="fedadam", server_opt_lr=0.5)
    svc.config = dataclasses.replace(svc.config, federation=changed)
    with pytest.raises(ServiceError, match="configuration the federation ran with") as info:
        restart(svc).admin.open_round("cnn")
    assert info.value.status == 422 and "lr=0.01" in str(info.value) and "lr=0.5" in str(info.value)
    svc.config = dataclasses.replace(
        svc.config, federation=RunConfig(clients=3, aggregator="fedadam", server_opt_lr=0.01)
    )
    assert restart(svc).admin.open_round("cnn")["round"] == 2


def test_a_plain_upload_does_not_read_consent_on_the_event_loop(service, monkeypatch) -> None:
    """A plain upload checked withdrawn cohorts (a signed-log read, which can wait on the registry's write lock)
    on the event loop: while it waited, every request did, /healthz included (SecAgg posts had the same fault,
    fixed before). It runs in a worker thread now."""
    import threading

    import httpx

    from deltaplane.serve import BackgroundServer

    rnd = service.admin.open_round("cnn")["round"]
    zero = _zero_payload(service)
    dev = service.device("d1")
    reg = service.app.state.deltaplane.registry
    real, reading, release = reg.withdrawn_cohorts, threading.Event(), threading.Event()

    def slow_read(*args, **kwargs):  # as a read waiting on a busy database
        reading.set()
        release.wait(10)
        return real(*args, **kwargs)

    with BackgroundServer(service.app) as srv:
        dev._http = httpx.Client(base_url=srv.url, timeout=30)
        monkeypatch.setattr(reg, "withdrawn_cohorts", slow_read)
        sender = threading.Thread(target=dev.upload, args=("cnn", rnd, zero))
        sender.start()
        try:
            assert reading.wait(10)
            assert httpx.get(f"{srv.url}/healthz", timeout=3).status_code == 200
        finally:
            release.set()
            sender.join(15)


def test_a_store_without_the_measurements_column_is_migrated_and_closes_keep_their_measurements(tmp_path):
    """Rounds did not keep their close's measurements: an operator whose answer to a close was lost read the round
    back without them (no ε). A store made before gets the ``measurements`` column of rounds and SecAgg rounds
    on start (its old rows read {}: nothing was recorded), and every close from then on keeps its
    measurements, returned by GET /admin/models/{m}/rounds/{r} as the close answered them."""
    import sqlite3

    from deltaplane.serve.rounds_store import RoundStore

    svc = Service(tmp_path / "h")
    svc.admin.open_round("cnn")
    svc.device("d0").upload("cnn", 1, payload(svc, 0))
    svc.admin.close_round("cnn", 1)
    svc.reg.close()
    con = sqlite3.connect(tmp_path / "h" / "registry.db")
    with con:  # the tables as older versions made them, with a published SecAgg round
        for table in ("rounds", "secagg_rounds"):
            con.execute(f"ALTER TABLE {table} DROP COLUMN measurements")
            con.execute(f"ALTER TABLE {table} DROP COLUMN dp_adjacency")
        con.execute(
            "INSERT INTO secagg_rounds (model, number, base_version, state, invited, opened_at, closed_at, version) "
            "VALUES ('cnn', 1, 1, 'published', 3, 0, 1, 2)"
        )
    con.close()
    restart(svc)
    con = sqlite3.connect(tmp_path / "h" / "registry.db")
    for table in ("rounds", "secagg_rounds"):
        assert {"measurements", "dp_adjacency"} <= {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
    con.close()
    assert svc.admin.round_status("cnn", 1)["measurements"] == {}  # closed before they were kept
    store = RoundStore(svc.reg)
    assert store.secagg_record("cnn", 1)["published"] == {
        "version": 2,
        "measurements": {},
        "dp_adjacency": None,
    }
    svc.admin.open_round("cnn", base_version=2)
    svc.device("d1").upload("cnn", 2, payload(svc, 1, base=2))
    closed = svc.admin.close_round("cnn", 2)
    assert closed["measurements"]  # what the server step measured
    assert svc.admin.round_status("cnn", 2)["measurements"] == closed["measurements"]
    assert restart(svc).admin.round_status("cnn", 2)["measurements"] == closed["measurements"]  # durable


def test_a_stored_upload_grown_past_its_recorded_size_is_not_read(tmp_path):
    """A restart replays the open round's stored uploads, and registry verify checks every blob; each read the
    blob whole, so a file grown to any size (256 MiB, sparse here) was read into memory before its hash
    refused it. The size its row records bounds both reads."""
    from deltaplane.errors import IntegrityError

    svc = Service(tmp_path / "a")
    svc.admin.open_round("cnn")
    svc.device("d0", "eu").upload("cnn", 1, payload(svc, 0), num_examples=1)
    (sha,) = [r["sha256"] for r in svc.reg.query("SELECT sha256 FROM round_uploads")]
    with svc.reg.blob_path(sha).open("r+b") as f:
        f.truncate(1 << 28)
    says = f"blob {sha} holds {1 << 28} bytes, more than the"
    problems = svc.reg.verify().problems
    assert any(says in p for p in problems), problems
    with pytest.raises(IntegrityError, match=says):
        restart(svc)

"""A personalized fleet device that missed rounds catches up (docs/fleet.md): the download says, signed, which
round made the version (``X-Deltaplane-Round``), earlier versions can be fetched by number, and a device adapts
to each version it missed, in order, with that round's stream, as every device of the simulator does.

The service runs in this process over TLS (:class:`tests.serve.test_fleet.Fleet`); devices take part one after
another, in device order, so FedAvg sums as the simulator does and the figures can be compared.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from deltaplane.engine import RunConfig
from deltaplane.engine.federation import sample_clients
from deltaplane.errors import NotFound, SignatureError
from deltaplane.seeding import Stream, numpy_rng
from deltaplane.serve import fleet
from deltaplane.serve.client import DeviceClient, ServiceError
from deltaplane.sim.simulation import run_simulation

from .test_fleet import MODEL, Fleet

PERSONAL = ("global_accuracy", "personal_accuracy")


#: who is offline in each round: device 2 in round 1 (joins late), device 0 in round 2 (polls past it)
OFFLINE = {1: {2}, 2: {0}, 3: set()}


def _play(
    f: Fleet,
    devices: list[fleet.Device],
    chosen: list[list[int]],
    offline: dict[int, set[int]],
    *,
    before_report: Callable[[int, int, fleet.Device], None] | None = None,
) -> None:
    """Run the rounds one after another, in device order: each round's ``chosen`` devices take part, the others
    online see it open and sit it out; once it closes, every device online reports (``before_report(device,
    round, dev)`` first, if given)."""
    for rnd, sampled in enumerate(chosen, start=1):
        opened = f.admin.open_round(MODEL)
        info = devices[0].conn.open_rounds(MODEL)[0]
        for i, dev in enumerate(devices):
            if i in sampled:
                assert fleet.take_part(dev, info, stage_wait=5)
            elif i not in offline[rnd]:
                fleet._watch(dev, int(info["round"]), int(info["base_version"]))
        f.admin.close_round(MODEL, opened["round"])
        for i, dev in enumerate(devices):
            if before_report is not None:
                before_report(i, rnd, dev)
            if i not in offline[rnd]:
                assert fleet.report_pending(dev)


def _config(byo_task: str, method: str) -> RunConfig:
    # seed 6 samples devices [0, 1], [1, 2], [0, 1] in rounds 1-3 (asserted below)
    return RunConfig(
        task=byo_task,
        clients=3,
        rounds=3,
        sample_fraction=2 / 3,
        downlink_codec="identity",
        seed=6,
        personalization=method,
    )


@pytest.mark.parametrize("method", ["ditto", "alpha_mix"])
def test_devices_that_miss_rounds_report_the_simulators_personal_figures(
    byo_task, tmp_path, one_thread, method
) -> None:
    """Device 2 is offline in round 1 (joins late); device 0, sampled out of round 2, polls too slowly to see it
    open. Each round's sampled devices take part, the others online see it open and sit it out. Before, a
    device adapted only to the versions of rounds it saw open, so device 2 skipped round 1's and device 0 round
    2's: Ditto's personal figures (its personal model carries over) left the simulator's, and α-mix (which
    adapts afresh from each version) missed an adaptation; now each catches up on what it missed, in order, and
    every device's last row is the simulator's row, measured by both drivers."""
    cfg = _config(byo_task, method)
    chosen = [
        sample_clients(3, cfg.sample_fraction, numpy_rng(cfg.seed, Stream.CLIENT_SAMPLING, r))
        for r in (1, 2, 3)
    ]
    assert chosen == [[0, 1], [1, 2], [0, 1]]
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        _play(f, devices, chosen, OFFLINE)
    sim = run_simulation(cfg)
    for dev, row in zip(devices, sim.clients, strict=True):
        got = dev.rounds[-1]
        assert got["round"] == 3
        assert [got[k] for k in PERSONAL] == pytest.approx([row[k] for k in PERSONAL], abs=1e-6)
        if method == "alpha_mix":
            assert got["alpha"] == row["alpha"]
            assert (
                len(dev.client.personal.history) == 3
            )  # one adaptation per round; before: 2 for devices 0, 2
    # device 0 caught up on round 2's version, device 2 on round 1's: each reported on it (before: [1, 3], [2, 3])
    assert [[r["round"] for r in d.rounds] for d in devices] == [[1, 2, 3]] * 3


def _rate_limited_once(dev: fleet.Device) -> list[int]:
    """``dev``'s first catch-up report is refused with a 429 (its rate limit, a long Retry-After: the client
    does not wait it out itself); returns the versions refused so."""
    real, refused = dev.conn.report, []

    def report(model, *, version, metrics=None, summary=None, round_id=None):
        if metrics and "catch_up" in metrics and not refused:
            refused.append(version)
            raise ServiceError(429, "rate limited", retry_after=30.0)
        return real(model, version=version, metrics=metrics, summary=summary, round_id=round_id)

    dev.conn.report = report  # type: ignore[method-assign]
    return refused


@pytest.mark.parametrize("method", ["ditto", "alpha_mix"])
def test_a_device_reports_on_each_version_it_caught_up_on_with_the_simulators_rows(
    byo_task, tmp_path, one_thread, method
) -> None:
    """The scenario above: device 2 misses round 1 (offline), device 0 round 2 (sampled out, polled past it).
    Each reports on every version it catches up on, as it would have had it seen the round open: the reports
    the service stored give every device a row for every round, equal to the simulator's row of that device
    after that round (``run_simulation`` with ``rounds=r``: its streams are per round) within 1e-6, so the
    closed rounds' means (the Fleet page, ``GET /admin/rounds/closed``) are the simulator's round means. Before,
    rounds 1 and 2 lacked a device each. A catch-up report is marked ``catch_up`` and carries no drift summary;
    a 429 on it (device 2's, in round 2) backs off without losing the report or adapting twice."""
    cfg = _config(byo_task, method)
    chosen = [[0, 1], [1, 2], [0, 1]]  # asserted in the test above
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(3)]
        refused = _rate_limited_once(devices[2])

        def back_off_once(i: int, rnd: int, dev: fleet.Device) -> None:
            if (i, rnd) == (2, 2):  # its first report since round 1 published: it catches up on that first
                with pytest.raises(ServiceError) as refusal:
                    fleet.report_pending(dev)
                assert refusal.value.status == 429  # run_device backs off on it, then calls again
                assert [r["version"] for r in dev.unsent] == refused

        _play(f, devices, chosen, OFFLINE, before_report=back_off_once)
        stored = list(f.state.reports[MODEL])
        closed = {c["round"]: c for c in f.admin.closed_rounds(MODEL)}
    names = [fleet.device_id(i) for i in range(3)]
    got = {(names.index(r["device"]), r["round"]): r for r in stored}
    assert sorted(got) == [(d, r) for d in range(3) for r in (1, 2, 3)]  # before: no (2, 1), no (0, 2)
    assert len(stored) == 9  # one report each: the refused one sent once, after its back-off
    catch_ups = sorted(k for k, r in got.items() if "catch_up" in r["metrics"])
    assert catch_ups == [(0, 2), (2, 1)]
    for rnd in (1, 2, 3):
        sim = run_simulation(cfg.replace(rounds=rnd))
        for d, row in enumerate(sim.clients):
            report = got[(d, rnd)]
            assert report["version"] == closed[rnd]["version"]
            assert [report["metrics"][k] for k in PERSONAL] == pytest.approx(
                [row[k] for k in PERSONAL], abs=1e-6
            )
            if method == "alpha_mix":
                assert report["metrics"]["alpha"] == row["alpha"]
        final = sim.rounds[-1]
        assert closed[rnd]["reports"] == 3
        assert closed[rnd]["personal_accuracy_mean"] == pytest.approx(final.personal_accuracy_mean, abs=1e-6)
        assert closed[rnd]["global_accuracy_mean"] == pytest.approx(final.client_mix_accuracy_mean, abs=1e-6)
    if (
        method == "alpha_mix"
    ):  # one adaptation per round: the 429 made device 2 adapt to round 1's version once
        assert [len(dev.client.personal.history) for dev in devices] == [3, 3, 3]
    # a drift window keeps one summary per device: catch-up reports send none
    summaries = [b for p, b in f.bodies if p.endswith("/report") and b"summary" in b]
    assert len(summaries) == 7


def test_the_download_says_signed_which_round_made_the_version(byo_task, tmp_path) -> None:
    """The current answer and a pinned one (``?version=N``) name the round that made the version, signed over
    the request's nonce: a rewritten round number is refused, a pinned answer never passes for a current one
    (no serve signature), and a version off the served lineage is a 404 (:class:`NotFound`)."""
    cfg = RunConfig(
        task=byo_task, clients=2, rounds=1, downlink_codec="identity", seed=3, personalization="ditto"
    )
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(2)]
        opened = f.admin.open_round(MODEL)
        info = devices[0].conn.open_rounds(MODEL)[0]
        for dev in devices:
            assert fleet.take_part(dev, info, stage_wait=5)
        new = f.admin.close_round(MODEL, opened["round"])["version"]
        conn = devices[0].conn
        version, _ = conn.fetch(MODEL, channel="training")
        assert (version, conn.made_by_known, conn.made_by) == (new, True, opened["round"])
        _, rnd = conn.fetch_published(MODEL, new - 1, channel="training")
        assert rnd is None  # the registered base: no round made it
        _, rnd = conn.fetch_published(MODEL, new, channel="training")
        assert rnd == opened["round"]
        with pytest.raises(NotFound, match="not on the lineage"):
            conn.fetch_published(MODEL, new + 5, channel="training")

        def another_round(request: httpx.Request) -> httpx.Response:
            resp = httpx.Client(verify=f.ctx).send(request)
            headers = {**resp.headers, "x-deltaplane-round": "7"}
            return httpx.Response(resp.status_code, headers=headers, content=resp.content)

        token = devices[1].conn._headers["Authorization"].split()[1]
        mitm = DeviceClient(
            f.url,
            token,
            verifier=f.reg.verifier,
            client=httpx.Client(base_url=f.url, transport=httpx.MockTransport(another_round)),
        )
        with pytest.raises(SignatureError):
            mitm.fetch(MODEL, channel="training")

        def as_pinned(
            request: httpx.Request,
        ) -> httpx.Response:  # the device's request rewritten to an old version
            url = request.url.copy_merge_params({"version": str(new - 1)})
            return httpx.Client(verify=f.ctx).send(
                httpx.Request(request.method, url, headers=request.headers)
            )

        mitm = DeviceClient(
            f.url,
            token,
            verifier=f.reg.verifier,
            client=httpx.Client(base_url=f.url, transport=httpx.MockTransport(as_pinned)),
        )
        with pytest.raises(SignatureError, match="no serve signature"):
            mitm.fetch(MODEL, channel="training")


def test_a_device_of_a_service_without_round_statements_says_so_once_and_keeps_working(
    byo_task, tmp_path
) -> None:
    """An older service sends no ``X-Deltaplane-Round``: the device adapts as before (to the rounds it saw
    open, with their numbers) and says once that it cannot catch up."""
    cfg = RunConfig(
        task=byo_task, clients=2, rounds=1, downlink_codec="identity", seed=3, personalization="ditto"
    )
    with Fleet(tmp_path, cfg) as f:
        devices = [f.device(i) for i in range(2)]
        said: list[str] = []
        dev = devices[0]
        dev.log = said.append
        real = dev.conn._made_by
        dev.conn._made_by = lambda *a, **kw: (False, None)
        opened = f.admin.open_round(MODEL)
        info = dev.conn.open_rounds(MODEL)[0]
        for d in devices:
            assert fleet.take_part(d, info, stage_wait=5)
        f.admin.close_round(MODEL, opened["round"])
        for d in devices:
            assert fleet.report_pending(d)
        dev.conn._made_by = real
    assert sum("predates X-Deltaplane-Round" in line for line in said) == 1
    assert len(dev.rounds) == 1 and set(PERSONAL) <= set(dev.rounds[0])
    assert (
        dev.adapted == dev.rounds[0]["version"] and len(dev.client.personal.history) == 0
    )  # Ditto keeps none

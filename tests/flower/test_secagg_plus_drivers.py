"""SecAgg+ (``secagg_neighbours``) on every driver: in process, the HTTP service's rounds and Flower each run the
run's sparse graph, and unmask the very same sum, so the models are bit-identical.

The sum SecAgg unmasks does not depend on the graph (only on the devices' codes), so parity alone would also
pass if a driver ignored the degree: each driver's server is watched to check the graph it actually ran.
"""

from __future__ import annotations

import torch

from deltaplane.aggregation.secagg import default_threshold
from deltaplane.engine import RunConfig
from deltaplane.serve.federation import run_http_simulation
from deltaplane.sim import run_simulation

#: 8 devices: the smallest round whose devices accept a sparse graph (neighbourhoods of 7 = 2⌈log₂ 8⌉ + 1)
SPARSE = RunConfig(clients=8, rounds=1, local_epochs=1, lr=0.1, secagg=True, clip="2.0", secagg_neighbours=6)


def _seen(r):
    return (r.test_accuracy, r.epsilon, r.rejected, r.uplink_bytes)


def test_every_driver_runs_the_sparse_graph_and_unmasks_the_same_sum(secagg_servers, run_flower) -> None:
    servers = secagg_servers
    seq = run_simulation(SPARSE)
    http = run_http_simulation(SPARSE)
    rounds, finals = run_flower(SPARSE)

    # one round per driver, each on SecAgg+'s graph of degree 6 with the neighbourhood's threshold (the
    # service's default, ⌊2·7/3⌋ + 1 = 5; the complete graph's would be 6)
    assert [(s.config.num_clients, s.config.neighbours, s.config.threshold) for s in servers] == [
        (8, 6, default_threshold(7))
    ] * 3
    assert all(len(s.graph[u]) == 6 for s in servers for u in range(8))  # each device: 6 of the 7 others
    # bit-identical across the three drivers, bytes included (each device sends 6 ciphertexts, not 7)
    assert [_seen(r) for r in http.rounds] == [_seen(r) for r in seq.rounds] == [_seen(r) for r in rounds]
    for k, v in seq.final_state.items():
        assert torch.equal(http.final_state[k], v) and torch.equal(finals[k], v), k
    assert http.transport["uploads_accepted"] == 0  # only SecAgg messages carried the updates

    # the complete graph unmasks the same sum of the same codes (the model is the same), for more bytes
    complete = run_simulation(SPARSE.replace(secagg_neighbours=None))
    assert servers[-1].config.neighbours is None
    assert all(torch.equal(complete.final_state[k], v) for k, v in seq.final_state.items())
    assert seq.rounds[0].uplink_bytes < complete.rounds[0].uplink_bytes

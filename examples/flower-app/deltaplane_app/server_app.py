"""ServerApp: ``DeltaStrategy`` decodes the nodes' compressed deltas, averages them with deltaplane's FedAvg
and sends each node the compressed downlink it missed. With ``secagg = true`` it is ``SecAggStrategy``: it gets
only the nodes' masked inputs and unmasks their sum (``secagg-authenticated = true``: signed rosters and the
consistency check, for SuperNodes enrolled in their ``--node-config``).

Partner: ``deltaplane_app.client_app`` (``delta_mod``, and ``secagg_mod`` + the ``query.secagg`` stages under
SecAgg). Prints one line per round (accuracy, bytes).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from deltaplane.flower import digits_server_app

from .task import run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the digits federation for ``num-server-rounds`` rounds on the connected SuperNodes."""
    cfg = run_config(context)

    def report(metrics, traffic) -> None:
        print(
            f"deltaplane round {metrics.round}: test acc {metrics.test_accuracy:.4f}, "
            f"uplink {traffic.uplink_payload_bytes} B payload / {traffic.uplink_message_bytes} B messages, "
            f"downlink {traffic.downlink_message_bytes} B",
            flush=True,
        )

    # SuperNodes may be real devices: DP noise and DP sampling from the OS CSPRNG, not the config seed
    server = digits_server_app(
        cfg, on_round=report, simulation=False
    )  # cfg.secagg_authenticated: signed rounds
    server(grid=grid, context=context)
    print(f"deltaplane done: {cfg.rounds} rounds", flush=True)

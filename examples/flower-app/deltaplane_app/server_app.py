"""ServerApp: ``DeltaStrategy`` decodes the nodes' compressed deltas, averages them with deltaplane's FedAvg
and sends each node the compressed downlink it missed.

Partner: ``deltaplane_app.client_app`` (``delta_mod``). Prints one line per round (accuracy, bytes).
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
    digits_server_app(cfg, on_round=report, simulation=False)(grid=grid, context=context)
    print(f"deltaplane done: {cfg.rounds} rounds", flush=True)

"""Run deltaplane's codecs and aggregators inside Flower: thin adapters, never a runtime of our own.

- :func:`delta_mod` (client mod) and :class:`DeltaStrategy` (server Strategy) are a pair: updates travel as
  compressed deltaplane payloads both ways, with per-node error feedback kept in Flower's ``Context.state``.
- :func:`secagg_mod` + :func:`add_secagg` (client) and :class:`SecAggStrategy` (server) carry secure
  aggregation's stages as Flower messages; the server gets only masked inputs and their unmasked sum.
- :func:`digits_client_app` / :func:`digits_server_app` are the default digits federation as Flower apps,
  and :func:`run_flower` runs a :class:`~deltaplane.sim.RunConfig` on Flower's Ray simulation engine.

Importing this package imports ``flwr`` (the ``flower`` extra); ``import deltaplane`` never does.
"""

from deltaplane.flower.digits import digits_client_app, digits_server_app, task_client_app, task_server_app
from deltaplane.flower.engine import FlowerRunError, run_flower
from deltaplane.flower.mod import delta_mod, node_seed
from deltaplane.flower.secagg import SecAggStrategy, add_secagg, secagg_mod
from deltaplane.flower.strategy import DeltaStrategy, RoundTraffic

__all__ = [
    "DeltaStrategy",
    "FlowerRunError",
    "RoundTraffic",
    "SecAggStrategy",
    "add_secagg",
    "delta_mod",
    "digits_client_app",
    "digits_server_app",
    "node_seed",
    "run_flower",
    "secagg_mod",
    "task_client_app",
    "task_server_app",
]

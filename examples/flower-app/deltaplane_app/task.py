"""Turn the Flower run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``)
into deltaplane's :class:`~deltaplane.sim.RunConfig`, validated field by field, and the ServerApp's own
``secagg-authenticated`` switch."""

from __future__ import annotations

from flwr.app import Context

from deltaplane.errors import ConfigError
from deltaplane.sim import RunConfig

#: the run config key that is the ServerApp's, not a RunConfig field: authenticated SecAgg rounds
AUTHENTICATED = "secagg-authenticated"


def run_config(context: Context) -> RunConfig:
    """The deltaplane RunConfig this Flower run asks for; a bad key or value raises ``ConfigError``."""
    fields = {
        ("rounds" if k == "num-server-rounds" else k.replace("-", "_")): v
        for k, v in context.run_config.items()
        if k != AUTHENTICATED
    }
    return RunConfig.from_mapping(fields, source="[tool.flwr.app.config]")


def authenticated(context: Context) -> bool:
    """Whether the ServerApp runs authenticated SecAgg rounds (``secagg-authenticated = true``, with
    ``secagg = true``): every SuperNode must then be enrolled in its own ``--node-config``. The nodes never read
    this key: an enrolled node takes only authenticated rounds, whatever the server's run config says."""
    value = context.run_config.get(AUTHENTICATED, False)
    if not isinstance(value, bool):
        raise ConfigError(f"[tool.flwr.app.config] {AUTHENTICATED} must be true or false. Found {value!r}")
    return value

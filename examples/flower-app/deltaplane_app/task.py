"""Turn the Flower run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``)
into deltaplane's :class:`~deltaplane.sim.RunConfig`, validated field by field."""

from __future__ import annotations

from flwr.app import Context

from deltaplane.sim import RunConfig


def run_config(context: Context) -> RunConfig:
    """The deltaplane RunConfig this Flower run asks for; a bad key or value raises ``ConfigError``."""
    fields = {
        ("rounds" if k == "num-server-rounds" else k.replace("-", "_")): v
        for k, v in context.run_config.items()
    }
    return RunConfig.from_mapping(fields, source="[tool.flwr.app.config]")

"""ClientApp: local SGD on this SuperNode's digits shard; deltaplane's ``delta_mod`` compresses the update.

Partner: ``deltaplane_app.server_app`` (``DeltaStrategy``, or ``SecAggStrategy`` with ``secagg = true``). The
SuperNode's ``--node-config`` gives its ``partition-id`` and, to take authenticated SecAgg rounds, its enrollment
(``secagg-identity-key``, ``secagg-certificate``, ``secagg-enrollment-authority``: ``deltaplane keys certify``
writes the files); the error-feedback residual stays in the node's Context state between rounds.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from deltaplane.flower import digits_client_app

from .task import run_config

app = ClientApp()
_apps: dict[str, ClientApp] = {}


def _delegate(msg: Message, context: Context) -> Message:
    """Delegate to deltaplane's digits ClientApp built for this run's config (once per process)."""
    cfg = run_config(context)
    key = cfg.model_dump_json()
    if key not in _apps:
        # this App's SuperNodes may be real devices: options only a simulation may run on a device (an attack)
        # are refused (UnsupportedOption); `deltaplane run --engine flower` simulates them
        _apps[key] = digits_client_app(cfg, simulation=False)
    return _apps[key](msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training, compressed by ``delta_mod``."""
    return _delegate(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """With personalization: the node adapts its personal state (kept in its Context) and reports accuracies."""
    return _delegate(msg, context)


@app.query("device")
def device(msg: Message, context: Context) -> Message:
    """Which device (partition-id) this SuperNode runs: the server samples and orders nodes by it."""
    return _delegate(msg, context)


@app.query("secagg")
def secagg(msg: Message, context: Context) -> Message:
    """SecAgg's stages (key advertisement, shares, consistency, unmasking): ``add_secagg`` answers them."""
    return _delegate(msg, context)

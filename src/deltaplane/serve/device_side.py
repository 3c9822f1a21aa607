"""Which options of a service's federation config act on the devices, and which only a simulation can run.

``deltaplane serve --federation run.yaml`` builds the federation's *server* step (aggregator chain, central DP,
robust rule, downlink). The devices are not the service's: it tells them the round, its base version and the
wire session (codec and layout), nothing else, so the device-side options of the same YAML (local training,
FedProx, local DP, DGC, personal training) reach no device unless the devices are configured with them. The
service says so when it starts (:func:`device_side_notice`) rather than pretend to apply them, and refuses the
options that only a simulation can carry out (:func:`check_real_devices`).
"""

from __future__ import annotations

from typing import Any

from deltaplane.engine import RunConfig
from deltaplane.errors import UnsupportedOption

__all__ = [
    "DEVICE_SIDE",
    "SIMULATION_ONLY",
    "check_real_devices",
    "device_side_notice",
    "device_side_options",
]

#: RunConfig options the devices apply (the engine's ClientStep), which a service can neither apply nor check
DEVICE_SIDE = (
    "local_epochs",
    "batch_size",
    "lr",
    "lr_decay",
    "momentum",
    "prox_mu",
    "codec",
    "error_feedback",
    "local_dp_noise",
    "momentum_correction",
    "local_clip",
    "local_clip_relative",
    "momentum_masking",
    "sparsity_warmup",
    "personal_epochs",
    "personal_lr",
    "ditto_lambda",
)

#: options only a simulation can run on its devices, with the physical reason
SIMULATION_ONLY = {
    "attack": "a real device's update is not ours to poison: real devices choose their own updates "
    "(simulate an attack over HTTP with `deltaplane run --transport http`)",
    "train_shifts": "it adds shifted copies of the simulated devices' training images; a real device trains "
    "on its own data",
    "client_eval_every": "the service scores no device: each real device scores its own held-out data and "
    "reports it (holdout_accuracy) when it syncs, whatever the federation's config says",
}


def device_side_options(run: RunConfig) -> dict[str, Any]:
    """The device-side options ``run`` sets away from their defaults (what the devices must be told)."""
    default = RunConfig()
    chosen = {k: getattr(run, k) for k in DEVICE_SIDE if getattr(run, k) != getattr(default, k)}
    if run.wire == "compact":
        chosen.pop("codec", None)  # the wire session the service serves carries it to the devices
    if run.clip is not None and (run.local_dp_noise > 0 or run.secagg):
        chosen["clip"] = (
            run.clip_value
        )  # the device clips before its noise, or before SecAgg masks its update
    if run.secagg and run.dp_noise > 0:
        # distributed DP: each device adds its share z·clip/√m_min before masking; the service only unmasks the
        # sum and accounts its ε, so a device configured without it leaves the published sum with less noise
        chosen["dp_noise"] = run.dp_noise
    return chosen


def device_side_notice(run: RunConfig) -> str:
    """One line for the operator: which of the federation's options the devices must apply themselves."""
    chosen = device_side_options(run)
    if not chosen:
        return (
            "federation: this service runs its server step only; local training, the uplink codec, local DP, "
            "FedProx and DGC run on the devices with their own settings"
        )
    listed = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
    # Under distributed DP the service still reports an ε each round: it is the devices' noise it counts, so
    # say so, or the operator reads "neither applies nor checks" and then an ε from the service, unexplained.
    counted = (
        "; the ε this service reports counts the noise dp_noise has the devices add"
        if "dp_noise" in chosen
        else ""
    )
    return (
        f"federation: device-side options {listed} act on the devices, not on this service, which neither "
        f"applies nor checks them: configure your devices with them{counted}"
    )


def check_real_devices(run: RunConfig) -> None:
    """Refuse, with the physical reason, options only a simulation can run (a service's devices are real)."""
    refused = [
        f"{k}={getattr(run, k)!r}: {why}"
        for k, why in SIMULATION_ONLY.items()
        if getattr(run, k) != getattr(RunConfig(), k)
    ]
    if run.dp_noise > 0 and run.sample_fraction < 1:
        # ε with sampling amplification assumes each device is in a round with probability q = m/N, chosen by
        # a sampler the devices cannot influence; the service opens a round to every authenticated device
        refused.append(
            f"dp_noise with sample_fraction={run.sample_fraction:g}: the service does not sample devices (any "
            "authenticated device may upload to an open round), so the privacy amplification of sampling "
            "cannot be claimed; use sample_fraction: 1 (ε is then accounted at q = 1)"
        )
    if refused:
        raise UnsupportedOption("a service with real devices cannot run " + "; ".join(refused))

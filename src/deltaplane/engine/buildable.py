"""Which federation settings certainly build, decided without building them (so without torch).

:class:`~deltaplane.engine.RunConfig` checks a federation's codec specs, its aggregator chain and its DGC options
by building them, and the builders import torch (about 1.1 s of CPU and 220 MB): every command that only reads
a ``--federation`` file (``fleet coordinate``, ``fleet enroll``) paid for it. The functions here answer the same
question from tables of the built-in constructors' parameters, but only one way: ``True`` when building is
certain to succeed, ``False`` for "build to find out". They never refuse anything themselves, so every refusal
and its message still come from the builders, whichever process reads the file.

They answer ``True`` only in a process that has not loaded torch: once it is loaded, building costs little, and a
codec registered by the user (:func:`~deltaplane.codecs.register_codec`, which may replace a built-in name) is
known only to the builders. ``tests/engine/test_buildable.py`` holds the tables equal to the registered
constructors (names, parameters, positional order, pipeline roles) and checks ``True`` ⇒ builds over many
generated specs and settings, valid and not.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from deltaplane.choices import AGGREGATORS
from deltaplane.errors import DeltaplaneError
from deltaplane.specs import Scalar, parse_spec

if TYPE_CHECKING:
    from deltaplane.engine.config import RunConfig

__all__ = [
    "BUILT_ONLY",
    "CODEC_FORMS",
    "OPTIMIZER_TARGETS",
    "aggregation_builds",
    "codec_builds",
    "dgc_builds",
]


def _here() -> bool:
    """Whether the tables may decide: only while torch (and so any user-registered codec) is not loaded."""
    return "torch" not in sys.modules


# -- a parameter's values that its constructor certainly accepts ----------------------------------------------
def _integer(lo: int, hi: int) -> Callable[[Scalar], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _flag(v: Scalar) -> bool:
    return isinstance(v, bool)


def _ratio(v: Scalar) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1


def _positive_finite(v: Scalar) -> bool:
    # a float only: float() of a huge integer overflows, which the constructor reports
    return isinstance(v, float) and math.isfinite(v) and v > 0


def _one_of(*words: str) -> Callable[[Scalar], bool]:
    return lambda v: isinstance(v, str) and v in words


_INT64 = 2**63 - 1


class CodecForm(NamedTuple):
    """A built-in codec as its spec sees it: its positional parameters, each parameter's certainly accepted
    values, and its role in a pipeline (the class attributes :class:`~deltaplane.codecs.Pipeline` checks)."""

    positional: tuple[str, ...]
    params: dict[str, Callable[[Scalar], bool]]
    lossless: bool = False  # compresses the whole payload: only last
    leaves_floats: bool = False  # leaves float fields (``tensor_fields``) for a later stage


#: every built-in codec whose spec the table decides (held equal to the classes by the tests)
CODEC_FORMS: dict[str, CodecForm] = {
    "identity": CodecForm((), {}),
    "fp16": CodecForm((), {}),
    "bf16": CodecForm((), {}),
    "sign": CodecForm((), {}),
    "quant": CodecForm(
        ("bits",),
        {
            "bits": _integer(1, 8),
            "stochastic": _flag,
            "chunk": _integer(1, _INT64),
            "scale": _one_of("max", "norm"),
        },
    ),
    "topk": CodecForm(("ratio",), {"ratio": _ratio, "approx": _flag}, leaves_floats=True),
    "randk": CodecForm(("ratio",), {"ratio": _ratio, "unbiased": _flag}, leaves_floats=True),
    "threshold": CodecForm(("tau",), {"tau": _positive_finite}, leaves_floats=True),
    "stc": CodecForm(("ratio",), {"ratio": _ratio}),
    "ternary": CodecForm((), {"chunk": _integer(0, _INT64)}),
    "zstd": CodecForm(("level",), {"level": _integer(1, 22)}, lossless=True),
}
#: built-in codecs left to their builders: a nested spec (powersgd's fallback, policy's rules) needs the whole
#: registry to check, and choosing a codec per tensor changes what may follow it
BUILT_ONLY = frozenset({"powersgd", "policy"})


def codec_builds(spec: str) -> bool:
    """``True`` when :func:`~deltaplane.codecs.get_codec` certainly builds ``spec`` (``False``: build it)."""
    if not _here():
        return False
    try:
        stages = parse_spec(spec)
    except DeltaplaneError:
        return False
    forms = []
    for name, args, kwargs in stages:
        form = CODEC_FORMS.get(name)
        if form is None or len(args) > len(form.positional):
            return False
        params = dict(zip(form.positional, args, strict=False))
        for key, value in kwargs.items():
            if key in params:
                return False
            params[key] = value
        if not all(key in form.params and form.params[key](value) for key, value in params.items()):
            return False
        forms.append(form)
    # the pipeline's order (Pipeline.__init__): a lossless stage only last, and every stage but a lossless one
    # after a stage that leaves float fields
    for i, form in enumerate(forms):
        if form.lossless and i != len(forms) - 1:
            return False
        if i + 1 < len(forms) and not forms[i + 1].lossless and not form.leaves_floats:
            return False
    return bool(forms)


# -- the aggregator chain (build_aggregator) and the DGC options ---------------------------------------------
#: the built-in server optimizers the table decides: name -> its class ("module:attribute"; None: FedAvg)
OPTIMIZER_TARGETS: dict[str, str | None] = {
    "fedavg": None,
    "fedadam": "deltaplane.aggregation.fedopt:FedAdam",
    "fedyogi": "deltaplane.aggregation.fedopt:FedYogi",
    "fedadagrad": "deltaplane.aggregation.fedopt:FedAdagrad",
    "fedavgm": "deltaplane.aggregation.fedopt:FedAvgM",
}


def _positive(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def _server_step_builds(config: RunConfig) -> bool:
    """The server optimizer (or FedAvg's server SGD) at the top of the chain, and Validate around it."""
    if config.aggregator not in AGGREGATORS or (
        AGGREGATORS[config.aggregator].target != OPTIMIZER_TARGETS.get(config.aggregator, "")
    ):
        return False
    if config.server_opt_lr is not None and not _positive(config.server_opt_lr):
        return False
    if OPTIMIZER_TARGETS[config.aggregator] is None:  # FedAvg: no optimizer lr; server SGD with server_lr
        ok = config.server_opt_lr is None and _positive(config.server_lr)
    else:  # the optimizer's own lr; server_lr is FedAvg's
        ok = config.server_lr == 1.0
    return ok and (config.max_update_norm is None or _positive(config.max_update_norm))


def aggregation_builds(config: RunConfig) -> bool:
    """``True`` when ``config.build_aggregator()`` certainly builds a chain whose innermost rule is FedAvg (so
    the defence's codec check and its least round size have nothing to refuse); ``False``: build it.

    Decided for no defence, a numeric clip or none, central or distributed DP or none, and the built-in server
    optimizers; an adaptive clip or a defence is left to the builders."""
    if not _here() or config.defense not in (None, "none"):
        return False
    if not _server_step_builds(config):
        return False
    if config.secagg and config.dp_noise == 0:  # the chain is the server step alone
        return True
    clip = config.clip_value
    if clip is not None and not (isinstance(clip, float) and _positive(clip)):
        return False  # adaptive: left to the builders
    if config.dp_noise == 0:
        return clip is not None or config.epsilon_budget is None
    if clip is None or not math.isfinite(config.dp_noise) or config.dp_noise < 0:
        return False
    from deltaplane.aggregation.accounting import (
        PrivacyAccountant,  # torch-free: its own constructor's checks
    )

    expected = config.clients_per_round()
    try:
        PrivacyAccountant(
            noise_multiplier=config.dp_noise,
            sampling_rate=expected / config.clients,
            delta=config.dp_delta,
            budget=config.epsilon_budget,
        )
    except DeltaplaneError:
        return False
    if config.secagg:  # distributed DP: DistributedDP over Clip(FedAvg)
        need = config.min_contributors()
        return isinstance(need, int) and not isinstance(need, bool) and need >= 1
    return expected >= 1  # DPFedAvg over Clip(FedAvg): its expected_clients


def dgc_builds(config: RunConfig) -> bool:
    """``True`` when ``config.make_dgc()`` certainly builds and needs no warm-up codec (``False``: build it)."""
    if not _here() or config.sparsity_warmup != 0:
        return False
    momentum, clip, relative = config.momentum_correction, config.local_clip, config.local_clip_relative
    return (
        0 <= momentum < 1
        and (clip is None or clip > 0)
        and (relative is None or (relative > 1 and clip is None))
        and not (config.momentum_masking and momentum == 0)
    )

"""A small federation with what `deltaplane run` sends by default: the uplink codec and DGC options of
:data:`deltaplane.cli.DEFAULT_RUN_CODEC` / :data:`~deltaplane.cli.DEFAULT_RUN_DGC` (compact frames, entropy
coding), plus a lossy downlink so that both directions carry compressed payloads. Shared by the tests that
check the reported bytes against what a transport carried."""

from deltaplane.cli import DEFAULT_RUN_CODEC, DEFAULT_RUN_DGC
from deltaplane.sim import RunConfig

SMALL_DEFAULT_RUN = RunConfig(
    clients=3,
    rounds=2,
    local_epochs=1,
    codec=DEFAULT_RUN_CODEC,
    **DEFAULT_RUN_DGC,
    downlink_codec="topk(0.05) | quant(bits=8)",
)

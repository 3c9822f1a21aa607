"""Adapters as first-class deltas: LoRA factors, PEFT folders, extraction, merging and many-adapter deployment.

:class:`LoRADelta` holds per-layer factors ``A``, ``B`` with their rank and ``α``; ``materialize(base)`` gives the
full :class:`~deltaplane.delta.Delta`, ``factors()`` the factors as a ``Delta`` for codecs and aggregators.
:func:`load_peft` / :func:`save_peft` read and write PEFT adapter folders.
"""

from deltaplane.adapters.lora import LoRADelta, LoRALayer
from deltaplane.adapters.peft_format import from_peft_state, load_peft, peft_config, save_peft

__all__ = ["LoRADelta", "LoRALayer", "from_peft_state", "load_peft", "peft_config", "save_peft"]

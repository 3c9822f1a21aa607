"""Per-layer codec policy: choose a codec for each tensor by parameter name pattern, size or rank.

Example:
    >>> import torch, deltaplane as dp
    >>> policy = dp.get_codec(
    ...     "policy(rules='*.bias | *norm*: fp16; numel<1000: fp16; *: topk(0.01) | quant(bits=4)')"
    ... )
    >>> policy.select("encoder.norm.weight", torch.zeros(64)).spec
    'fp16'
    >>> policy.select("fc.weight", torch.zeros(100, 100)).spec
    'topk(ratio=0.01) | quant(bits=4, stochastic=false, chunk=512, scale=max)'
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from deltaplane.codecs.base import Codec, Encoded, decode_tree, get_codec, register_codec, split_lossless
from deltaplane.errors import CodecError, SpecError

__all__ = ["Policy"]

_OPS: dict[str, Callable[[int, int], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
# ASCII digits only, as the spec grammar: without re.ASCII, \d reads any script's digits ('numel<٣' was 3)
_COMPARE = re.compile(r"^(numel|ndim)\s*(<=|>=|==|!=|<|>)\s*(\d+)$", re.ASCII)
_GLOB = re.compile(r"^[\w.*?\[\]!\-/]+$")


def _atom(text: str) -> tuple[str, Callable[[str, Tensor], bool]]:
    """One condition: ``numel<4096``, ``ndim==1`` or a name glob such as ``*.bias``; returns (canonical, test)."""
    m = _COMPARE.match(text)
    if m:
        what, op, value = m.group(1), m.group(2), int(m.group(3))
        fn = _OPS[op]
        if what == "numel":
            return f"numel{op}{value}", lambda name, t: fn(t.numel(), value)
        return f"ndim{op}{value}", lambda name, t: fn(t.dim(), value)
    if not _GLOB.match(text):
        raise CodecError(
            f"policy: cannot read condition {text!r}; use a name glob like '*.bias', "
            "'numel<4096', 'numel>=100000' or 'ndim==1'"
        )
    return text, lambda name, t: fnmatch.fnmatchcase(name, text)


class _Rule:
    def __init__(self, when: str, codec: str) -> None:
        # 'a | b' in the condition means either; '&' means both (binds tighter): '*.weight & ndim==2 | *.bias'
        alternatives = []
        for alt in when.split("|"):
            atoms = [_atom(a.strip()) for a in alt.split("&")]
            alternatives.append(atoms)
        self.when = " | ".join(" & ".join(text for text, _ in alt) for alt in alternatives)
        self._alternatives = [[fn for _, fn in alt] for alt in alternatives]
        try:
            self.codec = get_codec(codec)
        except SpecError as exc:
            raise CodecError(f"policy: rule '{when}': {exc}") from exc
        if split_lossless(self.codec)[1] is not None or self.codec.selects_by_name:
            raise CodecError(
                f"policy: rule '{when}' uses '{self.codec.spec}'; a rule's codec cannot be a policy or end "
                "in a lossless stage (put zstd after the whole policy: 'policy(...) | zstd')"
            )

    def matches(self, name: str, t: Tensor) -> bool:
        return any(all(fn(name, t) for fn in alt) for alt in self._alternatives)


@register_codec
class Policy(Codec):
    """Pick each tensor's codec by rules: the first rule whose condition matches the tensor wins.

    ``rules`` is a ``;``-separated list of ``CONDITION: CODEC`` entries. A condition is a name glob
    (``*.bias``, ``encoder.*.attention.*``, matched with :func:`fnmatch.fnmatchcase`), a size test
    (``numel<4096``, ``numel>=1000000``) or a rank test (``ndim==1``), combined with ``&`` (and) and ``|``
    (or); ``*`` matches everything. A tensor no rule matches is an error, so end with a ``*`` rule. Each
    tensor's node in the wire format names the codec that encoded it, so the receiver decodes a policy
    payload without knowing the policy. Build one from a spec string, from Python pairs
    (:meth:`from_rules`) or from a config mapping (:meth:`from_config`, e.g. parsed YAML).
    """

    name = "policy"
    positional = ("rules",)
    selects_by_name = True

    def __init__(self, *, rules: str = "*: identity") -> None:
        if not isinstance(rules, str) or not rules.strip():
            raise CodecError(
                f"policy: rules must be a non-empty 'CONDITION: CODEC; ...' string. Found {rules!r}"
            )
        parsed = []
        for entry in rules.split(";"):
            if not entry.strip():
                continue
            when, sep, codec = entry.partition(":")
            if not sep or not when.strip() or not codec.strip():
                raise CodecError(f"policy: rule {entry.strip()!r} must read 'CONDITION: CODEC'")
            parsed.append(_Rule(when.strip(), codec.strip()))
        if not parsed:
            raise CodecError("policy: needs at least one rule")
        self._rules = parsed
        self.rules = "; ".join(f"{r.when}: {r.codec.spec}" for r in parsed)  # canonical

    @property
    def contractive(self) -> bool:
        return all(r.codec.contractive for r in self._rules)

    @classmethod
    def from_rules(cls, rules: Iterable[tuple[str, str | Codec]]) -> Policy:
        """``Policy.from_rules([("*.bias", "fp16"), ("*", "topk(0.01) | quant(bits=4)")])``."""
        parts = [f"{when}: {get_codec(codec).spec}" for when, codec in rules]
        return cls(rules="; ".join(parts))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Policy:
        """From a mapping such as parsed YAML::

        rules:
          - {match: "*.bias | *norm*", codec: fp16}
          - {match: "numel>=100000", codec: "topk(0.01) | quant(bits=4)"}
        default: "quant(bits=8)"
        """
        if not isinstance(config, Mapping):
            raise CodecError(
                f"policy config must be a mapping with 'rules' (and 'default'). Found {config!r}"
            )
        unknown = set(config) - {"rules", "default"}
        if unknown:
            raise CodecError(f"policy config: unknown keys {sorted(unknown)}; allowed: ['default', 'rules']")
        pairs: list[tuple[str, str | Codec]] = []
        for i, r in enumerate(config.get("rules") or []):
            if not isinstance(r, Mapping) or set(r) != {"match", "codec"}:
                raise CodecError(
                    f"policy config: rules[{i}] must have exactly 'match' and 'codec'. Found {r!r}"
                )
            pairs.append((str(r["match"]), str(r["codec"])))
        if config.get("default") is not None:
            pairs.append(("*", str(config["default"])))
        return cls.from_rules(pairs)

    def select(self, name: str, x: Tensor) -> Codec:
        """The codec for tensor ``name`` (first matching rule); :class:`CodecError` if none matches."""
        for rule in self._rules:
            if rule.matches(name, x):
                return rule.codec
        raise CodecError(
            f"policy: no rule matches tensor '{name}' {tuple(x.shape)}; end the rules with '*: CODEC'"
        )

    def encode(self, x: Tensor, rng: torch.Generator) -> Encoded:
        return self.select("", x).encode(x, rng)

    def encode_stateful(self, x: Tensor, rng: torch.Generator, state: dict[str, Any]) -> Encoded:
        return self.select("", x).encode_stateful(x, rng, state)

    def decode(self, e: Encoded) -> Tensor:
        return decode_tree(e)

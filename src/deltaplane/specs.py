"""The one spec grammar: ``name(value, key=value) | name ...``, shared by codecs, defences, attacks and prune
recipes, parsed here and nowhere else.

A codec pipeline (:func:`deltaplane.codecs.get_codec`), a defence (:func:`deltaplane.aggregation.parse_defense`),
an attack (:func:`deltaplane.engine.attacks.parse_attack`) and a prune recipe read their text with
:func:`parse_spec` or :func:`parse_one_spec`, so the comma, the quotes and the numbers mean the same in each, and a
malformed spec gets the same message (naming the character) wherever it is written. Reading a spec needs no torch:
this module depends on :mod:`deltaplane.errors` only, so a process that only checks a federation's settings does
not load what builds them.
"""

from __future__ import annotations

import math
import re

from deltaplane.errors import ConfigError, SpecError

__all__ = ["Scalar", "format_spec", "parse_one_spec", "parse_spec"]

#: a spec's value: what a parameter can hold
Scalar = int | float | bool | str

# ASCII only (re.ASCII): Python's \d, \w and \s also match other scripts' digits, letters and spaces, and int()
# and float() read those digits ('٨' is 8), so a spec that looks different would build the same codec and one
# that looks the same (a Cyrillic 'о' in 'topk') would not; outside quotes a spec is ASCII (docs/wire-format.md §5)
_TOKEN = re.compile(r"\s*(?:([A-Za-z_][\w.\-]*)|(\"[^\"]*\"|'[^']*')|(-?[\d.][\w.+\-]*)|(.))", re.ASCII)


def _format_value(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return v if re.fullmatch(r"[A-Za-z_][\w.\-]*", v, re.ASCII) else repr(v)


def format_spec(name: str, params: dict[str, Scalar]) -> str:
    """``format_spec("topk", {"ratio": 0.01}) == "topk(ratio=0.01)"``; no parentheses without params."""
    if not params:
        return name
    return f"{name}(" + ", ".join(f"{k}={_format_value(v)}" for k, v in params.items()) + ")"


#: a float as written in a spec: decimal digits with an optional point and exponent (no ``_``, hex, ``nan``)
_FLOAT = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


def _parse_value(tok: str, kind: str) -> Scalar:
    if kind == "str":
        return tok[1:-1]
    if kind == "ident":
        low = tok.lower()
        if low in ("true", "false"):
            return low == "true"
        return tok
    if re.fullmatch(r"-?\d+", tok, re.ASCII):
        # integers are 64-bit: a 400-digit parameter would overflow every float and tensor it reaches
        if len(tok) > 20 or not -(2**63) <= int(tok) < 2**63:
            raise SpecError(f"integer {tok[:24]}{'...' if len(tok) > 24 else ''} is out of the 64-bit range")
        return int(tok)
    if not _FLOAT.fullmatch(tok):
        # float() would also read '1_000' (as 1000.0), ' 1', 'nan' or 'infinity': none is a spec number
        raise SpecError(
            f"cannot read number {tok!r}; write an integer like 1000 or a float like 0.01 or 1e-3"
        )
    value = float(tok)
    if not math.isfinite(value):  # '1e999' reads as inf, which no parameter means
        raise SpecError(f"number {tok[:24]!r} is out of the float range (about ±1.8e308)")
    return value


class _Tokens:
    """A spec's tokens (kind, text, character position), read left to right; errors name the position."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.toks: list[tuple[str, str, int]] = []
        for m in _TOKEN.finditer(spec):
            group = m.lastindex or 4  # _TOKEN's groups: ident, string, number, any other character
            text = m.group(group)
            if group == 4 and not text.isascii():
                raise SpecError(
                    f"in codec spec {spec!r} at character {m.start(group) + 1}: non-ASCII character {text!r} "
                    f"(U+{ord(text):04X}); outside quotes a spec is written in ASCII (retype it)"
                )
            if group != 4 or text.strip():
                self.toks.append((("ident", "str", "num", "op")[group - 1], text, m.start(group)))
        self.i = 0

    def fail(self, message: str) -> SpecError:
        """``message`` about the current token (or the end), naming its position in the spec."""
        where = self.toks[self.i][2] if self.i < len(self.toks) else len(self.spec)
        return SpecError(f"in codec spec {self.spec!r} at character {where + 1}: {message}")

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        """The (kind, text) ``ahead`` tokens on, ``("end", "end of spec")`` past the last."""
        j = self.i + ahead
        return self.toks[j][:2] if j < len(self.toks) else ("end", "end of spec")

    def take(self, kind: str, value: str | None = None) -> str:
        got = self.peek()
        if got[0] != kind or (value is not None and got[1] != value):
            raise self.fail(f"expected {repr(value) if value else kind}, got {got[1]!r}")
        self.i += 1
        return got[1]

    def value(self) -> Scalar:
        kind, text = self.peek()
        if kind not in ("ident", "str", "num"):
            raise self.fail(f"expected a value, got {text!r}")
        try:
            out = _parse_value(text, kind)
        except SpecError as exc:
            raise self.fail(str(exc)) from None
        self.i += 1
        return out


def _parse_args(t: _Tokens) -> tuple[list[Scalar], dict[str, Scalar]]:
    """``value (',' value)* [',' kw] | kw`` up to (not including) ``)``: exactly one comma between two
    arguments, none trailing; positional values before keywords."""
    args: list[Scalar] = []
    kwargs: dict[str, Scalar] = {}
    if t.peek() == ("op", ")"):
        return args, kwargs
    while True:
        if t.peek()[0] == "ident" and t.peek(1) == ("op", "="):
            key = t.take("ident")
            t.i += 1  # '='
            if t.peek()[0] not in ("ident", "str", "num"):
                raise t.fail(f"missing value for '{key}'")
            if key in kwargs:
                raise t.fail(f"'{key}' given twice")
            kwargs[key] = t.value()
        else:
            if t.peek()[0] == "op":
                raise t.fail(f"unexpected {t.peek()[1]!r}")
            if kwargs:
                raise t.fail("positional value after keyword")
            args.append(t.value())
        if t.peek() == ("op", ")"):
            return args, kwargs
        if t.peek() != ("op", ","):
            raise t.fail(f"expected ',' or ')' after an argument, got {t.peek()[1]!r}")
        t.i += 1
        if t.peek() == ("op", ")"):
            raise t.fail("trailing ',' before ')'")


def parse_spec(spec: str) -> list[tuple[str, list[Scalar], dict[str, Scalar]]]:
    """Parse ``"a(1, x=2) | b"`` into ``[("a", [1], {"x": 2}), ("b", [], {})]``.

    The grammar (docs/wire-format.md §5): ``spec := stage ('|' stage)*``, ``stage := name ['(' [args] ')']``,
    ``args := value (',' value)* [',' kw] | kw``, ``kw := key '=' value (',' key '=' value)*``. Anything else
    (a missing or trailing comma, ``1_000``) is a :class:`~deltaplane.errors.SpecError` naming the position.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(
            f"empty codec spec {spec!r}; try e.g. 'quant(bits=8)' or 'topk(0.01) | quant(bits=8)'"
        )
    t = _Tokens(spec)
    stages: list[tuple[str, list[Scalar], dict[str, Scalar]]] = []
    while True:
        name = t.take("ident")
        args: list[Scalar] = []
        kwargs: dict[str, Scalar] = {}
        if t.peek() == ("op", "("):
            t.i += 1
            args, kwargs = _parse_args(t)
            t.take("op", ")")
        stages.append((name, args, kwargs))
        if t.peek()[0] == "end":
            return stages
        t.take("op", "|")


def parse_one_spec(
    text: str, *, label: str, noun: str, hint: str = ""
) -> tuple[str, list[Scalar], dict[str, Scalar]]:
    """The one stage of ``text`` for a spec that names exactly one thing (a defence, an attack, a prune method).

    ``label`` starts every message (``"defense spec 'x'"``), ``noun`` names the things in the plural, ``hint``
    ends a grammar error (the forms to write). A grammar error or a pipeline of several stages is a
    :class:`~deltaplane.errors.ConfigError`: these specs come from a run's settings, not from a codec.
    """
    try:
        stages = parse_spec(text)
    except SpecError as exc:
        raise ConfigError(f"{label}: {exc}{hint}") from None
    if len(stages) != 1:
        raise ConfigError(f"{label} names {len(stages)} {noun}; give exactly one")
    return stages[0]

"""The central value of the library: a :class:`Delta` is an ordered mapping ``name -> tensor`` of ``new - base``.

Devices produce deltas, codecs shrink them, aggregators combine them, mergers blend them and the registry ships
them. Every operation is strict: names, shapes and dtypes must match exactly, otherwise :class:`ShapeMismatch`
names the offending tensor — a silently broadcast or skipped tensor is how merged models go wrong unnoticed.

Boolean tensors (a causal or pruning mask kept as a buffer) have no subtraction: their change is the set of
values that flipped, ``new XOR base``, which applying flips back; such changes add and subtract by XOR.

A delta means something only against the base it was taken from. :func:`base_fingerprint` names a base by the
SHA-256 of its tensors; a delta that records it (``Delta.between(..., record_base=True)``, kept by
:meth:`Delta.save` / :meth:`Delta.load` under the file metadata key ``deltaplane.base_sha256``) refuses to be
applied to another base (:class:`~deltaplane.errors.BaseMismatch`) instead of producing garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import sys
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView

import torch
from torch import Tensor

from deltaplane.errors import BaseMismatch, ConfigError, DecodeError, InvalidUpdate, ShapeMismatch
from deltaplane.textfile import atomic_write_bytes

__all__ = [
    "BASE_SHA256_KEY",
    "Delta",
    "StateDict",
    "all_finite",
    "atomic_write_bytes",
    "base_fingerprint",
    "check_compatible",
    "first_non_finite",
    "is_base_fingerprint",
    "short_fingerprint",
]

StateDict = Mapping[str, Tensor]

#: Metadata key (safetensors file metadata, wire header ``meta``) under which a delta records its base's
#: :func:`base_fingerprint`.
BASE_SHA256_KEY = "deltaplane.base_sha256"
# domain separation: version 1 of the canonical encoding below; a change to the encoding changes this tag
_FINGERPRINT_TAG = b"deltaplane.base_sha256/v1\0"
_HEX = frozenset("0123456789abcdef")


def base_fingerprint(state: StateDict) -> str:
    """The SHA-256 (64 lowercase hex digits) of a state dict's canonical encoding: what names a base model.

    The encoding is fixed, so the fingerprint is the same in every process, on every machine and whatever
    the dict's order: a version tag, the tensor count, then for each name in sorted (code point) order its
    UTF-8 name, dtype name (``float32``), shape, byte length and raw values in little-endian byte order (a
    complex value as its real then imaginary part, each little-endian), C order (non-contiguous, conjugate and
    GPU tensors are copied to contiguous CPU memory first), every length and
    dimension as a little-endian fixed-width integer. The values are streamed into :mod:`hashlib` a tensor
    at a time (no per-element Python): about 60 ms for all-MiniLM-L6-v2's 22.7M float32 values, hashlib's own
    speed (``benchmarks/base_fingerprint.py``).

    Raises:
        TypeError: a key is not a string or a value not a tensor, or a tensor whose values its bytes do not
            give: a quantized tensor (its scale and zero point are not encoded: two different bases would share
            a fingerprint), a sparse one, or one on the ``meta`` device (no values at all). The message says
            what to convert it to.
    """
    h = hashlib.sha256(_FINGERPRINT_TAG)
    h.update(struct.pack("<Q", len(state)))
    for name in sorted(state):
        t = state[name]
        if not isinstance(name, str) or not isinstance(t, Tensor):
            raise TypeError(f"base_fingerprint takes a str -> torch.Tensor mapping, got {name!r}: {type(t)}")
        _check_fingerprintable(name, t)
        # a conjugate or negative view holds its values un-conjugated / un-negated in memory: resolve first
        t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
        raw_name = name.encode("utf-8", "surrogatepass")
        dtype = str(t.dtype).removeprefix("torch.").encode()
        size = t.numel() * t.element_size()
        h.update(struct.pack("<I", len(raw_name)) + raw_name + struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack(f"<I{t.dim()}QQ", t.dim(), *t.shape, size))
        if size:
            data = t.reshape(-1).view(torch.uint8)
            # the encoding is little-endian everywhere; a complex value is two numbers (real, imaginary), each
            # swapped in place: swapping the whole element would also swap the two parts
            word = t.element_size() // 2 if t.is_complex() else t.element_size()
            if sys.byteorder == "big" and word > 1:
                data = data.view(-1, word).flip(1).reshape(-1)
            h.update(data.numpy().data)  # the array's memoryview
    return h.hexdigest()


def _check_fingerprintable(name: str, t: Tensor) -> None:
    """Refuse a tensor whose raw bytes are not its values (see :func:`base_fingerprint`'s Raises)."""
    if t.is_quantized:
        why = (
            f"is quantized ({t.dtype}): its values depend on a scale and zero point the fingerprint does not "
            "encode; fingerprint the float base (t.dequantize())"
        )
    elif t.layout != torch.strided:
        why = f"is {str(t.layout).removeprefix('torch.')}: fingerprint its dense form (t.to_dense())"
    elif t.is_meta:
        why = "is on the meta device and holds no values: load the base's weights first"
    else:
        return
    raise TypeError(f"base_fingerprint: tensor {name!r} {why}")


def is_base_fingerprint(value: object) -> bool:
    """True if ``value`` is a fingerprint as :func:`base_fingerprint` writes it (64 lowercase hex digits):
    a file or payload recording anything else is malformed."""
    return isinstance(value, str) and len(value) == 64 and _HEX.issuperset(value)


def short_fingerprint(fingerprint: str) -> str:
    """The first 12 hex digits of a fingerprint, as messages show it (``sha256:1a2b3c4d5e6f``)."""
    return f"sha256:{fingerprint[:12]}"


def check_compatible(a: StateDict, b: StateDict, what: str = "state dicts") -> None:
    """Raise :class:`ShapeMismatch` unless ``a`` and ``b`` have the same names, shapes and dtypes."""
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise ShapeMismatch(
            f"{what} have different tensor names: only in first {missing[:5]}, only in second {extra[:5]}"
        )
    for name, t in a.items():
        u = b[name]
        if t.shape != u.shape:
            raise ShapeMismatch(f"tensor '{name}': shape {tuple(t.shape)} vs {tuple(u.shape)} in {what}")
        if t.dtype != u.dtype:
            raise ShapeMismatch(f"tensor '{name}': dtype {t.dtype} vs {u.dtype} in {what}")


def all_finite(t: Tensor) -> bool:
    """True if ``t`` holds no NaN or Inf (always true for integer tensors)."""
    return first_non_finite({"": t}) is None


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """The name of the first floating-point or complex tensor holding NaN or Inf (in either part of a complex
    value), or ``None`` if all are finite.

    Every update is checked several times on its way (device, wire, aggregator), so the common all-finite case
    costs one reduction per tensor and a single host sync: a sum is NaN/Inf whenever any element is (NaN and
    ±Inf propagate, Inf − Inf is NaN). Only if the total is not finite — a bad value, or a sum of huge finite
    values that overflowed — are the tensors checked one by one, exactly.
    """
    # a complex tensor is checked as its real and imaginary parts (nan+1j is not finite)
    floats = [
        (k, torch.view_as_real(v.detach().resolve_conj()) if v.is_complex() else v.detach())
        for k, v in tensors.items()
        if (v.is_floating_point() or v.is_complex()) and v.numel()
    ]
    if not floats:
        return None
    sums = [v.sum(dtype=torch.float32) for _, v in floats]
    if math.isfinite(float(sums[0] if len(sums) == 1 else torch.stack(sums).sum())):
        return None
    return next((k for k, v in floats if not bool(torch.isfinite(v).all())), None)


def _sub(a: Tensor, b: Tensor) -> Tensor:
    """``a - b``; for boolean tensors the values that differ (``a XOR b``: torch has no boolean subtraction)."""
    return torch.logical_xor(a, b) if a.dtype == torch.bool else a - b


def _add(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``; for boolean tensors ``a XOR b`` (a boolean change flips values; torch's ``+`` would OR, so a
    change that turns a value off could never be applied)."""
    return torch.logical_xor(a, b) if a.dtype == torch.bool else a + b


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with each one that shares memory with an earlier one copied: safetensors refuses to write a
    storage twice (tied weights, one tensor under two names), and a file holds every name's values anyway."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        out[k] = t.clone() if ptr and ptr in seen else t
        seen.add(ptr)
    return out


class Delta(Mapping[str, Tensor]):
    """An immutable-by-convention ordered mapping from parameter name to ``new - base`` tensor.

    ``Delta(other_delta)`` keeps ``other_delta``'s base record (:attr:`base_sha256`) unless ``base_sha256`` is
    given; ``other_delta.with_base_sha256(None)`` drops it.

    Example:
        >>> import torch, deltaplane as dp
        >>> base = {"w": torch.zeros(2, 2)}
        >>> new = {"w": torch.ones(2, 2)}
        >>> d = dp.Delta.between(base, new)
        >>> d.apply(base)["w"].sum().item()
        4.0
        >>> round((0.5 * d).norm(), 3)
        1.0
    """

    __slots__ = ("_base_sha256", "_finite_at", "_tensors")

    def __init__(
        self, tensors: Mapping[str, Tensor] | None = None, *, base_sha256: str | None = None
    ) -> None:
        items: dict[str, Tensor] = {}
        for name, t in (tensors or {}).items():
            if not isinstance(name, str):
                raise TypeError(f"Delta keys must be str, got {type(name).__name__}")
            if not isinstance(t, Tensor):
                raise TypeError(f"Delta value for '{name}' must be a torch.Tensor, got {type(t).__name__}")
            items[name] = t
        if base_sha256 is None and isinstance(tensors, Delta):  # a copy keeps what it is a change from
            base_sha256 = tensors._base_sha256
        if base_sha256 is not None and not is_base_fingerprint(base_sha256):
            raise InvalidUpdate(
                f"base_sha256 must be 64 lowercase hex digits (what base_fingerprint returns), got {base_sha256!r:.80}"
            )
        self._tensors = items
        self._base_sha256: str | None = base_sha256
        # the tensors' version counters when they were last found finite (see check_finite)
        self._finite_at: tuple[int, ...] | None = None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def between(cls, base: StateDict, new: StateDict, *, record_base: bool = False) -> Delta:
        """The change that turns ``base`` into ``new`` (``new - base`` per tensor, in the base's dtype; for a
        boolean tensor the values that flipped, ``new XOR base``).

        ``record_base=True`` records the base's :func:`base_fingerprint` in the delta (:attr:`base_sha256`),
        which :meth:`save` keeps and :meth:`apply` checks. Do it for a delta that is saved or sent to be
        applied later; it costs one pass over the base's bytes (~60 ms for 22.7M float32 values). It is off
        by default because the federated round computes a delta per client per round against a base the
        session already names by version, where hashing would only add time.
        """
        check_compatible(base, new, "base and new")
        return cls(
            {k: _sub(new[k].detach(), base[k].detach()) for k in base},
            base_sha256=base_fingerprint(base) if record_base else None,
        )

    @property
    def base_sha256(self) -> str | None:
        """The :func:`base_fingerprint` of the base this delta was taken against, or ``None`` if not recorded."""
        return self._base_sha256

    def with_base_sha256(self, fingerprint: str | None) -> Delta:
        """This delta (the same tensors, not copied) recording ``fingerprint`` as its base (``None``: none)."""
        out = Delta(self._tensors, base_sha256=fingerprint)
        out._finite_at = self._finite_at
        return out

    @classmethod
    def zeros_like(cls, like: StateDict) -> Delta:
        """A delta of zeros with the names, shapes and dtypes of ``like``."""
        return cls({k: torch.zeros_like(v) for k, v in like.items()})

    # -- Mapping protocol ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    # the dict's own views, not Mapping's generic ones (which call __getitem__ per key, in Python): a server
    # compares and iterates every upload's names several times (check_compatible, aggregators, codecs)
    def keys(self) -> KeysView[str]:
        return self._tensors.keys()

    def values(self) -> ValuesView[Tensor]:
        return self._tensors.values()

    def items(self) -> ItemsView[str, Tensor]:
        return self._tensors.items()

    def __repr__(self) -> str:
        return f"Delta({len(self)} tensors, {self.numel()} values, norm={self.norm():.4g})"

    # -- application --------------------------------------------------------------------------------
    def apply(self, base: StateDict, scale: float = 1.0, *, check_base: bool = True) -> dict[str, Tensor]:
        """Return ``base + scale * delta`` as a new state dict (``base`` is not modified).

        If the delta records its base (:attr:`base_sha256`) and ``check_base`` is true, ``base`` is
        fingerprinted first and a different base is refused with :class:`~deltaplane.errors.BaseMismatch`;
        ``check_base=False`` applies it anyway. A delta that records no base applies to any compatible base.
        """
        check_compatible(base, self, "base and delta")
        if check_base and self._base_sha256 is not None:
            actual = base_fingerprint(base)
            if actual != self._base_sha256:
                raise BaseMismatch(
                    f"delta was taken against base {short_fingerprint(self._base_sha256)}, but the base given "
                    f"is {short_fingerprint(actual)}; apply it to the base it was made from, or override with "
                    "check_base=False (CLI: --allow-other-base) if the other base is intended"
                )
        out: dict[str, Tensor] = {}
        for k, b in base.items():
            d = self._tensors[k]
            if b.is_floating_point():
                out[k] = b.detach() + d if scale == 1.0 else b.detach() + scale * d
            else:  # integer and boolean buffers (counters, masks) take the change as is
                out[k] = _add(b.detach(), d)
        return out

    # -- arithmetic ---------------------------------------------------------------------------------
    # The base record follows the maths: a scaled (or mapped) delta and a sum of deltas taken against the same
    # base still apply to that base; a difference of two deltas, a negated delta (new -> base) or a sum of
    # deltas against different bases applies to some other model, so it records none.
    def _zip(self, other: Delta, op: Callable[[Tensor, Tensor], Tensor], base_sha256: str | None) -> Delta:
        check_compatible(self, other, "deltas")
        return Delta({k: op(v, other[k]) for k, v in self.items()}, base_sha256=base_sha256)

    def __add__(self, other: Delta) -> Delta:
        if not isinstance(other, Delta):
            return NotImplemented
        same = self._base_sha256 if self._base_sha256 == other._base_sha256 else None
        return self._zip(other, _add, same)

    def __sub__(self, other: Delta) -> Delta:
        if not isinstance(other, Delta):
            return NotImplemented
        return self._zip(other, _sub, None)

    def __neg__(self) -> Delta:
        # a flip undoes itself: a boolean change is its own negation (torch refuses -bool)
        return Delta({k: v if v.dtype == torch.bool else -v for k, v in self.items()})

    def __mul__(self, scalar: float) -> Delta:
        if not isinstance(scalar, int | float):
            return NotImplemented
        return Delta(
            {k: v * scalar if v.is_floating_point() else v for k, v in self.items()},
            base_sha256=self._base_sha256,
        )

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> Delta:
        if not isinstance(scalar, int | float):
            return NotImplemented
        return self * (1.0 / scalar)

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> Delta:
        """A new delta with ``fn(name, tensor)`` applied to every tensor (recording the same base)."""
        return Delta({k: fn(k, v) for k, v in self.items()}, base_sha256=self._base_sha256)

    # -- measures -----------------------------------------------------------------------------------
    def norm(self) -> float:
        """Global L2 norm over all floating-point tensors (what clipping and DP bound)."""
        sq = sum(float(v.double().pow(2).sum()) for v in self.values() if v.is_floating_point())
        return math.sqrt(sq)

    def numel(self) -> int:
        """Total number of values."""
        return sum(v.numel() for v in self.values())

    @property
    def nbytes(self) -> int:
        """Bytes the raw tensors occupy (the uncompressed size that compression ratios are measured against)."""
        return sum(v.numel() * v.element_size() for v in self.values())

    def is_finite(self) -> bool:
        """True if no floating-point or complex tensor holds NaN or Inf."""
        try:
            self.check_finite()
        except InvalidUpdate:
            return False
        return True

    def check_finite(self) -> None:
        """Raise :class:`InvalidUpdate` naming the first tensor holding NaN or Inf.

        An update is checked at every layer it passes (device, wire, validation, aggregator); a positive answer
        is remembered together with the tensors' version counters, which every in-place change bumps, so the
        later checks are free and a tensor modified since is checked again.
        """
        versions = tuple(t._version for t in self._tensors.values())
        if versions == self._finite_at:
            return
        bad = first_non_finite(self)
        if bad is not None:
            raise InvalidUpdate(f"tensor '{bad}' holds NaN or Inf values; refusing the update")
        self._finite_at = versions

    def mark_finite(self) -> None:
        """Record that every tensor is finite as they are now, for a caller that has just checked them all
        another way (a batch decoder's one reduction over many updates): :meth:`check_finite` is then free
        until a tensor changes in place."""
        self._finite_at = tuple(t._version for t in self._tensors.values())

    def allclose(self, other: StateDict, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """True if ``other`` has the same layout and every tensor is close."""
        try:
            check_compatible(self, other)
        except ShapeMismatch:
            return False
        return all(torch.allclose(v, other[k], rtol=rtol, atol=atol) for k, v in self.items())

    # -- flat view (for aggregation / batched codecs) -----------------------------------------------
    def flatten(self) -> Tensor:
        """All floating-point tensors concatenated into one float32 vector, in key order."""
        parts = [v.reshape(-1).float() for v in self.values() if v.is_floating_point()]
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, flat: Tensor) -> Delta:
        """Inverse of :meth:`flatten`: a delta shaped like ``self`` holding the values of ``flat``."""
        n = sum(v.numel() for v in self.values() if v.is_floating_point())
        if flat.dim() != 1 or flat.numel() != n:
            raise ShapeMismatch(f"flat vector has shape {tuple(flat.shape)}, expected ({n},)")
        out, i = {}, 0
        for k, v in self.items():
            if v.is_floating_point():
                out[k] = flat[i : i + v.numel()].reshape(v.shape).to(v.dtype)
                i += v.numel()
            else:
                out[k] = v
        return Delta(out)

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> None:
        """Write the delta as safetensors, atomically (temp file + rename).

        A recorded base (:attr:`base_sha256`) is written under the metadata key ``deltaplane.base_sha256``,
        which ``metadata`` may not set to anything else.
        """
        from safetensors.torch import save

        given = (metadata or {}).get(BASE_SHA256_KEY)
        if given is not None and given != self._base_sha256:
            raise InvalidUpdate(
                f"metadata {BASE_SHA256_KEY!r} is reserved for the delta's own base record "
                f"({self._base_sha256}); build the delta with record_base=True or with_base_sha256() instead"
            )
        tensors = _unshared({k: v.detach().contiguous().cpu() for k, v in self.items()})
        # safetensors sorts names; the order is kept in the metadata so a delta loads back identically
        meta = dict(metadata or {}) | {
            "format": "deltaplane.delta",
            "deltaplane.order": json.dumps(list(self)),
        }
        if self._base_sha256 is not None:
            meta[BASE_SHA256_KEY] = self._base_sha256
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Delta:
        """Read a delta written by :meth:`save` (or any safetensors file of tensors), with its base record.

        A file whose ``deltaplane.base_sha256`` is not a fingerprint is refused (:class:`DecodeError`): a
        damaged record must not turn into "no record" and silently skip the base check. A path that is not a
        regular file (a FIFO, a device, a socket) is refused (:class:`ConfigError`) before it is opened:
        safetensors memory-maps the file, so a FIFO with no writer would block the reader for good and one
        with a writer cannot be mapped.
        """
        from safetensors import SafetensorError, safe_open

        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise DecodeError(f"cannot read delta from {path}: {exc.strerror or exc}") from exc
        try:  # the safetensors library takes its path as UTF-8 text only
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"{os.fsdecode(path)!r}: the safetensors library cannot open a path that is not UTF-8; rename the "
                "file (or a folder above it) to a UTF-8 name"
            ) from None
        if not stat.S_ISREG(mode):
            kind = (
                "FIFO (named pipe)"
                if stat.S_ISFIFO(mode)
                else "directory"
                if stat.S_ISDIR(mode)
                else "device or socket"
            )
            raise ConfigError(
                f"{path}: a safetensors file must be a regular file, not a {kind}; save it to a file and give "
                "that file's path"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                file_meta = f.metadata() or {}
                recorded = file_meta.get(BASE_SHA256_KEY)
                if recorded is not None and not is_base_fingerprint(recorded):
                    raise DecodeError(
                        f"its {BASE_SHA256_KEY!r} is not a SHA-256 fingerprint "
                        f"(64 lowercase hex digits): {recorded!r:.80}"
                    )
                order = json.loads(file_meta.get("deltaplane.order", "null"))
                # metadata any writer can set: used only if it lists exactly the file's names
                if not (isinstance(order, list) and all(isinstance(k, str) for k in order)):
                    order = names
                if sorted(order) != sorted(names):
                    order = names
                return cls({k: f.get_tensor(k) for k in order}, base_sha256=recorded)
        except (SafetensorError, OSError, ValueError) as exc:
            raise DecodeError(f"cannot read delta from {path}: {exc}") from exc

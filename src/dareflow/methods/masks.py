"""Deterministic DARE drop masks.

The mask of tensor T of model k depends only on ``(run seed, model id, tensor name)``
(through :func:`derive_key`), the number of elements and the drop rate. It never
touches torch's global RNG, so it is the same whatever the thread count, the worker
count, the order in which tensors are merged, the device or the machine. That is
what makes a per-layer merge task pure, cacheable and resumable.

Generator: Philox-4x32-10 (Salmon et al., SC 2011; the counter-based generator of
Random123, cuRAND and PyTorch's CUDA RNG), checked against Random123's known-answer
vectors. The 128-bit key's low 64 bits are the Philox key; its high 64 bits are
counter words 2-3, and the element group ``j = i // 4`` is counter words 0-1.
Element ``i`` takes output word ``i % 4`` and is kept iff that uint32 is ``>= t``
with the integer threshold ``t = round(p * 2**32)``, so P(drop) = t / 2**32
(resolution 2**-32, never a bf16/fp16 uniform). Any element range is computed
directly (no stream to advance), on the CPU by a compiled kernel
(:func:`kernels.philox_fill`) and on accelerators by the same rounds in torch
integer ops (:func:`philox_draws_torch`), bit for bit the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from dareflow.methods.kernels import philox_fill

__all__ = [
    "KEY_BITS",
    "MaskStream",
    "derive_key",
    "drop_threshold",
    "keep_mask",
    "philox_draws_torch",
    "philox_words",
]

#: Width of the key returned by :func:`derive_key` (the Philox key and counter
#: words 2-3, 64 bits each).
KEY_BITS = 128

_KEY_DOMAIN = b"dareflow/merge_math/keep_mask/v1"
_UINT32_LEVELS = 2**32


def _field(value: bytes) -> bytes:
    # Length prefix: ("ab", "c") and ("a", "bc") must never hash alike.
    return len(value).to_bytes(8, "little") + value


def derive_key(seed: int, model_id: str, tensor_name: str) -> int:
    """Derives the 128-bit mask key of one tensor of one model.

    BLAKE2b (16-byte digest) over a domain tag and the three values, each
    length-prefixed, so distinct triples never share an encoding.

    Args:
        seed: The run seed (any Python int, negative allowed).
        model_id: The fine-tuned model's id as written in the config.
        tensor_name: The checkpoint tensor name, e.g.
            ``"model.layers.3.mlp.up_proj.weight"``.

    Returns:
        An int in ``[0, 2**128)``, the mask key for :func:`keep_mask`.

    Raises:
        TypeError: If ``seed`` is not an int or a name is not a str.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    for label, value in (("model_id", model_id), ("tensor_name", tensor_name)):
        if not isinstance(value, str):
            raise TypeError(f"{label} must be a str, got {value!r} ({type(value).__name__})")
    h = hashlib.blake2b(digest_size=KEY_BITS // 8)
    h.update(_field(_KEY_DOMAIN))
    h.update(_field(str(seed).encode("ascii")))
    h.update(_field(model_id.encode("utf-8")))
    h.update(_field(tensor_name.encode("utf-8")))
    return int.from_bytes(h.digest(), "little")


def check_drop_rate(drop_rate: float, what: str = "drop_rate") -> float:
    """Validates a drop rate and returns it as a float.

    Raises:
        TypeError: If it is not a real number.
        ValueError: If it is outside [0, 1] (or NaN).
    """
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
        raise TypeError(f"{what} must be a number in [0, 1], got {drop_rate!r}")
    p = float(drop_rate)
    if not (0.0 <= p <= 1.0):  # also rejects NaN
        raise ValueError(
            f"{what} must be in [0, 1], got {drop_rate!r} "
            "(p is the fraction of delta parameters dropped; density = 1 - p)"
        )
    return p


def drop_threshold(drop_rate: float) -> int:
    """The integer threshold ``t = round(p * 2**32)``: uint32 draws ``< t`` are dropped."""
    p = check_drop_rate(drop_rate)
    return min(_UINT32_LEVELS, max(0, round(p * _UINT32_LEVELS)))


def philox_words(key: int) -> tuple[int, int, int, int]:
    """The mask key as Philox words ``(k0, k1, n0, n1)``: key, then counter words 2-3."""
    return tuple((key >> shift) & 0xFFFFFFFF for shift in (0, 32, 64, 96))  # type: ignore[return-value]


# the Philox-4x32 multipliers split in 16-bit halves: torch has no unsigned 64-bit
# multiply, and a 32x16-bit product fits in int64 without overflow
_MULS = ((0xD2511F53 >> 16, 0xD2511F53 & 0xFFFF), (0xCD9E8D57 >> 16, 0xCD9E8D57 & 0xFFFF))
_BUMPS = (0x9E3779B9, 0xBB67AE85)
_M32 = 0xFFFFFFFF


def _mulhilo(value: torch.Tensor, halves: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    high_half, low_half = halves
    low = value * low_half  # < 2**48
    high = value * high_half  # < 2**48
    hi = (high + (low >> 16)) >> 16
    lo = (((high & 0xFFFF) << 16) + low) & _M32
    return hi, lo


def philox_draws_torch(key: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """The uint32 draws of flat elements ``[start, stop)`` (as int64), computed on ``device``.

    The same values as :func:`kernels.philox_fill`, with torch integer ops, so masks
    are drawn where the tensors live (a GPU merge never waits on the CPU for them).
    """
    k0, k1, n0, n1 = philox_words(key)
    first, last = start // 4, (stop + 3) // 4
    j = torch.arange(first, last, dtype=torch.int64, device=device)
    c0, c1 = j & _M32, j >> 32
    c2, c3 = torch.full_like(j, n0), torch.full_like(j, n1)
    a, b = k0, k1
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _MULS[0])
        hi1, lo1 = _mulhilo(c2, _MULS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ a, lo1, hi0 ^ c3 ^ b, lo0
        a = (a + _BUMPS[0]) & _M32
        b = (b + _BUMPS[1]) & _M32
    words = torch.stack([c0, c1, c2, c3], dim=1).reshape(-1)
    return words[start - 4 * first : stop - 4 * first]


#: Draws per call of the compiled generator when a whole mask is built (bounds the
#: temporary uint32 buffer of :func:`keep_mask` to 4 MiB).
_FILL_ELEMENTS = 1 << 20


class MaskStream:
    """Keep-mask blocks of one tensor, any element range, in any order.

    ``block(start, stop)`` gives exactly ``keep_mask(...).flatten()[start:stop]``
    without drawing the rest (counter-based: element ``i``'s draw depends only on the
    key and ``i``).
    """

    def __init__(self, key: int, drop_rate: float) -> None:
        if isinstance(key, bool) or not isinstance(key, int) or not (0 <= key < 2**KEY_BITS):
            raise ValueError(
                f"key must be an int in [0, 2**{KEY_BITS}) (see derive_key), got {key!r}"
            )
        self.key = key
        self.words = philox_words(key)
        self.threshold = drop_threshold(drop_rate)

    def draws(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """The uint32 draws of flat elements ``[start, stop)`` (kept iff ``>= threshold``).

        Args:
            start, stop: Flat element range, ``0 <= start <= stop``.
            out: Optional uint32 buffer of at least ``stop - start`` elements.
        """
        if not 0 <= start <= stop:
            raise ValueError(f"mask range must satisfy 0 <= start <= stop, got [{start}, {stop})")
        values = np.empty(stop - start, dtype=np.uint32) if out is None else out[: stop - start]
        philox_fill(values, start, *self.words)
        return values

    def block(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """The keep mask (``numpy.bool_``, True = kept) of flat elements ``[start, stop)``.

        Args:
            start, stop: Flat element range, ``0 <= start <= stop``.
            out: Optional bool buffer of at least ``stop - start`` elements.
        """
        count = stop - start
        keep = np.empty(count, dtype=np.bool_) if out is None else out[:count]
        if self.threshold == 0:
            keep.fill(True)
            return keep
        if self.threshold == _UINT32_LEVELS:
            keep.fill(False)
            return keep
        buffer = np.empty(min(count, _FILL_ELEMENTS), dtype=np.uint32)
        for offset in range(0, count, _FILL_ELEMENTS):
            piece = min(count - offset, _FILL_ELEMENTS)
            values = self.draws(start + offset, start + offset + piece, out=buffer)
            np.greater_equal(values, np.uint32(self.threshold), out=keep[offset:offset + piece])
        return keep

    def keep_on(self, device: torch.device, start: int, stop: int) -> torch.Tensor:
        """The keep mask of ``[start, stop)`` as float32 1/0, computed on ``device``."""
        count = stop - start
        if self.threshold == 0:
            return torch.ones(count, dtype=torch.float32, device=device)
        if self.threshold == _UINT32_LEVELS:
            return torch.zeros(count, dtype=torch.float32, device=device)
        draws = philox_draws_torch(self.key, start, stop, device)
        return (draws >= self.threshold).to(torch.float32)


def _check_shape(shape: Sequence[int] | torch.Size) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative sizes, got {shape!r}")
    return dims


def keep_mask(shape: Sequence[int] | torch.Size, drop_rate: float, key: int) -> torch.Tensor:
    """Draws the DARE keep mask ``1 - m`` with ``m ~ Bernoulli(p)`` per element.

    Deterministic: depends only on ``(key, number of elements, drop_rate)`` and the
    row-major element order; never on torch's RNG, threads or call order.

    Args:
        shape: The tensor shape.
        drop_rate: p in [0, 1], the probability of dropping each element.
            p = 0 keeps everything without drawing; p = 1 drops everything.
        key: The 128-bit key from :func:`derive_key`.

    Returns:
        A ``torch.bool`` tensor of ``shape``; True where the delta is kept.

    Raises:
        ValueError: If ``drop_rate`` is outside [0, 1], ``key`` is outside
            ``[0, 2**128)`` or ``shape`` is not a shape.
    """
    dims = _check_shape(shape)
    threshold = drop_threshold(drop_rate)
    if isinstance(key, bool) or not isinstance(key, int) or not (0 <= key < 2**KEY_BITS):
        raise ValueError(f"key must be an int in [0, 2**{KEY_BITS}) (see derive_key), got {key!r}")
    numel = math.prod(dims)
    if threshold == 0:
        return torch.ones(dims, dtype=torch.bool)
    if threshold == _UINT32_LEVELS:
        return torch.zeros(dims, dtype=torch.bool)
    keep = MaskStream(key, drop_rate).block(0, numel)
    return torch.from_numpy(keep).reshape(dims)

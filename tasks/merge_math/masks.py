"""Deterministic DARE drop masks.

The mask of tensor T of model k depends only on ``(run seed, model id, tensor name)``
(through :func:`derive_key`), the number of elements and the drop rate. It never
touches torch's global RNG, so it is the same whatever the thread count, the worker
count, the order in which tensors are merged or the machine. That is what makes a
per-layer merge task pure, cacheable and resumable.

Generator: numpy's Philox-4x64 counter-based bit generator, keyed by the 128-bit
key, read through ``random_raw`` (a fixed algorithm; numpy keeps bit-generator
streams stable, unlike ``Generator`` methods). Each uint64 draw gives two uint32
values (low half first); element ``i`` is kept iff its uint32 is ``>= t`` with the
integer threshold ``t = round(p * 2**32)``, so P(drop) = t / 2**32 (resolution
2**-32, never a bf16/fp16 uniform).

Elements are drawn in chunks of :data:`CHUNK_ELEMENTS`; chunk ``c`` uses a fresh
Philox with counter ``c << 192`` (chunk index in the top counter word), so chunks
are independent streams and a later optimisation can fill them in parallel
without changing a single bit. The result depends on nothing but that constant.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "KEY_BITS",
    "MaskStream",
    "derive_key",
    "drop_threshold",
    "keep_mask",
]

#: Elements per independently keyed chunk. Changing it changes every mask:
#: bump the code version of cached merge outputs if you ever do.
CHUNK_ELEMENTS = 2**22

#: Width of the key returned by :func:`derive_key` (Philox takes a 128-bit key).
KEY_BITS = 128

_KEY_DOMAIN = b"dareflow/merge_math/keep_mask/v1"
_UINT32_LEVELS = 2**32
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


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
        An int in ``[0, 2**128)``, the Philox key for :func:`keep_mask`.

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


def _uint32_stream(key: int, chunk: int, count: int) -> np.ndarray:
    """``count`` uint32 values of chunk ``chunk``: low then high half of each uint64."""
    return _uint32_values(np.random.Philox(key=key, counter=chunk << 192), count)


def _uint32_values(bit_generator: np.random.Philox, count: int) -> np.ndarray:
    """The next ``count`` uint32 values of ``bit_generator`` (``ceil(count / 2)`` draws)."""
    raw = bit_generator.random_raw((count + 1) // 2)
    if sys.byteorder == "little":
        values = raw.view(np.uint32)
    else:  # same values, spelled out: element 2i = low word, 2i+1 = high word
        values = np.stack([(raw & _LOW32), (raw >> _SHIFT32)], axis=1).astype(np.uint32).ravel()
    return values[:count]


#: uint32 values drawn per ``random_raw`` call when filling a mask: one call for a
#: whole 2**22-element chunk is ~8x slower here than calls of this size (a fresh 16 MB
#: output array per call), and the stream is the same either way.
_DRAW_ELEMENTS = 1 << 16


class MaskStream:
    """Keep-mask blocks of one tensor, any element range, in any order.

    ``block(start, stop)`` gives exactly ``keep_mask(...).flatten()[start:stop]``
    without drawing the rest: element ``i`` lies in chunk ``i // CHUNK_ELEMENTS`` at
    offset ``o``; its uint32 is half of uint64 draw ``o // 2`` of that chunk's Philox,
    and Philox counter ``(chunk << 192) + j`` starts at draw ``4 j``. Consecutive
    blocks reuse one generator (creating one costs ~30 us).

    Not thread-safe: use one stream per thread.
    """

    def __init__(self, key: int, drop_rate: float) -> None:
        if isinstance(key, bool) or not isinstance(key, int) or not (0 <= key < 2**KEY_BITS):
            raise ValueError(
                f"key must be an int in [0, 2**{KEY_BITS}) (see derive_key), got {key!r}"
            )
        self.key = key
        self.threshold = drop_threshold(drop_rate)
        self._t = np.uint32(min(self.threshold, _UINT32_LEVELS - 1))
        self._generator: np.random.Philox | None = None
        self._next = -1  # element index the generator's next draw starts at

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
        position = start
        while position < stop:
            chunk, offset = divmod(position, CHUNK_ELEMENTS)
            end = min(stop, (chunk + 1) * CHUNK_ELEMENTS)
            self._seek(chunk, offset)
            done = position - start
            while position < end:
                step = min(end - position, _DRAW_ELEMENTS)
                values = _uint32_values(self._generator, step)
                np.greater_equal(values, self._t, out=keep[done:done + step])
                position += step
                done += step
            # an odd step consumed half a draw: the stream cannot continue from here
            self._next = position if position % 2 == 0 else -1
        return keep

    def _seek(self, chunk: int, offset: int) -> None:
        if self._generator is not None and self._next == chunk * CHUNK_ELEMENTS + offset \
                and offset != 0:
            return
        if offset % 2:  # would start on the high half of a draw
            raise ValueError(
                f"mask blocks must start at an even offset within a chunk, got element "
                f"{chunk * CHUNK_ELEMENTS + offset}"
            )
        draw = offset // 2  # element offset -> uint64 draw (two elements per draw)
        self._generator = np.random.Philox(key=self.key, counter=(chunk << 192) + draw // 4)
        skip = draw % 4
        if skip:
            self._generator.random_raw(skip)


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

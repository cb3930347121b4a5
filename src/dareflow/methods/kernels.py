"""Compiled CPU kernels: the mask generator, the magnitude histograms, and a merge's
final pass (DARE, magnitude selection, weighted sum or TIES) in one pass per block.

Compiled with numba (``cache=True``: the first call in a fresh checkout compiles and
stores the machine code under ``__pycache__``; later processes load it). ``nogil``
lets the unit workers' threads run kernels at the same time.

Every kernel computes exactly what the torch path computes, element by element:
float32 IEEE operations (no fast-math, no fused multiply-add), a dropped delta is
``+0``, and the L1 sums follow one fixed order (:func:`abs_sum`), which
:func:`sparsify.l1_norm` uses too. Tests compare the blockwise merge with the
reference path byte for byte.

Masks: ``keep = draw >= threshold`` on the uint32 draws of :func:`philox_fill`
(the generator of :mod:`masks`).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "DIVIDE",
    "KEEP",
    "L1_LANES",
    "L1_STATE",
    "MULTIPLY",
    "abs_sum",
    "bf16_delta",
    "bf16_widen",
    "bucket_histogram",
    "dare_apply",
    "dare_l1_pass",
    "magnitude_histogram",
    "philox_fill",
    "warm_up",
]

#: Partial sums of :func:`abs_sum`: element ``i`` of a block goes to lane ``i % 8``.
L1_LANES = 8

_jit = numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")

# Philox-4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2,
# 3", SC 2011; the Random123 library): round multipliers and Weyl key increments.
_U64 = np.uint64
_M32 = _U64(0xFFFFFFFF)
_MUL0 = _U64(0xD2511F53)
_MUL1 = _U64(0xCD9E8D57)
_BUMP0 = _U64(0x9E3779B9)
_BUMP1 = _U64(0xBB67AE85)
_ROUNDS = 10


@numba.njit(cache=True, nogil=True, inline="always")
def _philox(j, k0, k1, n0, n1):
    """Philox-4x32-10 of counter ``(j mod 2**32, j >> 32, n0, n1)`` under key ``(k0, k1)``.

    All values are uint64 holding 32-bit words; returns the four output words.
    """
    c0 = j & _M32
    c1 = j >> _U64(32)
    c2 = n0
    c3 = n1
    a = k0
    b = k1
    for _ in range(_ROUNDS):
        # the masks tell the compiler both factors fit 32 bits (one vpmuludq each)
        p0 = _MUL0 * (c0 & _M32)
        p1 = _MUL1 * (c2 & _M32)
        c0, c1, c2, c3 = ((p1 >> _U64(32)) ^ c1 ^ a, p1 & _M32,
                          (p0 >> _U64(32)) ^ c3 ^ b, p0 & _M32)
        a = (a + _BUMP0) & _M32
        b = (b + _BUMP1) & _M32
    return c0, c1, c2, c3


@_jit
def _philox_words(w0, w1, w2, w3, count, j0, k0, k1, n0, n1):
    """``w_r[g]`` = word ``r`` of :func:`_philox` at counter ``j0 + g``, ``g < count``.

    One array per word (structure of arrays): the loop over counters is a plain loop
    the compiler vectorises (four counters per AVX2 register, ~0.6 ns per word on the
    benchmark machine, against ~1.1 ns when each counter's four words are stored next
    to each other).
    """
    for g in range(count):
        c0, c1, c2, c3 = _philox(j0 + _U64(g), k0, k1, n0, n1)
        w0[g] = np.uint32(c0)
        w1[g] = np.uint32(c1)
        w2[g] = np.uint32(c2)
        w3[g] = np.uint32(c3)


#: Elements per inner step of :func:`dare_l1_pass` and :func:`merge_block`
#: (their buffers stay in L1); a multiple of 8.
_SUB_BLOCK = 1024

#: Counters per step of :func:`philox_fill` (its word buffer stays in L1).
_PHILOX_STEP = 512


@_jit
def philox_fill(out, first, k0, k1, n0, n1):
    """``out[i]`` = the uint32 draw of flat element ``first + i``.

    Element ``e`` takes word ``e % 4`` of :func:`_philox` at counter ``j = e // 4``
    (so any range is computed directly, with no stream to seek).

    Args:
        out: uint32 array, filled.
        first: flat index of ``out[0]`` (≥ 0).
        k0, k1: the key words; n0, n1: counter words 2 and 3 (each < 2**32).
    """
    _philox_into(out, first, k0, k1, n0, n1, np.empty((4, _PHILOX_STEP), dtype=np.uint32))


@_jit
def _philox_into(out, first, k0, k1, n0, n1, words):
    """:func:`philox_fill` with its scratch ``words`` (uint32 ``(4, _PHILOX_STEP)``)."""
    n = out.shape[0]
    if n == 0:
        return
    k0 = _U64(k0)
    k1 = _U64(k1)
    n0 = _U64(n0)
    n1 = _U64(n1)
    # the counters of elements first ... first + n - 1, whole groups of four
    j_first = first // 4
    j_stop = (first + n + 3) // 4
    w0, w1, w2, w3 = words[0], words[1], words[2], words[3]
    for j in range(j_first, j_stop, _PHILOX_STEP):
        count = min(_PHILOX_STEP, j_stop - j)
        _philox_words(w0, w1, w2, w3, count, _U64(j), k0, k1, n0, n1)
        # element 4j + 4g + r lands at out[base + 4g + r] when inside the range
        base = 4 * j - first
        lo = 1 if base < 0 else 0  # only the range's first group can start before it
        hi = min(count, (n - base) // 4)  # groups wholly inside
        if hi > lo:
            # a view from the first whole group: unsigned indices (no wraparound
            # checks in the loop) and a stride-4 store the compiler vectorises
            whole = out[base + 4 * lo: base + 4 * hi]
            v0, v1, v2, v3 = w0[lo:hi], w1[lo:hi], w2[lo:hi], w3[lo:hi]
            for g in range(hi - lo):
                o = _U64(4) * _U64(g)
                whole[o] = v0[g]
                whole[o + _U64(1)] = v1[g]
                whole[o + _U64(2)] = v2[g]
                whole[o + _U64(3)] = v3[g]
        for g in (0, hi):  # partial groups at either end of the range
            if g >= count or lo <= g < hi:
                continue
            for r in range(4):
                o = base + 4 * g + r
                if 0 <= o < n:
                    out[o] = (w0[g], w1[g], w2[g], w3[g])[r]


@_jit
def bf16_widen(src, out):
    """``out[i]`` = bfloat16 ``src[i]`` as float32, exactly.

    ``src`` holds the bfloat16 bits (viewed as uint16): they are the float32's high
    half, so the widening is a shift (NaN payloads and signed zeros kept), as torch's
    upcast. A plain loop the compiler vectorises (torch's ``copy_`` and ``sub`` with a
    bfloat16 operand took ~0.5 ns per element on the benchmark machine).
    """
    bits = out.view(np.uint32)
    for i in range(src.shape[0]):
        bits[i] = np.uint32(src[i]) << np.uint32(16)


@_jit
def bf16_delta(src, base, out):
    """``out[i] = float32(src[i]) - base[i]``: a bfloat16 fine-tune (bits as uint16)
    minus the float32 base, as ``torch.sub(bf16, f32)`` computes it."""
    bf16_widen(src, out)
    for i in range(src.shape[0]):
        out[i] = out[i] - base[i]


@_jit
def _lanes_total(a0, a1, a2, a3, a4, a5, a6, a7):
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@_jit
def abs_sum(x):
    """``Σ|x|`` of a float32 block in float64, in a fixed order.

    Element ``i`` is added to lane ``i % 8`` (lanes in element order), then the lanes
    are combined pairwise: ``((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))``. Independent
    of threads and vector width; eight lanes let the compiler use SIMD registers
    without changing the order of any lane's additions.
    """
    lanes = np.zeros(8)
    _add_abs_lanes(x, lanes, 0)
    return _lanes_total(lanes[0], lanes[1], lanes[2], lanes[3],
                        lanes[4], lanes[5], lanes[6], lanes[7])


@_jit
def _add_abs_lanes(x, state, lane0):
    """Add ``|x[i]|`` (float64) to lane ``state[lane0 + i % 8]``, in element order.

    ``x`` starts at a lane-0 element; a length that is not a multiple of 8 is the
    tensor's last, partial group (as in :func:`abs_sum`). Eight scalar accumulators in
    a plain loop: the compiler keeps them in two AVX2 registers without reordering
    any lane's additions.
    """
    n = x.shape[0]
    a0 = state[lane0]
    a1 = state[lane0 + 1]
    a2 = state[lane0 + 2]
    a3 = state[lane0 + 3]
    a4 = state[lane0 + 4]
    a5 = state[lane0 + 5]
    a6 = state[lane0 + 6]
    a7 = state[lane0 + 7]
    full = n - n % 8
    for i in range(0, full, 8):
        a0 += abs(np.float64(x[i]))
        a1 += abs(np.float64(x[i + 1]))
        a2 += abs(np.float64(x[i + 2]))
        a3 += abs(np.float64(x[i + 3]))
        a4 += abs(np.float64(x[i + 4]))
        a5 += abs(np.float64(x[i + 5]))
        a6 += abs(np.float64(x[i + 6]))
        a7 += abs(np.float64(x[i + 7]))
    rest = n - full
    if rest > 0:
        a0 += abs(np.float64(x[full]))
    if rest > 1:
        a1 += abs(np.float64(x[full + 1]))
    if rest > 2:
        a2 += abs(np.float64(x[full + 2]))
    if rest > 3:
        a3 += abs(np.float64(x[full + 3]))
    if rest > 4:
        a4 += abs(np.float64(x[full + 4]))
    if rest > 5:
        a5 += abs(np.float64(x[full + 5]))
    if rest > 6:
        a6 += abs(np.float64(x[full + 6]))
    state[lane0] = a0
    state[lane0 + 1] = a1
    state[lane0 + 2] = a2
    state[lane0 + 3] = a3
    state[lane0 + 4] = a4
    state[lane0 + 5] = a5
    state[lane0 + 6] = a6
    state[lane0 + 7] = a7


#: Length of the state array of :func:`dare_l1_pass`.
L1_STATE = 18


@_jit
def dare_l1_pass(d, draws, threshold, first, total, l1_block, state):
    """The ``l1`` rescale's statistics over a block.

    Accumulates ``‖δ‖₁`` and ``‖kept‖₁`` exactly as :func:`sparsify.l1_norm` sums
    them over the whole tensor: each :data:`sparsify.L1_BLOCK` of the tensor is
    summed by :func:`abs_sum` (lanes by flat index mod 8) and the block sums are added
    in order, ``kept`` being the delta where ``draws >= threshold`` and ``+0``
    elsewhere. Blocks may end anywhere a multiple of 8 elements in: the lanes carry
    over in ``state`` to the next call.

    The kept deltas go through a small float32 buffer first (a select, then the same
    lane sums as ``|δ|``): a conditional inside the sum loop keeps the compiler from
    vectorising it (4.3 ns per element, against ~1 ns so).

    Args:
        d: float32 delta block (read only), flat elements ``first ...``.
        draws: uint32 mask draws of those elements.
        threshold: drop threshold, 1 ≤ t < 2**32.
        first: flat index of ``d[0]`` in the tensor, a multiple of 8.
        total: the tensor's number of elements.
        l1_block: elements per L1 block, a multiple of 8.
        state: float64[L1_STATE], zeros before the tensor's first block: the lanes of
            ``|δ|`` (0-7) and of ``|kept|`` (8-15), ``‖δ‖₁`` (16), ``‖kept‖₁`` (17).
    """
    n = d.shape[0]
    t = np.uint32(threshold)
    zero = np.float32(0.0)
    kept = np.empty(min(n, _SUB_BLOCK), dtype=np.float32)
    i = 0
    while i < n:
        # up to the end of the current L1 block (or of d), in sub-blocks of whole groups
        stop = min(n, i + l1_block - (first + i) % l1_block, i + _SUB_BLOCK)
        m = stop - i
        piece = d[i:stop]
        dr = draws[i:stop]
        kp = kept[:m]
        for j in range(m):
            kp[j] = piece[j] if dr[j] >= t else zero
        _add_abs_lanes(piece, state, 0)
        _add_abs_lanes(kp, state, 8)
        i = stop
        g = first + i  # flat index of the next element
        if g % l1_block == 0 or g == total:  # an L1 block ends: add its sums, in order
            state[16] += _lanes_total(state[0], state[1], state[2], state[3],
                                      state[4], state[5], state[6], state[7])
            state[17] += _lanes_total(state[8], state[9], state[10], state[11],
                                      state[12], state[13], state[14], state[15])
            state[:16] = 0.0


#: Buckets of :func:`magnitude_histogram`: 16 bits of a float32 at a time.
HISTOGRAM_BINS = 1 << 16


@_jit
def magnitude_histogram(bits, upper, first, lower):
    """Count ``|x|`` of float32 values by the upper 16 bits of their bit pattern, and by
    the lower 16 bits those whose upper bits fall in a window of buckets.

    The bit pattern of a non-negative float32 (``+0``, subnormals, ``inf``, NaN last)
    orders as the value does, and ``|x|`` is the pattern without its sign bit: the two
    histograms give the exact k-th largest magnitude of a tensor from its blocks, with no
    copy of the tensor, when the window holds its bucket (``blockwise._Merge.select_pass``;
    else :func:`bucket_histogram` in a second pass).

    Args:
        bits: uint32 view of a float32 block.
        upper: int64[:data:`HISTOGRAM_BINS`], added to.
        first: The window's first bucket (upper 16 bits).
        lower: int64[window, :data:`HISTOGRAM_BINS`], added to: row ``i`` counts the
            values of bucket ``first + i`` by their lower 16 bits (no rows: no window).
    """
    magnitude = np.uint32(0x7FFFFFFF)
    shift = np.uint32(16)
    low = np.uint32(0xFFFF)
    window = lower.shape[0]
    for i in range(bits.shape[0]):
        x = bits[i] & magnitude
        bucket = x >> shift
        upper[bucket] += 1
        row = np.int64(bucket) - first
        if row >= 0 and row < window:
            lower[row, x & low] += 1


@_jit
def bucket_histogram(bits, high, hist):
    """Count, by the lower 16 bits of their bit pattern, the ``|x|`` of float32 values
    whose upper 16 bits are ``high`` (a bucket outside :func:`magnitude_histogram`'s
    window).

    Args:
        bits: uint32 view of a float32 block.
        high: The bucket (upper 16 bits of ``|x|``).
        hist: int64[:data:`HISTOGRAM_BINS`], added to.
    """
    magnitude = np.uint32(0x7FFFFFFF)
    shift = np.uint32(16)
    low = np.uint32(0xFFFF)
    h = np.uint32(high)
    for i in range(bits.shape[0]):
        x = bits[i] & magnitude
        if (x >> shift) == h:
            hist[x & low] += 1


#: ``mode`` of :func:`dare_apply`: kept deltas unchanged (DropOnly), divided by
#: ``1 - p`` (inverse) or multiplied by the ``l1`` ratio.
KEEP, DIVIDE, MULTIPLY = 0, 1, 2


@_jit
def dare_apply(d, draws, threshold, value, mode):
    """Drop and rescale ``d`` in place from the mask draws.

    Where ``draws[i] >= threshold``: ``d[i]`` (``mode`` :data:`KEEP`),
    ``d[i] / value`` (:data:`DIVIDE`, ``value`` = ``1 - p``) or ``d[i] * value``
    (:data:`MULTIPLY`, the ``l1`` ratio), ``value`` rounded to float32 first;
    ``+0`` elsewhere.
    """
    t = np.uint32(threshold)
    v = np.float32(value)
    zero = np.float32(0.0)
    for i in range(d.shape[0]):
        x = d[i]
        if mode == 1:
            x = x / v
        elif mode == 2:
            x = x * v
        d[i] = x if draws[i] >= t else zero


#: ``selects`` codes of :func:`merge_block` (magnitude selection after DARE): keep
#: every delta; drop every delta; keep ``|δ| > kth`` and, of the ``|δ| == kth``, the
#: first ``ties_left`` in flat-index order; keep ``|δ| >= kth``.
SELECT_NONE, SELECT_ZERO, SELECT_GREATER, SELECT_AT_LEAST = 0, 1, 2, 3

#: ``consensus`` / ``sign_election`` / ``disjoint`` codes of :func:`merge_block`.
SUM, TIES = 0, 1
ELECT_SUM, ELECT_WEIGHTED_SUM, ELECT_COUNT = 0, 1, 2
DISJOINT_MEAN, DISJOINT_WEIGHT, DISJOINT_SUM = 0, 1, 2


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _keep_above(kp, kth, inclusive):
    """``kp[j]`` where ``|kp[j]| > kth`` (``>=`` if ``inclusive``), ``+0`` elsewhere."""
    zero = np.float32(0.0)
    if inclusive:
        for j in range(kp.shape[0]):
            kp[j] = kp[j] if abs(kp[j]) >= kth else zero
    else:
        for j in range(kp.shape[0]):
            kp[j] = kp[j] if abs(kp[j]) > kth else zero


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _select(kp, selects, kths, ties_left, trims, k):
    """Magnitude selection of model ``k``'s kept deltas in place (``_Merge._select``).

    Ties at ``kth`` are kept in flat-index order while ``ties_left`` lasts: a piece
    whose ties all fit keeps ``>= kth``, one with none left keeps ``> kth``, and only the
    piece where the budget runs out is split at its last kept tie (no per-element
    branch on the budget: on random data that branch mispredicts half the time).
    """
    code = selects[k]
    if code < SELECT_GREATER:
        return
    kth = kths[k]
    left = ties_left[k]
    if code == SELECT_AT_LEAST:
        _keep_above(kp, kth, True)
    elif left == 0:
        _keep_above(kp, kth, False)
    else:
        n = kp.shape[0]
        ties = 0
        for j in range(n):
            ties += abs(kp[j]) == kth
        if ties <= left:
            _keep_above(kp, kth, True)
            left -= ties
        else:
            cut = 0  # one past the last tie kept
            while left > 0:
                left -= abs(kp[cut]) == kth
                cut += 1
            _keep_above(kp[:cut], kth, True)
            _keep_above(kp[cut:], kth, False)
        ties_left[k] = left
    trim = trims[k]
    if trim != np.float32(0.0):
        for j in range(kp.shape[0]):
            kp[j] = kp[j] / trim


@_jit
def merge_block(base, deltas, first, words, thresholds, modes, values, selects, kths,
                ties_left, trims, weights, consensus, elect, disjoint, normalize, divisor,
                scale, out):
    """DARE and magnitude selection of every model, then fusion, then
    ``base + scale * merged``, for one block.

    The same float32 operations, in the same order, as the torch path of
    :class:`blockwise._Merge` (tests compare bytes): for model ``k`` the kept delta is
    ``d`` (mode :data:`KEEP`), ``d / value`` (:data:`DIVIDE`) or ``d * value``
    (:data:`MULTIPLY`) where its draw ``>= threshold`` and ``+0`` elsewhere (threshold
    0 keeps all, 2**32 drops all); then the magnitude selection (``selects``: the
    ``SELECT_*`` codes; a kept delta is divided by ``trims[k]`` where that is not 0);
    then the weighted sum (``SUM``, optionally divided by ``divisor``) or TIES (sign
    election, then the disjoint merge).

    Args:
        base: float32 base block.
        deltas: float32 ``(K, m)``, the raw deltas of the block (read only).
        first: flat index of the block's first element.
        words: uint64 ``(K, 4)`` Philox words of each model's mask.
        thresholds: uint64 ``(K,)``; modes: int64 ``(K,)``; values, weights: float32.
        selects: int64 ``(K,)``; kths, trims: float32 ``(K,)``; ties_left: int64 ``(K,)``,
            how many ties at ``kth`` :data:`SELECT_GREATER` still keeps (decreased here:
            blocks come in order).
        consensus, elect, disjoint: the codes above; normalize: bool.
        divisor, scale: float32.
        out: float32 block, receives the merged parameters.

    Returns:
        False if any base or delta value is NaN/Inf (the caller reruns the reference
        path for its error), else True.
    """
    n = base.shape[0]
    count = deltas.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    nonfinite = 0
    draws = np.empty(_SUB_BLOCK, dtype=np.uint32)
    scratch = np.empty((4, _PHILOX_STEP), dtype=np.uint32)
    kept = np.empty((count, _SUB_BLOCK), dtype=np.float32)
    total = np.empty(_SUB_BLOCK, dtype=np.float32)
    den = np.empty(_SUB_BLOCK, dtype=np.float32)
    for off in range(0, n, _SUB_BLOCK):  # sub-blocks that stay in L1: one simple loop per step
        m = min(_SUB_BLOCK, n - off)
        # row views indexed from 0: the compiler proves indices non-negative and vectorises
        b = base[off:off + m]
        o = out[off:off + m]
        tot = total[:m]
        dn = den[:m]
        dr = draws[:m]
        for j in range(m):
            nonfinite += b[j] - b[j] != zero  # NaN and Inf give NaN
        # DARE, per model: kept = op(d) where draw >= threshold, +0 elsewhere
        for k in range(count):
            d = deltas[k, off:off + m]
            kp = kept[k, :m]
            for j in range(m):
                nonfinite += d[j] - d[j] != zero
            t = thresholds[k]
            v = values[k]
            mode = modes[k]
            if t >= _U64(1) << _U64(32) or selects[k] == SELECT_ZERO:
                kp[:] = zero
                continue
            if t == _U64(0) and mode == KEEP:  # nothing dropped, nothing rescaled
                kp[:] = d
                _select(kp, selects, kths, ties_left, trims, k)
                continue
            if t == _U64(0):
                dr[:] = np.uint32(0)
            else:
                _philox_into(dr, first + off, words[k, 0], words[k, 1], words[k, 2], words[k, 3],
                             scratch)
            t32 = np.uint32(t)
            if mode == 1:
                for j in range(m):
                    x = d[j] / v
                    kp[j] = x if dr[j] >= t32 else zero
            elif mode == 2:
                for j in range(m):
                    x = d[j] * v
                    kp[j] = x if dr[j] >= t32 else zero
            else:
                for j in range(m):
                    kp[j] = d[j] if dr[j] >= t32 else zero
            _select(kp, selects, kths, ties_left, trims, k)
        # fusion
        tot[:] = zero
        for k in range(count):
            w = weights[k]
            kp = kept[k, :m]
            if consensus == 0 or elect == 1:
                for j in range(m):
                    tot[j] = tot[j] + kp[j] * w
            elif elect == 0:
                for j in range(m):
                    tot[j] = tot[j] + kp[j] * one
            else:
                for j in range(m):
                    c = kp[j] * w
                    tot[j] = tot[j] + (one if c > zero else (-one if c < zero else zero))
        if consensus == 0:
            if normalize:
                for j in range(m):
                    o[j] = b[j] + (tot[j] / divisor) * scale
            else:
                for j in range(m):
                    o[j] = b[j] + tot[j] * scale
            continue
        # TIES: sign = copysign(1, total) (total is never -0: it starts at +0), then the
        # disjoint merge; `tot` becomes the merged value
        for j in range(m):
            dn[j] = one if tot[j] >= zero else -one  # the sign, for now
        tot[:] = zero
        for k in range(count):
            w = weights[k]
            kp = kept[k, :m]
            for j in range(m):
                c = kp[j] * w
                agree = one if c * dn[j] > zero else zero
                tot[j] = tot[j] + c * agree
                kp[j] = agree  # the model's agreement flags, for the denominator
        if disjoint == 2:
            for j in range(m):
                o[j] = b[j] + tot[j] * scale
            continue
        dn[:] = zero
        for k in range(count):
            w = weights[k]
            kp = kept[k, :m]
            if disjoint == 0:
                for j in range(m):
                    dn[j] = dn[j] + kp[j]
            else:
                for j in range(m):
                    dn[j] = dn[j] + kp[j] * w
        for j in range(m):
            o[j] = b[j] + (tot[j] / (dn[j] + (one if dn[j] == zero else zero))) * scale
    return nonfinite == 0


def warm_up() -> None:
    """Load (or compile) every kernel: ~0.5 s in a process (~4 s to compile them once).

    Callers run it on a background thread while the process does other start-up work
    (most of that time is spent outside the GIL).
    """
    draws = np.empty(8, dtype=np.uint32)
    philox_fill(draws, 0, 1, 2, 3, 4)
    d = np.ones(8, dtype=np.float32)
    dare_l1_pass(d, draws, 1, 0, 8, 8, np.zeros(L1_STATE))
    dare_apply(d, draws, 1, 0.5, DIVIDE)
    abs_sum(d)
    hist = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    magnitude_histogram(d.view(np.uint32), hist, 0x3F80, np.zeros((1, HISTOGRAM_BINS),
                                                                   dtype=np.int64))
    bucket_histogram(d.view(np.uint32), 0x3F80, hist)
    bits = np.zeros(8, dtype=np.uint16)
    bf16_widen(bits, d)
    bf16_delta(bits, np.ones(8, dtype=np.float32), d)
    args = (np.zeros((2, 4), dtype=np.uint64), np.ones(2, dtype=np.uint64),
            np.zeros(2, dtype=np.int64), np.ones(2, dtype=np.float32),
            np.array([SELECT_NONE, SELECT_GREATER], dtype=np.int64),
            np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.int64),
            np.zeros(2, dtype=np.float32), np.ones(2, dtype=np.float32),
            TIES, ELECT_SUM, DISJOINT_MEAN, False, np.float32(2.0), np.float32(1.0))
    whole = np.zeros((2, 8), dtype=np.float32)
    partial = np.zeros((2, 16), dtype=np.float32)[:, :8]  # a tensor's last, short block
    for deltas in (whole, partial):
        merge_block(d, deltas, 0, *args, np.empty(8, dtype=np.float32))

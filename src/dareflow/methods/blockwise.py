"""Blockwise merge of one tensor: the reference math, in cache-sized blocks.

:func:`merge_blockwise` computes exactly what :func:`methods.merge_tensor_reference`
computes (DARE / magnitude sparsify, then weighted sum or TIES consensus, then one
cast), but walks the flat tensor in blocks of :data:`BLOCK_ELEMENTS` with buffers
allocated once per call, instead of materialising ~10 whole-tensor float32
temporaries per tensor.

Why it matters (measured on the 2-core benchmark machine, a 2048x5632 bf16 weight):
every fresh 46 MB float32 temporary costs page faults and a cold-cache pass; the
reference path spends ~70 % of its time there. Blocks of 64 Ki elements stay in L2,
the masks are drawn block by block (:class:`masks.MaskStream`), and inputs are only
read (they can be memory-mapped checkpoint bytes, so they never become anonymous
memory). Extra memory is a few MB (on accelerators, and with the kernels off, one
float32 buffer of the tensor for magnitude selection, TIES trim), never a whole unit.

Bitwise contract: every element goes through the same float32 operations, in the
same order, as in the reference path (elementwise IEEE operations give the same
result whatever the block boundaries, vector width or thread count), and the
per-tensor statistics are the same values: the L1 sums use the same fixed blocks
(:func:`sparsify.l1_norm`), and the magnitude threshold is the k-th largest value
(a selection, exact) with ties kept at the lowest flat indices. Tests compare both
paths byte for byte.

Non-finite inputs: the block pass records each block's min/max; if any is NaN/Inf the
caller reruns the reference path, which raises the error naming the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dareflow.methods import kernels
from dareflow.methods.fuse import delta_divisor
from dareflow.methods.masks import MaskStream, derive_key
from dareflow.methods.sparsify import L1_BLOCK, L1_EPS, l1_block_sum, magnitude_keep_count

__all__ = ["BLOCK_ELEMENTS", "NonFiniteInput", "merge_blockwise", "supports_blockwise"]

#: Elements per block on CPU: the L1 block, a divisor of the mask chunk, and no
#: larger than torch's intra-op grain size (32768), so every op runs on the calling
#: thread. Larger blocks hand each op to OpenMP: with two Prefect workers that is
#: four threads on two cores, and on a loaded machine each op waits milliseconds for
#: a descheduled team thread (measured: ties on one 2048x5632 weight 0.4 s -> 8 s).
#: Parallelism comes from the unit workers instead.
BLOCK_ELEMENTS = L1_BLOCK
#: Elements per block on CPU when torch runs ops on one thread (as ``merge_unit``
#: arranges, its parallelism being the unit workers): 8x fewer Python-level ops, so
#: two workers no longer queue on the GIL between ~10 us ops (4 layer units on 2
#: threads: 2.65 s -> 1.55 s). Still a multiple of the L1 block and a divisor of the
#: mask chunk.
SERIAL_BLOCK_ELEMENTS = 1 << 18
#: Elements per block on accelerators (big kernels, few launches).
DEVICE_BLOCK_ELEMENTS = 1 << 22
#: |δ| sampled (evenly spaced) to predict the bucket of a magnitude threshold, and the
#: most buckets counted by their lower bits in the same pass (``_likely_buckets``).
THRESHOLD_SAMPLE = 1 << 16
THRESHOLD_WINDOW = 4
#: Standard deviations of the sample's rank either side of the threshold's estimate.
THRESHOLD_SPREAD = 4.0

# float dtypes whose promotion to float32 inside an op is an exact upcast, so
# ``torch.sub(bf16, f32)`` equals ``bf16.to(f32) - f32`` bit for bit.
_EXACT_UPCAST = (torch.bfloat16, torch.float16, torch.float32)


_ELECT = {"sum": kernels.ELECT_SUM, "weighted_sum": kernels.ELECT_WEIGHTED_SUM,
          "count": kernels.ELECT_COUNT}
_DISJOINT = {"mean": kernels.DISJOINT_MEAN, "weight": kernels.DISJOINT_WEIGHT,
             "sum": kernels.DISJOINT_SUM}


class NonFiniteInput(Exception):
    """An input block holds NaN/Inf: rerun the reference path for its exact error."""


def supports_blockwise(spec, base: torch.Tensor | None) -> bool:
    """Whether :func:`merge_blockwise` computes this spec (else use the reference).

    Magnitude pruning with the ``l1`` rescale needs a third statistics pass and is
    left to the reference path (no peer default uses it).
    """
    row = spec.row
    if row.sparsification == "magnitude" and spec.resolved_rescale == "l1":
        return False
    return base is None or base.device.type != "meta"


@dataclass
class _Model:
    """Per-model state of one tensor's merge."""

    weight: float
    drop_rate: float
    stream: MaskStream | None = None
    l1_factor: float | None = None  # multiply kept deltas by it (l1 rescale)
    # magnitude selection (TIES trim or MP): keep |δ| > kth, then the first
    # `ties_to_keep` entries equal to kth in flat order
    trim_rate: float = 0.0
    trim_density: float | None = None  # mergekit's density: its keep count
    trim_rescale_inverse: bool = False
    select: str = "none"  # "none" | "all" | "zero" | "kth"
    kth: float = 0.0
    ties_to_keep: int = 0
    ties_seen: int = 0
    keep_all_ties: bool = False


class _Merge:
    #: Whether the compiled CPU kernels run (on CPU tensors); tests turn it off to run
    #: the torch-op path that accelerators use.
    kernels_enabled = True

    def __init__(self, name, base, finetuned, spec, block):
        self.spec = spec
        self.row = spec.row
        self.linear = not self.row.needs_base
        self.base = None if self.linear else base.reshape(-1)
        self.fts = [t.reshape(-1) for t in finetuned]
        self.n = self.fts[0].numel()
        self.device = self.fts[0].device
        self.block = block
        self.weights = [m.weight for m in spec.models]
        self.rescale = spec.resolved_rescale
        self.models = []
        for m in spec.models:
            state = _Model(weight=m.weight, drop_rate=m.drop_rate)
            if self.row.sparsification == "dare":
                if 0.0 < m.drop_rate < 1.0:
                    state.stream = MaskStream(derive_key(spec.seed, m.model_id, name), m.drop_rate)
                if spec.trim_after_dare > 0:
                    state.trim_rate = spec.trim_after_dare
            elif self.row.sparsification == "magnitude":
                state.trim_rate = m.drop_rate
                state.trim_density = m.density
                state.trim_rescale_inverse = self.rescale == "inverse"
            self.models.append(state)
        self.needs_trim = any(s.trim_rate > 0 or self.row.sparsification == "magnitude"
                              for s in self.models)
        f32 = {"dtype": torch.float32, "device": self.device}
        self.b = torch.empty(block, **f32)
        # raw deltas of a block, one row per model (rows are the per-model buffers)
        self.deltas = torch.empty((len(self.models), block), **f32)
        self.d = list(self.deltas)
        self.tmp = torch.empty(block, **f32)
        self.total = torch.empty(block, **f32)
        self.den = torch.empty(block, **f32)
        self.sign = torch.empty(block, **f32)
        self.flag = torch.empty(block, dtype=torch.bool, device=self.device)
        self.keep = torch.empty(block, **f32)
        self.ones = torch.ones(block, **f32)
        self.use_kernels = self.kernels_enabled and self.device.type == "cpu"
        self.draws_np = np.empty(block, dtype=np.uint32) if self.use_kernels else None
        # bfloat16 inputs' bits, widened by the kernels (None: torch ops)
        self.base_bits = self._bf16_bits(self.base)
        self.ft_bits = [self._bf16_bits(t) for t in self.fts]
        blocks = -(-self.n // block)
        self.lo = torch.empty((blocks, len(self.models) + 1), **f32)
        self.hi = torch.empty((blocks, len(self.models) + 1), **f32)

    # ------------------------------------------------------------------ inputs

    def _bf16_bits(self, t: torch.Tensor | None) -> np.ndarray | None:
        """A bfloat16 CPU input's bits as a uint16 array (no copy), for the kernels."""
        if t is None or not self.use_kernels or t.dtype != torch.bfloat16:
            return None
        return t.view(torch.int16).numpy().view(np.uint16)

    def _load(self, src: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        out = out[: stop - start]
        if src is self.base and self.base_bits is not None:
            kernels.bf16_widen(self.base_bits[start:stop], out.numpy())
        else:
            out.copy_(src[start:stop])
        return out

    def _raw_delta(self, k: int, start: int, stop: int, b: torch.Tensor | None) -> torch.Tensor:
        """δ_k (or θ_k for linear) of the block, float32, in ``self.d[k]``."""
        d = self.d[k][: stop - start]
        ft = self.fts[k][start:stop]
        if b is None:
            d.copy_(ft)
        elif self.ft_bits[k] is not None:
            kernels.bf16_delta(self.ft_bits[k][start:stop], b.numpy(), d.numpy())
        elif ft.dtype in _EXACT_UPCAST:
            torch.sub(ft, b, out=d)
        else:  # e.g. float64: the reference casts to float32 first
            d.copy_(ft)
            d.sub_(b)
        return d

    def _keep(self, model: _Model, start: int, stop: int) -> torch.Tensor:
        """The DARE keep mask of the block as float32 1/0, drawn on the tensors' device."""
        return model.stream.keep_on(self.device, start, stop)

    # ------------------------------------------------------------------ sparsify

    def _dare(self, model: _Model, d: torch.Tensor, start: int, stop: int,
              l1_sums: list[float] | np.ndarray | None = None) -> None:
        """DARE on the block in place: drop, then rescale (sparsify.dare)."""
        p = model.drop_rate
        if p == 0.0:
            return
        if p == 1.0:
            d.zero_()
            return
        if self._fused(model):
            self._dare_cpu(model, d.numpy(), start, stop, l1_sums)
            return
        if l1_sums is not None:
            l1_sums[0] += self._l1(d)
        # drop: δ · keep. A dropped entry is ±0 here where the reference has +0; every
        # consumer adds it to a +0-initialised sum or takes |·|, so bytes agree
        d.mul_(self._keep(model, start, stop))
        if self.rescale == "inverse":
            d.div_(1.0 - p)
        elif self.rescale == "l1":
            if l1_sums is not None:
                l1_sums[1] += self._l1(d)
            elif model.l1_factor is not None:
                d.mul_(model.l1_factor)

    def _fused(self, model: _Model) -> bool:
        """Whether the model's DARE runs in the fused CPU kernels (:mod:`kernels`)."""
        return (self.use_kernels and model.stream is not None
                and 0 < model.stream.threshold < 2**32)

    def _dare_cpu(self, model: _Model, d: np.ndarray, start: int, stop: int,
                  l1_sums: np.ndarray | None) -> None:
        """:meth:`_dare` with the fused kernels: one pass per mask piece."""
        stream = model.stream
        draws = stream.draws(start, stop, out=self.draws_np)
        if l1_sums is not None:  # the l1 statistics; the final pass draws the mask again
            kernels.dare_l1_pass(d, draws, stream.threshold, start, self.n, L1_BLOCK, l1_sums)
            return
        factor = model.l1_factor
        if self.rescale == "inverse":
            mode, value = kernels.DIVIDE, 1.0 - model.drop_rate
        elif self.rescale == "l1" and factor is not None:
            mode, value = kernels.MULTIPLY, factor
        else:
            mode, value = kernels.KEEP, 1.0
        kernels.dare_apply(d, draws, stream.threshold, value, mode)

    def _l1(self, d: torch.Tensor) -> float:
        """Σ|d| of the block, as sparsify.l1_norm sums it (blocks of L1_BLOCK, in order)."""
        mag = self.tmp[: d.numel()]
        torch.abs(d, out=mag)
        total = 0.0
        for start in range(0, mag.numel(), L1_BLOCK):
            total += l1_block_sum(mag[start : start + L1_BLOCK])
        return total

    def _select(self, model: _Model, d: torch.Tensor) -> None:
        """Magnitude selection on the block in place (sparsify.magnitude_prune)."""
        if model.select == "none" or model.select == "all":
            return
        if model.select == "zero":
            d.zero_()
            return
        m = d.numel()
        mag, keep = self.tmp[:m], self.keep[:m]
        torch.abs(d, out=mag)
        if model.keep_all_ties:
            torch.ge(mag, model.kth, out=keep)
        else:
            torch.gt(mag, model.kth, out=keep)
            left = model.ties_to_keep - model.ties_seen
            if left > 0:  # ties at the k-th value go to the lowest flat indices
                tied = self.flag[:m]
                torch.eq(mag, model.kth, out=tied)
                take = torch.nonzero(tied).flatten()[:left]
                keep[take] = 1.0
                model.ties_seen += int(take.numel())
        d.mul_(keep)
        if model.trim_rescale_inverse:
            d.div_(1.0 - model.trim_rate)

    def _before_select(self, k: int, start: int, stop: int,
                       b: torch.Tensor | None) -> torch.Tensor:
        """δ̂_k of the block before magnitude selection (DARE applied, if any)."""
        d = self._raw_delta(k, start, stop, b)
        if self.row.sparsification == "dare":
            self._dare(self.models[k], d, start, stop)
        return d

    # ------------------------------------------------------------------ statistics

    def _blocks(self):
        for start in range(0, self.n, self.block):
            yield start, min(start + self.block, self.n)

    def _base_block(self, start: int, stop: int) -> torch.Tensor | None:
        if self.base is None:
            return None
        return self._load(self.base, start, stop, self.b)

    def l1_pass(self) -> None:
        """The l1 rescale factors: ‖δ‖₁ / ‖kept‖₁ per model (sparsify._apply_rescale)."""
        if self.row.sparsification != "dare" or self.rescale != "l1":
            return
        live = [k for k, m in enumerate(self.models) if 0.0 < m.drop_rate < 1.0]
        if not live:
            return
        # per model: [Σ|δ|, Σ|kept|] (torch ops), or the fused kernels' state array
        sums = {k: np.zeros(kernels.L1_STATE) if self._fused(self.models[k]) else [0.0, 0.0]
                for k in live}
        for start, stop in self._blocks():
            b = self._base_block(start, stop)
            for k in live:
                d = self._raw_delta(k, start, stop, b)
                self._dare(self.models[k], d, start, stop, l1_sums=sums[k])
        for k in live:
            before, after = (float(v) for v in sums[k][-2:])
            self.models[k].l1_factor = None if after < L1_EPS else before / after

    def select_pass(self) -> None:
        """The magnitude threshold of every model: k-th largest |δ̂| (exact selection)."""
        if not self.needs_trim:
            return
        positions = {}  # model -> 0-based position of its threshold among sorted |δ̂|
        for k, model in enumerate(self.models):
            count = magnitude_keep_count(self.n, model.trim_rate, model.trim_density)
            if count >= self.n:
                model.select = "all"
            elif count == 0:
                model.select = "zero"
            else:
                positions[k] = self.n - count
        if self.use_kernels:
            found = self._kths_by_histograms(positions)
        else:
            found = {k: self._kth_by_sorting(k, position) for k, position in positions.items()}
        for k, (kth, greater, ties) in found.items():
            model = self.models[k]
            count = self.n - positions[k]
            model.select = "kth"
            model.kth = float(kth)
            model.ties_to_keep = count - greater
            model.ties_seen = 0
            model.keep_all_ties = model.ties_to_keep >= ties

    def _kth_by_sorting(self, k: int, position: int) -> tuple[float, int, int]:
        """What :meth:`_kths_by_histograms` finds, for one model, from a float32 copy of
        ``|δ̂_k|`` and ``torch.kthvalue`` (accelerators, and CPU without the kernels)."""
        buffer = torch.empty(self.n, dtype=torch.float32, device=self.device)
        for start, stop in self._blocks():
            d = self._before_select(k, start, stop, self._base_block(start, stop))
            torch.abs(d, out=buffer[start:stop])
        kth = torch.kthvalue(buffer, position + 1).values
        return (kth.item(), int((buffer > kth).sum().item()),
                int((buffer == kth).sum().item()))

    def _kths_by_histograms(self, positions: dict[int, int]) -> dict[int, tuple[float, int, int]]:
        """For each model ``k`` of ``positions``: the ``positions[k]``-th smallest
        ``|δ̂_k|`` (0-based), how many are greater and how many equal it (CPU kernels;
        every model in the same pass, the base block loaded once). A histogram of the
        upper 16 bits of the magnitudes' float32 patterns finds the value's upper half;
        the lower 16 bits of the values in that bucket, counted in the same pass for the
        few buckets a sample predicts (:meth:`_likely_buckets`), the rest; a second pass
        counts them when the bucket was not predicted. Exact, like a sort, without a
        float32 copy of the tensor (the 32000 x 2048 embeddings: 262 MB per model, two
        such units at once)."""
        windows = {k: self._likely_buckets(k, position) for k, position in positions.items()}
        upper = {k: np.zeros(kernels.HISTOGRAM_BINS, dtype=np.int64) for k in positions}
        lower = {k: np.zeros((count, kernels.HISTOGRAM_BINS), dtype=np.int64)
                 for k, (_, count) in windows.items()}
        for start, stop in self._blocks():
            b = self._base_block(start, stop)
            for k in positions:
                d = self._before_select(k, start, stop, b)
                kernels.magnitude_histogram(d.numpy().view(np.uint32), upper[k], windows[k][0],
                                            lower[k])
        below, high, low = {}, {}, {}
        for k, hist in upper.items():
            cumulative = np.cumsum(hist)
            high[k] = int(np.searchsorted(cumulative, positions[k], side="right"))
            below[k] = int(cumulative[high[k]] - hist[high[k]])
            first, count = windows[k]
            if first <= high[k] < first + count:
                low[k] = lower[k][high[k] - first]
        missed = {k: np.zeros(kernels.HISTOGRAM_BINS, dtype=np.int64)
                  for k in positions if k not in low}
        if missed:
            for start, stop in self._blocks():
                b = self._base_block(start, stop)
                for k, hist in missed.items():
                    d = self._before_select(k, start, stop, b)
                    kernels.bucket_histogram(d.numpy().view(np.uint32), high[k], hist)
            low.update(missed)
        found = {}
        for k, hist in low.items():
            cumulative = np.cumsum(hist)
            bucket = int(np.searchsorted(cumulative, positions[k] - below[k], side="right"))
            below[k] += int(cumulative[bucket] - hist[bucket])
            ties = int(hist[bucket])
            bits = np.array([(high[k] << 16) | bucket], dtype=np.uint32)
            found[k] = (float(bits.view(np.float32)[0]), self.n - below[k] - ties, ties)
        return found

    def _likely_buckets(self, k: int, position: int) -> tuple[int, int]:
        """The first bucket and the number of buckets (at most ``THRESHOLD_WINDOW``; 0: no
        prediction) that likely hold the ``position``-th smallest ``|δ_k|``, from
        ``THRESHOLD_SAMPLE`` evenly spaced ``|δ_k|``: the buckets of the sample's ranks
        ``THRESHOLD_SPREAD`` binomial standard deviations either side of the estimate,
        clamped around it. None after DARE (the sampled δ would need their blocks' drops)."""
        if self.row.sparsification == "dare":
            return 0, 0
        stride = max(1, self.n // THRESHOLD_SAMPLE)
        ft = self.fts[k][::stride].float()
        sample = ft if self.base is None else ft - self.base[::stride].float()
        magnitudes = np.sort(sample.abs().numpy().view(np.uint32))
        size = magnitudes.size
        q = position / max(1, self.n - 1)
        estimate = q * (size - 1)  # = position when every |δ| is sampled
        spread = THRESHOLD_SPREAD * (size * q * (1.0 - q)) ** 0.5 + 1.0
        ranks = [int(np.clip(round(r), 0, size - 1))
                 for r in (estimate - spread, estimate, estimate + spread)]
        lo, mid, hi = (int(magnitudes[r] >> 16) for r in ranks)
        first = max(lo, mid - THRESHOLD_WINDOW // 2)
        last = min(hi, first + THRESHOLD_WINDOW - 1)
        return first, last - first + 1

    # ------------------------------------------------------------------ fuse

    def _weighted_sum(self, deltas: Sequence[torch.Tensor], weights: Sequence[float],
                      out: torch.Tensor) -> torch.Tensor:
        # fuse._weighted_sum: zeros, then += δ_k · w_k in list order
        out.zero_()
        tmp = self.tmp[: out.numel()]
        for d, w in zip(deltas, weights):
            torch.mul(d, float(w), out=tmp)
            out.add_(tmp)
        return out

    def _ties(self, deltas: list[torch.Tensor], m: int) -> torch.Tensor:
        spec = self.spec
        weights = self.weights
        total, sign = self.total[:m], self.sign[:m]
        # elect sign (fuse.elect_sign)
        election, disjoint = spec.resolved_sign_election, spec.resolved_disjoint_merge
        if election == "sum":
            self._weighted_sum(deltas, [1.0] * len(deltas), total)
        elif election == "weighted_sum":
            self._weighted_sum(deltas, weights, total)
        else:
            total.zero_()
            tmp = self.tmp[:m]
            for d, w in zip(deltas, weights):
                torch.mul(d, float(w), out=tmp)
                torch.sign(tmp, out=tmp)
                total.add_(tmp)
        # where(total >= 0, 1, -1): total starts from +0 and a sum is -0 only if both
        # terms are, so total is never -0 and copysign gives the same ±1
        torch.copysign(self.ones[:m], total, out=sign)
        # disjoint merge (fuse.disjoint_merge)
        merged, den = total, self.den[:m]
        merged.zero_()
        den.zero_()
        tmp = self.tmp[:m]
        for d, w in zip(deltas, weights):
            torch.mul(d, float(w), out=tmp)  # contribution
            # agree = (contribution * sign) > 0, as float 1/0 in δ_k's buffer (δ_k is
            # not needed after this model)
            agree = d
            torch.mul(tmp, sign, out=agree)
            torch.gt(agree, 0, out=agree)
            tmp.mul_(agree)
            merged.add_(tmp)
            if disjoint == "mean":
                den.add_(agree)
            elif disjoint == "weight":
                agree.mul_(float(w))
                den.add_(agree)
        if disjoint != "sum":
            # where(den == 0, 1, den): adds 1 where den is ±0, +0 elsewhere (exact)
            torch.eq(den, 0, out=tmp)
            den.add_(tmp)
            merged.div_(den)
        return merged

    def _fused_merge_args(self) -> tuple | None:
        """The per-model arguments of :func:`kernels.merge_block`, or None when
        this merge is not one it computes (CPU: deltas from a base, DARE and/or magnitude
        selection, then a weighted-sum or TIES consensus)."""
        row = self.row
        if not self.use_kernels or self.linear or row.consensus not in ("none", "ties"):
            return None
        count = len(self.models)
        words = np.zeros((count, 4), dtype=np.uint64)
        thresholds = np.zeros(count, dtype=np.uint64)
        modes = np.full(count, kernels.KEEP, dtype=np.int64)
        values = np.ones(count, dtype=np.float32)
        selects = np.full(count, kernels.SELECT_NONE, dtype=np.int64)
        kths = np.zeros(count, dtype=np.float32)
        ties_left = np.zeros(count, dtype=np.int64)
        trims = np.zeros(count, dtype=np.float32)
        for k, model in enumerate(self.models):
            if model.select == "zero":
                selects[k] = kernels.SELECT_ZERO
            elif model.select == "kth":
                selects[k] = (kernels.SELECT_AT_LEAST if model.keep_all_ties
                              else kernels.SELECT_GREATER)
                kths[k] = model.kth
                ties_left[k] = model.ties_to_keep - model.ties_seen
                if model.trim_rescale_inverse:
                    trims[k] = 1.0 - model.trim_rate
            if model.drop_rate == 1.0:
                thresholds[k] = 2**32  # drops everything
            elif model.stream is not None:
                words[k] = model.stream.words
                thresholds[k] = model.stream.threshold
                if self.rescale == "inverse":
                    modes[k], values[k] = kernels.DIVIDE, 1.0 - model.drop_rate
                elif self.rescale == "l1" and model.l1_factor is not None:
                    modes[k], values[k] = kernels.MULTIPLY, model.l1_factor
        spec = self.spec
        weights = np.asarray([float(w) for w in self.weights], dtype=np.float32)
        return (words, thresholds, modes, values, selects, kths, ties_left, trims, weights,
                kernels.TIES if row.consensus == "ties" else kernels.SUM,
                _ELECT.get(spec.resolved_sign_election, 0),
                _DISJOINT.get(spec.resolved_disjoint_merge, 0),
                bool(spec.resolved_normalize),
                np.float32(delta_divisor(self.weights)), np.float32(spec.scale))

    def run(self, out: torch.Tensor) -> None:
        self.l1_pass()
        self.select_pass()
        spec, row = self.spec, self.row
        flat_out = out.reshape(-1)
        fused = self._fused_merge_args()
        if fused is not None:  # the whole final pass in one compiled kernel per block
            finite = True
            for start, stop in self._blocks():
                m = stop - start
                b = self._base_block(start, stop)
                for k in range(len(self.models)):
                    self._raw_delta(k, start, stop, b)
                merged = self.total[:m]
                finite &= kernels.merge_block(
                    b.numpy(), self.deltas.numpy()[:, :m], start, *fused, merged.numpy())
                flat_out[start:stop].copy_(merged)
            if not finite:
                raise NonFiniteInput()
            return
        for index, (start, stop) in enumerate(self._blocks()):
            m = stop - start
            b = self._base_block(start, stop)
            if b is not None:
                torch.aminmax(b, out=(self.lo[index, 0], self.hi[index, 0]))
            deltas = []
            for k in range(len(self.models)):
                d = self._raw_delta(k, start, stop, b)
                torch.aminmax(d, out=(self.lo[index, k + 1], self.hi[index, k + 1]))
                model = self.models[k]
                if row.sparsification == "dare":
                    self._dare(model, d, start, stop)
                if model.select != "none":
                    self._select(model, d)
                deltas.append(d)
            if self.linear:
                merged = self._weighted_sum(deltas, self.weights, self.total[:m])
                if spec.resolved_normalize:
                    merged.div_(float(sum(float(w) for w in self.weights)))
                flat_out[start:stop].copy_(merged)
                continue
            if row.consensus == "ties":
                merged = self._ties(deltas, m)
            else:
                merged = self._weighted_sum(deltas, self.weights, self.total[:m])
                if spec.resolved_normalize:
                    merged.div_(delta_divisor(self.weights))
            # θ_base + λ · merged, then one cast
            merged.mul_(spec.scale)
            torch.add(b, merged, out=merged)
            flat_out[start:stop].copy_(merged)
        lo = self.lo if self.base is not None else self.lo[:, 1:]
        hi = self.hi if self.base is not None else self.hi[:, 1:]
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
            raise NonFiniteInput()


def merge_blockwise(name: str, base: torch.Tensor | None, finetuned: Sequence[torch.Tensor],
                    spec, out: torch.Tensor | None = None,
                    block: int | None = None) -> torch.Tensor:
    """Merge one tensor blockwise; same bytes as the reference path.

    Args:
        name: The tensor's checkpoint name (keys the DARE masks).
        base: Base parameter of shape S (None for ``linear``); any float dtype, any
            device (CPU or CUDA), possibly a read-only memory map.
        finetuned: K tensors of shape S, on the same device.
        spec: A validated :class:`methods.MergeSpec` (inputs already checked).
        out: Optional output tensor of shape S and ``spec.out_dtype``.
        block: Elements per block (default on CPU :data:`BLOCK_ELEMENTS`, or
            :data:`SERIAL_BLOCK_ELEMENTS` when torch uses one thread;
            :data:`DEVICE_BLOCK_ELEMENTS` elsewhere). Any multiple of 8 gives the same
            bytes.

    Returns:
        The merged tensor, shape S, dtype ``spec.out_dtype``, on the inputs' device.

    Raises:
        NonFiniteInput: an input or delta has NaN/Inf (rerun the reference path).
        ValueError: ``block`` is not a positive multiple of 8.
    """
    device = finetuned[0].device
    if block is None:
        if device.type != "cpu":
            block = DEVICE_BLOCK_ELEMENTS
        else:
            block = BLOCK_ELEMENTS if torch.get_num_threads() > 1 else SERIAL_BLOCK_ELEMENTS
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 8:
        raise ValueError(f"block must be a positive multiple of 8, got {block!r}")
    if out is None:
        out = torch.empty(finetuned[0].shape, dtype=spec.out_dtype, device=device)
    if finetuned[0].numel() == 0:
        return out
    _Merge(name, base, finetuned, spec, block).run(out)
    return out

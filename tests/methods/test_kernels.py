"""The compiled kernels compute their written definitions exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dareflow.methods import kernels
from dareflow.methods.masks import MaskStream, derive_key
from dareflow.methods.sparsify import L1_BLOCK, l1_norm


def _lanes_by_the_book(x: np.ndarray) -> float:
    lanes = [0.0] * 8
    for i, v in enumerate(x.tolist()):
        lanes[i % 8] += abs(v)
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + \
        ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 1001])
def test_abs_sum_is_the_eight_lane_sum(n):
    rng = np.random.default_rng(n)  # magnitudes 1e-8..1e2: the order of additions shows
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 3, n)).astype(np.float32)
    assert kernels.abs_sum(x) == _lanes_by_the_book(x)  # exact: same additions, same order


@pytest.mark.parametrize("cut", [8, 1000, L1_BLOCK, 3 * L1_BLOCK + 8])
def test_l1_pass_in_any_pieces_equals_l1_norm(cut):
    # pieces of any multiple of 8, cutting through L1 blocks: same sums as l1_norm
    n = 4 * L1_BLOCK + 13
    rng = np.random.default_rng(0)
    delta = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    stream = MaskStream(derive_key(0, "m", "w"), 0.4)
    draws = stream.draws(0, n)
    state = np.zeros(kernels.L1_STATE)
    for start in range(0, n, cut):
        stop = min(n, start + cut)
        kernels.dare_l1_pass(delta[start:stop], draws[start:stop], stream.threshold, start, n,
                             L1_BLOCK, state)
    kept = np.where(draws >= stream.threshold, delta, np.float32(0))
    assert state[16] == l1_norm(torch.from_numpy(delta))
    assert state[17] == l1_norm(torch.from_numpy(kept))
    assert math.isclose(state[16], float(np.abs(delta).astype(np.float64).sum()), rel_tol=1e-12)


def test_dare_apply_modes():
    d = np.array([1.0, -2.0, 3.0, -4.0], dtype=np.float32)
    draws = np.array([0, 10, 20, 30], dtype=np.uint32)  # kept iff >= 15
    for mode, value, expected in [(kernels.KEEP, 9.0, [0, 0, 3, -4]),
                                  (kernels.DIVIDE, 0.5, [0, 0, 6, -8]),
                                  (kernels.MULTIPLY, 0.5, [0, 0, 1.5, -2])]:
        out = d.copy()
        kernels.dare_apply(out, draws, 15, value, mode)
        assert out.tolist() == expected
        assert not np.signbit(out[:2]).any()  # dropped entries are +0


def test_warm_up_leaves_every_kernel_compiled():
    kernels.warm_up()
    for kernel in (kernels.philox_fill, kernels.dare_l1_pass, kernels.dare_apply,
                   kernels.magnitude_histogram, kernels.bucket_histogram,
                   kernels.abs_sum, kernels.merge_block, kernels.bf16_widen,
                   kernels.bf16_delta):
        assert kernel.signatures, kernel


def test_bf16_widen_is_torchs_upcast_for_every_bit_pattern():
    # all 65536 bfloat16 values: zeros of both signs, subnormals, infinities, NaN payloads
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.size, dtype=np.float32)
    kernels.bf16_widen(bits, out)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    assert np.array_equal(out.view(np.uint32), expected.numpy().view(np.uint32))


def test_bf16_delta_is_torch_sub_of_a_bf16_and_a_float32():
    rng = np.random.default_rng(1)
    n = 4099
    ft = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).bfloat16()
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    base[:3] = torch.tensor([0.0, -0.0, float("inf")])
    out = np.empty(n, dtype=np.float32)
    kernels.bf16_delta(ft.view(torch.int16).numpy().view(np.uint16), base.numpy(), out)
    expected = torch.sub(ft, base)
    assert np.array_equal(out.view(np.uint32), expected.numpy().view(np.uint32))


def test_magnitude_histogram_counts_by_the_magnitude_bit_pattern():
    x = np.array([0.0, -0.0, 1.0, -1.0, 1.5, 2.0, np.inf, -np.inf, 1e-45, -3.0, 1.0078125],
                 dtype=np.float32)
    bits = x.view(np.uint32)
    upper = np.zeros(kernels.HISTOGRAM_BINS, dtype=np.int64)
    window = np.zeros((2, kernels.HISTOGRAM_BINS), dtype=np.int64)
    kernels.magnitude_histogram(bits, upper, 0x3F80, window)
    # |x| patterns: +0 and the subnormal share bucket 0; 1.0 (0x3F80_0000) twice;
    # 1.0078125 0x3F81; 1.5 0x3FC0; 2.0 0x4000; 3.0 0x4040; inf 0x7F80 twice
    assert {int(b): int(c) for b, c in enumerate(upper) if c} == {
        0x0000: 3, 0x3F80: 2, 0x3F81: 1, 0x3FC0: 1, 0x4000: 1, 0x4040: 1, 0x7F80: 2}
    # the window's rows: buckets 0x3F80 and 0x3F81, by their lower 16 bits
    assert [{int(b): int(c) for b, c in enumerate(row) if c} for row in window] == [
        {0: 2}, {0: 1}]
    no_window = np.zeros((0, kernels.HISTOGRAM_BINS), dtype=np.int64)
    again = np.zeros(kernels.HISTOGRAM_BINS, dtype=np.int64)
    kernels.magnitude_histogram(bits, again, 0x3F80, no_window)
    assert np.array_equal(again, upper)
    below = np.zeros((1, kernels.HISTOGRAM_BINS), dtype=np.int64)  # the window before 0x3F80
    kernels.magnitude_histogram(bits, again, 0x3F7F, below)
    assert not below.any()


def test_bucket_histogram_counts_one_bucket_by_its_lower_bits():
    x = np.array([0.0, -0.0, 1.0, -1.0, 1.5, 1e-45, -3.0], dtype=np.float32)
    bits = x.view(np.uint32)
    lower = np.zeros(kernels.HISTOGRAM_BINS, dtype=np.int64)
    kernels.bucket_histogram(bits, 0x0000, lower)
    assert {int(b): int(c) for b, c in enumerate(lower) if c} == {0: 2, 1: 1}
    lower[:] = 0
    kernels.bucket_histogram(bits, 0x3F80, lower)
    assert {int(b): int(c) for b, c in enumerate(lower) if c} == {0: 2}

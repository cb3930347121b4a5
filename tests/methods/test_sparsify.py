"""Tests for dareflow.methods.sparsify: DARE and magnitude pruning."""

from __future__ import annotations

import math

import pytest
import torch

from dareflow.methods.masks import derive_key, keep_mask
from dareflow.methods.sparsify import (
    L1_EPS,
    dare,
    magnitude_keep_count,
    magnitude_prune,
    sparsify,
)
from tests.methods.helpers import bits, local_randn

KEY = derive_key(0, "model-a", "model.layers.0.self_attn.q_proj.weight")
RESCALES = ["inverse", "l1", "none"]


# --- DARE: exact behaviour -----------------------------------------------------------


@pytest.mark.parametrize("rescale", RESCALES)
def test_dare_p0_is_bitwise_identity(rescale):
    delta = torch.tensor([0.5, -0.0, 1e-40, -3.25, 0.0, 7e-3])
    out = dare(delta, 0.0, KEY, rescale=rescale)
    assert torch.equal(bits(out), bits(delta))
    assert out is not delta


@pytest.mark.parametrize("rescale", RESCALES)
def test_dare_p1_gives_zeros_never_nan(rescale):
    out = dare(local_randn(1000), 1.0, KEY, rescale=rescale)
    assert torch.equal(out, torch.zeros(1000))


@pytest.mark.parametrize(("p", "expected_kept"), [(0.5, 1.0), (0.75, 2.0), (0.875, 4.0)])
def test_dare_inverse_exact_values(p, expected_kept):
    delta = torch.full((4096,), 0.5)
    mask = keep_mask(delta.shape, p, KEY)
    out = dare(delta, p, KEY)
    expected = torch.where(mask, torch.tensor(expected_kept), torch.tensor(0.0))
    assert torch.equal(out, expected)


def test_dare_none_is_drop_only():
    delta = torch.full((4096,), 0.25)
    mask = keep_mask(delta.shape, 0.9, KEY)
    assert torch.equal(dare(delta, 0.9, KEY, rescale="none"), torch.where(mask, 0.25, 0.0))


def test_dare_upcasts_bf16_and_computes_in_float32():
    delta = local_randn(4096).to(torch.bfloat16)
    out = dare(delta, 0.9, KEY)
    assert out.dtype == torch.float32
    assert torch.equal(out, dare(delta.float(), 0.9, KEY))
    assert delta.dtype == torch.bfloat16  # input untouched


def test_dare_does_not_modify_its_input():
    delta = local_randn(1000)
    before = delta.clone()
    dare(delta, 0.5, KEY)
    dare(delta, 0.5, KEY, rescale="l1")
    assert torch.equal(delta, before)


def test_dare_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\], got 1.5"):
        dare(torch.ones(3), 1.5, KEY)
    with pytest.raises(ValueError, match="rescale must be one of"):
        dare(torch.ones(3), 0.5, KEY, rescale="l2")
    with pytest.raises(ValueError, match="floating-point"):
        dare(torch.ones(3, dtype=torch.int64), 0.5, KEY)


# --- DARE: statistics (n ~ 1e6, 5-sigma bounds) --------------------------------------

N = 1 << 20


def _sft_like_delta() -> torch.Tensor:
    # SFT deltas: small, mostly within 0.002-0.005, nonzero mean so bias is visible.
    return 0.003 + 0.002 * local_randn(N, seed=1)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_dare_inverse_is_unbiased(p):
    delta = _sft_like_delta()
    out = dare(delta, p, derive_key(1, "stat", f"inverse-{p}"))
    # Var(δ̂_i) = δ_i² p / (1 − p); the mean of n of them.
    sigma = math.sqrt(float((delta.double() ** 2).sum()) * p / (1 - p)) / N
    assert abs(out.double().mean().item() - delta.double().mean().item()) <= 5 * sigma


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_dare_drop_only_is_biased_by_one_minus_p(p):
    delta = _sft_like_delta()
    out = dare(delta, p, derive_key(1, "stat", f"none-{p}"), rescale="none")
    sigma = math.sqrt(float((delta.double() ** 2).sum()) * p * (1 - p)) / N
    expected = (1 - p) * delta.double().mean().item()
    assert abs(out.double().mean().item() - expected) <= 5 * sigma
    # and visibly not unbiased
    assert out.double().mean().item() < 0.6 * delta.double().mean().item()


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_dare_l1_preserves_the_l1_norm(p):
    delta = _sft_like_delta()
    out = dare(delta, p, derive_key(1, "stat", f"l1-{p}"), rescale="l1")
    before = delta.abs().double().sum().item()
    after = out.abs().double().sum().item()
    assert after == pytest.approx(before, rel=1e-6)
    assert torch.equal(out != 0, keep_mask(delta.shape, p, derive_key(1, "stat", f"l1-{p}")))


def test_dare_l1_with_nothing_kept_returns_zeros_not_nan():
    mask = keep_mask((1000,), 0.5, KEY)
    delta = torch.where(mask, 0.0, 1.0)  # nonzero only where DARE drops
    out = dare(delta, 0.5, KEY, rescale="l1")
    assert torch.equal(out, torch.zeros(1000))


def test_dare_l1_skips_rescale_below_eps_like_mergekit():
    delta = torch.full((100,), 1e-12)
    assert delta.abs().sum() < L1_EPS
    mask = keep_mask(delta.shape, 0.5, KEY)
    assert torch.equal(dare(delta, 0.5, KEY, rescale="l1"), torch.where(mask, delta, 0.0))


# --- magnitude pruning ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "p", "k"),
    [(10, 0.7, 3), (100, 0.29, 71), (3, 0.5, 2), (4, 0.9, 1), (10, 1.0, 0), (10, 0.0, 10)],
)
def test_magnitude_keep_count_is_exact_ceil(n, p, k):
    assert magnitude_keep_count(n, p) == k


def test_magnitude_prune_exact_values():
    delta = torch.tensor([0.25, -1.0, 0.5, -0.125, 0.0])
    # n = 5, p = 0.6 → k = ceil(0.4 · 5) = 2: keep -1.0 and 0.5
    expected = torch.tensor([0.0, -1.0, 0.5, 0.0, 0.0])
    assert torch.equal(magnitude_prune(delta, 0.6), expected)


def test_magnitude_prune_all_ties_keeps_exactly_k_lowest_indices():
    delta = torch.tensor([0.5, -0.5] * 5, dtype=torch.bfloat16)
    out = magnitude_prune(delta, 0.7)  # k = 3
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([0.5, -0.5, 0.5] + [0.0] * 7))


def test_magnitude_prune_ties_at_the_kth_value_go_to_lowest_indices():
    delta = torch.tensor([0.25, 0.5, 1.0, 0.5, 0.5])
    # k = 2: 1.0, then the first 0.5 (index 1)
    assert torch.equal(magnitude_prune(delta, 0.6), torch.tensor([0.0, 0.5, 1.0, 0.0, 0.0]))


def test_magnitude_prune_bf16_like_data_keeps_exactly_k():
    # bf16 deltas take few distinct values: huge tie groups (here 6 values, no zeros).
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(1, 4, (100_000,), generator=generator).float()
    signs = torch.randint(0, 2, (100_000,), generator=generator).float() * 2 - 1
    delta = (levels * signs * 2.0**-10).to(torch.bfloat16)
    for p in (0.1, 0.5, 0.9, 0.99, 0.99999):
        out = magnitude_prune(delta, p)
        kept = out != 0
        assert int(kept.sum()) == magnitude_keep_count(delta.numel(), p)
        assert torch.equal(out[kept], delta.float()[kept])
        if (~kept).any():
            assert out.abs()[kept].min() >= delta.float().abs()[~kept].max()


def test_magnitude_prune_with_many_zero_deltas_never_keeps_more_than_k():
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(-2, 3, (10_000,), generator=generator)
    delta = levels.float() * 2.0**-8  # ~40 % exact zeros
    for p in (0.2, 0.5, 0.9):
        k = magnitude_keep_count(delta.numel(), p)
        assert int((magnitude_prune(delta, p) != 0).sum()) == min(k, int((delta != 0).sum()))


@pytest.mark.parametrize(
    ("rescale", "expected"),
    [
        ("none", [1.0, 0.5, 0.0, 0.0]),
        ("inverse", [2.0, 1.0, 0.0, 0.0]),  # MergeLM use_weight_rescale: / (1 - p)
        ("l1", [1.25, 0.625, 0.0, 0.0]),  # mergekit: · ‖δ‖₁ / ‖kept‖₁ = 1.875 / 1.5
    ],
)
def test_magnitude_prune_rescale_modes(rescale, expected):
    delta = torch.tensor([1.0, 0.5, 0.25, 0.125])
    assert torch.equal(magnitude_prune(delta, 0.5, rescale=rescale), torch.tensor(expected))


def test_magnitude_prune_extremes():
    delta = local_randn(50)
    assert torch.equal(bits(magnitude_prune(delta, 0.0)), bits(delta))
    assert torch.equal(magnitude_prune(delta, 1.0), torch.zeros(50))


# --- sparsify dispatcher -----------------------------------------------------------------


def test_sparsify_dispatches_with_method_defaults():
    delta = local_randn(2048)
    assert torch.equal(
        sparsify(delta, method="dare", drop_rate=0.5, key=KEY), dare(delta, 0.5, KEY, "inverse")
    )
    assert torch.equal(
        sparsify(delta, method="magnitude", drop_rate=0.5), magnitude_prune(delta, 0.5, "none")
    )
    assert torch.equal(sparsify(delta, method="none", drop_rate=0.0), delta)


def test_sparsify_rejects_ignored_or_missing_options():
    delta = torch.ones(4)
    with pytest.raises(ValueError, match="method 'none' does not sparsify"):
        sparsify(delta, method="none", drop_rate=0.5)
    with pytest.raises(ValueError, match="needs a mask key"):
        sparsify(delta, method="dare", drop_rate=0.5)
    with pytest.raises(ValueError, match="sparsification method must be one of"):
        sparsify(delta, method="random", drop_rate=0.5)

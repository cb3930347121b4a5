"""Tests for dareflow.methods.fuse, with exact float32 values."""

from __future__ import annotations

import pytest
import torch

from dareflow.methods.fuse import (
    disjoint_merge,
    elect_sign,
    linear,
    task_arithmetic,
    ties_consensus,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- linear / task arithmetic ------------------------------------------------------------


def test_linear_normalized_weighted_average():
    out = linear([t(1.0, 2.0), t(3.0, 4.0)], [1.0, 3.0])
    assert torch.equal(out, t(2.5, 3.5))  # (1·1 + 3·3)/4, (2 + 12)/4


def test_linear_unnormalized_is_weighted_sum():
    assert torch.equal(linear([t(1.0, 2.0), t(3.0, 4.0)], [1.0, 3.0], normalize=False), t(10, 14))


def test_linear_upcasts_bf16():
    out = linear([t(1.0).bfloat16(), t(2.0).bfloat16()], [1.0, 1.0])
    assert out.dtype == torch.float32
    assert torch.equal(out, t(1.5))


def test_task_arithmetic_exact():
    base = t(1.0, 1.0)
    deltas = [t(0.5, -0.25), t(0.25, 0.25)]
    # Σ w δ = (0.5 + 0.75, -0.25 + 0.75) = (1.25, 0.5); θ = 1 + 0.5 · Σ
    assert torch.equal(task_arithmetic(base, deltas, [1.0, 3.0], scale=0.5), t(1.625, 1.25))
    # normalize: Σ / 4 = (0.3125, 0.125)
    out = task_arithmetic(base, deltas, [1.0, 3.0], normalize=True)
    assert torch.equal(out, t(1.3125, 1.125))


def test_fuse_rejects_zero_weight_sum_and_mismatches():
    with pytest.raises(ValueError, match="sum to 0, cannot normalize"):
        linear([t(1.0), t(2.0)], [1.0, -1.0])
    with pytest.raises(ValueError, match="2 tensors but 1 weights"):
        linear([t(1.0), t(2.0)], [1.0])
    with pytest.raises(ValueError, match="has shape"):
        task_arithmetic(t(0.0), [t(1.0), t(1.0, 2.0)], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least one"):
        linear([], [])


# --- elect sign ------------------------------------------------------------------------
#
# Three models, weights (0.125, 1, 1), three entries:
#   entry 0: δ = (1, -0.25, -0.25):  sum +0.5 | weighted -0.375 | signs (+,-,-) → -1
#   entry 1: δ = (0, -0.5, 0.25):    sum -0.25 | weighted -0.25 | signs (0,-,+) → 0 → +1
#   entry 2: δ = (0.5, -0.5, 0):     sum 0 → +1 | weighted -0.4375 | signs (+,-,0) → 0 → +1

DELTAS = [t(1.0, 0.0, 0.5), t(-0.25, -0.5, -0.5), t(-0.25, 0.25, 0.0)]
WEIGHTS = [0.125, 1.0, 1.0]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("sum", t(1.0, -1.0, 1.0)),  # TIES paper / MergeLM / peft total: unweighted
        ("weighted_sum", t(-1.0, -1.0, -1.0)),  # mergekit sum: elects on w·δ
        ("count", t(-1.0, 1.0, 1.0)),  # mergekit count / peft frequency
    ],
)
def test_elect_sign_variants(mode, expected):
    assert torch.equal(elect_sign(DELTAS, WEIGHTS, mode), expected)


def test_elect_sign_zero_total_and_empty_entries_give_plus_one():
    sign = elect_sign([t(0.5, 0.0), t(-0.5, 0.0)], [1.0, 1.0], "sum")
    assert torch.equal(sign, t(1.0, 1.0))


def test_elect_sign_rejects_unknown_mode():
    with pytest.raises(ValueError, match="sign_election must be one of"):
        elect_sign(DELTAS, WEIGHTS, "majority")


# --- disjoint merge --------------------------------------------------------------------
#
# One entry, δ = (1, 0.5, -0.25), w = (1, 3, 4), sign +1: models 0 and 1 agree.
#   Σ_agree w δ = 1 + 1.5 = 2.5


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("mean", 1.25),  # / #agree = 2 (paper, peft)
        ("weight", 0.625),  # / Σ_agree w = 4 (mergekit normalize: true)
        ("sum", 2.5),  # mergekit normalize: false
    ],
)
def test_disjoint_merge_variants(mode, expected):
    deltas = [t(1.0), t(0.5), t(-0.25)]
    out = disjoint_merge(deltas, [1.0, 3.0, 4.0], t(1.0), mode)
    assert torch.equal(out, t(expected))


def test_disjoint_merge_negative_sign_keeps_negative_contributions():
    deltas = [t(1.0), t(-0.5), t(-0.25)]
    out = disjoint_merge(deltas, [1.0, 1.0, 1.0], t(-1.0), "mean")
    assert torch.equal(out, t(-0.375))


def test_trimmed_zeros_never_agree():
    # the zero of model 1 must not count in the mean
    out = disjoint_merge([t(1.0), t(0.0)], [1.0, 1.0], t(1.0), "mean")
    assert torch.equal(out, t(1.0))


@pytest.mark.parametrize("mode", ["mean", "weight", "sum"])
def test_no_agreeing_model_gives_zero_not_nan(mode):
    deltas = [t(0.0, 0.5), t(0.0, 0.25)]
    out = disjoint_merge(deltas, [1.0, 2.0], t(1.0, -1.0), mode)
    assert torch.equal(out, t(0.0, 0.0))


def test_ties_consensus_paper_example():
    # Trimmed task vectors (TIES Fig. 1 style), unweighted.
    deltas = [t(0.5, -0.25, 0.0), t(0.25, 0.5, -0.5), t(-0.75, 0.0, -0.25)]
    # sum: (0, 0.25, -0.75) → (+1, +1, -1)
    # mean of agreeing: (0.5+0.25)/2, 0.5/1, (-0.5-0.25)/2
    out = ties_consensus(deltas, [1.0, 1.0, 1.0])
    assert torch.equal(out, t(0.375, 0.5, -0.375))

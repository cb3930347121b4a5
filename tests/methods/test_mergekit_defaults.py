"""Each method's defaults compute mergekit 0.1.4's numbers (exact values worked out by hand).

mergekit's generalized task arithmetic, for a tensor: weighted deltas ``w_k δ_k``; with
consensus, the elected sign is the sign of their sum (a zero sum counts positive), a
model agrees where its weighted delta is nonzero with that sign, and the divisor is the
sum of the agreeing weights (only an exact 0 is replaced by 1); without consensus the
divisor is ``Σ w`` (``|Σ w| < 1e-8`` → 1). ties: normalize true, no rescale, magnitude
pruning keeps ``int(density · n)``; dare_ties: normalize false, L1 rescale, no trim
after DARE; dare_linear: L1 rescale, normalize false.
"""

from __future__ import annotations

import pytest
import torch

from dareflow.methods import (
    MergeSpec,
    ModelParams,
    derive_key,
    keep_mask,
    magnitude_keep_count,
    magnitude_prune,
    merge_tensor,
)
from dareflow.methods.table import merge_tensor_reference

NAME = "model.layers.0.self_attn.q_proj.weight"

# base 1; δa = (0.5, -0.25, 0.125, 0), δb = (0.25, 0.5, -0.125, 0)
BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
FT_A = torch.tensor([1.5, 0.75, 1.125, 1.0])
FT_B = torch.tensor([1.25, 1.5, 0.875, 1.0])


def _merge(method: str, *models: ModelParams, **options) -> torch.Tensor:
    spec = MergeSpec(method=method, models=models, **options)
    out = merge_tensor(NAME, BASE, [FT_A, FT_B][: len(models)], spec)
    # the blockwise path and the reference agree on every case here
    assert torch.equal(out, merge_tensor_reference(NAME, BASE, [FT_A, FT_B][: len(models)], spec))
    return out


def test_ties_defaults_normalise_by_the_agreeing_weights():
    out = _merge("ties", ModelParams("a", 0.5), ModelParams("b", 0.5))
    # w·δ: a (0.25, -0.125, 0.0625, 0), b (0.125, 0.25, -0.0625, 0)
    # Σ = (0.375, 0.125, 0, 0): signs +, +, + (a zero sum counts positive), +
    # agreeing: (a b), (b), (a), none (zero deltas never agree)
    # Σ_agree w·δ / Σ_agree w = 0.375/1, 0.25/0.5, 0.0625/0.5, 0 (divisor 0 → 1)
    assert torch.equal(out, torch.tensor([1.375, 1.5, 1.125, 1.0]))
    # the TIES paper's mean over the agreeing models gives half of it where both agree
    paper = _merge("ties", ModelParams("a", 0.5), ModelParams("b", 0.5),
                   sign_election="sum", disjoint_merge="mean")
    assert torch.equal(paper, torch.tensor([1.1875, 1.25, 1.0625, 1.0]))


def test_ties_density_keeps_int_density_n_and_pruned_entries_never_agree():
    out = _merge("ties", ModelParams("a", 0.5, 0.5, density=0.5),
                 ModelParams("b", 0.5, 0.5, density=0.5))
    # int(0.5 · 4) = 2 kept: a (0.5, -0.25, 0, 0), b (0.25, 0.5, 0, 0); pruned entries
    # are zeros: they never agree and are not in the divisor
    assert torch.equal(out, torch.tensor([1.375, 1.5, 1.0, 1.0]))


def test_mergekit_density_keep_count_rounds_the_density_down():
    delta = torch.tensor([0.9, -0.8, 0.7, 0.6, -0.5, 0.4, 0.3, -0.2, 0.1, 0.05])
    # density 0.55 on 10 elements: mergekit keeps int(5.5) = 5; drop rate 0.45 (the
    # same fraction, dareflow's key) drops floor(4.5) = 4, keeping 6 (MergeLM's count)
    assert magnitude_keep_count(10, 0.45, density=0.55) == 5
    assert magnitude_keep_count(10, 0.45) == 6
    kept = magnitude_prune(delta, 0.45, density=0.55)
    assert torch.equal(kept, torch.tensor([0.9, -0.8, 0.7, 0.6, -0.5, 0, 0, 0, 0, 0]))
    assert int((magnitude_prune(delta, 0.45) != 0).sum()) == 6
    # density >= 1 keeps everything; a density too small for one element keeps one
    # (mergekit stops with an assertion there); density 0 keeps none
    assert magnitude_keep_count(10, 0.0, density=1.0) == 10
    assert magnitude_keep_count(10, 0.95, density=0.05) == 1
    assert magnitude_keep_count(10, 1.0, density=0.0) == 0


def test_density_must_match_the_drop_rate():
    with pytest.raises(ValueError, match=r"drop_rate 0.3 is not 1 - density \(0.5\)"):
        ModelParams("a", 1.0, 0.3, density=0.5)


def test_negative_weights_vote_with_their_sign_and_enter_the_divisor():
    # w = (1, -1): w·δb = (-0.25, -0.5, 0.125, 0); Σ = (0.25, -0.75, 0.25, 0)
    # signs +, -, +, +; agreeing: (a), (a b), (a b), none; Σ_agree w: 1, 0 → 1, 0 → 1
    out = _merge("ties", ModelParams("a", 1.0), ModelParams("b", -1.0))
    assert torch.equal(out, torch.tensor([1.5, 0.25, 1.25, 1.0]))
    # w = (1, -2): Σ w·δ = (0 → +, -1.25, 0.375, 0); a negative divisor is used as it is
    # (mergekit only replaces an exact 0): entry 1 = -1.25 / -1, entry 2 = 0.375 / -1
    out = _merge("ties", ModelParams("a", 1.0), ModelParams("b", -2.0))
    assert torch.equal(out, torch.tensor([1.5, 2.25, 0.625, 1.0]))


def test_task_arithmetic_defaults_and_the_weight_sum_guard():
    out = _merge("task_arithmetic", ModelParams("a", 1.0), ModelParams("b", 3.0))
    # normalize false: base + δa + 3 δb
    assert torch.equal(out, torch.tensor([2.25, 2.25, 0.75, 1.0]))
    # normalize true with Σ w = 0: mergekit divides by 1 instead (base + δa − δb)
    out = _merge("task_arithmetic", ModelParams("a", 1.0), ModelParams("b", -1.0),
                 normalize=True)
    assert torch.equal(out, torch.tensor([1.25, 0.25, 1.25, 1.0]))
    # linear has no base to fall back on: Σ w = 0 is refused
    with pytest.raises(ValueError, match="sum to 0, cannot normalize"):
        MergeSpec(method="linear", models=(ModelParams("a", 1.0), ModelParams("b", -1.0)))


def test_linear_default_normalises():
    spec = MergeSpec(method="linear", models=(ModelParams("a", 1.0), ModelParams("b", 3.0)))
    # (θa + 3 θb) / 4
    assert torch.equal(merge_tensor(NAME, None, [FT_A, FT_B], spec),
                       torch.tensor([1.3125, 1.3125, 0.9375, 1.0]))


N = 4096


def _l1_rescaled(delta: float, mask: torch.Tensor) -> torch.Tensor:
    """DARE with mergekit's rescale: kept × ‖δ‖₁ / ‖kept‖₁ (a constant delta here)."""
    kept = torch.where(mask, torch.full((N,), delta), 0.0)
    return kept * ((abs(delta) * N) / (abs(delta) * int(mask.sum())))


def test_dare_ties_defaults_weighted_election_sum_l1_no_trim():
    base = torch.ones(N)
    fts = [base + 0.25, base - 0.5]  # δa = 0.25 (w 3), δb = -0.5 (w 1)
    spec = MergeSpec(method="dare_ties", models=(ModelParams("a", 3.0, 0.5),
                                                 ModelParams("b", 1.0, 0.5)), seed=7)
    out = merge_tensor(NAME, base, fts, spec)
    ma = keep_mask((N,), 0.5, derive_key(7, "a", NAME))
    mb = keep_mask((N,), 0.5, derive_key(7, "b", NAME))
    da, db = _l1_rescaled(0.25, ma), _l1_rescaled(-0.5, mb)
    # where both are kept the weighted sum 3·0.25·fa − 0.5·fb > 0 elects +, so only a
    # counts (an unweighted election would pick b); 'sum': no division
    expected = 1.0 + torch.where(ma, da * 3.0, torch.where(mb, db * 1.0, 0.0))
    assert torch.equal(out, expected)
    # no trim after DARE: every entry some model kept is nonzero (about 3/4)
    assert int((out != 1.0).sum()) == int((ma | mb).sum())
    # the L1 rescale keeps each model's L1 norm
    assert float(da.abs().sum()) == pytest.approx(0.25 * N, rel=1e-6)


def test_dare_ties_disjoint_sum_adds_the_agreeing_deltas():
    base = torch.ones(N)
    fts = [base + 0.25, base + 0.5]
    spec = MergeSpec(method="dare_ties", models=(ModelParams("a", 1.0, 0.5),
                                                 ModelParams("b", 1.0, 0.5)), seed=7)
    out = merge_tensor(NAME, base, fts, spec)
    ma = keep_mask((N,), 0.5, derive_key(7, "a", NAME))
    mb = keep_mask((N,), 0.5, derive_key(7, "b", NAME))
    # both agree wherever kept; normalize false: their sum, not their mean
    expected = 1.0 + (_l1_rescaled(0.25, ma) * 1.0 + _l1_rescaled(0.5, mb) * 1.0)
    assert torch.equal(out, expected)


def test_dare_linear_defaults_l1_rescale_no_normalisation():
    base = torch.ones(N)
    fts = [base + 0.25, base - 0.5]
    spec = MergeSpec(method="dare_linear", models=(ModelParams("a", 0.5, 0.5),
                                                   ModelParams("b", 0.5, 0.5)), seed=7)
    out = merge_tensor(NAME, base, fts, spec)
    ma = keep_mask((N,), 0.5, derive_key(7, "a", NAME))
    mb = keep_mask((N,), 0.5, derive_key(7, "b", NAME))
    expected = 1.0 + (_l1_rescaled(0.25, ma) * 0.5 + _l1_rescaled(-0.5, mb) * 0.5)
    assert torch.equal(out, expected)

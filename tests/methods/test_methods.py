"""Tests for dareflow.methods.table: the table, the spec and merge_tensor."""

from __future__ import annotations

import pytest
import torch

from dareflow.methods import (
    MERGELM_TIES_TRIM,
    METHODS,
    MergeSpec,
    ModelParams,
    derive_key,
    get_method,
    keep_mask,
    magnitude_keep_count,
    merge_tensor,
)
from tests.methods.helpers import local_randn

NAME = "model.layers.3.mlp.up_proj.weight"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def spec(method: str, *models: tuple[str, float, float], **options) -> MergeSpec:
    return MergeSpec(
        method=method,
        models=tuple(ModelParams(model_id=m, weight=w, drop_rate=p) for m, w, p in models),
        **options,
    )


# Small exact fixture: base 1, δa = (0.5, -0.25, 0.125, 0), δb = (0.25, 0.5, -0.125, 0).
BASE = t(1.0, 1.0, 1.0, 1.0)
FT_A = t(1.5, 0.75, 1.125, 1.0)
FT_B = t(1.25, 1.5, 0.875, 1.0)


# --- the table --------------------------------------------------------------------------


def test_methods_table_rows():
    assert set(METHODS) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_linear",
    }
    for method_id, row in METHODS.items():
        assert row.id == method_id
        assert row.needs_base == (method_id != "linear")
        assert (row.default_normalize is None) == (row.consensus == "ties")
        assert (row.default_rescale is None) == (row.sparsification == "none")
        assert row.summary and row.reference and row.peer_notes
        ties = row.consensus == "ties"
        assert (row.default_sign_election is None) == (not ties)
        assert (row.default_disjoint_merge is None) == (not ties)
    assert (METHODS["dare_ties"].sparsification, METHODS["dare_ties"].consensus) == ("dare", "ties")
    # mergekit 0.1.4's defaults (registry.py + generalized_task_arithmetic.py)
    defaults = {m: (r.default_rescale, r.default_normalize, r.default_sign_election,
                    r.default_disjoint_merge) for m, r in METHODS.items()}
    assert defaults == {
        "linear": (None, True, None, None),
        "task_arithmetic": (None, False, None, None),
        "ties": ("none", None, "weighted_sum", "weight"),  # normalize: true
        "dare_linear": ("l1", False, None, None),
        "dare_ties": ("l1", None, "weighted_sum", "sum"),  # normalize: false
        "magnitude_linear": ("none", False, None, None),
    }


def test_get_method_unknown_name_says_did_you_mean():
    with pytest.raises(KeyError) as info:
        get_method("dare_tie")
    message = str(info.value)
    assert "unknown merge method 'dare_tie'; did you mean 'dare_ties'? choices: " in message
    assert "dare_linear, dare_ties, linear, magnitude_linear, task_arithmetic, ties" in message


def test_get_method_no_close_match_still_lists_choices():
    with pytest.raises(KeyError, match="unknown merge method 'slerp'; choices: dare_linear"):
        get_method("slerp")


# --- spec validation ----------------------------------------------------------------------


def test_model_params_rejects_drop_rate_out_of_range():
    with pytest.raises(ValueError, match=r"model 'x': drop_rate must be in \[0, 1\], got 1.5"):
        ModelParams("x", drop_rate=1.5)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        ModelParams("x", weight=float("nan"))
    with pytest.raises(ValueError, match="model_id must be a non-empty str"):
        ModelParams("")


def test_spec_unknown_method_is_a_key_error_with_suggestion():
    with pytest.raises(KeyError, match="did you mean 'dare_ties'"):
        spec("dare_tie", ("a", 1.0, 0.5))


@pytest.mark.parametrize(
    ("method", "models", "options", "message"),
    [
        ("ties", [("a", 1, 0.5), ("a", 1, 0.5)], {}, "appears twice"),
        ("ties", [("a", 1, 0.5)], {"normalize": True}, "disjoint_merge"),
        ("linear", [("a", 1, 0)], {"rescale": "l1"}, "rescale 'l1' would be ignored"),
        ("linear", [("a", 1, 0)], {"scale": 0.5}, "'linear' has no λ"),
        ("dare_linear", [("a", 1, 0.5)], {"trim_after_dare": 0.5}, "only dare_ties"),
        ("dare_ties", [("a", 1, 0.5)], {"trim_after_dare": 1.5}, r"trim_after_dare must be in"),
        ("task_arithmetic", [("a", 1, 0.5)], {}, "drop_rate 0.5 would be ignored"),
        ("task_arithmetic", [("a", 1, 0)], {"disjoint_merge": "weight"}, "no TIES consensus"),
        ("ties", [("a", 1, 0.5)], {"sign_election": "majority"}, "sign_election must be one of"),
        ("dare_ties", [("a", 1, 0.5)], {"rescale": "l2"}, "rescale must be one of"),
        ("linear", [("a", 1, 0), ("b", -1, 0)], {}, "sum to 0, cannot normalize"),
        ("linear", [("a", 1, 0)], {"out_dtype": torch.int8}, "out_dtype"),
        ("linear", [], {}, "non-empty"),
    ],
)
def test_spec_rejects_invalid_or_ignored_options(method, models, options, message):
    with pytest.raises(ValueError, match=message):
        spec(method, *models, **options)


def test_spec_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        spec("ties", ("a", 1.0, 0.5), normalize=True, trim_after_dare=0.5, seed="0")
    message = str(info.value)
    assert "normalize would be ignored" in message
    assert "trim_after_dare 0.5 would be ignored" in message
    assert "seed must be an int" in message


def test_spec_resolves_method_defaults():
    dare_spec = spec("dare_linear", ("a", 1.0, 0.5))
    assert dare_spec.resolved_rescale == "l1"
    assert dare_spec.resolved_normalize is False
    assert dare_spec.resolved_sign_election is None and dare_spec.resolved_disjoint_merge is None
    ties_spec = spec("ties", ("a", 1.0, 0.5))
    assert ties_spec.resolved_rescale == "none"
    assert (ties_spec.resolved_sign_election, ties_spec.resolved_disjoint_merge) == (
        "weighted_sum", "weight")
    dare_ties = spec("dare_ties", ("a", 1.0, 0.5), sign_election="count")
    assert (dare_ties.resolved_sign_election, dare_ties.resolved_disjoint_merge) == (
        "count", "sum")
    assert dare_ties.trim_after_dare == 0.0
    assert spec("linear", ("a", 1.0, 0.0)).resolved_normalize is True
    assert spec("linear", ("a", 1.0, 0.0)).resolved_rescale is None
    listed = MergeSpec(method="linear", models=[ModelParams("a")])
    assert isinstance(listed.models, tuple)


# --- merge_tensor: exact values for every method --------------------------------------------


def test_linear_exact():
    out = merge_tensor(NAME, None, [FT_A, FT_B], spec("linear", ("a", 1.0, 0), ("b", 3.0, 0)))
    assert torch.equal(out, t(1.3125, 1.3125, 0.9375, 1.0))


def test_linear_ignores_a_given_base():
    s = spec("linear", ("a", 1.0, 0), ("b", 3.0, 0))
    assert torch.equal(
        merge_tensor(NAME, BASE * 100, [FT_A, FT_B], s), merge_tensor(NAME, None, [FT_A, FT_B], s)
    )


def test_task_arithmetic_exact():
    s = spec("task_arithmetic", ("a", 1.0, 0), ("b", 3.0, 0), scale=0.5)
    # Σ w δ = (1.25, 1.25, -0.25, 0); θ = 1 + 0.5 · Σ
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], s), t(1.625, 1.625, 0.875, 1.0))


def test_ties_exact_paper_variant():
    s = spec("ties", ("a", 1.0, 0.5), ("b", 3.0, 0.5), sign_election="sum",
             disjoint_merge="mean")
    # trim (k = 2): a → (0.5, -0.25, 0, 0), b → (0.25, 0.5, 0, 0)
    # elect (unweighted sum): (+, +, +, +); mean of agreeing w·δ:
    #   (0.5 + 0.75)/2 = 0.625, 1.5/1 = 1.5, 0, 0
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], s), t(1.625, 2.5, 1.0, 1.0))


def test_ties_exact_mergekit_variant():
    s = spec(
        "ties",
        ("a", 1.0, 0.5),
        ("b", 3.0, 0.5),
        sign_election="weighted_sum",
        disjoint_merge="weight",
    )
    # Σ_agree w·δ / Σ_agree w: 1.25/4 = 0.3125, 1.5/3 = 0.5
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], s), t(1.3125, 1.5, 1.0, 1.0))
    # ... which is what ties computes when no option is given (mergekit's defaults)
    default = spec("ties", ("a", 1.0, 0.5), ("b", 3.0, 0.5))
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], default), t(1.3125, 1.5, 1.0, 1.0))


def test_magnitude_linear_exact():
    s = spec("magnitude_linear", ("a", 1.0, 0.5), ("b", 3.0, 0.5))
    # trimmed as in ties; Σ w δ̂ = (0.5 + 0.75, -0.25 + 1.5, 0, 0)
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], s), t(2.25, 2.25, 1.0, 1.0))


def test_dare_linear_p0_is_task_arithmetic():
    s = spec("dare_linear", ("a", 1.0, 0.0), ("b", 3.0, 0.0), scale=0.5)
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], s), t(1.625, 1.625, 0.875, 1.0))


def test_dare_ties_p0_is_ties_without_trim():
    s = spec("dare_ties", ("a", 1.0, 0.0), ("b", 3.0, 0.0), sign_election="sum",
             disjoint_merge="mean")
    # elect on raw deltas: sums (0.75, 0.25, 0 → +, 0); agreeing means:
    #   0.625, 1.5, a's 0.125 alone (b's -0.375 disagrees), 0
    assert torch.equal(merge_tensor(NAME, BASE, [FT_A, FT_B], s), t(1.625, 2.5, 1.125, 1.0))


def _dare_fixture(n: int = 4096):
    base = torch.ones(n)
    ft_a = base + 0.25  # δa = 0.25
    ft_b = base - 0.5  # δb = -0.5
    mask_a = keep_mask((n,), 0.5, derive_key(7, "a", NAME))
    mask_b = keep_mask((n,), 0.5, derive_key(7, "b", NAME))
    return base, ft_a, ft_b, mask_a, mask_b


def test_dare_linear_exact_with_known_masks():
    base, ft_a, ft_b, mask_a, mask_b = _dare_fixture()
    s = spec("dare_linear", ("a", 1.0, 0.5), ("b", 3.0, 0.5), seed=7, rescale="inverse")
    # δ̂ = δ / (1 − 0.5) where kept: a → 0.5, b → -1.0
    expected = 1.0 + torch.where(mask_a, 0.5, 0.0) + 3.0 * torch.where(mask_b, -1.0, 0.0)
    assert torch.equal(merge_tensor(NAME, base, [ft_a, ft_b], s), expected)


def test_dare_ties_exact_with_known_masks():
    base, ft_a, ft_b, mask_a, mask_b = _dare_fixture()
    s = spec("dare_ties", ("a", 1.0, 0.5), ("b", 1.0, 0.5), seed=7, rescale="inverse",
             sign_election="sum", disjoint_merge="mean")
    # δ̂a ∈ {0, 0.5}, δ̂b ∈ {0, -1}: wherever b is kept the sum is negative and only
    # b agrees (-1); where only a is kept, +0.5; nothing kept → 0.
    expected = 1.0 + torch.where(mask_b, -1.0, torch.where(mask_a, 0.5, 0.0))
    assert torch.equal(merge_tensor(NAME, base, [ft_a, ft_b], s), expected)


def test_dare_ties_trim_after_dare_is_a_ties_trim():
    base = torch.ones(1000)
    fts = [base + 0.01 * local_randn(1000, seed=s) for s in (1, 2)]
    paper = {"sign_election": "sum", "disjoint_merge": "mean"}
    via_dare = spec("dare_ties", ("a", 1.0, 0.0), ("b", 1.0, 0.0), trim_after_dare=0.5, **paper)
    via_ties = spec("ties", ("a", 1.0, 0.5), ("b", 1.0, 0.5), **paper)
    assert torch.equal(
        merge_tensor(NAME, base, fts, via_dare), merge_tensor(NAME, base, fts, via_ties)
    )


def test_dare_ties_mergelm_recipe_keeps_the_trimmed_fraction():
    base = torch.zeros(10_000)
    ft = local_randn(10_000, seed=3)
    s = spec("dare_ties", ("a", 1.0, 0.5), trim_after_dare=MERGELM_TIES_TRIM,
             rescale="inverse", sign_election="sum", disjoint_merge="mean")
    out = merge_tensor(NAME, base, [ft], s)
    kept_after_dare = int(keep_mask((10_000,), 0.5, derive_key(0, "a", NAME)).sum())
    assert int((out != 0).sum()) == magnitude_keep_count(10_000, MERGELM_TIES_TRIM)
    assert int((out != 0).sum()) < kept_after_dare


# --- merge_tensor: determinism ---------------------------------------------------------------


def _random_layer(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = 0.02 * local_randn(128, 96, seed=seed)
    return base, [base + 0.003 * local_randn(128, 96, seed=seed + k) for k in (1, 2, 3)]


DARE_TIES = spec("dare_ties", ("a", 1.0, 0.9), ("b", 0.5, 0.9), ("c", 0.25, 0.9), seed=5)


def test_merge_depends_on_names_not_call_order():
    layers = {name: _random_layer(seed) for seed, name in enumerate(["x.weight", "y.weight"])}
    first = {name: merge_tensor(name, b, f, DARE_TIES) for name, (b, f) in layers.items()}
    second = {
        name: merge_tensor(name, b, f, DARE_TIES) for name, (b, f) in reversed(layers.items())
    }
    assert all(torch.equal(first[name], second[name]) for name in layers)
    base, fts = layers["x.weight"]
    assert not torch.equal(merge_tensor("y.weight", base, fts, DARE_TIES), first["x.weight"])


def test_merge_masks_depend_on_model_ids():
    base, fts = _random_layer(0)
    renamed = spec("dare_ties", ("a", 1.0, 0.9), ("b2", 0.5, 0.9), ("c", 0.25, 0.9), seed=5)
    assert not torch.equal(
        merge_tensor(NAME, base, fts, DARE_TIES), merge_tensor(NAME, base, fts, renamed)
    )


def test_merge_is_identical_across_thread_counts(restore_threads):
    base, fts = _random_layer(0)
    torch.set_num_threads(1)
    one = merge_tensor(NAME, base, fts, DARE_TIES)
    torch.set_num_threads(2)
    torch.manual_seed(99)
    two = merge_tensor(NAME, base, fts, DARE_TIES)
    assert torch.equal(one, two)


# --- merge_tensor: bf16 in, float32 math, one cast ------------------------------------------


def test_bf16_merge_is_float32_math_cast_once():
    base32, fts32 = _random_layer(4)
    base, fts = base32.bfloat16(), [f.bfloat16() for f in fts32]
    s = spec(
        "dare_linear",
        ("a", 0.5, 0.9),
        ("b", 0.25, 0.9),
        ("c", 0.25, 0.9),
        scale=0.75,
        rescale="inverse",
        out_dtype=torch.bfloat16,
    )
    out = merge_tensor(NAME, base, fts, s)
    assert out.dtype == torch.bfloat16

    # Reference, written out in float32 and cast once.
    b32 = base.float()
    total = torch.zeros_like(b32)
    for model, ft in zip(s.models, fts):
        mask = keep_mask(b32.shape, 0.9, derive_key(0, model.model_id, NAME))
        delta_hat = torch.where(mask, ft.float() - b32, 0.0) / (1 - 0.9)
        total = total + delta_hat * model.weight
    reference = (b32 + 0.75 * total).to(torch.bfloat16)
    assert torch.equal(out, reference)

    # The same arithmetic in bf16 gives a different tensor: the test has teeth.
    naive = base.clone()
    for model, ft in zip(s.models, fts):
        mask = keep_mask(b32.shape, 0.9, derive_key(0, model.model_id, NAME))
        naive = naive + 0.75 * model.weight * torch.where(mask, ft - base, 0.0) / (1 - 0.9)
    assert not torch.equal(out, naive)


# --- merge_tensor: errors -------------------------------------------------------------------


def test_nan_delta_names_tensor_and_model():
    ft_x = FT_A.repeat(8)
    ft_x[:10] = float("nan")
    ft_x[10:12] = float("inf")
    s = spec("task_arithmetic", ("ok", 1.0, 0), ("x", 1.0, 0))
    with pytest.raises(ValueError) as info:
        merge_tensor(NAME, BASE.repeat(8), [FT_B.repeat(8), ft_x], s)
    assert f"tensor '{NAME}' of model 'x' has 12 NaN/Inf values in its delta" in str(info.value)


def test_nan_in_base_blames_the_base():
    base = BASE.clone()
    base[0] = float("inf")
    with pytest.raises(ValueError, match="of the base model has 1 NaN/Inf"):
        merge_tensor(NAME, base, [FT_A], spec("task_arithmetic", ("a", 1.0, 0)))


def test_nan_in_linear_weights_names_the_model():
    bad = FT_B.clone()
    bad[1] = float("nan")
    s = spec("linear", ("a", 1.0, 0), ("b", 1.0, 0))
    with pytest.raises(ValueError, match="of model 'b' has 1 NaN/Inf values in its weights"):
        merge_tensor(NAME, None, [FT_A, bad], s)


def test_integer_tensors_are_refused_clearly():
    ints = torch.arange(4)
    s = spec("task_arithmetic", ("a", 1.0, 0))
    with pytest.raises(ValueError, match=r"'position_ids' of the base model has dtype torch.int64"):
        merge_tensor("position_ids", ints, [ints], s)
    with pytest.raises(ValueError, match=r"of model 'a' has dtype torch.int64; only floating"):
        merge_tensor("position_ids", ints.float(), [ints], s)


def test_missing_base_and_count_mismatch():
    with pytest.raises(ValueError, match="needs the base model's tensor"):
        merge_tensor(NAME, None, [FT_A], spec("ties", ("a", 1.0, 0.5)))
    with pytest.raises(ValueError, match="got 1 fine-tuned tensors for 2 models"):
        merge_tensor(NAME, BASE, [FT_A], spec("ties", ("a", 1.0, 0.5), ("b", 1.0, 0.5)))
    with pytest.raises(ValueError, match="has shape"):
        merge_tensor(NAME, BASE, [t(1.0, 2.0)], spec("ties", ("a", 1.0, 0.5)))

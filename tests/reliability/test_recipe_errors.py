"""Recipe errors: each names the key, the value, what is wrong and the fix; they are
all reported together, before any model is opened, and no output is written."""

from __future__ import annotations

import pytest

from dareflow.errors import ProblemsError
from dareflow.recipe import parse_recipe
from tests.reliability.conftest import refused


def _problems(data: dict) -> list[str]:
    with pytest.raises(ProblemsError) as caught:
        parse_recipe(data, "r.yaml")
    return caught.value.problems


def _dare(**params) -> dict:
    return {"merge_method": "dare_linear", "base_model": "base",
            "models": [{"model": "a", "parameters": params}]}


def test_drop_rate_outside_zero_one():
    assert _problems(_dare(drop_rate=1.5)) == [
        "models.0.parameters.drop_rate: Input should be less than or equal to 1 (got 1.5)"]
    assert _problems(_dare(density=-0.1)) == [
        "models.0.parameters.density: Input should be greater than or equal to 0 (got -0.1)"]


def test_both_drop_rate_and_density():
    assert _problems(_dare(drop_rate=0.9, density=0.1)) == [
        ("models[0].parameters: give either drop_rate (p, the fraction of delta parameters "
        "dropped) or density (= 1 - p), not both (got drop_rate=0.9, density=0.1)")]


def test_unknown_method_says_did_you_mean():
    data = {**_dare(drop_rate=0.5), "merge_method": "dare_tie"}
    problems = _problems(data)
    assert problems[0].startswith(
        "merge_method: unknown merge method 'dare_tie'; did you mean 'dare_ties'? choices: ")
    assert "task_arithmetic" in problems[0] and len(problems) == 1


def test_non_finite_weight():
    # negative weights are accepted (mergekit's task-vector subtraction); NaN is not
    assert _problems(_dare(drop_rate=0.5, weight=float("nan"))) == [
        "models.0.parameters.weight: Input should be a finite number (got nan)"]


def test_bare_filter_entry_is_refused_with_the_fix():
    # mergekit accepts a list of {filter, value} entries but fails on a bare one
    problems = _problems(_dare(drop_rate=0.5, weight={"filter": "mlp", "value": 0.8}))
    assert problems == [
        ("models.0.parameters.weight: a {filter, value} entry must be inside a list "
         "(mergekit cannot read a bare one): write it as `- filter: ...` / `  value: ...` "
         "(got {'filter': 'mlp', 'value': 0.8})")]


def test_per_model_method_option_is_refused_with_the_other_problems():
    data = _dare(drop_rate=2.0, normalize=True)
    assert _problems(data) == [
        ("models[0].parameters.normalize: 'normalize' is a method-wide option, not a "
         "per-model one (mergekit would silently ignore it here); move it to the "
         "top-level parameters:"),
        "models.0.parameters.drop_rate: Input should be less than or equal to 1 (got 2.0)",
    ]


def test_all_zero_weights():
    data = {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 0}},
                       {"model": "b", "parameters": {"weight": 0.0}}]}
    assert _problems(data) == [
        "models: every weight is 0, so the merge would ignore all models"]


def test_unknown_keys_are_named_and_all_problems_reported_together():
    data = {**_dare(drop_rate=2.0), "sed": 3, "parameters": {"lamda": 0.5}}
    assert _problems(data) == [
        "models.0.parameters.drop_rate: Input should be less than or equal to 1 (got 2.0)",
        ("parameters.lamda: unknown key (not a dareflow or mergekit option); remove it or "
        "fix its spelling (got 0.5)"),
        ("sed: unknown key (not a dareflow or mergekit option); remove it or fix its "
        "spelling (got 3)"),
    ]


def test_trust_remote_code_is_not_a_recipe_option():
    # nothing in a recipe can switch remote code on: the key is unknown
    assert _problems({**_dare(drop_rate=0.5), "trust_remote_code": True}) == [
        ("trust_remote_code: unknown key (not a dareflow or mergekit option); remove it or "
        "fix its spelling (got True)")]


def test_a_bad_recipe_writes_nothing_and_keeps_the_old_output(pico_family, tmp_path):
    recipe = {"merge_method": "dare_linear", "base_model": str(pico_family["base"]),
              "models": [{"model": str(pico_family["a"]),
                          "parameters": {"drop_rate": 0.3, "density": 0.7}}]}
    msg = refused(recipe, tmp_path)
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}: 1 problem:\n  - models[0].parameters: "
                          "give either drop_rate")

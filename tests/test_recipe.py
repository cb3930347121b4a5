import textwrap

import pytest

from dareflow.errors import ProblemsError
from dareflow.recipe import (
    drop_rate_of,
    fine_tunes,
    load_recipe,
    parse_recipe,
    weight_of,
)


def _recipe(**overrides):
    data = {
        "merge_method": "dare_linear",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"drop_rate": 0.3}},
            {"model": "b", "parameters": {"density": 0.6, "weight": 0.5}},
        ],
    }
    data.update(overrides)
    return data


def test_drop_rate_and_density_resolve_per_model():
    recipe = parse_recipe(_recipe())
    a, b = fine_tunes(recipe)
    assert drop_rate_of(recipe, a) == pytest.approx(0.3)
    assert drop_rate_of(recipe, b) == pytest.approx(0.4)
    assert weight_of(recipe, a) == 1.0 and weight_of(recipe, b) == 0.5


def test_top_level_parameters_are_defaults():
    recipe = parse_recipe(_recipe(
        models=[{"model": "a"}, {"model": "b", "parameters": {"drop_rate": 0.9}}],
        parameters={"density": 0.8, "weight": 0.25, "lambda": 0.7},
    ))
    a, b = fine_tunes(recipe)
    assert drop_rate_of(recipe, a) == pytest.approx(0.2)
    assert drop_rate_of(recipe, b) == pytest.approx(0.9)
    assert weight_of(recipe, a) == 0.25
    assert recipe.parameters.scale == 0.7


def test_every_problem_is_listed_in_one_error():
    data = _recipe(
        models=[
            {"model": "a", "parameters": {"drop_rate": 1.5}},
            {"model": "b", "parameters": {"wieght": 1.0}},
        ],
        dtype="int8",
        extra_key=1,
    )
    with pytest.raises(ProblemsError) as info:
        parse_recipe(data, "r.yaml")
    message = str(info.value)
    assert message.startswith("r.yaml: 4 problems:")
    assert "models.0.parameters.drop_rate: Input should be less than or equal to 1 (got 1.5)" in message
    assert "models.1.parameters.wieght: unknown key" in message
    assert "dtype: Input should be 'float32', 'bfloat16' or 'float16' (got 'int8')" in message
    assert "extra_key: unknown key" in message


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ProblemsError, match=r"unknown merge method 'dare_tie'; did you mean "
                       r"'dare_ties'\? choices: dare_linear, dare_ties, linear, magnitude_linear"):
        parse_recipe(_recipe(merge_method="dare_tie"))


def test_drop_rate_and_density_together_are_refused():
    data = _recipe(models=[{"model": "a", "parameters": {"drop_rate": 0.3, "density": 0.7}}])
    with pytest.raises(ProblemsError, match=r"models\[0\]\.parameters: give either drop_rate"):
        parse_recipe(data)


def test_dare_without_a_rate_is_refused():
    with pytest.raises(ProblemsError, match="model 'a': merge_method 'dare_linear' needs a drop rate"):
        parse_recipe(_recipe(models=[{"model": "a"}]))


def test_rate_on_a_method_that_does_not_sparsify_is_refused():
    with pytest.raises(ProblemsError, match=r"density: merge_method 'task_arithmetic' does not "
                       r"sparsify deltas.*use dare_linear"):
        parse_recipe(_recipe(merge_method="task_arithmetic",
                             models=[{"model": "a", "parameters": {"density": 0.5}}]))


def test_base_is_required_for_delta_methods():
    data = _recipe(base_model=None)
    del data["base_model"]
    with pytest.raises(ProblemsError, match="'dare_linear' needs base_model"):
        parse_recipe(data)


def test_mergekit_style_base_listed_among_models_is_the_base():
    recipe = parse_recipe({
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "a", "parameters": {"density": 0.5}}],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "bfloat16",
    })
    assert [m.model for m in fine_tunes(recipe)] == ["a"]


def test_ties_options_on_linear_methods_are_refused():
    with pytest.raises(ProblemsError, match="parameters.sign_election: only TIES methods"):
        parse_recipe(_recipe(parameters={"sign_election": "count"}))


def test_load_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe '.*missing.yaml' does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    with pytest.raises(ProblemsError, match="bad.yaml: 1 problem:\n  - not valid YAML"):
        load_recipe(bad)


def test_load_recipe_reads_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""
        merge_method: dare_ties
        base_model: base
        models:
          - model: a
            parameters: {density: 0.5, weight: 0.5}
        parameters: {trim_after_dare: 0.2}
        seed: 7
    """))
    recipe = load_recipe(path)
    assert recipe.seed == 7 and recipe.parameters.trim_after_dare == 0.2


@pytest.mark.parametrize(("given", "expected"), [(True, "l1"), (False, "none"), ("inverse", "inverse")])
def test_mergekit_boolean_rescale(given, expected):
    recipe = parse_recipe(_recipe(parameters={"rescale": given}))
    assert recipe.parameters.rescale == expected


@pytest.mark.parametrize(("model", "expected"), [
    ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1"),
    ("org/name@abc123", "org/name"),
    ("hf://org/name", "org/name"),
    ("/data/models/ft-a/", "ft-a"),
    ("./ft-a", "ft-a"),
    ("family/arithmetic/v2", "v2"),
    ("s3://bucket/prefix/ft-b", "ft-b"),
])
def test_mask_id_drops_the_location(model, expected):
    from dareflow.recipe import mask_id

    assert mask_id(model) == expected


def test_colliding_mask_ids_fall_back_to_full_strings():
    from dareflow.recipe import mask_ids

    recipe = parse_recipe(_recipe(models=[
        {"model": "/x/model", "parameters": {"drop_rate": 0.1}},
        {"model": "/y/model", "parameters": {"drop_rate": 0.1}},
    ]))
    assert mask_ids(recipe) == {"/x/model": "/x/model", "/y/model": "/y/model"}

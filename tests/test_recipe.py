import textwrap

import pytest

from dareflow.errors import ProblemsError
from dareflow.recipe import (
    drop_rate_of,
    fine_tunes,
    is_per_tensor,
    load_recipe,
    parse_recipe,
    rate_of,
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


def test_dare_without_a_rate_drops_nothing_as_mergekit():
    # mergekit's density default is 1 for every sparsifying method: nothing dropped
    recipe = parse_recipe(_recipe(models=[{"model": "a"}]))
    assert drop_rate_of(recipe, fine_tunes(recipe)[0]) == 0.0
    assert rate_of(recipe, fine_tunes(recipe)[0]) == (0.0, None)


def test_density_is_kept_for_mergekit_keep_count():
    recipe = parse_recipe(_recipe())
    a, b = fine_tunes(recipe)
    assert rate_of(recipe, a) == (0.3, None)  # drop_rate given
    assert rate_of(recipe, b) == (0.4, 0.6)  # density given: kept as written


def test_negative_weights_are_accepted():
    recipe = parse_recipe(_recipe(merge_method="task_arithmetic", models=[
        {"model": "a", "parameters": {"weight": 1.0}},
        {"model": "b", "parameters": {"weight": -0.5}}]))
    assert [weight_of(recipe, m) for m in fine_tunes(recipe)] == [1.0, -0.5]


def test_gradients_and_filters_parse_and_resolve():
    recipe = parse_recipe(_recipe(
        models=[{"model": "a", "parameters": {
            "weight": [0, 0.3, 0.7, 1],
            "drop_rate": [{"filter": "mlp", "value": 0.5},
                          {"filter": "*", "value": [0.1, 0.9]}]}},
                {"model": "b", "parameters": {"weight": [{"filter": "self_attn", "value": 2}]}}],
        parameters={"weight": 0.25, "density": [{"filter": "lm_head", "value": 1.0}]},
    ))
    a, b = fine_tunes(recipe)
    assert [weight_of(recipe, a, "x", t) for t in (0, 1 / 3, 2 / 3, 1)] == [0, 0.3, 0.7, 1]
    assert weight_of(recipe, a, "x", 0.5) == 0.5  # between 0.3 and 0.7
    assert drop_rate_of(recipe, a, "model.layers.0.mlp.up_proj.weight", 0) == 0.5
    assert drop_rate_of(recipe, a, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert drop_rate_of(recipe, a, "model.layers.0.self_attn.q_proj.weight", 1) == 0.9
    # b: its own filter where it matches, else the top-level weight; top-level density
    # filter only for lm_head, else mergekit's default (nothing dropped)
    assert weight_of(recipe, b, "model.layers.0.self_attn.o_proj.weight") == 2.0
    assert weight_of(recipe, b, "model.layers.0.mlp.up_proj.weight") == 0.25
    assert rate_of(recipe, b, "lm_head.weight") == (0.0, 1.0)
    assert rate_of(recipe, b, "model.norm.weight") == (0.0, None)
    assert is_per_tensor(recipe)
    assert not is_per_tensor(parse_recipe(_recipe()))


@pytest.mark.parametrize(("params", "problem"), [
    ({"weight": {"filter": "mlp", "value": 1}},
     "models.0.parameters.weight: a {filter, value} entry must be inside a list"),
    ({"weight": []}, "models.0.parameters.weight: an empty list gives no value"),
    ({"density": [0.5, 1.5]}, ("models.0.parameters.density: gradient [0.5, 1.5]: Input "
     "should be less than or equal to 1 (got 1.5)")),
    ({"drop_rate": [{"filter": "mlp", "value": [0.1, -1]}]},
     ("models.0.parameters.drop_rate: entry 0: gradient [0.1, -1]: Input should be greater "
     "than or equal to 0 (got -1)")),
    ({"weight": [{"filter": "mlp"}]}, "models.0.parameters.weight: entry 0: `value` is missing"),
    ({"weight": [{"fliter": "mlp", "value": 1}]},
     "models.0.parameters.weight: entry 0: unknown key(s) ['fliter']"),
    ({"weight": [1, {"value": 1}]}, ("models.0.parameters.weight: entry 0: a list must hold "
     "only numbers (a gradient) or only {filter, value} entries, got 1 among entries")),
    ({"weight": [{"filter": 3, "value": 1}]},
     "models.0.parameters.weight: entry 0: `filter` must be a string"),
    ({"weight": "heavy"}, ("models.0.parameters.weight: Input should be a number, a list of "
     "numbers (a gradient over the layers) or a list of {filter, value} entries (got 'heavy')")),
    ({"normalize": True}, ("models[0].parameters.normalize: 'normalize' is a method-wide "
     "option, not a per-model one (mergekit would silently ignore it here); move it to the "
     "top-level parameters:")),
    ({"lambda": 0.5}, "models[0].parameters.lambda: 'lambda' is a method-wide option"),
])
def test_bad_settings_are_named(params, problem):
    with pytest.raises(ProblemsError) as info:
        parse_recipe(_recipe(models=[{"model": "a", "parameters": params}]))
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_method_wide_options_take_one_value():
    with pytest.raises(ProblemsError) as info:
        parse_recipe(_recipe(parameters={"lambda": [0.5, 1.0], "rescale": "inverse"}))
    assert info.value.problems == [
        ("parameters.lambda: a method-wide option takes one value, not a list (got [0.5, "
        "1.0]); gradients and filters apply to weight, density, drop_rate")]


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

"""Per-tensor parameters: gradients over the layers, filters, precedence, mergekit's defaults.

A 4-layer family written here (safetensors, Llama names): the base is zeros, fine-tune
``a`` adds 1 everywhere and ``b`` adds 10, so a task-arithmetic merge is exactly the
resolved weights (``w_a + 10·w_b``) tensor by tensor. Merges run through the real plan
(headers) and unit (shard in the store) code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dareflow.merge.plan import (
    MERGE_CODE_VERSION,
    build_spec,
    layer_count,
    layer_position,
    plan_merge,
    resolved_recipe,
    tensor_spec,
    tensor_specs,
    unit_key,
)
from dareflow.merge.units import merge_unit
from dareflow.parameters import evaluate_setting
from dareflow.recipe import parse_recipe

LAYERS = 4
ATTN, MLP, NORM = "self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,),
              "lm_head.weight": (8, 4)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{ATTN}": (4, 4), f"model.layers.{i}.{MLP}": (8, 4),
                   f"model.layers.{i}.{NORM}": (4,)}
    return shapes


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """base = 0, a = base + 1, b = base + 10, c = base + distinct magnitudes (for trims)."""
    root = tmp_path_factory.mktemp("layered-family")
    shapes = _shapes(LAYERS)
    zeros = {n: torch.zeros(s) for n, s in shapes.items()}
    ramp = {n: (torch.arange(z.numel(), dtype=torch.float32) + 1).reshape(z.shape) / 64
            for n, z in zeros.items()}
    return {"base": _write(root / "base", zeros),
            "a": _write(root / "ft-a", {n: z + 1.0 for n, z in zeros.items()}),
            "b": _write(root / "ft-b", {n: z + 10.0 for n, z in zeros.items()}),
            "c": _write(root / "ft-c", ramp)}


def _merge(family: dict[str, str], tmp_path: Path, data: dict) -> dict[str, torch.Tensor]:
    recipe = parse_recipe({"base_model": family["base"], "dtype": "float32", **data})
    uris = {m.model: m.model for m in recipe.models if m.model != family["base"]}
    plan = plan_merge(recipe, base_uri=family["base"], model_uris=uris,
                      work_uri=str(tmp_path / "work"), store_uri=str(tmp_path / "store"))
    merged: dict[str, torch.Tensor] = {}
    for job in plan.units:
        merged |= load_file(merge_unit(plan, job)["uri"])
    return merged


def _value(tensor: torch.Tensor) -> float:
    """The one value of a constant tensor (asserting it is constant)."""
    assert torch.equal(tensor, torch.full_like(tensor, tensor.flatten()[0].item()))
    return tensor.flatten()[0].item()


# --------------------------------------------------------------------------- t per tensor


def test_layer_position_is_mergekits_t():
    names = list(_shapes(LAYERS))
    assert layer_count(names) == 4
    assert [layer_position(f"model.layers.{i}.{MLP}", 4) for i in range(4)] == [
        0.0, 1 / 3, 2 / 3, 1.0]
    # outside the layers (embeddings, final norm, lm_head): t = 0
    assert [layer_position(n, 4) for n in OUTSIDE] == [0.0, 0.0, 0.0]
    # a single layer: t = 1 (the gradient's last value)
    assert layer_position(f"model.layers.0.{MLP}", 1) == 1.0
    assert layer_count(["model.embed_tokens.weight"]) == 0


def test_gradient_interpolation_is_mergekits():
    grad = [0.0, 0.3, 0.7, 1.0]
    assert [evaluate_setting(grad, "x", i / 3) for i in range(4)] == grad
    assert evaluate_setting(grad, "x", 0.5) == 0.5  # halfway between 0.3 and 0.7
    # three points over four layers: t = 1/3 falls at 2/3 of the first segment
    three = [evaluate_setting([1.0, 0.7, 0.1], "x", i / 3) for i in range(4)]
    assert three == pytest.approx([1.0, 0.8, 0.5, 0.1], abs=1e-12)
    assert evaluate_setting([0.4], "x", 0.7) == 0.4


# --------------------------------------------------------------------------- merged values


def test_weight_gradient_gives_exact_per_layer_values(family, tmp_path):
    merged = _merge(family, tmp_path, {
        "merge_method": "task_arithmetic",
        "models": [{"model": family["a"], "parameters": {"weight": [0, 0.3, 0.7, 1]}}]})
    for i, w in enumerate([0.0, 0.3, 0.7, 1.0]):
        for suffix in (ATTN, MLP, NORM):
            # base 0 + w · 1, in float32
            assert torch.equal(merged[f"model.layers.{i}.{suffix}"],
                               torch.full(_shapes(1)[f"model.layers.0.{suffix}"], w))
    # embeddings, final norm and lm_head take the gradient's first value (t = 0)
    for name in OUTSIDE:
        assert _value(merged[name]) == 0.0


def test_filters_pick_the_first_matching_entry(family, tmp_path):
    merged = _merge(family, tmp_path, {
        "merge_method": "task_arithmetic",
        "models": [{"model": family["a"], "parameters": {"weight": [
            {"filter": "mlp", "value": 2.0},
            {"filter": "self_attn", "value": [0.0, 1.0]},  # a filtered gradient
            {"filter": "layers.3", "value": 5.0}]}}],  # after self_attn: not for q_proj
        "parameters": {"weight": 0.5}})  # where no filter matches
    for i in range(LAYERS):
        assert _value(merged[f"model.layers.{i}.{MLP}"]) == 2.0
        assert _value(merged[f"model.layers.{i}.{ATTN}"]) == pytest.approx(i / 3, abs=1e-7)
    assert [_value(merged[f"model.layers.{i}.{NORM}"]) for i in range(LAYERS)] == [
        0.5, 0.5, 0.5, 5.0]
    assert [_value(merged[n]) for n in OUTSIDE] == [0.5, 0.5, 0.5]


def test_precedence_model_then_top_level_then_default(family, tmp_path):
    merged = _merge(family, tmp_path, {
        "merge_method": "task_arithmetic",
        "models": [{"model": family["a"]},  # top-level gradient
                   {"model": family["b"], "parameters": {
                       "weight": [{"filter": "lm_head", "value": 0.0}]}}],
        "parameters": {"weight": [1.0, 2.0]}})
    for i in range(LAYERS):
        # a: top-level gradient 1 + i/3; b: no own filter matches → top-level too
        w = 1.0 + i / 3
        assert _value(merged[f"model.layers.{i}.{MLP}"]) == pytest.approx(w + 10 * w, rel=1e-6)
    # lm_head: b's own filter (0), a the top-level gradient at t = 0 (1)
    assert _value(merged["lm_head.weight"]) == 1.0
    assert _value(merged["model.embed_tokens.weight"]) == 11.0


def test_default_weight_is_one_where_nothing_matches(family, tmp_path):
    merged = _merge(family, tmp_path, {
        "merge_method": "task_arithmetic",
        "models": [{"model": family["a"], "parameters": {
            "weight": [{"filter": "embed_tokens", "value": 3.0}]}}]})
    assert _value(merged["model.embed_tokens.weight"]) == 3.0
    assert _value(merged[f"model.layers.2.{MLP}"]) == 1.0


def test_density_gradient_keeps_int_density_n_per_layer(family, tmp_path):
    density = [1.0, 0.7, 0.1]
    merged = _merge(family, tmp_path, {
        "merge_method": "ties",
        "models": [{"model": family["c"], "parameters": {"weight": 1.0, "density": density}}]})
    counts = [int((merged[f"model.layers.{i}.{MLP}"] != 0).sum()) for i in range(LAYERS)]
    # 32 elements; densities 1, 0.8, 0.5, 0.1 → int(d · 32) kept (the largest ones)
    expected = [int(evaluate_setting(density, "", i / 3) * 32) for i in range(LAYERS)]
    assert counts == expected == [32, 25, 16, 3]
    top = merged[f"model.layers.3.{MLP}"].flatten()
    assert torch.equal(top[-3:], (torch.arange(30, 33, dtype=torch.float32)) / 64)
    assert int((merged["lm_head.weight"] != 0).sum()) == 32  # t = 0: density 1


def test_drop_rate_filter_on_dare(family, tmp_path):
    merged = _merge(family, tmp_path, {
        "merge_method": "dare_linear",
        "models": [{"model": family["a"], "parameters": {
            "drop_rate": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]}}]})
    for i in range(LAYERS):
        assert _value(merged[f"model.layers.{i}.{MLP}"]) == 0.0  # everything dropped
        assert _value(merged[f"model.layers.{i}.{ATTN}"]) == 1.0  # nothing dropped


# --------------------------------------------------------------------------- plan and keys


def test_per_tensor_values_enter_the_unit_keys(family):
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": "base",
                           "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]})
    names = list(_shapes(LAYERS))
    specs = tensor_specs(recipe, "float32", names)
    assert [specs[f"model.layers.{i}.{MLP}"].models[0].weight for i in range(4)] == [
        0.0, 1 / 3, 2 / 3, 1.0]
    resolved = resolved_recipe(recipe, "float32")
    tensors = (f"model.layers.1.{MLP}",)
    key = unit_key(resolved, tensors, {}, specs)
    other = dict(specs)
    other[tensors[0]] = tensor_spec(recipe, "float32", tensors[0], 7)  # another t
    assert unit_key(resolved, tensors, {}, other) != key
    assert unit_key(resolved, tensors, {}, dict(specs)) == key
    assert MERGE_CODE_VERSION == "4"


def test_invalid_tensor_specs_are_listed_at_plan_time():
    recipe = parse_recipe({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": [1, 1]}},
        {"model": "b", "parameters": {"weight": [-1, 1]}}]})
    with pytest.raises(ValueError) as info:
        tensor_specs(recipe, "float32", _shapes(2))
    message = str(info.value)
    # layer 0's 3 tensors and the 3 outside the layers (t = 0) sum to 0; layer 1 not
    assert message.startswith("6 tensor(s) get an invalid merge spec:\n  - ")
    assert (f"\n  - tensor 'model.layers.0.{MLP}' (t = 0): invalid merge spec for method "
            "'linear': weights [1.0, -1.0] sum to 0, cannot normalize; set normalize to "
            "false or change the weights\n") in message
    assert "layers.1" not in message


def test_build_spec_refuses_per_tensor_recipes():
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": "base",
                           "models": [{"model": "a", "parameters": {"weight": [0, 1]}}]})
    with pytest.raises(ValueError, match="use tensor_spec"):
        build_spec(recipe, "float32")


# --------------------------------------------------------------------------- defaults, card


@pytest.mark.parametrize(("method", "expected"), [
    ("ties", {"rescale": "none", "sign_election": "weighted_sum", "disjoint_merge": "weight",
              "lambda": 1.0}),
    ("dare_ties", {"rescale": "l1", "sign_election": "weighted_sum", "disjoint_merge": "sum",
                   "trim_after_dare": 0.0, "lambda": 1.0}),
    ("dare_linear", {"rescale": "l1", "normalize": False, "lambda": 1.0}),
    ("task_arithmetic", {"normalize": False, "lambda": 1.0}),
    ("linear", {"normalize": True}),
])
def test_mergekit_only_recipes_resolve_to_mergekit_defaults(method, expected):
    data = {"merge_method": method, "base_model": "base",
            "models": [{"model": "base"}, {"model": "a", "parameters": {"weight": 0.5}},
                       {"model": "b", "parameters": {"weight": 0.5}}]}
    recipe = parse_recipe(data)
    resolved = resolved_recipe(recipe, "bfloat16")
    assert resolved["parameters"] == expected
    conventions = resolved["conventions"]
    for key in expected:
        assert conventions[key] == ("mergekit default" if key == "lambda"
                                    else f"mergekit default for {method}")
    assert conventions["models[1].weight"] == "set in the recipe"
    assert conventions["seed"] == "dareflow default"
    # the resolved recipe is a recipe, and gives the same specs
    again = parse_recipe(resolved)
    if method != "linear":
        assert [m["model"] for m in resolved["models"]] == ["a", "b"]  # the base is no fine-tune
    assert _effective(build_spec(again, "bfloat16")) == _effective(build_spec(recipe, "bfloat16"))


def _effective(spec):
    """What a spec computes (explicit options and their defaults compare equal)."""
    return (spec.method, spec.scale, spec.resolved_rescale, spec.resolved_normalize,
            spec.resolved_sign_election, spec.resolved_disjoint_merge, spec.trim_after_dare,
            spec.seed, [(m.model_id, m.weight, m.drop_rate) for m in spec.models])


def test_resolved_recipe_keeps_gradients_and_says_where_values_come_from():
    recipe = parse_recipe({
        "merge_method": "dare_ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [0, 1], "density": 0.5}},
                   {"model": "b", "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}},
                   {"model": "c"}],
        "parameters": {"normalize": True, "rescale": "inverse", "drop_rate": 0.1}})
    resolved = resolved_recipe(recipe, "float32")
    assert resolved["models"][0]["parameters"] == {"weight": [0.0, 1.0], "density": 0.5}
    assert resolved["models"][1]["parameters"] == {
        "weight": 1.0, "density": [{"filter": "mlp", "value": 0.3}]}
    assert resolved["parameters"]["drop_rate"] == 0.1
    assert resolved["parameters"]["disjoint_merge"] == "weight"
    assert "normalize" not in resolved["parameters"]
    assert resolved["conventions"] == {
        "lambda": "mergekit default",
        "rescale": "set in the recipe",
        "sign_election": "mergekit default for dare_ties",
        "disjoint_merge": "set in the recipe (normalize: true)",
        "trim_after_dare": "mergekit default for dare_ties",
        "seed": "dareflow default",
        "dtype": "dareflow default: the base checkpoint's dtype",
        "models[0].weight": "set in the recipe",
        "models[0].density": "set in the recipe",
        "models[1].weight": "dareflow default 1.0 (mergekit requires a weight)",
        "models[1].density": ("set in the recipe; elsewhere set in the recipe "
                              "(top-level parameters)"),
        "models[2].weight": "dareflow default 1.0 (mergekit requires a weight)",
        "models[2].drop_rate": "set in the recipe (top-level parameters)",
    }
    again = parse_recipe(resolved)
    names = list(_shapes(2))
    first, second = (tensor_specs(r, "float32", names) for r in (recipe, again))
    assert {n: _effective(s) for n, s in first.items()} == {
        n: _effective(s) for n, s in second.items()}
    assert first[f"model.layers.1.{MLP}"].models[1].density == 0.3  # b's filter
    assert first[f"model.layers.1.{ATTN}"].models[1].drop_rate == 0.1  # top-level


def test_the_issues_ties_recipe_gives_mergekits_numbers():
    # weights 0.5/0.5, no normalize: mergekit divides by the agreeing weights (before:
    # dareflow's mean gave half of mergekit's merged delta where both agree)
    from dareflow.methods import merge_tensor

    recipe = parse_recipe({"merge_method": "ties", "base_model": "base",
                           "models": [{"model": "base"},
                                      {"model": "a", "parameters": {"weight": 0.5}},
                                      {"model": "b", "parameters": {"weight": 0.5}}]})
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    fts = [torch.tensor([1.5, 0.75, 1.125, 1.0]), torch.tensor([1.25, 1.5, 0.875, 1.0])]
    out = merge_tensor(f"model.layers.0.{MLP}", base, fts, build_spec(recipe, "float32"))
    assert torch.equal(out, torch.tensor([1.375, 1.5, 1.125, 1.0]))


@pytest.mark.parametrize(("method", "warms"), [("ties", True), ("task_arithmetic", True),
                                                ("dare_ties", True), ("magnitude_linear", True),
                                                ("linear", False)])
def test_kernels_load_in_the_background_for_every_method_with_a_base(monkeypatch, method,
                                                                      warms):
    # every merge against a base runs its final pass in the compiled kernels: their load
    # overlaps the flow run's start instead of stalling the first units (linear has none)
    from dareflow.merge import plan

    started = []
    monkeypatch.setattr(plan, "_warming", None)
    monkeypatch.setattr(plan, "warm_up", lambda: started.append(method))
    data = {"merge_method": method, "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    if method != "linear":
        data["base_model"] = "base"
    if method in ("ties", "dare_ties", "magnitude_linear"):
        data["models"][0]["parameters"]["density"] = 0.5
    plan.warm_up_kernels(parse_recipe(data))
    if plan._warming is not None:
        plan._warming.join(timeout=10)
    assert started == ([method] if warms else [])

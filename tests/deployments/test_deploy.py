"""The deployment definitions, checked without a server (tests/deployments/test_e2e.py deploys
them on a real one)."""

import json

import pytest

from dareflow.deployments import deploy


def test_every_recipe_in_configs_gets_a_nightly_deployment():
    recipes = deploy.discover_recipes()
    rel = {str(p.relative_to(deploy.CONFIGS_DIR)) for p in recipes}
    assert "paper/supermario_v1.yaml" in rel and "examples/dare_ties_as_mergekit.yaml" in rel
    assert all(r.startswith(("paper/", "examples/")) for r in rel)
    specs = deploy.deployment_specs("prod", recipes)
    assert len(specs) == len(recipes)
    by_name = {s["name"]: s for s in specs}
    mario = by_name["nightly-supermario_v1"]
    assert mario["parameters"]["store"] == "s3://dareflow-prod"
    assert mario["parameters"]["out"] == "s3://dareflow-prod/models/supermario_v1"
    assert mario["parameters"]["recipe"]["base_model"] == "mlabonne/Beagle14-7B"
    assert mario["job_variables"] == {"env": {"DAREFLOW_STORE": "s3://dareflow-prod"}}
    assert mario["tags"] == ["dareflow", "nightly", "prod"]
    # A recipe without `name:` is named after its file.
    assert "nightly-dare_ties_as_mergekit" in by_name


def test_the_store_is_chosen_per_environment():
    [recipe] = [p for p in deploy.discover_recipes() if p.stem == "supermario_v1"]
    [dev] = deploy.deployment_specs("dev", [recipe])
    assert dev["parameters"]["store"] == deploy.ENVIRONMENTS["dev"] == "~/.cache/dareflow"
    [ci] = deploy.deployment_specs("dev", [recipe], store="s3://ci-bucket")
    assert ci["parameters"]["out"] == "s3://ci-bucket/models/supermario_v1"
    with pytest.raises(KeyError, match="^\"unknown environment 'staging'; choose one of dev, prod "):
        deploy.deployment_specs("staging", [recipe])


def test_parameters_follow_the_flow_they_run():
    [recipe] = [p for p in deploy.discover_recipes() if p.stem == "supermario_v1"]
    [merge] = deploy.deployment_specs("dev", [recipe], target=deploy.MERGE_ONLY)
    assert set(merge["parameters"]) == {"recipe", "out", "store", "overwrite"}
    assert merge["parameters"]["overwrite"] is True
    [both] = deploy.deployment_specs("dev", [recipe], target=deploy.MERGE_AND_EVALUATE)
    assert set(both["parameters"]) == {"recipe", "out", "store", "suite", "overwrite"}
    assert both["parameters"]["recipe"] == "configs/paper/supermario_v1.yaml"
    assert both["parameters"]["suite"] == "openllm_v1"


def test_recipe_problems_are_reported_together_before_deploying(tmp_path):
    [recipe] = [p for p in deploy.discover_recipes() if p.stem == "supermario_v1"]
    twin = tmp_path / "twin.yaml"
    twin.write_text(recipe.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"merge_method": "dare_linear", "models": []}))
    with pytest.raises(ValueError) as e:
        deploy.deployment_specs("dev", [recipe, twin, bad, tmp_path / "missing.yaml"])
    message = str(e.value)
    assert message.startswith("3 recipe problem(s), nothing deployed:\n- "), message
    assert (f"recipes '{recipe}' and '{twin}' are both named 'supermario_v1'") in message
    assert f"recipe '{tmp_path / 'missing.yaml'}' does not exist" in message
    assert "bad.yaml" in message


def test_dry_run_prints_one_line_per_deployment(capsys):
    assert deploy.main(["--env", "prod", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(deploy.discover_recipes())
    assert ("nightly-supermario_v1: " + str(deploy.CONFIGS_DIR / "paper/supermario_v1.yaml")
            + " -> s3://dareflow-prod/models/supermario_v1") in lines

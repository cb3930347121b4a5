"""The deployment definitions and prefect.yaml, checked without a server
(tests/deployments/test_e2e.py deploys them on a real one, with real workers)."""

import json
import subprocess

import pytest
import yaml

from dareflow.deployments import deploy

REPO = "https://git.example.org/ml/dareflow.git"


def _recipe(stem: str):
    [recipe] = [p for p in deploy.discover_recipes() if p.stem == stem]
    return recipe


def test_every_recipe_in_configs_gets_a_nightly_deployment_and_one_evaluation():
    recipes = deploy.discover_recipes()
    rel = {str(p.relative_to(deploy.CONFIGS_DIR)) for p in recipes}
    assert "paper/supermario_v1.yaml" in rel and "examples/dare_ties_as_mergekit.yaml" in rel
    assert all(r.startswith(("paper/", "examples/")) for r in rel)
    specs = deploy.deployment_specs("prod", recipes)
    assert len(specs) == len(recipes) + 1
    evaluation, by_name = specs[0], {s["name"]: s for s in specs[1:]}
    assert (evaluation["name"], evaluation["flow"], evaluation["work_pool"]) == (
        "evaluation", "dare-evaluate", "dareflow-eval")
    assert evaluation["entrypoint"] == "flows/evaluate.py:evaluate_flow"
    assert evaluation["schedule"] is None and evaluation["parameters"] == {}
    mario = by_name["nightly-supermario_v1"]
    assert (mario["flow"], mario["work_pool"], mario["entrypoint"]) == (
        "dare-nightly", "dareflow-merge", "flows/nightly.py:nightly_flow")
    assert mario["schedule"] == ("0 2 * * *", "Europe/Berlin")
    assert mario["parameters"] == {
        "recipe": mario["parameters"]["recipe"], "store": "s3://dareflow-prod",
        "suite": "openllm_v1", "limit": None, "evaluation": "dare-evaluate/evaluation",
        "backend": "hf", "device": "auto", "mirror": False}
    assert mario["parameters"]["recipe"]["base_model"] == "mlabonne/Beagle14-7B"
    assert mario["job_variables"] == {"env": {"DAREFLOW_STORE": "s3://dareflow-prod"}}
    assert mario["tags"] == ["dareflow", "nightly", "prod"]
    # A recipe without `name:` is named after its file.
    assert "nightly-dare_ties_as_mergekit" in by_name


def test_the_store_is_chosen_per_environment():
    [_, dev] = deploy.deployment_specs("dev", [_recipe("supermario_v1")])
    assert dev["parameters"]["store"] == deploy.ENVIRONMENTS["dev"] == "~/.cache/dareflow"
    [_, ci] = deploy.deployment_specs("dev", [_recipe("supermario_v1")], store="s3://ci-bucket")
    assert ci["parameters"]["store"] == "s3://ci-bucket"
    assert ci["job_variables"] == {"env": {"DAREFLOW_STORE": "s3://ci-bucket"}}
    with pytest.raises(KeyError, match="^\"unknown environment 'staging'; choose one of dev, prod "):
        deploy.deployment_specs("staging", [_recipe("supermario_v1")])


def test_suite_and_limit_per_recipe_or_per_deploy(monkeypatch):
    monkeypatch.setitem(deploy.SUITES, "supermario_v1", "demo_skills")
    monkeypatch.setitem(deploy.LIMITS, "supermario_v1", 50)
    recipes = [_recipe("supermario_v1"), _recipe("supermario_v2")]
    [_, v1, v2] = deploy.deployment_specs("dev", recipes)
    assert (v1["parameters"]["suite"], v1["parameters"]["limit"]) == ("demo_skills", 50)
    assert (v2["parameters"]["suite"], v2["parameters"]["limit"]) == ("openllm_v1", None)
    [_, v1, v2] = deploy.deployment_specs("dev", recipes, suite="openllm_v1", limit=10)
    assert {(s["parameters"]["suite"], s["parameters"]["limit"]) for s in (v1, v2)} == {
        ("openllm_v1", 10)}
    # a suite file in the repository is passed as its path in the clone workers run in
    [_, spec] = deploy.deployment_specs("dev", [_recipe("supermario_v1")],
                                        suite=str(deploy.CONFIGS_DIR / "suites/demo_skills.yaml"))
    assert spec["parameters"]["suite"] == "configs/suites/demo_skills.yaml"


def test_suite_problems_are_refused_before_deploying(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text((deploy.CONFIGS_DIR / "suites/demo_skills.yaml").read_text())
    with pytest.raises(ValueError) as e:
        deploy.deployment_specs("dev", [_recipe("supermario_v1")], suite=str(outside))
    assert str(e.value) == (
        f"1 problem(s), nothing deployed:\n- --suite {outside}: the file is outside the "
        f"repository {deploy.REPO_ROOT}, so workers (which run in a clone of it) cannot read "
        "it; commit it under configs/suites/ and pass its name")
    with pytest.raises(ValueError, match=r"- unknown suite 'openllm_v2'; did you mean "
                                         r"'openllm_v1'\?|- unknown suite 'openllm_v2'"):
        deploy.deployment_specs("dev", [_recipe("supermario_v1")], suite="openllm_v2")
    with pytest.raises(ValueError, match="limit"):
        deploy.deployment_specs("dev", [_recipe("supermario_v1")], limit=0)


def test_recipe_problems_are_reported_together_before_deploying(tmp_path):
    recipe = _recipe("supermario_v1")
    twin = tmp_path / "twin.yaml"
    twin.write_text(recipe.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"merge_method": "dare_linear", "models": []}))
    with pytest.raises(ValueError) as e:
        deploy.deployment_specs("dev", [recipe, twin, bad, tmp_path / "missing.yaml"])
    message = str(e.value)
    assert message.startswith("3 problem(s), nothing deployed:\n- "), message
    assert (f"recipes '{recipe}' and '{twin}' are both named 'supermario_v1'") in message
    assert f"recipe '{tmp_path / 'missing.yaml'}' does not exist" in message
    assert "bad.yaml" in message


def test_code_source_from_flag_environment_or_origin(monkeypatch, tmp_path):
    monkeypatch.delenv(deploy.REPO_ENV, raising=False)
    assert deploy.code_source(REPO, "release") == deploy.CodeSource(REPO, "release")
    monkeypatch.setenv(deploy.REPO_ENV, "git@example.org:ml/dareflow.git")
    assert deploy.code_source(branch="main").url == "git@example.org:ml/dareflow.git"
    assert deploy.CodeSource(REPO, "main").pull_step() == {
        "prefect.deployments.steps.git_clone": {"repository": REPO, "branch": "main"}}
    # no flag, no variable: the checkout's origin and branch, or a clear error
    monkeypatch.delenv(deploy.REPO_ENV)
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", "-b", "nightly", str(checkout)], check=True)
    monkeypatch.setattr(deploy, "REPO_ROOT", checkout)
    with pytest.raises(ValueError) as e:
        deploy.code_source()
    assert str(e.value) == (
        "no git repository for workers to clone the flows from: pass --repo URL, set "
        f"DAREFLOW_REPO, or add a remote 'origin' to {checkout}")
    subprocess.run(["git", "-C", str(checkout), "remote", "add", "origin", REPO], check=True)
    assert deploy.code_source() == deploy.CodeSource(REPO, "nightly")


def test_a_repository_url_with_credentials_is_refused():
    with pytest.raises(ValueError) as e:
        deploy.code_source("https://bot:ghp_secret@git.example.org/ml/dareflow.git", "main")
    assert "ghp_secret" not in str(e.value)
    assert str(e.value).startswith(
        "--repo https://git.example.org/ml/dareflow.git: the URL carries credentials")


def test_dry_run_prints_the_code_source_and_one_line_per_deployment(capsys):
    assert deploy.main(["--env", "prod", "--dry-run", "--repo", REPO, "--branch", "main",
                        "--limit", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"code: {REPO} (branch main)"
    assert lines[1] == "dare-evaluate/evaluation [dareflow-eval]: evaluation runs"
    assert len(lines) == len(deploy.discover_recipes()) + 2
    assert ("dare-nightly/nightly-supermario_v1 [dareflow-merge]: "
            + str(deploy.CONFIGS_DIR / "paper/supermario_v1.yaml")
            + " -> s3://dareflow-prod, suite openllm_v1, limit 5") in lines


def test_errors_exit_2_with_the_message(capsys):
    assert deploy.main(["--env", "dev", "--dry-run", "--repo", REPO, "--limit", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: 1 problem(s), nothing deployed:\n- ")


def test_prefect_yaml_declares_the_same_deployments():
    """prefect.yaml is what --write-prefect-yaml writes, and it matches deployment_specs."""
    text = deploy.PREFECT_YAML.read_text()
    assert text == deploy.PREFECT_YAML_HEADER + yaml.safe_dump(deploy.prefect_project(),
                                                               sort_keys=False), (
        "prefect.yaml is stale: run python -m deployments.deploy --write-prefect-yaml")
    project = yaml.safe_load(text)
    assert project["pull"] == [deploy.CodeSource("{{ $DAREFLOW_REPO }}", "main").pull_step()]
    specs = deploy.deployment_specs("dev", deploy.discover_recipes())
    declared = {d["name"]: d for d in project["deployments"]}
    assert list(declared) == [s["name"] for s in specs]
    for spec in specs:
        d = declared[spec["name"]]
        assert (d["entrypoint"], d["work_pool"]["name"]) == (spec["entrypoint"],
                                                             spec["work_pool"])
        if spec["schedule"]:
            assert d["schedules"] == [dict(zip(("cron", "timezone"), spec["schedule"]))]
            p = d["parameters"]
            assert (p["suite"], p["limit"], p["evaluation"]) == tuple(
                spec["parameters"][k] for k in ("suite", "limit", "evaluation"))
            assert (deploy.REPO_ROOT / p["recipe"]).resolve() == (
                deploy.REPO_ROOT / spec["recipe_path"]).resolve()

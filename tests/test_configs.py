"""Every YAML under configs/ is valid, so no config file can rot; ``dareflow validate`` knows
every kind shipped (recipes, suites, sweeps, grids, similarity experiments) and names it."""

from pathlib import Path

import pytest

from dareflow.cli import main as cli_main
from dareflow.cli.validate import check, config_path, kind_of
from dareflow.errors import ProblemsError
from dareflow.evaluation.results import OPENLLM_V1_METRICS
from dareflow.evaluation.suite import load_suite
from dareflow.settings import CONFIGS_DIR

FILES = sorted(p for p in CONFIGS_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
#: the kind each shipped folder holds
FOLDER_KINDS = {"paper": {"recipe"}, "examples": {"recipe"}, "demo": {"recipe"},
                "suites": {"suite"}, "sweeps": {"sweep", "grid", "similarity"}}


@pytest.fixture(autouse=True)
def _demo_family_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where `dareflow demo` has built its family: validate checks that the demo
    recipe's local model folders exist (configs/demo/demo.yaml names them relative to the
    working directory, as `dareflow merge` reads them)."""
    for member in ("base", "arithmetic", "reverse"):
        (tmp_path / "dareflow-demo" / "family" / member).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)


def test_configs_are_found():
    names = {p.relative_to(CONFIGS_DIR).as_posix() for p in FILES}
    assert {"suites/openllm_v1.yaml", "suites/demo_skills.yaml",
            "paper/supermario_v1.yaml", "sweeps/demo_grid.yaml"} <= names
    assert CONFIGS_DIR == Path(__file__).resolve().parents[1] / "configs"  # editable install


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CONFIGS_DIR).as_posix())
def test_config_file_is_valid_and_of_its_folders_kind(path: Path):
    kind = check(path).split(":")[0]
    assert kind in FOLDER_KINDS[path.parent.name]


def test_validate_every_shipped_file_at_once(capsys):
    assert cli_main(["validate", *map(str, FILES)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(FILES)
    kinds = {line.split(": ", 1)[1].split(":")[0] for line in out}
    assert kinds == {"recipe", "suite", "sweep", "grid", "similarity"}


def test_v1_suite_matches_the_leaderboard_average():
    suite = load_suite("openllm_v1")
    assert suite.primary_metrics() == OPENLLM_V1_METRICS
    assert {t.name: t.shots for t in suite.tasks} == {
        "arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0,
        "winogrande": 5, "gsm8k": 5}


def test_validate_command_checks_suites_and_recipes(tmp_path: Path, capsys):
    assert cli_main(["validate", "openllm_v1", "paper/supermario_v1",
                     str(CONFIGS_DIR / "sweeps/demo_arithmetic.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ok   openllm_v1: suite: openllm_v1, 6 task(s)" in out
    assert "ok   paper/supermario_v1: recipe: dare_linear" in out
    assert "demo_arithmetic.yaml: sweep: demo-arithmetic" in out
    bad = tmp_path / "bad_suite.yaml"
    bad.write_text("name: bad\ntasks:\n  - {name: arc, shots: 99, metric: acc}\n")
    assert cli_main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: 1 problem:" in err and "tasks.0.shots" in err
    assert "less than or equal to 64" in err


def test_sweep_with_a_typo_is_named(tmp_path: Path, capsys):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("name: s\nfinetuned: arithmetic\ndrop_rates: [0.5]\ndrop_rate: [0.1]\n"
                   "evaluation: {skills: [arithmetic]}\n")
    assert cli_main(["validate", str(bad)]) == 1
    assert "drop_rate: unknown key" in capsys.readouterr().err


def test_unknown_kind_and_unknown_name_are_explained(tmp_path: Path):
    with pytest.raises(ProblemsError, match="cannot tell which kind of config this is"):
        kind_of({"nom": 1}, "x.yaml")
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config"):
        config_path("paper/nope")


PAPER = sorted((CONFIGS_DIR / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipes_write_out_every_option(path: Path):
    # the paper's settings never depend on a default (dareflow's defaults are mergekit's)
    from dareflow.merge.plan import conventions
    from dareflow.recipe import load_recipe

    recipe = load_recipe(path)
    left = {k: v for k, v in conventions(recipe).items() if v != "set in the recipe"}
    assert left == {}
    assert recipe.parameters.rescale == "inverse"  # the paper's 1/(1 - p)


def test_the_wizard_recipe_is_the_authors_average_merging_with_dare():
    from dareflow.recipe import load_recipe

    # MergeLM mask_merging + average_merging: base + the mean of the rescaled deltas
    # (λ 1; equal weights summing to 1, or weights 1 with normalize: true)
    recipe = load_recipe(CONFIGS_DIR / "paper" / "wizardlm_wizardmath_13b.yaml")
    params = recipe.parameters
    assert recipe.merge_method == "dare_linear" and params.rescale == "inverse"
    assert params.scale == 1.0
    weights = [m.parameters.weight for m in recipe.models]
    assert [m.parameters.drop_rate for m in recipe.models] == [0.2, 0.2]
    assert len(set(weights)) == 1
    assert (params.normalize is True) or (params.normalize is False and sum(weights) == 1.0)

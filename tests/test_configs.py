"""Every YAML under configs/ is valid, so no config file can rot: recipes through
tasks.config.load_recipe, evaluation suites through tasks.evaluation.suite.load_suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main as cli_main
from tasks.config import load_recipe
from tasks.evaluating import looks_like_suite
from tasks.evaluation.results import OPENLLM_V1_METRICS
from tasks.evaluation.suite import load_suite

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def test_configs_are_found():
    names = {p.relative_to(CONFIGS).as_posix() for p in FILES}
    assert {"suites/openllm_v1.yaml", "suites/demo_skills.yaml",
            "paper/supermario_v1.yaml"} <= names


def _load_sweep(path: Path) -> object:
    """A sweep experiment config (configs/sweeps/): one of tasks.sweeps' config models."""
    from tasks import sweeps

    problems = []
    for model in (sweeps.GridConfig, sweeps.SimilarityConfig, sweeps.SweepConfig):
        try:
            return sweeps.load_config(path, model)
        except ValueError as e:
            problems.append(f"as {model.__name__}: {e}")
    raise ValueError("\n".join(problems))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_file_is_valid(path: Path):
    if looks_like_suite(path):
        assert load_suite(path).tasks
    elif path.parent.name == "sweeps":
        assert _load_sweep(path)
    else:
        assert load_recipe(path).merge_method


def test_v1_suite_matches_the_leaderboard_average():
    suite = load_suite("openllm_v1")
    assert suite.primary_metrics() == OPENLLM_V1_METRICS
    assert {t.name: t.shots for t in suite.tasks} == {
        "arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0,
        "winogrande": 5, "gsm8k": 5}


def test_validate_command_checks_suites_and_recipes(tmp_path: Path, capsys):
    assert cli_main(["validate", str(CONFIGS / "suites/openllm_v1.yaml"),
                     str(CONFIGS / "paper/supermario_v1.yaml")]) == 0
    out = capsys.readouterr().out
    assert "suite openllm_v1, 6 task(s)" in out and "dare_linear" in out
    bad = tmp_path / "bad_suite.yaml"
    bad.write_text("name: bad\ntasks:\n  - {name: arc, shots: 99, metric: acc}\n")
    assert cli_main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "invalid suite" in err and "shots" in err and "less than or equal to 64" in err

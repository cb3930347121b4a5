"""Suite configs: the shipped files validate; mistakes are reported together and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dareflow.cli import main as cli_main
from dareflow.evaluation.results import OPENLLM_V1_METRICS
from dareflow.evaluation.suite import SUITES_DIR, Suite, load_suite, suite_path

SUITE_FILES = sorted(SUITES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SUITE_FILES, ids=lambda p: p.name)
def test_every_shipped_suite_validates_and_starts_with_its_command(path: Path) -> None:
    suite = load_suite(path)
    assert suite.tasks
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run") and "dareflow eval MODEL_DIR --suite" in first


def test_openllm_v1_is_the_leaderboard_definition() -> None:
    suite = load_suite("openllm_v1")
    shots = {t.name: t.shots for t in suite.tasks}
    assert shots == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0,
                     "winogrande": 5, "gsm8k": 5}
    assert suite.primary_metrics() == OPENLLM_V1_METRICS
    assert suite.task("gsm8k").metrics == ["exact_match,strict-match",
                                           "exact_match,flexible-extract"]
    assert suite.task("mmlu").aggregate == "macro_micro"
    assert suite.task("mmlu").metrics == ["acc_macro", "acc_micro"]
    assert all(t.task == t.name and t.data is None for t in suite.tasks)


def test_demo_skills_points_at_jsonl_files() -> None:
    suite = load_suite("demo_skills")
    for entry in suite.tasks:
        assert entry.task is None and entry.data is not None
        assert entry.data.path.is_absolute() and entry.data.path.is_file()
        rows = [json.loads(x) for x in entry.data.path.read_text().splitlines()]
        assert len(rows) >= 20 and all({"prompt", "answer"} <= r.keys() for r in rows)


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_all_problems_reported_together_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, """
name: Bad Name
colour: blue
tasks:
  - name: arc_challenge
    shots: -1
    metric: acc_norm
  - name: mmlu
    shots: 5
    aggregate: macro_micro
    metric: acc
""")
    with pytest.raises(ValueError) as err:
        load_suite(path)
    msg = str(err.value)
    assert str(path) in msg
    for fragment in ("name", "colour", "shots", "acc_macro"):
        assert fragment in msg, fragment
    assert f"{path}: 4 problems:" in msg


def test_jsonl_task_errors_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"q": 1}\n')
    path = _write(tmp_path, """
name: s
tasks:
  - name: a
    shots: 0
    metric: exact_match,strip
    data: {path: bad.jsonl}
  - name: b
    shots: 0
    metric: exact_match,strip
    data: {path: missing.jsonl}
  - name: c
    task: arc_challenge
    shots: 0
    metric: acc
    data: {path: bad.jsonl}
""")
    with pytest.raises(ValueError) as err:
        load_suite(path)
    msg = str(err.value)
    assert "bad.jsonl:2" in msg and "'prompt' and 'answer'" in msg
    assert "missing.jsonl" in msg and "not found" in msg


def test_duplicate_task_names_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        Suite.model_validate({"name": "s", "tasks": [
            {"name": "a", "shots": 0, "metric": "acc"},
            {"name": "a", "shots": 1, "metric": "acc"}]})


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(FileNotFoundError, match="did you mean 'openllm_v1'\\?"):
        suite_path("openllm_v2x")
    with pytest.raises(KeyError, match="did you mean 'hellaswag'\\?"):
        load_suite("openllm_v1").task("helaswag")


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["validate", "openllm_v1", "demo_skills"]) == 0
    bad = _write(tmp_path, "name: x\ntasks: []\n")
    assert cli_main(["validate", str(bad)]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_metric_split_by_a_yaml_flow_list_is_caught(tmp_path: Path) -> None:
    # `also: [exact_match,flexible-extract]` is two YAML items, not one metric key
    path = _write(tmp_path, """
name: s
tasks:
  - name: gsm8k
    shots: 5
    metric: exact_match,strict-match
    also: [exact_match,flexible-extract]
""")
    with pytest.raises(ValueError, match="quote them"):
        load_suite(path)

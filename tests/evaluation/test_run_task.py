"""Real lm-eval runs on a tiny model: every v1 task offline on the mirror, and the demo skills.

One run per benchmark (module fixture, about a minute on 2 cores), then the checks read the
results: lm-eval's counts, JSON-serialisable output, scores in [0, 1], the tidy table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dareflow.evaluation.mirror import mmlu_subjects
from dareflow.evaluation.results import (
    COLUMNS,
    comparison_markdown,
    comparison_table,
    leaderboard_average,
    tidy_results,
)
from dareflow.evaluation.runner import hf_offline, run_task, vllm_available
from dareflow.evaluation.suite import load_suite

V1 = load_suite("openllm_v1")
SKILLS = load_suite("demo_skills")
# Documents per task (MMLU: per subject, so 57 documents).
LIMITS = {"arc_challenge": 2, "hellaswag": 2, "mmlu": 1, "truthfulqa_mc2": 3, "winogrande": 3,
          "gsm8k": 2, "arithmetic": 3, "reverse": 3}


@pytest.fixture(scope="module")
def v1_runs(tiny_lm_dir: Path, mirror_dir: Path) -> dict[str, dict]:
    return {e.name: run_task(tiny_lm_dir, e, limit=LIMITS[e.name], mirror_dir=mirror_dir,
                             batch_size=8, revision="r0")
            for e in V1.tasks}


@pytest.fixture(scope="module")
def skill_runs(tiny_lm_dir: Path) -> dict[str, dict]:
    return {e.name: run_task(tiny_lm_dir, e, limit=LIMITS[e.name]) for e in SKILLS.tasks}


@pytest.mark.parametrize("name", [t.name for t in V1.tasks])
def test_v1_task_runs_offline_on_the_mirror(name: str, v1_runs: dict) -> None:
    raw = v1_runs[name]
    json.dumps(raw, allow_nan=True)  # serialisable as returned
    meta = raw["dareflow"]
    entry = V1.task(name)
    assert meta["task_name"] == f"dareflow_{name}" and meta["mirror"] is True
    assert meta["revision"] == "r0" and meta["lm_eval_version"] == "0.4.13"
    leaves = [k for k in raw["n-samples"]]
    assert len(leaves) == (len(mmlu_subjects()) if name == "mmlu" else 1)
    for leaf in leaves:
        assert raw["n-samples"][leaf]["effective"] == LIMITS[name]
        assert raw["n-shot"][leaf] == entry.shots
    metric = entry.metric.removesuffix("_macro")
    key = metric if "," in metric else f"{metric},none"
    for leaf in leaves:
        assert 0.0 <= raw["results"][leaf][key] <= 1.0
    assert "samples" not in raw


def test_tidy_table_from_real_runs(v1_runs: dict, skill_runs: dict) -> None:
    df = tidy_results({"tiny": list(v1_runs.values()) + list(skill_runs.values()),
                       "tiny_again": v1_runs})
    assert list(df.columns) == COLUMNS
    assert df["value"].between(0.0, 1.0).all()
    assert set(df["lm_eval_version"]) == {"0.4.13"}
    tiny = df[df.model == "tiny"]
    tasks = set(tiny.task)
    assert {t.name for t in V1.tasks} | {t.name for t in SKILLS.tasks} <= tasks
    assert {f"mmlu_{s}" for s in mmlu_subjects()} <= tasks
    # 57 subjects + 4 categories + 2 aggregates, and the top tasks' metrics
    assert len(tiny[tiny.task.str.startswith("mmlu")]) == 57 + 4 + 2
    top = tiny.set_index(["task", "metric"])
    for t in V1.tasks:
        for m in t.metrics:
            assert (t.name, m) in top.index, (t.name, m)
    assert top.loc[("mmlu", "acc_macro"), "n"] == 57
    assert top.loc[("arc_challenge", "acc_norm"), "shots"] == 25
    assert top.loc[("arithmetic", "exact_match,strip"), "n"] == 3

    avg = leaderboard_average(df)
    assert 0.0 <= avg["tiny"] <= 1.0 and avg["tiny"] == avg["tiny_again"]
    table = comparison_table(df, merged="tiny", sources=["tiny_again"])
    assert table.shape == (2, 7) and not table.isna().any().any()
    assert comparison_markdown(table).count("**") >= 2 * 7 * 2  # ties: both rows bold
    skills = comparison_table(df, merged="tiny", sources=[], metrics=SKILLS.primary_metrics())
    assert list(skills.columns) == ["arithmetic", "reverse", "average"]


def test_skill_tasks_generate_and_score(skill_runs: dict) -> None:
    for name, raw in skill_runs.items():
        res = raw["results"][f"dareflow_skill_{name}"]
        assert 0.0 <= res["exact_match,strip"] <= 1.0
        assert raw["n-samples"][f"dareflow_skill_{name}"]["effective"] == 3
        assert raw["dareflow"]["mirror"] is False
        cfg = raw["configs"][f"dareflow_skill_{name}"]
        assert cfg["doc_to_text"] == "Q: {{prompt}} A: "
        assert cfg["generation_kwargs"]["until"] == ["\n"]


def test_arguments_are_checked_before_running(tiny_lm_dir: Path, mirror_dir: Path,
                                              tmp_path: Path) -> None:
    entry = V1.task("winogrande")
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_task(tmp_path, entry, mirror_dir=mirror_dir)
    with pytest.raises(ValueError, match="limit must be a positive int"):
        run_task(tiny_lm_dir, entry, limit=0, mirror_dir=mirror_dir)
    with pytest.raises(ValueError, match="unknown backend"):
        run_task(tiny_lm_dir, entry, backend="hff", mirror_dir=mirror_dir)  # type: ignore[arg-type]
    other = entry.model_copy(update={"task": "piqa"})
    with pytest.raises(KeyError, match="unknown offline mirror task 'piqa'; choices: arc_challenge"):
        run_task(tiny_lm_dir, other, mirror_dir=mirror_dir)
    with pytest.raises(FileNotFoundError, match="not a prepared mirror"):
        run_task(tiny_lm_dir, entry, mirror_dir=tmp_path)


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_vllm_backend_without_vllm_says_what_to_do(tiny_lm_dir: Path, mirror_dir: Path) -> None:
    with pytest.raises(ImportError, match="pip install vllm"):
        run_task(tiny_lm_dir, V1.task("winogrande"), backend="vllm", mirror_dir=mirror_dir)


def test_hf_offline_restores_the_environment(tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants as hub

    before_env = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE")}
    before = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with hf_offline(tmp_path):
        assert os.environ["HF_HOME"] == str(tmp_path)
        assert hub.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True
    assert {k: os.environ.get(k) for k in before_env} == before_env
    assert (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before

"""The Open LLM Leaderboard v1 suite, offline, on the demo family, through `dareflow merge-eval`.

What a user runs after the demo: merge the family with DARE, then evaluate the merged model
and every source on the six v1 benchmarks with real lm-eval on the mirror (2 documents per
benchmark, MMLU: per subject). The family is the tiny size (built in seconds) of the same
builder `dareflow demo` uses: same tokenizer, architecture and config. About 3 min on 2
cores (24 child processes: 4 models x 6 benchmarks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dareflow.cli import main as cli_main
from dareflow.demo.family import build_demo_family
from dareflow.evaluation.mirror import mmlu_subjects
from dareflow.evaluation.results import COLUMNS
from dareflow.evaluation.suite import load_suite

V1 = load_suite("openllm_v1")
LIMIT = 2
ROWS = ["merged", "base", "arithmetic", "reverse"]


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("v1-demo")
    family = build_demo_family(root / "family", size="tiny")
    recipe = Path("configs/demo/demo.yaml").read_text().replace(
        "dareflow-demo/family", str(root / "family"))
    (root / "recipe.yaml").write_text(recipe)
    store = root / "store"
    code = cli_main(["merge-eval", str(root / "recipe.yaml"), "--out", str(root / "merged"),
                     "--suite", "openllm_v1", "--limit", str(LIMIT), "--offline-mirror",
                     "--store", str(store)])
    [results] = list((store / "results").iterdir())
    return {"code": code, "results": results, "family": family, "merged": root / "merged"}


def test_exit_code_and_every_benchmark_ran(v1_run) -> None:
    assert v1_run["code"] == 0
    summary = json.loads((v1_run["results"] / "summary.json").read_text())
    assert summary["failures"] == []
    raw = sorted(p.name for p in (v1_run["results"] / "raw").iterdir())
    assert raw == sorted(f"{m}__{t.name}.json" for m in ROWS for t in V1.tasks)
    for path in (v1_run["results"] / "raw").iterdir():
        meta = json.loads(path.read_text())["dareflow"]
        assert meta["mirror"] is True and meta["lm_eval_version"] == "0.4.13"


def test_tidy_table_shape_counts_and_ranges(v1_run) -> None:
    table = pd.read_parquet(v1_run["results"] / "results.parquet")
    assert list(table.columns)[: len(COLUMNS)] == COLUMNS
    assert set(table.status) == {"ok"}
    assert set(table.model) == set(ROWS)
    assert table["value"].between(0.0, 1.0).all()
    # the merged model's revision is its content, so it differs from every source's
    revisions = table.groupby("model")["revision"].unique()
    assert all(len(r) == 1 for r in revisions)
    assert len({r[0] for r in revisions}) == 4
    subjects = [f"mmlu_{s}" for s in mmlu_subjects()]
    for model in ROWS:
        rows = table[table.model == model].set_index(["task", "metric"])
        for task in V1.tasks:
            for metric in task.metrics:
                assert (task.name, metric) in rows.index, (model, task.name, metric)
            if task.name != "mmlu":
                assert rows.loc[(task.name, task.metrics[0]), "n"] == LIMIT
                assert rows.loc[(task.name, task.metrics[0]), "shots"] == task.shots
        assert {t for t, _ in rows.index} >= set(subjects)
        assert (rows.loc[[(s, "acc") for s in subjects], "n"] == LIMIT).all()
        assert rows.loc[("mmlu", "acc_macro"), "n"] == 57 * LIMIT  # documents behind it
        # v1's MMLU: the mean over the 57 subjects
        macro = rows.loc[[(s, "acc") for s in subjects], "value"].mean()
        assert math.isclose(rows.loc[("mmlu", "acc_macro"), "value"], macro, abs_tol=1e-12)
        # winogrande and arc with 2 documents score 0, 0.5 or 1
        assert rows.loc[("winogrande", "acc"), "value"] in (0.0, 0.5, 1.0)
        assert rows.loc[("arc_challenge", "acc_norm"), "value"] in (0.0, 0.5, 1.0)


def test_comparison_table_is_the_papers_table_2(v1_run) -> None:
    table = pd.read_parquet(v1_run["results"] / "results.parquet")
    cmp = pd.read_csv(v1_run["results"] / "comparison.csv", index_col="model")
    assert list(cmp.index) == ROWS  # merged first, then the base and the fine-tunes
    assert list(cmp.columns) == [t.name for t in V1.tasks] + ["average"]
    assert not cmp.isna().any().any()
    primary = {t.name: t.metric for t in V1.tasks}
    values = table.set_index(["model", "task", "metric"])["value"]
    for model in ROWS:
        for task, metric in primary.items():
            assert math.isclose(cmp.loc[model, task], values[(model, task, metric)])
        assert math.isclose(cmp.loc[model, "average"],
                            sum(cmp.loc[model, t] for t in primary) / 6)
    md = (v1_run["results"] / "comparison.md").read_text()
    assert md.splitlines()[0] == "| model | " + " | ".join(cmp.columns) + " |"
    assert len([line for line in md.splitlines() if line.startswith("| merged")]) == 1


def test_the_merged_model_was_published_with_its_card(v1_run) -> None:
    merged = v1_run["merged"]
    assert (merged / "config.json").exists() and (merged / "README.md").exists()
    config = json.loads((merged / "config.json").read_text())
    assert config["max_position_embeddings"] == 2048  # room for gsm8k's 256 new tokens

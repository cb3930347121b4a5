"""lm-eval failure without an injected fault: one model's checkpoint is corrupt, so its
benchmark run really fails inside lm-eval; it is marked failed in the results table and
the other model still reports."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from dareflow.flows.evaluate import run_evaluate
from tests.evaluation.conftest import build_tiny_lm

ONE_TASK = """\
name: one_v1
description: one Open LLM Leaderboard v1 task, for reliability tests
tasks:
  - name: truthfulqa_mc2
    shots: 0
    metric: acc
"""


@pytest.mark.slow
def test_corrupt_model_fails_its_run_and_the_other_model_reports(tmp_path):
    good = build_tiny_lm(tmp_path / "good")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
    suite = tmp_path / "one_v1.yaml"
    suite.write_text(ONE_TASK)
    store = tmp_path / "store"
    run_evaluate({"good": str(good), "broken": str(broken)}, str(suite), limit=2,
                          store=str(store), mirror=True, max_workers=2)
    [results] = list((store / "results").iterdir())
    table = pd.read_parquet(results / "results.parquet")
    failed = table[table.status == "failed"]
    assert failed[["model", "task"]].values.tolist() == [["broken", "truthfulqa_mc2"]]
    assert failed["value"].isna().all() and failed["error"].iloc[0], failed["error"].iloc[0]
    ok = table[(table.status == "ok") & (table.metric == "acc")]
    assert ok[["model", "task"]].values.tolist() == [["good", "truthfulqa_mc2"]]
    assert 0 <= ok["value"].iloc[0] <= 1

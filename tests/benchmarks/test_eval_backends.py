"""The backend-parity script: its arithmetic exactly, and a real run on the CPU (hf only,
vLLM skipped with the reason) on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.eval_backends import format_rows, main, parity_rows, vllm_skip_reason, z_score
from tests.evaluation.conftest import build_tiny_lm


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def test_z_score() -> None:
    assert math.isclose(z_score(0.5, 0.03, 0.46, 0.04), 0.8)
    assert z_score(0.5, 0.0, 0.5, 0.0) == 0.0
    assert z_score(0.5, 0.0, 0.4, 0.0) == math.inf
    assert math.isnan(z_score(0.5, math.nan, 0.4, 0.1))


def test_parity_rows_and_table() -> None:
    table = pd.DataFrame([
        {"model": "hf", "task": "arc_challenge", "metric": "acc_norm", "value": 0.5,
         "stderr": 0.03},
        {"model": "vllm", "task": "arc_challenge", "metric": "acc_norm", "value": 0.46,
         "stderr": 0.04},
        {"model": "vllm", "task": "arc_challenge", "metric": "acc", "value": 0.9,
         "stderr": 0.01},
    ])
    [row] = parity_rows(table, {"arc_challenge": "acc_norm"}, ["hf", "vllm"])
    assert row["hf"] == 0.5 and row["vllm_se"] == 0.04
    assert math.isclose(row["diff"], -0.04) and math.isclose(row["z"], 0.8)
    assert format_rows([row], ["hf", "vllm"]).splitlines() == [
        "| task | metric | hf (± se) | vllm (± se) | diff | z |",
        "|---|---|---|---|---|---|",
        "| arc_challenge | acc_norm | 50.00 ± 3.00 | 46.00 ± 4.00 | -4.00 | 0.80 |"]


def test_vllm_skip_reasons() -> None:
    assert vllm_skip_reason("cpu", "cpu", True) == "--device cpu (vLLM runs on a GPU)"
    assert vllm_skip_reason("auto", "cpu", True) == "torch sees no CUDA GPU"
    assert "vllm package is not installed" in vllm_skip_reason("cuda", "cuda", False)
    assert vllm_skip_reason("auto", "cuda", True) is None


def test_cpu_run_on_the_tiny_model(tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "rows.json"
    code = main(["--model", str(tiny_lm_dir), "--device", "cpu", "--limit", "2", "--tasks",
                 "winogrande", "truthfulqa_mc2", "--store", str(tmp_path / "store"),
                 "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "vllm: skipped (--device cpu (vLLM runs on a GPU))" in text
    assert "| task | metric | hf (± se) |" in text
    rows = json.loads(out.read_text())
    assert [r["task"] for r in rows] == ["winogrande", "truthfulqa_mc2"]
    assert all(0 <= r["hf"] <= 1 for r in rows)
    # a rerun on the same store only reads the committed results
    assert main(["--model", str(tiny_lm_dir), "--device", "cpu", "--limit", "2", "--tasks",
                 "winogrande", "--store", str(tmp_path / "store")]) == 0
    assert "winogrande: cached" in capsys.readouterr().out

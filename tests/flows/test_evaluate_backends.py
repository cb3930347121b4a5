"""`dareflow eval` / `merge-eval` run options end to end: device, batch size, backend options,
workers and the per-benchmark timeout (real Prefect, real children, the CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dareflow.cli import main as cli_main
from tests.evaluation.conftest import build_tiny_lm
from tests.flows.test_evaluate import _task_runs

ONE = "name: one\ntasks:\n  - {name: winogrande, shots: 5, metric: acc}\n"


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def one_task(tmp_path: Path) -> Path:
    path = tmp_path / "one.yaml"
    path.write_text(ONE)
    return path


def test_hung_benchmark_is_killed_at_the_timeout_and_not_retried(tiny_lm_dir, one_task,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("DAREFLOW_FAULT", "eval-winogrande:sleep:600")
    store = tmp_path / "store"
    code = cli_main(["eval", f"m={tiny_lm_dir}", "--suite", str(one_task), "--limit", "2",
                     "--store", str(store), "--offline-mirror", "--timeout", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert ("FAILED m/winogrande: EvaluationError: m/winogrande: killed after 4 s "
            "(timeout)") in captured.err
    [results] = list((store / "results").iterdir())
    summary = json.loads((results / "summary.json").read_text())
    run = _task_runs(summary["flow_run_id"])["eval-m-winogrande"]
    assert run.run_count == 1 and run.state.name == "Failed"


def test_run_options_reach_lm_eval(tiny_lm_dir, one_task, tmp_path, capsys):
    store = tmp_path / "store"
    code = cli_main(["eval", f"m={tiny_lm_dir}", "--suite", str(one_task), "--limit", "2",
                     "--store", str(store), "--offline-mirror", "--device", "cpu",
                     "--batch-size", "2", "--max-model-len", "512", "--max-workers", "1"])
    assert code == 0, capsys.readouterr().err
    [raw_path] = list((store / "eval-results").rglob("*.json"))
    meta = json.loads(raw_path.read_text())
    assert meta["dareflow"]["device"] == "cpu" and meta["dareflow"]["batch_size"] == 2
    assert meta["dareflow"]["model_args"] == {"dtype": "float32", "max_length": 512,
                                              "trust_remote_code": False}
    assert meta["config"]["batch_size"] == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--backend", "vllm", "--device", "cpu"], "backend 'vllm' needs the vllm package"),
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 applies to --backend vllm"),
    (["--device", "cuda"], "--device cuda but torch sees no GPU"),
    (["--timeout", "-5"], "--timeout must be a number of seconds >= 0"),
])
def test_bad_run_options_fail_before_any_work(tiny_lm_dir, one_task, tmp_path, capsys,
                                              flags, message):
    store = tmp_path / "store"
    code = cli_main(["eval", f"m={tiny_lm_dir}", "--suite", str(one_task), "--store",
                     str(store), *flags])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not store.exists()


def test_merge_eval_takes_the_same_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["merge-eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--device", "--batch-size", "--tensor-parallel-size", "--data-parallel-size",
                 "--max-model-len", "--gpu-memory-utilization", "--max-workers", "--timeout"):
        assert flag in text

"""The evaluation flow end to end: real lm-eval in child processes, real Prefect, the offline
mirror, results in the store, the content cache, failures and retries, the CLI."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from dareflow.cli import main as cli_main
from dareflow.evaluation.checks import check_backend, parse_model_specs
from dareflow.evaluation.fingerprint import model_fingerprint
from dareflow.evaluation.mirror import verify_mirror
from dareflow.evaluation.mirror_store import ensure_mirror
from dareflow.evaluation.results import COLUMNS, STATUS_COLUMNS
from dareflow.evaluation.runner import vllm_available
from dareflow.evaluation.runs import result_uri
from dareflow.flows.evaluate import run_evaluate
from dareflow.tasks import evaluate
from tests.evaluation.conftest import build_tiny_lm
from tests.flows.conftest import make_finetune, write_recipe

TWO_TASKS = """\
name: two_v1
description: two Open LLM Leaderboard v1 tasks, for quick flow tests
tasks:
  - name: winogrande
    shots: 5
    metric: acc
  - name: truthfulqa_mc2
    shots: 0
    metric: acc
"""


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny random LMs with a BPE tokenizer: ``a`` and ``b`` = a + Gaussian noise."""
    root = tmp_path_factory.mktemp("eval-models")
    a = build_tiny_lm(root / "a")
    gen = torch.Generator().manual_seed(1)
    b = make_finetune(a, root / "b", lambda name, t: 0.05 * torch.randn(t.shape, generator=gen))
    return {"a": a, "b": b}


@pytest.fixture
def two_tasks(tmp_path: Path) -> Path:
    path = tmp_path / "two_v1.yaml"
    path.write_text(TWO_TASKS)
    return path


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found


def _task_runs(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def test_flow_two_models_table_store_artifact_and_cache(tiny_models, two_tasks, tmp_path):
    store = str(tmp_path / "store")
    models = {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}
    out = run_evaluate(models, str(two_tasks), limit=2, store=store, mirror=True,
                       max_workers=2)

    # every (model, task) ran in its own child process
    assert out["failures"] == []
    assert sorted((r["label"], r["task"], r["launched"]) for r in out["runs"]) == [
        ("a", "truthfulqa_mc2", True), ("a", "winogrande", True),
        ("b", "truthfulqa_mc2", True), ("b", "winogrande", True)]
    names = _task_runs(out["flow_run_id"])
    assert {"eval-a-winogrande", "eval-b-truthfulqa_mc2"} <= set(names)

    # the tidy table: parquet and CSV in the store, same content
    table = pd.read_parquet(out["parquet"])
    assert list(table.columns) == COLUMNS + STATUS_COLUMNS
    csv = pd.read_csv(out["csv"], dtype={"lm_eval_version": str, "error": str})
    pd.testing.assert_frame_equal(table.drop(columns="error"), csv.drop(columns="error"),
                                  check_dtype=False)
    primary = table[table.metric == "acc"].set_index(["model", "task"]).sort_index()
    assert list(primary.index) == [("a", "truthfulqa_mc2"), ("a", "winogrande"),
                                   ("b", "truthfulqa_mc2"), ("b", "winogrande")]
    assert primary["value"].between(0, 1).all() and (primary["n"] == 2).all()
    assert primary.loc[("a", "winogrande"), "shots"] == 5
    assert primary.loc[("a", "truthfulqa_mc2"), "shots"] == 0
    assert set(table.status) == {"ok"} and set(table.lm_eval_version) == {"0.4.13"}
    fp = {k: model_fingerprint(v)["revision"] for k, v in models.items()}
    assert fp["a"] != fp["b"]  # same headers, different weights
    assert dict(zip(table.model, table.revision)) == fp
    # winogrande with 2 documents scores 0, 0.5 or 1
    assert set(table[table.task == "winogrande"]["value"]) <= {0.0, 0.5, 1.0}

    # the comparison: merged (a) first, the average is the mean of the two tasks
    cmp = pd.read_csv(out["comparison_csv"], index_col="model")
    assert list(cmp.index) == ["a", "b"]
    assert list(cmp.columns) == ["winogrande", "truthfulqa_mc2", "average"]
    for model in ("a", "b"):
        assert math.isclose(cmp.loc[model, "average"],
                            (primary.loc[(model, "winogrande"), "value"]
                             + primary.loc[(model, "truthfulqa_mc2"), "value"]) / 2)
    raw = json.loads(Path(out["raw"], "a__winogrande.json").read_text())
    assert raw["dareflow"]["task_name"] == "dareflow_winogrande" and raw["dareflow"]["mirror"]

    # the Prefect table artifact, read back from the API; the best per column is starred
    [artifact] = _artifact("dareflow-eval-two-v1")
    rows = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    assert [r["model"] for r in rows] == ["a", "b"]
    for col in ("winogrande", "truthfulqa_mc2", "average"):
        best = cmp[col].max()
        for r in rows:
            value = float(r[col].split()[0])
            assert math.isclose(value, round(cmp.loc[r["model"], col] * 100, 2))
            assert r[col].endswith("★") == math.isclose(cmp.loc[r["model"], col], best)
    assert _artifact("dareflow-eval-two-v1-md")[0].data.count("|") > 10

    # second run: nothing is evaluated again
    again = run_evaluate(models, str(two_tasks), limit=2, store=store, mirror=True,
                         max_workers=2)
    assert [r["launched"] for r in again["runs"]] == [False] * 4
    pd.testing.assert_frame_equal(pd.read_parquet(again["parquet"]), table)

    # a deleted cached result is evaluated again (and only that one); the others now come
    # from Prefect's cache (state Cached)
    gone = next(r for r in out["runs"] if (r["label"], r["task"]) == ("b", "winogrande"))
    Path(result_uri(store, gone["key"])).unlink()
    third = run_evaluate(models, str(two_tasks), limit=2, store=store, mirror=True,
                         max_workers=2)
    launched = {(r["label"], r["task"]) for r in third["runs"] if r["launched"]}
    assert launched == {("b", "winogrande")}
    states = {n: r.state.name for n, r in _task_runs(third["flow_run_id"]).items()
              if n.startswith("eval-")}
    assert states == {"eval-a-winogrande": "Cached", "eval-a-truthfulqa_mc2": "Cached",
                      "eval-b-truthfulqa_mc2": "Cached", "eval-b-winogrande": "Completed"}
    pd.testing.assert_frame_equal(pd.read_parquet(third["parquet"]), table)


def test_failed_benchmark_is_marked_and_others_report(tiny_models, two_tasks, tmp_path,
                                                      monkeypatch, capsys):
    """A deterministic failure is not retried, is marked in the table, and the CLI exits 1."""
    monkeypatch.setenv("DAREFLOW_FAULT", "eval-winogrande:raise")
    store = tmp_path / "store"
    code = cli_main(["eval", f"merged={tiny_models['a']}", "--suite", str(two_tasks),
                     "--limit", "2", "--store", str(store), "--offline-mirror",
                     "--max-workers", "2"])
    captured = capsys.readouterr()
    assert code == 1
    assert ("FAILED merged/winogrande: EvaluationError: merged/winogrande: RuntimeError: "
            "injected fault at eval-winogrande (DAREFLOW_FAULT=eval-winogrande:raise)") in captured.err
    assert "| merged | failed |" in captured.out
    [results] = list((store / "results").iterdir())
    table = pd.read_parquet(results / "results.parquet")
    failed = table[table.status == "failed"]
    assert failed[["model", "task", "metric"]].values.tolist() == [
        ["merged", "winogrande", "acc"]]
    assert failed["value"].isna().all() and "injected fault" in failed["error"].iloc[0]
    ok = table[(table.status == "ok") & (table.metric == "acc")]
    assert ok[["model", "task"]].values.tolist() == [["merged", "truthfulqa_mc2"]]
    assert 0 <= ok["value"].iloc[0] <= 1
    summary = json.loads((results / "summary.json").read_text())
    runs = _task_runs(summary["flow_run_id"])
    assert runs["eval-merged-winogrande"].run_count == 1  # not transient: no retry
    assert runs["eval-merged-winogrande"].state.name == "Failed"


@pytest.mark.slow
def test_killed_child_is_retried(tiny_models, tmp_path, monkeypatch):
    """A child killed as by the OOM killer is a transient failure: retried, then reported."""
    suite = tmp_path / "one.yaml"
    suite.write_text("name: one\ntasks:\n  - {name: truthfulqa_mc2, shots: 0, metric: acc}\n")
    monkeypatch.setattr(evaluate.evaluate_benchmark, "retry_delay_seconds", [0, 0])
    monkeypatch.setenv("DAREFLOW_FAULT", f"eval-truthfulqa_mc2:kill-once:{tmp_path / 'killed'}")
    out = run_evaluate({"a": str(tiny_models["a"])}, str(suite), limit=2,
                       store=str(tmp_path / "store"), mirror=True)
    assert (tmp_path / "killed").exists() and out["failures"] == []
    run = _task_runs(out["flow_run_id"])["eval-a-truthfulqa_mc2"]
    assert run.run_count == 2 and run.state.name == "Completed"


def test_bad_requests_fail_before_any_work(tiny_models, tmp_path):
    a = str(tiny_models["a"])
    with pytest.raises(ValueError, match="limit must be a positive number of documents or "
                                         "None, got 0"):
        run_evaluate({"a": a}, "openllm_v1", limit=0)
    with pytest.raises(FileNotFoundError, match="did you mean 'openllm_v1'\\?"):
        run_evaluate({"a": a}, "openllm_v2x", limit=1)
    with pytest.raises(FileNotFoundError, match="is not a local Hugging Face folder"):
        run_evaluate({"a": str(tmp_path)}, "openllm_v1", limit=1)
    with pytest.raises(KeyError, match="merged='m' is not one of the model labels"):
        run_evaluate({"a": a}, "openllm_v1", merged="m")
    other = tmp_path / "other.yaml"
    other.write_text("name: other\ntasks:\n  - {name: lambada_openai, shots: 0, metric: acc}\n")
    with pytest.raises(KeyError, match=r"lambada_openai \(task lambada_openai\) not in the "
                                       "offline mirror"):
        run_evaluate({"a": a}, str(other), mirror=True)
    with pytest.raises(ValueError, match="model label 'a' given twice"):
        parse_model_specs([f"a={a}", a])
    assert parse_model_specs([f"m={a}", a]) == {"m": a, "a": a}
    assert not list(tmp_path.glob("**/eval-results"))


def test_vllm_backend_is_refused_cleanly_without_vllm_or_gpu():
    if vllm_available() and torch.cuda.is_available():
        pytest.skip("vllm and a GPU are present: see test_vllm_backend_on_gpu")
    with pytest.raises(ValueError, match="backend 'vllm' needs"):
        check_backend("vllm")
    with pytest.raises(ValueError, match="unknown backend 'vlm'"):
        check_backend("vlm")


@pytest.mark.gpu
@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_vllm_backend_on_gpu(tmp_path):
    """The vllm backend end to end (a model vLLM's kernels support: head_dim 64)."""
    model = build_tiny_lm(tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    if cfg["hidden_size"] // cfg["num_attention_heads"] < 64:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg.update(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                   intermediate_size=256)
        torch.manual_seed(0)
        big = AutoModelForCausalLM.from_config(LlamaConfig(**{
            k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}))
        big.save_pretrained(model)
    suite = tmp_path / "one.yaml"
    suite.write_text("name: one\ntasks:\n  - {name: truthfulqa_mc2, shots: 0, metric: acc}\n")
    out = run_evaluate({"m": str(model)}, str(suite), limit=2, backend="vllm",
                       store=str(tmp_path / "store"), mirror=True, max_workers=1)
    assert out["failures"] == []
    assert 0 <= out["comparison"][0]["truthfulqa_mc2"] <= 1


@pytest.mark.slow
def test_full_v1_suite_on_two_models(tiny_models, tmp_path):
    """The whole Open LLM Leaderboard v1 suite offline, --limit 2, two models."""
    out = run_evaluate({"a": str(tiny_models["a"]), "b": str(tiny_models["b"])}, "openllm_v1",
                       limit=2, store=str(tmp_path / "store"), mirror=True, max_workers=2)
    assert out["failures"] == []
    cmp = pd.read_csv(out["comparison_csv"], index_col="model")
    assert list(cmp.columns) == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2",
                                 "winogrande", "gsm8k", "average"]
    assert ((cmp >= 0) & (cmp <= 1)).all().all()
    assert list(cmp["average"]) == pytest.approx(list(cmp.iloc[:, :6].mean(axis=1)))
    table = pd.read_parquet(out["parquet"])
    mmlu = table[(table.task == "mmlu") & (table.model == "a")].set_index("metric")
    subjects = table[table.task.str.startswith("mmlu_") & (table.model == "a")
                     & (table.metric == "acc") & (table.n == 2)]
    assert len(subjects) == 57 and mmlu.loc["acc_micro", "n"] == 114
    assert mmlu.loc["acc_macro", "value"] == pytest.approx(subjects["value"].mean())
    gsm = table[(table.task == "gsm8k") & (table.model == "a")]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(gsm.metric)


@pytest.mark.slow
def test_merge_and_evaluate(pico_family, tmp_path, capsys):
    """merge-eval: the merge flow, then merged + base + each source on one v1 task."""
    recipe = write_recipe(tmp_path / "ta.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"])}, {"model": str(pico_family["b"])}],
        "parameters": {"lambda": 0.5}, "dtype": "float32"})
    suite = tmp_path / "one.yaml"
    suite.write_text("name: one\ntasks:\n  - {name: truthfulqa_mc2, shots: 0, metric: acc}\n")
    code = cli_main(["merge-eval", str(recipe), "--out", str(tmp_path / "merged"), "--suite",
                     str(suite), "--limit", "2", "--store", str(tmp_path / "store"),
                     "--offline-mirror"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split("|")[1].strip() for line in io.StringIO(out) if line.startswith("| ")]
    assert rows == ["model", "merged", "base", "ft-a", "ft-b"]
    merged_fp = model_fingerprint(str(tmp_path / "merged"))
    assert merged_fp["kind"] == "manifest"
    shutil.rmtree(tmp_path / "merged")


def test_mirror_in_an_s3_store_is_uploaded_then_materialised(s3_bucket, tmp_path, monkeypatch):
    """`dareflow mirror prepare --store s3://...` builds locally and uploads; a machine without
    a local copy downloads it from the store (lm-eval reads local files)."""
    store = f"{s3_bucket.uri}/store"
    monkeypatch.setenv("DAREFLOW_CACHE", str(tmp_path / "machine-1"))
    assert cli_main(["mirror", "prepare", "--store", store, "--tasks", "winogrande",
                     "truthfulqa_mc2"]) == 0
    first = ensure_mirror(store, ["winogrande", "truthfulqa_mc2"])
    assert first["prepared"] is False and first["mirror_uri"] == f"{store}/eval-mirror"
    from dareflow.io import storage

    assert storage.exists(f"{store}/eval-mirror/data/winogrande/validation.jsonl")

    monkeypatch.setenv("DAREFLOW_CACHE", str(tmp_path / "machine-2"))
    second = ensure_mirror(store, ["winogrande"])
    assert second["prepared"] is False
    assert second["mirror_dir"].startswith(str(tmp_path / "machine-2"))
    manifest = verify_mirror(second["mirror_dir"])
    assert sorted(manifest["tasks"]) == ["truthfulqa_mc2", "winogrande"]
    assert (Path(second["mirror_dir"]) / "data/winogrande/validation.jsonl").read_bytes() == \
        (Path(first["mirror_dir"]) / "data/winogrande/validation.jsonl").read_bytes()

"""A merge as the Prefect UI shows it, read back through the Prefect API of the test
session's server (Prefect's server app in its own process, over HTTP): the run's name and
tags, task run names, the recorded task inputs (the graph), the artifacts, and the state
of every reused unit on the first rerun.
"""

import json
import logging

import pytest
import torch
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)

from dareflow.flows.merge import run_merge
from dareflow.flows.runtime import OneLineFailures
from tests.flows.conftest import make_finetune, write_recipe

UNITS = ("merge-embeddings", "merge-layer_000", "merge-layer_001", "merge-norm+lm_head")


def _recipe(pico_family, path, name):
    return write_recipe(path, {
        "name": name,
        "merge_method": "dare_ties",
        "base_model": str(pico_family["base"]),
        "models": [{"model": str(pico_family["a"]), "parameters": {"density": 0.5}},
                   {"model": str(pico_family["b"]), "parameters": {"density": 0.5}}],
        "seed": 7,
        "dtype": "float32",
    })


def _run_and_tasks(flow_run_id: str):
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return run, {t.name: t for t in tasks}


def _artifacts(key: str) -> list:
    """Every version of the artifact ``key``, oldest first."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)


def _rows(artifact) -> list[dict]:
    return artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)


def _upstream(task_run, names_by_id: dict) -> dict[str, set[str]]:
    """The recorded inputs of a task run: parameter -> names of the task runs it
    depends on (what the UI draws as edges)."""
    return {param: {names_by_id.get(i.id, str(i.id)) for i in inputs}
            for param, inputs in task_run.task_inputs.items() if inputs}


def test_merge_run_reads_like_a_report(pico_family, tmp_path):
    recipe = _recipe(pico_family, tmp_path / "r.yaml", "pico-report")
    store = str(tmp_path / "store")
    out1 = tmp_path / "out1"
    first = run_merge(str(recipe), str(out1), store=store, max_workers=2)

    run, tasks = _run_and_tasks(first["flow_run_id"])
    assert run.name == "pico-report (dare_ties)"
    assert {"method:dare_ties", "recipe:pico-report", "base:base"} <= set(run.tags)
    assert run.parameters["recipe"]["name"] == "pico-report"  # tagging kept the parameters
    assert set(tasks) == {"preflight", "mirror-base", "mirror-ft-a", "mirror-ft-b",
                          "resolve-sources", "check-deltas", "plan-merge", *UNITS,
                          "assemble-model", "report-merge"}
    # tags on the run only: a tagged task run waits for Prefect's concurrency-limit check
    assert {name: t.tags for name, t in tasks.items() if t.tags} == {}

    # the graph holds the true dependencies only
    by_id = {t.id: name for name, t in tasks.items()}
    for unit in UNITS:  # a unit needs the plan, and no other unit
        assert _upstream(tasks[unit], by_id) == {"wait_for": {"plan-merge"}}, unit
    for mirror in ("mirror-base", "mirror-ft-a", "mirror-ft-b"):
        assert _upstream(tasks[mirror], by_id) == {"wait_for": {"preflight"}}, mirror
    assert _upstream(tasks["resolve-sources"], by_id) == {
        "mirrored": {"mirror-base", "mirror-ft-a", "mirror-ft-b"}}
    assert _upstream(tasks["plan-merge"], by_id) == {"sources": {"resolve-sources"},
                                                      "wait_for": {"check-deltas"}}
    assert _upstream(tasks["assemble-model"], by_id) == {"results": set(UNITS),
                                                          "wait_for": {"plan-merge"}}
    assert _upstream(tasks["preflight"], by_id) == {}

    # artifacts: the model, its card, the units, the gate
    [link] = _artifacts("dareflow-merge-pico-report-model")
    assert link.data == f"[{out1}](file://{out1})"
    [card] = _artifacts("dareflow-merge-pico-report-card")
    assert card.type == "markdown" and card.data.startswith("# pico-report\n")
    assert card.data == (out1 / "README.md").read_text().split("---", 2)[2].lstrip("\n")
    assert "merge_method: dare_ties" in card.data  # the resolved recipe, as YAML
    assert "rescale: l1" in card.data  # a default the recipe left out
    [units] = _artifacts("dareflow-merge-pico-report-units")
    rows = _rows(units)
    assert [r["unit"] for r in rows] == ["embeddings", "layer_000", "layer_001", "final"]
    assert [r["tensors"] for r in rows] == [1, 9, 9, 2]
    shards = {s: v["sha256"] for s, v in first["shards"].items()}
    assert sorted(r["sha256"] for r in rows) == sorted(shards.values())
    assert all(r["status"] == "merged" and r["seconds"] > 0 and r["ran_on"] for r in rows)
    assert sum(r["MB"] for r in rows) == pytest.approx(
        sum(v["bytes"] for v in first["shards"].values()) / 1e6, abs=0.01)
    [gate] = _artifacts("dareflow-merge-pico-report-gate")
    gate_rows = _rows(gate)
    assert [(r["model"], r["verdict"]) for r in gate_rows] == [
        (str(pico_family["a"]), "pass"), (str(pico_family["b"]), "pass")]
    assert gate_rows[0]["abs_delta_p99"] == pytest.approx(0.002, rel=1e-3)
    assert gate_rows[1]["abs_delta_p99"] == pytest.approx(0.001, rel=1e-3)

    # the first rerun: every unit reused, shown Cached, the same bytes
    second = run_merge(str(recipe), str(tmp_path / "out2"), store=store, max_workers=2)
    _, again = _run_and_tasks(second["flow_run_id"])
    assert {u: again[u].state.name for u in UNITS} == dict.fromkeys(UNITS, "Cached")
    assert all(again[u].state.type.value == "COMPLETED" for u in UNITS)
    assert second["shards"] == first["shards"]
    history = _artifacts("dareflow-merge-pico-report-units")
    assert len(history) == 2  # one key: the UI shows the recipe's history
    assert [(r["status"], r["seconds"]) for r in _rows(history[-1])] == [("reused", None)] * 4


def test_refused_merge_publishes_the_gate_table_and_logs_the_error_once(
        pico_family, tmp_path):
    big = make_finetune(pico_family["base"], tmp_path / "ft-big",
                        lambda name, t: torch.full(t.shape, 0.1))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "name": "pico-refused", "merge_method": "dare_linear",
        "base_model": str(pico_family["base"]), "models": [{"model": str(big)}]})
    with pytest.raises(ValueError, match="DARE does not apply to ") as info:
        run_merge(str(recipe), str(tmp_path / "out"), store=str(tmp_path / "store"))
    message = str(info.value)
    base = str(pico_family["base"])
    assert (f"merge '{big}' against the model it was fine-tuned from, not against '{base}'"
            in message)

    [gate] = _artifacts("dareflow-merge-pico-refused-gate")
    assert gate.description == "DARE applicability gate: refused the merge"
    [row] = _rows(gate)
    assert row["model"] == str(big) and row["verdict"] == "fail"
    assert row["abs_delta_p99"] == pytest.approx(0.1, rel=1e-3)

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        name = FlowRunFilterName(any_=["pico-refused (dare_linear)"])
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=name))
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    errors = [log.message for log in logs if log.level >= logging.ERROR]
    assert run.state.name == "Failed"
    # the message once (the task's line); the flow names the task; no traceback
    assert [m for m in errors if "DARE does not apply" in m] == [
        "ValueError: " + message.replace("\n", " ")]
    assert ("stopped: task run 'check-deltas' failed with ValueError (its message is in "
            "its log)") in errors
    assert not any("Traceback" in m for m in errors)


def test_one_line_failures_keeps_the_traceback_at_debug_level():
    """With debug logging on, the traceback follows the one line as a DEBUG record."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("prefect.task_runs.test-one-line")
    logger.propagate, keep = False, Keep()
    logger.addHandler(keep)
    logger.addFilter(OneLineFailures())
    logger.setLevel(logging.DEBUG)
    try:
        try:
            raise RuntimeError("first line\nsecond line")
        except RuntimeError:
            logger.exception("Task run failed with exception: %r", "x",
                             extra={"task_run_name": "plan-merge"})
        logger.error("Finished in state Failed('Task run encountered an exception ...')")
    finally:
        logger.removeHandler(keep)
    assert [(r.levelname, r.getMessage(), r.exc_info is not None) for r in records] == [
        ("ERROR", "RuntimeError: first line second line", False),
        ("DEBUG", "traceback of the error above", True),
        ("ERROR", "Finished in state Failed", False),
    ]


def test_inspect_is_a_flow_run_with_its_table_and_plot_as_artifacts(pico_family, tmp_path,
                                                                      capsys):
    from safetensors.torch import load_file

    from dareflow.cli import main as cli_main

    store = tmp_path / "store"
    code = cli_main(["inspect", str(pico_family["base"]), str(pico_family["a"]),
                     "--store", str(store), "--plot", str(tmp_path / "deltas.png")])
    printed = capsys.readouterr().out
    assert code == 0
    key = "dareflow-inspect-ft-a-vs-base"
    assert f"Prefect artifacts: {key} (table), {key}-plot (plot)" in printed
    assert (tmp_path / "deltas.png").read_bytes() == (
        store / "experiments" / "inspect" / "ft-a-vs-base.png").read_bytes()

    [table] = _artifacts(key)
    rows = _rows(table)
    tensors = load_file(pico_family["base"] / "model.safetensors")
    assert [r["tensor"] for r in rows] == [*sorted(tensors), "(all)"]
    assert rows[-1]["numel"] == sum(t.numel() for t in tensors.values())
    assert rows[-1]["abs_p99"] == pytest.approx(0.002, rel=1e-3)  # a = base + 0.002
    [plot] = _artifacts(key + "-plot")
    assert plot.type == "image" and plot.data.startswith("data:image/png;base64,iVBORw0KGgo")
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[table.flow_run_id])))
    assert run.name == "inspect ft-a vs base" and run.state.name == "Completed"

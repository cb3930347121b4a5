"""The nightly flow of one recipe: merge, evaluate, append the history, compare: wiring only.

merge flow (subflow, into ``{store}/models/<recipe name>``, reusing committed layer units;
its unit tasks on threads here or on a Dask cluster) → evaluation of merged + base + sources
(a run of the ``evaluation`` deployment on the evaluation pool, or the evaluate flow in this
process when none is given; cached results are reused) → one row per (model, task, metric) appended to ``{store}/history/<recipe>.parquet``
→ comparison with the last ``ok`` night (``dareflow.history``) → markdown artifact and score
plot ``{store}/history/<recipe>.png``. A regression ends the run Failed, naming the tasks.
"""

from __future__ import annotations

import datetime
import io
from typing import Any, Literal

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from dareflow import history
from dareflow.evaluation.backends import (
    DEFAULT_TIMEOUT_S,
    BackendOptions,
    option_problems,
    plan_here,
)
from dareflow.evaluation.checks import check_options, merge_eval_models
from dareflow.flows.evaluate import eval_task_runner, evaluate_flow
from dareflow.flows.merge import merge_flow, task_runner_for
from dareflow.io import storage
from dareflow.recipe import Recipe, load_recipe, parse_recipe, recipe_to_dict
from dareflow.settings import default_store


def model_roles(manifest: dict[str, Any], models: dict[str, str]) -> dict[str, str]:
    """``{label: role}`` of ``merge_eval_models``' labels (``merged``, ``base``, ``source``)."""
    by_uri = {s["uri"]: ("base" if s["role"] == "base" else "source")
              for s in manifest["sources"]}
    return {label: "merged" if label == "merged" else by_uri[uri]
            for label, uri in models.items()}


def source_revisions(manifest: dict[str, Any]) -> dict[str, str | None]:
    """``{model: pinned revision}`` of the merge's inputs."""
    return {str(s["model"]): s.get("revision") for s in manifest["sources"]}


def read_recipe(recipe: str | dict[str, Any]) -> Recipe:
    """The recipe of a night: a mapping (what deployments pass), or a YAML path relative to
    the flow run's working directory (the cloned repository on a worker)."""
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "recipe parameter")
    return load_recipe(recipe)


def _evaluate(deployment: str | None, parameters: dict[str, Any], workers: int) -> str:
    """Run the evaluation (deployment run or in-process); returns the final state's name."""
    if deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(name=deployment, parameters=parameters, as_subflow=True)
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"evaluation deployment '{deployment}' run {run.id} ended "
                               f"{run.state.name if run.state else 'without a state'}")
        return f"deployment {deployment}, run {run.id}"
    evaluate_flow.with_options(task_runner=eval_task_runner(workers))(**parameters)
    return "in this process"


@flow(name="dare-nightly")
def nightly_flow(recipe: str | dict[str, Any], store: str | None = None, suite: str = "demo_skills",
                 limit: int | None = None, evaluation: str | None = None,
                 backend: Literal["hf", "vllm"] = "hf", mirror: bool = False,
                 device: Literal["cpu", "cuda", "auto"] = "auto",
                 batch_size: int | Literal["auto"] | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 max_workers: int | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S,
                 dask_address: str | None = None) -> Any:
    """One night of ``recipe``: merge, evaluate, record, compare.

    Args:
        recipe: the recipe as a mapping, or the path of its YAML (relative to the flow
            run's working directory).
        store: artifact store (folder); default ``$DAREFLOW_STORE`` or ~/.cache/dareflow.
        suite: suite name or file; limit: documents per benchmark (None: all).
        evaluation: ``flow-name/deployment-name`` of the evaluation deployment; None runs
            the evaluation in this process.
        backend, mirror, device, batch_size, tensor_parallel_size, data_parallel_size,
        max_model_len, gpu_memory_utilization, max_workers, timeout: how the evaluation
            runs (see dareflow.flows.evaluate.evaluate_flow). With ``evaluation``, the
            host-dependent checks (GPUs, vLLM) happen on the evaluation worker.
        dask_address: scheduler of a Dask cluster for the merge's unit tasks
            (``tcp://host:8786``); None: threads in this process.

    Returns:
        ``{"regression", "history", "plot", "results", "units_reused", "units_merged",
        "results_cached", "results_computed", "comparison"}``; a Failed state with the same
        result data when the merge regressed.
    """
    log = get_run_logger()
    parsed = read_recipe(recipe)
    check_options(suite, limit=limit, backend=backend, mirror=mirror)
    options = BackendOptions(tensor_parallel_size, data_parallel_size, max_model_len,
                             gpu_memory_utilization)
    if evaluation:  # GPUs and vLLM are the evaluation worker's: checked there
        if problems := option_problems(backend, options):
            raise ValueError("; ".join(problems))
        workers = 1
    else:
        workers = plan_here(backend, device, options, batch_size=batch_size,
                            max_workers=max_workers, timeout_s=timeout)["workers"]
    store = store or default_store()
    name = parsed.name
    hist_uri = history.history_uri(store, name)
    run_id = str(flow_run.get_id() or "local")
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()

    out = storage.join(store, "models", name)
    merge = merge_flow.with_options(task_runner=task_runner_for(dask_address=dask_address))
    manifest = merge(recipe=recipe_to_dict(parsed), out=out, store=store, overwrite=True)
    reused = sum(bool(c) for c in manifest["cached"].values())
    merged_units = len(manifest["cached"]) - reused

    # store URIs: the evaluation copies models in an object store to its own machine
    models = {**merge_eval_models(manifest, "merged"), "merged": out}
    results_uri = storage.join(store, "results", f"nightly-{name}-{run_id}")
    where = _evaluate(evaluation, {
        "models": models, "suite": suite, "limit": limit, "backend": backend,
        "store": store, "mirror": mirror, "merged": "merged", "results": results_uri,
        "device": device, "batch_size": batch_size, "max_workers": max_workers,
        "timeout": timeout, **options.as_dict()}, workers)
    table = pd.read_parquet(io.BytesIO(storage.read_bytes(
        storage.join(results_uri, "results.parquet"))))
    summary = pd.read_json(io.BytesIO(storage.read_bytes(
        storage.join(results_uri, "summary.json"))), typ="series")
    launched = [bool(r.get("launched")) for r in summary["runs"] if r.get("status") == "ok"]

    fingerprints = (table.dropna(subset=["revision"]).groupby("model")["revision"].first()
                    .to_dict())
    fingerprints = {label: fingerprints.get(label, "-") for label in models}
    rows = history.night_rows(
        table, date=date, flow_run_id=run_id, suite=str(summary["suite"]),
        roles=model_roles(manifest, models), fingerprints=fingerprints,
        sources=history.pinned_sources(source_revisions(manifest)))
    past = history.read_history(hist_uri)
    last = history.last_ok_night(past, exclude_run=run_id)
    comparison = history.compare_nights(rows, last)
    regression = history.is_regression(comparison)
    table_now = history.append_history(
        hist_uri, history.with_verdict(rows, history.REGRESSION if regression else history.OK))
    plot = history.write_plot(history.plot_uri(store, name), table_now, f"{name}: merged")

    note = (f"merge: {merged_units} unit(s) merged, {reused} reused from the layer cache; "
            f"evaluation ({where}): {sum(launched)} run(s) computed, "
            f"{len(launched) - sum(launched)} from the results cache")
    if merged_units == 0 and not any(launched):
        note = "Nothing changed, nothing recomputed. " + note
    last_date = None if last.empty else str(last["date"].iloc[0])
    markdown = history.report_markdown(name, comparison, date=date, last_date=last_date,
                                       plot=plot, note=note)
    create_markdown_artifact(markdown, key="dareflow-nightly-" + name.lower().replace("_", "-"),
                             description=f"{name}: night of {date}")
    log.info("%s\nhistory: %s", markdown, hist_uri)
    result = {"regression": regression, "history": hist_uri, "plot": plot,
              "results": results_uri, "units_reused": reused, "units_merged": merged_units,
              "results_cached": len(launched) - sum(launched),
              "results_computed": sum(launched), "comparison": comparison, "note": note}
    if regression:
        bad = ", ".join(c["task"] for c in comparison if c["regression"])
        return Failed(message=f"regression on {bad} vs {last_date}", data=result)
    return Completed(message=note, data=result)

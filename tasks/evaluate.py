"""Prefect tasks of the evaluation flow: thin wrappers over ``dareflow.evaluation``
(``mirror_store``, ``fingerprint``, ``runs``, ``results``, ``report``).

Each benchmark of each model is one task run (mapped), evaluated in its own child process;
its raw lm-eval JSON is committed to the store under a content key, and the Prefect cache
key is that content key only while the committed object exists.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from dareflow.evaluation import mirror_store, report, results, runs
from dareflow.evaluation.child import EvaluationError
from dareflow.evaluation.fingerprint import model_fingerprint
from dareflow.evaluation.suite import load_suite

#: Seconds before the first and the second retry of a transient failure.
RETRY_DELAYS = [10, 60]


@task(name="prepare-eval-mirror", cache_policy=NONE)
def stage_mirror(store: str, tasks: list[str] | None = None) -> dict[str, Any]:
    """The offline v1 mirror in ``{store}/eval-mirror/`` and a local folder to read it from."""
    info = mirror_store.ensure_mirror(store, tasks)
    get_run_logger().info("offline mirror %s (%s) at %s", info["mirror_uri"],
                          "prepared" if info["prepared"] else "verified", info["mirror_dir"])
    return info


@task(name="fingerprint-model", cache_policy=NONE, task_run_name="fingerprint-{label}")
def fingerprint_model(label: str, model_uri: str) -> dict[str, Any]:
    """``{"label", "model_dir", "revision", "kind"}`` of one model (see model_fingerprint)."""
    fp = model_fingerprint(model_uri)
    get_run_logger().info("model %s: %s (%s)", label, fp["revision"][:19], fp["kind"])
    return {"label": label, **fp}


def benchmark_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The run's content key (``runs.benchmark_key``, the same as the committed result's),
    but only while its result is committed in this run's store (``store``), so a deleted
    result is evaluated again rather than reported as cached, and a copied store never
    answers from the one it was copied from."""
    p = parameters
    key = runs.benchmark_key(p["model"], p["entry"], limit=p["limit"], backend=p["backend"],
                             mirror_dir=p["mirror_dir"], run=p.get("run"))
    if runs.committed_result(p["store"], key) is None:
        return None
    return f"dareflow-eval-{key}"


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only failures that may pass next time (killed child, OOM, network; not a
    timeout, which would take as long again)."""
    exc = state.data
    return isinstance(exc, EvaluationError) and exc.transient


@task(name="evaluate-benchmark", cache_key_fn=benchmark_cache_key, persist_result=True,
      retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_transient,
      task_run_name="eval-{model[label]}-{entry[name]}")
def evaluate_benchmark(model: dict[str, Any], entry: dict[str, Any], store: str,
                       limit: int | None, backend: str, mirror_dir: str | None,
                       run: dict[str, Any] | None = None) -> dict[str, Any]:
    """One benchmark of one model (child process, in a slot of the plan ``run``: see
    ``backends.plan_run``; killed after its ``timeout_s``); returns the committed result's
    record.

    The record (Prefect caches it in the store) locates the result relative to the store
    (``path``), never by URI: a moved or copied store stays valid (``publish_results``
    locates it in this run's store).
    """
    out = runs.evaluate_benchmark(model, entry, store=store, limit=limit, backend=backend,
                                  mirror_dir=mirror_dir, run=run)
    where = f" on GPU(s) {','.join(out['gpus'])}" if out.get("gpus") else ""
    get_run_logger().info(
        "%s/%s: %s in %.1f s", model["label"], entry["name"],
        f"evaluated in a child process{where}" if out["launched"]
        else "committed result reused", out["seconds"])
    return {**{k: v for k, v in out.items() if k != "uri"}, "path": runs.result_path(out["key"])}


def outcome_of(future: PrefectFuture, model: dict[str, Any], entry: dict[str, Any]) -> dict:
    """A finished run as ``{"status": "ok", ...}`` or ``{"status": "failed", "error": ...}``
    (a failed benchmark is reported, not raised, so the others still count)."""
    future.wait()
    state = future.state
    if state.is_completed():
        return {**state.result(), "status": "ok"}
    error = state.message or state.name
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the failure is the outcome
        error = f"{type(exc).__name__}: {exc}"
    return {"label": model["label"], "task": entry["name"], "revision": model["revision"],
            "status": "failed", "error": error}


@task(name="publish-eval-results", cache_policy=NONE)
def publish_results(outcomes: list[dict[str, Any]], suite: str, merged: str,
                  sources: list[str], results_uri: str | None, store: str) -> dict[str, Any]:
    """Tidy table (parquet + CSV), raw JSON, comparison (markdown + CSV) and Prefect table and
    markdown artifacts; returns the URIs, the comparison and the failures."""
    parsed = load_suite(suite)
    # cached run records are store-relative: their results in this run's store
    outcomes = [runs.in_store(o, store) if o["status"] == "ok" else o for o in outcomes]
    entries = {t.name: t.model_dump(mode="json") for t in parsed.tasks}
    table, raws = report.results_table(outcomes, entries)
    wide, failed = results.comparison(table, parsed, merged, sources)
    markdown = results.comparison_markdown(wide, failed)
    uri = results_uri or report.default_results_uri(store, parsed.name, flow_run.get_id())
    failures = [{"model": o["label"], "task": o["task"], "error": o["error"]}
                for o in outcomes if o["status"] == "failed"]
    summary = {"suite": parsed.name, "flow_run_id": str(flow_run.get_id()), "merged": merged, "sources": sources, "failures": failures,
               "runs": [{k: o.get(k) for k in ("label", "task", "status", "key", "launched",
                                               "seconds")} for o in outcomes]}
    uris = report.write_results(uri, table, raws, markdown, wide, summary)
    key = "dareflow-eval-" + parsed.name.replace("_", "-")
    create_table_artifact(results.comparison_rows(wide, failed), key=key,
                          description=f"{parsed.name}: {merged} vs {', '.join(sources) or '-'} "
                                      "(percent; ★ best per column)")
    create_markdown_artifact(f"## {parsed.name}\n\n{markdown}", key=key + "-md",
                             description=f"results: {uri}")
    get_run_logger().info("results in %s\n%s", uri, markdown)
    return {"results_uri": uri, **uris, "markdown": markdown, "failures": failures,
            "flow_run_id": summary["flow_run_id"], "runs": summary["runs"],
            "comparison": wide.reset_index().to_dict(orient="records"), "n_rows": len(table)}

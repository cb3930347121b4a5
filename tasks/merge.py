"""Prefect tasks of the merge flow: thin wrappers over ``dareflow.merge`` (``plan``,
``units``, ``output``).

Each task reads, calls pure code, writes, and returns URIs plus small metadata.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.states import Completed

from dareflow.errors import is_transient
from dareflow.io import storage
from dareflow.merge import output, publish, report, units
from dareflow.merge.assemble import README_NAME
from dareflow.merge.plan import MergePlan, UnitJob, plan_merge
from dareflow.merge.preflight import preflight
from dareflow.recipe import mask_id, parse_recipe
from dareflow.sources import collect_sources, mirror_model
from dareflow.tasks.experiments import publish_gate_table


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: only network/server errors (``dareflow.errors.is_transient``)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return is_transient(exc)


@task(name="preflight", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_transient, task_run_name="preflight")
def preflight_merge(recipe: dict[str, Any], store_uri: str, out_uri: str) -> dict[str, Any]:
    """Check the recipe's models from metadata only (dareflow.merge.preflight), before any
    model is mirrored; raises what the plan would raise (every family problem)."""
    report = preflight(parse_recipe(recipe, "<recipe>"), store_uri, out_uri=out_uri,
                       measure=False)  # the IO probe serves `dareflow plan`'s time estimate
    report.raise_for_problems()
    summary = report.summary()
    get_run_logger().info(
        "pre-flight ok: %d tensors in %d units, %.1f MB to download, store +%.1f MB",
        summary["tensors"], summary["units"], (summary["download_bytes"] or 0) / 1e6,
        (summary["store_bytes"] or 0) / 1e6,
    )
    return summary


def _mirror_run_name(parameters: dict[str, Any]) -> str:
    """``mirror-<model id>``: the model's name without its location (``mask_id``)."""
    return f"mirror-{mask_id(parameters['spec']['model'])}"


@task(name="mirror-source", cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_transient, task_run_name=_mirror_run_name)
def mirror_source(spec: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """Pin one model to a revision and mirror it into the store once (dareflow.sources.mirror)."""
    record = mirror_model(spec, store_uri)
    get_run_logger().info(
        "%s %s: %s revision %s, %s %s", record["role"], record["model"], record["kind"],
        record["revision"], "read in place" if record["in_place"]
        else "already mirrored" if record["cached"] else "mirrored to", record["uri"],
    )
    return record


@task(name="resolve-sources", cache_policy=NONE, task_run_name="resolve-sources")
def resolve_sources(recipe: dict[str, Any], mirrored: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the mirrored models into base/model URIs and the recorded sources list."""
    return collect_sources(parse_recipe(recipe, "<recipe>"), mirrored)


@task(name="plan-merge", cache_policy=NONE, task_run_name="plan-merge")
def make_plan(recipe: dict[str, Any], sources: dict[str, Any], work_uri: str,
              store_uri: str) -> dict[str, Any]:
    """Read headers, check the family, split into layer units with content keys."""
    plan = plan_merge(
        parse_recipe(recipe, "<recipe>"),
        base_uri=sources["base_uri"],
        model_uris=sources["model_uris"],
        work_uri=work_uri,
        store_uri=store_uri,
        sources=sources["sources"],
    )
    get_run_logger().info(
        "planned %d units (%d tensors) for %d model(s), output dtype %s",
        len(plan.units), sum(len(u.tensors) for u in plan.units), len(plan.model_uris),
        plan.out_dtype,
    )
    return plan.to_dict()


def unit_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect cache key of a unit: its content key, but only while its output is
    committed in this run's store (``plan["store_uri"]``), so a deleted, truncated or
    modified shard is recomputed rather than reported as cached, and a copied store never
    answers from the store it was copied from. The cached record holds no URI (see
    :func:`merge_unit`)."""
    plan = MergePlan.from_dict(parameters["plan"])
    job = _job(parameters["unit"])
    if units.committed_unit(plan, job) is None:
        return None
    return f"dareflow-unit-{job.key}"


def _job(unit: dict[str, Any]) -> UnitJob:
    return UnitJob(unit["unit"], tuple(unit["tensors"]), unit["key"])


def _unit_run_name(parameters: dict[str, Any]) -> str:
    """``merge-layer_003``, ``merge-embeddings``; the final unit by what it holds
    (``merge-norm+lm_head``)."""
    unit = parameters["unit"]
    return f"merge-{report.unit_label(unit['unit'], unit['tensors'])}"


@task(name="merge-unit", cache_key_fn=unit_cache_key, persist_result=True,
      task_run_name=_unit_run_name)
def merge_unit(plan: dict[str, Any], unit: dict[str, Any]) -> Any:
    """DARE + fusion of one layer unit; writes its shard and returns its record.

    The record (Prefect caches it in the store) locates the shard relative to the store
    (``path``), never by URI: a moved or copied store stays valid. Readers locate it
    with ``units.in_store(record, store_uri)``. A unit already committed in the store
    (the first rerun: Prefect holds no cache record of it yet) ends in a Completed state
    named Cached, as Prefect's own cache hits do on later reruns.
    """
    started = time.perf_counter()
    merge_plan, job = MergePlan.from_dict(plan), _job(unit)
    try:
        result = units.merge_unit(merge_plan, job)
    finally:  # a failed unit must not keep its lease (others would wait for it)
        units.release_unit(merge_plan, job)
    seconds = time.perf_counter() - started
    get_run_logger().info(
        "unit %s: %s, %d tensors, %.1f MB in %.2f s", unit["unit"],
        "already committed" if result["cached"] else "merged", len(unit["tensors"]),
        result["nbytes"] / 1e6, seconds,
    )
    # host:pid of the process that ran it: shows how units spread over (Dask) workers.
    record = {**units.store_relative(result), "seconds": seconds,
              "ran_on": f"{socket.gethostname()}:{os.getpid()}"}
    if result["cached"]:
        return Completed(data=record, name="Cached",
                         message=f"unit {unit['unit']} already committed in the store")
    return record


@task(name="assemble-model", cache_policy=NONE, task_run_name="assemble-model")
def assemble_model(plan: dict[str, Any], results: list[dict[str, Any]], out_uri: str,
                   overwrite: bool = False) -> dict[str, Any]:
    """Copy the shards, write index, config, tokenizer, model card and manifest into the
    staging folder, and publish it at ``out_uri`` (dareflow.merge.publish)."""
    # cached unit records are store-relative: their shards in this run's store
    results = [units.in_store(r, plan["store_uri"]) for r in results]
    with publish.output_errors(out_uri):  # a full or read-only disk: the output's, by name
        manifest = output.assemble_model(MergePlan.from_dict(plan), results, plan["work_uri"])
    publish.publish(plan["work_uri"], out_uri, overwrite=overwrite)
    get_run_logger().info("published merged model to %s", out_uri)
    return manifest


@task(name="report-merge", cache_policy=NONE, task_run_name="report-merge")
def report_merge(name: str, out_uri: str, results: list[dict[str, Any]],
                 verdicts: list[dict[str, Any]]) -> dict[str, str]:
    """Publish the merge as Prefect artifacts under keys stable per recipe
    (``report.artifact_key``): a link to the model, its model card (the resolved
    recipe), the table of units and, when the gate measured, its table.

    Returns:
        ``{kind: artifact key}``.
    """
    keys = {kind: report.artifact_key(name, kind) for kind in ("model", "card", "units", "gate")}
    create_link_artifact(link=report.link_of(out_uri), link_text=out_uri, key=keys["model"],
                         description=f"merged model {name}")
    card = storage.read_bytes(storage.join(out_uri, README_NAME)).decode()
    create_markdown_artifact(markdown=report.card_markdown(card), key=keys["card"],
                             description=f"model card of {name} (the resolved recipe)")
    rows = report.units_rows(results)
    reused = sum(r["status"] == "reused" for r in rows)
    create_table_artifact(table=rows, key=keys["units"],
                          description=f"{name}: {len(rows) - reused} unit(s) merged, "
                                      f"{reused} reused")
    if verdicts:
        publish_gate_table(verdicts, keys["gate"], refused=False)
    else:
        del keys["gate"]
    return keys

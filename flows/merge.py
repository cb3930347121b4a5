"""The merge flow: wiring only (see dareflow.tasks.merge for the tasks).

pre-flight (config, index and headers read where each model lives: every family problem
before any download) → mirror sources into the store (one mapped task per model, pinned
revisions) → plan
(headers, family check, layer units) → one mapped task per unit (DARE + fusion, writes
one shard) → assemble and publish the HF folder.
"""

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from prefect import flow, get_client, unmapped
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from dareflow.flows.runtime import api_ready, guard_temporary_server, one_line_failures
from dareflow.merge import output, publish, report
from dareflow.merge.plan import warm_up_kernels
from dareflow.recipe import load_recipe, mask_id, parse_recipe, recipe_to_dict
from dareflow.settings import default_store
from dareflow.sources import source_specs
from dareflow.tasks.experiments import check_deltas
from dareflow.tasks.merge import (
    assemble_model,
    make_plan,
    merge_unit,
    mirror_source,
    preflight_merge,
    report_merge,
    resolve_sources,
)

#: Default parallel unit tasks: bounded so peak memory stays ~max_workers units.
DEFAULT_MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))


def merge_run_name() -> str:
    """The flow run's name, from its parameters: ``<recipe name> (<method>)``
    (``dareflow.merge.report.run_name``)."""
    params = flow_run.parameters
    return report.run_name(params["recipe"], params["out"])


@flow(name="dare-merge", flow_run_name=merge_run_name,
      task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS))
def merge_flow(recipe: dict[str, Any], out: str, store: str | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Merge the models of ``recipe`` into an HF folder at ``out``.

    The run is named after the recipe and its method and tagged ``method:``, ``recipe:``
    and ``base:``; it publishes a link to the model, its model card, the table of units
    and the gate's table as artifacts (``dareflow.merge.report``). Its graph holds the
    true dependencies only: data passed as futures and ``wait_for``, no edges Prefect
    infers from shared objects (:func:`quote_for`).

    Args:
        recipe: The recipe as a mapping (see dareflow.recipe.Recipe).
        out: Output folder or URI; refused if it exists and is not empty, unless
            ``overwrite``, if it is, contains or is inside an input folder or the store,
            or while another run writes to it.
        store: Artifact store root (folder or s3:// URI) holding committed layer units
            and Prefect results; default ``$DAREFLOW_STORE`` or ~/.cache/dareflow.
        overwrite: Replace an existing output once the new merge is complete.

    Returns:
        The manifest written next to the model, plus ``out``, per-unit ``cached`` and
        ``ran_on``, and the ``flow_run_id``.
    """
    one_line_failures()
    parsed = parse_recipe(recipe, "recipe")
    warm_up_kernels(parsed)
    store = store or default_store()
    output.check_output(out, overwrite=overwrite, inputs=output.input_locations(parsed),
                        store_uri=store)
    name = report.merge_name(recipe, out)
    run_tags = report.run_tags(recipe, out, mask_id(parsed.base_model)
                               if parsed.base_model else None)
    # the flow run only: Prefect checks every tagged task run against its tag
    # concurrency limits through the API, and with no limit set that check stalled the
    # running units ~2 s every 5 s (measured on the 0.84 B benchmark family)
    tag_flow_run(run_tags)
    quoted = quote_for(FlowRunContext.get().task_runner)
    recipe_in = quoted(recipe_to_dict(parsed))
    # this run's lock on `out` and staging folder of its own (removed if the run fails)
    with publish.reserve(out) as target:
        # metadata only: a family problem (or a full output disk) stops the run before
        # any model is mirrored
        checked = preflight_merge.submit(recipe_in, quoted(store), quoted(out))
        checked.result()
        mirrored = mirror_source.map(quoted(source_specs(parsed)), quoted(unmapped(store)),
                                     wait_for=[finished(checked)])
        sources = resolve_sources.submit(recipe_in, mirrored)
        results_in_store = result_storage(store)
        # DARE gate: refuses deltas too large for DARE; cached by input fingerprints
        gate = check_deltas.with_options(result_storage=results_in_store).submit(
            recipe_in, sources, quoted(report.artifact_key(name, "gate")))
        verdicts = gate.result()
        planned = make_plan.submit(recipe_in, sources, quoted(target.staging_uri), quoted(store),
                                   wait_for=[gate])
        plan = planned.result()
        unit_task = merge_unit.with_options(result_storage=results_in_store)
        # largest units first (embeddings, output head): no big unit left running alone
        # at the end while the other workers idle; results come back in plan order
        jobs = plan["units"]
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i].get("elements", 0))
        futures = unit_task.map(quoted(unmapped(plan)), quoted([jobs[i] for i in order]),
                                wait_for=[finished(planned)])
        done = [futures[order.index(i)] for i in range(len(jobs))]
        results = [f.result() for f in done]
        manifest = assemble_model.submit(quoted(plan), done, quoted(out), overwrite,
                                         wait_for=[finished(planned)]).result()
    report_merge.submit(quoted(name), quoted(out), quoted(results), quoted(verdicts),
                        wait_for=done).result()
    cached = sum(r["cached"] for r in results)
    print(f"merged {len(results) - cached} unit(s), reused {cached} committed unit(s)")
    return {**manifest, "out": out, "cached": {r["unit"]: r["cached"] for r in results},
            "ran_on": {r["unit"]: r.get("ran_on") for r in results},
            "flow_run_id": str(flow_run.id)}


def quote_for(task_runner: Any) -> Callable[[Any], Any]:
    """How the flow passes inputs to tasks on ``task_runner``: quoted
    (``prefect.utilities.annotations.quote``) where tasks run in this process, so Prefect
    does not link tasks that pass around the same object (the plan, the recipe, a URI) by
    identity (its run context maps the ids of every task's result and their items to that
    task). Tasks on Dask get their inputs as they are: Dask rebuilds Prefect's annotations
    (named tuples) as plain tuples, and its workers' run contexts hold none of this flow's
    results, so only futures and ``wait_for`` make edges there."""
    if isinstance(task_runner, ThreadPoolTaskRunner):
        return quote
    return lambda value: value


def finished(future: PrefectFuture[Any]) -> State[Any]:
    """What a task waits on once ``future``'s result is in hand: its final state, carrying
    a marker instead of its result (the waiting task resolves ``wait_for`` and drops it).

    The run's graph keeps the edge, as for the future itself. A future in ``wait_for`` is a
    data dependency to Dask, which places every waiting task on the one worker holding the
    result (the units of a merge all ran on the worker that made the plan); and a state
    with its result attached makes Prefect trace extra edges through the result's contents.
    """
    return future.state.model_copy(update={"data": "completed"})


def tag_flow_run(run_tags: list[str]) -> None:
    """Add ``run_tags`` to this flow run's tags in the API (a run started by a deployment
    keeps the deployment's), so the runs list can be filtered by method, recipe and base."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(run.id, tags=sorted(set(run.tags) | set(run_tags)))


def result_storage(store: str):
    """Prefect result storage inside the artifact store, so cache records travel with
    the units they describe. Object stores get a RemoteFileSystem block (saved under a
    name derived from the URI; credentials stay in the environment, never in the block).
    """
    import hashlib
    from pathlib import Path

    from prefect.filesystems import RemoteFileSystem

    from dareflow.io import localdisk, storage
    from dareflow.io.s3 import storage_options_for

    uri = storage.join(store, "prefect-results")
    fs, path = storage.get_fs(uri)
    if localdisk.is_local(fs):
        return Path(path)
    # The endpoint and client config (never the credentials) go into the block: fsspec
    # reuses a cached s3fs instance for equal arguments, so without them a process that
    # once wrote to another endpoint would keep writing its results there.
    public = {k: v for k, v in storage_options_for(uri).items()
              if k in ("endpoint_url", "config_kwargs", "anon", "profile")}
    block = RemoteFileSystem(basepath=uri, settings=public)
    name = "dareflow-results-" + hashlib.sha256(
        json.dumps([uri, public], sort_keys=True).encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block


def task_runner_for(max_workers: int | None = None, dask_address: str | None = None,
                    dask_workers: int | None = None):
    """The task runner of the unit tasks: a bounded thread pool in this process, or Dask.

    Args:
        max_workers: Threads in this process (default ``DEFAULT_MAX_WORKERS``).
        dask_address: Scheduler of a running Dask cluster (``tcp://host:8786``): unit tasks
            run on its workers, which read inputs and write shards in the shared store
            (a store every worker can reach: s3://, or a shared filesystem).
        dask_workers: Start a temporary local Dask cluster of this many worker processes
            (one thread each) for the run.

    Raises:
        ValueError: more than one of the three is given, or a count is < 1.
        ImportError: Dask is asked for and prefect-dask is not installed.
    """
    given = [f for f, v in (("max_workers", max_workers), ("dask_address", dask_address),
                            ("dask_workers", dask_workers)) if v is not None]
    if len(given) > 1:
        raise ValueError(
            f"{' and '.join(given)} were both given; pass one: max_workers (threads here), "
            "dask_address (an existing Dask cluster) or dask_workers (a local Dask cluster)"
        )
    for flag, n in (("max_workers", max_workers), ("dask_workers", dask_workers)):
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    if dask_address is None and dask_workers is None:
        return ThreadPoolTaskRunner(max_workers=max_workers or DEFAULT_MAX_WORKERS)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ImportError(
            "running unit tasks on Dask needs prefect-dask: pip install 'dareflow[dask]'"
        ) from e
    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "processes": True,
                                          "threads_per_worker": 1})


def run_merge(recipe_path: str, out: str | None = None, *, store: str | None = None,
              max_workers: int | None = None, overwrite: bool = False,
              dask_address: str | None = None,
              dask_workers: int | None = None) -> dict[str, Any]:
    """Validate a recipe file and run the merge flow (what `dareflow merge` calls); unit
    tasks run on threads here or on Dask (see :func:`task_runner_for`)."""
    runner = task_runner_for(max_workers, dask_address, dask_workers)
    recipe = load_recipe(recipe_path)
    warm_up_kernels(recipe)  # overlaps the flow run's start-up
    out = out or recipe.output
    if not out:
        raise ValueError(
            f"no output for '{recipe_path}': pass --out DIR or set output: in the recipe"
        )
    dask = dask_address is not None or dask_workers is not None
    api_ready()  # the command's temporary Prefect server, started in the background
    with shared_prefect_api() if dask else contextlib.nullcontext():
        return merge_flow.with_options(task_runner=runner)(
            recipe=recipe_to_dict(recipe), out=out, store=store, overwrite=overwrite
        )


def shared_prefect_api():
    """Settings under which Dask worker processes report to this process's Prefect API.

    With ``PREFECT_API_URL`` set (a real server, required for workers on other machines)
    nothing changes. Without it Prefect runs an ephemeral server per process, and each Dask
    worker would start its own: start this process's now and put its URL in the settings,
    which prefect-dask ships to the workers with every task.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    server = guard_temporary_server()  # what get_client() starts; exits with this process
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})

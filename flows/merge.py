"""The merge flow: wiring only (see tasks.merge_tasks for the tasks).

resolve sources → plan (headers, family check, layer units) → one mapped task per
unit (DARE + fusion, writes one shard) → assemble and publish the HF folder.
"""

import os
from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import merging
from tasks.config import load_recipe, parse_recipe, recipe_to_dict
from tasks.merge_tasks import assemble_model, merge_unit, plan_merge, resolve_sources

#: Default parallel unit tasks: bounded so peak memory stays ~max_workers units.
DEFAULT_MAX_WORKERS = max(1, min(4, os.cpu_count() or 1))


@flow(name="dare-merge", task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_WORKERS))
def merge_flow(recipe: dict[str, Any], out: str, store: str | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Merge the models of ``recipe`` into an HF folder at ``out``.

    Args:
        recipe: The recipe as a mapping (see tasks.config.Recipe).
        out: Output folder or URI; refused if it exists and is not empty, unless
            ``overwrite``.
        store: Artifact store root (folder or s3:// URI) holding committed layer units
            and Prefect results; default ``$DAREFLOW_STORE`` or ~/.cache/dareflow.
        overwrite: Replace an existing output once the new merge is complete.

    Returns:
        The manifest written next to the model, plus ``out`` and per-unit ``cached``.
    """
    parsed = parse_recipe(recipe, "recipe")
    store = store or default_store()
    merging.check_output(out, overwrite=overwrite)
    staging = merging.staging_uri(out)
    merging.clear_staging(staging)
    sources = resolve_sources(recipe_to_dict(parsed))
    plan = plan_merge(recipe_to_dict(parsed), sources, staging, store)
    unit_task = merge_unit.with_options(result_storage=result_storage(store))
    results = unit_task.map(unmapped(plan), plan["units"]).result()
    manifest = assemble_model(plan, results, out)
    cached = sum(r["cached"] for r in results)
    print(f"merged {len(results) - cached} unit(s), reused {cached} committed unit(s)")
    return {**manifest, "out": out, "cached": {r["unit"]: r["cached"] for r in results}}


def default_store() -> str:
    """``$DAREFLOW_STORE``, else a folder in the user's cache."""
    return os.environ.get("DAREFLOW_STORE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dareflow"
    )


def result_storage(store: str):
    """Prefect result storage inside the artifact store, so cache records travel with
    the units they describe. Object stores get a RemoteFileSystem block (saved under a
    name derived from the URI; credentials stay in the environment, never in the block).
    """
    import hashlib
    from pathlib import Path

    from prefect.filesystems import RemoteFileSystem

    from tasks import storage

    uri = storage.join(store, "prefect-results")
    fs, path = storage.get_fs(uri)
    if storage._is_local(fs):
        return Path(path)
    block = RemoteFileSystem(basepath=uri)
    name = "dareflow-results-" + hashlib.sha256(uri.encode()).hexdigest()[:12]
    block.save(name, overwrite=True)
    return block


def run_merge(recipe_path: str, out: str | None = None, *, store: str | None = None,
              max_workers: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Validate a recipe file and run the merge flow (what `dareflow merge` calls)."""
    recipe = load_recipe(recipe_path)
    out = out or recipe.output
    if not out:
        raise ValueError(
            f"no output for '{recipe_path}': pass --out DIR or set output: in the recipe"
        )
    runner = ThreadPoolTaskRunner(max_workers=max_workers or DEFAULT_MAX_WORKERS)
    return merge_flow.with_options(task_runner=runner)(
        recipe=recipe_to_dict(recipe), out=out, store=store, overwrite=overwrite
    )

"""Merge, then evaluate the merged model next to its base and sources: wiring only.

merge flow (subflow) → evaluate flow (subflow) over {merged, base, each fine-tune} → the
comparison table as a Prefect artifact and in the store. Parameters are JSON-able, so a
deployment can schedule it as it is.
"""

from typing import Any, Literal

from prefect import flow

from dareflow.evaluation.backends import DEFAULT_TIMEOUT_S, BackendOptions, plan_here
from dareflow.evaluation.checks import check_local_output, check_options, merge_eval_models
from dareflow.flows.evaluate import eval_task_runner, evaluate_flow
from dareflow.flows.merge import merge_flow
from dareflow.flows.runtime import api_ready
from dareflow.recipe import load_recipe, recipe_to_dict


@flow(name="dare-merge-and-evaluate")
def merge_and_evaluate_flow(recipe: str, out: str, suite: str = "openllm_v1",
                            limit: int | None = None, store: str | None = None,
                            backend: Literal["hf", "vllm"] = "hf", mirror: bool = False,
                            overwrite: bool = False,
                            results: str | None = None,
                            device: Literal["cpu", "cuda", "auto"] = "auto",
                            batch_size: int | Literal["auto"] | None = None,
                            tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                            max_model_len: int | None = None,
                            gpu_memory_utilization: float | None = None,
                            max_workers: int | None = None,
                            timeout: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Merge ``recipe`` into ``out``, then compare the merged model with its sources.

    Args:
        recipe: path of the recipe YAML.
        out: local output folder of the merged model.
        suite: suite name or file (see dareflow.flows.evaluate.evaluate_flow).
        limit: documents per benchmark; None for all.
        store: artifact store for layer units, cached runs and results.
        backend: ``hf`` or ``vllm``.
        mirror: evaluate on the offline v1 mirror.
        overwrite: replace an existing ``out``.
        results: where the results go (default under the store).
        device, batch_size, tensor_parallel_size, data_parallel_size, max_model_len,
        gpu_memory_utilization, max_workers, timeout: how the evaluation runs (see
            dareflow.flows.evaluate.evaluate_flow); checked before the merge starts.

    Returns:
        ``{"merge": {"out", "shards"}, "evaluation": <evaluate_flow's result>}``.
    """
    parsed = load_recipe(recipe)
    check_local_output(out)
    check_options(suite, limit=limit, backend=backend, mirror=mirror)
    options = BackendOptions(tensor_parallel_size, data_parallel_size, max_model_len,
                             gpu_memory_utilization)
    plan = plan_here(backend, device, options, batch_size=batch_size,
                     max_workers=max_workers, timeout_s=timeout)
    manifest = merge_flow(recipe=recipe_to_dict(parsed), out=out, store=store,
                          overwrite=overwrite)
    models = merge_eval_models(manifest, out)
    evaluate = evaluate_flow.with_options(task_runner=eval_task_runner(plan["workers"]))
    evaluation = evaluate(models=models, suite=suite, limit=limit, backend=backend,
                          store=store, mirror=mirror, merged="merged", results=results,
                          device=device, batch_size=batch_size, max_workers=max_workers,
                          timeout=timeout, **options.as_dict())
    return {"merge": {"out": manifest["out"], "shards": sorted(manifest["shards"])},
            "evaluation": evaluation}


def run_merge_and_evaluate(recipe_path: str, out: str | None = None, *,
                           suite: str = "openllm_v1", limit: int | None = None,
                           store: str | None = None, backend: str = "hf", mirror: bool = False,
                           overwrite: bool = False, results: str | None = None,
                           device: str = "auto", batch_size: int | str | None = None,
                           options: BackendOptions | None = None,
                           max_workers: int | None = None,
                           timeout: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Run the merge-and-evaluate flow (what `dareflow merge-eval` calls)."""
    out = out or load_recipe(recipe_path).output
    if not out:
        raise ValueError(
            f"no output for '{recipe_path}': pass --out DIR or set output: in the recipe")
    api_ready()
    return merge_and_evaluate_flow(recipe=recipe_path, out=out, suite=suite, limit=limit,
                                   store=store, backend=backend, mirror=mirror,
                                   overwrite=overwrite, results=results, device=device,
                                   batch_size=batch_size, max_workers=max_workers,
                                   timeout=timeout,
                                   **(options or BackendOptions()).as_dict())

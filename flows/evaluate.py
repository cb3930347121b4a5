"""The evaluation flow: wiring only (see dareflow.tasks.evaluate).

check the request and plan the run (device, GPU slots) → (offline mirror in the store) →
fingerprint each model → one mapped task per (model × suite entry), each in its own process
pinned to a GPU slot, cached by content → results table in the store + Prefect table and
markdown artifacts.
"""

from typing import Any, Literal

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from dareflow.evaluation.backends import DEFAULT_TIMEOUT_S, BackendOptions, plan_here
from dareflow.evaluation.checks import check_request
from dareflow.evaluation.local import local_models
from dareflow.evaluation.suite import suite_path
from dareflow.flows.merge import result_storage
from dareflow.flows.runtime import api_ready, one_line_failures
from dareflow.settings import default_store
from dareflow.tasks.evaluate import (
    evaluate_benchmark,
    fingerprint_model,
    outcome_of,
    publish_results,
    stage_mirror,
)

#: Threads of the flow's own task runner (a deployment or a subflow): benchmarks beyond the
#: plan's slots wait for a free slot (``backends.run_slot``), so this only needs to cover the
#: GPUs of one host. ``run_evaluate`` sizes the runner to the plan instead.
EVAL_THREADS = 16


def eval_task_runner(workers: int) -> ThreadPoolTaskRunner:
    """The task runner of an evaluation with ``workers`` benchmarks at once."""
    return ThreadPoolTaskRunner(max_workers=workers)


@flow(name="dare-evaluate", task_runner=ThreadPoolTaskRunner(max_workers=EVAL_THREADS))
def evaluate_flow(models: dict[str, str], suite: str = "openllm_v1", limit: int | None = None,
                  backend: Literal["hf", "vllm"] = "hf", store: str | None = None,
                  mirror: bool = False, merged: str | None = None,
                  results: str | None = None,
                  device: Literal["cpu", "cuda", "auto"] = "auto",
                  batch_size: int | Literal["auto"] | None = None,
                  tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                  max_model_len: int | None = None,
                  gpu_memory_utilization: float | None = None,
                  max_workers: int | None = None,
                  timeout: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Evaluate each model on each benchmark of ``suite`` and compare them.

    Args:
        models: ``{label: model folder}``, local or in an object store (``s3://``, copied
            to this machine's cache first); the labels name the table rows.
        suite: suite name (``configs/suites/<name>.yaml``) or file.
        limit: documents per benchmark (per subject for MMLU); None for all.
        backend: ``hf`` (transformers, CPU or GPU) or ``vllm`` (GPU).
        store: artifact store (folder or s3:// URI) for the mirror, cached runs and results;
            default ``$DAREFLOW_STORE`` or ~/.cache/dareflow.
        mirror: read the offline v1 mirror (prepared in the store) instead of the Hub.
        merged: the label compared against the others (first row); default the first model.
        results: where the results go; default ``{store}/results/<suite>-<time>-<run>/``.
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when torch sees a GPU).
        batch_size: lm-eval batch size; None: 1 for hf on the CPU, ``auto`` on a GPU.
        tensor_parallel_size: GPUs per vLLM engine.
        data_parallel_size: vLLM engine replicas per benchmark (Ray).
        max_model_len: longest context in tokens; None: the model's.
        gpu_memory_utilization: fraction of each GPU vLLM may take; None: vLLM's default.
        max_workers: benchmarks at once; None: one per GPU slot, or half the cores (max 4)
            on the CPU.
        timeout: seconds before a benchmark's process is killed (reported, not retried);
            None or 0: no limit.

    Returns:
        URIs of the files written, the comparison rows, the markdown and the failures.
    """
    one_line_failures()
    models = local_models(models)
    parsed = check_request(models, suite, limit=limit, backend=backend, mirror=mirror,
                           merged=merged)
    options = BackendOptions(tensor_parallel_size, data_parallel_size, max_model_len,
                             gpu_memory_utilization)
    plan = plan_here(backend, device, options, batch_size=batch_size,
                     max_workers=max_workers, timeout_s=timeout)
    store = store or default_store()
    lm_tasks = [t.task for t in parsed.tasks if t.data is None]
    mirror_dir = stage_mirror(store, lm_tasks)["mirror_dir"] if mirror and lm_tasks else None
    fps = [fingerprint_model(label, uri) for label, uri in models.items()]
    pairs = [(fp, t.model_dump(mode="json")) for fp in fps for t in parsed.tasks]
    runs = evaluate_benchmark.with_options(result_storage=result_storage(store)).map(
        [m for m, _ in pairs], [e for _, e in pairs], unmapped(store), unmapped(limit),
        unmapped(backend), unmapped(mirror_dir), unmapped(plan))
    outcomes = [outcome_of(f, m, e) for f, (m, e) in zip(runs, pairs)]
    merged = merged or next(iter(models))
    return publish_results(outcomes, str(suite_path(suite)), merged,
                         [label for label in models if label != merged], results, store)


def run_evaluate(models: dict[str, str], suite: str = "openllm_v1", *, limit: int | None = None,
                 backend: str = "hf", store: str | None = None, mirror: bool = False,
                 merged: str | None = None, results: str | None = None,
                 max_workers: int | None = None, device: str = "auto",
                 batch_size: int | str | None = None,
                 options: BackendOptions | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Run the evaluation flow (what `dareflow eval` calls); checks run before any work and
    the flow's task runner runs as many benchmarks at once as the plan has slots."""
    options = options or BackendOptions()
    check_request(models, suite, limit=limit, backend=backend, mirror=mirror, merged=merged)
    plan = plan_here(backend, device, options, batch_size=batch_size,
                     max_workers=max_workers, timeout_s=timeout)
    api_ready()
    return evaluate_flow.with_options(task_runner=eval_task_runner(plan["workers"]))(
        models=models, suite=suite, limit=limit, backend=backend, store=store, mirror=mirror,
        merged=merged, results=results, device=device, batch_size=batch_size,
        max_workers=max_workers, timeout=timeout, **options.as_dict())

"""The evaluation flow: wiring only (see dareflow.tasks.evaluate).

check the request → (offline mirror in the store) → fingerprint each model → one mapped task
per (model × suite entry), each in its own process, cached by content → results table in the
store + Prefect table and markdown artifacts.
"""

import os
from typing import Any, Literal

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from dareflow.evaluation.checks import check_request
from dareflow.evaluation.suite import suite_path
from dareflow.flows.merge import result_storage
from dareflow.settings import default_store
from dareflow.tasks.evaluate import (
    evaluate_benchmark,
    fingerprint_model,
    outcome_of,
    publish_results,
    stage_mirror,
)

#: Benchmarks evaluated at once (each a process holding one model): the CPU backend's
#: torch threads share the cores, so more processes than half the cores only add memory.
DEFAULT_EVAL_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 2))


@flow(name="dare-evaluate",
      task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_EVAL_WORKERS))
def evaluate_flow(models: dict[str, str], suite: str = "openllm_v1", limit: int | None = None,
                  backend: Literal["hf", "vllm"] = "hf", store: str | None = None,
                  mirror: bool = False, merged: str | None = None,
                  results: str | None = None) -> dict[str, Any]:
    """Evaluate each model on each benchmark of ``suite`` and compare them.

    Args:
        models: ``{label: local model folder}``; the labels name the table rows.
        suite: suite name (``configs/suites/<name>.yaml``) or file.
        limit: documents per benchmark (per subject for MMLU); None for all.
        backend: ``hf`` (transformers, CPU) or ``vllm`` (GPU).
        store: artifact store (folder or s3:// URI) for the mirror, cached runs and results;
            default ``$DAREFLOW_STORE`` or ~/.cache/dareflow.
        mirror: read the offline v1 mirror (prepared in the store) instead of the Hub.
        merged: the label compared against the others (first row); default the first model.
        results: where the results go; default ``{store}/results/<suite>-<time>-<run>/``.

    Returns:
        URIs of the files written, the comparison rows, the markdown and the failures.
    """
    parsed = check_request(models, suite, limit=limit, backend=backend, mirror=mirror,
                           merged=merged)
    store = store or default_store()
    lm_tasks = [t.task for t in parsed.tasks if t.data is None]
    mirror_dir = stage_mirror(store, lm_tasks)["mirror_dir"] if mirror and lm_tasks else None
    fps = [fingerprint_model(label, uri) for label, uri in models.items()]
    pairs = [(fp, t.model_dump(mode="json")) for fp in fps for t in parsed.tasks]
    runs = evaluate_benchmark.with_options(result_storage=result_storage(store)).map(
        [m for m, _ in pairs], [e for _, e in pairs], unmapped(store), unmapped(limit),
        unmapped(backend), unmapped(mirror_dir))
    outcomes = [outcome_of(f, m, e) for f, (m, e) in zip(runs, pairs)]
    merged = merged or next(iter(models))
    return publish_results(outcomes, str(suite_path(suite)), merged,
                         [label for label in models if label != merged], results, store)


def run_evaluate(models: dict[str, str], suite: str = "openllm_v1", *, limit: int | None = None,
                 backend: str = "hf", store: str | None = None, mirror: bool = False,
                 merged: str | None = None, results: str | None = None,
                 max_workers: int | None = None) -> dict[str, Any]:
    """Run the evaluation flow (what `dareflow eval` calls); checks run before any work."""
    check_request(models, suite, limit=limit, backend=backend, mirror=mirror, merged=merged)
    runner = ThreadPoolTaskRunner(max_workers=max_workers or DEFAULT_EVAL_WORKERS)
    return evaluate_flow.with_options(task_runner=runner)(
        models=models, suite=suite, limit=limit, backend=backend, store=store, mirror=mirror,
        merged=merged, results=results)

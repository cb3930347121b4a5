"""Evaluation with lm-eval: suites as data, an offline v1 mirror, runs, tidy results tables.

No Prefect here: flows wrap these functions in tasks. Importing this package does not import
lm_eval, torch or vllm; ``run_task`` imports lm_eval when called.
"""

from dareflow.evaluation.mirror import (
    MIRROR_TASKS,
    prepare_mirror,
    read_manifest,
    verify_mirror,
    write_task_configs,
)
from dareflow.evaluation.results import (
    COLUMNS,
    OPENLLM_V1_METRICS,
    comparison_markdown,
    comparison_table,
    leaderboard_average,
    mmlu_macro_micro,
    tidy_results,
)
from dareflow.evaluation.runner import model_spec, run_task, vllm_available
from dareflow.evaluation.suite import JsonlTask, Suite, SuiteTask, load_suite

__all__ = [
    "COLUMNS",
    "MIRROR_TASKS",
    "OPENLLM_V1_METRICS",
    "JsonlTask",
    "Suite",
    "SuiteTask",
    "comparison_markdown",
    "comparison_table",
    "leaderboard_average",
    "load_suite",
    "mmlu_macro_micro",
    "model_spec",
    "prepare_mirror",
    "read_manifest",
    "run_task",
    "tidy_results",
    "verify_mirror",
    "vllm_available",
    "write_task_configs",
]

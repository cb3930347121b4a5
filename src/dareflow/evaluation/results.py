"""Results tables: lm-eval's raw JSON -> a tidy table -> averages and comparison tables.

Pure functions on dicts and DataFrames (no IO; ``dareflow.evaluation.report`` reads the runs
and writes the tables). Scores stay in [0, 1]; the markdown and artifact renderings show
percentages, with failed runs marked.

Tidy table columns: model, task, metric, value, stderr, n, shots, revision, lm_eval_version,
protocol. ``protocol`` is ``v1`` where the run is the Open LLM Leaderboard v1's protocol, else
``v1-offline: <deviations>``, ``v1-modified: <deviations>`` or ``custom``
(``dareflow.evaluation.protocol``); the comparison's markdown names every task that is not
``v1`` and flags the average as not comparable with the leaderboard's. ``metric`` is lm-eval's metric name for the ``none`` filter (``acc_norm``) and
``metric,filter`` otherwise (``exact_match,strict-match``); MMLU-style groups add
``acc_macro`` (unweighted mean over subjects, Open LLM Leaderboard v1) and ``acc_micro``
(weighted by subject size, lm-eval's group number) on the suite's task name, and keep each
subject (``mmlu_anatomy``) and lm-eval's category groups (``mmlu_stem``) as rows of their own.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from dareflow.evaluation.mirror import TASK_PREFIX
from dareflow.evaluation.protocol import run_protocol
from dareflow.evaluation.render import (
    AVERAGE,
    NOT_COMPARABLE,
    best_per_column,
    comparison_markdown,
    comparison_rows,
    protocol_notes,
)
from dareflow.evaluation.runner import SKILL_PREFIX
from dareflow.evaluation.suite import Suite

COLUMNS = ["model", "task", "metric", "value", "stderr", "n", "shots", "revision",
           "lm_eval_version", "protocol"]
# The renderings live in dareflow.evaluation.render; callers import them from here too.
__all__ = [
    "AVERAGE", "COLUMNS", "NOT_COMPARABLE", "OPENLLM_V1_METRICS", "STATUS_COLUMNS",
    "best_per_column", "comparison", "comparison_markdown", "comparison_rows",
    "comparison_table", "leaderboard_average", "mmlu_macro_micro", "protocol_notes",
    "task_protocols", "tidy_results",
]
#: Extra columns of the tidy table written by the flow (after ``COLUMNS``).
STATUS_COLUMNS = ["status", "error"]

# The Open LLM Leaderboard v1 average: these six (task, metric) pairs; it must equal
# configs/suites/openllm_v1.yaml (a test checks). GSM8K enters with strict-match, what v1 scored.
OPENLLM_V1_METRICS: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "mmlu": "acc_macro",
    "truthfulqa_mc2": "acc",
    "winogrande": "acc",
    "gsm8k": "exact_match,strict-match",
}

# Keys of an lm-eval per-task result that are not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}


def _metric_label(key: str) -> tuple[str, str] | None:
    """``"acc,none"`` -> ``("acc", "acc")``; ``"exact_match,strict-match"`` ->
    ``("exact_match,strict-match", "exact_match_stderr,strict-match")``; None for stderr keys
    and non-metric fields."""
    if key in _NOT_METRICS or "," not in key:
        return None
    metric, filt = key.split(",", 1)
    if metric.endswith("_stderr"):
        return None
    label = metric if filt == "none" else f"{metric},{filt}"
    return label, f"{metric}_stderr,{filt}"


def _number(value: Any) -> float:
    """A float from an lm-eval value (``"N/A"`` and None become NaN)."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def mmlu_macro_micro(
    values: Mapping[str, float],
    n: Mapping[str, int],
    stderr: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Macro (unweighted over subjects, as Open LLM Leaderboard v1) and micro (weighted by
    subject size, as lm-eval's ``mmlu`` group) means of per-subject scores.

    Standard errors treat subjects as independent samples:
    ``se_macro = sqrt(sum se_i^2) / k`` and ``se_micro = sqrt(sum (n_i se_i)^2) / sum n_i``.

    Args:
        values: ``{subject: score}``.
        n: ``{subject: number of documents scored}``, same keys as ``values``.
        stderr: optional ``{subject: standard error}``, same keys.

    Returns:
        ``{"macro", "micro", "macro_stderr", "micro_stderr", "n", "subjects"}`` (stderr NaN
        without ``stderr``).

    Raises:
        ValueError: no subjects, keys that differ, or a count that is not positive.
    """
    if not values:
        raise ValueError("mmlu_macro_micro needs at least one subject score, got none")
    if set(values) != set(n) or (stderr is not None and set(values) != set(stderr)):
        missing = sorted(set(values) ^ set(n) | (set(values) ^ set(stderr) if stderr else set()))
        raise ValueError(f"values, n and stderr must name the same subjects; differ on {missing}")
    bad = {s: c for s, c in n.items() if not c or c < 0}
    if bad:
        raise ValueError(f"document counts must be positive, got {bad}")
    subjects = sorted(values)
    k, total = len(subjects), sum(n[s] for s in subjects)
    macro = math.fsum(values[s] for s in subjects) / k
    micro = math.fsum(values[s] * n[s] for s in subjects) / total
    if stderr is None:
        macro_se = micro_se = math.nan
    else:
        macro_se = math.sqrt(math.fsum(stderr[s] ** 2 for s in subjects)) / k
        micro_se = math.sqrt(math.fsum((n[s] * stderr[s]) ** 2 for s in subjects)) / total
    return {"macro": macro, "micro": micro, "macro_stderr": macro_se,
            "micro_stderr": micro_se, "n": total, "subjects": k}


def _leaves(name: str, group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    children = group_subtasks.get(name) or []
    if not children:
        return [name]
    out: list[str] = []
    for child in children:
        out += _leaves(child, group_subtasks)
    return out


def _display_name(name: str, top: str | None, label: str | None) -> str:
    if label is not None and name == top:
        return label
    for prefix in (SKILL_PREFIX, TASK_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _tidy_one(model: str, raw: Mapping[str, Any]) -> list[dict]:
    if "results" not in raw:
        raise ValueError(
            f"results for model {model!r} have no 'results' key: pass the dicts that run_task "
            "(or lm_eval.simple_evaluate) returns"
        )
    meta = raw.get("dareflow") or {}
    entry = meta.get("entry") or {}
    top, label = meta.get("task_name"), entry.get("name")
    aggregate = entry.get("aggregate", "lm_eval")
    results: Mapping[str, Mapping[str, Any]] = raw["results"]
    group_subtasks = raw.get("group_subtasks") or {}
    n_samples = raw.get("n-samples") or {}
    n_shot = raw.get("n-shot") or {}
    version = raw.get("lm_eval_version") or meta.get("lm_eval_version")
    revision = meta.get("revision")

    def count(name: str) -> float:
        leaves = _leaves(name, group_subtasks)
        ns = [n_samples.get(leaf, {}).get("effective") for leaf in leaves]
        return math.nan if any(c is None for c in ns) else float(sum(ns))

    def shots(name: str) -> float:
        if "shots" in entry:
            return float(entry["shots"])
        values = {n_shot.get(leaf) for leaf in _leaves(name, group_subtasks)}
        return float(values.pop()) if len(values) == 1 and None not in values else math.nan

    if meta:
        scored = count(top) if top in results else math.nan
        protocol = run_protocol(meta, n=scored,
                                model_args=(raw.get("config") or {}).get("model_args"))
    else:  # a plain lm_eval.simple_evaluate result: nothing says how it was run
        protocol = None

    rows = []
    for name, res in results.items():
        if aggregate == "macro_micro" and name == top:
            continue  # replaced by the explicit macro and micro rows below
        for key, value in res.items():
            parsed = _metric_label(key)
            if parsed is None:
                continue
            metric, stderr_key = parsed
            rows.append({
                "model": model, "task": _display_name(name, top, label), "metric": metric,
                "value": _number(value), "stderr": _number(res.get(stderr_key)),
                "n": count(name), "shots": shots(name), "revision": revision,
                "lm_eval_version": version, "protocol": protocol,
            })
    if aggregate == "macro_micro":
        if top not in results:
            raise ValueError(f"model {model!r}: group {top!r} missing from the results")
        leaves = _leaves(top, group_subtasks)
        metric_keys = sorted({k for leaf in leaves for k in results.get(leaf, {})
                              if _metric_label(k) is not None})
        for key in metric_keys:
            metric, stderr_key = _metric_label(key)  # type: ignore[misc]
            values = {leaf: _number(results[leaf].get(key)) for leaf in leaves}
            counts = {leaf: n_samples[leaf]["effective"] for leaf in leaves}
            errs = {leaf: _number(results[leaf].get(stderr_key)) for leaf in leaves}
            agg = mmlu_macro_micro(values, counts, errs)
            for kind in ("macro", "micro"):
                rows.append({
                    "model": model, "task": label, "metric": f"{metric}_{kind}",
                    "value": agg[kind], "stderr": agg[f"{kind}_stderr"], "n": float(agg["n"]),
                    "shots": shots(top), "revision": revision, "lm_eval_version": version,
                    "protocol": protocol,
                })
    return rows


def tidy_results(
    raw_results_by_model: Mapping[str, Iterable[Mapping[str, Any]] | Mapping[str, Mapping]],
) -> pd.DataFrame:
    """One row per (model, task, metric) from lm-eval results.

    Args:
        raw_results_by_model: ``{model: [run_task result, ...]}`` or
            ``{model: {task name: run_task result}}``. Plain ``simple_evaluate`` results also
            work (task names are then lm-eval's).

    Returns:
        DataFrame with ``COLUMNS``; ``n`` is the number of documents scored (the sum over
        subtasks for groups), ``shots`` the few-shot count.

    Raises:
        ValueError: a result without ``results``, or the same (model, task, metric) twice.
    """
    rows: list[dict] = []
    for model, runs in raw_results_by_model.items():
        items = runs.values() if isinstance(runs, Mapping) and "results" not in runs else runs
        if isinstance(items, Mapping):  # a single results dict given instead of a list
            items = [items]
        for raw in items:
            rows += _tidy_one(model, raw)
    df = pd.DataFrame(rows, columns=COLUMNS)
    dupes = df[df.duplicated(["model", "task", "metric"], keep=False)]
    if not dupes.empty:
        pairs = sorted(set(zip(dupes.model, dupes.task, dupes.metric)))
        raise ValueError(f"the same (model, task, metric) appears more than once: {pairs[:5]}")
    for col in ("value", "stderr", "n", "shots"):
        df[col] = df[col].astype(float)
    return df


def _pick(df: pd.DataFrame, metrics: Mapping[str, str]) -> pd.DataFrame:
    """Wide table (models x tasks) of the chosen metric per task; absent pairs are NaN."""
    missing_cols = [c for c in ("model", "task", "metric", "value") if c not in df.columns]
    if missing_cols:
        raise ValueError(f"expected a tidy_results table, missing columns {missing_cols}")
    wanted = pd.DataFrame({"task": list(metrics), "metric": list(metrics.values())})
    sel = df.merge(wanted, on=["task", "metric"], how="inner")
    wide = sel.pivot_table(index="model", columns="task", values="value", aggfunc="first")
    models = list(dict.fromkeys(df["model"]))
    return wide.reindex(index=models, columns=list(metrics))


def leaderboard_average(
    df: pd.DataFrame, metrics: Mapping[str, str] | None = None
) -> pd.Series:
    """Mean over tasks of each task's designated metric, per model.

    Args:
        df: a ``tidy_results`` table.
        metrics: ``{task: metric}`` entering the average; default the Open LLM Leaderboard v1
            six (``OPENLLM_V1_METRICS``; MMLU as the macro mean, GSM8K strict-match).

    Returns:
        Series indexed by model, named ``average``; NaN for a model missing any of the tasks
        (an average over fewer tasks would not be comparable).
    """
    metrics = OPENLLM_V1_METRICS if metrics is None else metrics
    if not metrics:
        raise ValueError("metrics must name at least one (task, metric) pair")
    wide = _pick(df, metrics)
    return wide.mean(axis=1, skipna=False).rename(AVERAGE)


def comparison_table(
    df: pd.DataFrame,
    merged: str,
    sources: Sequence[str],
    *,
    metrics: Mapping[str, str] | None = None,
    average: bool = True,
) -> pd.DataFrame:
    """The merged model next to its sources: models as rows, tasks (+ average) as columns.

    Args:
        df: a ``tidy_results`` table.
        merged: the merged model's name (first row).
        sources: the source models' names (following rows, in this order).
        metrics: ``{task: metric}`` shown (default the v1 six); columns keep this order.
        average: add an ``average`` column (NaN where a task is missing).

    Returns:
        DataFrame indexed by model (index name ``model``), values in [0, 1].

    Raises:
        KeyError: a model absent from ``df`` (lists those present).
    """
    metrics = OPENLLM_V1_METRICS if metrics is None else metrics
    order = [merged, *[s for s in sources if s != merged]]
    present = list(dict.fromkeys(df["model"]))
    absent = [m for m in order if m not in present]
    if absent:
        raise KeyError(f"no results for model(s) {absent}; models with results: {present}")
    wide = _pick(df[df["model"].isin(order)], metrics).reindex(order)
    if average:
        wide[AVERAGE] = wide[list(metrics)].mean(axis=1, skipna=False)
    wide.index.name = "model"
    wide.columns.name = None
    return wide


def task_protocols(table: pd.DataFrame, metrics: Mapping[str, str],
                   models: Collection[str] | None = None) -> dict[str, str]:
    """``{task: protocol}`` of the (task, metric) pairs of a comparison, from the tidy table.

    Tasks whose runs carry no protocol are left out; where models were run under different
    protocols for one task, the labels are joined with `` | ``.
    """
    if "protocol" not in table.columns:
        return {}
    wanted = pd.DataFrame({"task": list(metrics), "metric": list(metrics.values())})
    rows = table.merge(wanted, on=["task", "metric"], how="inner")
    if models is not None:
        rows = rows[rows["model"].isin(list(models))]
    out = {}
    for task in metrics:
        labels = sorted({p for p in rows.loc[rows["task"] == task, "protocol"]
                         if isinstance(p, str) and p})
        if labels:
            out[task] = " | ".join(labels)
    return out


def comparison(table: pd.DataFrame, suite: Suite, merged: str,
               sources: Sequence[str]) -> tuple[pd.DataFrame, set[tuple[str, str]]]:
    """The comparison table (models x tasks [+ average]) and the failed (model, task) cells.

    The table's ``attrs["protocol"]`` holds ``{task: protocol}`` (see ``task_protocols``), which
    ``comparison_markdown`` writes under the table.
    """
    ok = table[table["status"] == "ok"]
    bad = table[table["status"] == "failed"]
    failed = set(zip(bad["model"], bad["task"]))
    models = [merged, *[s for s in sources if s != merged]]
    if ok.empty:
        wide = pd.DataFrame(index=pd.Index(models, name="model"),
                            columns=[*suite.primary_metrics()] +
                            (["average"] if suite.average else []), dtype=float)
        wide.attrs["protocol"] = {}
        return wide, failed
    present = set(ok["model"])
    # a model whose every run failed still gets its row of failures
    fill = pd.DataFrame([{"model": m, "task": "__none__", "metric": "__none__",
                          "value": float("nan")} for m in models if m not in present])
    data = pd.concat([ok, fill], ignore_index=True) if not fill.empty else ok
    wide = comparison_table(data, merged, sources, metrics=suite.primary_metrics(),
                            average=suite.average)
    wide.attrs["protocol"] = task_protocols(ok, suite.primary_metrics(), models)
    return wide, failed

"""An evaluation's results in the store: the tidy table of its committed runs (failed runs as
rows of their own) and the results folder written from it.

Layout of a results folder (default ``{store}/results/<suite>-<time>-<run>/``)::

    results.parquet, results.csv     the tidy table (``COLUMNS + STATUS_COLUMNS``; ``protocol``
                                     says per run whether it is the leaderboard's v1)
    comparison.md, comparison.csv    the comparison (models x tasks [+ average]); the markdown
                                     names the tasks that are not v1 and flags the average
    summary.json                     the flow run, the runs and their failures
    raw/<model>__<task>.json         lm-eval's raw JSON of each successful run

The tables themselves are computed by ``dareflow.evaluation.results``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from dareflow.evaluation.results import COLUMNS, STATUS_COLUMNS, tidy_results
from dareflow.evaluation.runs import lm_eval_version
from dareflow.io import storage


def results_table(outcomes: Sequence[Mapping[str, Any]], entries: Mapping[str, Mapping],
                  store: str | None = None) -> tuple[pd.DataFrame, dict[str, dict]]:
    """The tidy table of all runs, failed ones as rows with ``status == "failed"``.

    Args:
        outcomes: one per run: ``evaluate_benchmark``'s result plus ``status`` (``ok`` or
            ``failed``) and, when failed, ``error``, ``label``, ``task``, ``revision``.
        entries: ``{task name: suite entry dict}``.

    Returns:
        ``(table, raws)``: columns ``COLUMNS + STATUS_COLUMNS``; ``raws`` maps
        ``"<label>__<task>"`` to the raw lm-eval JSON of each successful run.
    """
    raws: dict[str, dict] = {}
    by_model: dict[str, list[dict]] = {}
    failed_rows = []
    version = lm_eval_version()
    for o in outcomes:
        if o["status"] == "ok":
            raw = json.loads(storage.read_bytes(o["uri"]))
            raws[f"{o['label']}__{o['task']}"] = raw
            by_model.setdefault(o["label"], []).append(raw)
        else:
            entry = entries[o["task"]]
            failed_rows.append({
                "model": o["label"], "task": o["task"], "metric": entry["metric"],
                "value": float("nan"), "stderr": float("nan"), "n": float("nan"),
                "shots": float(entry["shots"]), "revision": o.get("revision"),
                "lm_eval_version": version, "protocol": None,  # no result says how it ran
                "status": "failed", "error": o.get("error", ""),
            })
    table = tidy_results(by_model) if by_model else pd.DataFrame(columns=COLUMNS)
    table["status"], table["error"] = "ok", ""
    if failed_rows:
        table = pd.concat([table, pd.DataFrame(failed_rows)], ignore_index=True)
    for col in ("value", "stderr", "n", "shots"):
        table[col] = table[col].astype(float)
    return table[COLUMNS + STATUS_COLUMNS], raws


def default_results_uri(store: str, suite: str, run_id: str | None = None) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{suite}-{stamp}" + (f"-{run_id[:8]}" if run_id else "")
    return storage.join(store, "results", name)


def write_results(results_uri: str, table: pd.DataFrame, raws: Mapping[str, dict],
                  markdown: str, wide: pd.DataFrame, summary: Mapping[str, Any]) -> dict[str, str]:
    """Write raw JSON per run, the tidy table (parquet, CSV), the comparison (markdown, CSV)
    and ``summary.json`` under ``results_uri``; each file atomically.

    Returns:
        ``{"parquet", "csv", "markdown", "comparison_csv", "summary", "raw"}`` URIs.
    """
    uris = {name: storage.join(results_uri, file) for name, file in (
        ("parquet", "results.parquet"), ("csv", "results.csv"), ("markdown", "comparison.md"),
        ("comparison_csv", "comparison.csv"), ("summary", "summary.json"), ("raw", "raw"))}
    for name, raw in raws.items():
        storage.write_bytes_atomic(storage.join(uris["raw"], f"{name}.json"),
                                   json.dumps(raw, indent=1).encode())
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    storage.write_bytes_atomic(uris["parquet"], buf.getvalue())
    storage.write_bytes_atomic(uris["csv"], table.to_csv(index=False).encode())
    storage.write_bytes_atomic(uris["comparison_csv"], wide.to_csv().encode())
    storage.write_bytes_atomic(uris["markdown"], markdown.encode())
    storage.write_bytes_atomic(uris["summary"],
                               json.dumps(dict(summary), indent=2, default=str).encode())
    return uris

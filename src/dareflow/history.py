"""Nightly score history of a recipe: rows, the table in the store, regressions, a plot.

One row per (night, model, task, metric) in ``{store}/history/<recipe name>.parquet``
(pandas-readable), columns ``HISTORY_COLUMNS``:

    date          the night (ISO date, UTC) the flow run started
    flow_run_id   the Prefect flow run that wrote the night
    role          ``merged``, ``base`` or ``source``
    model         the evaluation's label of the model
    fingerprint   the model's content fingerprint (what the results cache keys on)
    sources       pinned source revisions, ``name@revision`` joined by ``;``
    suite         suite name
    task, metric, value, stderr, protocol   as in the evaluation's tidy table
    verdict       ``ok`` or ``regression``: the night's comparison of the merged model

A night is a regression when, on any (task, metric) the merged model had on the last ``ok``
night, tonight's score is missing or lower by more than ``2 * sqrt(se_a**2 + se_b**2)``.

Pure functions on DataFrames; ``read_history`` / ``append_history`` / ``write_plot`` are the
thin IO (fsspec, so ``s3://`` stores work; writes go to a temporary key and then replace).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from dareflow.io import storage

HISTORY_COLUMNS = ["date", "flow_run_id", "role", "model", "fingerprint", "sources", "suite",
                   "task", "metric", "value", "stderr", "protocol", "verdict"]
ROLES = ("merged", "base", "source")
OK, REGRESSION = "ok", "regression"
#: Drops beyond this many combined standard errors are regressions.
SIGMAS = 2.0


def history_uri(store: str, recipe_name: str) -> str:
    """``{store}/history/<recipe name>.parquet``."""
    if not recipe_name or "/" in recipe_name:
        raise ValueError(f"recipe name {recipe_name!r} cannot name a history file: "
                         "give the recipe a non-empty name without '/'")
    return storage.join(store, "history", f"{recipe_name}.parquet")


def plot_uri(store: str, recipe_name: str) -> str:
    """``{store}/history/<recipe name>.png``."""
    return history_uri(store, recipe_name)[: -len(".parquet")] + ".png"


def pinned_sources(revisions: Mapping[str, str | None]) -> str:
    """``{"a": "r1", "b": None}`` -> ``"a@r1;b@-"`` (sorted by name)."""
    return ";".join(f"{name}@{rev or '-'}" for name, rev in sorted(revisions.items()))


def night_rows(table: pd.DataFrame, *, date: str, flow_run_id: str, suite: str,
               roles: Mapping[str, str], fingerprints: Mapping[str, str],
               sources: str, verdict: str = OK) -> pd.DataFrame:
    """History rows of one night from an evaluation's tidy table.

    Args:
        table: the tidy table (``model, task, metric, value, stderr, protocol`` at least;
            rows with ``status == "failed"`` are left out: a missing score).
        date: the night, ``YYYY-MM-DD``.
        flow_run_id: the run writing the night.
        suite: suite name.
        roles: ``{model label: role}`` for every model of the table.
        fingerprints: ``{model label: fingerprint}``.
        sources: ``pinned_sources(...)`` of the recipe.
        verdict: ``ok`` or ``regression``.

    Raises:
        ValueError: a model without a role or fingerprint, an unknown role or verdict.
    """
    if verdict not in (OK, REGRESSION):
        raise ValueError(f"verdict {verdict!r} is not one of {OK!r}, {REGRESSION!r}")
    bad = {m: r for m, r in roles.items() if r not in ROLES}
    if bad:
        raise ValueError(f"unknown roles {bad}; use one of {list(ROLES)}")
    if "status" in table.columns:
        table = table[table["status"].fillna("ok") != "failed"]
    labels = set(table["model"])
    missing = sorted(labels - set(roles)) + sorted(labels - set(fingerprints))
    if missing:
        raise ValueError(f"models {sorted(set(missing))} have no role or fingerprint: "
                         "pass both for every model of the table")
    rows = pd.DataFrame({
        "date": date, "flow_run_id": flow_run_id,
        "role": [roles[m] for m in table["model"]],
        "model": table["model"].astype(str).to_numpy(),
        "fingerprint": [fingerprints[m] for m in table["model"]],
        "sources": sources, "suite": suite,
        "task": table["task"].astype(str).to_numpy(),
        "metric": table["metric"].astype(str).to_numpy(),
        "value": table["value"].astype(float).to_numpy(),
        "stderr": table["stderr"].astype(float).to_numpy(),
        "protocol": table["protocol"].astype(str).to_numpy(),
        "verdict": verdict,
    })
    return rows[HISTORY_COLUMNS].reset_index(drop=True)


def with_verdict(rows: pd.DataFrame, verdict: str) -> pd.DataFrame:
    """``rows`` with every ``verdict`` set."""
    return rows.assign(verdict=verdict)


def last_ok_night(history: pd.DataFrame, exclude_run: str | None = None) -> pd.DataFrame:
    """The merged model's rows of the latest ``ok`` night (not ``exclude_run``); empty when
    there is none."""
    ok = history[(history["verdict"] == OK) & (history["role"] == "merged")]
    if exclude_run is not None:
        ok = ok[ok["flow_run_id"] != exclude_run]
    if ok.empty:
        return ok
    # the row order is the append order: the last run appended is the latest night
    last_run = ok["flow_run_id"].iloc[-1]
    return ok[ok["flow_run_id"] == last_run].reset_index(drop=True)


def compare_nights(tonight: pd.DataFrame, last: pd.DataFrame,
                   sigmas: float = SIGMAS) -> list[dict[str, Any]]:
    """Compare the merged model's scores of tonight with last night's, per (task, metric).

    A row is a regression when tonight's value is missing (or NaN) or
    ``last - tonight > sigmas * sqrt(se_last**2 + se_tonight**2)`` (a NaN stderr counts 0).

    Returns:
        One dict per (task, metric) of ``last`` (sorted): ``task, metric, tonight, last,
        drop, threshold, regression, reason``; empty without a last night.
    """
    now = {(r.task, r.metric): r for r in tonight[tonight["role"] == "merged"].itertuples()}
    out = []
    for r in sorted(last.itertuples(), key=lambda r: (r.task, r.metric)):
        t = now.get((r.task, r.metric))
        value = math.nan if t is None else float(t.value)
        se_t = 0.0 if t is None or pd.isna(t.stderr) else float(t.stderr)
        se_l = 0.0 if pd.isna(r.stderr) else float(r.stderr)
        threshold = sigmas * math.sqrt(se_t**2 + se_l**2)
        if math.isnan(value):
            drop, regression, reason = math.nan, True, "missing score"
        else:
            drop = float(r.value) - value
            regression = drop > threshold
            reason = f"dropped {drop:.4f} > {threshold:.4f}" if regression else ""
        out.append({"task": r.task, "metric": r.metric, "tonight": value,
                    "last": float(r.value), "drop": drop, "threshold": threshold,
                    "regression": regression, "reason": reason})
    return out


def is_regression(comparison: list[dict[str, Any]]) -> bool:
    """Any regressed (task, metric)."""
    return any(c["regression"] for c in comparison)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.2f}"


def report_markdown(recipe_name: str, comparison: list[dict[str, Any]], *, date: str,
                    last_date: str | None, plot: str | None = None,
                    note: str | None = None) -> str:
    """The night's markdown: verdict, the regressed tasks, the table tonight vs last night
    (percent) and the plot's URI."""
    lines = [f"# {recipe_name}: night of {date}", ""]
    if last_date is None:
        lines.append("First night: nothing to compare with.")
    elif is_regression(comparison):
        bad = [f"{c['task']} ({c['metric']}: {c['reason']})" for c in comparison
               if c["regression"]]
        lines.append(f"**REGRESSION** vs {last_date}: " + ", ".join(bad))
    else:
        lines.append(f"No regression vs {last_date}.")
    if note:
        lines += ["", note]
    if comparison:
        lines += ["", f"| task | metric | tonight | {last_date} | drop | 2σ | |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for c in comparison:
            mark = "REGRESSION" if c["regression"] else ""
            lines.append(f"| {c['task']} | {c['metric']} | {_pct(c['tonight'])} | "
                         f"{_pct(c['last'])} | {_pct(c['drop'])} | {_pct(c['threshold'])} "
                         f"| {mark} |")
    if plot:
        lines += ["", f"Score history plot: `{plot}`"]
    return "\n".join(lines) + "\n"


def plot_png(history: pd.DataFrame, title: str) -> bytes:
    """A PNG of each (task, metric) of the merged model over the nights (error bars: stderr),
    regression nights marked with a red cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = history[history["role"] == "merged"]
    order = list(dict.fromkeys(merged["flow_run_id"]))
    nights = {run: i for i, run in enumerate(order)}
    labels = [f"{merged.loc[merged['flow_run_id'] == run, 'date'].iloc[0]}\n#{i + 1}"
              for i, run in enumerate(order)]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
    for (task, metric), g in merged.groupby(["task", "metric"], sort=True):
        x = [nights[r] for r in g["flow_run_id"]]
        ax.errorbar(x, 100 * g["value"], yerr=100 * g["stderr"].fillna(0), marker="o",
                    capsize=3, label=f"{task} ({metric})")
        bad = g["verdict"] == REGRESSION
        if bad.any():
            ax.plot([nights[r] for r in g.loc[bad, "flow_run_id"]], 100 * g.loc[bad, "value"],
                    "x", color="red", markersize=10, mew=2)
    ax.set_xticks(range(len(order)), labels, fontsize=7)
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def read_history(uri: str) -> pd.DataFrame:
    """The history table at ``uri``; an empty table when there is none yet."""
    if not storage.exists(uri):
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))[HISTORY_COLUMNS]


def append_history(uri: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Append ``rows`` to the table at ``uri`` (read, concatenate, write to a temporary key,
    replace); earlier nights are kept as they were. A run already in the table is replaced
    (a retried night). Returns the new table."""
    old = read_history(uri)
    runs = set(rows["flow_run_id"])
    old = old[~old["flow_run_id"].isin(runs)]
    table = rows[HISTORY_COLUMNS] if old.empty else pd.concat(
        [old, rows[HISTORY_COLUMNS]], ignore_index=True)
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    storage.write_bytes_atomic(uri, buf.getvalue())
    return table.reset_index(drop=True)


def write_plot(uri: str, history: pd.DataFrame, title: str) -> str:
    """Write ``plot_png(history, title)`` to ``uri``; returns ``uri``."""
    storage.write_bytes_atomic(uri, plot_png(history, title))
    return uri

"""Renderings of a comparison table: GitHub markdown (with the protocol notes under it) and
rows for a Prefect table artifact. Pure functions; ``dareflow.evaluation.results`` builds the
tables."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import pandas as pd

from dareflow.evaluation.protocol import V1

AVERAGE = "average"
#: Marks an average over tasks of which some do not follow the leaderboard's protocol.
NOT_COMPARABLE = "†"


def best_per_column(table: pd.DataFrame, *, higher_is_better: bool = True) -> dict[str, list]:
    """``{column: [models with the best value]}`` (ties all count; NaN never wins)."""
    out = {}
    for col in table.columns:
        values = table[col].dropna()
        if values.empty:
            out[col] = []
            continue
        best = values.max() if higher_is_better else values.min()
        out[col] = [m for m, v in values.items() if math.isclose(v, best, rel_tol=0, abs_tol=1e-12)]
    return out


def protocol_notes(columns: Sequence[str], protocols: Mapping[str, str]) -> list[str]:
    """The lines written under a comparison: which tasks are not the leaderboard's protocol.

    Args:
        columns: the comparison's columns (tasks, then ``average`` if any).
        protocols: ``{task: protocol label}``.

    Returns:
        Markdown lines; empty when nothing is known about the protocols.
    """
    tasks = [c for c in columns if c != AVERAGE and c in protocols]
    if not tasks:
        return []
    differ = [t for t in tasks if protocols[t] != V1]
    if not differ:
        return [f"Protocol: Open LLM Leaderboard v1 for every task ({', '.join(tasks)})."]
    same = [t for t in tasks if t not in differ]
    lines = ["Protocol: " + (f"Open LLM Leaderboard v1 for {', '.join(same)}; " if same else "")
             + "not the leaderboard's for:"]
    lines += [f"- {t}: {protocols[t]}" for t in differ]
    if AVERAGE in columns:
        lines.append(f"{NOT_COMPARABLE} the average is not comparable with the leaderboard's: "
                     f"{len(differ)} of {len(tasks)} tasks differ from its protocol.")
    return lines


def comparison_markdown(
    table: pd.DataFrame, failed: Collection[tuple[str, str]] = frozenset(), *,
    scale: float = 100.0, digits: int = 2, higher_is_better: bool = True,
    protocols: Mapping[str, str] | None = None,
) -> str:
    """Render a ``comparison_table`` as a GitHub markdown table, best per column in bold.

    Under the table, the protocol of the tasks (``protocol_notes``): each task that is not the
    Open LLM Leaderboard v1's protocol is named with its deviations, and the average cells are
    marked ``†`` (not comparable with the leaderboard's average).

    Args:
        table: models as rows, tasks (+ average) as columns, values in [0, 1].
        failed: ``(model, column)`` cells whose run failed, shown as ``failed`` (see
            ``comparison``).
        scale: multiply values (100 shows percentages, as the leaderboard does).
        digits: decimals shown.
        higher_is_better: which end is best.
        protocols: ``{task: protocol}``; default the table's ``attrs["protocol"]`` (set by
            ``comparison``); nothing is written under the table when neither is known.
    """
    best = best_per_column(table, higher_is_better=higher_is_better)
    cols = list(table.columns)
    protocols = (table.attrs.get("protocol") or {}) if protocols is None else protocols
    notes = protocol_notes(cols, protocols)
    flag = NOT_COMPARABLE if any(n.startswith(NOT_COMPARABLE) for n in notes) else ""
    lines = ["| model | " + " | ".join(map(str, cols)) + " |",
             "|---|" + "---:|" * len(cols)]
    for model, row in table.iterrows():
        cells = []
        for col in cols:
            value = row[col]
            if (model, col) in failed:
                cells.append("failed")
            elif pd.isna(value):
                cells.append("–")
            else:
                text = f"{value * scale:.{digits}f}"
                text = f"**{text}**" if model in best[col] else text
                cells.append(text + flag if col == AVERAGE else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def comparison_rows(wide: pd.DataFrame, failed: set[tuple[str, str]], *,
                    scale: float = 100.0, digits: int = 2) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: values in percent, the best per column suffixed
    with `` ★`` (best), ``failed`` for failed runs, ``None`` for absent ones."""
    best = best_per_column(wide)
    rows = []
    for model, row in wide.iterrows():
        out: dict[str, Any] = {"model": model}
        for col in wide.columns:
            value = row[col]
            if (model, col) in failed:
                out[col] = "failed"
            elif pd.isna(value):
                out[col] = None
            else:
                text = f"{value * scale:.{digits}f}"
                out[col] = text + " ★" if model in best[col] else text
        rows.append(out)
    return rows

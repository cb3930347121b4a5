"""What a merge shows in the Prefect UI, as plain data: its run name and tags, the keys of
its artifacts, and the rows and markdown they hold. Pure functions (no Prefect): the
tasks of ``dareflow.tasks.merge`` publish them.
"""

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from dareflow.merge.layers import classify

#: Longest artifact key stem (Prefect keys: lowercase letters, digits and dashes).
MAX_KEY_STEM = 80


def merge_name(recipe: Mapping[str, Any], out: str) -> str:
    """The name a merge goes by: the recipe's ``name``, else its output's last path
    component (``out/supermario_v2`` -> ``supermario_v2``)."""
    return recipe.get("name") or out.rstrip("/").rsplit("/", 1)[-1] or out


def run_name(recipe: Mapping[str, Any], out: str) -> str:
    """The flow run's name: ``<merge name> (<method>)``, e.g. ``supermario_v2 (dare_ties)``."""
    return f"{merge_name(recipe, out)} ({recipe['merge_method']})"


def run_tags(recipe: Mapping[str, Any], out: str, base_id: str | None) -> list[str]:
    """Tags of a merge run: ``method:<method>``, ``recipe:<name>`` and, with a base,
    ``base:<model id>`` (the id without its location, ``dareflow.recipe.mask_id``)."""
    tags = [f"method:{recipe['merge_method']}", f"recipe:{merge_name(recipe, out)}"]
    return tags + ([f"base:{base_id}"] if base_id else [])


def artifact_key(name: str, kind: str) -> str:
    """A stable Prefect artifact key for one kind of artifact of the merge ``name``:
    ``dareflow-merge-<slug>-<kind>``, lowercase letters, digits and dashes only, so the
    UI shows the same recipe's artifacts as one history."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:MAX_KEY_STEM].strip("-")
    return f"dareflow-merge-{slug or 'unnamed'}-{kind}"


def unit_label(unit: str, tensors: Iterable[str]) -> str:
    """What a unit holds, for its task run name: the layer or embeddings unit's own name,
    and for the final unit its modules, e.g. ``norm+lm_head`` (``model.norm.weight``,
    ``lm_head.weight``); output heads last, at most three modules named."""
    names = list(tensors)
    if not names or classify(names[0])[0] != "final":
        return unit
    modules: list[str] = []
    for name in names:
        parts = [p for p in name.split(".") if p not in ("weight", "bias")]
        module = parts[-1] if parts else name
        if module not in modules:
            modules.append(module)
    modules.sort(key=lambda m: "head" in m)  # stable: the head after the norm
    shown = "+".join(modules[:3])
    return shown + (f"+{len(modules) - 3}-more" if len(modules) > 3 else "")


def units_rows(results: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per unit record of ``merge_unit``: unit, tensors, MB, seconds
    (None for a reused unit: nothing was merged), merged or reused, sha256, where it ran."""
    return [{
        "unit": r["unit"],
        "tensors": len(r["tensors"]),
        "MB": round(r["nbytes"] / 1e6, 3),
        "seconds": None if r["cached"] else round(r.get("seconds", 0.0), 3),
        "status": "reused" if r["cached"] else "merged",
        "sha256": r["sha256"],
        "ran_on": r.get("ran_on"),
    } for r in results]


def gate_rows(verdicts: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per fine-tuned model the gate measured (``GateVerdict`` as a dict):
    model, |delta| p99, relative norm, verdict (``pass`` or ``fail``: a failing model
    stops the merge in the gate's mode ``refuse``, only warns in ``warn``)."""
    return [{
        "model": v["model"],
        "abs_delta_p99": round(v["abs_p99"], 6),
        "relative_norm": round(v["relative_norm"], 6),
        "verdict": "pass" if v["passed"] else "fail",
    } for v in verdicts]


def card_markdown(card: str) -> str:
    """The model card as artifact markdown: its Hub front matter (``---`` block) left out."""
    if card.startswith("---"):
        parts = card.split("---", 2)
        if len(parts) == 3:
            return parts[2].lstrip("\n")
    return card


def link_of(out: str) -> str:
    """A clickable link to the merged model: URIs as they are, local paths as file://."""
    return out if "://" in out else "file://" + os.path.abspath(out)

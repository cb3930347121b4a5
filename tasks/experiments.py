"""Prefect tasks of the experiment flows (delta gate, drop-rate sweeps, grids,
representation similarity): thin wrappers over ``dareflow.delta_stats``, ``dareflow.experiments.sweeps``
and ``dareflow.experiments.representation``. They pass URIs and small records, never tensors.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE

from dareflow import delta_stats
from dareflow.experiments import representation, sweeps
from dareflow.io import storage
from dareflow.io.checkpoints import Checkpoint
from dareflow.merge import report as merge_report
from dareflow.recipe import GateConfig, parse_recipe

#: Bump when the gate's statistics or verdict logic change.
GATE_CODE_VERSION = "1"


def gate_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """The gate's verdict depends only on its config, the method and the input tensors:
    key it by those (tensor fingerprints come from headers, no data is read), so a
    rerun on unchanged inputs skips the sampling."""
    recipe = parse_recipe(parameters["recipe"], "<recipe>")
    sources = parameters["sources"]
    uris = {"base": sources["base_uri"], **sources["model_uris"]}
    checkpoints = {role: Checkpoint.open(uri) for role, uri in sorted(uris.items()) if uri}
    payload = {
        "code": GATE_CODE_VERSION,
        "method": recipe.merge_method,
        "gate": recipe.gate.model_dump(mode="json") if recipe.gate else None,
        "inputs": {role: [(n, ckpt.fingerprint(n)) for n in sorted(ckpt.tensors)]
                   for role, ckpt in checkpoints.items()},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"dareflow-gate-{digest}"


@task(name="check-deltas", cache_key_fn=gate_cache_key, persist_result=True,
      task_run_name="check-deltas")
def check_deltas(recipe: dict[str, Any], sources: dict[str, Any],
                 gate_key: str | None = None) -> list[dict[str, Any]]:
    """The DARE applicability gate: estimate each fine-tune's delta statistics against
    the base; raise (mode refuse) or log a warning (mode warn) when they are too large.
    With ``gate_key``, a refusal first publishes the gate's table under that key (a
    passing gate's table is the merge report's: this task may come from the cache)."""
    parsed = parse_recipe(recipe, "<recipe>")
    verdicts = delta_stats.measure_gate(parsed, sources["base_uri"], sources["model_uris"])
    try:
        delta_stats.enforce_gate(parsed, verdicts)
    except ValueError:
        if gate_key:
            publish_gate_table([asdict(v) for v in verdicts], gate_key, refused=True)
        raise
    logger = get_run_logger()
    for v in verdicts:
        if v.passed:
            logger.info("gate: %s passes (|delta| p99 %.4g, rel norm %.4g)", v.model,
                        v.abs_p99, v.relative_norm)
        else:
            logger.warning("gate (mode warn): %s", v.message)
    return [asdict(v) for v in verdicts]


def publish_gate_table(verdicts: list[dict[str, Any]], key: str, *, refused: bool) -> None:
    """The gate's verdicts as a Prefect table artifact (model, |delta| p99, relative norm,
    verdict)."""
    create_table_artifact(
        table=merge_report.gate_rows(verdicts), key=key,
        description=("DARE applicability gate: refused the merge" if refused
                     else "DARE applicability gate"))


@task(name="resolve-models", cache_policy=NONE)
def resolve_models(demo_family: dict[str, Any] | None, names: list[str]) -> dict[str, str]:
    """Config model names → checkpoint URIs (building the demo family once if asked)."""
    spec = sweeps.DemoFamilySpec(**demo_family) if demo_family else None
    return sweeps.resolve_models(spec, names, progress=get_run_logger().info)


@task(name="inspect-deltas", cache_policy=NONE, task_run_name="inspect-deltas")
def inspect_deltas(base_uri: str, finetuned_uri: str, out_stem: str,
                   sample: int = delta_stats.DEFAULT_OVERALL_SAMPLE,
                   artifact_key: str | None = None,
                   max_rows: int | None = 40) -> dict[str, Any]:
    """Delta statistics of one pair (exact per tensor), written as CSV + parquet + PNG,
    with the gate's verdict at its default thresholds. With ``artifact_key``, also
    published as Prefect artifacts: the table (``<key>``, every tensor and ``(all)``) and
    the plot (``<key>-plot``, an image embedded as a data URI).

    Returns:
        ``{"paths", "overall", "gate", "table"}``: ``table`` is the text table (the
        ``max_rows`` worst tensors and ``(all)``; None: every tensor).
    """
    stats = delta_stats.delta_stats(base_uri, finetuned_uri, overall_sample=sample)
    gate = GateConfig()
    verdict = delta_stats.gate_verdict(finetuned_uri, base_uri, stats,
                                       max_abs_delta_p99=gate.max_abs_delta_p99,
                                       max_relative_norm=gate.max_relative_norm)
    frame = stats.to_frame()
    paths = sweeps.write_table(frame, out_stem)
    paths["plot"] = delta_stats.plot_delta_stats(stats, out_stem + ".png")
    text = delta_stats.format_table(stats, max_rows=max_rows)
    get_run_logger().info("delta statistics:\n%s", delta_stats.format_table(stats, max_rows=8))
    if artifact_key:
        title = f"{finetuned_uri} vs {base_uri}"
        create_table_artifact(table=frame.round(6).to_dict(orient="records"), key=artifact_key,
                              description=f"delta statistics: {title}")
        png = base64.b64encode(storage.read_bytes(paths["plot"])).decode()
        create_image_artifact(image_url=f"data:image/png;base64,{png}",
                              key=artifact_key + "-plot",
                              description=f"delta statistics plot: {title}")
    return {"paths": paths, "overall": stats.overall.row(), "gate": asdict(verdict),
            "table": text}


@task(name="merge-point", cache_policy=NONE, task_run_name="merge-{recipe[merge_method]}")
def merge_point(recipe: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """Merge one experiment point (content-addressed units and model folder)."""
    return sweeps.merge_point(recipe, store_uri)


@task(name="evaluate-point", cache_policy=NONE)
def evaluate_point(merged: dict[str, Any], evaluation: dict[str, Any], store_uri: str,
                   splits: list[str]) -> dict[str, Any]:
    """Score a merged model on the skill splits (cached by content key in the store)."""
    return sweeps.evaluate_point(merged, sweeps.SkillsEval(**evaluation), store_uri, splits)


@task(name="layer-similarity", cache_policy=NONE)
def layer_similarity(reference_uri: str, variants: dict[str, str],
                     prompts: list[str]) -> list[dict[str, Any]]:
    """Per-layer hidden-state cosine similarity of each variant to the reference."""
    return representation.similarity_rows(reference_uri, variants, prompts)


@task(name="report", cache_policy=NONE)
def report(rows: list[dict[str, Any]], out_stem: str, kind: str, title: str) -> dict[str, str]:
    """Write a results table (CSV + parquet) and its PNG plot to the store, and publish
    them as Prefect artifacts (a table, and markdown naming the files)."""
    import pandas as pd  # heavy: pandas (~0.2 s), only when reporting

    table = pd.DataFrame(rows)
    paths = sweeps.write_table(table, out_stem)
    plot = {"sweep": sweeps.plot_sweep, "similarity": representation.plot_similarity,
            "grid": sweeps.plot_grid}[kind]
    paths["plot"] = plot(table, out_stem + ".png", title=title)
    key = "".join(c if c.isalnum() else "-" for c in f"dareflow-{kind}-{title}".lower())[:100]
    create_table_artifact(table=table.round(4).to_dict(orient="records"), key=key,
                          description=f"{kind}: {title}")
    create_markdown_artifact(
        key=key + "-files", description=f"{kind} files: {title}",
        markdown=f"## {kind}: {title}\n\n" + "\n".join(
            f"- {name}: [{uri}]({uri if '://' in uri else 'file://' + uri})"
            for name, uri in paths.items()),
    )
    return paths

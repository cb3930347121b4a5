"""The paper's experiments as flows: wiring only (tasks in tasks/experiments.py).

* ``sweep_flow``: drop rate p × {DARE, DropOnly, magnitude pruning} for one fine-tune
  against its base → score table + plot (the paper's Figures 3, 8, 9), plus the pair's
  delta statistics.
* ``grid_flow``: a merge hyperparameter grid (λ, p per model, TIES trim) selected on the
  VALIDATION split and reported on the TEST split.
* ``similarity_flow``: layer-by-layer hidden-state similarity of a fine-tune and its
  DARE / DropOnly versions (Figures 6, 7).
* ``inspect_flow``: delta statistics of one fine-tune against its base (Table 6), what
  ``dareflow inspect`` runs.

Every point is a merge through the content-addressed unit cache and every evaluation is
cached by content key (``src/dareflow/experiments/sweeps.py``), so a rerun or an overlapping sweep computes
nothing twice. Results: ``{store}/experiments/{kind}/{name}.{csv,parquet,png}``.
"""

from typing import Any

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from dareflow.delta_stats import DEFAULT_OVERALL_SAMPLE
from dareflow.experiments import sweeps
from dareflow.experiments.representation import calibration_prompts
from dareflow.flows.runtime import api_ready, one_line_failures
from dareflow.io import storage
from dareflow.recipe import mask_id
from dareflow.settings import default_store
from dareflow.tasks.experiments import (
    evaluate_point,
    inspect_deltas,
    layer_similarity,
    merge_point,
    report,
    resolve_models,
)


def _out(store: str, kind: str, name: str) -> str:
    return storage.join(store, "experiments", kind, name)


@flow(name="dare-sweep", task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep_flow(config: dict[str, Any], store: str | None = None) -> dict[str, Any]:
    """Drop-rate sweep of one fine-tune (see ``dareflow.experiments.sweeps.SweepConfig``).

    Returns:
        ``{"rows": [...], "paths": {...}, "delta_stats": {...}}``.
    """
    one_line_failures()
    cfg = sweeps.SweepConfig.model_validate(config)
    store = store or default_store()
    uris = resolve_models(cfg.demo_family.model_dump() if cfg.demo_family else None,
                          [cfg.base, cfg.finetuned])
    base, finetuned = uris[cfg.base], uris[cfg.finetuned]
    stats = inspect_deltas.submit(base, finetuned, _out(store, "sweeps", cfg.name + "-deltas"))
    points = [{"method": m, "drop_rate": p} for m in cfg.methods for p in cfg.drop_rates]
    recipes = [sweeps.sweep_recipe(pt["method"], pt["drop_rate"], base, finetuned, cfg.seed)
               for pt in points]
    merged = merge_point.map(recipes, unmapped(store)).result()
    evaluated = evaluate_point.map(merged, unmapped(cfg.evaluation.model_dump()),
                                   unmapped(store), unmapped(["test"])).result()
    table = sweeps.sweep_table(points, merged, evaluated)
    paths = report(table.to_dict(orient="records"), _out(store, "sweeps", cfg.name), "sweep",
                   f"{cfg.name}: {cfg.finetuned} vs {cfg.base}")
    return {"rows": table.to_dict(orient="records"), "paths": paths,
            "delta_stats": stats.result()}


@flow(name="dare-grid", task_runner=ThreadPoolTaskRunner(max_workers=2))
def grid_flow(config: dict[str, Any], store: str | None = None) -> dict[str, Any]:
    """Merge grid selected on validation, reported on test (``dareflow.experiments.sweeps.GridConfig``).

    Returns:
        ``{"rows": [...], "selected": {...}, "paths": {...}}``.
    """
    one_line_failures()
    cfg = sweeps.GridConfig.model_validate(config)
    store = store or default_store()
    uris = resolve_models(cfg.demo_family.model_dump() if cfg.demo_family else None,
                          [cfg.base, *cfg.models])
    recipes = sweeps.grid_recipes(cfg, uris[cfg.base], {m: uris[m] for m in cfg.models})
    merged = merge_point.map(recipes, unmapped(store)).result()
    evaluated = evaluate_point.map(merged, unmapped(cfg.evaluation.model_dump()),
                                   unmapped(store), unmapped(["validation", "test"])).result()
    rows = sweeps.grid_rows(recipes, merged, evaluated)
    paths = report(rows, _out(store, "grids", cfg.name), "grid", f"{cfg.name}: {cfg.merge_method}")
    return {"rows": rows, "selected": next(r for r in rows if r["selected"]), "paths": paths}


@flow(name="dare-similarity", task_runner=ThreadPoolTaskRunner(max_workers=2))
def similarity_flow(config: dict[str, Any], store: str | None = None) -> dict[str, Any]:
    """Hidden-state similarity of a fine-tune and its DARE / DropOnly versions
    (``dareflow.experiments.sweeps.SimilarityConfig``).

    Returns:
        ``{"rows": [...], "paths": {...}}``.
    """
    one_line_failures()
    cfg = sweeps.SimilarityConfig.model_validate(config)
    store = store or default_store()
    uris = resolve_models(cfg.demo_family.model_dump() if cfg.demo_family else None,
                          [cfg.base, cfg.finetuned])
    labels = [f"{m} p={p:g}" for m in cfg.methods for p in cfg.drop_rates]
    recipes = [sweeps.sweep_recipe(m, p, uris[cfg.base], uris[cfg.finetuned], cfg.seed)
               for m in cfg.methods for p in cfg.drop_rates]
    merged = merge_point.map(recipes, unmapped(store)).result()
    rows = layer_similarity(uris[cfg.finetuned], {lab: m["uri"] for lab, m in zip(labels, merged)},
                            calibration_prompts(cfg.calibration_skills, cfg.calibration_n))
    paths = report(rows, _out(store, "similarity", cfg.name), "similarity",
                   f"{cfg.name}: {cfg.finetuned} vs its DARE / DropOnly versions")
    return {"rows": rows, "paths": paths}


def inspect_run_name() -> str:
    """``inspect <fine-tune> vs <base>`` (model ids without their locations)."""
    from prefect.runtime import flow_run  # the parameters of the run being named

    params = flow_run.parameters
    return f"inspect {mask_id(params['finetuned'])} vs {mask_id(params['base'])}"


@flow(name="dare-inspect", flow_run_name=inspect_run_name)
def inspect_flow(base: str, finetuned: str, store: str | None = None,
                 sample: int = DEFAULT_OVERALL_SAMPLE,
                 max_rows: int | None = 40) -> dict[str, Any]:
    """Delta statistics of a fine-tune against its base (the paper's Table 6): CSV,
    parquet and PNG in ``{store}/experiments/inspect/<fine-tune>-vs-<base>``, and as
    Prefect artifacts, a table and the plot, keyed by the pair
    (``dareflow-inspect-<fine-tune>-vs-<base>``).

    Args:
        base: Base model folder or URI.
        finetuned: Fine-tuned model folder or URI.
        store: Artifact store (default ``$DAREFLOW_STORE`` or ~/.cache/dareflow).
        sample: Pooled sample size of the overall percentiles (exact below it).
        max_rows: Tensors in the returned text table (the worst; None: all).

    Returns:
        ``{"paths", "overall", "gate", "table", "artifact_key"}``.
    """
    one_line_failures()
    store = store or default_store()
    pair = f"{mask_id(finetuned)}-vs-{mask_id(base)}"
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in pair)  # a file name
    key = "dareflow-inspect-" + "-".join(
        "".join(c if c.isalnum() else " " for c in pair.lower()).split())[:80]
    result = inspect_deltas(base, finetuned, _out(store, "inspect", name), sample=sample,
                            artifact_key=key, max_rows=max_rows)
    return {**result, "artifact_key": key}


def run_experiment(kind: str, config_path: str, *, store: str | None = None) -> dict[str, Any]:
    """Validate an experiment config file and run its flow (what the CLI calls)."""
    model, flow_fn = {
        "sweep": (sweeps.SweepConfig, sweep_flow),
        "grid": (sweeps.GridConfig, grid_flow),
        "similarity": (sweeps.SimilarityConfig, similarity_flow),
    }[kind]
    cfg = sweeps.load_config(config_path, model)
    runner = ThreadPoolTaskRunner(max_workers=getattr(cfg, "max_workers", 2))
    api_ready()
    return flow_fn.with_options(task_runner=runner)(config=cfg.model_dump(by_alias=True),
                                                    store=store)

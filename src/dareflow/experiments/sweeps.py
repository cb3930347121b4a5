"""The paper's experiments as plain functions: drop-rate sweeps, merge grids, skill
splits, the "wrong base" model, and their configs. No Prefect (``tasks/experiments.py``
wraps these; ``flows/experiments.py`` wires them).

Caching, so that nothing is computed twice across sweeps:

* layers: every point is merged through ``dareflow.merge`` (plan → units → output), so
  its layer units are the content-addressed units of ``{store}/units/``;
* models: a merged model is published at ``{store}/experiments/models/{model_key}``
  where ``model_key`` hashes its unit keys: the same merge from two sweeps is one folder;
* evaluations: ``{store}/experiments/evals/{eval_key}.json`` where ``eval_key`` hashes the
  model key, the evaluation spec and ``EVAL_CODE_VERSION``.

Splits: the demo skills have one fixed 200-item evaluation set (``dareflow.demo.skills``). Its
first half is the TEST split (the prefix ``evaluate_skills`` reports on) and its second
half the VALIDATION split; the grid selects on validation and reports test.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dareflow.delta_stats import save_figure
from dareflow.demo import family, train, vocab
from dareflow.demo.family import build_demo_family
from dareflow.demo.skills import SKILLS, SPLIT_SIZE, generate_answers, get_skill, split_items
from dareflow.errors import ProblemsError
from dareflow.experiments.representation import load
from dareflow.io import storage
from dareflow.merge.output import assemble_model
from dareflow.merge.plan import plan_merge
from dareflow.merge.publish import publish, reserve
from dareflow.merge.units import merge_unit, release_unit
from dareflow.recipe import parse_recipe
from dareflow.schema import StrictModel, read_yaml, validation_problems

#: Bump when scoring changes; part of every evaluation cache key.
EVAL_CODE_VERSION = "1"

#: The sweep's methods: (merge method, rescale). The paper's Figures 3/8/9 compare DARE,
#: DropOnly (DARE without the 1/(1-p) rescale) and magnitude pruning of the delta.
SWEEP_METHODS: dict[str, tuple[str, str]] = {
    "dare": ("dare_linear", "inverse"),
    "drop_only": ("dare_linear", "none"),
    "magnitude": ("magnitude_linear", "none"),
}
PAPER_DROP_RATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)


# ----------------------------------------------------------------------------- configs


class DemoFamilySpec(StrictModel):
    """Build (or reuse) the offline demo family and name models by member name
    (``base``, ``arithmetic``, ``reverse``, and ``wrong-base`` when ``wrong_base``)."""

    dir: str = "dareflow-demo/family"
    size: Literal["demo", "tiny"] = "demo"
    seed: int = 0
    wrong_base: bool = False


class SkillsEval(StrictModel):
    """Exact-match accuracy on the demo skills (``dareflow.demo.skills``), on one split."""

    skills: list[str] = Field(min_length=1)
    n: int = Field(default=SPLIT_SIZE, ge=1, le=SPLIT_SIZE)

    @field_validator("skills")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if s not in SKILLS]
        if bad:
            raise ValueError(f"unknown skill(s) {bad}; known: {sorted(SKILLS)}")
        return value


class SweepConfig(StrictModel):
    """A drop-rate sweep of one fine-tuned model against its base (Figures 3, 8, 9)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    demo_family: DemoFamilySpec | None = None
    base: str = "base"
    finetuned: str
    drop_rates: list[float] = Field(default=list(PAPER_DROP_RATES), min_length=1)
    methods: list[Literal["dare", "drop_only", "magnitude"]] = Field(
        default=["dare", "drop_only", "magnitude"], min_length=1)
    evaluation: SkillsEval
    seed: int = Field(default=0, ge=0)
    max_workers: int = Field(default=2, ge=1)

    @field_validator("drop_rates")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        bad = [p for p in value if not 0 <= p < 1]
        if bad:
            raise ValueError(f"drop rates must be in [0, 1) (p = 1 drops every delta), got {bad}")
        return sorted(set(value))


class GridAxes(StrictModel):
    """The grid: every combination is merged. ``drop_rate`` is per model id (or one list
    for all models under ``"*"``); ``trim`` is the TIES trim ratio (``ties``: its drop
    rate; ``dare_ties``: ``trim_after_dare``)."""

    scale: list[float] = Field(default=[1.0], min_length=1, alias="lambda")
    drop_rate: dict[str, list[float]] = Field(default_factory=dict)
    trim: list[float] = Field(default_factory=list)


class GridConfig(StrictModel):
    """A merge hyperparameter grid, selected on VALIDATION, reported on TEST."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    demo_family: DemoFamilySpec | None = None
    base: str = "base"
    models: list[str] = Field(min_length=1)
    merge_method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties"]
    grid: GridAxes
    evaluation: SkillsEval
    seed: int = Field(default=0, ge=0)
    max_workers: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _axes_fit_method(self) -> GridConfig:
        problems = []
        dare = self.merge_method.startswith("dare")
        if dare and not self.grid.drop_rate:
            problems.append(f"grid.drop_rate: {self.merge_method} needs drop rates, e.g. "
                            "{'*': [0.5, 0.9]}")
        if not dare and self.grid.drop_rate:
            problems.append(f"grid.drop_rate: {self.merge_method} does not drop at random; "
                            "remove it (TIES uses grid.trim)")
        if self.grid.trim and self.merge_method not in ("ties", "dare_ties"):
            problems.append(f"grid.trim: only ties and dare_ties trim, not {self.merge_method}")
        if self.merge_method == "ties" and not self.grid.trim:
            problems.append("grid.trim: ties needs trim ratios, e.g. [0.7, 0.8, 0.9]")
        unknown = set(self.grid.drop_rate) - set(self.models) - {"*"}
        if unknown:
            problems.append(f"grid.drop_rate: {sorted(unknown)} are not in models {self.models}")
        for values in [*self.grid.drop_rate.values(), self.grid.trim]:
            if any(not 0 <= v < 1 for v in values):
                problems.append(f"grid: rates must be in [0, 1), got {values}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SimilarityConfig(StrictModel):
    """Layer-by-layer hidden-state similarity of a fine-tune and its DARE / DropOnly
    versions (the paper's Figures 6 and 7)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    demo_family: DemoFamilySpec | None = None
    base: str = "base"
    finetuned: str
    drop_rates: list[float] = Field(default=[0.5, 0.9], min_length=1)
    methods: list[Literal["dare", "drop_only"]] = Field(default=["dare", "drop_only"])
    calibration_skills: list[str] = Field(min_length=1)
    calibration_n: int = Field(default=64, ge=1, le=SPLIT_SIZE)
    seed: int = Field(default=0, ge=0)


def load_config(path: str | Path, model: type[BaseModel]) -> Any:
    """Read and validate a YAML experiment config.

    Raises:
        FileNotFoundError: no such file.
        ProblemsError: invalid YAML or config, every problem listed.
    """
    data = read_yaml(path, "config")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ProblemsError(str(path), validation_problems(e)) from None


# ------------------------------------------------------------------------ models


def resolve_models(demo: DemoFamilySpec | None, names: Sequence[str],
                   progress: Any = None) -> dict[str, str]:
    """Map config model names to checkpoint URIs: demo-family member names when a
    ``demo_family`` is given (building it once), else the names are URIs/folders."""
    if demo is None:
        return {n: n for n in names}
    members = {k: str(v) for k, v in build_demo_family(
        demo.dir, seed=demo.seed, size=demo.size, progress=progress).items()}
    if demo.wrong_base:
        members["wrong-base"] = str(make_wrong_base(members["base"], Path(demo.dir) / "wrong-base",
                                                    size=demo.size, seed=demo.seed))
    unknown = [n for n in names if n not in members]
    if unknown:
        raise KeyError(f"{unknown} are not members of the demo family in {demo.dir}; "
                       f"members: {sorted(members)} (wrong-base needs wrong_base: true)")
    return {n: members[n] for n in names}


#: Continued pre-training that makes the demo "wrong base": raw-form text only, a large
#: learning rate, a few hundred steps. Bump the version when this changes.
WRONG_BASE_VERSION = 1
WRONG_BASE_STEPS = 300
WRONG_BASE_LR = 3e-3


def make_wrong_base(base_dir: str | Path, out_dir: str | Path, *, size: str = "demo",
                    seed: int = 0, steps: int = WRONG_BASE_STEPS, lr: float = WRONG_BASE_LR) -> Path:
    """Continue pre-training the demo base (raw skill text only, lr ``lr``, ``steps``
    steps) into ``out_dir``: the analogue of CodeLlama-Python to Llama-2. A demo
    fine-tune measured against it has continued-pre-training-sized deltas. Reused when
    ``out_dir/wrong-base.json`` matches."""
    # heavy: transformers (~1 s), only when the wrong base is built
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    stamp = {"version": WRONG_BASE_VERSION, "steps": steps, "lr": lr, "seed": seed,
             "base_sha256": storage.sha256_of(str(Path(base_dir) / "model.safetensors"))}
    marker = out / "wrong-base.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # byte-identical for a thread count, as the family build
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        train.continue_pretraining(model, steps=steps, lr=lr, seed=f"{seed}/wrong-base",
                                   size=size, qa_fraction=0.0)
        family.save_model(model, vocab.make_tokenizer(), out)
    finally:
        torch.set_num_threads(old)
    marker.write_text(json.dumps(stamp))
    return out


# ------------------------------------------------------------------------ merging


def sweep_recipe(method: str, drop_rate: float, base_uri: str, finetuned_uri: str,
                 seed: int) -> dict[str, Any]:
    """The recipe of one sweep point (``method`` a key of ``SWEEP_METHODS``). At p = 0
    every method is the identity, so every method gets the same recipe there."""
    if drop_rate == 0:  # every method is the identity at p = 0: one model, one evaluation
        method = "dare"
    merge_method, rescale = SWEEP_METHODS[method]
    return {
        "merge_method": merge_method,
        "base_model": base_uri,
        "models": [{"model": finetuned_uri, "parameters": {"weight": 1.0}}],
        "parameters": {"drop_rate": drop_rate, "rescale": rescale},
        "seed": seed,
        "gate": {"mode": "off"},  # the sweep reports the statistics itself
    }


def grid_recipes(cfg: GridConfig, base_uri: str, model_uris: dict[str, str]) -> list[dict[str, Any]]:
    """One recipe per grid point, with its coordinates under ``"point"``.

    The grid searches the paper's variants, written out (recipe defaults are mergekit's):
    DARE rescales by 1/(1 - p); TIES elects the sign by the plain sum and averages the
    agreeing deltas (disjoint mean).
    """
    paper: dict[str, Any] = {}
    if cfg.merge_method.startswith("dare"):
        paper["rescale"] = "inverse"
    if cfg.merge_method in ("ties", "dare_ties"):
        paper.update(sign_election="sum", disjoint_merge="mean")
    rates = {m: cfg.grid.drop_rate.get(m, cfg.grid.drop_rate.get("*", [None]))
             for m in cfg.models}
    trims = cfg.grid.trim or [None]
    points = []
    for scale, trim, *per_model in itertools.product(cfg.grid.scale, trims,
                                                     *(rates[m] for m in cfg.models)):
        params: dict[str, Any] = {"lambda": scale, **paper}
        models = []
        for m, p in zip(cfg.models, per_model):
            mp: dict[str, Any] = {"weight": 1.0}
            if cfg.merge_method == "ties":
                mp["drop_rate"] = trim
            elif p is not None:
                mp["drop_rate"] = p
            models.append({"model": model_uris[m], "parameters": mp})
        if cfg.merge_method == "dare_ties" and trim is not None:
            params["trim_after_dare"] = trim
        point = {"lambda": scale, **({"trim": trim} if trim is not None else {}),
                 **{f"p[{m}]": p for m, p in zip(cfg.models, per_model) if p is not None}}
        points.append({"merge_method": cfg.merge_method, "base_model": base_uri,
                       "models": models, "parameters": params, "seed": cfg.seed,
                       "gate": {"mode": "off"}, "point": point})
    return points


def merge_point(recipe: dict[str, Any], store_uri: str) -> dict[str, Any]:
    """Merge one experiment point through ``dareflow.merge`` (content-addressed units),
    published at ``{store}/experiments/models/{model_key}`` unless already there.

    Args:
        recipe: A recipe mapping whose model ids are checkpoint URIs (extra key
            ``point`` ignored).
        store_uri: The artifact store.

    Returns:
        ``{"model_key", "uri", "units_cached", "units", "reused"}``.
    """
    parsed = parse_recipe({k: v for k, v in recipe.items() if k != "point"}, "<point>")
    model_uris = {m.model: m.model for m in parsed.models if m.model != parsed.base_model}
    models_root = storage.join(store_uri, "experiments", "models")
    plan = plan_merge(parsed, base_uri=parsed.base_model, model_uris=model_uris,
                      work_uri="", store_uri=store_uri)
    key = hashlib.sha256("".join(u.key for u in plan.units).encode()).hexdigest()[:32]
    out = storage.join(models_root, key)
    reused = {"model_key": key, "uri": out, "units": len(plan.units),
              "units_cached": len(plan.units), "reused": True}
    if storage.exists(storage.join(out, "manifest.json")):
        return reused
    # another sweep merging the same point publishes the same bytes: wait for it
    with reserve(out, wait_s=3600) as target:
        if storage.exists(storage.join(out, "manifest.json")):
            return reused
        plan.work_uri = target.staging_uri
        results = []
        for job in plan.units:
            try:
                results.append(merge_unit(plan, job))
            finally:  # as the merge flow's task: a failed unit must not keep its lease
                release_unit(plan, job)
        assemble_model(plan, results, plan.work_uri)
        publish(plan.work_uri, out, overwrite=True)  # a folder without manifest: unfinished
    return {"model_key": key, "uri": out, "units": len(results),
            "units_cached": sum(r["cached"] for r in results), "reused": False}


# ------------------------------------------------------------------------ evaluation


def score_skills(model_uri: str, spec: SkillsEval, split: Literal["validation", "test"]) -> dict[str, float]:
    """Exact-match accuracy per skill on a split (greedy, ``dareflow.demo.skills``)."""
    model, tokenizer = load(model_uri)
    scores = {}
    for name in spec.skills:
        skill = get_skill(name)
        items = split_items(name, split, spec.n)
        expected = [skill.answer(x) for x in items]
        longest = max(len(tokenizer.encode(a, add_special_tokens=False)) for a in expected)
        got = generate_answers(model, tokenizer, [skill.prompt(x) for x in items],
                               max_new_tokens=longest + 2)
        scores[name] = sum(g == e for g, e in zip(got, expected)) / len(items)
    return scores


def evaluate_point(merged: dict[str, Any], spec: SkillsEval, store_uri: str,
                   splits: Sequence[str] = ("test",)) -> dict[str, Any]:
    """Scores of a merged model on ``splits``, cached in the store by content key.

    Returns:
        ``{"scores": {split: {skill: acc}}, "cached": bool, "eval_key": str}``.
    """
    payload = {"model": merged["model_key"], "eval": spec.model_dump(), "splits": list(splits),
               "code": EVAL_CODE_VERSION}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]
    uri = storage.join(store_uri, "experiments", "evals", key + ".json")
    try:
        return {**json.loads(storage.read_bytes(uri)), "cached": True}
    except FileNotFoundError:
        pass
    record = {"eval_key": key, "model_key": merged["model_key"],
              "scores": {s: score_skills(merged["uri"], spec, s) for s in splits}}
    storage.write_bytes_atomic(uri, json.dumps(record, sort_keys=True).encode())
    return {**record, "cached": False}


# ------------------------------------------------------------------------ tables, plots


def sweep_table(points: Sequence[dict[str, Any]], merged: Sequence[dict[str, Any]],
                evaluated: Sequence[dict[str, Any]]):
    """The sweep results as a DataFrame: method, drop_rate, one column per skill, mean."""
    import pandas as pd  # heavy: pandas (~0.3 s), only when a table is made

    rows = []
    for point, m, e in zip(points, merged, evaluated):
        scores = e["scores"]["test"]
        rows.append({"method": point["method"], "drop_rate": point["drop_rate"], **scores,
                     "mean": sum(scores.values()) / len(scores), "model_key": m["model_key"],
                     "merge_cached": m["reused"], "eval_cached": e["cached"]})
    return pd.DataFrame(rows).sort_values(["method", "drop_rate"]).reset_index(drop=True)


def plot_sweep(table, uri: str, *, title: str) -> str:
    """Score vs drop rate, one line per method, one panel per score column (like the
    paper's Figures 3, 8 and 9). Saved as PNG at ``uri``."""
    # heavy: matplotlib (~0.5 s), only when plotting
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend on import

    skip = {"method", "drop_rate", "model_key", "merge_cached", "eval_cached"}
    metrics = [c for c in table.columns if c not in skip]
    if len(metrics) == 2:  # one skill: its mean is the same curve
        metrics = metrics[:1]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    labels = {"dare": "DARE (rescale 1/(1-p))", "drop_only": "DropOnly (no rescale)",
              "magnitude": "magnitude pruning"}
    for ax, metric in zip(axes[0], metrics):
        for method, rows in table.groupby("method", sort=False):
            ax.plot(rows["drop_rate"], rows[metric], marker="o", label=labels.get(method, method))
        ax.set_xlabel("drop rate p")
        ax.set_ylabel(f"{metric} (exact match)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, uri)


def write_table(table, uri_stem: str) -> dict[str, str]:
    """Write a DataFrame as CSV and parquet next to each other in the store."""
    csv_uri, parquet_uri = uri_stem + ".csv", uri_stem + ".parquet"
    storage.write_bytes_atomic(csv_uri, table.to_csv(index=False).encode())
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    storage.write_bytes_atomic(parquet_uri, buffer.getvalue())
    return {"csv": csv_uri, "parquet": parquet_uri}


def select_on_validation(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The grid point with the best mean VALIDATION score (ties: first in grid order).
    The test score is carried along for reporting only; it never enters the choice."""
    if not rows:
        raise ValueError("the grid is empty; give at least one value per axis")
    return max(rows, key=lambda r: (r["validation_mean"], -r["index"]))


def grid_rows(points: Sequence[dict[str, Any]], merged: Sequence[dict[str, Any]],
              evaluated: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point: its coordinates, per-skill validation and test scores,
    their means, and ``selected`` (best mean validation score; see select_on_validation)."""
    rows = []
    for i, (point, m, e) in enumerate(zip(points, merged, evaluated)):
        val, test = e["scores"]["validation"], e["scores"]["test"]
        rows.append({"index": i, **point["point"],
                     **{f"val:{k}": v for k, v in val.items()},
                     **{f"test:{k}": v for k, v in test.items()},
                     "validation_mean": sum(val.values()) / len(val),
                     "test_mean": sum(test.values()) / len(test),
                     "model_key": m["model_key"], "eval_cached": e["cached"]})
    best = select_on_validation(rows)
    for r in rows:
        r["selected"] = r is best
    return rows


def plot_grid(table, uri: str, *, title: str) -> str:
    """Validation vs test mean score of every grid point; the selected one circled."""
    # heavy: matplotlib (~0.5 s), only when plotting
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot picks its backend on import

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(table["validation_mean"], table["test_mean"], label="grid points")
    chosen = table[table["selected"]]
    ax.scatter(chosen["validation_mean"], chosen["test_mean"], s=160, facecolors="none",
               edgecolors="red", label="selected on validation")
    ax.plot([0, 1], [0, 1], "k:", alpha=0.4)
    ax.set_xlabel("mean score, VALIDATION split (selects)")
    ax.set_ylabel("mean score, TEST split (reported)")
    ax.legend()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, uri)

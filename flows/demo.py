"""`dareflow demo`: the offline demo, end to end.

Builds the tiny family (dareflow.demo.family), merges two fine-tunes with DARE + task
arithmetic (configs/demo/demo.yaml) and without DARE, then scores every model on every
skill with lm-eval (the `demo_skills` suite: greedy generation, exact match).
"""

import time
from pathlib import Path
from typing import Any

import yaml

from dareflow.demo.family import build_demo_family
from dareflow.flows.evaluate import run_evaluate
from dareflow.flows.merge import run_merge
from dareflow.recipe import parse_recipe
from dareflow.settings import DEMO_RECIPE

_PLACEHOLDER = "dareflow-demo"


def demo_recipes(workdir: Path, drop_rate: float | None = None) -> dict[str, dict[str, Any]]:
    """The demo recipe with its paths moved into ``workdir``, and its no-DARE twin."""
    text = DEMO_RECIPE.read_text().replace(f" {_PLACEHOLDER}/", f" {workdir.as_posix()}/")
    dare = yaml.safe_load(text)
    if drop_rate is not None:
        for model in dare["models"]:
            model["parameters"]["drop_rate"] = drop_rate
    parse_recipe(dare, str(DEMO_RECIPE))
    plain = {**dare, "merge_method": "task_arithmetic", "name": "dareflow-demo-ta",
             "models": [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}}
                        for m in dare["models"]],
             "parameters": {"lambda": dare["parameters"]["lambda"]}}
    return {"dare": dare, "plain": plain}


def run_demo(workdir: str = "dareflow-demo", *, drop_rate: float | None = None,
             max_workers: int | None = None) -> dict[str, Any]:
    """Build the family, merge with and without DARE, and print the lm-eval table.

    Returns:
        The evaluation flow's result (comparison rows, markdown, results URI).
    """
    root = Path(workdir)
    started = time.perf_counter()
    print(f"[demo] building the tiny model family in {root / 'family'} (reused if present)")
    family = build_demo_family(root / "family", progress=lambda m: print(f"[demo] {m}"))
    skills = [name for name in family if name != "base"]
    recipes = demo_recipes(root, drop_rate)
    merged: dict[str, Path] = {}
    merge_seconds = {}
    for label, recipe in recipes.items():
        path = root / f"recipe-{label}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = root / f"merged-{label}"
        print(f"[demo] merging ({recipe['merge_method']}) into {out}")
        t0 = time.perf_counter()
        run_merge(str(path), str(out), store=str(root / "store"), max_workers=max_workers,
                  overwrite=True)
        merge_seconds[label] = time.perf_counter() - t0
        merged[label] = out
    p = recipes["dare"]["models"][0]["parameters"]["drop_rate"]
    dare_label = f"merged: DARE p={p} + TA"
    labels = {"base": family["base"], **{f"fine-tuned: {s}": family[s] for s in skills},
              "merged: TA, no DARE": merged["plain"], dare_label: merged["dare"]}
    print(f"[demo] evaluating {len(labels)} models on the demo skills with lm-eval "
          "(exact match, greedy; one process per model and skill)")
    t0 = time.perf_counter()
    evaluation = run_evaluate({k: str(v) for k, v in labels.items()}, "demo_skills",
                              store=str(root / "store"), merged=dare_label)
    eval_seconds = time.perf_counter() - t0
    print()
    print(evaluation["markdown"])
    print(f"merge time: DARE {merge_seconds['dare']:.1f} s, no DARE "
          f"{merge_seconds['plain']:.1f} s (Prefect flow, incl. start-up); evaluation "
          f"{eval_seconds:.0f} s; demo total {time.perf_counter() - started:.0f} s")
    print(f"results: {evaluation['results_uri']}")
    return evaluation

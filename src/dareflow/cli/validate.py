"""``dareflow validate FILE...``: check any config dareflow ships or reads, report every problem.

Each file is one of five kinds, told apart by its keys: a merge recipe (``merge_method``),
an evaluation suite (``tasks``), a drop-rate sweep (``drop_rates`` without
``calibration_skills``), a hyperparameter grid (``grid``) or a similarity experiment
(``calibration_skills``). A name instead of a path is looked up among the shipped configs
(``openllm_v1``, ``paper/supermario_v2``).
"""

import argparse
import sys
from pathlib import Path
from typing import Any

from dareflow.errors import ProblemsError
from dareflow.schema import read_yaml
from dareflow.settings import CONFIGS_DIR, SUITES_DIR

KINDS = ("recipe", "suite", "sweep", "grid", "similarity")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check recipe, suite, sweep, grid and similarity files; "
                       "reports every problem")
    p.add_argument("configs", nargs="+", metavar="FILE",
                   help="a YAML file, or the name of a shipped one (openllm_v1, paper/supermario_v2)")
    p.set_defaults(func=run)


def config_path(name_or_path: str) -> Path:
    """The file named ``name_or_path``: a path, else a shipped config by name.

    Raises:
        FileNotFoundError: neither (the message says where names are looked up).
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    stem = name_or_path.removesuffix(".yaml")
    for candidate in (CONFIGS_DIR / f"{stem}.yaml", SUITES_DIR / f"{stem}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config '{name_or_path}' is neither a file nor a shipped config (names are paths "
        f"under {CONFIGS_DIR} without .yaml, or suite names such as openllm_v1)"
    )


def kind_of(data: Any, source: str) -> str:
    """Which of :data:`KINDS` the parsed YAML ``data`` is.

    Raises:
        ProblemsError: not a mapping, or none of the kinds' telling keys.
    """
    if not isinstance(data, dict):
        raise ProblemsError(source, [f"expected a mapping of keys, got {type(data).__name__}"])
    if "grid" in data:
        return "grid"
    if "calibration_skills" in data:
        return "similarity"
    if "drop_rates" in data or ("finetuned" in data and "evaluation" in data):
        return "sweep"
    if "tasks" in data:
        return "suite"
    if "merge_method" in data or "models" in data:
        return "recipe"
    raise ProblemsError(source, [
        ("cannot tell which kind of config this is: a recipe has 'merge_method', a suite "
        "'tasks', a sweep 'drop_rates', a grid 'grid', a similarity experiment "
        "'calibration_skills'")
    ])


def check(path: Path) -> str:
    """Validate one file; returns ``"<kind>: <summary>"``.

    Raises:
        ProblemsError, ValueError, FileNotFoundError: every problem of the file.
    """
    kind = kind_of(read_yaml(path, "config"), str(path))
    if kind == "recipe":
        # heavy: the recipe imports torch (~1.7 s), only for a recipe
        from dareflow.recipe import fine_tunes, load_recipe

        recipe = load_recipe(path)
        return f"recipe: {recipe.merge_method}, {len(fine_tunes(recipe))} fine-tuned model(s)"
    if kind == "suite":
        # heavy: the evaluation package imports pandas (~0.5 s), only for a suite
        from dareflow.evaluation.suite import load_suite

        suite = load_suite(path)
        return f"suite: {suite.name}, {len(suite.tasks)} task(s)"
    # heavy: sweeps import torch and the merge (~1.6 s), only for a sweep, grid or similarity
    from dareflow.experiments import sweeps

    model = {"sweep": sweeps.SweepConfig, "grid": sweeps.GridConfig,
             "similarity": sweeps.SimilarityConfig}[kind]
    cfg = sweeps.load_config(path, model)
    return f"{kind}: {cfg.name}"


def run(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.configs:
        try:
            path = config_path(name)
            summary = check(path)
        except (ValueError, FileNotFoundError) as e:
            failed += 1
            print(f"FAIL {e}", file=sys.stderr)
        else:
            print(f"ok   {name}: {summary}")
    return 1 if failed else 0

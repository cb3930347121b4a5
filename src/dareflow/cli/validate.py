"""``dareflow validate FILE...``: check any config dareflow ships or reads, report every problem.

Each file is one of five kinds, told apart by its keys: a merge recipe (``merge_method``),
an evaluation suite (``tasks``), a drop-rate sweep (``drop_rates`` without
``calibration_skills``), a hyperparameter grid (``grid``) or a similarity experiment
(``calibration_skills``). A name instead of a path is looked up among the shipped configs
(``openllm_v1``, ``paper/supermario_v2``).

A recipe gets every check ``dareflow merge`` runs before it reads a model, through the same
functions: the schema and cross-field checks (:func:`dareflow.recipe.load_recipe`), each
model source (:func:`dareflow.sources.parse_source`: a local folder, written as a path or
under a folder that exists here, must exist) and, when the per-model numbers are the same
for every tensor, the merge spec (:func:`dareflow.merge.plan.build_spec`). Hub ids and
``s3://`` prefixes are not looked up (validate works offline; ``dareflow plan`` reads
their headers), and the output says which were not checked.
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
    data = read_yaml(path, "config")
    kind = kind_of(data, str(path))
    if kind == "recipe":
        return check_recipe(data, str(path))
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


def check_recipe(data: dict, source: str) -> str:
    """Validate a parsed recipe with the checks ``merge`` runs before any IO (see the
    module docstring); the recipe's and its sources' problems are reported together.

    Returns:
        ``"recipe: <method>, N fine-tuned model(s), ..."``, naming the sources that were
        not checked offline.

    Raises:
        ProblemsError: every problem, each naming its key.
    """
    # heavy: the recipe and the merge plan import torch (~1.7 s), only for a recipe
    from dareflow.merge.plan import build_spec
    from dareflow.recipe import fine_tunes, is_per_tensor, parse_recipe
    from dareflow.sources import parse_source

    problems: list[str] = []
    try:
        recipe = parse_recipe(data, source)
    except ProblemsError as e:
        recipe, problems = None, list(e.problems)
    local, unchecked = 0, []
    for key, spec in _model_keys(data):
        try:
            kind = parse_source(spec).kind
        except (ValueError, OSError) as e:
            problems.append(f"{key}: {e}")
            continue
        if kind == "local":
            local += 1
        else:
            unchecked.append(f"{spec} ({kind})")
    if recipe is not None and not is_per_tensor(recipe):
        try:
            build_spec(recipe, recipe.dtype or "float32")
        except ValueError as e:
            problems.append("parameters: " + str(e).removeprefix("tensor '' (t = 0): "))
    if problems or recipe is None:
        raise ProblemsError(source, problems)
    summary = (f"recipe: {recipe.merge_method}, {len(fine_tunes(recipe))} fine-tuned model(s), "
               f"{local} local folder(s) found")
    if unchecked:
        summary += (f"; not checked offline: {', '.join(unchecked)} (Hub ids and s3:// "
                    "prefixes are looked up by `dareflow plan` and `merge`)")
    if is_per_tensor(recipe):
        summary += ("; per-layer and filtered settings are checked against the tensor "
                    "names by `dareflow plan`")
    return summary


def _model_keys(data: dict) -> list[tuple[str, str]]:
    """``(key, model spec)`` of every model string of a recipe as written, each once."""
    pairs = [("base_model", data.get("base_model"))]
    models = data.get("models")
    for i, entry in enumerate(models if isinstance(models, list) else []):
        pairs.append((f"models[{i}].model", entry.get("model") if isinstance(entry, dict)
                      else None))
    seen: set[str] = set()
    return [(k, s) for k, s in pairs
            if isinstance(s, str) and s.strip() and not (s in seen or seen.add(s))]


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

"""Nightly deployments: the one place that says what runs, when, where, and on which store.

    python -m dareflow.deployments.deploy --env dev                 # one per recipe in configs/
    python -m dareflow.deployments.deploy --env prod --recipe configs/paper/supermario_v1.yaml
    python -m dareflow.deployments.deploy --env dev --dry-run       # print what would be deployed

Run from the repository checkout with ``PREFECT_API_URL`` pointing at the Prefect server. It
creates, on that server:

- the work pool ``dareflow-process`` (type ``process``: each flow run is a subprocess of the
  worker; no Docker) when it does not exist yet;
- one deployment per recipe (configs/paper, configs/examples: :data:`RECIPE_DIRS`),
  ``<flow name>/nightly-<recipe name>``, scheduled by the cron ``0 2 * * *`` in ``Europe/Berlin`` (02:00 local time all year, DST included), with the recipe
  inline as a parameter (validated here, before anything is deployed), the environment's store
  root, and the output ``{store}/models/<recipe name>`` (replaced each night once the new
  model is complete; a recipe's own ``output:`` is not used by deployments).

The storage root of each environment is chosen in :data:`ENVIRONMENTS` and nowhere else: it
becomes the deployment parameter ``store`` (and ``DAREFLOW_STORE`` in the flow run's
environment). ``--store`` overrides it for one deploy (CI, a staging bucket).

How the code reaches the worker: each deployment's pull step is
``prefect.deployments.steps.set_working_directory`` with this checkout's absolute path, and the
entrypoint is a file in it, so the worker must see the checkout at that same path (one machine,
or the same path on every worker machine, e.g. ``/opt/dareflow`` updated by ``git pull``), and
the worker's Python must have dareflow's dependencies (``pip install -e '.[dask]'`` in that
checkout). Object-store credentials never go into a deployment: give the worker the standard
``AWS_*`` variables (see README, "Deployments and workers").
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dareflow.settings import CONFIGS_DIR

#: the checkout deployments are made from (the flow runs' working directory on workers)
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Folders under configs/ whose recipes are deployed nightly (not suites/, sweeps/, tests/,
#: which hold evaluation suites, sweep definitions and test inputs).
RECIPE_DIRS = ("paper", "examples")

WORK_POOL = "dareflow-process"
SCHEDULE_CRON = "0 2 * * *"
SCHEDULE_TIMEZONE = "Europe/Berlin"
DEPLOYMENT_PREFIX = "nightly-"

#: Storage root per environment: the only place it is chosen. ``~`` is the worker's home.
ENVIRONMENTS: dict[str, str] = {
    "dev": "~/.cache/dareflow",
    "prod": "s3://dareflow-prod",
}

#: Evaluation suite of every nightly run (configs/suites/<name>.yaml); per recipe below.
DEFAULT_SUITE = "openllm_v1"
SUITES: dict[str, str] = {}


@dataclass(frozen=True)
class FlowTarget:
    """A flow that deployments can run: whether it takes a suite, and whether it takes the
    recipe inline (a mapping) or as a path relative to the checkout (the worker's cwd)."""

    entrypoint: str
    evaluates: bool
    recipe_inline: bool


MERGE_AND_EVALUATE = FlowTarget("flows/merge_and_evaluate.py:merge_and_evaluate_flow",
                                evaluates=True, recipe_inline=False)
MERGE_ONLY = FlowTarget("flows/merge.py:merge_flow", evaluates=False, recipe_inline=True)

#: What every nightly deployment runs: the merge only, for now. Nightly evaluation (per-recipe
#: suite and limit, score history, regressions, a GPU work pool) is issue 16; switching this
#: to MERGE_AND_EVALUATE alone would evaluate the v1 suite from the Hub on the merge workers.
FLOW = MERGE_ONLY


def discover_recipes(configs_dir: Path = CONFIGS_DIR) -> list[Path]:
    """Every recipe YAML in the :data:`RECIPE_DIRS` folders of ``configs_dir``."""
    return sorted(p for d in RECIPE_DIRS for p in (configs_dir / d).rglob("*.yaml"))


def store_for(env: str) -> str:
    """The storage root of ``env``.

    Raises:
        KeyError: ``env`` is not in :data:`ENVIRONMENTS`.
    """
    if env not in ENVIRONMENTS:
        raise KeyError(
            f"unknown environment '{env}'; choose one of {', '.join(sorted(ENVIRONMENTS))} "
            f"(their stores are set in deployments/deploy.py ENVIRONMENTS)"
        )
    return ENVIRONMENTS[env]


def deployment_specs(env: str, recipes: Sequence[str | Path], *, store: str | None = None,
                     target: FlowTarget = FLOW) -> list[dict[str, Any]]:
    """What :func:`deploy` creates, one dict per recipe, without touching a server.

    Every recipe is validated first; all problems are reported together.

    Returns:
        Dicts with ``name``, ``recipe_path``, ``parameters``, ``job_variables``, ``tags``.

    Raises:
        KeyError: unknown ``env``.
        ValueError: a recipe is invalid, or two recipes share a name.
    """
    # heavy: the recipe imports torch (~1.4 s), storage fsspec (~0.1 s); only when recipes
    # are read (--help stays fast)
    from dareflow.io import storage
    from dareflow.recipe import load_recipe, recipe_to_dict

    store = store or store_for(env)
    specs, problems, names = [], [], {}
    for path in map(Path, recipes):
        try:
            recipe = load_recipe(path)
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
            continue
        name = recipe.name or path.stem
        if name in names:
            problems.append(
                f"recipes '{names[name]}' and '{path}' are both named '{name}'; deployments and "
                "model folders are named after the recipe: set a distinct `name:` in one of them"
            )
            continue
        names[name] = path
        parameters = {
            "recipe": recipe_to_dict(recipe) if target.recipe_inline else _in_checkout(path),
            "out": storage.join(store, "models", name),
            "store": store,
            "overwrite": True,  # tonight's model replaces last night's, once complete
        }
        if target.evaluates:
            parameters["suite"] = SUITES.get(name, DEFAULT_SUITE)
        specs.append({
            "name": DEPLOYMENT_PREFIX + name,
            "recipe_path": str(path),
            "parameters": parameters,
            "job_variables": {"env": {"DAREFLOW_STORE": store}},
            "tags": ["dareflow", "nightly", env],
        })
    if problems:
        raise ValueError(f"{len(problems)} recipe problem(s), nothing deployed:\n"
                         + "\n".join(f"- {p}" for p in problems))
    return specs


def _in_checkout(path: Path) -> str:
    """``path`` relative to the checkout (the flow run's working directory on the worker)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())  # outside the checkout: must exist at this path on workers


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; True if created."""
    # Prefect (~1 s) only when deploying (not for --dry-run)
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                return True
            except ObjectAlreadyExists:  # a worker started meanwhile created it
                pool = client.read_work_pool(name)
    if pool.type != "process":
        raise ValueError(
            f"work pool '{name}' exists with type '{pool.type}', not 'process'; delete it "
            f"(prefect work-pool delete {name}) or deploy to another pool"
        )
    return False


def deploy(env: str, recipes: Sequence[str | Path] | None = None, *, store: str | None = None,
           target: FlowTarget = FLOW) -> list[str]:
    """Create or update the nightly deployments of ``recipes`` (default: every recipe in
    configs/) on the server at ``PREFECT_API_URL``.

    Returns:
        The deployments' full names, ``<flow name>/nightly-<recipe name>``.
    """
    # Prefect (~1 s) only when deploying (not for --dry-run)
    from prefect import Flow
    from prefect.schedules import Cron

    specs = deployment_specs(env, discover_recipes() if recipes is None else recipes,
                             store=store, target=target)
    ensure_work_pool()
    flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=target.entrypoint)
    names = []
    for spec in specs:
        flow.deploy(
            name=spec["name"],
            work_pool_name=WORK_POOL,
            schedule=Cron(SCHEDULE_CRON, timezone=SCHEDULE_TIMEZONE),
            parameters=spec["parameters"],
            job_variables=spec["job_variables"],
            tags=spec["tags"],
            description=f"Nightly {flow.name} of {spec['recipe_path']} ({env}).",
            print_next_steps=False,
        )
        names.append(f"{flow.name}/{spec['name']}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dareflow.deployments.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, choices=sorted(ENVIRONMENTS),
                        help="environment: picks the store root (ENVIRONMENTS)")
    parser.add_argument("--recipe", action="append", dest="recipes",
                        help="a recipe YAML (repeatable; default: every recipe in configs/)")
    parser.add_argument("--store", help="override the environment's store root for this deploy")
    parser.add_argument("--dry-run", action="store_true", help="print the deployments only")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            specs = deployment_specs(args.env, args.recipes or discover_recipes(),
                                     store=args.store)
            for spec in specs:
                print(f"{spec['name']}: {spec['recipe_path']} -> {spec['parameters']['out']}")
            return 0
        for name in deploy(args.env, args.recipes, store=args.store):
            print(f"deployed {name} ({SCHEDULE_CRON} {SCHEDULE_TIMEZONE}, pool {WORK_POOL})")
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

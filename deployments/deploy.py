"""Nightly deployments: the one place that says what runs, when, where, and on which store.

    python -m deployments.deploy --env dev                   # one per recipe in configs/
    python -m deployments.deploy --env prod --recipe configs/paper/supermario_v1.yaml \\
        --suite openllm_v1 --limit 100
    python -m deployments.deploy --env dev --dry-run         # print what would be deployed
    python -m deployments.deploy --write-prefect-yaml        # regenerate ./prefect.yaml

Run it from the repository checkout with ``PREFECT_API_URL`` pointing at the Prefect server
(``python -m dareflow.deployments.deploy`` is the same module). It creates, on that server:

- two work pools of type ``process`` (each flow run a subprocess of its worker; no Docker)
  unless they exist: :data:`MERGE_POOL` for merges (CPU machines; the layer tasks run on
  the worker's threads, or on a Dask cluster with the ``dask_address`` parameter) and
  :data:`EVAL_POOL` for evaluations (GPU machines, one worker per GPU host started with
  ``--limit 1``: one evaluation at a time per host, which spreads its benchmarks over the
  host's GPUs);
- the evaluation deployment ``dare-evaluate/evaluation`` on the evaluation pool (no
  schedule: the nightly runs start it);
- one nightly deployment per recipe (configs/paper, configs/examples: :data:`RECIPE_DIRS`,
  or ``--recipe``), ``dare-nightly/nightly-<recipe name>`` on the merge pool, scheduled by
  the cron ``0 2 * * *`` in ``Europe/Berlin`` (02:00 local time all year, DST included).
  Its parameters: the recipe inline (validated here, before anything is deployed), the
  environment's store, the suite and limit (``--suite``/``--limit``, else :data:`SUITES`
  and :data:`LIMITS` per recipe; a run overrides them with ``prefect deployment run
  --param``) and the evaluation deployment to hand the evaluation to. A night merges
  into ``{store}/models/<recipe name>``, evaluates the merge next to its base and sources,
  appends ``{store}/history/<recipe name>.parquet`` and flags regressions
  (flows/nightly.py).

How the code reaches workers: each deployment's pull step clones the git repository
(``prefect.deployments.steps.git_clone``: ``--repo``, else ``$DAREFLOW_REPO``, else this
checkout's ``origin``; ``--branch``, else the checked-out branch) and the flow run starts
in the clone; its entrypoints (``flows/nightly.py``, ``flows/evaluate.py``) are files there.
So workers need no checkout, only a Python environment with dareflow installed
(``pip install 'dareflow[eval,dask] @ git+URL@BRANCH'``, the same code) and read access
to the repository. Commit and push before deploying: workers run what the branch holds.
``prefect.yaml`` at the repository root declares the same deployments for ``prefect
deploy --all`` (written by ``--write-prefect-yaml``; a test keeps the two in step).

The storage root of each environment is chosen in :data:`ENVIRONMENTS` and nowhere else;
``--store`` overrides it for one deploy (CI, a staging bucket). Nothing secret goes into a
deployment: workers take object-store credentials from their own ``AWS_*`` variables, and
a repository URL with a password or token in it is refused.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dareflow.settings import CONFIGS_DIR, SUITES_DIR

#: The repository deployments are made from (where recipes and suite files are looked up).
REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
#: Folders under configs/ whose recipes are deployed nightly (not suites/, sweeps/, tests/,
#: which hold evaluation suites, sweep definitions and test inputs).
RECIPE_DIRS = ("paper", "examples")

MERGE_POOL = "dareflow-merge"
EVAL_POOL = "dareflow-eval"
NIGHTLY_ENTRYPOINT = "flows/nightly.py:nightly_flow"
EVALUATE_ENTRYPOINT = "flows/evaluate.py:evaluate_flow"
NIGHTLY_FLOW = "dare-nightly"  # the flows' names (their @flow(name=...))
EVALUATE_FLOW = "dare-evaluate"
EVALUATION_NAME = "evaluation"
EVALUATION = f"{EVALUATE_FLOW}/{EVALUATION_NAME}"
SCHEDULE_CRON = "0 2 * * *"
SCHEDULE_TIMEZONE = "Europe/Berlin"
DEPLOYMENT_PREFIX = "nightly-"
#: The variable a deployer sets to the URL workers clone (also read by prefect.yaml).
REPO_ENV = "DAREFLOW_REPO"
DEFAULT_BRANCH = "main"

#: Storage root per environment: the only place it is chosen. ``~`` is the worker's home.
ENVIRONMENTS: dict[str, str] = {
    "dev": "~/.cache/dareflow",
    "prod": "s3://dareflow-prod",
}

#: Evaluation suite (name in configs/suites, or a file in the repository) and documents per
#: benchmark (None: all) of each recipe's nights, by recipe name; ``--suite``/``--limit``
#: override them for one deploy, ``prefect deployment run --param`` for one run.
DEFAULT_SUITE = "openllm_v1"
SUITES: dict[str, str] = {}
LIMITS: dict[str, int] = {}


@dataclass(frozen=True)
class CodeSource:
    """The git repository and branch workers clone the flows from."""

    url: str
    branch: str

    def pull_step(self) -> dict[str, Any]:
        """The deployments' pull step (what Prefect's ``GitRepository`` writes)."""
        return {"prefect.deployments.steps.git_clone": {"repository": self.url,
                                                        "branch": self.branch}}


def _git(*args: str) -> str | None:
    """``git -C REPO_ROOT ARGS`` output, or None when git fails (no repo, no remote)."""
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,
                              text=True, check=False, timeout=30)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def code_source(repo: str | None = None, branch: str | None = None) -> CodeSource:
    """Where workers get the code: ``repo`` or ``$DAREFLOW_REPO`` or the checkout's
    ``origin``; ``branch`` or the checked-out branch.

    Raises:
        ValueError: no repository URL can be found, it carries credentials, or the
            checkout is on no branch and none is given.
    """
    url = repo or os.environ.get(REPO_ENV) or _git("remote", "get-url", "origin")
    if not url:
        raise ValueError(
            f"no git repository for workers to clone the flows from: pass --repo URL, set "
            f"{REPO_ENV}, or add a remote 'origin' to {REPO_ROOT}"
        )
    parts = urlsplit(url)
    if parts.password or (parts.scheme in ("http", "https") and parts.username):
        raise ValueError(
            f"--repo {parts.scheme}://{parts.hostname}{parts.path}: the URL carries "
            "credentials, which would be stored in every deployment; give workers git "
            "credentials instead (a credential helper, an SSH key, or a deploy token in "
            "their environment)"
        )
    branch = branch or _git("symbolic-ref", "--short", "HEAD")
    if not branch:
        raise ValueError(f"{REPO_ROOT} is on no branch (detached HEAD): pass --branch NAME")
    return CodeSource(url, branch)


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


def suite_for_workers(suite: str) -> str:
    """``suite`` as workers can find it: a suite name stays a name; a file must be in the
    repository (workers run in their clone) and becomes its path relative to the root.

    Raises:
        FileNotFoundError: neither a file nor a known suite name.
        ValueError: a file outside the repository.
    """
    path = Path(suite).expanduser()
    if not path.is_file() and (SUITES_DIR / f"{suite}.yaml").is_file():
        return suite
    if not path.is_file():
        from dareflow.evaluation.suite import suite_path

        suite_path(suite)  # raises, listing the known names
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        raise ValueError(
            f"--suite {suite}: the file is outside the repository {REPO_ROOT}, so workers "
            "(which run in a clone of it) cannot read it; commit it under configs/suites/ "
            "and pass its name"
        ) from None


def deployment_specs(env: str, recipes: Sequence[str | Path], *, store: str | None = None,
                     suite: str | None = None, limit: int | None = None,
                     backend: str = "hf", device: str = "auto",
                     mirror: bool = False) -> list[dict[str, Any]]:
    """What :func:`deploy` creates: the evaluation deployment, then one nightly deployment
    per recipe; dicts with ``name``, ``flow``, ``entrypoint``, ``work_pool``, ``schedule``,
    ``recipe_path``, ``parameters``, ``job_variables``, ``tags``. No server is touched.

    Every recipe, suite and evaluation option is checked first; all problems are reported
    together.

    Raises:
        KeyError: unknown ``env``.
        ValueError: a recipe, suite or option is invalid, or two recipes share a name.
    """
    # heavy: the recipe imports torch (~1.4 s); only when recipes are read (--help is fast)
    from dareflow.evaluation.checks import check_options
    from dareflow.recipe import load_recipe, recipe_to_dict

    store = store or store_for(env)
    job_variables = {"env": {"DAREFLOW_STORE": store}}
    specs: list[dict[str, Any]] = [{
        "name": EVALUATION_NAME, "flow": EVALUATE_FLOW, "entrypoint": EVALUATE_ENTRYPOINT,
        "work_pool": EVAL_POOL, "schedule": None, "recipe_path": None, "parameters": {},
        "job_variables": job_variables, "tags": ["dareflow", "evaluation", env],
    }]
    problems: list[str] = []
    names: dict[str, Path] = {}
    checked: dict[tuple[str, int | None], str] = {}
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
        night_suite = suite or SUITES.get(name, DEFAULT_SUITE)
        night_limit = limit if limit is not None else LIMITS.get(name)
        key = (night_suite, night_limit)
        if key not in checked:
            try:
                checked[key] = suite_for_workers(night_suite)
                check_options(night_suite, limit=night_limit, backend=backend, mirror=mirror)
            except (ValueError, FileNotFoundError) as e:
                checked[key] = ""
                problems.append(str(e))
        if not checked[key]:
            continue
        specs.append({
            "name": DEPLOYMENT_PREFIX + name, "flow": NIGHTLY_FLOW,
            "entrypoint": NIGHTLY_ENTRYPOINT, "work_pool": MERGE_POOL,
            "schedule": (SCHEDULE_CRON, SCHEDULE_TIMEZONE), "recipe_path": str(path),
            "parameters": {
                "recipe": recipe_to_dict(recipe), "store": store, "suite": checked[key],
                "limit": night_limit, "evaluation": EVALUATION, "backend": backend,
                "device": device, "mirror": mirror,
            },
            "job_variables": job_variables, "tags": ["dareflow", "nightly", env],
        })
    if problems:
        raise ValueError(f"{len(problems)} problem(s), nothing deployed:\n"
                         + "\n".join(f"- {p}" for p in problems))
    return specs


def ensure_work_pool(name: str) -> bool:
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


def deploy(specs: Sequence[dict[str, Any]], source: CodeSource, env: str) -> list[str]:
    """Create or update ``specs`` (:func:`deployment_specs`) on the server at
    ``PREFECT_API_URL``, their code cloned from ``source``.

    Returns:
        The deployments' full names, ``<flow name>/<deployment name>``.
    """
    # Prefect (~1 s) only when deploying (not for --dry-run)
    from prefect import Flow
    from prefect.runner.storage import GitRepository
    from prefect.schedules import Cron

    for pool in sorted({spec["work_pool"] for spec in specs}):
        ensure_work_pool(pool)
    flows: dict[str, Any] = {}
    names = []
    for spec in specs:
        if spec["entrypoint"] not in flows:  # clones the repository: what workers will run
            flows[spec["entrypoint"]] = Flow.from_source(
                source=GitRepository(url=source.url, branch=source.branch),
                entrypoint=spec["entrypoint"])
        flow = flows[spec["entrypoint"]]
        what = (f"nightly {spec['recipe_path']}" if spec["recipe_path"]
                else "evaluation runs of the nightly flows")
        deployment = flow.to_deployment(
            name=spec["name"],
            work_pool_name=spec["work_pool"],
            schedule=(Cron(spec["schedule"][0], timezone=spec["schedule"][1])
                      if spec["schedule"] else None),
            parameters=spec["parameters"],
            job_variables=spec["job_variables"],
            tags=spec["tags"],
            description=f"{what} ({env}); code: {source.url} {source.branch}.",
        )
        deployment.apply(work_pool_name=spec["work_pool"])
        names.append(f"{flow.name}/{spec['name']}")
    return names


def prefect_project(recipes: Sequence[Path] | None = None) -> dict[str, Any]:
    """The content of ``prefect.yaml``: the deployments of :func:`deployment_specs` for
    ``prefect deploy --all``, with the recipes as paths in the clone and the store left to
    the workers' ``DAREFLOW_STORE``; the repository URL is ``$DAREFLOW_REPO`` when
    deploying, the branch :data:`DEFAULT_BRANCH`."""
    recipes = discover_recipes() if recipes is None else recipes
    deployments: list[dict[str, Any]] = [{
        "name": EVALUATION_NAME, "entrypoint": EVALUATE_ENTRYPOINT,
        "description": "Evaluation runs of the nightly flows.",
        "tags": ["dareflow", "evaluation"], "work_pool": {"name": EVAL_POOL},
    }]
    from dareflow.recipe import load_recipe

    for path in recipes:
        name = load_recipe(path).name or path.stem
        deployments.append({
            "name": DEPLOYMENT_PREFIX + name, "entrypoint": NIGHTLY_ENTRYPOINT,
            "description": f"nightly {path.resolve().relative_to(REPO_ROOT).as_posix()}",
            "tags": ["dareflow", "nightly"],
            "parameters": {
                "recipe": path.resolve().relative_to(REPO_ROOT).as_posix(),
                "suite": SUITES.get(name, DEFAULT_SUITE), "limit": LIMITS.get(name),
                "evaluation": EVALUATION,
            },
            "schedules": [{"cron": SCHEDULE_CRON, "timezone": SCHEDULE_TIMEZONE}],
            "work_pool": {"name": MERGE_POOL},
        })
    return {
        "name": "dareflow",
        "build": None,
        "push": None,
        "pull": [CodeSource("{{ $" + REPO_ENV + " }}", DEFAULT_BRANCH).pull_step()],
        "deployments": deployments,
    }


PREFECT_YAML_HEADER = """\
# Written by `python -m deployments.deploy --write-prefect-yaml` (tests check it is current).
# The same deployments as deployments/deploy.py, for `prefect deploy --all` from this folder:
#   prefect work-pool create dareflow-merge --type process   # once (deploy.py does this
#   prefect work-pool create dareflow-eval --type process    #  itself; prefect deploy won't)
#   export DAREFLOW_REPO=<git URL workers clone>   # read when deploying
#   prefect deploy --all
# Workers: `prefect worker start --pool dareflow-merge` (CPU), and per GPU host
# `prefect worker start --pool dareflow-eval --limit 1`, with DAREFLOW_STORE and AWS_* set.
"""


def write_prefect_yaml(path: Path = PREFECT_YAML) -> Path:
    """(Re)write ``prefect.yaml`` from :func:`prefect_project`."""
    import yaml

    path.write_text(PREFECT_YAML_HEADER + yaml.safe_dump(prefect_project(), sort_keys=False))
    return path


def worker_commands() -> list[str]:
    return [f"prefect worker start --pool {MERGE_POOL}        # merge machines (CPU)",
            f"prefect worker start --pool {EVAL_POOL} --limit 1   # each GPU host"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=sorted(ENVIRONMENTS),
                        help="environment: picks the store root (ENVIRONMENTS)")
    parser.add_argument("--recipe", action="append", dest="recipes",
                        help="a recipe YAML (repeatable; default: every recipe in configs/)")
    parser.add_argument("--store", help="override the environment's store root for this deploy")
    parser.add_argument("--suite", help="suite name or a suite file in the repository "
                        f"(default: SUITES per recipe, else {DEFAULT_SUITE})")
    parser.add_argument("--limit", type=int, help="documents per benchmark (default: LIMITS "
                        "per recipe, else all)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                        help="evaluation backend on the evaluation workers (default: hf)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                        help="evaluation device (default: auto)")
    parser.add_argument("--mirror", action="store_true",
                        help="evaluate on the offline v1 mirror in the store")
    parser.add_argument("--repo", help=f"git URL workers clone (default: ${REPO_ENV}, else "
                        "this checkout's origin)")
    parser.add_argument("--branch", help="branch workers clone (default: the checked-out one)")
    parser.add_argument("--dry-run", action="store_true", help="print the deployments only")
    parser.add_argument("--write-prefect-yaml", action="store_true",
                        help=f"rewrite {PREFECT_YAML.name} from this module and exit")
    args = parser.parse_args(argv)
    try:
        if args.write_prefect_yaml:
            print(f"wrote {write_prefect_yaml()}")
            return 0
        if not args.env:
            parser.error("--env is required")
        specs = deployment_specs(args.env, args.recipes or discover_recipes(),
                                 store=args.store, suite=args.suite, limit=args.limit,
                                 backend=args.backend, device=args.device, mirror=args.mirror)
        source = code_source(args.repo, args.branch)
        if args.dry_run:
            print(f"code: {source.url} (branch {source.branch})")
            for spec in specs:
                p = spec["parameters"]
                what = (f"{spec['recipe_path']} -> {p['store']}, suite {p['suite']}, "
                        f"limit {p['limit']}" if spec["recipe_path"] else "evaluation runs")
                print(f"{spec['flow']}/{spec['name']} [{spec['work_pool']}]: {what}")
            return 0
        if _git("status", "--porcelain"):
            print(f"note: {REPO_ROOT} has uncommitted changes; workers run what "
                  f"{source.url} {source.branch} holds", file=sys.stderr)
        for name in deploy(specs, source, args.env):
            print(f"deployed {name}")
        print("start workers (with DAREFLOW_STORE and AWS_* in their environment):\n  "
              + "\n  ".join(worker_commands()))
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

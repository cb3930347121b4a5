"""Benchmark: what the artifact store's cache saves on a rerun.

    python -m benchmarks.cache_rerun                 # ~2-4 min on 2 cores, first run longer
    python -m benchmarks.cache_rerun --no-process    # flow timings only

On a synthetic Llama family (hidden 512, MLP 4096, 8 layers, vocab 32k, bf16: a random
base + N(0, 0.002) deltas, generated once into ``.bench/families/``) it times merges of
one ``dare_ties`` recipe in one artifact store:

1. cold: empty store (sources mirrored or read in place, every layer unit computed);
2. rerun: nothing changed (goal: <= 5 % of cold; every unit reused);
3. changed: one model's drop rate changed (every unit depends on every model's drop
   rate, so every unit is recomputed; the mirrors are reused);
4. the recipe of 3 again with the DARE delta gate off: the gate samples every tensor
   of every model on each run, so this row is the cache's own cost.

Two timings per scenario. "flow": the ``run_merge`` call in this process, after a
warm-up flow has started Prefect's temporary server (so server start-up is excluded).
"process": ``dareflow merge`` as a fresh process in a second, empty store (Python
imports + Prefect server start + flow), what a nightly cron job pays.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK = ROOT / ".bench"


def _recipe(paths: dict[str, Path], drop_rates: tuple[float, float], gate: bool = True) -> dict:
    return {**({} if gate else {"gate": {"mode": "off"}}),
        "merge_method": "dare_ties",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths["ft0"]), "parameters": {"drop_rate": drop_rates[0]}},
                   {"model": str(paths["ft1"]), "parameters": {"drop_rate": drop_rates[1]}}],
        "dtype": "bfloat16",
        "seed": 0,
    }


def _write(path: Path, recipe: dict) -> str:
    path.write_text(json.dumps(recipe))  # JSON is valid YAML
    return str(path)


def _warm_up_prefect() -> float:
    """Start Prefect's temporary server with a trivial flow; returns its duration."""
    from prefect import flow

    @flow(name="bench-warm-up")
    def warm_up() -> int:
        return 1

    started = time.perf_counter()
    warm_up()
    return time.perf_counter() - started


def _flow_time(recipe: str, out: Path, store: Path, workers: int | None) -> tuple[float, int]:
    from dareflow.flows.merge import run_merge

    started = time.perf_counter()
    result = run_merge(recipe, str(out), store=str(store), max_workers=workers)
    seconds = time.perf_counter() - started
    return seconds, sum(not c for c in result["cached"].values())


def _process_time(recipe: str, out: Path, store: Path, workers: int | None) -> float:
    cmd = [sys.executable, "-m", "dareflow.cli", "merge", recipe, "--out", str(out),
           "--store", str(store)]
    if workers:
        cmd += ["--max-workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="cache folder (.bench/)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-workers", type=int, default=None)
    parser.add_argument("--no-process", action="store_true",
                        help="skip the fresh-process timings")
    args = parser.parse_args(argv)

    # Prefect state of the benchmark only, not the user's ~/.prefect.
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dareflow-bench-prefect-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from benchmarks.family import FamilySpec, generate_family

    work = Path(args.work)
    spec = FamilySpec(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                      heads=8, kv_heads=4, vocab=args.vocab, fine_tunes=2)
    paths = generate_family(work / "families", spec)
    run_dir = work / "cache_rerun"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    scenarios = [
        ("cold", _write(run_dir / "recipe.yaml", _recipe(paths, (0.5, 0.7)))),
        ("rerun, nothing changed", str(run_dir / "recipe.yaml")),
        ("rerun, one drop rate changed", _write(run_dir / "changed.yaml",
                                                 _recipe(paths, (0.5, 0.6)))),
        # the DARE delta gate (dareflow.delta_stats) samples every tensor on every run; off,
        # what is left is the cache's own cost
        ("rerun, nothing changed, no gate", _write(run_dir / "nogate.yaml",
                                                   _recipe(paths, (0.5, 0.6), gate=False))),
    ]
    print(f"family: {spec.name} ({spec.num_params() / 1e6:.0f} M params per model, bf16, "
          f"base + 2 fine-tunes), dare_ties, {os.cpu_count()} cores")

    warm = _warm_up_prefect()
    rows = []
    for i, (label, recipe) in enumerate(scenarios):
        seconds, computed = _flow_time(recipe, run_dir / f"flow-out{i}", run_dir / "store",
                                       args.max_workers)
        rows.append([label, seconds, computed])
    if not args.no_process:
        for i, (_, recipe) in enumerate(scenarios):
            rows[i].append(_process_time(recipe, run_dir / f"proc-out{i}",
                                         run_dir / "proc-store", args.max_workers))

    cold_flow = rows[0][1]
    cold_proc = rows[0][3] if not args.no_process else None
    print(f"Prefect temporary server start (warm-up flow, excluded from 'flow'): {warm:.1f} s\n")
    header = f"{'scenario':<32} {'units computed':>14} {'flow s':>8} {'% cold':>7}"
    if cold_proc:
        header += f" {'process s':>10} {'% cold':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row[0]:<32} {row[2]:>14} {row[1]:>8.2f} {100 * row[1] / cold_flow:>6.1f}%"
        if cold_proc:
            line += f" {row[3]:>10.2f} {100 * row[3] / cold_proc:>6.1f}%"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

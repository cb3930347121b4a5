"""Command line for the evaluation code (until the project CLI wraps it).

    python -m tasks.evaluation prepare-mirror MIRROR_DIR [--tasks arc_challenge,mmlu] [--max-rows N]
    python -m tasks.evaluation validate [SUITE_FILE ...]
    python -m tasks.evaluation run MODEL_DIR --suite openllm_v1 --mirror MIRROR_DIR --limit 5 \\
        --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks.evaluation.suite import SUITES_DIR, load_suite


def _prepare(args: argparse.Namespace) -> int:
    from tasks.evaluation.mirror import prepare_mirror, read_manifest

    tasks = args.tasks.split(",") if args.tasks else None
    dest = prepare_mirror(args.dest, tasks=tasks, max_rows=args.max_rows)
    for name, info in sorted(read_manifest(dest)["tasks"].items()):
        rows = sum(f["rows"] for k, f in info["files"].items()
                   if k.split("/")[-1] == info["eval_split"])
        print(f"{name:16s} {rows:6d} rows evaluated  ({info['license']})")
    print(f"mirror ready: {dest}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    paths = args.suites or sorted(SUITES_DIR.glob("*.yaml"))
    failed = 0
    for path in paths:
        try:
            suite = load_suite(path)
        except (ValueError, FileNotFoundError) as exc:
            failed += 1
            print(f"FAIL {exc}", file=sys.stderr)
        else:
            print(f"ok   {path}: {suite.name}, {len(suite.tasks)} task(s)")
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from tasks.evaluation.results import comparison_markdown, comparison_table, tidy_results
    from tasks.evaluation.runner import run_task

    suite = load_suite(args.suite)
    entries = [suite.task(n) for n in args.tasks.split(",")] if args.tasks else suite.tasks
    model = args.model_name or Path(args.model_dir).name
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    raws = []
    for entry in entries:
        started = time.perf_counter()
        raw = run_task(args.model_dir, entry, backend=args.backend, limit=args.limit,
                       mirror_dir=args.mirror, device=args.device, batch_size=args.batch_size,
                       revision=args.revision)
        (out / "raw" / f"{model}__{entry.name}.json").write_text(json.dumps(raw, indent=1))
        print(f"{entry.name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        raws.append(raw)
    df = tidy_results({model: raws})
    df.to_csv(out / "results.csv", index=False)
    metrics = {e.name: e.metric for e in entries}
    table = comparison_table(df, merged=model, sources=[], metrics=metrics,
                             average=suite.average and len(entries) == len(suite.tasks))
    (out / "table.md").write_text(comparison_markdown(table))
    print(comparison_markdown(table))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluation",
                                     description="dareflow evaluation (lm-eval)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-mirror", help="write the offline v1 data mirror")
    p.add_argument("dest")
    p.add_argument("--tasks", help="comma-separated subset (default: all six)")
    p.add_argument("--max-rows", type=int, help="first rows of each evaluated split only")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("validate", help="check suite files (default: configs/suites/*.yaml)")
    p.add_argument("suites", nargs="*", type=Path)
    p.set_defaults(func=_validate)

    p = sub.add_parser("run", help="evaluate one model on a suite")
    p.add_argument("model_dir")
    p.add_argument("--suite", required=True, help="suite name or file")
    p.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    p.add_argument("--mirror", help="offline mirror folder (default: lm-eval on the Hub)")
    p.add_argument("--limit", type=int)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--device")
    p.add_argument("--batch-size", default=1, type=lambda s: s if s == "auto" else int(s))
    p.add_argument("--model-name", help="name in the tables (default: the folder name)")
    p.add_argument("--revision")
    p.add_argument("--out", required=True, help="folder for raw JSON, results.csv, table.md")
    p.set_defaults(func=_run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

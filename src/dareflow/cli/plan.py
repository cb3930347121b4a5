"""``dareflow plan RECIPE``: the merge's pre-flight, from metadata only.

Reads each model's config.json, safetensors index and headers (ranged requests on the Hub
and s3; no weight is downloaded), lists every problem the merge would stop on, the
vocabulary settings it applies and what it will cost. Exit code 0 when the merge can start,
2 when it cannot (every problem listed).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dareflow.merge.preflight import Preflight

STORE_HELP = ("artifact store the merge mirrors into (default: $DAREFLOW_STORE or "
              "~/.cache/dareflow); what it already holds is not downloaded again")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="pre-flight a recipe from metadata only: problems, "
                       "vocabulary, download, disk, memory and time")
    p.add_argument("config", help="recipe YAML (see configs/)")
    p.add_argument("--out", help="output folder or URI (default: the recipe's output:)")
    p.add_argument("--store", default=None, help=STORE_HELP)
    p.add_argument("--max-workers", type=int, default=None,
                   help="units merged at once, as for `dareflow merge` (default: min(4, cores))")
    p.add_argument("--download-mb-s", type=float, default=None, metavar="MB_S",
                   help="download rate for the time estimate, in MB/s (default: 50, assumed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch and huggingface_hub: only when planning (keeps `dareflow --help` fast)
    from dareflow.merge.preflight import DEFAULT_DOWNLOAD_RATE, preflight
    from dareflow.recipe import load_recipe
    from dareflow.settings import default_store

    if args.download_mb_s is not None and args.download_mb_s <= 0:
        raise ValueError(f"--download-mb-s must be > 0, got {args.download_mb_s}")
    recipe = load_recipe(args.config)
    # the merge flow's default (flows.merge.DEFAULT_MAX_WORKERS; not imported: Prefect)
    workers = args.max_workers or max(1, min(4, os.cpu_count() or 1))
    rate = args.download_mb_s * 1e6 if args.download_mb_s else DEFAULT_DOWNLOAD_RATE
    report = preflight(recipe, args.store or default_store(), out_uri=args.out or recipe.output,
                       workers=workers, download_rate=rate)
    print(format_report(report, args.config))
    return 0 if report.ok else 2


def format_report(report: Preflight, source: str) -> str:
    """The report as aligned text: sources, problems, vocabulary, estimates."""
    recipe = report.recipe
    title = (f"pre-flight of {source}: {recipe.merge_method}, {len(report.sources)} model(s) "
             "read from metadata only (config.json, index, safetensors headers)")
    lines = [title, ""]
    rows = [("role", "model", "revision", "headers from", "files", "to download")]
    for s in report.sources:
        rows.append((s.role, s.model, s.source.revision[:12], s.read_from,
                     size(s.size_bytes), "in place" if s.in_place else size(s.download_bytes)))
    lines += _table(rows) + [""]
    if report.problems:
        lines.append(f"PROBLEMS ({len(report.problems)}): the merge would stop here")
        lines += [f"  - {p}".replace("\n", "\n    ") for p in report.problems]
    else:
        lines.append(f"family: ok ({report.tensors} tensors in {report.units} units, "
                     f"output {report.out_dtype})")
    lines += [f"note: {n}" for n in report.notes]
    if report.vocabulary:
        lines += ["", "vocabulary:"] + [f"  {v}" for v in report.vocabulary]
    e = report.estimate
    if e is not None:
        merge_s = e.merge_seconds
        lines += ["", "estimates:"] + _table([
            ("  download", size(e.download_bytes),
             (f"files the store does not hold yet; ~{duration(e.download_seconds)} at "
              f"{e.download_rate / 1e6:g} MB/s (assumed rate)")),
            ("  disk", size(e.store_bytes + e.output_disk_bytes),
             (f"store +{size(e.store_bytes)} (downloads + unit shards "
              f"{size(e.unit_bytes)}); output {size(e.output_disk_bytes)} (a copy of them)")),
            ("  memory", size(e.memory_bytes),
             (f"at most: largest unit {e.largest_unit!r} {size(e.unit_memory_bytes)} (its "
              f"tensors of every model + output) x {e.workers} unit(s) at once")),
            ("  time", "?" if merge_s is None else f"~{duration(e.download_seconds + merge_s)}",
             "merge time not measured" if merge_s is None or e.io is None else
             f"download + merge ~{duration(merge_s)}: IO floor (read {size(e.input_bytes)} at "
             f"{size(e.io.read)}/s, write {size(e.unit_bytes)} at {size(e.io.write)}/s; "
             f"{e.io.basis}) x {e.floor_ratio:g}, dareflow's time over that floor in "
             "benchmarks/merge_vs_mergekit"),
        ])
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in rows]


def size(nbytes: float) -> str:
    """``nbytes`` in decimal units: ``512 B``, ``1.5 kB``, ``13.5 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def duration(seconds: float) -> str:
    """``seconds`` as ``0.4 s``, ``12 s``, ``4.2 min`` or ``1.3 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

